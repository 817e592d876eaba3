"""kvpress (PyPI `kvpress==0.5.5`) presses on the same work as the library, at equal average KV.

Two protocols, both on a HF model (SmolLM2-135M-Instruct here) driven the way kvpress's own
pipeline drives it: the prompt is prefilled by `model.model` under the press, which evicts
each layer's cache once, at the end of the prefill; tokens after it are appended without
eviction, at explicit positions P + i (the cache is shorter than the positions).
- NLL (teacher forcing): P prompt tokens prefilled under the press, then the G continuation
  tokens fed one at a time; mean NLL over the G tokens, the first predicted by the prefill's
  last logits (as in the library's `LlamaRunner.score`).
- Retrieval (tasks.py): greedy generation after the compressed prefill of the whole chat
  prompt (the question is compressed with the rest, as in the library; kvpress's pipeline
  would keep the question out of the compression).

Equal average KV: the library holds a constant budget f * P per layer while decoding, a press
starts at (1 - r) * P and grows by one token per step. Over G scored steps the press's mean
is (1 - r) * P + (G - 1) / 2, so r = 1 - (f - (G - 1) / (2 P)) (`equal_kv_ratio`); for a
generation of G new tokens the same formula with G = max_new_tokens. Every press but
PyramidKV and AdaKV removes the same fraction in every layer and KV head; PyramidKV varies it
over layers, AdaKV over the heads of a layer (same total).

Attention implementations: ObservedAttentionPress reads the attention weights, so it needs
`attn_implementation="eager"`; AdaKVPress masks evicted keys through kvpress's patched
attention functions, which the eager path does not go through, so it needs a non-eager one
(sdpa, the model's default). The others work with either; this module runs them on sdpa.

Runs in its own venv, .venv-peers (`bash research/setup_peers.sh`; kvpress pins
transformers < 5.3 and brings datasets, pandas, peft, fire, cachetools), from the repository
root so that squeeze_ops and research import from the working tree:

    .venv-peers/bin/python -m research.peers nll --windows 4          (kvpress + library, Botchan)
    .venv-peers/bin/python -m research.peers tasks --contexts 2048    (kvpress, retrieval trials)
    python -m research.peers summary --jsonl a.jsonl,b.jsonl         (the NLL tables of nll runs)
"""
import argparse
import contextlib
import json
import sys
import time

import torch

EAGER_PRESSES = ("observed",)


def make_press(name, ratio):
    """The kvpress press `name` (a key of PRESS_NAMES) at compression_ratio `ratio`, with
    kvpress's default parameters otherwise (StreamingLLM: 4 sinks; SnapKV / PyramidKV: window
    64, kernel 5; Expected attention: 512 future positions, 4 sinks)."""
    import kvpress

    builders = {
        "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4),
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "observed": lambda: kvpress.ObservedAttentionPress(compression_ratio=ratio),
        "expected": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=ratio),
        "adakv-snapkv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio)),
        "adakv-expected": lambda: kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio)),
    }
    if name not in builders:
        raise ValueError(f"press: expected one of {PRESS_NAMES}, got {name!r}")
    return builders[name]()


PRESS_NAMES = ("streaming", "snapkv", "observed", "expected", "tova", "pyramidkv", "adakv-snapkv", "adakv-expected")


def equal_kv_ratio(fraction, prompt_len, steps):
    """kvpress compression_ratio whose average KV over `steps` decode steps equals the
    library's constant budget `fraction` * prompt_len: 1 - (fraction - (steps - 1) / (2 P)).
    Raises ValueError when no ratio in [0, 1) does (the growth alone exceeds the budget)."""
    ratio = 1.0 - (fraction - (steps - 1) / (2.0 * prompt_len))
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"no kvpress ratio matches fraction {fraction} over {steps} steps of a {prompt_len}-token "
                         f"prompt (got {ratio:.4f})")
    return ratio


@contextlib.contextmanager
def attention(model, implementation):
    """Runs the block with the model's attention implementation set to `implementation`
    (e.g. "eager" for ObservedAttentionPress), restoring the previous one after."""
    previous = model.config._attn_implementation
    if implementation != previous:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        if implementation != previous:
            model.set_attn_implementation(previous)


def press_context(model, name):
    """The context a press runs in: its attention implementation (eager for the presses of
    EAGER_PRESSES, else the model's own)."""
    return attention(model, "eager" if name in EAGER_PRESSES else model.config._attn_implementation)


@torch.no_grad()
def prefill(model, prompt_ids, press=None):
    """Prefill of one prompt (int ids [P]) under `press` (None: full cache).
    Returns (DynamicCache, logits fp32 [V] of the last prompt token)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.as_tensor(prompt_ids, device=model.device).long()[None]
    with press(model) if press is not None else contextlib.nullcontext():
        hidden = model.model(input_ids=ids, past_key_values=cache).last_hidden_state
    return cache, model.lm_head(hidden[:, -1]).float()[0]


@torch.no_grad()
def decode(model, cache, token, position):
    """One token (int) at `position` appended to the cache without eviction. Returns logits
    fp32 [V]."""
    ids = torch.tensor([[int(token)]], device=model.device)
    pos = torch.tensor([[position]], device=model.device)
    return model(input_ids=ids, past_key_values=cache, position_ids=pos).logits[0, -1].float()


@torch.no_grad()
def score(model, prompt_ids, targets, press=None):
    """Teacher-forced NLL of targets (int [G]) after the prompt (int [P]) prefilled under
    `press`. Returns (nll fp32 [G], top1 int64 [G]) on the host."""
    cache, logits = prefill(model, prompt_ids, press)
    start = len(prompt_ids)
    nll, top1 = [], []
    for i, target in enumerate(targets.tolist()):
        logp = torch.log_softmax(logits, dim=-1)
        nll.append(-logp[target])
        top1.append(logits.argmax())
        if i + 1 < len(targets):
            logits = decode(model, cache, target, start + i)
    return torch.stack(nll).cpu(), torch.stack(top1).cpu()


def generator(model, press, max_new_tokens, name=None):
    """Greedy generation after a prefill under `press` (None: full cache), stopping at the
    model's end-of-sequence token: a callable for research.tasks.run. `name` (a key of
    PRESS_NAMES) selects the attention implementation the press needs."""
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, (list, tuple)) else [eos])

    @torch.no_grad()
    def generate(prompt_ids):
        with press_context(model, name):
            cache, logits = prefill(model, prompt_ids, press)
            out = [int(logits.argmax())]
            while len(out) < max_new_tokens and out[-1] not in stop:
                out.append(int(decode(model, cache, out[-1], len(prompt_ids) + len(out) - 1).argmax()))
        return out

    return generate


def _paired(values, reference):
    """Mean of the paired differences values - reference, ± its standard error."""
    d = torch.tensor(values, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    se = d.std().item() / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return f"{d.mean().item():+.4f} ± {se:.4f}"


def _nll_job(args, runner, tokenizer, model, log):
    from research import evaluation

    text = evaluation.botchan_text(args.data_dir or evaluation.DEFAULT_DATA_DIR)
    wins = evaluation.windows(evaluation.tokenize(tokenizer, text), args.prompt_len, args.gen_len, args.windows)
    from squeeze_ops.engine.calibration import score_batch
    from squeeze_ops.engine.policies import prefill_needs

    from .tasks import engine_spec

    ratio = equal_kv_ratio(args.fraction, args.prompt_len, args.gen_len)
    cell = evaluation.Cell("streaming", args.fraction)
    names = [n for n in args.presses.split(",") if n]
    specs = {f"library {n}": engine_spec(n, args.fraction) for n in args.library_specs.split(",") if n}
    rows = {k: [] for k in ("library full", "transformers full", "library streaming", *specs, *names)}
    log(f"NLL: {len(wins)} windows of {args.prompt_len}+{args.gen_len}, library fraction {args.fraction}, "
        f"kvpress ratio {ratio:.4f}")
    for w, (prompt, cont) in enumerate(wins):
        t0 = time.perf_counter()
        lib = evaluation.evaluate_window(runner, prompt, cont, [cell])
        rows["library full"].append(lib.full_nll.mean().item())
        rows["library streaming"].append(lib.nll[cell].mean().item())
        for label, (policy, settings) in specs.items():  # each with its own prefill (its scores)
            prefill = runner.prefill([prompt], prefill_needs(policy, settings))
            _, nll, _ = score_batch(runner, prefill, cont[None].to(runner.device), policy, [settings])
            rows[label].append(nll.mean().item())
        hf_full, _ = score(model, prompt, cont)
        rows["transformers full"].append(hf_full.mean().item())
        for name in names:
            press = make_press(name, ratio)
            with press_context(model, name):
                nll, _ = score(model, prompt, cont, press)
            rows[name].append(nll.mean().item())
        log(f"window {w}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in rows.items()) +
            f" ({time.perf_counter() - t0:.0f}s)")
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(dict(window=w, fraction=args.fraction, ratio=ratio,
                                        **{k: v[-1] for k, v in rows.items()})) + "\n")
    full = rows["library full"]
    print(f"\n## NLL, {len(wins)} Botchan windows of {args.prompt_len} + {args.gen_len} tokens, library "
          f"{args.fraction:g} / kvpress ratio {ratio:.4f}\n")
    print("| method | mean NLL | vs library full (± s.e. over windows) |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {sum(v) / len(v):.4f} | {_paired(v, full)} |")
    gap = max(abs(a - b) for a, b in zip(rows["transformers full"], full))
    print(f"\nfull cache, transformers vs library: largest window-mean difference {gap:.1e} nats/token")
    if "streaming" in rows:
        print(f"uniform StreamingLLM, library - kvpress at equal average KV: "
              f"{_paired(rows['library streaming'], rows['streaming'])} nats/token")


def nll_summary(paths):
    """The NLL table of one or more `nll --jsonl` files, one section per fraction: every method's
    mean NLL, its paired difference from the library's full cache and from the best press of
    that fraction (the press of lowest mean NLL; "windows better": where the row is below it),
    ± the standard error over the windows. Files of one fraction are joined by window; a method
    scored twice must agree (the library's full cache is in every file). Returns markdown."""
    cells = {}  # (fraction, window) -> {method: nll}
    for path in paths:
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                key = (row.pop("fraction"), row.pop("window"))
                row.pop("ratio")
                cell = cells.setdefault(key, {})
                for method, nll in row.items():
                    if method in cell and abs(cell[method] - nll) > 1e-4:
                        raise ValueError(f"{path}: window {key[1]} at {key[0]}: {method} {nll} != {cell[method]} "
                                         "of an earlier file")
                    cell[method] = nll
    out = []
    for fraction in sorted({f for f, _ in cells}):
        wins = [cells[k] for k in sorted(k for k in cells if k[0] == fraction)]
        methods = [m for m in wins[0] if all(m in w for w in wins)]
        column = {m: [w[m] for w in wins] for m in methods}
        presses = [m for m in methods if not m.startswith(("library ", "transformers "))]
        best = min(presses, key=lambda m: sum(column[m])) if presses else None
        out.append(f"### {fraction:.0%} KV, {len(wins)} windows" + (f"; best press: {best}" if best else ""))
        out.append(f"\n| method | mean NLL | vs library full | vs {best or '-'} (windows better) |\n|---|---|---|---|")
        for m in methods:
            versus = (f"{_paired(column[m], column[best])} "
                      f"({sum(a < b for a, b in zip(column[m], column[best]))}/{len(wins)})") if best else "-"
            out.append(f"| {m} | {sum(column[m]) / len(wins):.4f} | {_paired(column[m], column['library full'])} | "
                       f"{versus} |")
        out.append("")
    return "\n".join(out)


def _tasks_job(args, runner, tokenizer, model, log):
    from research import evaluation

    from . import tasks

    text = evaluation.botchan_text(args.data_dir or evaluation.DEFAULT_DATA_DIR)
    names = [tasks.TASK_NAMES[n] for n in args.tasks.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    trials = tasks.suite(tokenizer, text, contexts, args.trials, args.seed, names, reserve=args.max_new_tokens)
    for name in args.presses.split(","):
        t0 = time.perf_counter()
        ratios = {}

        def generate(prompt_ids):
            # The ratio depends on the prompt's length: equal average KV per trial.
            ratio = equal_kv_ratio(args.fraction, len(prompt_ids), args.max_new_tokens)
            ratios[len(prompt_ids)] = ratio
            # "none": the full cache through this harness, to check it against transformers' generate.
            press = None if name == "none" else make_press(name, ratio)
            return generator(model, press, args.max_new_tokens, name)(prompt_ids)

        results = tasks.run(trials, generate, tokenizer, [model.generation_config.eos_token_id],
                            lambda i, n, o: log(f"  [{name}] {i}/{n} {o.trial.task} {o.trial.context} "
                                                f"depth {o.trial.meta['depth']}: {o.score:.2f} {o.text!r}"))
        r = sorted(ratios.values())
        print(f"\n## kvpress {name}, ratio {r[0]:.4f}-{r[-1]:.4f} (library {args.fraction:g}, "
              f"{args.max_new_tokens} new tokens; {time.perf_counter() - t0:.0f}s)\n\n{results.markdown()}\n",
              flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                for o in results.outcomes:
                    f.write(json.dumps(dict(press=name, fraction=args.fraction, meta=o.trial.meta,
                                            answers=o.trial.answers, text=o.text, score=o.score)) + "\n")


def main(argv=None):
    """Command line: `nll` (kvpress presses, the library's full cache, uniform StreamingLLM and
    any --library-specs, and transformers' full cache on Botchan windows), `tasks` (kvpress presses on the
    retrieval trials of research.tasks) or `summary` (the NLL table of the --jsonl files, a comma list)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", choices=("nll", "tasks", "summary"))
    parser.add_argument("--presses", default=",".join(PRESS_NAMES),
                        help="comma list of PRESS_NAMES; tasks also take none (the full cache through this harness)")
    parser.add_argument("--library-specs", default="",
                        help="nll: comma list of research.tasks specs also scored by the library at --fraction "
                             "(e.g. h2o,h2o:score_queries=32:pool_size=15)")
    parser.add_argument("--fraction", type=float, default=0.2, help="the library's KV budget to match")
    parser.add_argument("--prompt-len", type=int, default=1024, help="nll: P")
    parser.add_argument("--gen-len", type=int, default=128, help="nll: G")
    parser.add_argument("--windows", type=int, default=4, help="nll: windows over Botchan")
    parser.add_argument("--tasks", default="passkey", help="tasks: comma list of research.tasks.TASK_NAMES")
    parser.add_argument("--contexts", default="2048")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--jsonl", default=None, help="append every result here (summary: the files to read)")
    args = parser.parse_args(argv)
    if args.job == "summary":
        print(nll_summary(args.jsonl.split(",")))
        return

    from research import evaluation

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - t0:6.0f}s] {message}", file=sys.stderr, flush=True)

    runner, tokenizer, model = evaluation.load_smollm2("cpu")
    (_nll_job if args.job == "nll" else _tasks_job)(args, runner, tokenizer, model, log)
    print(f"total wall {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
