"""How much any layer allocator could win over the uniform budget, and how well the prefill
signals see where: SmolLM2-135M, teacher-forced through the library's caches, Botchan windows
(the tuning domain: nothing here is held out, nothing is tuned).

    python -m research.headroom [--policy streaming] [--fractions 0.2 0.3] [--windows 8]
                                       [--prompt-len 512] [--gen-len 128] [--step 0.5]
                                       [--name allocator_headroom]

Per window and budget b (B = floor(b * P) tokens per layer, d = floor(step * B)):
1. Marginal effects: the NLL of the continuation with every layer at B (uniform), with one
   layer l at B + d (gain_l = NLL(uniform) - NLL(l up)) and with one layer at B - d
   (cost_l = NLL(l down) - NLL(uniform)): 2L + 1 caches, one batch.
2. Swap oracles, equal total: the k layers of largest gain get B + d, the k others of smallest
   cost get B - d. Chosen and scored on the whole continuation ("in sample": an upper bound
   that also fits the window's noise); chosen on the first half of the continuation and scored
   on the second ("split half": what persists within a window, as seen through a signal as
   noisy as G/2 - 1 scored tokens); chosen from the mean effects of the other
   windows ("leave one out": a fixed per-model schedule).
3. Signals: per window, the Pearson correlation over layers between each signal's predicted
   marginal and the measured gain_l / cost_l. Perturbation (plain, and times the policy's
   LayerGains when its file exists): E(B) - E(B + d) and E(B - d) - E(B); similarity:
   1 - s_l for both.
Writes research/results/NAME.md (and $OUT/NAME.md when OUT is set); per-window results are cached
under .data/allocator_headroom/.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

from bench.common import environment, save_markdown
from squeeze_ops.engine.allocators import LayerGains
from squeeze_ops.engine.calibration import score_batch
from squeeze_ops.engine.policies import PrefillNeeds, SqueezeSettings, prefill_needs
from squeeze_ops.engine.signals import perturbation_knots

from . import evaluation as ev

from .allocator_search import MODEL_NAME, OBSERVE, PRESET_DIR, mean_se

SWAPS = (2, 4, 8)


def marginal_budgets(num_layers, base, delta):
    """The 2L + 1 budget rows of step 1: uniform, then each layer up by delta, then each down."""
    rows = [[base] * num_layers]
    for sign in (1, -1):
        for layer in range(num_layers):
            row = [base] * num_layers
            row[layer] += sign * delta
            rows.append(row)
    return rows


def effects(nll):
    """(gain [L], cost [L]) from the per-row NLL of marginal_budgets' rows (array [2L + 1])."""
    nll = np.asarray(nll, dtype=np.float64)
    num_layers = (len(nll) - 1) // 2
    return nll[0] - nll[1 : num_layers + 1], nll[num_layers + 1 :] - nll[0]


def swap(gain, cost, k, base, delta):
    """Budgets [L] of the swap oracle: base + delta for the k layers of largest gain, base - delta
    for the k other layers of smallest cost (ties: lower layer first); total L * base."""
    up = [int(i) for i in np.argsort(-np.asarray(gain), kind="stable")[:k]]
    down = [int(i) for i in np.argsort(np.asarray(cost), kind="stable") if i not in up][:k]
    row = [base] * len(gain)
    for i in up:
        row[i] += delta
    for i in down:
        row[i] -= delta
    return row


def pearson(a, b):
    """Pearson correlation of two equal-length sequences (0 when either is constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def predicted(curve, prompt_len, base, delta):
    """(gain, cost) a perturbation curve [KNOTS + 1] predicts for one layer: E(B) - E(B + d) and
    E(B - d) - E(B), linear between the knots."""
    knots = perturbation_knots(torch.tensor([prompt_len]), len(curve) - 1)[0].numpy()
    e = np.interp([base - delta, base, base + delta], knots, np.asarray(curve, dtype=np.float64))
    return e[1] - e[2], e[0] - e[1]


def score_rows(runner, prefill, continuation, policy, rows, label, progress):
    """Per-token NLL (list of lists [n][G]) of the continuation under Fixed budget rows."""
    settings = [SqueezeSettings.fixed(row) for row in rows]
    targets = continuation[None].to(runner.device)
    _, nll, _ = score_batch(runner, prefill, targets, policy, settings,
                            on_step=lambda i: progress(label, i + 1, targets.shape[1]))
    return nll.double().tolist()


def measure_window(runner, prompt, continuation, policy, fraction, step, cache_file, progress):
    """Steps 1-2 (without leave one out) and the signals of one window, cached in cache_file."""
    if os.path.exists(cache_file):
        with open(cache_file) as f:
            return json.load(f)
    P, G, L = len(prompt), len(continuation), runner.num_layers
    base = math.floor(fraction * P)
    delta = math.floor(step * base)
    prefill = runner.prefill([prompt], prefill_needs(policy).union(PrefillNeeds(observe=OBSERVE, perturb=(policy,))))
    rows = marginal_budgets(L, base, delta)
    nll = score_rows(runner, prefill, continuation, policy, rows, f"decode {len(rows)} marginals", progress)
    half = G // 2
    whole, first, second = slice(0, G), slice(1, half), slice(half, G)  # token 0 comes from the prefill
    gain, cost = effects([np.mean(r[whole]) for r in nll])
    gain1, cost1 = effects([np.mean(r[first]) for r in nll])
    swaps = [swap(gain, cost, k, base, delta) for k in SWAPS] + [swap(gain1, cost1, k, base, delta) for k in SWAPS]
    swapped = score_rows(runner, prefill, continuation, policy, swaps, f"decode {len(swaps)} swaps", progress)
    record = prefill[0]
    result = {
        "base": base, "delta": delta, "gain": gain.tolist(), "cost": cost.tolist(),
        "in_sample": [float(np.mean(s[whole]) - np.mean(nll[0][whole])) for s in swapped[: len(SWAPS)]],
        "split_half": [float(np.mean(s[second]) - np.mean(nll[0][second])) for s in swapped[len(SWAPS) :]],
        "perturbation": [c[0].tolist() for c in record.perturbation[policy]],
        "similarity": record.similarity[0].tolist(),
    }
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    with open(cache_file, "w") as f:
        json.dump(result, f)
    return result


def leave_one_out(runner, windows, results, policy, label, progress, cache_file):
    """Step 2's fixed schedules: per window, the swaps chosen from the other windows' mean
    effects, scored on this one (NLL change vs uniform per k). Cached in cache_file."""
    if os.path.exists(cache_file):
        with open(cache_file) as f:
            return json.load(f)
    out = []
    for i, (prompt, continuation) in enumerate(windows):
        others = [r for j, r in enumerate(results) if j != i]
        gain = np.mean([r["gain"] for r in others], axis=0)
        cost = np.mean([r["cost"] for r in others], axis=0)
        base, delta = results[i]["base"], results[i]["delta"]
        rows = [[base] * len(gain)] + [swap(gain, cost, k, base, delta) for k in SWAPS]
        progress(f"{label} leave-one-out window {i + 1}/{len(windows)}")
        prefill = runner.prefill([prompt], prefill_needs(policy))
        nll = [float(np.mean(r)) for r in score_rows(runner, prefill, continuation, policy, rows, "decode", progress)]
        out.append([x - nll[0] for x in nll[1:]])
    with open(cache_file, "w") as f:
        json.dump(out, f)
    return out


def signal_correlations(result, prompt_len, gains):
    """{signal: (corr with gain, corr with cost)} of one window's result."""
    base, delta = result["base"], result["delta"]
    curves = result["perturbation"]
    pred = np.array([predicted(c, prompt_len, base, delta) for c in curves])  # [L, 2]
    signals = {"perturbation": pred}
    if gains is not None:
        signals["perturbation x gains"] = pred * np.asarray(gains.values)[:, None]
    spread = 1.0 - np.asarray(result["similarity"])
    signals["1 - similarity"] = np.stack([spread, spread], 1)
    return {name: (pearson(p[:, 0], result["gain"]), pearson(p[:, 1], result["cost"])) for name, p in signals.items()}


def fmt(xs, wins=True):
    m, s = mean_se(xs)
    return f"{m:+.4f} ± {s:.4f}" + (f" ({sum(x < 0 for x in xs)}/{len(xs)})" if wins else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="streaming", choices=list(ev.POLICIES))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--step", type=float, default=0.5, help="d = floor(step * B) tokens moved per layer")
    parser.add_argument("--name", default="allocator_headroom")
    job = ev.start_job(parser, argv, threads=0)
    if job is None:
        return 2
    args, runner, tokenizer, progress = job
    if not 0 < args.step < 1:
        parser.error(f"--step: expected a value in (0, 1), got {args.step}")
    botchan = ev.tokenize(tokenizer, ev.botchan_text(args.data_dir))
    P, G = args.prompt_len, args.gen_len
    # The tuning part of the book (research.allocator_search tunes on the same two thirds).
    windows = ev.windows(botchan[len(botchan) // 3 :], P, G, args.windows)
    policy = ev.POLICIES[args.policy]
    gains_file = os.path.join(PRESET_DIR, f"{MODEL_NAME}.{args.policy}.gains.json")
    gains = LayerGains.load(gains_file) if os.path.exists(gains_file) else None
    folder = os.path.join(args.data_dir, "allocator_headroom")

    sections = []
    for fraction in args.fractions:
        tag = f"{args.policy}-b{fraction:g}-s{args.step:g}-P{P}-G{G}"
        results = []
        for i, (prompt, continuation) in enumerate(windows):
            progress(f"{tag} window {i + 1}/{len(windows)}")
            results.append(measure_window(runner, prompt, continuation, policy, fraction, args.step,
                                          os.path.join(folder, f"{tag}-{i}of{len(windows)}.json"), progress))
        loo = leave_one_out(runner, windows, results, policy, tag, progress,
                            os.path.join(folder, f"{tag}-loo{len(windows)}.json"))
        corr = [signal_correlations(r, P, gains) for r in results]
        base, delta = results[0]["base"], results[0]["delta"]
        lines = [f"### {args.policy} at {100 * fraction:g}% (B = {base}, d = {delta})", "",
                 "NLL change vs uniform, mean ± s.e. over windows (windows where it is < 0):", "",
                 "| swap oracle | " + " | ".join(f"k = {k}" for k in SWAPS) + " |",
                 "|---|" + "---|" * len(SWAPS)]
        for name, key in (("in sample", "in_sample"), ("split half", "split_half")):
            lines.append(f"| {name} | " + " | ".join(fmt([r[key][j] for r in results]) for j in range(len(SWAPS)))
                         + " |")
        lines.append("| leave one out | " + " | ".join(fmt([x[j] for x in loo]) for j in range(len(SWAPS))) + " |")
        gain = np.array([r["gain"] for r in results])
        cost = np.array([r["cost"] for r in results])
        lines += ["", "Measured marginal effects over layers: |gain| mean "
                  f"{np.abs(gain).mean():.4f}, |cost| mean {np.abs(cost).mean():.4f} nats/token; the largest mean "
                  f"gain {gain.mean(0).max():+.4f} (layer {int(gain.mean(0).argmax())}); correlation of one "
                  "window's gains with the mean of the others: "
                  + fmt([pearson(gain[i], np.delete(gain, i, 0).mean(0)) for i in range(len(gain))], wins=False)
                  + ", costs: "
                  + fmt([pearson(cost[i], np.delete(cost, i, 0).mean(0)) for i in range(len(cost))], wins=False)
                  + ".", "",
                  "| signal | corr. with gain | corr. with cost |", "|---|---|---|"]
        for name in corr[0]:
            lines.append(f"| {name} | {fmt([c[name][0] for c in corr], wins=False)} | "
                         f"{fmt([c[name][1] for c in corr], wins=False)} |")
        sections += lines + [""]

    env = environment(args.device)
    env.update(threads=torch.get_num_threads(), dtype=str(runner.dtype))
    text = "\n".join([
        f"# Allocator headroom on {MODEL_NAME}: what any layer allocator could win, and what the signals see", "",
        ", ".join(f"{k}: {v}" for k, v in env.items()) + f", run time of this invocation: "
        f"{progress.elapsed() / 60:.1f} min (windows found in the cache folder are not recomputed)", "",
        f"Command: `python -m research.headroom --policy {args.policy} --fractions "
        f"{' '.join(f'{f:g}' for f in args.fractions)} --windows {args.windows} --prompt-len {P} --gen-len {G} "
        f"--step {args.step:g}" + (f" --name {args.name}" if args.name != "allocator_headroom" else "") + "`", "",
        "## Protocol", "",
        f"- {args.windows} Botchan windows of the tuning part (the last two thirds of the book): {P} prompt tokens, "
        f"{G} continuation tokens teacher-forced through the library's caches ({policy.kind} policy), NLL per "
        "token; token 0 is predicted by the full prefill in every row and left out of the split halves.",
        "- Marginal effects: every layer at B (uniform); one layer at B + d (gain_l = NLL(uniform) - NLL); one "
        "layer at B - d (cost_l = NLL - NLL(uniform)).",
        "- Swap oracles (equal total): the k layers of largest gain at B + d, the k other layers of smallest "
        "cost at B - d. In sample: chosen and scored on the whole continuation (an upper bound that fits the "
        "window's noise too). Split half: chosen on continuation tokens 1..G/2-1, scored on G/2..G-1 (what "
        "persists within a window; the choice is itself measured on G/2 - 1 tokens, so this is what a signal "
        "as noisy as that reaches, not the limit of a noiseless one). Leave "
        "one out: chosen from the other windows' mean effects (a fixed schedule per model).",
        f"- Signals: Pearson correlation over the layers, per window, between the measured gain_l / cost_l and "
        f"what the signal predicts. Perturbation (the Perturbation allocator's E_l, last {OBSERVE} prompt "
        "queries): E(B) - E(B + d), E(B - d) - E(B)"
        + (f"; times the layer gains of {os.path.basename(gains_file)}" if gains is not None else "")
        + ". 1 - similarity: the SimilarityWeighted allocator's signal, for both.", "",
        "## Results", "", *sections])
    print(save_markdown(args.name, text, ev.RESULTS_DIR))
    return 0


if __name__ == "__main__":
    sys.exit(main())
