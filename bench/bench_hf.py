"""transformers' `model.generate` with a SqueezeCache (squeeze_ops.models.hf) against
transformers' own generate (SDPA attention, DynamicCache) and against the library's LlamaRunner
on the same caches: time to the first token and time per generated token, batch 1, greedy.

    python -m bench.bench_hf [--quick] [--device cpu|cuda] [--prompt-len 1024] [--new 32]

Model: SmolLM2-135M-Instruct (the eval extra's wheel; fp32 on CPU, bf16 on a GPU), prompt: the
first --prompt-len tokens of Botchan's middle (research.evaluation's text). --quick: a tiny
random Llama (4 layers, hidden 64), random prompt of 64 tokens, 8 new tokens.

Rows (same prompt, same number of new tokens, greedy):
  transformers    model.generate, attn_implementation "sdpa", its DynamicCache: the anchor
  hf squeeze      model.generate(past_key_values=SqueezeCache(...)): full (settings None,
                  nothing evicted: the like-for-like overhead), h2o at 30% and 20% of the prompt
  runner          LlamaRunner.start + decode (the same ops without transformers' forward)
Times are the process's CPU time on CPU (time.process_time: run with one thread, the default,
it is the wall time of an idle machine, and other work on a shared machine does not inflate
it), the wall clock on a GPU. Per row, read from clock stamps after each token (a StoppingCriteria that never stops) within
one run of N tokens: ttft_ms = the time to the first token (the prompt's forward, the plan and
admission), ms/token = the median time of the N - 1 later tokens (a decode forward and
generate's own loop); the cases run interleaved --reps times and each row keeps its fastest
run (the least disturbed by other work on the machine); vs transformers and vs the runner at
the same budget as ratios of ms/token. On CPU also where a token's time goes:
attention ms/token = time inside the attention and its cache update, summed over the layers
(transformers: DynamicCache.update + sdpa_attention_forward; squeeze: the attention function,
i.e. decode_step_ through SqueezeKVCache.attend; runner: SqueezeKVCache.attend), as its share
of the decode time in each run (median over the runs) times ms/token; the rest = the model's
other work and generate's own loop. CPU value checks (the host reads of lengths and
page ids each op makes on CPU tensors) are on as a CPU user gets them; the `checks off` row
turns them off as on a GPU without SQUEEZE_DEBUG, which is the eager launch path's real host
cost.
"""
import argparse
import contextlib
import os
import statistics
import time

import torch

from bench.common import environment, write_table

from squeeze_ops import _checks
from squeeze_ops.engine.cache import SqueezeKVCache
from squeeze_ops.engine.policies import SequencePolicy, SqueezeSettings
from squeeze_ops.models.llama import LlamaRunner


def _now(device):
    """Seconds: the process's CPU time on CPU (other work on a shared machine does not inflate
    it; with one thread it is the wall time of an idle machine), the wall clock on a GPU."""
    return time.perf_counter() if torch.device(device).type == "cuda" else time.process_time()


class _Clock:
    """Seconds spent inside the wrapped callables while enabled."""

    def __init__(self):
        self.seconds, self.on = 0.0, False

    def wrap(self, fn, device):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0 = _now(device)
            out = fn(*args, **kwargs)
            _sync(device)
            self.seconds += _now(device) - t0
            return out
        return timed


@contextlib.contextmanager
def _patched(owner, name, clock, device):
    original = getattr(owner, name)
    setattr(owner, name, clock.wrap(original, device))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _attention_clock(provider, device):
    """A context timing the attention (and its cache update) of `provider`, and its _Clock."""
    from transformers import AttentionInterface, DynamicCache

    from squeeze_ops.models import hf

    clock = _Clock()
    stack = contextlib.ExitStack()
    if provider == "transformers":
        stack.enter_context(_patched(DynamicCache, "update", clock, device))
        original = AttentionInterface._global_mapping["sdpa"]
        AttentionInterface._global_mapping["sdpa"] = clock.wrap(original, device)
        stack.callback(AttentionInterface._global_mapping.__setitem__, "sdpa", original)
    elif provider == "hf squeeze":
        stack.enter_context(_patched(hf.SqueezeCache, "_decode_layer", clock, device))
    else:
        stack.enter_context(_patched(SqueezeKVCache, "attend", clock, device))
    return stack, clock


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _Stamps:
    """Clock readings at the start and after each generated token; resets `clock` at the first
    token so that it counts the decode forwards only."""

    def __init__(self, device, clock=None):
        self.device, self.clock = device, clock
        _sync(device)
        self.times = [_now(device)]

    def __call__(self, *args, **kwargs):  # transformers' StoppingCriteria: never stops
        _sync(self.device)
        self.times.append(_now(self.device))
        if len(self.times) == 2 and self.clock is not None:
            self.clock.seconds = 0.0
        return torch.zeros(1, dtype=torch.bool, device=self.device)

    def split(self):
        """(time to the first token, [time of each later token]) in seconds."""
        t = self.times
        return t[1] - t[0], [b - a for a, b in zip(t[1:], t[2:])]


def _generate(model, prompt, new_tokens, make_cache, clock=None):
    """One greedy model.generate of exactly new_tokens tokens: (ttft s, [s of each later token])."""
    from transformers import StoppingCriteriaList

    cache = make_cache(new_tokens) if make_cache else None
    stamps = _Stamps(prompt.device, clock)
    with torch.no_grad():
        out = model.generate(prompt[None], past_key_values=cache, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([stamps]))
    assert out.shape[1] == len(prompt) + new_tokens
    return stamps.split()


def _run_runner(runner, prompt, new_tokens, policy, settings, clock=None):
    """LlamaRunner.start + new_tokens - 1 greedy decode steps: (ttft s, [s of each later token])."""
    stamps = _Stamps(prompt.device, clock)
    cache, _, logits = runner.start([prompt], policy, settings, new_tokens - 1)
    token = logits.argmax(-1)
    stamps()
    for _ in range(new_tokens - 1):
        token = runner.decode(cache, token).argmax(-1)
        stamps()
    return stamps.split()


def measure(model, prompt, new_tokens, reps, device):
    """The rows of the table (see the module docstring)."""
    from squeeze_ops.models.hf import SqueezeCache

    runner = LlamaRunner(model)
    policy = SequencePolicy.h2o()
    budgets = {"full": None, "h2o 30%": SqueezeSettings.squeeze(b_init=0.3),
               "h2o 20%": SqueezeSettings.squeeze(b_init=0.2)}
    cases = [("transformers", "full", None, True)]
    cases += [("hf squeeze", name, s, True) for name, s in budgets.items()]
    cases += [("hf squeeze", "full, checks off", None, False)]
    cases += [("runner", name, s, True) for name, s in budgets.items()]
    def run(case, clock=None):
        provider, _, settings, _ = case
        if provider == "transformers":
            model.set_attn_implementation("sdpa")
            return _generate(model, prompt, new_tokens, None, clock)
        if provider == "hf squeeze":
            return _generate(model, prompt, new_tokens, lambda g: SqueezeCache(model, policy, settings, g), clock)
        return _run_runner(runner, prompt, new_tokens, policy, settings, clock)

    cpu = torch.device(device).type == "cpu"
    for case in cases:  # warm-up
        with _checks.forced_value_checks(None if case[3] else False):
            run(case)
    samples = [[] for _ in cases]
    for _ in range(reps):
        # Interleaved, so that other load on the machine reaches every case alike.
        for case, got in zip(cases, samples):
            with _checks.forced_value_checks(None if case[3] else False):
                if cpu:
                    stack, clock = _attention_clock(case[0], device)
                    with stack:
                        clock.on = True
                        ttft, steps = run(case, clock)
                    got.append((ttft, statistics.median(steps), clock.seconds / sum(steps)))
                else:
                    ttft, steps = run(case)
                    got.append((ttft, statistics.median(steps), None))
    rows = []
    for (provider, budget, _, _), got in zip(cases, samples):
        row = dict(provider=provider, budget=budget, ttft_ms=1e3 * min(t for t, _, _ in got),
                   ms_per_token=1e3 * min(d for _, d, _ in got))
        if cpu:
            share = statistics.median(a for _, _, a in got)
            row["attention_ms_per_token"] = row["ms_per_token"] * share
            row["rest_ms_per_token"] = row["ms_per_token"] * (1 - share)
        rows.append(row)
    model.set_attn_implementation("sdpa")
    anchor = rows[0]["ms_per_token"]
    runner_rows = {r["budget"]: r["ms_per_token"] for r in rows if r["provider"] == "runner"}
    for r in rows:
        r["vs_transformers"] = r["ms_per_token"] / anchor
        if r["budget"] in runner_rows:
            r["vs_runner"] = r["ms_per_token"] / runner_rows[r["budget"]]
    return rows


def _tiny_model(device):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config).to(device).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new", type=int, default=32, help="generated tokens timed per run (default 32)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        model, prompt_len, new = _tiny_model(args.device), 64, 8
        prompt = torch.randint(1, 128, (prompt_len,), device=args.device)
        what = "tiny random Llama (4 layers, hidden 64)"
    else:
        from research import evaluation as ev

        _, tokenizer, model = ev.load_smollm2(args.device)
        ids = ev.tokenize(tokenizer, ev.botchan_text())
        prompt = ev.windows(ids, args.prompt_len, args.new, 1)[0][0].to(args.device)
        new = args.new
        what = f"SmolLM2-135M-Instruct ({model.dtype})"
    rows = measure(model, prompt, new, args.reps, args.device)
    env = environment(args.device)
    env["threads"] = torch.get_num_threads()
    env["load average (1 min, at the end)"] = f"{os.getloadavg()[0]:.1f}"  # other work on the machine
    import transformers

    env["transformers"] = transformers.__version__
    note = (f"{what}, batch 1, prompt {len(prompt)} tokens, {new} generated tokens per run (greedy), "
            f"the fastest of {args.reps} interleaved runs. Columns: see bench/bench_hf.py.")
    name = "hf_generate_quick" if args.quick else f"hf_generate_{torch.device(args.device).type}"
    print(write_table(name, rows, ["provider", "budget", "ttft_ms", "ms_per_token", "vs_transformers", "vs_runner",
                                   "attention_ms_per_token", "rest_ms_per_token"], env, note))


# ---- pytest-benchmark (CPU: the tiny model's generate, ours vs transformers') ----

def _tiny_case():
    import pytest

    pytest.importorskip("transformers")
    model = _tiny_model("cpu")
    return model, torch.randint(1, 128, (48,))


def test_cpu_generate_transformers(benchmark):
    model, prompt = _tiny_case()
    benchmark(_generate, model, prompt, 4, None)


def test_cpu_generate_squeeze_cache(benchmark):
    from squeeze_ops.models.hf import SqueezeCache

    model, prompt = _tiny_case()
    settings = SqueezeSettings.squeeze(b_init=0.3)
    try:
        benchmark(_generate, model, prompt, 4,
                  lambda g: SqueezeCache(model, SequencePolicy.h2o(), settings, g))
    finally:
        model.set_attn_implementation("sdpa")


if __name__ == "__main__":
    main()
