"""KV memory of squeezed caches in the page pool, with real plans: SmolLM2-135M on the CPU over a
ragged workload of distinct prompts, admitted, decoded and retired through the engine.

    python -m bench.bench_memory [--prompts 12] [--threads 2]      (CPU; writes results/memory.md)

Workload: N prompts (default 12) of lengths U[256, 4096] (seeded), consecutive disjoint windows of
Botchan, 64 new tokens each: admitted for 63 decode steps after the prefill's token, so every row's
horizon is prompt + 63 (the 64th new token never enters the cache). The prompts are prefilled once,
in groups of 4, with every signal the rows' allocators read (H2O's scores, the last 32 queries'
attention, both policies' perturbation curves), so one prefill serves every row.

Rows: policy (h2o, streaming) x settings: the full cache (None); uniform at 20% and 30%
(SqueezeSettings.uniform); the recommended allocator at 20% and 30% (presets.recommended_allocator:
for streaming at 30% the per-KV-head CalibratedHeads); SqueezeAttention's faithful Squeeze(p=0.5)
at 20% and 30%; x page size 16 (and 1, 64). One PagePool per page size (sized to the workload's
paged full cache), one SqueezeKVCache per policy over it: the groups are admitted from their
records (SqueezeKVCache.admit), measured (MemoryReport), at page size 16 decoded for a few steps
(--decode-steps, greedy; the pages must not change and every row must hold min(budget, prompt +
steps) after them), then retired.

Columns, from MemoryReport: mean budget = slots_budget / rows (rows = sequences x L x Hkv); held =
the K+V of the rows' budgets (slots_budget); allocated = pages x page size (kv_allocated); the bound
1 + S / mean budget that allocated / held cannot pass (a row owns ceil((budget + 1) / S) pages);
the paged full cache of the same sequences (paged_full) and the padded layout of the old cache
(padded: per layer every row padded to the layer's largest budget + 1, per-head plans at the
layer's largest head). Sizes at the model's dtype (fp32 on the CPU; half of it in bf16).

Prefill peak (MemoryReport.prefill_peak), one group under h2o at uniform 30%: the reservation path
(LlamaRunner.start into a cache: rows staged at the allocator's cap, one layer's prompt K/V alive)
against the record path (LlamaRunner.prefill without a reservation, then SqueezeKVCache.admit).
"""
import argparse
import os
import sys
import time

import torch

import squeeze_ops  # noqa: F401  (registers torch.ops.squeeze.*)
from bench.common import environment, save_markdown
from squeeze_ops.engine.cache import SqueezeKVCache
from squeeze_ops.engine.policies import SequencePolicy, SqueezeSettings, prefill_needs
from squeeze_ops.engine.pool import PagePool
from squeeze_ops.engine.presets import recommended_allocator

MIB = 1 << 20
DECODE_PAGE_SIZE = 16  # the page size whose rows are decoded (the others only admitted)
POLICIES = {"h2o": SequencePolicy.h2o(), "streaming": SequencePolicy.streaming(4)}
COLUMNS = ["policy", "settings", "page", "mean_budget", "held_MiB", "allocated_MiB", "alloc/held", "bound",
           "paged_full_MiB", "alloc_vs_full", "padded_MiB", "padded/alloc", "allocator"]


def table_settings(policy):
    """(label, SqueezeSettings or None) of the table's rows under `policy` (a policy name)."""
    rows = [("full", None)]
    for f in (0.2, 0.3):
        rows += [(f"uniform {f:.0%}", SqueezeSettings.uniform(b_init=f)),
                 (f"recommended {f:.0%}", SqueezeSettings(b_init=f, allocator=recommended_allocator(policy, f))),
                 (f"squeeze p0.5 {f:.0%}", SqueezeSettings.squeeze(b_init=f, p=0.5))]
    return rows


def workload(tokens, count, low, high, seed=0):
    """`count` prompts (int64 1-D tensors) of lengths U[low, high], consecutive disjoint windows
    of the token ids `tokens`."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    if sum(lengths) > len(tokens):
        raise ValueError(f"workload: {sum(lengths)} tokens asked, the text has {len(tokens)}")
    starts = [sum(lengths[:i]) for i in range(count)]
    return [tokens[s : s + n] for s, n in zip(starts, lengths)]


def prefill_groups(runner, prompts, needs, group):
    """The prompts prefilled `group` at a time (no reservation: the records keep every layer, so
    each can be admitted under any settings). Returns [(record, first-token logits [b, V])]."""
    return [runner.prefill(prompts[i : i + group], needs) for i in range(0, len(prompts), group)]


def full_pool(runner, prompts, steps, page_size):
    """A PagePool holding the paged full cache of the prompts (every row prompt + steps slots)."""
    rows = runner.num_layers * runner.num_kv_heads
    pages = sum(rows * -(-(len(p) + steps) // page_size) for p in prompts)
    return PagePool(pages, page_size, runner.head_dim, runner.dtype, runner.device)


def admit(runner, pool, policy, records, settings, steps):
    """A SqueezeKVCache over `pool` with every record's prompts admitted under `settings`."""
    cache = SqueezeKVCache(pool, runner.num_layers, runner.num_kv_heads, policy)
    for record, _ in records:
        cache.admit(record, settings, steps)
    return cache


def decode_some(runner, cache, records, steps):
    """The admitted sequences decoded greedily for `steps` steps (from the prefills' logits).
    Raises unless the pages stayed as they were and every row holds min(budget, prompt + steps)."""
    before = cache.memory()
    runner.greedy(cache, torch.cat([logits for _, logits in records]), steps + 1)
    after = cache.memory()
    prompts = torch.tensor([n for record, _ in records for n in record.prompt_lens])
    budgets = cache.budgets.cpu().view(cache.batch, cache.num_layers, -1).expand(-1, -1, cache.num_kv_heads)
    held = int(torch.minimum(budgets, (prompts + steps).view(-1, 1, 1)).sum())
    if after.pages != before.pages or after.slots_held != held:
        raise RuntimeError(f"decoding: pages {before.pages} -> {after.pages}, {after.slots_held} slots held, "
                           f"{held} expected")


def memory_row(report, rows, page_size):
    """The table's numbers of one MemoryReport of `rows` (sequence, layer, KV head) rows."""
    slot_bytes = report.kv_allocated / max(report.slots_allocated, 1)
    mean = report.slots_budget / rows
    return dict(page=page_size, mean_budget=mean, held_MiB=report.slots_budget * slot_bytes / MIB,
                allocated_MiB=report.kv_allocated / MIB, **{"alloc/held": report.slots_allocated / report.slots_budget},
                bound=1 + page_size / mean, paged_full_MiB=report.paged_full / MIB,
                alloc_vs_full=f"{100 * report.kv_allocated / report.paged_full:.1f}%", padded_MiB=report.padded / MIB,
                **{"padded/alloc": report.padded / report.kv_allocated})


def run_table(runner, records, prompts, steps, page_sizes, decode_page_size, decode_steps, settings_of, log=print):
    """Rows of every policy x settings x page size (see the module docstring): sequences admitted
    for `steps` decode steps, at decode_page_size decoded for decode_steps of them (decode_some);
    settings_of(policy name) gives the (label, settings) list. Each cache is retired before the
    next one."""
    out, rows = [], len(prompts) * runner.num_layers * runner.num_kv_heads
    for page_size in page_sizes:
        pool = full_pool(runner, prompts, steps, page_size)
        for name, policy in POLICIES.items():
            for label, settings in settings_of(name):
                cache = admit(runner, pool, policy, records, settings, steps)
                report = cache.memory()
                if page_size == decode_page_size:
                    decode_some(runner, cache, records, decode_steps)
                cache.retire(cache.ids)
                row = dict(policy=name, settings=label, allocator="-" if settings is None else settings.describe(),
                           **memory_row(report, rows, page_size))
                out.append(row)
                log(f"  page {page_size:2d} {name:9s} {label:18s} held {row['held_MiB']:8.1f} MiB, allocated "
                    f"{row['allocated_MiB']:8.1f} MiB (x{row['alloc/held']:.3f}, bound {row['bound']:.3f}), "
                    f"{row['alloc_vs_full']} of full, padded {row['padded_MiB']:.1f} MiB")
        del pool
    return out


def prefill_peaks(runner, prompts, policy, settings, steps):
    """The prefill peak of one batch by both paths, each into a cache whose pool holds the
    batch's reservation (LlamaRunner.new_cache). Returns [(path, MemoryReport.prefill_peak,
    the peak counted here, KV allocated after admission)]: the reservation path as
    LlamaRunner.start runs it (reserve, prefill into the reservation, admit), its peak counted
    as the rows at their staging budgets + the largest layer's prompt K/V + what the record
    keeps; the record path (prefill, then admit), its peak the record + the admitted rows."""
    lens = [len(p) for p in prompts]
    needs = prefill_needs(policy, settings)
    cache = runner.new_cache(prompts, policy, settings, steps)
    reserved = cache.reserve(lens, settings, steps)
    record, _ = runner.prefill(prompts, needs, reserved)
    staged = cache.pool.kv_bytes(sum(map(len, reserved.pages.values()))) + reserved.transient + record.nbytes
    cache.admit(record, settings, steps)
    via_reservation = cache.memory()
    cache = runner.new_cache(prompts, policy, settings, steps)
    record, _ = runner.prefill(prompts, needs)
    kept = record.nbytes
    cache.admit(record, settings, steps)
    via_record = cache.memory()
    return [("reservation (LlamaRunner.start)", via_reservation.prefill_peak, staged, via_reservation.kv_allocated),
            (f"record (prefill, then admit; the record holds {kept / MIB:.1f} MiB)", via_record.prefill_peak,
             kept + via_record.kv_allocated, via_record.kv_allocated)]


def markdown(rows, peaks, env, command, seconds, prompts, load, steps, decode_steps):
    """The results page: what was run, the memory table, the prefill peaks (prefill_peaks);
    load: the 1-minute load averages at the start and the end of the run; steps, decode_steps:
    the decode steps admitted and those decoded at page size 16."""
    lengths = sorted(len(p) for p in prompts)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["# memory", "", ", ".join(f"{k}: {v}" for k, v in env.items()), "",
             f"Command: `{command}` ({seconds / 60:.1f} min on this machine; 1-minute load average {load[0]:.1f} at "
             f"the start, {load[1]:.1f} at the end). SmolLM2-135M-Instruct (30 layers, 9 / 3 "
             f"heads, D 64, fp32) on the CPU; {len(prompts)} Botchan windows of {lengths} tokens "
             f"(mean {sum(lengths) / len(lengths):.0f}), admitted for {steps + 1} new tokens each ({steps} decode "
             f"steps); at page 16 every row decoded {decode_steps} of them, the pages unchanged and each row "
             f"holding min(budget, prompt + {decode_steps}) after them. held = K+V of the rows' budgets; "
             "allocated = pages x page size; bound = 1 + S / mean budget; alloc_vs_full = allocated / the paged full "
             "cache of the same sequences; padded = the padded layout's allocation (per layer every row at the "
             "layer's largest budget + 1, per-head plans at the layer's largest head).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "Prefill peak, the first group under h2o at uniform 30%, each path into a cache whose pool holds "
              "the group's reservation. reported = MemoryReport.prefill_peak; counted = the same bytes counted here "
              "(reservation: the rows at their staging budgets + the largest layer's prompt K/V and scores + what "
              "the record keeps; record: the record + the admitted rows).", "",
              "| path | reported_MiB | counted_MiB | allocated after admission MiB |", "|---|---|---|---|"]
    lines += [f"| {path} | {reported / MIB:.1f} | {counted / MIB:.1f} | {allocated / MIB:.1f} |"
              for path, reported, counted, allocated in peaks]
    lines += ["", f"Peak counted, reservation / record: {peaks[0][2] / peaks[1][2]:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--lengths", type=int, nargs=2, default=(256, 4096), help="prompt lengths, uniform in [a, b]")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--group", type=int, default=4, help="prompts per prefill (and admission)")
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[16, 1, 64])
    parser.add_argument("--decode-steps", type=int, default=8, help="steps decoded at page size 16 (the check)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    start, load = time.monotonic(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    from research import evaluation  # the model and the text (research/ is not installed: run from the root)

    runner, tokenizer, _ = evaluation.load_smollm2("cpu")
    steps = args.new_tokens - 1
    prompts = workload(evaluation.tokenize(tokenizer, evaluation.botchan_text()), args.prompts, *args.lengths)
    needs = None
    for name, policy in POLICIES.items():
        n = prefill_needs(policy, [s for _, s in table_settings(name)])
        needs = n if needs is None else needs.union(n)
    print(f"{len(prompts)} prompts, {sum(map(len, prompts))} tokens; prefill recording {needs}", flush=True)
    records = prefill_groups(runner, prompts, needs, args.group)
    print(f"prefilled after {time.monotonic() - start:.0f} s", flush=True)
    rows = run_table(runner, records, prompts, steps, args.page_sizes, DECODE_PAGE_SIZE, args.decode_steps,
                     table_settings)
    del records
    print(f"table after {time.monotonic() - start:.0f} s; prefill peaks", flush=True)
    peaks = prefill_peaks(runner, prompts[: args.group], POLICIES["h2o"], SqueezeSettings.uniform(b_init=0.3), steps)
    env = environment("cpu")
    env["device"] = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    env["transformers"] = sys.modules["transformers"].__version__
    command = "python -m bench.bench_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, peaks, env, command.strip(), time.monotonic() - start, prompts, (load, os.getloadavg()[0]),
                    steps, args.decode_steps)
    print(save_markdown("memory", text))


if __name__ == "__main__":
    main()
