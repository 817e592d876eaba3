"""Layer allocators behind planner.allocate: totals, bounds, exact baselines, the protocol,
tracing without host synchronisation, diagnostics, engine wiring."""
import warnings

import pytest
import torch

from squeeze_ops.engine.allocators import Allocator, Fixed, SimilarityWeighted, Squeeze, Uniform, water_fill
from squeeze_ops.engine.cache import PrefillRecord, SqueezeKVCache
from squeeze_ops.engine.planner import allocate, diagnose
from squeeze_ops.engine.policies import PrefillNeeds, SequencePolicy, SqueezeSettings
from tests.allocator_cases import assert_plans_without_host_sync, assert_totals_conserved, spiky_similarity, sums

L = 12


REDISTRIBUTING = [SimilarityWeighted(1.0, 0.25, 4.0), SimilarityWeighted(2.0, 0.0, 8.0)]


@pytest.mark.parametrize("allocator", REDISTRIBUTING + [Uniform()], ids=lambda a: a.describe())
@pytest.mark.parametrize("b_init", [0.1, 0.23, 0.5])
def test_totals_conserved(allocator, b_init):
    assert_totals_conserved(allocator, b_init, L)


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
    plan = allocate(sums(spiky_similarity(2), lens), lens, SimilarityWeighted(gamma=1.0, floor=0.5, cap=2.5), b_init=0.2,
                    horizon=lens + 8)
    base = lens.double() * 0.2
    assert (plan.budgets >= (0.5 * base).floor()[:, None]).all()
    assert (plan.budgets <= (2.5 * base).floor()[:, None]).all()
    assert (plan.budgets == (2.5 * base).floor()[:, None]).any(1).all()  # the spikes reach the cap
    assert (plan.budgets == (0.5 * base).floor()[:, None]).any(1).all()  # the flat layers sit at the floor


@pytest.mark.parametrize("b_init", [0.07, 0.31, 1.0])
def test_uniform_is_exact(b_init):
    lens = torch.tensor([123, 1000, 9])
    cos_sum = sums(spiky_similarity(3), lens)
    expected = (lens.double() * b_init).float().floor().clamp_min(1).int()[:, None].expand(3, L)
    for allocator in (Squeeze(1.0), Uniform(), SimilarityWeighted(gamma=0.0)):
        plan = allocate(cos_sum, lens, allocator, b_init=b_init, horizon=lens + 32)
        assert torch.equal(plan.budgets, expected), allocator


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


@pytest.mark.parametrize("allocator", REDISTRIBUTING[:1] + [Uniform(), Squeeze(0.4)], ids=lambda a: a.describe())
def test_allocation_traces_without_host_sync(allocator):
    assert_plans_without_host_sync(allocator)


def test_diagnostics_warn_on_a_degenerate_profile():
    """SmolLM2's profile: 27 of 30 layers in the squeezed group, the 3 others given more than
    they can hold."""
    lens = torch.tensor([64])
    cap = lens + 8
    cos_sum = sums(spiky_similarity(1, L=30, low=(0, 1, 24)), lens)
    plan = allocate(cos_sum, lens, Squeeze(0.3), b_init=0.5, horizon=cap)
    with pytest.warns(UserWarning) as record:
        diag = diagnose(plan, cap, Squeeze(0.3), warn=True)
    assert sorted(str(w.message).split(" ")[0] for w in record) == ["degenerate", "wasted"]
    assert "up to 51.3%" in diag.messages[0] and "G3 holds 27 of 30" in diag.messages[1]
    assert diag.group_sizes[0][2] == 27 and diag.largest_group[0] == 0.9
    assert diag.effective[0] == [min(b, 72) for b in diag.nominal[0]] and diag.waste[0] > 0.03
    assert "| 0 |" in diag.table()
    pair = allocate(cos_sum.expand(30, 2).contiguous(), lens.expand(2), Squeeze(0.3), b_init=0.5,
                    horizon=cap.expand(2))
    messages = diagnose(pair, cap, Squeeze(0.3), sequences=[3, 7]).messages
    assert len(messages) == 2 and all("sequences [3, 7]" in m for m in messages)
    fixed = allocate(cos_sum, lens, SimilarityWeighted(), b_init=0.5, horizon=cap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert diagnose(fixed, cap, SimilarityWeighted(), warn=True).messages == []


@pytest.mark.parametrize("make", [
    lambda: Squeeze(0.0), lambda: Squeeze(k=0), lambda: SimilarityWeighted(gamma=-1),
    lambda: SimilarityWeighted(floor=1.5), lambda: SimilarityWeighted(cap=0.5),
])
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError):
        make()


def test_bad_requests_raise():
    lens = torch.tensor([50])
    cos_sum = sums(spiky_similarity(1), lens)
    with pytest.raises(ValueError, match="budgets"):
        allocate(cos_sum, lens, Fixed((3, 4)), b_init=0.2)
    with pytest.raises(TypeError, match="allocator"):
        allocate(cos_sum, lens, "squeeze", b_init=0.2)
    with pytest.raises(ValueError, match="horizon"):
        allocate(cos_sum, lens, Uniform(), b_init=0.2, horizon=torch.tensor([5.0]))
    with pytest.raises(ValueError, match="^k:"):
        allocate(cos_sum[:2].contiguous(), lens, Squeeze(0.5), b_init=0.2)  # 2 layers, 3 groups
    for bad in (-1, torch.tensor([-2], dtype=torch.int32), torch.tensor([3, 4], dtype=torch.int32), 2.5, 2**31, True):
        with pytest.raises(ValueError, match="^max_budget:"):
            allocate(cos_sum, lens, Uniform(), b_init=0.2, max_budget=bad)


def test_uniform_needs_no_grouping_on_tiny_models():
    """p = 1 (and Uniform) clusters nothing: a model with fewer layers than k is fine."""
    lens = torch.tensor([40])
    for layers in (1, 2):
        cos_sum = sums(spiky_similarity(1, L=layers, low=()), lens)
        for allocator in (Uniform(), Squeeze(1.0)):
            assert allocate(cos_sum, lens, allocator, b_init=0.25).budgets.tolist() == [[10] * layers]


class OnlyAllocate:
    """A user allocator with nothing but the required method."""

    def allocate(self, request):
        B, L = request.similarity.shape
        budgets = torch.arange(1, L + 1, dtype=torch.int32).expand(B, L).contiguous()
        return budgets, torch.zeros(B, L, dtype=torch.int32), torch.zeros(B, 1)


def test_protocol_a_user_allocator_with_only_allocate_works():
    settings = SqueezeSettings(b_init=0.3, allocator=OnlyAllocate())
    assert settings.needs == (0, False, False, False, None) and "OnlyAllocate" in settings.describe()
    lens = torch.tensor([30])
    plan = allocate(sums(spiky_similarity(1), lens), lens, OnlyAllocate(), b_init=0.3)
    assert plan.budgets.tolist() == [list(range(1, L + 1))]
    assert diagnose(plan, lens, OnlyAllocate()).messages == []  # one group, but groups are not its claim


@pytest.mark.parametrize("bad,match", [
    (object(), "allocate"), (type("Broken", (Allocator,), {"observe": -1})(), "observe"),
    (type("Broken", (Allocator,), {"cap": 0.5})(), "cap"), (type("Broken", (Allocator,), {"per_head": 1})(), "per_head"),
])
def test_protocol_a_broken_allocator_fails_at_construction(bad, match):
    with pytest.raises((TypeError, ValueError), match=f"^allocator: .*{match}"):
        SqueezeSettings(b_init=0.3, allocator=bad)


def test_engine_runs_any_allocator_per_sequence():
    lens, HKV, D = [30, 18], 2, 8
    record = PrefillRecord.start(lens, L, "cpu")
    record.needs = PrefillNeeds(score_queries=0)
    for _ in range(L):
        n = sum(lens)
        record.add_layer(torch.randn(n, HKV, D), torch.randn(n, HKV, D), torch.rand(n, HKV))
    record.cos_sum.copy_(sums(spiky_similarity(2), torch.tensor(lens)))
    settings = [SqueezeSettings(b_init=0.3, allocator=SimilarityWeighted()),
                SqueezeSettings(b_init=0.3, allocator=SimilarityWeighted(gamma=2.0)),
                SqueezeSettings.squeeze(b_init=0.3, p=0.5), None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the faithful plan of row 2 is degenerate here: said, not warned
        cache = SqueezeKVCache.build(record, SequencePolicy.h2o(), settings, 4, source=[0, 0, 1, 1])
    src = torch.tensor([0, 0])
    for row, setting in enumerate(settings[:2]):
        plan = allocate(record.cos_sum[:, src], torch.tensor(lens)[src], setting.allocator, b_init=0.3,
                        horizon=torch.tensor(lens)[src] + 4, min_budget=2)
        assert torch.equal(cache.budgets[row], plan.budgets[0])
    assert cache.budgets[0].sum() == cache.budgets[1].sum() == L * 9
    prompts = torch.tensor(lens)[[0, 0, 1]]
    for layer in range(L):
        assert torch.equal(cache.lens[layer, :3], torch.minimum(cache.budgets[:3, layer], prompts)[:, None].expand(3, HKV))
    assert SqueezeSettings(b_init=0.3, allocator=Uniform()).is_uniform
    assert "similarity-weighted" in settings[0].describe()
