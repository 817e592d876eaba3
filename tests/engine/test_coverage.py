"""The Coverage allocator and its signal: observed attention (vs prefill_attention's own
observation-window scores), retained mass per policy (vs the kept positions of the
reference), totals and bounds, the minimax share, tracing without host sync, engine wiring;
and in-context sensitivity profiles for Calibrated."""
import json

import pytest
import torch

import squeeze_ops  # noqa: F401  (registers torch.ops.squeeze.*)
from squeeze_ops import reference
from squeeze_ops.engine.allocators import Coverage, SensitivityProfile, Uniform, retained_mass
from squeeze_ops.engine.cache import PrefillRecord, SqueezeKVCache
from squeeze_ops.engine.planner import allocate
from squeeze_ops.engine.signals import observed_attention, pad_observed
from tests.allocator_cases import in_context
from squeeze_ops.engine.policies import PrefillNeeds, SequencePolicy, SqueezeSettings, prefill_needs

L, HKV = 6, 2
POLICIES = [SequencePolicy.window(), SequencePolicy.streaming(sinks=3), SequencePolicy.h2o()]


def observed(lens, seed=0, L=L):
    """Random observed mass [B, L, HKV, T_max], zero past each prompt, some layers peaked."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lens), L, HKV, max(lens))
    for b, n in enumerate(lens):
        x = torch.rand(L, HKV, n, generator=g) ** torch.linspace(1, 12, L)[:, None, None]
        out[b, :, :, :n] = x
    return out


def cos_sum(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    sim = 0.9 + 0.09 * torch.rand(len(lens), L, generator=g)
    return (sim * torch.tensor(lens)[:, None].float()).t().contiguous()


@pytest.mark.parametrize("lens,window", [([37, 5, 64], 8), ([1, 20], 1), ([50], 200)])
def test_observed_attention_matches_the_ops_observation_window(lens, window):
    torch.manual_seed(len(lens) + window)
    T, H, D = sum(lens), 6, 16
    q, k, v = torch.randn(T, H, D), torch.randn(T, HKV, D), torch.randn(T, HKV, D)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    _, lse, scores = torch.ops.squeeze.prefill_attention(q, k, v, cu, max(lens), 0.3, window)
    torch.testing.assert_close(observed_attention(q, k, lse, lens, window, 0.3), scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.kind)
def test_retained_mass_is_the_mass_of_the_kept_positions(policy):
    lens = [23, 9, 4]
    obs = observed(lens)
    curves = retained_mass(obs, torch.tensor(lens), policy)
    assert curves.shape == (3, L, max(lens) + 1)
    for b, n in enumerate(lens):
        for layer in range(L):
            total = obs[b, layer].double().sum()
            for budget in range(max(lens) + 1):
                if policy.kind == "h2o":  # per head, its `budget` positions of highest observed mass
                    kept = obs[b, layer, :, :n].double().sort(-1, descending=True).values[:, :budget].sum()
                else:
                    pos = reference.kept_positions(n, budget, policy.kind, policy.sinks, 0.0)
                    kept = obs[b, layer, :, pos].double().sum() if len(pos) else torch.tensor(0.0)
                assert curves[b, layer, budget].item() == pytest.approx((kept / total).item(), abs=1e-9)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.kind)
@pytest.mark.parametrize("b_init", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("allocator", [Coverage(), Coverage(0.0, 0.25, 4.0), Coverage(1.0, 0.5, 2.0)],
                         ids=lambda a: a.describe())
def test_coverage_conserves_the_total_within_floor_and_cap(policy, b_init, allocator):
    lens = [200, 77, 513, 31]
    n = torch.tensor(lens)
    plan = allocate(cos_sum(lens), n, allocator, b_init=b_init, horizon=n + 16, min_budget=policy.min_budget,
                    observed=observed(lens), policy=policy)
    base = (n.double() * b_init).float().double()  # floor and cap are fractions of the real base
    low = torch.maximum((allocator.floor * base).floor(), torch.tensor(float(policy.min_budget)))
    high = torch.minimum((allocator.cap * base).floor(), (n + 16).double())
    assert plan.budgets.dtype == torch.int32 and plan.budgets.shape == (4, L)
    # The uniform total, unless the policy's minimum budget needs more (the 31-token prompt).
    assert torch.equal(plan.budgets.sum(1).long(), L * torch.maximum(base.floor(), low).long())
    assert (plan.budgets >= low[:, None]).all() and (plan.budgets <= high[:, None]).all()


def test_coverage_equalises_the_weighted_share():
    """gamma = 0 and loose bounds: every layer keeps the same share of its mass up to one slot
    of rounding (no layer's share one slot lower exceeds another's one slot higher), and a
    peaked layer needs fewer slots than a flat one."""
    lens = [400]
    obs = observed(lens)
    policy = SequencePolicy.h2o()
    n = torch.tensor(lens)
    plan = allocate(cos_sum(lens), n, Coverage(0.0, 0.0, 10.0), b_init=0.1, observed=obs, policy=policy)
    curves = retained_mass(obs, n, policy)[0]
    budgets = plan.budgets[0].long()
    shares = curves[torch.arange(L), budgets]
    below = curves[torch.arange(L), (budgets - 1).clamp(min=0)]
    above = curves[torch.arange(L), budgets + 1]
    assert below.max() <= above.min() and shares.max() - shares.min() < 0.01
    assert budgets[0] > budgets[-1]  # layer 0 is the flattest, the last the most peaked


def test_coverage_weights_follow_the_similarity():
    lens = [300]
    n = torch.tensor(lens)
    flat = torch.ones(1, L, HKV, 300)
    sums = torch.full((L, 1), 0.98 * 300)
    sums[2] = 0.5 * 300  # attention changes layer 2's residual stream the most
    plan = allocate(sums, n, Coverage(1.0, 0.0, 10.0), b_init=0.2, observed=flat, policy=SequencePolicy.window())
    budgets = plan.budgets[0]
    assert budgets[2] == budgets.max() and budgets.sum() == L * 60


def test_coverage_traces_without_host_sync():
    lens = [100, 37, 250]
    n = torch.tensor(lens, dtype=torch.int32)
    obs = observed(lens)
    sums = cos_sum(lens)

    def plan(c, m, o):
        return allocate(c, m, Coverage(), b_init=0.25, horizon=m + 16, min_budget=2, observed=o,
                        policy=SequencePolicy.h2o()).budgets

    compiled = torch.compile(plan, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(sums, n, obs), plan(sums, n, obs))


def test_coverage_bad_input_raises():
    lens = [40]
    n = torch.tensor(lens)
    with pytest.raises(ValueError, match="observed"):
        allocate(cos_sum(lens), n, Coverage(), b_init=0.2)
    with pytest.raises(ValueError, match="observed"):
        allocate(cos_sum(lens), n, Coverage(), b_init=0.2, observed=torch.zeros(1, L + 1, HKV, 40),
                 policy=SequencePolicy.window())
    with pytest.raises(ValueError, match="observed"):
        allocate(cos_sum(lens), n, Coverage(), b_init=0.2, observed=torch.zeros(1, L, HKV, 40, dtype=torch.float64),
                 policy=SequencePolicy.window())
    for make in (lambda: Coverage(gamma=-1), lambda: Coverage(floor=1.5), lambda: Coverage(cap=0.5),
                 lambda: Coverage(observe=0)):
        with pytest.raises(ValueError):
            make()


def record_with_observed(lens, window, seed=0):
    g = torch.Generator().manual_seed(seed)
    record = PrefillRecord.start(lens, L, "cpu")
    n = sum(lens)
    for _ in range(L):
        record.add_layer(torch.randn(n, HKV, 8, generator=g), torch.randn(n, HKV, 8, generator=g),
                         torch.rand(n, HKV, generator=g))
        record.observed.append(torch.rand(n, HKV, generator=g))
    record.needs = PrefillNeeds(score_queries=0, observe=window)
    record.cos_sum.copy_(cos_sum(lens))
    return record


def test_engine_plans_coverage_per_sequence_from_the_record():
    lens = [30, 18]
    record = record_with_observed(lens, 32)
    settings = [SqueezeSettings(b_init=0.3, allocator=Coverage()), SqueezeSettings(b_init=0.3, allocator=Uniform()),
                SqueezeSettings(b_init=0.3, allocator=Coverage())]
    policy = SequencePolicy.h2o()
    assert prefill_needs(policy, settings).observe == 32 and prefill_needs(policy, settings[1]).observe == 0
    cache = SqueezeKVCache.build(record, policy, settings, 4, source=[1, 0, 0])
    n = torch.tensor(lens)
    for row, src in ((0, [1]), (2, [0])):
        plan = allocate(record.cos_sum[:, src], n[src], Coverage(), b_init=0.3, horizon=n[src] + 4,
                        min_budget=2, observed=pad_observed(record.observed, lens, src), policy=policy)
        assert torch.equal(cache.budgets[row], plan.budgets[0])
    with pytest.raises(ValueError, match="record: the prefill recorded"):
        SqueezeKVCache.build(record_with_observed(lens, 0), policy, settings, 4, source=[1, 0, 0])
    with pytest.raises(ValueError, match="^observe: one prefill cannot observe both 32 and 8"):
        prefill_needs(policy, [settings[0], SqueezeSettings(b_init=0.3, allocator=Coverage(observe=8))])


def test_pad_observed_lays_out_each_prompt_and_zeros_the_rest():
    lens = [3, 5]
    per_layer = [torch.arange(8 * HKV, dtype=torch.float32).view(8, HKV) + 100 * layer for layer in range(2)]
    out = pad_observed(per_layer, lens, [1, 0])
    assert out.shape == (2, 2, HKV, 5)
    assert torch.equal(out[0, 1], per_layer[1][3:8].t())
    assert torch.equal(out[1, 0, :, :3], per_layer[0][:3].t()) and (out[1, :, :, 3:] == 0).all()


# ---- in-context sensitivity profiles (the calibration file format) ----

def test_in_context_profile_round_trips_and_old_files_read_as_isolated(tmp_path):
    prof = in_context(0.2, 3)
    path = tmp_path / "p.json"
    prof.save(path)
    assert json.loads(path.read_text())["context"] == 0.2 and SensitivityProfile.load(path) == prof
    data = prof.to_json()
    del data["context"]
    assert SensitivityProfile.from_json(data).context == 1.0
    with pytest.raises(ValueError, match="context"):
        SensitivityProfile("m", L, "h2o", (0.1,), ((0.0,) * L,), context=0.0)


def test_in_context_curve_is_flat_past_the_largest_measured_budget():
    curves = in_context(0.2, 3).loss_curves()
    assert curves[3] == pytest.approx([0.15 + 0.0375, 0.1 + 0.0375, 0.0375, 0.0, 0.0])
    assert all(c[-2] == c[-1] == 0.0 for c in curves)
    assert all(a >= b for c in curves for a, b in zip(c, c[1:]))
