"""The Perturbation allocator and its signal, planner.attention_perturbation: against a direct
reference (reference.kept_positions, explicit restricted softmax), totals, bounds, optimality
against brute force, no host sync, bad input, engine wiring."""
import itertools

import numpy as np
import pytest
import torch

import squeeze_ops  # noqa: F401  (registers torch.ops.squeeze.*)
from squeeze_ops import reference
from squeeze_ops.engine.signals import KNOTS, perturbation_knots
from squeeze_ops.engine.allocators import LayerGains, Perturbation, SensitivityProfile, Uniform
from squeeze_ops.engine.calibration import fit_gains
from squeeze_ops.engine.cache import PrefillRecord, SqueezeKVCache
from squeeze_ops.engine.planner import allocate
from squeeze_ops.engine.signals import attention_perturbation, kept_order
from squeeze_ops.engine.policies import PrefillNeeds, SequencePolicy, SqueezeSettings, prefill_needs

L, H, HKV, D, HIDDEN = 5, 4, 2, 8, 12
POLICIES = [SequencePolicy.window(), SequencePolicy.streaming(sinks=3), SequencePolicy.h2o(),
            SequencePolicy.h2o(sinks=2, recent_ratio=0.3)]


def describe(policy):
    return f"{policy.kind}-s{policy.sinks}-r{policy.recent_ratio:g}"


def gains_of(values, model="test"):
    return LayerGains(model, len(values), "streaming(3 sinks)", tuple(values))


@pytest.mark.parametrize(
    "policy", POLICIES + [SequencePolicy.h2o(recent_ratio=0.0), SequencePolicy.h2o(recent_ratio=1.0)], ids=describe)
@pytest.mark.parametrize("n", [1, 2, 5, 17, 64])
def test_kept_order_prefixes_are_the_kept_positions(policy, n):
    scores = torch.randint(0, 4, (n, HKV), generator=torch.Generator().manual_seed(n)).float()  # ties on purpose
    order = kept_order(n, policy, scores)
    assert order.shape == (HKV if policy.kind == "h2o" else 1, n)
    for g in range(order.shape[0]):
        for b in range(n + 2):
            want = reference.kept_positions(n, b, policy.kind, policy.sinks, policy.recent_ratio, scores[:, g])
            assert sorted(order[g, : min(b, n)].tolist()) == want.tolist(), (g, b)


@pytest.mark.parametrize("policy", [SequencePolicy.h2o(sinks=3, recent_ratio=0.3), SequencePolicy.h2o()],
                         ids=describe)
@pytest.mark.parametrize("n", [257, 1000])
def test_h2o_kept_order_of_long_prompts(policy, n):
    # Blocks of the ahead counter end mid-prompt; few distinct scores give long runs of ties.
    gen = torch.Generator().manual_seed(n)
    scores = torch.cat([torch.randint(0, 6, (n, 1), generator=gen).float(), torch.rand(n, 1, generator=gen)], 1)
    order = kept_order(n, policy, scores)
    budgets = sorted({0, 1, 2, 3, 4, n - 1, n, *torch.randint(5, n, (24,), generator=gen).tolist()})
    for g in range(2):
        for b in budgets:
            want = reference.kept_positions(n, b, policy.kind, policy.sinks, policy.recent_ratio, scores[:, g])
            assert sorted(order[g, : min(b, n)].tolist()) == want.tolist(), (g, b)


def perturbation_by_definition(q, k, v, out_proj, residual, lens, policy, window, scale, scores):
    """E[b, j] straight from the docstring: per knot the kept positions, the softmax over them."""
    out = torch.zeros(len(lens), KNOTS + 1, dtype=torch.float64)
    start = 0
    for row, n in enumerate(lens):
        knots = perturbation_knots(torch.tensor([n]))[0].long().tolist()
        queries = range(max(n - window, 0), n)
        for j, b in enumerate(knots):
            kept = [reference.kept_positions(n, b, policy.kind, policy.sinks, policy.recent_ratio,
                                             scores[start:start + n, g]).tolist() for g in range(HKV)]
            total = 0.0
            for i in queries:
                visible = [t for t in range(i + 1)]
                heads = []
                for h in range(H):
                    g = h // (H // HKV)
                    kept_i = [t for t in kept[g] if t <= i]
                    logits = scale * (k[start:start + n, g].double() @ q[start + i, h].double())

                    def attend(slots):
                        if not slots:
                            return torch.zeros(D, dtype=torch.float64)
                        p = torch.softmax(logits[slots], 0)
                        return p @ v[start:start + n, g].double()[slots]

                    heads.append(attend(visible) - attend(kept_i))
                moved = out_proj.double() @ torch.cat(heads)
                total += float(moved.pow(2).sum() / residual[start + i].double().pow(2).sum())
            out[row, j] = total / len(queries)
        start += n
    return out


def layer_inputs(lens, seed):
    """Random q/k/v of packed prompts, the op's lse and scores, an output projection and the
    residual after the attention: attention_perturbation's inputs but the policy and window."""
    torch.manual_seed(seed)
    T = sum(lens)
    q, k, v = torch.randn(T, H, D), torch.randn(T, HKV, D), torch.randn(T, HKV, D)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    out, lse, scores = torch.ops.squeeze.prefill_attention(q, k, v, cu, max(lens), 0.4, 0)
    out_proj = torch.randn(HIDDEN, H * D) / 4
    residual = torch.randn(T, HIDDEN) + out.reshape(T, -1) @ out_proj.t()
    return q, k, v, lse, out_proj, residual, scores


@pytest.mark.parametrize("policy", POLICIES, ids=describe)
@pytest.mark.parametrize("lens,window", [([37, 5, 70], 8), ([1, 3], 1), ([20], 50)])
def test_attention_perturbation_matches_its_definition(policy, lens, window):
    q, k, v, lse, out_proj, residual, scores = layer_inputs(lens, len(lens) + window)
    got = attention_perturbation(q, k, v, lse, out_proj, residual, lens, policy, window, 0.4, scores)
    want = perturbation_by_definition(q, k, v, out_proj, residual, lens, policy, window, 0.4, scores)
    assert got.dtype == torch.float32 and got.shape == (len(lens), KNOTS + 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert (got[:, -1] < 1e-12).all() and (got[:, 0] > 1e-3).all()  # everything kept; nothing kept


@pytest.mark.parametrize("policy", POLICIES, ids=describe)
def test_attention_perturbation_of_empty_prompts_is_zero(policy):
    lens = [0, 37, 0, 130]
    q, k, v, lse, out_proj, residual, scores = layer_inputs(lens, 3)
    got = attention_perturbation(q, k, v, lse, out_proj, residual, lens, policy, 8, 0.4, scores)
    want = perturbation_by_definition(q, k, v, out_proj, residual, [37, 130], policy, 8, 0.4, scores)
    assert (got[[0, 2]] == 0).all()
    torch.testing.assert_close(got[[1, 3]].double(), want, rtol=1e-4, atol=1e-6)


def test_attention_perturbation_of_h2o_needs_the_scores():
    q, k = torch.randn(4, H, D), torch.randn(4, HKV, D)
    with pytest.raises(ValueError, match="scores"):
        attention_perturbation(q, k, k, torch.zeros(4, H), torch.zeros(HIDDEN, H * D), torch.ones(4, HIDDEN), [4],
                               SequencePolicy.h2o(), 2, 1.0)


def curves(lens, seed=0, decay=None):
    """Non-increasing perturbation curves fp32 [B, L, KNOTS + 1], 0 at the last knot: random
    decays, or the given ones [B, layers, 1] with scale 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 1, KNOTS + 1)
    if decay is None:
        decay = torch.rand(len(lens), L, 1, generator=g) * 20 + 1
        scale = torch.rand(len(lens), L, 1, generator=g) + 0.1
    else:
        scale = torch.ones_like(decay)
    return (scale * (torch.exp(-decay * x) - torch.exp(-decay))).float()


def read(E, knots, budgets):
    """E_l(b_l) for the budgets of one sequence, E [L, n] linear between the knots [n]."""
    return [float(np.interp(b, knots.numpy(), E[layer].double().numpy())) for layer, b in enumerate(budgets)]


def cos_sum(lens):
    return (0.95 * torch.tensor(lens, dtype=torch.float32))[None].expand(L, -1).contiguous()


@pytest.mark.parametrize("policy", POLICIES[:3], ids=describe)
@pytest.mark.parametrize("b_init", [0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("allocator", [Perturbation(), Perturbation(1.0, 0.5, 2.0), Perturbation(4.0, 0.75, 1.5),
                                       Perturbation(1.0, 0.5, 2.0, gains=gains_of((3, 0.1, 1, 1, 0.9)))],
                         ids=lambda a: a.describe())
def test_perturbation_conserves_the_total_within_floor_and_cap(policy, b_init, allocator):
    lens = [200, 77, 513, 31, 1]
    n = torch.tensor(lens)
    plan = allocate(cos_sum(lens), n, allocator, b_init=b_init, horizon=n + 16, min_budget=policy.min_budget,
                    perturbation=curves(lens), policy=policy)
    base = (n.double() * b_init).float().double()
    low = torch.maximum((allocator.floor * base).floor(), torch.tensor(float(policy.min_budget)))
    high = torch.maximum(torch.minimum((allocator.cap * base).floor(), (n + 16).double()), low)
    assert plan.budgets.dtype == torch.int32 and plan.budgets.shape == (len(lens), L)
    # The uniform total, unless the policy's minimum budget needs more (short prompts) or the
    # layers cannot hold it.
    want = torch.minimum(L * torch.maximum(base.floor(), low), L * high).long()
    assert torch.equal(plan.budgets.sum(1).long(), want)
    assert (plan.budgets >= low[:, None]).all() and (plan.budgets <= high[:, None]).all()


def test_perturbation_is_optimal_for_convex_curves():
    """Against brute force over every integer split: the chosen budgets' summed cost (curves
    read between knots linearly) is within one token's worth of the optimum."""
    lens, budget = [64], 0.25
    L3 = 3
    decay = torch.tensor([[[2.0], [8.0], [30.0]]])
    E = curves(lens, decay=decay)
    n = torch.tensor(lens)
    sums = (0.95 * n.float())[None].expand(L3, 1).contiguous()
    knots = perturbation_knots(n)[0]
    for power in (1.0, 2.0):
        plan = allocate(sums, n, Perturbation(power, 0.0, 4.0), b_init=budget, perturbation=E)

        def cost(b):
            return sum(e ** power for e in read(E[0], knots, b))

        total = L3 * 16
        best = min(cost((a, c, total - a - c)) for a, c in itertools.product(range(65), repeat=2)
                   if 0 <= total - a - c <= 64)
        got = plan.budgets[0].tolist()
        assert sum(got) == total
        slack = max(abs(cost([g + (i == j) for i, g in enumerate(got)]) - cost(got)) for j in range(L3))
        assert cost(got) <= best + slack
        assert got[0] > got[1] > got[2]  # a slower decay keeps the curve high longer


def test_perturbation_power_equalises_the_worst_layers():
    lens = [300]
    n = torch.tensor(lens)
    E = curves(lens, seed=3)
    knots = perturbation_knots(n)
    worst = []
    for power in (1.0, 2.0, 8.0):
        plan = allocate(cos_sum(lens), n, Perturbation(power, 0.0, 10.0), b_init=0.2, perturbation=E)
        worst.append(max(read(E[0], knots[0], plan.budgets[0].tolist())))
    assert worst[0] >= worst[1] >= worst[2]


@pytest.mark.parametrize("allocator", [Perturbation(), Perturbation(1.0, gains=gains_of((0.5, 2, 1, 1, 0.5)))],
                         ids=lambda a: a.describe())
def test_perturbation_traces_without_host_sync(allocator):
    lens = [100, 37, 250]
    n = torch.tensor(lens, dtype=torch.int32)
    E, sums = curves(lens), cos_sum(lens)

    def plan(c, m, e):
        return allocate(c, m, allocator, b_init=0.25, horizon=m + 16, min_budget=4, perturbation=e).budgets

    compiled = torch.compile(plan, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(sums, n, E), plan(sums, n, E))


def test_perturbation_bad_input_raises():
    lens = [40]
    n = torch.tensor(lens)
    with pytest.raises(ValueError, match="perturbation"):
        allocate(cos_sum(lens), n, Perturbation(), b_init=0.2)
    with pytest.raises(ValueError, match="perturbation"):
        allocate(cos_sum(lens), n, Perturbation(), b_init=0.2, perturbation=torch.zeros(1, L + 1, KNOTS + 1))
    with pytest.raises(ValueError, match="perturbation"):
        allocate(cos_sum(lens), n, Perturbation(), b_init=0.2,
                 perturbation=torch.zeros(1, L, KNOTS + 1, dtype=torch.float64))
    for make, name in ((lambda: Perturbation(power=0), "power"), (lambda: Perturbation(floor=1.5), "floor"),
                       (lambda: Perturbation(cap=0.5), "cap"), (lambda: Perturbation(observe=0), "observe")):
        with pytest.raises(ValueError, match=name):
            make()


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_gains_weigh_each_layers_curve(power):
    """Perturbation with gains g allocates exactly as without them on the curves g_l * E_l."""
    lens = [300, 57, 1000]
    n = torch.tensor(lens)
    values = (0.2, 3.0, 1.0, 0.05, 0.75)
    E = curves(lens, seed=3)
    weighted = (E.double() * torch.tensor(values, dtype=torch.float64)[None, :, None]).float()
    gained = allocate(cos_sum(lens), n, Perturbation(power, 0.5, 2.0, gains=gains_of(values)), b_init=0.2,
                      perturbation=E)
    plain = allocate(cos_sum(lens), n, Perturbation(power, 0.5, 2.0), b_init=0.2, perturbation=weighted)
    assert torch.equal(gained.budgets, plain.budgets)
    # A layer whose loss per unit of perturbation is larger gets more of the budget than without gains.
    ungained = allocate(cos_sum(lens), n, Perturbation(power, 0.5, 2.0), b_init=0.2, perturbation=E)
    assert (gained.budgets[:, 1] >= ungained.budgets[:, 1]).all()
    assert (gained.budgets[:, 3] <= ungained.budgets[:, 3]).all()


def test_gains_round_trip_through_their_file(tmp_path):
    gains = gains_of((0.5, 1.5, 1.0, 0.25, 1.75))
    path = tmp_path / "m.streaming.gains.json"
    gains.save(path)
    assert LayerGains.load(path) == gains
    assert Perturbation(gains=LayerGains.load(path)) == Perturbation(gains=gains)
    with pytest.raises(ValueError, match="format"):
        LayerGains.from_json(dict(gains.to_json(), format="squeeze-ops/sensitivity-profile"))


def test_gains_bad_input_raises():
    lens = [40]
    with pytest.raises(ValueError, match="values"):
        gains_of((1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="values"):
        LayerGains("m", 3, "window", (1.0, 1.0))
    with pytest.raises(ValueError, match="gains"):
        Perturbation(gains=(1.0,) * L)
    with pytest.raises(ValueError, match="gains"):
        allocate(cos_sum(lens), torch.tensor(lens), Perturbation(gains=gains_of((1.0,) * (L + 1))), b_init=0.2,
                 perturbation=curves(lens))


class CurveRunner:
    """A stand-in for LlamaRunner in fit_gains: its prefill records fixed perturbation curves."""

    def __init__(self, curves):
        self.curves, self.num_layers, self.calls = curves, curves.shape[0], []

    def prefill(self, prompts, needs):
        self.calls.append((len(prompts[0]), needs))
        record = PrefillRecord.start([len(prompts[0])], self.num_layers, "cpu")
        record.perturbation[needs.perturb[0]] = [c[None] for c in self.curves]
        return record, None


def test_fit_gains_recovers_the_loss_per_unit_of_perturbation():
    """Profiles made as g_l * (E_l(f T) - E_l(c T)) give back g (normalised to mean 1); a layer
    whose fit is negative gets the floor."""
    T, policy = 640, SequencePolicy.streaming(sinks=3)
    E = curves([T], seed=5)[0]  # [L, KNOTS + 1]
    true = torch.tensor([0.5, 2.0, 1.0, 3.0, -1.0], dtype=torch.float64)
    knots = perturbation_knots(torch.tensor([T]))[0].numpy()

    def at(tokens):
        return torch.tensor([np.interp(tokens, knots, E[layer].double().numpy()) for layer in range(L)])

    profiles = []
    for c in (0.1, 0.3):
        fractions = (0.25 * c, 0.5 * c, c, 1.75 * c)
        rows = tuple(tuple((true * (at(max(1, round(f * T))) - at(int(c * T)))).tolist()) for f in fractions)
        profiles.append(SensitivityProfile("test", L, policy.describe(), fractions, rows, context=c))
    runner = CurveRunner(E)
    windows = [(torch.zeros(T, dtype=torch.long), None)] * 2
    gains = fit_gains(runner, windows, policy, tuple(profiles), "test", observe=16, min_share=0.01)
    assert runner.calls == [(T, PrefillNeeds(-1, 16, (policy,)))] * 2
    floor = 0.01 * true[:4].mean()
    want = torch.cat([true[:4], floor[None]])
    torch.testing.assert_close(torch.tensor(gains.values, dtype=torch.float64), want / want.mean())
    assert gains.model == "test" and gains.policy == policy.describe()
    with pytest.raises(ValueError, match="profiles"):
        fit_gains(runner, windows, policy, (SensitivityProfile("test", L, "x", (0.5,), ((0.0,) * L,)),), "test")


def record_with_perturbation(lens, policy, window=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    record = PrefillRecord.start(lens, L, "cpu")
    total = sum(lens)
    for _ in range(L):
        record.add_layer(torch.randn(total, HKV, 8, generator=g), torch.randn(total, HKV, 8, generator=g),
                         torch.zeros(0, HKV))
        record.observed.append(torch.rand(total, HKV, generator=g))
    record.needs = PrefillNeeds(score_queries=0, observe=window, perturb=() if policy is None else (policy,))
    record.cos_sum.copy_(cos_sum(lens))
    if policy is not None:
        record.perturbation[policy] = list(curves(lens, seed).transpose(0, 1))
    return record


def test_engine_plans_perturbation_per_sequence_from_the_record():
    lens = [30, 18]
    policy = SequencePolicy.streaming(sinks=3)
    record = record_with_perturbation(lens, policy)
    settings = [SqueezeSettings(b_init=0.3, allocator=Perturbation()), SqueezeSettings(b_init=0.3, allocator=Uniform()),
                SqueezeSettings(b_init=0.3, allocator=Perturbation())]
    needs = prefill_needs(policy, settings)
    assert needs.perturb == (policy,) and not prefill_needs(policy, settings[1]).perturb and needs.observe == 32
    cache = SqueezeKVCache.build(record, policy, settings, 4, source=[1, 0, 0])
    n = torch.tensor(lens)
    E = torch.stack(record.perturbation[policy]).transpose(0, 1)
    for row, src in ((0, [1]), (2, [0])):
        plan = allocate(record.cos_sum[:, src], n[src], Perturbation(), b_init=0.3, horizon=n[src] + 4,
                        min_budget=policy.min_budget, perturbation=E[src].contiguous())
        assert torch.equal(cache.budgets[row], plan.budgets[0])
    # Curves of another policy (or none) are an error naming the record, before anything is built.
    with pytest.raises(ValueError, match="record"):
        SqueezeKVCache.build(record, SequencePolicy.window(), settings, 4, source=[1, 0, 0])
    with pytest.raises(ValueError, match="record"):
        SqueezeKVCache.build(record_with_perturbation(lens, None), policy, settings, 4, source=[1, 0, 0])
