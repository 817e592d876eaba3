"""Shared measurement helpers of the benchmarks: timing, the copy bandwidth of the same run,
and result tables (Markdown + JSON).

Each bench/bench_<op>.py has two faces: pytest-benchmark functions timing the CPU kernels
against their plain-PyTorch equivalents (`pytest bench/ --benchmark-only`; CI runs them once
with --benchmark-disable so they cannot rot), and a `main()` producing the GPU table
(`python -m bench.bench_<op>`), run by bench/device_check.sh on a lent GPU.
"""
import datetime
import json
import os
import platform
import statistics
import time

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_us(fn, device, *, cuda_graph=False, warmup=3, rep=20):
    """Median, p20 and p80 of fn() in microseconds.

    On CUDA: triton.testing.do_bench (L2 flushed between calls), or do_bench_cudagraph for
    microsecond kernels whose launch cost would otherwise dominate. On CPU: wall clock.
    """
    if torch.device(device).type == "cuda":
        import triton.testing as tt

        q = [0.5, 0.2, 0.8]
        if cuda_graph:
            med, p20, p80 = tt.do_bench_cudagraph(fn, quantiles=q)
        else:
            med, p20, p80 = tt.do_bench(fn, quantiles=q)
        return med * 1e3, p20 * 1e3, p80 * 1e3
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    ts.sort()
    return statistics.median(ts), ts[len(ts) // 5], ts[(4 * len(ts)) // 5]


def copy_bandwidth(device, nbytes=1 << 30):
    """Device-to-device copy bandwidth of this run in bytes/s, counting read + write.

    Every benchmark row reports its bandwidth as a percentage of this number.
    """
    if torch.device(device).type != "cuda":
        nbytes = min(nbytes, 1 << 28)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med, _, _ = time_us(lambda: dst.copy_(src), device)
    return nbytes / (med * 1e-6)


def environment(device):
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({os.cpu_count()} cores)"
    return env


def save_markdown(name, text, folder=None):
    """Write text as <folder>/<name>.md (default bench/results) and, when $OUT is set,
    $OUT/<name>.md. Returns text. Smoke runs (names ending in _quick) go to $OUT only: the
    results folders keep measured tables."""
    folder = folder or os.path.join(os.path.dirname(__file__), "results")
    dirs = [] if name.endswith("_quick") else [folder]
    dirs += [os.environ["OUT"]] if os.environ.get("OUT") else []
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{name}.md"), "w") as f:
            f.write(text)
    return text


def write_table(name, rows, columns, env, note=""):
    """Write rows (a list of dicts) as bench/results/<name>.md and, when $OUT is set, also
    $OUT/<name>.md and $OUT/<name>.json. Returns the Markdown text."""
    head = f"# {name}\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n"
    if note:
        head += note.strip() + "\n\n"
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = save_markdown(name, head + "\n".join(lines) + "\n")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"{name}.json"), "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return text



def page_table(slots, page_size, width, generator=None):
    """Block tables int32 [B, Hkv, width] of rows owning ceil(slots / page_size) pages each
    (slots int [B, Hkv]; at most width pages), the pool's page ids dealt in shuffled order (so
    consecutive slots of a row are scattered over the pool as in a long-running engine), -1 past
    a row's pages. Returns (table, the number of pages dealt)."""
    owned = torch.clamp(-(-slots.long() // page_size), max=width)
    pages = int(owned.sum())
    table = torch.full((*slots.shape, width), -1, dtype=torch.int32, device=slots.device)
    # Row-major order of the owned entries: row r takes the next owned[r] ids of the shuffle.
    table[torch.arange(width, device=slots.device) < owned[..., None]] = \
        torch.randperm(pages, generator=generator).to(device=slots.device, dtype=torch.int32)
    return table, pages


def empty_pool(num_pages, page_size, head_dim, dtype, device):
    """[k_pages, v_pages, pos_pages, score_pages] of empty pages (K/V 0, position -1, score 0)."""
    k = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)
    return [k, torch.zeros_like(k), torch.full((num_pages, page_size), -1, dtype=torch.int32, device=device),
            torch.zeros(num_pages, page_size, device=device)]


def paged_layer(k, v, lens, page_size=None, generator=None):
    """One layer's rows of a paged cache holding what the padded cache k, v [B, Hkv, L, D]
    holds (its first lens[b, g] slots, lens int32 [B, Hkv]), with room for one more token per
    row (a decode step's append).

    page_size None: the padded layout as the ops see it, one page of C = L + 1 slots per row
    (pages in row order). Else pages of page_size slots (page_table: shuffled), each row owning
    ceil((lens + 1) / page_size) of them (the engine's rule for a row at its budget). Slots hold
    positions 0 .. lens - 1 in order, score 0; the other slots position -1.
    Returns [k_pages, v_pages, pos_pages, score_pages, block_table] (the ops' argument order).
    """
    B, Hkv, L, D = k.shape
    device = k.device
    S = L + 1 if page_size is None else page_size
    if page_size is None:
        table, P = torch.arange(B * Hkv, dtype=torch.int32, device=device).view(B, Hkv, 1), B * Hkv
    else:
        table, P = page_table(lens + 1, S, -(-(L + 1) // S), generator)
    pool = empty_pool(P, S, D, k.dtype, device)
    slot = torch.arange(L, device=device)
    held = slot < lens.long()[..., None]  # [B, Hkv, L]
    flat = (table.long().gather(2, (slot // S).expand(B, Hkv, L)) * S + slot % S)[held]
    pool[0].view(P * S, D)[flat] = k[held]
    pool[1].view(P * S, D)[flat] = v[held]
    pool[2].view(-1)[flat] = slot.expand(B, Hkv, L)[held].int()
    return pool + [table]
