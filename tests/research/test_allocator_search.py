"""The allocator evaluation's pure parts (bench/allocators.py): held-out window placement (evenly
spread and one by one), the overlap with earlier runs' windows, the tuning's criteria, paired
differences, the scored-length section and the per-head family."""
import math

import pytest
import torch

from research import allocator_search as ba
from research import evaluation as ev
from squeeze_ops.engine.allocators import CalibratedHeads, HeadGains, SensitivityProfile, SimilarityWeighted, Uniform


def test_shift_zero_gives_the_evaluation_windows():
    ids = torch.arange(5000)
    got = ba.shifted_windows(ids, 300, 40, 7, 0.0)
    want = ev.windows(ids, 300, 40, 7)
    assert len(got) == 7
    for (p, c), (p2, c2) in zip(got, want):
        assert torch.equal(p, p2) and torch.equal(c, c2)
        assert int(c[0]) == int(p[-1]) + 1 and len(p) == 300 and len(c) == 40


@pytest.mark.parametrize("shift", [0.6, -0.51])
def test_shift_outside_half_a_spacing_is_refused(shift):
    with pytest.raises(ValueError, match="shift"):
        ba.window_starts(5000, 300, 40, 7, shift)


def token_sets(total, prompt_len, specs):
    """(whole window, continuation) token sets of every window of specs, for the checks."""
    starts = [(a, g) for count, g, where in specs
              for a in (where if count is None else
                        [a for s in where for a in ba.window_starts(total, prompt_len, g, count, s)])]
    return [(set(range(a, a + prompt_len + g)), set(range(a + prompt_len, a + prompt_len + g))) for a, g in starts]


def brute_overlap(total, prompt_len, runs, earlier):
    theirs = token_sets(total, prompt_len, earlier)
    return (max(len(w & w2) for w, _ in token_sets(total, prompt_len, runs) for w2, _ in theirs),
            max(len(c & c2) for _, c in token_sets(total, prompt_len, runs) for _, c2 in theirs))


@pytest.mark.parametrize("runs, earlier", [
    ([(4, 50, (0.0,))], [(4, 50, (0.0,))]),                       # the same windows
    ([(4, 50, (0.25,))], [(4, 50, (-0.25,))]),                    # disjoint
    ([(4, 200, (0.05, -0.05))], [(4, 40, (0.0, 0.5)), (3, 60, (0.1,))]),  # partial, other lengths
    ([(5, 30, (0.2,))], [(4, 80, (0.0,))]),
    ([(None, 70, (0, 1500, 2700))], [(4, 80, (0.0,)), (None, 40, (1600, 2500))]),  # placed one by one
])
def test_overlap_counts_shared_tokens(runs, earlier):
    total, prompt_len = 3000, 120
    got = ba.overlap(ba.spans(total, prompt_len, runs), ba.spans(total, prompt_len, earlier))
    assert got == brute_overlap(total, prompt_len, runs, earlier)
    if runs == earlier:
        assert got == (prompt_len + 50, 50)


@pytest.mark.parametrize("count", [1, 3, 6])
def test_fresh_windows_score_only_unscored_tokens_and_share_none(count):
    total, prompt_len, gen = 20000, 300, 200
    earlier = [(4, 150, (0.0, 0.5)), (7, 60, (0.1, -0.3)), (None, 500, (9000, 15000))]
    starts, stretches = ba.fresh_starts(total, prompt_len, gen, count, ba.spans(total, prompt_len, earlier))
    assert len(starts) == count == len(set(starts)) and stretches >= count
    theirs = set().union(*(c for _, c in token_sets(total, prompt_len, earlier)))
    mine = token_sets(total, prompt_len, [(None, gen, starts)])
    for i, (window, scored) in enumerate(mine):
        assert not scored & theirs and min(window) >= 0 and max(window) < total
        assert all(not window & other for other, _ in mine[i + 1:])
    assert starts == sorted(starts)


def test_fresh_windows_refuse_what_does_not_fit():
    total, prompt_len, gen = 3000, 120, 200
    earlier = ba.spans(total, prompt_len, [(6, 200, (0.0,))])
    with pytest.raises(ValueError, match="--fresh-windows: only"):
        ba.fresh_starts(total, prompt_len, gen, 50, earlier)
    # One scored token every 150: 19 free stretches of 149 tokens, closer than a window is long.
    dense = ba.spans(total, prompt_len, [(None, 1, tuple(range(0, total - prompt_len - 1, 150)))])
    starts, stretches = ba.fresh_starts(total, prompt_len, 100, 9, dense)
    assert stretches == 19 and len(starts) == 9
    with pytest.raises(ValueError, match="share tokens"):
        ba.fresh_starts(total, prompt_len, 100, 19, dense)


def test_tuning_score_mean_and_t():
    results, cont = fake_results([-0.1, 0.2, -0.3], [0.0, 0.0, 0.0])
    for r in results:
        r["full"] = 2.9
    assert ba.tuning_score(results, "streaming", (0.2,), cont, "mean") == pytest.approx(0.1 + (-0.1 + 0.2 - 0.3) / 3)
    m, se = ba.mean_se([-0.1, 0.2, -0.3])
    assert ba.tuning_score(results, "streaming", (0.2,), cont, "t") == pytest.approx(m / se)
    same, _ = fake_results([0.0, 0.0], [0.0, 0.0])
    assert ba.tuning_score(same, "streaming", (0.2,), cont, "t") == 0.0
    worse, _ = fake_results([0.1, 0.1], [0.0, 0.0])
    assert ba.tuning_score(worse, "streaming", (0.2,), cont, "t") == math.inf


def fake_results(diffs_all, diffs_head):
    """Per-window cached results where a continuous allocator differs from uniform by the given amounts."""
    cont = SimilarityWeighted(0.5, 0.75, 1.5)
    out = []
    for d, h in zip(diffs_all, diffs_head):
        cells = {f"streaming|0.2|{ba.key(Uniform())}": {"nll": 3.0, "nll_head": 2.5, "agree": 1.0, "kept": 0.2},
                 f"streaming|0.2|{ba.key(cont)}": {"nll": 3.0 + d, "nll_head": 2.5 + h, "agree": 1.0, "kept": 0.2}}
        out.append({"cells": cells})
    return out, cont


def test_paired_reads_the_asked_field():
    results, cont = fake_results([-0.1, 0.2, -0.3], [0.05, -0.02, 0.01])
    assert ba.paired(results, "streaming", 0.2, cont) == pytest.approx([-0.1, 0.2, -0.3])
    assert ba.paired(results, "streaming", 0.2, cont, field="nll_head") == pytest.approx([0.05, -0.02, 0.01])


def test_scored_length_section_reports_both_lengths():
    results, cont = fake_results([-0.1, -0.2, 0.3, -0.4], [0.1, -0.2, 0.3, 0.4])
    best_by_cell = {("streaming", 0.2): [("continuous", cont, -0.1, 3, 4)]}
    lines = ba.scored_length_section(results, best_by_cell, 512)
    row = [line for line in lines if line.startswith("| streaming")]
    assert len(row) == 1
    cols = [c.strip() for c in row[0].strip("|").split("|")]
    head_mean, head_se = ba.mean_se([0.1, -0.2, 0.3, 0.4])
    all_mean, all_se = ba.mean_se([-0.1, -0.2, 0.3, -0.4])
    assert cols == ["streaming", "20%", cont.describe(), f"{head_mean:+.4f} ± {head_se:.4f}", "1/4",
                    f"{all_mean:+.4f} ± {all_se:.4f}", "3/4"]


def test_head_family_and_its_key():
    """The per-head family is offered only with head gains, and its cache key follows the gains' content."""
    def gains(scale):
        return HeadGains("m", 2, 2, "streaming(4 sinks)", 0.3, ((0.01 * scale, 0.0), (0.0, 0.02)))

    profile = SensitivityProfile("m", 2, "streaming(4 sinks)", (0.1,), ((0.0, 0.0),))
    assert ba.HEADS not in ba.candidates(profile)
    family = ba.candidates(profile, head_gains=(gains(1),))[ba.HEADS]
    assert len(family) == 6 and all(isinstance(a, CalibratedHeads) and a.per_head for a in family)
    a, b = CalibratedHeads((gains(1),)), CalibratedHeads((gains(2),))
    assert a.describe() == b.describe() and ba.key(a) != ba.key(b) and ba.key(a) == ba.key(CalibratedHeads(gains(1)))


def test_paired_against_another_budget():
    """The moonshot's comparison: a cell at 20% against uniform at 30%, window by window."""
    cont = SimilarityWeighted(0.5, 0.75, 1.5)
    results = [{"cells": {f"streaming|0.3|{ba.key(Uniform())}": {"nll": 3.0},
                          f"streaming|0.2|{ba.key(Uniform())}": {"nll": 9.0},
                          f"streaming|0.2|{ba.key(cont)}": {"nll": 3.0 + d}}} for d in (-0.1, 0.05)]
    assert ba.paired(results, "streaming", 0.2, cont, baseline_frac=0.3) == pytest.approx([-0.1, 0.05])
    assert ba.paired(results, "streaming", 0.2, cont) == pytest.approx([-6.1, -5.95])
