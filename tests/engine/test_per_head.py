"""Per-KV-head budgets: the CalibratedHeads allocator and its HeadGains file, per-head Fixed
plans and diagnostics, and SqueezeKVCache's per-head layout (KV heads folded into the batch),
checked against the per-layer cache it must equal head by head."""

import pytest
import torch

from squeeze_ops import reference
from squeeze_ops.engine.allocators import CalibratedHeads, Fixed, HeadGains, Uniform
from squeeze_ops.engine.cache import PrefillRecord, SqueezeKVCache
from squeeze_ops.engine.planner import allocate, diagnose
from squeeze_ops.engine.policies import PrefillNeeds, SequencePolicy, SqueezeSettings

L, HKV, D, GROUP = 6, 3, 8, 2
POLICIES = [SequencePolicy.window(), SequencePolicy.streaming(2), SequencePolicy.h2o()]


def head_gains(fraction=0.3, seed=0, L=L, heads=HKV):
    """Heavy-tailed random gains (a few heads matter), some slightly negative (noise)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(L, heads, generator=g) ** 4 * 0.05 - 0.002
    return HeadGains("tiny", L, heads, "streaming(2 sinks)", fraction, tuple(map(tuple, values.tolist())), "test")


def sums(lens, B=None):
    """cos_sum [L, B] of a random similarity profile over prompts of lens tokens."""
    return (torch.rand(len(lens), L) * 0.2 + 0.8).mul(lens[:, None].float()).t().contiguous()


@pytest.mark.parametrize("allocator", [CalibratedHeads(head_gains()), CalibratedHeads(head_gains(), 0.5, 0.25, 4.0),
                                       CalibratedHeads(head_gains(), 2.0, 0.0, 8.0, prior=0.1)],
                         ids=lambda a: a.describe())
@pytest.mark.parametrize("b_init", [0.1, 0.23, 0.5])
def test_totals_floors_and_caps(allocator, b_init):
    lens = torch.tensor([200, 77, 513, 31])
    plan = allocate(sums(lens), lens, allocator, b_init=b_init, horizon=lens + 16, min_budget=3)
    base = (lens.double() * b_init).float().double()  # the planner's base, in tokens
    assert plan.budgets.dtype == torch.int32 and plan.budgets.shape == (4, L, HKV)
    assert torch.equal(plan.budgets.flatten(1).sum(1).long(), HKV * L * base.floor().long())  # uniform's KV held
    lo = torch.maximum(torch.full_like(lens, 3), (allocator.floor * base).floor().long())
    hi = torch.minimum(lens + 16, (allocator.cap * base).floor().long())
    assert (plan.budgets >= lo[:, None, None]).all() and (plan.budgets <= hi[:, None, None]).all()


def test_follows_the_gains_and_ignores_their_sign_noise():
    gains = head_gains()
    lens = torch.tensor([4000])
    budgets = allocate(sums(lens), lens, CalibratedHeads(gains, floor=0.0, cap=100.0), b_init=0.2).budgets[0]
    g = torch.tensor(gains.values).clamp_min(0)
    w = g + 0.5 * g.mean()  # unclamped: proportional to the weights, up to rounding
    torch.testing.assert_close(budgets.double(), w.double() * (budgets.sum() / w.sum()), atol=1.0, rtol=0)
    order = g.flatten().argsort()
    assert (budgets.flatten()[order].diff() >= -1).all()  # more gain, more budget
    negative = torch.tensor(gains.values) < 0
    assert negative.any() and budgets[negative].max() - budgets[negative].min() <= 1  # the same, up to rounding


def test_gamma_zero_and_gains_without_signal_are_uniform():
    lens = torch.tensor([90, 41])
    uniform = allocate(sums(lens), lens, Uniform(), b_init=0.3).budgets
    flat = HeadGains("tiny", L, HKV, "p", 0.3, ((-0.01,) * HKV,) * L)
    for allocator in (CalibratedHeads(head_gains(), gamma=0.0), CalibratedHeads(flat)):
        budgets = allocate(sums(lens), lens, allocator, b_init=0.3).budgets
        assert torch.equal(budgets, uniform[..., None].expand(-1, -1, HKV))


def test_each_sequence_uses_the_gains_nearest_its_budget():
    a, b = head_gains(0.1, seed=1), head_gains(0.3, seed=2)
    lens = torch.tensor([1000, 1000])
    base = torch.tensor([150.0, 260.0])  # fractions 0.15 (nearer 0.1) and 0.26 (nearer 0.3)
    both = allocate(sums(lens), lens, CalibratedHeads((b, a)), base_tokens=base).budgets
    for row, alone in ((0, a), (1, b)):
        one = allocate(sums(lens[:1]), lens[:1], CalibratedHeads(alone), base_tokens=base[row : row + 1]).budgets
        assert torch.equal(both[row], one[0])


def test_head_gains_round_trip_through_their_file(tmp_path):
    gains = head_gains()
    gains.save(tmp_path / "heads.json")
    assert HeadGains.load(tmp_path / "heads.json") == gains
    (tmp_path / "bad.json").write_text('{"format": "squeeze-ops/layer-gains", "version": 1}')
    with pytest.raises(ValueError, match="format"):
        HeadGains.load(tmp_path / "bad.json")


@pytest.mark.parametrize("make", [
    lambda: CalibratedHeads("gains.json"), lambda: CalibratedHeads(head_gains(), prior=0.0),
    lambda: CalibratedHeads(head_gains(), gamma=-1.0), lambda: CalibratedHeads(head_gains(), floor=1.5),
    lambda: CalibratedHeads(head_gains(), cap=0.5), lambda: CalibratedHeads((head_gains(0.3), head_gains(0.3, 1))),
    lambda: CalibratedHeads((head_gains(0.1), head_gains(0.3, heads=2))),
    lambda: HeadGains("m", 2, 2, "p", 0.3, ((0.0, 0.0),)), lambda: HeadGains("m", 1, 2, "p", 1.0, ((0.0, 0.0),)),
    lambda: Fixed(((3, 4), 5)), lambda: Fixed(((3, 4), (5,))), lambda: Fixed(((),)),
])
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError):
        make()


def test_per_head_plans_trace_without_host_sync():
    lens = torch.tensor([100, 37, 250], dtype=torch.int32)
    cos_sum = sums(lens)
    allocator = CalibratedHeads((head_gains(0.1), head_gains(0.3, 1)))

    def plan(c, n):
        return allocate(c, n, allocator, b_init=0.25, horizon=n + 16, min_budget=2, max_budget=n).budgets

    compiled = torch.compile(plan, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(cos_sum, lens), plan(cos_sum, lens))


def test_fixed_and_diagnostics_per_head():
    lens = torch.tensor([20, 9])
    rows = tuple(tuple(3 + layer + h for h in range(HKV)) for layer in range(L))
    plan = allocate(sums(lens), lens, Fixed(rows), base_tokens=1, min_budget=4, max_budget=torch.tensor([99, 7]))
    expect = torch.tensor(rows).clamp_min(4)
    assert torch.equal(plan.budgets[0], expect.to(torch.int32))
    assert torch.equal(plan.budgets[1], expect.clamp_max(7).to(torch.int32))
    assert Fixed(rows).per_head and not Fixed((3, 4)).per_head
    big = allocate(sums(lens), lens, Fixed(rows), base_tokens=1)
    with pytest.warns(UserWarning, match="wasted budget"):
        diag = diagnose(big, torch.tensor([6, 6]), Fixed(rows), warn=True)
    assert diag.nominal[0][0] == list(rows[0]) and diag.effective[0][L - 1] == [6] * HKV
    assert "| 0 |" in diag.table() and f"| {'/'.join(map(str, rows[0]))} |" in diag.table()


# --- the cache ---------------------------------------------------------------------------

def _record(lens, scores=True):
    record = PrefillRecord.start(lens, L, "cpu")
    record.needs = PrefillNeeds(score_queries=0 if scores else -1)
    n = sum(lens)
    for _ in range(L):
        record.add_layer(torch.randn(n, HKV, D), torch.randn(n, HKV, D),
                         torch.rand(n, HKV) * 4 if scores else torch.empty(0))
    record.cos_sum.copy_(torch.rand(L, 1) * torch.tensor(lens, dtype=torch.float32))
    return record


def _steps(caches, steps, seed=0):
    """Decode `steps` tokens through each cache (the same random q/k/v): their outputs per step."""
    g = torch.Generator().manual_seed(seed)
    batch = caches[0].batch
    outs = [[] for _ in caches]
    for _ in range(steps):
        q = torch.randn(batch, HKV * GROUP, D, generator=g)
        kv = [(torch.randn(batch, HKV, D, generator=g), torch.randn(batch, HKV, D, generator=g)) for _ in range(L)]
        for cache, out in zip(caches, outs):
            width = cache.begin_step()
            out.append(torch.stack([cache.attend(layer, q, *kv[layer], D ** -0.5) for layer in range(L)]))
            cache.advance(width)
            cache.end_step()
    return [torch.stack(o) for o in outs]  # [steps, L, B, H, D]


def _held(cache, b, layer, h):
    row = reference.Row(cache.pool.tensors, cache.tables[layer, b, h].tolist())
    k, _, pos, _ = row.read_all(int(cache.lens[layer, b, h]))
    order = pos.argsort()
    return pos[order], k[order]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.kind)
def test_equal_head_budgets_are_the_per_layer_cache(policy):
    """A per-head plan giving every head its layer's budget decodes exactly as the per-layer
    plan (rows forked, a full-cache row and a per-layer row in the same batch)."""
    lens = [13, 6]
    record = _record(lens)
    layer_budgets = tuple(3 + layer for layer in range(L))
    per_layer = [SqueezeSettings.fixed(layer_budgets), SqueezeSettings.uniform(base_tokens=4), None]
    per_head = [SqueezeSettings.fixed([[b] * HKV for b in layer_budgets])] + per_layer[1:]
    source = [0, 1, 1]
    plain = SqueezeKVCache.build(record, policy, per_layer, 7, source=source)
    heads = SqueezeKVCache.build(record, policy, per_head, 7, source=source)
    assert heads.per_head and not plain.per_head and heads.budgets.shape == (3, L, HKV)
    assert torch.equal(heads.budgets, plain.budgets[..., None].expand(-1, -1, HKV))
    assert torch.equal(heads.lens, plain.lens) and torch.equal(heads.row_budget, plain.row_budget)
    ours, theirs = _steps([heads, plain], 7)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert heads.positions.tolist() == plain.positions.tolist() == [13 + 7, 6 + 7, 6 + 7]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.kind)
def test_each_head_is_a_per_layer_cache_of_its_own_budget(policy):
    """Head h of a per-head cache keeps, and attends over, what a per-layer cache of head h's
    budget keeps: its query heads' outputs match that cache's, step after step."""
    lens = [17, 9]
    record = _record(lens)
    rows = [[2 + (3 * layer + 5 * h) % 9 for h in range(HKV)] for layer in range(L)]
    cache = SqueezeKVCache.build(record, policy, SqueezeSettings.fixed(rows), 6)
    singles = [SqueezeKVCache.build(record, policy, SqueezeSettings.fixed([r[h] for r in rows]), 6)
               for h in range(HKV)]
    budgets = torch.tensor(rows, dtype=torch.int32).clamp_min(policy.min_budget)
    assert torch.equal(cache.budgets, budgets.expand(2, -1, -1))
    outs = _steps([cache] + singles, 6)
    for h in range(HKV):
        heads = slice(h * GROUP, (h + 1) * GROUP)
        torch.testing.assert_close(outs[0][..., heads, :], outs[1 + h][..., heads, :], rtol=0, atol=0)
        for b in range(2):
            for layer in range(L):
                assert cache.lens[layer, b, h] == singles[h].lens[layer, b, h]
                got, want = _held(cache, b, layer, h), _held(singles[h], b, layer, h)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_per_head_rows_hold_exactly_their_budgets():
    """Memory is per row: a head with a small budget owns few pages, whatever its layer's other
    heads hold (the padded layout gave every head of a layer its largest budget)."""
    lens = [11, 5]
    record = _record(lens)
    allocator = CalibratedHeads(head_gains(L=L, heads=HKV))
    cache = SqueezeKVCache.build(record, SequencePolicy.h2o(), [SqueezeSettings(b_init=0.5, allocator=allocator),
                                                               None], 3, page_size=2)
    mem = cache.memory()
    budgets = cache.row_budget[:, :2]  # [L, B, Hkv]
    horizon = torch.tensor([11 + 3, 5 + 3])[None, :, None]
    slots = torch.where(budgets >= horizon, horizon, budgets + 1)
    assert mem.pages == int(((slots + 1) // 2).sum()) and mem.slots_budget == int(budgets.sum())
    assert cache.budgets[0].sum() == HKV * L * int(0.5 * 11)
    assert (cache.budgets[1] == 5 + 3).all()  # the full cache of the second prompt
    assert mem.kv_allocated < mem.padded


def test_per_head_plans_of_another_model_are_refused():
    record = _record([8])
    with pytest.raises(ValueError, match="KV heads"):
        SqueezeKVCache.build(record, SequencePolicy.window(), SqueezeSettings.fixed([[4, 4]] * L), 2)
    with pytest.raises(ValueError, match="gains"):
        SqueezeKVCache.build(record, SequencePolicy.window(),
                             SqueezeSettings(b_init=0.5, allocator=CalibratedHeads(head_gains(L=L + 1))), 2)
