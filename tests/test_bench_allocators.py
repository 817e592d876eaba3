"""The allocator evaluation's pure parts (bench/allocators.py): held-out window placement, the
overlap with earlier runs' windows, paired differences and the scored-length section."""
import pytest
import torch

from bench import allocators as ba
from squeeze_ops import evaluation as ev
from squeeze_ops.allocators import Continuous, Uniform


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


def brute_overlap(total, prompt_len, runs, earlier):
    """Token sets, for the check."""
    def windows(specs):
        return [(set(range(a, a + prompt_len + g)), set(range(a + prompt_len, a + prompt_len + g)))
                for count, g, shifts in specs for s in shifts for a in ba.window_starts(total, prompt_len, g, count, s)]
    theirs = windows(earlier)
    return (max(len(w & w2) for w, _ in windows(runs) for w2, _ in theirs),
            max(len(c & c2) for _, c in windows(runs) for _, c2 in theirs))


@pytest.mark.parametrize("runs, earlier", [
    ([(4, 50, (0.0,))], [(4, 50, (0.0,))]),                       # the same windows
    ([(4, 50, (0.25,))], [(4, 50, (-0.25,))]),                    # disjoint
    ([(4, 200, (0.05, -0.05))], [(4, 40, (0.0, 0.5)), (3, 60, (0.1,))]),  # partial, other lengths
    ([(5, 30, (0.2,))], [(4, 80, (0.0,))]),
])
def test_overlap_counts_shared_tokens(runs, earlier):
    total, prompt_len = 3000, 120
    got = ba.overlap(total, prompt_len, runs, earlier)
    assert got == brute_overlap(total, prompt_len, runs, earlier)
    if runs == earlier:
        assert got == (prompt_len + 50, 50)


def fake_results(diffs_all, diffs_head):
    """Per-window cached results where a continuous allocator differs from uniform by the given amounts."""
    cont = Continuous(0.5, 0.75, 1.5)
    out = []
    for d, h in zip(diffs_all, diffs_head):
        cells = {f"streaming|0.2|{ba.key(Uniform())}": {"nll": 3.0, "nll_head": 2.5},
                 f"streaming|0.2|{ba.key(cont)}": {"nll": 3.0 + d, "nll_head": 2.5 + h}}
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
