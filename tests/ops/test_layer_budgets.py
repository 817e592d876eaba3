"""layer_budgets: clustering + the authors' reallocation formula, C++ CPU kernel (and CUDA
kernel) vs reference; conservation, p = 1, only the top group squeezed, the worked example,
clamps, bad inputs."""
import math

import pytest
import torch

import squeeze_ops
from squeeze_ops import reference


def budgets_of(sim, base, p, k=3, min_budget=0, max_budget=None):
    return torch.ops.squeeze.layer_budgets(sim, base, p, k, min_budget, max_budget)


def random_case(B, L):
    sim = 0.8 + 0.2 * torch.rand(B, L)
    base = 50 + 5000 * torch.rand(B)
    return sim, base


@pytest.mark.parametrize("B,L", [(1, 5), (4, 32), (3, 80), (1, 256)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("p", [0.3, 0.625, 1.0])
def test_matches_reference(B, L, k, p):
    sim, base = random_case(B, L)
    max_budget = torch.randint(100, 6000, (B,), dtype=torch.int32)
    for args in [(0, None), (300, max_budget)]:
        got = budgets_of(sim, base, p, k, *args)
        expected = reference.layer_budgets(sim, base, p, k, *args)
        assert got[0].dtype == torch.int32 and got[1].dtype == torch.int32
        assert torch.equal(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[2], expected[2], atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("L", [5, 32, 80, 128])
def test_total_conserved_up_to_floors(L):
    """Without clamps: L * base - L < sum of budgets <= L * base (each layer loses < 1 token
    to its floor)."""
    sim, base = random_case(16, L)
    for p in (0.1, 0.381, 0.625, 0.9):
        budgets, labels, _ = budgets_of(sim, base, p)
        total = budgets.double().sum(1)
        target = L * base.double()
        assert (total > target - L).all() and (total <= target * (1 + 1e-12)).all()
        assert (labels == 2).any(1).all()  # the formula, not the uniform fallback, was tested


def test_p_one_is_the_uniform_split_exactly():
    sim, base = random_case(8, 32)
    base[0] = 1680.0
    base[1] = 1679.75
    for k in (1, 2, 3, 5):
        budgets, _, _ = budgets_of(sim, base, 1.0, k)
        assert torch.equal(budgets, base.double().floor().int()[:, None].expand(8, 32))


def test_only_the_top_group_is_squeezed():
    sim, base = random_case(6, 40)
    p = 0.35
    budgets, labels, centroids = budgets_of(sim, base, p)
    for b in range(6):
        top = labels[b] == 2
        G = int(top.sum())
        assert (budgets[b][top] == math.floor(p * float(base[b]))).all()
        others = budgets[b][~top]
        assert (others == math.floor(float(base[b]) * (40 - p * G) / (40 - G))).all()
        assert (others > budgets[b][top][0]).all()
        # The squeezed group is the one with the highest similarities.
        assert sim[b][top].min() > sim[b][~top].max()
        assert centroids[b, 2] == centroids[b].max()


def test_worked_example_of_the_paper():
    """The worked example of docs/METHOD.md#budgets: L = 32, b_init = 0.21, p = 0.381, BASE = 8000,
    |G3| = 20 -> 3413 tokens to 12 layers and 640 to 20 layers."""
    sim = torch.cat([0.60 + 0.01 * torch.rand(4), 0.80 + 0.01 * torch.rand(8), 0.97 + 0.01 * torch.rand(20)])[None]
    budgets, labels, _ = budgets_of(sim, torch.tensor([0.21 * 8000]), 0.381)
    assert int((labels == 2).sum()) == 20
    assert sorted(budgets[0].tolist()) == [640] * 20 + [3413] * 12
    assert budgets[0, 12:].tolist() == [640] * 20
    assert abs(int(budgets.sum()) - 32 * 1680) < 32


def test_fewer_distinct_values_or_one_group_is_uniform():
    base = torch.tensor([1000.5, 200.0, 77.0])
    sim = torch.tensor([[0.9] * 10, [0.5] * 5 + [0.7] * 5, [0.1 * i for i in range(10)]])
    budgets, labels, centroids = budgets_of(sim, base, 0.3, 3)
    assert budgets[0].tolist() == [1000] * 10  # one distinct value: top group empty
    assert budgets[1].tolist() == [200] * 10  # two distinct values < k = 3: top group empty
    assert centroids[1, 2].isnan()
    assert (budgets[2] != 77).any()  # the control row is squeezed
    budgets, _, _ = budgets_of(sim, base, 0.3, 1)  # k = 1: the top group holds every layer
    assert torch.equal(budgets, torch.tensor([1000, 200, 77], dtype=torch.int32)[:, None].expand(3, 10))


def test_min_and_max_budget_clamp():
    sim, _ = random_case(2, 16)
    base = torch.tensor([10.0, 1000.0])
    budgets, labels, _ = budgets_of(sim, base, 0.2, 3, min_budget=4)
    assert (budgets[0][labels[0] == 2] == 4).all()  # floor(0.2 * 10) = 2 -> 4
    capped, _, _ = budgets_of(sim, base, 0.2, 3, 4, torch.tensor([5, 700], dtype=torch.int32))
    assert torch.equal(capped, budgets.clamp_max(torch.tensor([[5], [700]], dtype=torch.int32)))
    assert capped.max() == 700


def test_public_wrapper_accepts_numbers():
    sim, _ = random_case(3, 12)
    budgets, _, _ = squeeze_ops.layer_budgets(sim, 500.0, 0.4, max_budget=300)
    expected, _, _ = budgets_of(sim, torch.full((3,), 500.0), 0.4, 3, 1, torch.full((3,), 300, dtype=torch.int32))
    assert torch.equal(budgets, expected)


def test_opcheck():
    sim, base = random_case(3, 21)
    torch.library.opcheck(torch.ops.squeeze.layer_budgets.default, (sim, base, 0.4, 3, 1, None))
    torch.library.opcheck(torch.ops.squeeze.layer_budgets.default,
                          (sim, base, 0.4, 2, 1, torch.full((3,), 900, dtype=torch.int32)))


# (changed arguments, the name the error must carry)
BAD = [
    (dict(p=0.0), "p"), (dict(p=-0.5), "p"), (dict(p=float("nan")), "p"),
    (dict(k=0), "k"), (dict(k=9), "k"),
    (dict(min_budget=-1), "min_budget"),
    (dict(base=torch.tensor([100.0, -1.0])), "base"),
    (dict(base=torch.tensor([100.0, float("nan")])), "base"),
    (dict(base=torch.tensor([100.0, 5.0]).double()), "base"),
    (dict(base=torch.tensor([100.0])), "base"),
    (dict(base=torch.tensor([100.0, 5.0], device="meta")), "base"),
    (dict(max_budget=torch.tensor([10, -1], dtype=torch.int32)), "max_budget"),
    (dict(max_budget=torch.tensor([10, 1])), "max_budget"),
    (dict(max_budget=torch.tensor([10], dtype=torch.int32)), "max_budget"),
    (dict(sim=torch.rand(2, 8).double()), "sim"),
    (dict(sim=torch.rand(8)), "sim"),
    (dict(sim=torch.rand(2, 300)), "sim"),
    (dict(sim=torch.tensor([[0.1, float("nan")] * 4] * 2)), "sim"),
]


@pytest.mark.parametrize("change,name", BAD, ids=[f"{n}{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_inputs_raise_and_leave_inputs_untouched(change, name):
    args = dict(sim=torch.rand(2, 8), base=torch.tensor([100.0, 5.0]), p=0.5, k=3, min_budget=1,
                max_budget=torch.tensor([50, 60], dtype=torch.int32))
    args.update(change)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises((ValueError, RuntimeError), match=name):
        torch.ops.squeeze.layer_budgets(*args.values())
    for k, v in before.items():
        torch.testing.assert_close(args[k], v, atol=0, rtol=0, equal_nan=True)


# ---- GPU ----

@pytest.mark.cuda
@pytest.mark.parametrize("L", [5, 32, 80, 128, 256])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_cuda_identical_to_cpu(L, k):
    sim, base = random_case(64, L)
    sim[::3] = torch.randint(0, 3, (len(sim[::3]), L)).float() / 10  # ties, fewer distinct values
    max_budget = torch.randint(100, 6000, (64,), dtype=torch.int32)
    for p in (0.381, 1.0):
        for mb in (None, max_budget):
            got = budgets_of(sim.cuda(), base.cuda(), p, k, 2, None if mb is None else mb.cuda())
            expected = budgets_of(sim, base, p, k, 2, mb)
            assert torch.equal(got[0].cpu(), expected[0])
            assert torch.equal(got[1].cpu(), expected[1])
            torch.testing.assert_close(got[2].cpu(), expected[2], atol=0, rtol=0, equal_nan=True)


@pytest.mark.cuda
def test_cuda_graph_capture():
    sim, base = random_case(8, 32)
    sim, base = sim.cuda(), base.cuda()
    budgets_of(sim, base, 0.4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        budgets, labels, _ = budgets_of(sim, base, 0.4)
    sim.copy_(torch.rand(8, 32))
    graph.replay()
    assert torch.equal(budgets.cpu(), budgets_of(sim.cpu(), base.cpu(), 0.4)[0])


@pytest.mark.cuda
def test_cuda_value_checks_under_debug(monkeypatch):
    sim = torch.rand(2, 8, device="cuda")
    bad_base = torch.tensor([100.0, -1.0], device="cuda")
    budgets_of(sim, bad_base, 0.5)  # no host sync without SQUEEZE_DEBUG: clamped by min_budget
    monkeypatch.setenv("SQUEEZE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="base"):
        budgets_of(sim, bad_base, 0.5)


@pytest.mark.cuda
def test_cuda_device_mix_raises():
    with pytest.raises((ValueError, RuntimeError), match="base"):
        budgets_of(torch.rand(2, 8, device="cuda"), torch.tensor([1.0, 2.0]), 0.5)
