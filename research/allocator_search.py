"""Which layer allocator to use, chosen on evidence: SmolLM2-135M, teacher-forced through the
library's ops, parameters tuned on Botchan, reported on held-out Python documentation text.

    python -m research.allocator_search [--prompt-len 512] [--gen-len 32] [--calib-windows 3]
                               [--context-windows 8] [--tune-windows 10] [--tune-fractions ...]
                               [--select-by mean|t] [--test-windows 10] [--test-shift 0.25 -0.25]
                               [--fresh-windows N] [--test-gen-len G] [--test-policies ...]
                               [--test-fractions ...] [--test-families ...] [--name allocators]
                               [--recalibrate]

1. Calibration (Botchan, first third of the book): the sensitivity profiles of every policy
   (squeeze_ops.engine.calibration.measure_profile; alone, and in context at CONTEXTS for
   CONTEXT_POLICIES), saved to research/profiles/ and reused by later runs unless
   --recalibrate.
2. Tuning (Botchan, the other two thirds): every candidate parameter of the tested policies'
   allocator families (--test-families: only those) at the --tune-fractions budgets (default
   10/20/30/50%); per policy and family the candidate with the lowest NLL increase over the
   full cache, averaged over windows and budgets, is kept (--select-by t: the most negative
   t-statistic, mean / s.e., of its paired difference vs uniform, averaged over the budgets:
   the criterion of a win-rate target). The candidate grids were widened wherever an earlier
   Botchan tuning had its optimum on the edge of the grid.
3. Held-out test (pydoc_data.topics, never looked at before): the kept allocators against
   uniform at the same total budget; paired differences per window. Each --test-shift moves
   the evenly spread windows by a fraction of their spacing, giving fresh windows disjoint
   from those of other shifts; --fresh-windows N instead places N windows one by one where no
   earlier committed run scored a token; --test-gen-len scores longer continuations than the
   tuning (less noise per window) with the parameters the tuning kept.
Writes research/results/NAME.md (and $OUT/NAME.md when OUT is set). Per-window results are cached
under .data/allocators/ so an interrupted run resumes.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch

from bench.common import environment, save_markdown
from squeeze_ops.engine.allocators import (CalibratedHeads, Coverage, HeadGains, LayerGains, Perturbation,
                                           SensitivityProfile, SimilarityWeighted, Squeeze, Uniform)
from squeeze_ops.engine.calibration import (IN_CONTEXT_MULTIPLES, fit_gains, in_context_fractions, measure_head_gains,
                                            measure_profile, score_batch)
from squeeze_ops.engine.planner import allocate, budget_text, diagnose
from squeeze_ops.engine.policies import PrefillNeeds, SqueezeSettings
from squeeze_ops.engine.presets import PROFILE_DIR as PRESET_DIR
from squeeze_ops.engine.signals import KNOTS, pad_observed

from . import evaluation as ev
from .allocators import Calibrated, ClampedSqueeze, Pyramid

MODEL_NAME, PROFILE_DIR = ev.MODEL_NAME, ev.PROFILE_DIR
TARGET_FRACTIONS = (0.1, 0.2, 0.3)
TARGET_POLICIES = ("h2o", "streaming")
TARGET_WIN_RATE = 0.7
CONTEXTS = (0.1, 0.2, 0.3, 0.5)
CONTEXT_POLICIES = ("streaming",)
OBSERVE = 32  # prompt queries whose attention the Coverage and Perturbation allocators read
HEADS = "calibrated heads"  # the per-KV-head family (its head gains are measured only when it is tested)
HEAD_TOKENS = 128  # longer continuations are also reported on their first HEAD_TOKENS scored tokens
# The held-out windows of the earlier committed runs, all with 512-token prompts: (windows per shift, scored
# tokens, shifts) for evenly spread windows, (None, scored tokens, first tokens) for windows placed one by one.
# Every report states how far its own windows overlap them; --fresh-windows avoids their scored tokens.
EARLIER_TEST_WINDOWS = ((10, 32, (0.0, 0.5, 0.25, -0.25)),
                        (10, 128, (0.125, -0.125, 0.375, -0.375, 0.4375, -0.4375, 0.3125, -0.3125)),
                        (10, 512, (0.0625, -0.0625, 0.1875, -0.1875)),
                        (None, 512, (830, 2236, 5660, 8474, 10671, 12077, 14102, 16916, 21215, 22544, 24730, 28173,
                                     32462, 33801, 35977, 42243, 44412, 45818, 53499, 54956, 57064, 58470, 66202,
                                     67570, 69717, 76012, 78152, 79558, 83874, 87269, 89399, 90805, 95082, 97884,
                                     99943, 101339, 103457, 106291, 109781, 111190)),
                        (None, 512, (1533, 4345, 9266, 11288, 13483, 19730, 21918, 24027, 30987, 33165, 35274, 43006,
                                     45057, 47223, 55659, 57767, 65500, 68311, 75468, 77449, 80261, 86676, 88696,
                                     91508, 96483, 99240, 102052, 104890, 109093, 111893)),
                        (None, 512, (2846, 9968, 20512, 25358, 36615, 46521, 64756, 69014, 80964, 90083, 100646,
                                     107692)))


def candidates(profile, in_context=None, gains=None, head_gains=None):
    """Allocator families and their candidate parameters (tuned on Botchan only)."""
    families = {
        "squeeze": [Squeeze(p) for p in (0.3, 0.5, 0.7, 0.9)],
        "squeeze clamped": [ClampedSqueeze(p) for p in (0.3, 0.5, 0.7, 0.9)],
        "similarity-weighted": [SimilarityWeighted(g, floor, cap) for g in (0.25, 0.5, 1.0, 2.0)
                       for floor, cap in ((0.25, 4.0), (0.5, 2.0), (0.75, 1.5))],
        "pyramid": [Pyramid(r) for r in (1.25, 1.5, 2.0, 3.0, 5.0)],
        "calibrated": [Calibrated(profile, floor) for floor in (0.0, 0.25, 0.5, 0.75)],
        "coverage": [Coverage(g, floor, cap, OBSERVE) for g in (0.0, 0.5, 1.0)
                     for floor, cap in ((0.5, 2.0), (0.75, 1.5))],
        "perturbation": [Perturbation(power, floor, cap, OBSERVE) for power in (1.0, 2.0, 4.0)
                         for floor, cap in ((0.25, 4.0), (0.5, 2.0), (0.75, 1.5))],
    }
    if in_context:
        families["calibrated in context"] = [Calibrated(in_context, floor) for floor in (0.0, 0.5, 0.75)]
    if gains:
        families["perturbation gained"] = [Perturbation(power, floor, cap, OBSERVE, gains) for power in (1.0, 2.0)
                                           for floor, cap in ((0.5, 2.0), (0.75, 1.5))]
    if head_gains:
        families[HEADS] = [CalibratedHeads(head_gains, gamma, floor, cap) for gamma in (0.5, 1.0)
                           for floor, cap in ((0.25, 4.0), (0.5, 3.0), (0.75, 2.0))]
    return families


def load_or_measure(path, measure, progress, recalibrate, kind=SensitivityProfile):
    """The calibration file at path (a `kind`), measured (and saved there) when missing or when
    recalibrating."""
    if os.path.exists(path) and not recalibrate:
        return kind.load(path)
    t0 = time.perf_counter()
    profile = measure()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    profile.save(path)
    progress(f"profile {os.path.basename(path)}: {time.perf_counter() - t0:.0f} s")
    return profile


def calibrate(runner, calib_windows, context_windows, head_windows, args, progress):
    """Per policy: the isolated profile (other layers full) and, for CONTEXT_POLICIES, the
    in-context profiles at CONTEXTS (tuple), the layer gains fitted to them on the same
    windows and, when head_windows are given, the head gains at args.head_fractions (tuple,
    measured on head_windows); loaded when present: the profiles from args.profile_dir, the
    layer and head gains from the library's presets folder (the files the recommended
    allocators read)."""
    P, G = args.prompt_len, args.gen_len
    isolated, in_context, gains, head_gains = {}, {}, {}, {}
    for pol in ev.POLICIES:
        isolated[pol] = load_or_measure(
            os.path.join(args.profile_dir, f"{MODEL_NAME}.{pol}.json"),
            lambda: measure_profile(
                runner, calib_windows, ev.POLICIES[pol], MODEL_NAME, progress=progress,
                source=f"Botchan first third, {len(calib_windows)} windows of {P} prompt + {G} teacher-forced tokens"),
            progress, args.recalibrate)
        if pol not in CONTEXT_POLICIES:
            continue
        in_context[pol] = tuple(load_or_measure(
            os.path.join(args.profile_dir, f"{MODEL_NAME}.{pol}.context{c:g}.json"),
            lambda: measure_profile(
                runner, context_windows, ev.POLICIES[pol], MODEL_NAME, in_context_fractions(c), context=c,
                progress=progress, source=f"Botchan first third, {len(context_windows)} windows of {P} prompt + "
                f"{G} teacher-forced tokens, every other layer at {c:g}"),
            progress, args.recalibrate) for c in CONTEXTS)
        gains[pol] = load_or_measure(
            os.path.join(PRESET_DIR, f"{MODEL_NAME}.{pol}.gains.json"),
            lambda: fit_gains(runner, context_windows, ev.POLICIES[pol], in_context[pol], MODEL_NAME, OBSERVE,
                              source=f"Botchan first third, {len(context_windows)} windows of {P} prompt tokens, "
                              f"fitted to the in-context profiles at {', '.join(f'{c:g}' for c in CONTEXTS)}"),
            progress, args.recalibrate, LayerGains)
        if head_windows:
            head_gains[pol] = tuple(load_or_measure(
                os.path.join(PRESET_DIR, f"{MODEL_NAME}.{pol}.heads{f:g}.json"),
                lambda: measure_head_gains(
                    runner, head_windows, ev.POLICIES[pol], MODEL_NAME, f, progress=progress,
                    source=f"Botchan first third, {len(head_windows)} windows of {P} prompt + "
                    f"{len(head_windows[0][1])} teacher-forced tokens, every other head at {f:g}"),
                progress, args.recalibrate, HeadGains) for f in args.head_fractions)
    return isolated, in_context, gains, head_gains


def key(allocator):
    """Cache key of an allocator: its description, plus the digest of the calibration files it
    reads (Calibrated's profiles, Perturbation's gains, CalibratedHeads' head gains)."""
    if isinstance(allocator, (Calibrated, CalibratedHeads)):
        data = [p.to_json() for p in allocator.profiles]
        data = data if len(data) > 1 else data[0]
    elif isinstance(allocator, Perturbation) and allocator.gains is not None:
        data = allocator.gains.to_json()
    else:
        return allocator.describe()
    return f"{allocator.describe()} @{hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]}"


def evaluate_window(runner, prompt, continuation, cells, cache_file, progress):
    """Teacher-forced results of one window: {"full": mean NLL, "cells": {"policy|fraction|key":
    {nll, nll_head (over the first HEAD_TOKENS scored tokens), agree, kept}}} for the full cache and
    every (policy, fraction, allocator) cell; the cells of one policy decode as one batch. Cells
    already in cache_file are not recomputed."""
    done = {"cells": {}}
    if os.path.exists(cache_file):
        with open(cache_file) as f:
            done = json.load(f)
    name = lambda pol, frac, alloc: f"{pol}|{frac:g}|{key(alloc)}"  # noqa: E731
    todo = [c for c in cells if name(*c) not in done["cells"]]
    if not todo and "full" in done:
        return done
    record, first = runner.prefill([prompt], PrefillNeeds(0, OBSERVE, tuple(ev.POLICIES.values())))
    targets = continuation[None].to(runner.device)

    def score(policy, settings, label):
        cache, nll, top1 = score_batch(runner, (record, first), targets, policy, settings,
                                       on_step=lambda i: progress(label, i + 1, targets.shape[1]))
        return cache, nll.double().mean(1).tolist(), nll[:, :HEAD_TOKENS].double().mean(1).tolist(), top1

    _, (full_nll,), _, full_top1 = score(ev.POLICIES["window"], [None], "decode full cache")
    done["full"] = full_nll
    for pol in dict.fromkeys(c[0] for c in todo):
        mine = [c for c in todo if c[0] == pol]
        settings = [SqueezeSettings(b_init=frac, allocator=alloc) for _, frac, alloc in mine]
        cache, nll, head, top1 = score(ev.POLICIES[pol], settings, f"decode {pol} x{len(mine)}")
        held = cache.budgets.double().flatten(1).mean(1) / len(prompt)
        agree = (top1 == full_top1).double().mean(1)
        for i, cell in enumerate(mine):
            done["cells"][name(*cell)] = {"nll": nll[i], "nll_head": head[i], "agree": agree[i].item(),
                                          "kept": held[i].item()}
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    with open(cache_file, "w") as f:
        json.dump(done, f)
    return done


def paired(results, pol, frac, alloc, baseline=Uniform(), field="nll", baseline_frac=None):
    """Per-window NLL differences of a cell vs the baseline at the same policy and budget (or at
    baseline_frac; field "nll_head": over the first HEAD_TOKENS scored tokens only)."""
    a = [r["cells"][f"{pol}|{frac:g}|{key(alloc)}"][field] for r in results]
    b = [r["cells"][f"{pol}|{frac if baseline_frac is None else baseline_frac:g}|{key(baseline)}"][field]
         for r in results]
    return [x - y for x, y in zip(a, b)]


def mean_se(xs):
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var / len(xs))


def cell_stats(results, pol, frac, alloc):
    cells = [r["cells"][f"{pol}|{frac:g}|{key(alloc)}"] for r in results]
    dnll = [c["nll"] - r["full"] for c, r in zip(cells, results)]
    return (mean_se(dnll), sum(c["agree"] for c in cells) / len(cells), sum(c["kept"] for c in cells) / len(cells))


def tuning_score(results, pol, fractions, alloc, select_by):
    """What the tuning minimises for a candidate, averaged over `fractions`: its mean dNLL
    ("mean"), or the t-statistic mean / s.e. of its paired difference vs uniform ("t")."""
    if select_by == "mean":
        values = [cell_stats(results, pol, f, alloc)[0][0] for f in fractions]
    else:
        values = [m / s if s > 0 else math.copysign(math.inf, m) if m else 0.0
                  for m, s in (mean_se(paired(results, pol, f, alloc)) for f in fractions)]
    return sum(values) / len(values)


def window_starts(total, prompt_len, gen_len, count, shift):
    """First tokens of the windows of evaluation.windows with the i-th window at
    (i + 1/2 + shift) / count of the usable range (shift in [-1/2, 1/2]; 0 gives evaluation.windows)."""
    if not -0.5 <= shift <= 0.5:
        raise ValueError(f"shift: expected a value in [-0.5, 0.5], got {shift}")
    usable = total - prompt_len - gen_len
    return [int((i + 0.5 + shift) * usable / count) for i in range(count)]


def windows_at(ids, prompt_len, gen_len, starts):
    """(prompt, continuation) pairs of the windows whose first tokens are `starts`."""
    return [(ids[at : at + prompt_len], ids[at + prompt_len : at + prompt_len + gen_len]) for at in starts]


def shifted_windows(ids, prompt_len, gen_len, count, shift):
    """(prompt, continuation) pairs of the windows starting at window_starts."""
    return windows_at(ids, prompt_len, gen_len, window_starts(len(ids), prompt_len, gen_len, count, shift))


def spans(total, prompt_len, specs):
    """(first token, first scored token, end) of every window of `specs`, entries of the form of
    EARLIER_TEST_WINDOWS: (windows per shift, scored tokens, shifts) or (None, scored tokens,
    first tokens)."""
    out = []
    for count, gen, where in specs:
        starts = where if count is None else [at for shift in where
                                              for at in window_starts(total, prompt_len, gen, count, shift)]
        out += [(at, at + prompt_len, at + prompt_len + gen) for at in starts]
    return out


def overlap(mine, theirs):
    """(most tokens, most scored tokens) a window of `mine` shares with a window of `theirs` (spans:
    whole windows; continuations only)."""
    tokens = scored = 0
    for a, c, e in mine:
        for a2, c2, e2 in theirs:
            tokens = max(tokens, min(e, e2) - max(a, a2))
            scored = max(scored, min(e, e2) - max(c, c2))
    return tokens, scored


def fresh_starts(total, prompt_len, gen_len, count, earlier):
    """(first tokens of `count` windows, number of candidate stretches): windows of prompt_len +
    gen_len tokens whose continuations hold no token a window of `earlier` (spans) scored. The
    candidates are the stretches of at least gen_len unscored tokens after the first prompt_len
    tokens; `count` of them evenly spread over their list each get one window whose continuation
    starts the stretch. Refused when there are too few, or when two windows would share a token."""
    stretches, pos = [], prompt_len
    for c, e in sorted((c, e) for _, c, e in earlier) + [(total, total)]:
        if c - pos >= gen_len:
            stretches.append(pos)
        pos = max(pos, e)
    if len(stretches) < count:
        raise ValueError(f"--fresh-windows: only {len(stretches)} stretches of {gen_len} tokens no earlier run "
                         f"scored, {count} wanted")
    starts = [stretches[int((i + 0.5) * len(stretches) / count)] - prompt_len for i in range(count)]
    if any(b < a + prompt_len + gen_len for a, b in zip(starts, starts[1:])):
        raise ValueError(f"--fresh-windows: {count} windows would share tokens; ask for fewer")
    return starts, len(stretches)


def run_windows(runner, windows, cells, tag, args, progress):
    results = []
    for i, (prompt, continuation) in enumerate(windows):
        progress(f"{tag} window {i + 1}/{len(windows)}")
        cache_file = os.path.join(args.data_dir, "allocators",
                                  f"{tag}-P{len(prompt)}-G{len(continuation)}-{i}of{len(windows)}.json")
        results.append(evaluate_window(runner, prompt, continuation, cells, cache_file, progress))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--calib-windows", type=int, default=3)
    parser.add_argument("--tune-windows", type=int, default=10)
    parser.add_argument("--tune-fractions", type=float, nargs="+", default=list(ev.FRACTIONS),
                        help="budgets of the tuning (default 0.1 0.2 0.3 0.5)")
    parser.add_argument("--select-by", choices=("mean", "t"), default="mean",
                        help="kept candidate per family: lowest mean dNLL (default) or most negative t-statistic "
                             "of the paired difference vs uniform, averaged over the tuning budgets")
    parser.add_argument("--test-windows", type=int, default=10)
    parser.add_argument("--test-shift", type=float, nargs="+", default=[0.25, -0.25],
                        help="one set of --test-windows held-out windows per shift, each starting this fraction "
                             "of their spacing later (default 0.25 -0.25)")
    parser.add_argument("--fresh-windows", type=int, metavar="N",
                        help="instead of --test-windows/--test-shift: N held-out windows placed one by one, whose "
                             "continuations hold no token an earlier committed run scored")
    parser.add_argument("--context-windows", type=int, default=8,
                        help="Botchan windows (first third) of the in-context profiles")
    parser.add_argument("--head-windows", type=int, default=8,
                        help="Botchan windows (first third) of the head gains")
    parser.add_argument("--head-gen-len", type=int, default=128,
                        help="continuation tokens of the head-gain windows (default 128)")
    parser.add_argument("--head-fractions", type=float, nargs="+", default=list(TARGET_FRACTIONS),
                        help="operating points of the head gains (default 0.1 0.2 0.3); measured only when the "
                             f"'{HEADS}' family is tested")
    parser.add_argument("--recalibrate", action="store_true", help="measure the profiles again")
    parser.add_argument("--calibrate-only", action="store_true", help="stop after the profiles")
    parser.add_argument("--test-gen-len", type=int, help="continuation tokens of the test windows (default: --gen-len)")
    parser.add_argument("--test-policies", nargs="+", choices=list(ev.POLICIES), default=list(ev.POLICIES))
    parser.add_argument("--test-fractions", type=float, nargs="+", default=list(ev.FRACTIONS))
    parser.add_argument("--test-families", nargs="+", metavar="FAMILY",
                        help="allocator families (the tuning's kept candidate of each) to test against uniform "
                             "(default: every family)")
    parser.add_argument("--name", default="allocators", help="results file name (default allocators)")
    parser.add_argument("--profile-dir", default=PROFILE_DIR, help="where the profiles are kept")
    # The faithful squeeze warns on every build (wasted budget, degenerate groups): the table
    # shows its diagnostics once instead.
    job = ev.start_job(parser, argv, threads=0)
    if job is None:
        return 2
    args, runner, tokenizer, progress = job
    import transformers

    botchan = ev.tokenize(tokenizer, ev.botchan_text(args.data_dir))
    pydoc = ev.tokenize(tokenizer, ev.pydoc_topics_text())
    third = len(botchan) // 3
    P, G = args.prompt_len, args.gen_len
    calib_windows = ev.windows(botchan[:third], P, G, args.calib_windows)
    context_windows = ev.windows(botchan[:third], P, G, args.context_windows)
    tune_windows = ev.windows(botchan[third:], P, G, args.tune_windows)
    measure_heads = args.test_families is None or HEADS in args.test_families
    head_windows = ev.windows(botchan[:third], P, args.head_gen_len, args.head_windows) if measure_heads else []
    G_test = args.test_gen_len or G
    earlier = spans(len(pydoc), P, EARLIER_TEST_WINDOWS)
    if args.fresh_windows:
        try:
            starts, stretches = fresh_starts(len(pydoc), P, G_test, args.fresh_windows, earlier)
        except ValueError as e:
            parser.error(str(e))
        digest = hashlib.sha1(json.dumps(starts).encode()).hexdigest()[:8]
        test_sets = [(f"fresh-{digest}", windows_at(pydoc, P, G_test, starts))]
        mine = spans(len(pydoc), P, [(None, G_test, starts)])
    else:
        test_sets = [(f"shift{shift:g}", shifted_windows(pydoc, P, G_test, args.test_windows, shift))
                     for shift in args.test_shift]
        mine = spans(len(pydoc), P, [(args.test_windows, G_test, args.test_shift)])
    test_windows = [w for _, wins in test_sets for w in wins]
    shared = overlap(mine, earlier)
    earlier_runs = "; ".join(f"{count} per shift, {gen} scored tokens, shifts {', '.join(f'{x:g}' for x in where)}"
                             if count is not None else f"{len(where)} placed one by one, {gen} scored tokens"
                             for count, gen, where in EARLIER_TEST_WINDOWS)
    policies = list(ev.POLICIES)

    # 1. Calibration profiles.
    profiles, in_context, gains, head_gains = calibrate(runner, calib_windows, context_windows, head_windows, args,
                                                         progress)
    if args.calibrate_only:
        return 0

    # 2. Tuning on Botchan: the tested policies' families (--test-families: only those).
    test_policies, test_fractions = args.test_policies, tuple(args.test_fractions)
    fractions = tuple(args.tune_fractions)
    families = {pol: candidates(profiles[pol], in_context.get(pol), gains.get(pol), head_gains.get(pol))
                for pol in test_policies}
    known = {fam for pol in test_policies for fam in families[pol]}
    if not set(args.test_families or ()) <= known:
        parser.error(f"--test-families: unknown {sorted(set(args.test_families) - known)}; the families of "
                     f"{', '.join(test_policies)} are {sorted(known)}")
    families = {pol: {fam: options for fam, options in families[pol].items()
                      if args.test_families is None or fam in args.test_families} for pol in test_policies}
    cells = [(pol, f, a) for pol in test_policies for f in fractions
             for a in [Uniform()] + [c for fam in families[pol].values() for c in fam]]
    tuned = run_windows(runner, tune_windows, cells, "tune-botchan", args, progress)
    chosen, tuning_rows = {}, []
    for pol in test_policies:
        chosen[pol] = {}
        for fam, options in families[pol].items():
            scores = {a: tuning_score(tuned, pol, fractions, a, args.select_by) for a in options}
            best = min(options, key=lambda a: scores[a])
            chosen[pol][fam] = best
            tuning_rows.append((pol, fam, [(a, scores[a], a == best) for a in options]))

    # 3. Held-out test on pydoc.
    cells = [(pol, f, a) for pol in test_policies for f in test_fractions
             for a in [Uniform()] + list(chosen[pol].values())]
    tested = [r for name, wins in test_sets
              for r in run_windows(runner, wins, cells, f"test-pydoc-{name}", args, progress)]
    seconds = progress.elapsed()

    env = environment(args.device)
    env.update(transformers=transformers.__version__, threads=torch.get_num_threads(), dtype=str(runner.dtype))
    lines = [
        f"# Layer allocators on {MODEL_NAME}: tuned on Botchan, tested on held-out text",
        "",
        ", ".join(f"{k}: {v}" for k, v in env.items()) + f", run time of this invocation: {seconds / 60:.1f} min "
        "(profiles found in the profile folder and windows found in the cache folder are not recomputed)",
        "",
        f"Command: `python -m research.allocator_search --prompt-len {P} --gen-len {G} --calib-windows {args.calib_windows} "
        f"--tune-windows {args.tune_windows} "
        + (f"--tune-fractions {' '.join(f'{f:g}' for f in fractions)} " if fractions != ev.FRACTIONS else "")
        + (f"--select-by {args.select_by} " if args.select_by != "mean" else "")
        + (f"--fresh-windows {args.fresh_windows} " if args.fresh_windows else
           f"--test-windows {args.test_windows} --test-shift {' '.join(f'{x:g}' for x in args.test_shift)} ")
        + f"--context-windows {args.context_windows}"
        + (f" --head-windows {args.head_windows}" if args.head_windows != 8 else "")
        + (f" --head-gen-len {args.head_gen_len}" if args.head_gen_len != 128 else "")
        + (f" --head-fractions {' '.join(f'{f:g}' for f in args.head_fractions)}"
           if tuple(args.head_fractions) != TARGET_FRACTIONS else "")
        + (f" --test-gen-len {G_test}" if G_test != G else "")
        + (f" --test-policies {' '.join(test_policies)}" if test_policies != list(ev.POLICIES) else "")
        + (f" --test-fractions {' '.join(f'{f:g}' for f in test_fractions)}" if test_fractions != ev.FRACTIONS else "")
        + (" --test-families " + " ".join(f'"{fam}"' if " " in fam else fam for fam in args.test_families)
           if args.test_families else "")
        + (f" --name {args.name}" if args.name != "allocators" else "") + "`",
        "",
        "## Protocol",
        "",
        f"- Every window: a prompt of {P} tokens, then {G} continuation tokens"
        + (f" ({G_test} in the held-out windows)" if G_test != G else "") + " teacher-forced one decode step at a "
        "time through the compressed caches (prefill_attention + add_rmsnorm_cossim, planner.allocate, "
        "compress_kv_, decode_step_). Metric per window: mean NLL over the continuation; dNLL = its increase over "
        "the full cache; agreement = top-1 prediction equal to the full cache's. The first continuation token is "
        "predicted by the full prefill in every cell.",
        "- Budget b: every allocator gets the uniform total L * floor(b * P) tokens per sequence (the faithful "
        "squeeze: its own floors of the same total); a layer holds at most P + G tokens, so `held` (mean layer "
        "budget actually held / P) falls below b where an allocation gives a layer more than that.",
        "- Policies: window, streaming (4 sinks), h2o (recent 0.5, scores from all prompt queries). All cells of "
        "one policy and window decode as one batch with per-sequence budgets.",
        f"- Calibration: sensitivity profiles from {len(calib_windows)} Botchan windows (first third of the book): "
        "NLL increase when only one layer keeps a fraction f of the prompt (f in "
        f"{', '.join(f'{f:g}' for f in profiles[policies[0]].budgets)}), all others full; one file per policy in "
        "research/profiles/. In context (" + ", ".join(CONTEXT_POLICIES) + f"): {len(context_windows)} Botchan "
        "windows of the first third; at each operating point c in " + ", ".join(f"{c:g}" for c in CONTEXTS)
        + ", the NLL change when only one layer keeps f = c x (" + ", ".join(f"{m:g}" for m in IN_CONTEXT_MULTIPLES)
        + ") of the prompt while every other layer keeps c; one file per policy and c.",
        f"- Coverage: reads the column scores of the last {OBSERVE} prompt queries (recomputed from the prefill's "
        "lse for h2o, whose own scores cover every query). Perturbation: the residual-stream perturbation of "
        f"the same {OBSERVE} queries at {KNOTS + 1} budgets per layer, under each policy's kept sets (h2o: by the "
        "prefill's all-query scores). Perturbation gained (" + ", ".join(CONTEXT_POLICIES) + "): the same "
        "signal times per-layer gains (loss per unit of perturbation) fitted once to the in-context profiles on "
        "their windows (engine.calibration.fit_gains; one file per policy in research/profiles/)."
        + (f" Calibrated heads ({', '.join(CONTEXT_POLICIES)}): per-KV-head budgets (the cache holds one row "
           f"per sequence and KV head) following head gains measured on {len(head_windows)} Botchan windows of "
           f"the first third ({P} prompt + {args.head_gen_len} teacher-forced tokens): at each operating point f in "
           f"{', '.join(f'{f:g}' for f in args.head_fractions)}, the NLL fall when only one KV head of one layer "
           "keeps its whole context while every other keeps f (calibration.measure_head_gains; one file per "
           "policy and f); the same total KV as uniform (Hkv x L x floor(b P) per sequence)." if head_windows
           else ""),
        f"- Tuning: {len(tune_windows)} Botchan windows (the other two thirds); per policy and allocator family the "
        + ("candidate with the lowest mean dNLL" if args.select_by == "mean" else
           "candidate with the most negative t-statistic (mean / s.e.) of its paired difference vs uniform")
        + f" over windows and the tuning budgets ({', '.join(f'{100 * f:g}%' for f in fractions)}) is kept.",
        f"- Test: {len(test_windows)} windows of pydoc_data.topics ({len(pydoc)} tokens; {P} prompt + {G_test} "
        "teacher-forced tokens): "
        + (f"placed one by one: of the {stretches} stretches of at least {G_test} tokens that no earlier committed "
           f"run scored, {args.fresh_windows} evenly spread over their list, each window's continuation starting "
           f"its stretch; no two windows share a token (first tokens: {', '.join(map(str, starts))})"
           if args.fresh_windows else
           f"{args.test_windows} evenly spread windows per shift ("
           + ", ".join(f"{x:g}" for x in args.test_shift) + " of their spacing); windows of different shifts are "
           "disjoint")
        + ". Not looked at while choosing anything. `vs uniform`: mean over windows of NLL(allocator) - "
        "NLL(uniform) at the same policy and budget, ± its standard error; `wins`: windows where that difference "
        f"is < 0. Against the held-out windows of the earlier committed runs ({earlier_runs}): {shared[0]} of a "
        f"window's {P + G_test} tokens at most are also in one of theirs, and {shared[1]} of its scored tokens at "
        "most were scored there.",
        "",
        "## Held-out results (pydoc)",
        "",
        f"Full cache: mean NLL {sum(r['full'] for r in tested) / len(tested):.4f} nats/token.",
        "",
        "| policy | budget | allocator | dNLL | agree | held | vs uniform | wins |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best_by_cell = {}
    for pol in test_policies:
        for f in test_fractions:
            for fam, alloc in [("uniform", Uniform())] + list(chosen[pol].items()):
                (d, se), agree, held = cell_stats(tested, pol, f, alloc)
                if fam == "uniform":
                    diff, wins = "", ""
                else:
                    diffs = paired(tested, pol, f, alloc)
                    m, s = mean_se(diffs)
                    n_win = sum(x < 0 for x in diffs)
                    diff, wins = f"{m:+.4f} ± {s:.4f}", f"{n_win}/{len(diffs)}"
                    best_by_cell.setdefault((pol, f), []).append((fam, alloc, m, n_win, len(diffs)))
                lines.append(f"| {pol} | {100 * f:g}% | {alloc.describe()} | {d:+.4f} ± {se:.4f} | "
                             f"{100 * agree:.1f}% | {held:.3f} | {diff} | {wins} |")
    lines += ["", "## Targets", "", "```"]
    lines += targets(best_by_cell, tested, chosen, test_policies, test_fractions)
    lines += ["```", ""]
    if G_test > HEAD_TOKENS:
        lines += scored_length_section(tested, best_by_cell, G_test)
    lines += ["## Tuning on Botchan", "",
              ("Mean dNLL" if args.select_by == "mean" else "t-statistic of the paired difference vs uniform")
              + " over the tuning windows, averaged over the tuning budgets (kept candidate in bold); uniform's dNLL: "
              + ", ".join(f"{pol} {tuning_score(tuned, pol, fractions, Uniform(), 'mean'):+.4f}"
                          for pol in test_policies) + ".", "",
              "| policy | family | candidates |", "|---|---|---|"]
    for pol, fam, rows in tuning_rows:
        shown = [f"**{a.describe()}: {s:+.4f}**" if kept else f"{a.describe()}: {s:+.4f}" for a, s, kept in rows]
        lines.append(f"| {pol} | {fam} | {'; '.join(shown)} |")
    lines += ["", "## Diagnostics on the first held-out window", ""]
    lines += diagnostics_section(runner, test_windows[0][0], G, "h2o" if "h2o" in chosen else test_policies[0], chosen)
    lines += ["", "## Calibration profiles", "",
              "NLL increase (nats/token) when only layer l keeps the given fraction of the prompt; the 8 most "
              "sensitive layers per policy at the smallest fraction:", ""]
    for pol in policies:
        prof = profiles[pol]
        row = prof.values[0]
        top = sorted(range(prof.num_layers), key=lambda layer: -row[layer])[:8]
        sums = ", ".join(f"{f:g}: {sum(r):+.3f}" for f, r in zip(prof.budgets, prof.values))
        lines.append(f"- {pol} ({prof.policy}) at f = {prof.budgets[0]:g}: "
                     + ", ".join(f"L{layer} {row[layer]:+.4f}" for layer in top) + f"; sum over layers at f = {sums}")
    for pol, per_fraction in head_gains.items():
        lines += ["", f"Head gains ({pol}): NLL fall (nats/token) when only KV head h of layer l keeps its whole "
                  "context, every other at f; the 8 largest, and how the heads' gains spread:", ""]
        for g in per_fraction:
            flat = sorted(((v, layer, h) for layer, row in enumerate(g.values) for h, v in enumerate(row)),
                          reverse=True)
            positive = [v for v, *_ in flat if v > 0]
            lines.append(f"- f = {g.fraction:g}: " + ", ".join(f"L{layer}h{h} {v:+.4f}" for v, layer, h in flat[:8])
                         + f"; {len(positive)} of {len(flat)} heads above 0, the 10 largest hold "
                         f"{100 * sum(positive[:10]) / max(sum(positive), 1e-30):.0f}% of the positive gain")
    lines.append("")
    print(save_markdown(args.name, "\n".join(lines), ev.RESULTS_DIR))
    return 0


def scored_length_section(tested, best_by_cell, gen):
    """The held-out comparison of every tested allocator on the first HEAD_TOKENS scored tokens of each
    window next to all `gen` (text lines)."""
    out = ["## Scored length", "",
           f"The same windows and caches, the NLL averaged over the first {HEAD_TOKENS} scored tokens only "
           f"(the length scored in earlier runs) and over all {gen}:", "",
           f"| policy | budget | allocator | vs uniform, first {HEAD_TOKENS} | wins | vs uniform, all {gen} | wins |",
           "|---|---|---|---|---|---|---|"]
    for (pol, f), rows in best_by_cell.items():
        for _, alloc, *_ in rows:
            cols = []
            for field in ("nll_head", "nll"):
                diffs = paired(tested, pol, f, alloc, field=field)
                m, se = mean_se(diffs)
                cols.append(f"{m:+.4f} ± {se:.4f} | {sum(x < 0 for x in diffs)}/{len(diffs)}")
            out.append(f"| {pol} | {100 * f:g}% | {alloc.describe()} | {' | '.join(cols)} |")
    return out + [""]


def targets(best_by_cell, tested, chosen, policies, fractions):
    """The issue's targets, answered from the held-out numbers (text lines); the moonshot only when
    20% and 30% were both tested."""
    out = [f"Target: some allocator beats uniform (mean paired difference < 0 and wins in >= "
           f"{100 * TARGET_WIN_RATE:.0f}% of windows) for {' and '.join(TARGET_POLICIES)} at "
           f"{', '.join(f'{100 * f:g}%' for f in TARGET_FRACTIONS)}."]
    cells = [(pol, f) for pol in TARGET_POLICIES for f in TARGET_FRACTIONS if (pol, f) in best_by_cell]
    aims = [pol for pol in TARGET_POLICIES if pol in policies]
    missing = [f"{pol} {100 * f:g}%" for pol in TARGET_POLICIES for f in TARGET_FRACTIONS
               if (pol, f) not in best_by_cell]
    if missing:
        out.append(f"  (not tested in this run: {', '.join(missing)})")
    met_cells, families = 0, {}
    for pol, f in cells:
        rows = best_by_cell[(pol, f)]
        good = [row for row in rows if row[2] < 0 and row[3] >= TARGET_WIN_RATE * row[4]]
        for fam, *_ in good:
            families.setdefault(fam, set()).add((pol, f))
        met_cells += bool(good)
        _, best, m, w, n = min(rows, key=lambda row: row[2])
        out.append(f"  {pol} {100 * f:g}%: " + (
            ", ".join(f"{a.describe()} ({m:+.4f}, {w}/{n} wins)" for _, a, m, w, n in good) if good
            else f"none (best mean: {best.describe()} {m:+.4f}, {w}/{n} wins)"))
    total = len(cells)
    single = [fam for fam, got in families.items() if len(got) == total]
    out.append(f"  -> {'MET' if met_cells == total else 'NOT MET'}: {met_cells}/{total} cells have such an allocator; "
               f"one allocator family in all {total}: {', '.join(single) if single else 'none'}.")
    out.append("Moonshot: an allocator at 20% no worse than uniform at 30% (mean dNLL).")
    if not {0.2, 0.3} <= set(fractions):
        return out + ["  (not tested in this run: it needs the 20% and 30% budgets)"]
    holds = 0
    for pol in policies:
        u30 = cell_stats(tested, pol, 0.3, Uniform())[0][0]
        at20 = [(a, cell_stats(tested, pol, 0.2, a)[0][0]) for a in chosen[pol].values()]
        best, d = min(at20, key=lambda t: t[1])
        ok = d <= u30
        holds += ok and pol in aims
        diffs = paired(tested, pol, 0.2, best, baseline_frac=0.3)
        m, se = mean_se(diffs)
        out.append(f"  {pol}: uniform @30% {u30:+.4f}; best @20% {best.describe()} {d:+.4f} -> "
                   f"{'holds' if ok else 'does not hold'} (paired {m:+.4f} ± {se:.4f}, "
                   f"{sum(x <= 0 for x in diffs)}/{len(diffs)} windows no worse)")
    out.append(f"  -> {'MET' if holds == len(aims) else 'NOT MET'} for {' and '.join(aims)} ({holds}/{len(aims)}).")
    return out


def diagnostics_section(runner, prompt, gen, pol, chosen):
    """Similarity profile, groups and budgets (nominal / effective) at 20% on one window of uniform,
    the paper's squeeze and every allocator kept for policy `pol`, with the planner's warnings."""
    policy = ev.POLICIES[pol]
    record, _ = runner.prefill([prompt], PrefillNeeds(0, OBSERVE, (policy,)))
    observed = pad_observed(record.observed, record.prompt_lens)
    perturbation = torch.stack(record.perturbation[policy], 1)  # [1, L, KNOTS + 1]
    lens = torch.tensor([len(prompt)], dtype=torch.int32)
    horizon = lens + gen
    out = [f"Budgets at 20% (uniform, the paper's squeeze p=0.3 and {pol}'s tuned allocators; per head: the "
           "heads' budgets joined by '/'; nominal (effective) where they differ):", ""]
    columns, messages = {}, []
    for fam, alloc in {"uniform": Uniform(), "paper": Squeeze(0.3), **chosen[pol]}.items():
        plan = allocate(record.cos_sum, lens, alloc, b_init=0.2, horizon=horizon, min_budget=policy.min_budget,
                        observed=observed, policy=policy, perturbation=perturbation)
        diag = diagnose(plan, horizon, alloc)
        columns[alloc.describe()] = [budget_text(n) if n == e else f"{budget_text(n)} ({budget_text(e)})"
                                     for n, e in zip(diag.nominal[0], diag.effective[0])]
        messages += [f"{alloc.describe()}: {m}" for m in diag.messages]
        if fam == "paper":
            groups = diag
    out += ["| layer | similarity | group | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for layer, sim in enumerate(groups.similarity[0]):
        out.append(f"| {layer} | {sim:.4f} | G{groups.labels[0][layer] + 1} | "
                   + " | ".join(str(col[layer]) for col in columns.values()) + " |")
    out += ["", f"Group sizes G1/G2/G3: {'/'.join(map(str, groups.group_sizes[0]))}. Planner warnings:", ""]
    out += [f"- {m}" for m in messages] or ["- none"]
    return out


if __name__ == "__main__":
    sys.exit(main())
