"""Layer allocators behind planner.allocate: totals, bounds, exact baselines, the calibrated
profile file, tracing without host synchronisation, diagnostics, engine wiring."""
import itertools
import json
import warnings

import pytest
import torch

from squeeze_ops.allocators import (Calibrated, Continuous, Fixed, Pyramid, SensitivityProfile, Squeeze, Uniform,
                                    water_fill)
from squeeze_ops.cache import PrefillRecord, SqueezeKVCache
from squeeze_ops.planner import allocate, diagnose
from squeeze_ops.policies import SequencePolicy, SqueezeSettings

L = 12


def spiky_similarity(B, L=L, low=(0, 1, L - 3)):
    """The shape measured on SmolLM2: most layers ~0.98-0.99, a few clearly lower."""
    sim = 0.98 + 0.01 * torch.rand(B, L)
    sim[:, list(low)] = torch.tensor([0.6, 0.8, 0.9])[: len(low)]
    return sim


def sums(sim, lens):
    """cos_sum [L, B] of a similarity [B, L] over prompts of lens tokens."""
    return (sim * lens[:, None].float()).t().contiguous()


def profile(L=L, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(L, generator=g) ** 3
    values = [tuple((scale * (0.5 - 0.11 * j) + 0.01 * torch.randn(L, generator=g)).tolist()) for j in range(4)]
    return SensitivityProfile("tiny-llama", L, "h2o(recent 0.5, 0 sinks)", (0.05, 0.1, 0.2, 0.4), tuple(values),
                              "random test profile")


REDISTRIBUTING = [Squeeze(0.3, clamp=True), Continuous(1.0, 0.25, 4.0), Continuous(2.0, 0.0, 8.0), Pyramid(3.0),
                  Calibrated(profile()), Calibrated(profile(), floor=0.5)]


@pytest.mark.parametrize("allocator", REDISTRIBUTING + [Uniform()], ids=lambda a: a.describe())
@pytest.mark.parametrize("b_init", [0.1, 0.23, 0.5])
def test_totals_conserved(allocator, b_init):
    lens = torch.tensor([200, 77, 513, 31])
    plan = allocate(sums(spiky_similarity(4), lens), lens, allocator, b_init=b_init, capacity=lens + 16,
                    min_budget=2)
    base = (lens.double() * b_init).float().floor().long()
    assert plan.budgets.dtype == torch.int32 and plan.budgets.shape == (4, L)
    assert torch.equal(plan.budgets.sum(1).long(), L * base)
    assert (plan.budgets >= 2).all() and (plan.budgets <= (lens + 16)[:, None]).all()


def test_faithful_squeeze_is_layer_budgets_and_loses_only_rounding():
    lens = torch.tensor([300, 64])
    sim = spiky_similarity(2)
    plan = allocate(sums(sim, lens), lens, Squeeze(0.3), b_init=0.2)
    base = lens.double() * 0.2
    total = plan.budgets.sum(1).double()
    assert ((total <= L * base) & (total > L * base - L)).all()
    assert plan.labels[0, 0] == 0 and plan.labels[0, 2] == 2  # layer 0 most important, layer 2 squeezed


def test_floors_and_caps_respected():
    lens = torch.tensor([400, 90])
    plan = allocate(sums(spiky_similarity(2), lens), lens, Continuous(gamma=1.0, floor=0.5, cap=2.5), b_init=0.2,
                    capacity=lens + 8)
    base = lens.double() * 0.2
    assert (plan.budgets >= (0.5 * base).floor()[:, None]).all()
    assert (plan.budgets <= (2.5 * base).floor()[:, None]).all()
    assert (plan.budgets == (2.5 * base).floor()[:, None]).any(1).all()  # the spikes reach the cap
    assert (plan.budgets == (0.5 * base).floor()[:, None]).any(1).all()  # the flat layers sit at the floor


def test_clamp_redistributes_what_a_layer_cannot_hold():
    lens = torch.tensor([100, 40])
    cap = lens + 10
    cos_sum = sums(spiky_similarity(2), lens)
    faithful = allocate(cos_sum, lens, Squeeze(0.2), b_init=0.6, capacity=cap)
    clamped = allocate(cos_sum, lens, Squeeze(0.2, clamp=True), b_init=0.6, capacity=cap)
    assert (faithful.budgets > cap[:, None]).any()  # the formula gives more than fits
    assert (clamped.budgets <= cap[:, None]).all()
    assert torch.equal(clamped.budgets.sum(1).long(), L * (lens * 0.6).floor().long())
    squeezed = clamped.labels == 2
    assert (clamped.budgets[squeezed] > faithful.budgets[squeezed]).all()  # the surplus went there
    # A total no layer set can hold: every layer full, nothing more.
    full = allocate(cos_sum, lens, Squeeze(0.2, clamp=True), b_init=1.5, capacity=cap)
    assert torch.equal(full.budgets, cap[:, None].expand(2, L).int())


@pytest.mark.parametrize("b_init", [0.07, 0.31, 1.0])
def test_uniform_is_exact(b_init):
    lens = torch.tensor([123, 1000, 9])
    cos_sum = sums(spiky_similarity(3), lens)
    expected = (lens.double() * b_init).float().floor().clamp_min(1).int()[:, None].expand(3, L)
    for allocator in (Squeeze(1.0), Squeeze(1.0, clamp=True), Uniform(), Continuous(gamma=0.0), Pyramid(1.0)):
        plan = allocate(cos_sum, lens, allocator, b_init=b_init, capacity=lens + 32)
        assert torch.equal(plan.budgets, expected), allocator


def test_pyramid_monotone():
    lens = torch.tensor([512, 333])
    for ratio in (1.5, 3.0, 10.0):
        plan = allocate(sums(spiky_similarity(2), lens), lens, Pyramid(ratio), b_init=0.15)
        steps = plan.budgets[:, 1:] - plan.budgets[:, :-1]
        assert (steps <= 0).all()
        first, last = plan.budgets[:, 0].double(), plan.budgets[:, -1].double()
        assert ((first / last - ratio).abs() < 0.1 * ratio).all()


def test_water_fill_matches_bisection():
    g = torch.Generator().manual_seed(3)
    w = torch.rand(5, 9, generator=g, dtype=torch.float64) ** 2
    w[0, 3] = 0.0
    lo = torch.randint(0, 5, (5, 9), generator=g).double()
    hi = lo + torch.randint(0, 40, (5, 9), generator=g).double()
    total = (lo.sum(1) + torch.rand(5, generator=g, dtype=torch.float64) * (hi - lo).sum(1))[:, None]
    x = water_fill(w, total, lo, hi)
    torch.testing.assert_close(x.sum(1, keepdim=True), total)
    a, b = torch.zeros_like(total), torch.full_like(total, 1e9)
    for _ in range(100):
        mid = (a + b) / 2
        low = (mid * w).clamp(lo, hi).sum(1, keepdim=True) < total
        a, b = torch.where(low, mid, a), torch.where(low, b, mid)
    torch.testing.assert_close(x, (b * w).clamp(lo, hi))
    assert torch.equal(water_fill(w, lo.sum(1, keepdim=True) - 1, lo, hi), lo)
    assert torch.equal(water_fill(w, hi.sum(1, keepdim=True) + 1, lo, hi), torch.where(w > 0, hi, lo))


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


@pytest.mark.parametrize("allocator", REDISTRIBUTING[::2] + [Pyramid(3.0), Squeeze(0.4)], ids=lambda a: a.describe())
def test_allocation_traces_without_host_sync(allocator):
    """fullgraph=True fails on any graph break, e.g. a .item() or .tolist() of a tensor."""
    lens = torch.tensor([100, 37, 250], dtype=torch.int32)
    cos_sum = sums(spiky_similarity(3), lens)

    def plan(c, n):
        return allocate(c, n, allocator, b_init=0.25, capacity=n + 16, min_budget=2).budgets

    compiled = torch.compile(plan, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(cos_sum, lens), plan(cos_sum, lens))


def test_diagnostics_warn_on_a_degenerate_profile():
    """SmolLM2's profile: 27 of 30 layers in the squeezed group, the 3 others given more than
    they can hold."""
    lens = torch.tensor([64])
    cap = lens + 8
    cos_sum = sums(spiky_similarity(1, L=30, low=(0, 1, 24)), lens)
    plan = allocate(cos_sum, lens, Squeeze(0.3), b_init=0.5, capacity=cap)
    with pytest.warns(UserWarning) as record:
        diag = diagnose(plan, cap, Squeeze(0.3))
    assert sorted(str(w.message).split(": ")[1].split(" ")[0] for w in record) == ["51.3%", "degenerate"]
    assert diag.group_sizes[0][2] == 27 and diag.largest_group[0] == 0.9
    assert diag.effective[0] == [min(b, 72) for b in diag.nominal[0]] and diag.waste[0] > 0.03
    assert "| 0 |" in diag.table()
    fixed = allocate(cos_sum, lens, Continuous(), b_init=0.5, capacity=cap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert diagnose(fixed, cap, Continuous()).messages == []


@pytest.mark.parametrize("make", [
    lambda: Squeeze(0.0), lambda: Continuous(gamma=-1), lambda: Continuous(floor=1.5), lambda: Continuous(cap=0.5),
    lambda: Pyramid(0.5), lambda: Calibrated(profile(), floor=2),
    lambda: SensitivityProfile("m", 2, "h2o", (0.2, 0.1), ((0, 0), (0, 0))),
    lambda: SensitivityProfile("m", 2, "h2o", (0.1,), ((0, 0, 0),)),
])
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError):
        make()


def test_bad_requests_raise():
    lens = torch.tensor([50])
    cos_sum = sums(spiky_similarity(1), lens)
    with pytest.raises(ValueError, match="profile"):
        allocate(cos_sum, lens, Calibrated(profile(L=L + 1)), b_init=0.2)
    with pytest.raises(ValueError, match="budgets"):
        allocate(cos_sum, lens, Fixed((3, 4)), b_init=0.2)
    with pytest.raises(ValueError, match="allocator"):
        allocate(cos_sum, lens, "squeeze", b_init=0.2)
    with pytest.raises(ValueError, match="capacity"):
        allocate(cos_sum, lens, Uniform(), b_init=0.2, capacity=torch.tensor([5.0]))


def test_engine_runs_any_allocator_per_sequence():
    lens, HKV, D = [30, 18], 2, 8
    record = PrefillRecord.start(lens, L, "cpu")
    for _ in range(L):
        n = sum(lens)
        record.add_layer(torch.randn(n, HKV, D), torch.randn(n, HKV, D), torch.rand(n, HKV))
    record.cos_sum.copy_(sums(spiky_similarity(2), torch.tensor(lens)))
    settings = [SqueezeSettings(b_init=0.3, allocator=Continuous()), SqueezeSettings(b_init=0.3, allocator=Pyramid(2)),
                SqueezeSettings(b_init=0.3, p=0.5), None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the faithful plan of row 2 is degenerate here
        cache = SqueezeKVCache.build(record, SequencePolicy.h2o(), settings, 4, source=[0, 0, 1, 1])
    src = torch.tensor([0, 0])
    for row, setting in enumerate(settings[:2]):
        plan = allocate(record.cos_sum[:, src], torch.tensor(lens)[src], setting.allocator, b_init=0.3,
                        capacity=torch.tensor(lens)[src] + 4, min_budget=2)
        assert torch.equal(cache.budgets[row], plan.budgets[0])
    assert cache.budgets[0].sum() == cache.budgets[1].sum() == L * 9
    for layer in range(L):
        assert torch.equal(cache.lens[layer][:3], torch.minimum(cache.budgets[:3, layer], torch.tensor(lens)[[0, 0, 1]]))
    assert SqueezeSettings(b_init=0.3, allocator=Uniform()).is_uniform
    assert "continuous" in settings[0].describe()
    with pytest.raises(ValueError, match="allocator"):
        SqueezeSettings(b_init=0.3, p=0.5, allocator=Continuous())
