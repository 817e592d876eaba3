"""The research-only allocators (research/allocators.py): totals, exact baselines, the
clamped squeeze's redistribution, the pyramid ramp, the calibrated greedy over a profile file."""
import itertools
import json
import math

import pytest
import torch

from research.allocators import Calibrated, ClampedSqueeze, Pyramid
from squeeze_ops.engine.allocators import SensitivityProfile, Squeeze
from squeeze_ops.engine.planner import allocate
from tests.allocator_cases import assert_plans_without_host_sync, assert_totals_conserved, in_context, spiky_similarity, sums

L = 12


def profile(L=L, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(L, generator=g) ** 3
    values = [tuple((scale * (0.5 - 0.11 * j) + 0.01 * torch.randn(L, generator=g)).tolist()) for j in range(4)]
    return SensitivityProfile("tiny-llama", L, "h2o(recent 0.5, 0 sinks)", (0.05, 0.1, 0.2, 0.4), tuple(values),
                              "random test profile")


RESEARCH = [ClampedSqueeze(0.3), Pyramid(3.0), Calibrated(profile()), Calibrated(profile(), floor=0.5)]


@pytest.mark.parametrize("allocator", RESEARCH, ids=lambda a: a.describe())
@pytest.mark.parametrize("b_init", [0.1, 0.23, 0.5])
def test_totals_conserved(allocator, b_init):
    assert_totals_conserved(allocator, b_init, L)


@pytest.mark.parametrize("b_init", [0.07, 0.31, 1.0])
def test_uniform_is_exact(b_init):
    lens = torch.tensor([123, 1000, 9])
    cos_sum = sums(spiky_similarity(3), lens)
    expected = (lens.double() * b_init).float().floor().clamp_min(1).int()[:, None].expand(3, L)
    for allocator in (ClampedSqueeze(1.0), Pyramid(1.0)):
        plan = allocate(cos_sum, lens, allocator, b_init=b_init, horizon=lens + 32)
        assert torch.equal(plan.budgets, expected), allocator


def test_clamp_redistributes_what_a_layer_cannot_hold():
    lens = torch.tensor([100, 40])
    cap = lens + 10
    cos_sum = sums(spiky_similarity(2), lens)
    faithful = allocate(cos_sum, lens, Squeeze(0.2), b_init=0.6, horizon=cap)
    clamped = allocate(cos_sum, lens, ClampedSqueeze(0.2), b_init=0.6, horizon=cap)
    assert (faithful.budgets > cap[:, None]).any()  # the formula gives more than fits
    assert (clamped.budgets <= cap[:, None]).all()
    assert torch.equal(clamped.budgets.sum(1).long(), L * (lens * 0.6).floor().long())
    squeezed = clamped.labels == 2
    assert (clamped.budgets[squeezed] > faithful.budgets[squeezed]).all()  # the surplus went there
    # A total no layer set can hold: every layer full, nothing more.
    full = allocate(cos_sum, lens, ClampedSqueeze(0.2), b_init=1.5, horizon=cap)
    assert torch.equal(full.budgets, cap[:, None].expand(2, L).int())


def test_pyramid_monotone():
    lens = torch.tensor([512, 333])
    for ratio in (1.5, 3.0, 10.0):
        plan = allocate(sums(spiky_similarity(2), lens), lens, Pyramid(ratio), b_init=0.15)
        steps = plan.budgets[:, 1:] - plan.budgets[:, :-1]
        assert (steps <= 0).all()
        first, last = plan.budgets[:, 0].double(), plan.budgets[:, -1].double()
        assert ((first / last - ratio).abs() < 0.1 * ratio).all()


def test_calibrated_greedy_is_optimal_on_a_convex_profile():
    """Three layers, convex loss curves: the greedy allocation reaches the brute-force optimum
    of the summed piecewise-linear loss (up to one token per layer of rounding)."""
    fractions = (0.1, 0.3, 0.6)
    curves = [[0.9, 0.4, 0.1], [0.2, 0.1, 0.05], [0.5, 0.15, 0.02]]  # per layer, at each fraction
    prof = SensitivityProfile("m", 3, "window", fractions, tuple(tuple(c[j] for c in curves) for j in range(3)))
    T = 100
    knots = [f * T for f in fractions] + [T]

    def loss(layer, b):
        ys = curves[layer] + [0.0]
        for j in range(3):
            if b <= knots[j + 1]:
                return ys[j] + (ys[j + 1] - ys[j]) * (b - knots[j]) / (knots[j + 1] - knots[j])
        return 0.0

    lens = torch.tensor([T])
    for b_init in (0.2, 0.35, 0.5):
        plan = allocate(torch.full((3, 1), 0.9 * T), lens, Calibrated(prof), b_init=b_init)
        got = plan.budgets[0].tolist()
        total = 3 * int(T * b_init)
        assert sum(got) == total and min(got) >= 10
        best = min(sum(loss(i, b) for i, b in enumerate(c)) for c in itertools.product(range(10, T + 1), repeat=2)
                   for c in [c + (total - sum(c),)] if 10 <= c[2] <= T)
        assert sum(loss(i, b) for i, b in enumerate(got)) <= best + 3 * 0.05


def test_calibrated_profile_round_trips_through_its_file(tmp_path):
    prof = profile()
    path = tmp_path / "tiny-llama.h2o.json"
    prof.save(path)
    data = json.loads(path.read_text())
    assert data["model"] == "tiny-llama" and data["num_layers"] == L and data["budgets"] == [0.05, 0.1, 0.2, 0.4]
    loaded = SensitivityProfile.load(path)
    assert loaded == prof
    lens = torch.tensor([256])
    cos_sum = sums(spiky_similarity(1), lens)
    assert torch.equal(allocate(cos_sum, lens, Calibrated(loaded), b_init=0.2).budgets,
                       allocate(cos_sum, lens, Calibrated(prof), b_init=0.2).budgets)
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="profile"):
        SensitivityProfile.load(path)


def test_calibrated_follows_the_profile():
    values = [[0.0] * L for _ in range(4)]
    for j in range(4):
        values[j][5] = 1.0 - 0.2 * j  # only layer 5 matters
    prof = SensitivityProfile("m", L, "window", (0.05, 0.1, 0.2, 0.4), tuple(map(tuple, values)))
    lens = torch.tensor([400])
    budgets = allocate(sums(spiky_similarity(1), lens), lens, Calibrated(prof), b_init=0.1).budgets[0]
    assert budgets[5] == budgets.max() and budgets[5] >= 0.4 * 400


@pytest.mark.parametrize("allocator", RESEARCH[::2], ids=lambda a: a.describe())
def test_allocation_traces_without_host_sync(allocator):
    assert_plans_without_host_sync(allocator)


@pytest.mark.parametrize("make", [
    lambda: ClampedSqueeze(0.0), lambda: Pyramid(0.5), lambda: Calibrated(profile(), floor=2),
    lambda: SensitivityProfile("m", 2, "h2o", (0.2, 0.1), ((0, 0), (0, 0))),
    lambda: SensitivityProfile("m", 2, "h2o", (0.1,), ((0, 0, 0),)),
])
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError):
        make()


def test_calibrated_refuses_another_model():
    lens = torch.tensor([50])
    with pytest.raises(ValueError, match="profile"):
        allocate(sums(spiky_similarity(1), lens), lens, Calibrated(profile(L=L + 1)), b_init=0.2)


def test_calibrated_uses_the_profile_nearest_each_sequence_budget():
    profiles = (in_context(0.1, 1), in_context(0.3, 4))
    alloc = Calibrated(profiles)
    lens = torch.tensor([400, 400, 400])
    sums = torch.full((6, 3), 0.9 * 400)
    plan = allocate(sums, lens, alloc, base_tokens=torch.tensor([40.0, 120.0, 48.0]))
    budgets = plan.budgets
    assert budgets[0].argmax() == 1 and budgets[1].argmax() == 4  # 0.1 -> layer 1, 0.3 -> layer 4
    assert budgets[2].argmax() == 1  # 0.12: nearer 0.1
    assert torch.equal(budgets.sum(1), torch.tensor([6 * 40, 6 * 120, 6 * 48], dtype=torch.int32))
    single = allocate(sums[:, :1], lens[:1], Calibrated(profiles[0]), base_tokens=40.0).budgets
    assert torch.equal(single[0], budgets[0])
    assert "in context 0.1/0.3" in alloc.describe()


def test_calibrated_rejects_mixed_profiles():
    with pytest.raises(ValueError, match="profile"):
        Calibrated((in_context(0.1, 1), in_context(0.1, 2)))
    other = in_context(0.2, 1)
    other = SensitivityProfile("other", 6, other.policy, other.budgets, other.values, context=0.2)
    with pytest.raises(ValueError, match="profile"):
        Calibrated((in_context(0.1, 1), other))
    with pytest.raises(ValueError, match="profile"):
        Calibrated(())
    assert math.isclose(Calibrated((in_context(0.3, 1), in_context(0.1, 1))).profiles[0].context, 0.1)
