"""Decode-path benchmarks on the paged layout: decode_attention (with and without H2O scores)
and the whole decode_step_ against the anchors of the same run.

pytest-benchmark (CPU): the C++ kernels against their plain-PyTorch equivalents at a small size.
`python -m bench.bench_decode` (GPU): the decode table. Anchors, all in the same run:
  sdpa_flash   F.scaled_dot_product_attention, FlashAttention backend, dense, padded to the longest
  fa2_varlen   torch.ops.aten._flash_attention_forward with cu_seqlens over the packed ragged K/V
  torch        plain PyTorch (matmul, masked softmax, matmul) over the padded cache
  torch_scores the same plus the H2O score accumulation done the plain way
Squeeze rows, every layout holding the same K/V (bench.common.paged_layer):
  dense        one page of L + 1 slots per row (the padded layout as the paged ops see it)
  p16, p64     pages of 16 / 64 slots in shuffled order, ceil((lens + 1) / S) pages per row
  attn = decode_attention, attn+scores = with H2O score accumulation, step = decode_step_ in its
  steady state (h2o, budget = lens: every call appends one token, accumulates scores, evicts one).
Lengths equal (= L) or ragged U[L/4, L] per sequence. Bytes = the K+V the rows hold (sum of lens
x D x 2 x dtype size), the same for every provider, so TB/s compare like times. Short caches
(L <= 1024, H32 shapes) are timed under CUDA graphs (launch cost would dominate otherwise); the
SmolLM2 head shape (H 9 / Hkv 3 / D 64) eagerly, as a decode step of that model runs.
Targets (printed next to their rows, never asserted): paged step within 5% of the dense step at
page_size >= 16; ragged attn at >= 90% of the copy bandwidth; attn+scores <= 1.05x attn.
`--quick` runs tiny shapes on the CPU (C++ kernels, no flash anchors) to keep main() working;
`--time-limit` leaves out the shapes not started by then (each shape compiles its kernel variants).
"""
import argparse
import time

import torch
import torch.nn.functional as F

import squeeze_ops  # noqa: F401  (registers torch.ops.squeeze.*)
from bench.common import copy_bandwidth, environment, paged_layer, time_us, write_table

SINKS, RECENT_RATIO = 4, 0.5  # the h2o policy of every step row

# ---- plain-PyTorch equivalents over a padded cache [B, Hkv, C, D] ----


def torch_decode_attention(q, k_cache, v_cache, lens, scale, scores=None):
    """Masked matmul-softmax-matmul over the padded cache (lens int [B, Hkv]); with scores
    [B, Hkv, C], the H2O attention mass accumulated the plain way."""
    B, H, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    qg = q.view(B, Hkv, H // Hkv, D)
    logits = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * scale  # [B, Hkv, G, C]
    valid = torch.arange(C, device=q.device) < lens[..., None].long()  # [B, Hkv, C]
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    if scores is not None:
        scores += p.sum(2)
    return torch.matmul(p.to(v_cache.dtype), v_cache).view(B, H, D)


def torch_decode_step(q, k_new, v_new, pos, k_cache, v_cache, slot_pos, scores, lens, budget, scale,
                      sinks=SINKS, recent_ratio=RECENT_RATIO):
    """decode_step_ under h2o the plain way, over a padded cache [B, Hkv, C, D] (slot_pos int32
    and scores fp32 [B, Hkv, C]; lens, budget int32 [B, Hkv]): append the new token at slot lens,
    attend with score accumulation, then evict one token from every row over its budget (the
    steady state: at most one; rows are assumed to hold an evictable token). Mutates the cache."""
    B, Hkv, C, D = k_cache.shape
    at = lens.long()[..., None]  # [B, Hkv, 1]
    k_cache.scatter_(2, at[..., None].expand(B, Hkv, 1, D), k_new[:, :, None])
    v_cache.scatter_(2, at[..., None].expand(B, Hkv, 1, D), v_new[:, :, None])
    slot_pos.scatter_(2, at, pos.view(B, 1, 1).expand(B, Hkv, 1))
    scores.scatter_(2, at, 0.0)
    n = lens + 1
    out = torch_decode_attention(q, k_cache, v_cache, n, scale, scores)
    valid = torch.arange(C, device=q.device) < n[..., None]
    newest = torch.where(valid, slot_pos, -1).amax(-1, keepdim=True)
    recent = (budget.double() * recent_ratio).floor().int()[..., None]
    candidate = valid & (slot_pos >= sinks) & (slot_pos <= newest - recent)
    key = torch.where(candidate, scores, float("inf"))
    tied = candidate & (key == key.amin(-1, keepdim=True))
    victim = torch.where(tied, slot_pos, torch.iinfo(torch.int32).max).argmin(-1, keepdim=True)  # oldest of the lowest
    evict = n > budget
    last = (n - 1).long()[..., None]
    dst = torch.where(evict[..., None], victim, last)  # rows within budget move their last slot onto itself
    for t in (k_cache, v_cache):
        t.scatter_(2, dst[..., None].expand(B, Hkv, 1, D), t.gather(2, last[..., None].expand(B, Hkv, 1, D)))
    for t, empty in ((slot_pos, -1), (scores, 0.0)):
        t.scatter_(2, dst, t.gather(2, last))
        # The last slot of an evicting row is freed (the victim's, when the victim was the last).
        t.scatter_(2, last, torch.where(evict[..., None], empty, t.gather(2, last)))
    lens.copy_(n - evict.int())
    return out


# ---- pytest-benchmark: CPU kernels vs plain PyTorch ----

CPU_SHAPE = dict(B=4, H=8, Hkv=2, L=512, D=64)


def cpu_case(page_size=16, step=False):
    """(q, dense K/V [B, Hkv, L + 1, D], lens [B, Hkv], the paged layer) of the CPU benchmarks:
    ragged lens; for a step, lens L - 1 everywhere (appending one and evicting one each call)."""
    B, H, Hkv, L, D = CPU_SHAPE.values()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g)
    k, v = (torch.randn(B, Hkv, L + 1, D, generator=g) for _ in range(2))
    lens = (torch.full((B, Hkv), L - 1) if step else torch.randint(L // 4, L, (B, 1), generator=g).expand(B, Hkv))
    lens = lens.int().contiguous()
    return q, k, v, lens, paged_layer(k[:, :, :L], v[:, :, :L], lens, page_size, generator=g)


def step_inputs(q, lens):
    """The new token's K/V [B, Hkv, D], positions [B] and budgets (= lens) of a steady-state step."""
    B, Hkv = lens.shape
    D = q.shape[-1]
    return torch.randn(B, Hkv, D, dtype=q.dtype), torch.randn(B, Hkv, D, dtype=q.dtype), \
        torch.full((B,), 1 << 20, dtype=torch.int32), lens.clone()


def test_cpu_decode_attention_kernel(benchmark):
    q, _, _, lens, (kp, vp, _, sp, table) = cpu_case()
    benchmark(torch.ops.squeeze.decode_attention, q, kp, vp, table, lens, 0.125, sp)


def test_cpu_decode_attention_dense_kernel(benchmark):
    q, _, _, lens, (kp, vp, _, sp, table) = cpu_case(page_size=None)
    benchmark(torch.ops.squeeze.decode_attention, q, kp, vp, table, lens, 0.125, sp)


def test_cpu_decode_attention_plain_torch(benchmark):
    q, k, v, lens, _ = cpu_case()
    benchmark(torch_decode_attention, q, k, v, lens, 0.125, torch.zeros(k.shape[:3]))


def test_cpu_decode_step_kernel(benchmark):
    """The whole step (append, attention, scores, one eviction) in the steady state lens = budget."""
    q, _, _, lens, cache = cpu_case(step=True)
    k_new, v_new, pos, budget = step_inputs(q, lens)
    benchmark(torch.ops.squeeze.decode_step_, q, k_new, v_new, pos, *cache, lens, budget, 0.125, "h2o", SINKS,
              RECENT_RATIO, True)


def test_cpu_decode_step_plain_torch(benchmark):
    q, k, v, lens, _ = cpu_case(step=True)
    k_new, v_new, pos, budget = step_inputs(q, lens)
    slot_pos = torch.arange(k.shape[2], dtype=torch.int32).expand(k.shape[:3]).contiguous()
    slot_pos.masked_fill_(slot_pos >= lens[..., None], -1)
    benchmark(torch_decode_step, q, k_new, v_new, pos, k, v, slot_pos, torch.zeros(k.shape[:3]), lens, budget,
              0.125)


# ---- main(): the GPU table ----

GPU_SHAPES = [  # (B, L, H, Hkv, D, CUDA graphs, page sizes), in priority order (--time-limit cuts the tail)
    (64, 4096, 32, 8, 128, False, (16, 64)),
    (128, 1024, 32, 8, 128, True, (16, 64)),
    (128, 256, 32, 8, 128, True, (16, 64)),
    (16, 16384, 32, 8, 128, False, (16, 64)),
    (64, 1024, 9, 3, 64, False, (16,)),
    (256, 256, 9, 3, 64, False, (16,)),
    (1, 8192, 9, 3, 64, False, (16,)),
    (128, 512, 32, 32, 128, True, (16,)),
]
QUICK_SHAPES = [(2, 64, 4, 2, 64, False, (16, 64)), (3, 40, 9, 3, 64, False, (16,))]


def sdpa_flash(q4, k, v, scale):
    """SDPA pinned to the FlashAttention backend; GQA through enable_gqa where this torch's flash
    backend takes it, else over K/V expanded to every query head (said in the table's note)."""
    gqa = k.shape[1] != q4.shape[1]

    def run(kk=k, vv=v, enable_gqa=gqa):
        # A fresh context per call: sdpa_kernel's context manager can be entered only once.
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q4, kk, vv, scale=scale, enable_gqa=enable_gqa)

    try:
        run()
        return run
    except RuntimeError:
        G = q4.shape[1] // k.shape[1]
        k_all, v_all = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        SDPA_EXPANDED.add(tuple(k.shape))
        return lambda: run(k_all, v_all, False)


SDPA_EXPANDED = set()  # cache shapes for which SDPA-flash needed K/V expanded to the query heads


def anchors(q, k, v, lens, scale, device):
    """name -> zero-argument callable: the anchors over the padded cache k, v [B, Hkv, L, D]
    holding lens [B, Hkv] tokens (equal over a sequence's heads)."""
    B, H, D = q.shape
    scores = torch.zeros(k.shape[:3], device=device)
    fns = {
        "torch": lambda: torch_decode_attention(q, k, v, lens, scale),
        "torch_scores": lambda: torch_decode_attention(q, k, v, lens, scale, scores),
    }
    q4 = q.view(B, H, 1, D)
    if device == "cuda":
        fns["sdpa_flash"] = sdpa_flash(q4, k, v, scale)
        seq_lens = lens[:, 0].long()
        held = torch.arange(k.shape[2], device=device) < seq_lens[:, None]  # packed K/V, [total, Hkv, D]
        k_packed = k.transpose(1, 2)[held].contiguous()
        v_packed = v.transpose(1, 2)[held].contiguous()
        cu_k = F.pad(seq_lens.cumsum(0), (1, 0)).int()
        cu_q = torch.arange(B + 1, dtype=torch.int32, device=device)
        max_k = int(seq_lens.max())
        fns["fa2_varlen"] = lambda: torch.ops.aten._flash_attention_forward(
            q, k_packed, v_packed, cu_q, cu_k, 1, max_k, 0.0, False, False, scale=scale)[0]
    else:
        held = (torch.arange(k.shape[2]) < lens[..., None]).repeat_interleave(H // k.shape[1], 1)[:, :, None, :]
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(q4, k, v, attn_mask=held, scale=scale,
                                                             enable_gqa=k.shape[1] != H)
    return fns


def squeeze_providers(q, k, v, lens, scale, page_sizes, generator):
    """name -> zero-argument callable for the library's rows: every layout holds what k, v hold.
    The attention rows share one pool per layout (scores only add up); each step has its own."""
    B, Hkv, _, D = k.shape
    k_new, v_new = (torch.randn(B, Hkv, D, dtype=q.dtype, device=q.device) for _ in range(2))
    pos = torch.full((B,), 1 << 20, dtype=torch.int32, device=q.device)
    fns = {}
    for S in (None, *page_sizes):
        name = "dense" if S is None else f"p{S}"
        kp, vp, _, sp, table = paged_layer(k, v, lens, S, generator)
        fns[f"attn {name}"] = lambda kp=kp, vp=vp, table=table: torch.ops.squeeze.decode_attention(
            q, kp, vp, table, lens, scale, None)
        if S == page_sizes[0]:
            fns[f"attn+scores {name}"] = lambda kp=kp, vp=vp, sp=sp, table=table: torch.ops.squeeze.decode_attention(
                q, kp, vp, table, lens, scale, sp)
        cache, step_lens = paged_layer(k, v, lens, S, generator), lens.clone()
        fns[f"step {name}"] = lambda cache=cache, n=step_lens, budget=lens.clone(): torch.ops.squeeze.decode_step_(
            q, k_new, v_new, pos, *cache, n, budget, scale, "h2o", SINKS, RECENT_RATIO, True)
    return fns


def targets(times, ragged, pct_copy):
    """{provider: the target it is read against, met or not} (printed, never asserted)."""
    out = {}
    for name, t in times.items():
        kind, _, layout = name.partition(" ")
        if kind == "step" and layout != "dense":
            x = t / times["step dense"]
            out[name] = f"x{x:.3f} of step dense (<= 1.05: {'met' if x <= 1.05 else 'NOT met'})"
        elif kind == "attn+scores":
            x = t / times[f"attn {layout}"]
            out[name] = f"x{x:.3f} of attn (<= 1.05: {'met' if x <= 1.05 else 'NOT met'})"
        elif kind == "attn" and layout != "dense" and ragged:
            out[name] = f"{pct_copy[name]:.0f}% of copy (>= 90%: {'met' if pct_copy[name] >= 90 else 'NOT met'})"
    return out


def run_table(shapes, device, dtype, time_limit=None):
    """Rows of every shape (equal and ragged lens) until time_limit seconds have passed; returns
    (rows, copy bandwidth in bytes/s, the shapes left out)."""
    start = time.monotonic()
    bandwidth = copy_bandwidth(device)
    g = torch.Generator().manual_seed(0)
    rows, skipped = [], []
    for B, L, H, Hkv, D, graphs, page_sizes in shapes:
        if time_limit is not None and time.monotonic() - start > time_limit:
            skipped.append(f"B{B} L{L} H{H}/{Hkv} D{D}")
            continue
        graphs = graphs and device == "cuda"
        for ragged in (False, True):
            q = torch.randn(B, H, D, dtype=dtype, device=device)
            k, v = (torch.randn(B, Hkv, L, D, dtype=dtype, device=device) for _ in range(2))
            seq_lens = torch.randint(L // 4, L + 1, (B, 1), generator=g) if ragged else torch.full((B, 1), L)
            lens = seq_lens.expand(B, Hkv).int().contiguous().to(device)
            scale = D**-0.5
            nbytes = int(lens.sum()) * D * 2 * k.element_size()
            fns = {**anchors(q, k, v, lens, scale, device), **squeeze_providers(q, k, v, lens, scale, page_sizes, g)}
            times = {name: time_us(fn, device, cuda_graph=graphs)[0] for name, fn in fns.items()}
            pct = {name: 100 * nbytes / (t * 1e-6) / bandwidth for name, t in times.items()}
            marks = targets(times, ragged, pct)
            base = dict(shape=f"B{B} L{L} H{H}/{Hkv} D{D}", lens="U[L/4,L]" if ragged else "=L",
                        dtype=str(dtype).removeprefix("torch."), graphs="yes" if graphs else "no")
            for name, t in times.items():
                row = dict(base, provider=name, time_us=t, kv_MB=nbytes / 1e6, TBps=nbytes / t / 1e6,
                           pct_copy=pct[name], target=marks.get(name, ""))
                if name.startswith("attn ") or name.startswith("step "):
                    for anchor in ("sdpa_flash", "fa2_varlen", "sdpa", "torch", "torch_scores"):
                        if anchor in times:
                            row[f"x_{anchor}"] = times[anchor] / t
                rows.append(row)
            print(f"{base['shape']} {base['lens']}: " + ", ".join(f"{n} {t:.1f}us" for n, t in times.items()),
                  flush=True)
            del fns
    return rows, bandwidth, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--time-limit", type=float, help="seconds; the shapes not started by then are left out")
    args = parser.parse_args(argv)
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows, bandwidth, skipped = run_table(QUICK_SHAPES if args.quick else GPU_SHAPES, device, dtype, args.time_limit)
    columns = ["shape", "lens", "dtype", "graphs", "provider", "time_us", "kv_MB", "TBps", "pct_copy", "x_sdpa_flash",
               "x_fa2_varlen", "x_sdpa", "x_torch", "x_torch_scores", "target"]
    note = (f"Copy bandwidth of this run: {bandwidth / 1e12:.3f} TB/s (read + write). TBps counts the K+V the rows "
            "hold, the same for every provider; x_* = anchor time / squeeze time. Squeeze layouts hold the same K/V: "
            "dense = one page of L + 1 slots per row, pN = shuffled pages of N slots. step = decode_step_ (append + "
            "attention + H2O scores + one eviction) in its steady state.")
    if SDPA_EXPANDED:
        note += (" SDPA-flash refused enable_gqa here: it ran over K/V expanded to every query head for cache "
                 f"shapes {sorted(SDPA_EXPANDED)}.")
    if skipped:
        note += f" Left out by --time-limit: {', '.join(skipped)}."
    print(write_table("decode_quick" if device == "cpu" else "decode", rows, columns, environment(device), note))


if __name__ == "__main__":
    main()
