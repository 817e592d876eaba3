"""SqueezeAttention on a real model, end to end through the library's ops:

    python -m research.main            (after `bash .ci/setup eval`)

SmolLM2-135M on one window of Botchan: full-attention prefill measuring each layer's
similarity cos(x_in, x_mid), the groups of the 1-D K-Means, the budget per layer, the KV
memory against a full cache, a greedy continuation with the full and the squeezed cache
through transformers' model.generate (squeeze_ops.models.hf.SqueezeCache), a small quality
table (teacher-forced NLL increase over the full cache), a pass-key retrieval line (full vs
squeezed), the paper's claims, and the allocators recommended for this model against uniform. Uses the GPU kernels when a
GPU is present. The full grid is `python -m research.quality`.
"""
import argparse
import sys

import torch

from squeeze_ops.engine.cache import SqueezeKVCache
from squeeze_ops.engine.policies import SqueezeSettings
from squeeze_ops.engine.presets import recommended, recommended_allocator
from squeeze_ops.models.hf import SqueezeCache

from . import evaluation as ev
from . import tasks

RETRIEVAL_TOKENS = 16  # generated per pass-key trial (the answer is a 5-digit number)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens P (default 1024)")
    parser.add_argument("--gen-len", type=int, default=64, help="scored continuation tokens G (default 64)")
    parser.add_argument("--policy", choices=list(ev.POLICIES), default="h2o", help="policy of the demo cache")
    parser.add_argument("--budget", type=float, default=0.2, help="b_init of the demo cache (default 0.2)")
    parser.add_argument("--p", type=float, default=0.5, help="squeeze factor p of the demo cache (default 0.5)")
    parser.add_argument("--greedy", type=int, default=32, help="greedy continuation tokens (default 32)")
    parser.add_argument("--retrieval-trials", type=int, default=5,
                        help="pass-key trials per cache at the prompt length (default 5; 0 skips)")
    job = ev.start_job(parser, argv)
    if job is None:
        return 2
    args, runner, tokenizer, progress = job
    progress("reading Botchan (sentencepiece 0.2.1 sdist)")
    ids = ev.tokenize(tokenizer, ev.botchan_text(args.data_dir))
    prompt, continuation = ev.windows(ids, args.prompt_len, args.gen_len, 1)[0]
    print(f"device {args.device}, dtype {runner.dtype}, torch {torch.__version__}; Botchan {len(ids)} tokens; "
          f"window: {len(prompt)} prompt + {len(continuation)} scored tokens (middle of the book)\n")

    policy = ev.POLICIES[args.policy]
    squeeze = SqueezeSettings.squeeze(b_init=args.budget, p=args.p)
    uniform = SqueezeSettings.uniform(b_init=args.budget)
    fractions = (0.2, 0.3)
    cells = ev.grid(fractions=fractions, ps=(args.p,)) + [
        ev.Cell(name, f, allocator=recommended_allocator(name, f)) for name in ev.POLICIES for f in fractions]
    progress(f"prefill {len(prompt)} tokens (prefill_attention + add_rmsnorm_cossim per layer)")
    record, first = runner.prefill([prompt], ev.prefill_signals(cells))
    horizon = max(args.gen_len, args.greedy)
    caches = {name: SqueezeKVCache.build(record, policy, s, horizon, source=[0])
              for name, s in (("full", None), ("uniform", uniform), ("squeeze", squeeze))}
    sq = caches["squeeze"]

    print(f"## Layer profile ({policy.describe()}, b_init {args.budget:g}, p {args.p:g}, k {squeeze.allocator.k})")
    print("Similarity = mean over the prompt of cos(x_in, x_mid); G1 = most important (lowest).")
    print(ev.profile_table(sq.similarity[0].cpu(), sq.labels[0].cpu(),
                           {"uniform budget": caches["uniform"].budgets[0].cpu(),
                            "squeeze budget": sq.budgets[0].cpu(),
                            "squeeze KV KiB": [n // 1024 for n in sq.memory().kv_per_layer]}))
    labels = sq.labels[0].cpu()
    groups = [[i for i in range(len(labels)) if labels[i] == g] for g in range(squeeze.allocator.k)]
    for g, layers in enumerate(groups):
        print(f"G{g + 1} ({len(layers)} layers, centroid {sq.centroids[0, g].item():.4f}): {layers}")
    print()

    print(f"## KV memory (batch 1, {len(prompt)} prompt + {horizon} new tokens; capacity = budget + 1 slot for "
          "the token appended before eviction; one allocation per cache)")
    for name, cache in caches.items():
        print(f"{name:8s} {cache.memory().summary()}")
    print()

    print(f"## Greedy continuation, {args.greedy} tokens: transformers' model.generate with a SqueezeCache")
    texts = {}
    for name, settings in (("full", None), ("squeeze", squeeze)):
        progress(f"model.generate, {name} cache")
        cache = SqueezeCache(runner.model, policy, settings, max_new_tokens=args.greedy)
        with torch.no_grad():
            out = runner.model.generate(prompt[None].to(runner.device), past_key_values=cache, do_sample=False,
                                        max_new_tokens=args.greedy, min_new_tokens=args.greedy,
                                        pad_token_id=tokenizer.eos_token_id)
        texts[name] = out[0, len(prompt):].cpu()
        print(f"{name:8s} {cache.kv.memory().summary()}")
    runner.model.set_attn_implementation("sdpa")
    same = int((texts["full"] == texts["squeeze"]).cumprod(0).sum())
    print("prompt ends: ..." + tokenizer.decode(prompt[-40:]).replace("\n", " "))
    for name, toks in texts.items():
        print(f"{name:8s}: " + tokenizer.decode(toks).replace("\n", " "))
    print(f"(identical for the first {same} of {args.greedy} tokens)\n")
    del caches, sq

    result = ev.evaluate_window(runner, prompt, continuation, cells, progress, prefill=(record, first))
    summary = ev.summarize([result])
    print(f"## Quality: teacher-forced mean NLL over {len(continuation)} tokens; full cache "
          f"{summary.full_nll:.4f} nats/token. dNLL = increase over the full cache; agree = top-1 agreement.")
    print(ev.quality_table(summary))
    print()
    if args.retrieval_trials:
        retrieval_line(args, runner, tokenizer, policy, squeeze, progress)
    print("\n".join(ev.claims(summary)))
    print("\n## The allocators the held-out evaluation recommends for this model (research/README.md), "
          "same window, vs uniform at equal KV held (negative = better)")
    print(ev.allocator_table(summary))
    print("(one window: indicative only; the full grid over several windows is `python -m research.quality`)")
    print(f"\ntotal run time {progress.elapsed():.0f} s")
    return 0


def retrieval_line(args, runner, tokenizer, policy, squeeze, progress):
    """Pass-key retrieval (research.tasks) at the prompt length, full vs the demo's squeezed
    cache vs the configuration recommended for retrieval at the same budget, through
    model.generate with a SqueezeCache: one line of exact-match counts."""
    progress(f"pass-key retrieval, {args.retrieval_trials} trials x 3 caches")
    trials = tasks.suite(tokenizer, ev.botchan_text(args.data_dir), [args.prompt_len], args.retrieval_trials,
                         tasks=[tasks.PassKey()], reserve=RETRIEVAL_TOKENS)
    stop = [runner.model.generation_config.eos_token_id]
    retrieval = recommended(args.budget, workload="retrieval")
    found = {}
    for name, (pol, settings) in (("full", (policy, None)), ("squeeze", (policy, squeeze)), ("retrieval", retrieval)):
        generate = tasks.squeeze_cache_generator(runner.model, pol, settings, RETRIEVAL_TOKENS)
        found[name] = sum(o.all_found for o in tasks.run(trials, generate, tokenizer, stop).outcomes)
    runner.model.set_attn_implementation("sdpa")
    depths = ", ".join(f"{t.meta['depth']:g}" for t in trials)
    print(f"## Retrieval: a 5-digit pass key hidden in Botchan, {args.prompt_len}-token prompts, key at depths "
          f"{depths}, exact match (research.tasks; `python -m research.tasks` for the suite)")
    print(f"found: full cache {found['full']}/{len(trials)}, squeeze ({policy.describe()}, b_init {args.budget:g}, "
          f"p {args.p:g}) {found['squeeze']}/{len(trials)}, recommended for retrieval ({retrieval[0].describe()}, "
          f"b_init {args.budget:g}, {type(retrieval[1].allocator).__name__}) {found['retrieval']}/{len(trials)}\n")


if __name__ == "__main__":
    sys.exit(main())
