"""Inputs shared by the allocator tests of the engine and of the research allocators."""
import torch

from squeeze_ops.engine.allocators import SensitivityProfile


def spiky_similarity(B, L=12, low=None):
    """The shape measured on SmolLM2: most layers ~0.98-0.99, a few (default 0, 1, L - 3)
    clearly lower. fp32 [B, L]."""
    low = (0, 1, L - 3) if low is None else low
    sim = 0.98 + 0.01 * torch.rand(B, L)
    sim[:, list(low)] = torch.tensor([0.6, 0.8, 0.9])[: len(low)]
    return sim


def sums(sim, lens):
    """cos_sum [L, B] of a similarity [B, L] over prompts of lens tokens."""
    return (sim * lens[:, None].float()).t().contiguous()


def in_context(c, important, L=6):
    """A profile of L layers measured around c: cutting `important` to c/4 costs a lot, raising
    it gains (calibration.fit_gains reads such profiles; research.allocators.Calibrated
    allocates by them)."""
    fractions = (0.25 * c, 0.5 * c, c, 1.75 * c)
    rows = []
    for m in (0.25, 0.5, 1.0, 1.75):
        row = [0.002 * (1 - m)] * L
        row[important] = 0.2 * (1 - m) if m < 1 else -0.05 * (m - 1)
        rows.append(tuple(row))
    return SensitivityProfile("m", L, "streaming(4 sinks)", fractions, tuple(rows), "test", context=c)


def assert_plans_without_host_sync(allocator):
    """allocate() under torch.compile(fullgraph=True), which fails on any graph break (e.g. a
    .item() or .tolist() of a tensor), plans what eager allocate() plans."""
    from squeeze_ops.engine.planner import allocate

    lens = torch.tensor([100, 37, 250], dtype=torch.int32)
    cos_sum = sums(spiky_similarity(3), lens)

    def plan(c, n):
        return allocate(c, n, allocator, b_init=0.25, horizon=n + 16, min_budget=2).budgets

    compiled = torch.compile(plan, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(cos_sum, lens), plan(cos_sum, lens))


def assert_totals_conserved(allocator, b_init, L=12):
    """Four ragged prompts: int32 [4, L] budgets that sum to L x floor(b_init x prompt) per
    sequence, within [min_budget, horizon]."""
    from squeeze_ops.engine.planner import allocate

    lens = torch.tensor([200, 77, 513, 31])
    plan = allocate(sums(spiky_similarity(4, L), lens), lens, allocator, b_init=b_init, horizon=lens + 16,
                    min_budget=2)
    base = (lens.double() * b_init).float().floor().long()
    assert plan.budgets.dtype == torch.int32 and plan.budgets.shape == (4, L)
    assert torch.equal(plan.budgets.sum(1).long(), L * base)
    assert (plan.budgets >= 2).all() and (plan.budgets <= (lens + 16)[:, None]).all()
