"""The allocator headroom measurement's pure parts (bench/allocator_headroom.py): budget rows,
effects, swap oracle, the signals' predictions and correlations."""
import numpy as np
import pytest

from research import headroom as hr
from squeeze_ops.engine.signals import KNOTS
from squeeze_ops.engine.allocators import LayerGains


def test_marginal_rows_move_one_layer_each():
    rows = hr.marginal_budgets(5, 40, 20)
    assert len(rows) == 11 and rows[0] == [40] * 5
    for i, row in enumerate(rows[1:]):
        layer, sign = i % 5, 1 if i < 5 else -1
        diff = np.array(row) - 40
        assert diff[layer] == 20 * sign and np.count_nonzero(diff) == 1


def test_effects_read_gain_and_cost():
    rng = np.random.default_rng(0)
    gain, cost = rng.normal(size=7), rng.normal(size=7)
    nll = np.concatenate([[3.0], 3.0 - gain, 3.0 + cost])
    got_gain, got_cost = hr.effects(nll)
    np.testing.assert_allclose(got_gain, gain, atol=1e-12)
    np.testing.assert_allclose(got_cost, cost, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_swap_keeps_the_total_and_picks_the_extremes(k):
    rng = np.random.default_rng(k)
    gain, cost = rng.normal(size=9), rng.normal(size=9)
    row = hr.swap(gain, cost, k, 50, 25)
    assert sum(row) == 9 * 50
    up = {i for i, b in enumerate(row) if b == 75}
    down = {i for i, b in enumerate(row) if b == 25}
    assert up == set(np.argsort(-gain)[:k].tolist())
    assert len(down) == k and not up & down
    rest = [i for i in range(9) if i not in up]
    assert max(cost[i] for i in down) <= min(cost[i] for i in rest if i not in down)


def test_swap_never_lowers_a_raised_layer():
    # The layer of largest gain also has the smallest cost: it goes up, the next cheapest goes down.
    gain = np.array([5.0, 0.0, 0.0, 0.0])
    cost = np.array([-1.0, 3.0, 1.0, 2.0])
    assert hr.swap(gain, cost, 1, 10, 4) == [14, 10, 6, 10]


def test_pearson_matches_numpy_and_is_zero_for_constants():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert hr.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert hr.pearson(np.ones(5), b[:5]) == 0.0


def test_prediction_of_a_linear_curve():
    prompt_len = 256
    knots = np.floor(prompt_len * np.arange(KNOTS + 1) / KNOTS)
    curve = 1.0 - knots / prompt_len  # E falls by 1/P per kept token
    gain, cost = hr.predicted(curve.tolist(), prompt_len, 100, 30)
    assert gain == pytest.approx(30 / prompt_len) and cost == pytest.approx(30 / prompt_len)


def test_signal_correlations_see_a_planted_signal():
    prompt_len, layers = 256, 6
    knots = np.floor(prompt_len * np.arange(KNOTS + 1) / KNOTS)
    slopes = np.arange(1, layers + 1, dtype=np.float64)
    curves = [(s * (1.0 - knots / prompt_len)).tolist() for s in slopes]  # layer l: slope l + 1
    result = {"base": 100, "delta": 30, "perturbation": curves, "gain": (2 * slopes).tolist(),
              "cost": (-slopes).tolist(), "similarity": np.linspace(0.9, 0.99, layers).tolist()}
    gains = LayerGains("m", layers, "streaming", tuple(float(x) for x in slopes[::-1]))
    corr = hr.signal_correlations(result, prompt_len, gains)
    assert corr["perturbation"] == pytest.approx((1.0, -1.0))
    assert corr["perturbation x gains"][0] < 1.0  # the gains reshape the prediction
    assert corr["1 - similarity"][0] == pytest.approx(-1.0)
