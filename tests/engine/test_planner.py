"""plan_budgets: from similarity sums accumulated in prefill to per-layer budgets."""
import pytest
import torch

import squeeze_ops
from squeeze_ops import reference
from squeeze_ops.engine.planner import plan_budgets


def prefill_sums(lens, L, d=24):
    """cos_sum [L, B] as a prefill of L layers accumulates it through add_rmsnorm_cossim."""
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    residual = torch.randn(int(cu[-1]), d)
    weight = torch.ones(d)
    cos_sum = torch.zeros(L, len(lens))
    for layer in range(L):
        attn_out = (0.1 + layer % 5) * torch.randn_like(residual)
        squeeze_ops.add_rmsnorm_cossim(residual, attn_out, weight, cu, cos_sum[layer], 1e-6)
    return cos_sum


def test_plan_from_prefill_sums():
    lens = [13, 1, 30]
    cos_sum = prefill_sums(lens, L=12)
    prompt_lens = torch.tensor(lens)
    plan = plan_budgets(cos_sum, prompt_lens, b_init=0.4, p=0.5, k=3, min_budget=2)
    similarity = cos_sum.t() / prompt_lens[:, None]
    torch.testing.assert_close(plan.similarity, similarity)
    assert ((plan.similarity >= -1) & (plan.similarity <= 1)).all()
    base = (prompt_lens.double() * 0.4).float()
    expected = reference.layer_budgets(similarity, base, 0.5, 3, 2, None)
    for got, want in zip(plan[:3], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, equal_nan=True)


def test_worked_example_from_b_init():
    """The worked example of docs/METHOD.md#budgets: b_init = 0.21, p = 0.381, BASE = prompt length
    8000, |G3| = 20."""
    sim = torch.cat([0.6 + 0.01 * torch.rand(4), 0.8 + 0.01 * torch.rand(8), 0.97 + 0.01 * torch.rand(20)])
    cos_sum = (sim * 8000)[:, None]  # [L = 32, B = 1]
    plan = plan_budgets(cos_sum, torch.tensor([8000], dtype=torch.int32), b_init=0.21, p=0.381)
    assert plan.budgets[0].tolist() == [3413] * 12 + [640] * 20
    assert plan.labels[0].tolist() == [0] * 4 + [1] * 8 + [2] * 20


def test_base_tokens_equivalent_to_b_init():
    cos_sum = prefill_sums([9, 17], L=10)
    lens = torch.tensor([9, 17])
    via_b_init = plan_budgets(cos_sum, lens, b_init=0.5, p=0.3)
    via_tensor = plan_budgets(cos_sum, lens, base_tokens=torch.tensor([4.5, 8.5]), p=0.3)
    assert torch.equal(via_b_init.budgets, via_tensor.budgets)
    fixed = plan_budgets(cos_sum, lens, base_tokens=1680, p=0.3, max_budget=1000)
    assert fixed.budgets.max() <= 1000
    as_tensors = plan_budgets(cos_sum, lens, base_tokens=torch.tensor([1680.0] * 2), p=0.3,
                              max_budget=torch.tensor([1000, 1000], dtype=torch.int32))
    assert torch.equal(fixed.budgets, as_tensors.budgets)


def test_empty_prompt_gives_zero_similarity():
    plan = plan_budgets(torch.zeros(6, 2), torch.tensor([0, 0]), b_init=0.3, p=0.5)
    assert torch.equal(plan.similarity, torch.zeros(2, 6))
    assert (plan.budgets == 1).all()  # floor(0) lifted to min_budget


def test_traces_without_graph_breaks():
    """The fake kernels carry plan_budgets through torch.compile(fullgraph=True)."""
    cos_sum, lens = prefill_sums([7, 12], L=9), torch.tensor([7, 12])
    fn = lambda c, n: plan_budgets(c, n, b_init=0.5, p=0.4)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(cos_sum, lens).budgets, fn(cos_sum, lens).budgets)


@pytest.mark.parametrize("kwargs,name", [
    (dict(b_init=0.2, base_tokens=100), "b_init"),
    (dict(), "b_init"),
    (dict(b_init=-0.1), "b_init"),
    (dict(b_init=0.2, prompt_lens=torch.tensor([5.0, 6.0])), "prompt_lens"),
    (dict(b_init=0.2, prompt_lens=torch.tensor([5, 6, 7])), "prompt_lens"),
    (dict(b_init=0.2, prompt_lens=torch.tensor([5, 6], device="meta")), "prompt_lens"),
    (dict(b_init=0.2, cos_sum=torch.zeros(4, 2).double()), "cos_sum"),
    (dict(b_init=0.2, cos_sum=torch.zeros(4)), "cos_sum"),
    (dict(b_init=0.2, p=0.0), "p"),
    (dict(b_init=0.2, k=5), "k"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_inputs_raise(kwargs, name):
    args = dict(cos_sum=torch.rand(4, 2), prompt_lens=torch.tensor([5, 6]), p=0.5)
    args.update(kwargs)
    cos_sum, prompt_lens = args.pop("cos_sum"), args.pop("prompt_lens")
    before = cos_sum.clone()
    with pytest.raises((ValueError, RuntimeError), match=name):
        plan_budgets(cos_sum, prompt_lens, **args)
    assert torch.equal(cos_sum, before)


# ---- GPU ----

@pytest.mark.cuda
def test_cuda_plan_matches_cpu_and_compiles_without_graph_breaks():
    cos_sum = prefill_sums([100, 37, 5], L=32)
    lens = torch.tensor([100, 37, 5], dtype=torch.int32)
    expected = plan_budgets(cos_sum, lens, b_init=0.25, p=0.4)
    got = plan_budgets(cos_sum.cuda(), lens.cuda(), b_init=0.25, p=0.4)
    assert torch.equal(got.budgets.cpu(), expected.budgets)
    compiled = torch.compile(lambda c, n: plan_budgets(c, n, b_init=0.25, p=0.4), fullgraph=True)
    assert torch.equal(compiled(cos_sum.cuda(), lens.cuda()).budgets.cpu(), expected.budgets)
