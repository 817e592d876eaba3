"""Prefill benchmarks: prefill_attention (without scores, with H2O column scores, with a
SnapKV-style observation window) against SDPA-flash causal and an eager path that
materialises the probabilities, and compress_kv_ as a share of the prefill time.

pytest-benchmark (CPU): `pytest bench/bench_prefill.py --benchmark-only`.
GPU table: `python -m bench.bench_prefill` (bf16, Hq 32 / Hkv 8, D 128, T = 2k, 8k, 32k, batch
1 and a ragged batch); `--quick` runs tiny shapes, on CPU too.
"""
import argparse

import torch
import torch.nn.functional as F

import squeeze_ops
from bench.common import copy_bandwidth, empty_pool, environment, page_table, time_us, write_table
from squeeze_ops import reference
from squeeze_ops.triton_kernels import prefill_attention as triton_prefill


def packed(lengths, H, Hkv, D, dtype, device):
    T = sum(lengths)
    cu = torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    q, k, v = (torch.randn(T, h, D, device=device, dtype=dtype) for h in (H, Hkv, Hkv))
    return q, k, v, cu


def sequences(t, cu):
    """The [heads, n, D] slices of a packed [T, heads, D] tensor, one per sequence."""
    bounds = cu.tolist()
    return [t[a:b].transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:])]


def sdpa_causal(q, k, v, cu, scale):
    """PyTorch SDPA, causal, one call per sequence, K/V heads repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    return [F.scaled_dot_product_attention(qs[None], ks.repeat_interleave(group, 0)[None],
                                           vs.repeat_interleave(group, 0)[None], is_causal=True, scale=scale)
            for qs, ks, vs in zip(sequences(q, cu), sequences(k, cu), sequences(v, cu))]


def eager_with_scores(q, k, v, cu, scale):
    """Plain PyTorch attention with the probabilities materialised (fp32), and the H2O column
    scores as their sums over queries and the group's heads: the usual way to get them."""
    H, Hkv = q.shape[1], k.shape[1]
    outs, scores = [], []
    for qs, ks, vs in zip(sequences(q, cu), sequences(k, cu), sequences(v, cu)):
        n = qs.shape[1]
        logits = (qs @ ks.repeat_interleave(H // Hkv, 0).transpose(1, 2)).float() * scale
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        p = torch.softmax(logits.masked_fill_(causal, float("-inf")), -1)
        outs.append(p.to(q.dtype) @ vs.repeat_interleave(H // Hkv, 0))
        scores.append(p.sum(1).view(Hkv, H // Hkv, n).sum(1))
    return outs, scores


# ---- pytest-benchmark: CPU kernels vs plain PyTorch ----

CPU_SHAPE = dict(lengths=[384, 128], H=8, Hkv=2, D=64)


def cpu_inputs():
    s = CPU_SHAPE
    return packed(s["lengths"], s["H"], s["Hkv"], s["D"], torch.float32, "cpu")


def test_prefill_attention_cpu(benchmark):
    q, k, v, cu = cpu_inputs()
    benchmark(torch.ops.squeeze.prefill_attention, q, k, v, cu, 384, 0.125, -1)


def test_prefill_attention_cpu_sdpa(benchmark):
    q, k, v, cu = cpu_inputs()
    benchmark(sdpa_causal, q, k, v, cu, 0.125)


def test_prefill_attention_h2o_scores_cpu(benchmark):
    q, k, v, cu = cpu_inputs()
    benchmark(torch.ops.squeeze.prefill_attention, q, k, v, cu, 384, 0.125, 0)


def test_prefill_attention_h2o_scores_cpu_eager(benchmark):
    q, k, v, cu = cpu_inputs()
    benchmark(eager_with_scores, q, k, v, cu, 0.125)


def compress_inputs(lengths, Hkv, D, dtype, device, budget, page_size=16):
    """Packed prompt K/V of the given lengths, random column scores, budgets int32 [B, Hkv] and
    the layer's rows to compress into: [pool..., block_table, lens], each row owning
    ceil((budget + 1) / page_size) shuffled pages (its budget and the slot of a decode step)."""
    _, k, v, cu = packed(lengths, 1, Hkv, D, dtype, device)
    scores = torch.rand(k.shape[0], Hkv, device=device)
    budgets = torch.full((len(lengths), Hkv), budget, dtype=torch.int32, device=device)
    table, pages = page_table(budgets + 1, page_size, -(-(budget + 1) // page_size))
    rows = empty_pool(pages, page_size, D, dtype, device) + [table, torch.zeros_like(budgets)]
    return k, v, scores, cu, budgets, rows


def test_compress_kv_cpu(benchmark):
    k, v, scores, cu, budget, rows = compress_inputs([2048, 1024], 4, 64, torch.float32, "cpu", 512)
    benchmark(torch.ops.squeeze.compress_kv_, k, v, scores, cu, budget, "h2o", 4, 0.5, 1, "max", *rows)


def test_compress_kv_cpu_reference(benchmark):
    k, v, scores, cu, budget, rows = compress_inputs([2048, 1024], 4, 64, torch.float32, "cpu", 512)
    benchmark(reference.compress_kv_, k, v, scores, cu, budget, "h2o", 4, 0.5, 1, "max", *rows)


# ---- main: the GPU table ----

def attention_flops(lengths, H, D):
    """Causal attention FLOPs (q.k and p.v, half of the square): 2 * 2 * H * D * n^2 / 2 per
    sequence. The scored variants are rated on the same work."""
    return sum(2 * H * D * n * n for n in lengths)


def peak_bytes(fn, device):
    """Memory fn allocates beyond what was live before it (CUDA only)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def sdpa_flash_anchor(q, k, v, cu, lengths, scale):
    """SDPA with the FlashAttention backend, causal, no scores: dense SDPA for one sequence,
    FlashAttention-2 varlen (aten._flash_attention_forward) for a ragged batch. Where the
    build's kernel takes no GQA, the K/V heads are repeated beforehand (outside the timing)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = max(lengths)

    def make(kx, vx):
        if len(lengths) > 1:
            return lambda: torch.ops.aten._flash_attention_forward(q, kx, vx, cu, cu, n, n, 0.0, True, False,
                                                                   scale=scale)
        qd, kd, vd = (t.transpose(0, 1)[None] for t in (q, kx, vx))

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale,
                                                      enable_gqa=kd.shape[1] != qd.shape[1])

        return run

    fn = make(k, v)
    try:
        fn()
        return fn
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        return make(k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))


def attention_rows(lengths, label, H, Hkv, D, dtype, device, bandwidth):
    q, k, v, cu = packed(lengths, H, Hkv, D, dtype, device)
    scale, n_max = D**-0.5, max(lengths)
    cuda = torch.device(device).type == "cuda"
    providers = {
        "squeeze": lambda: torch.ops.squeeze.prefill_attention(q, k, v, cu, n_max, scale, -1),
        "squeeze + h2o scores": lambda: torch.ops.squeeze.prefill_attention(q, k, v, cu, n_max, scale, 0),
        "squeeze + window-64 scores": lambda: torch.ops.squeeze.prefill_attention(q, k, v, cu, n_max, scale, 64),
        ("sdpa-flash" if cuda else "sdpa"): (sdpa_flash_anchor(q, k, v, cu, lengths, scale) if cuda
                                             else lambda: sdpa_causal(q, k, v, cu, scale)),
        "eager + h2o scores": lambda: eager_with_scores(q, k, v, cu, scale),
    }
    if cuda and triton_prefill.block_pointers():
        # The key-tile addressing Triton 3.9 and later take (pointer tensors), timed beside the
        # block-pointer kernel that the op runs on this Triton.
        tiles = triton_prefill.tiles(device, D)
        providers["squeeze, pointer-tensor tiles"] = lambda: triton_prefill.launch(
            q, k, v, cu, n_max, scale, -1, *tiles, use_block_pointers=False)
    # The eager path holds the fp32 logits and probabilities of the longest sequence (and a
    # bf16 copy): past the free memory it is reported, not run.
    eager_bytes = 10 * H * n_max * n_max
    free = torch.cuda.mem_get_info()[0] if cuda else None
    flops = attention_flops(lengths, H, D)
    io_bytes = (2 * q.numel() + 2 * k.numel()) * q.element_size()  # q, k, v in, out back
    shape = f"{label} T={sum(lengths)} H{H}/{Hkv} D{D}"
    rows, times = [], {}
    for name, fn in providers.items():
        row = dict(shape=shape, dtype=str(dtype).replace("torch.", ""), provider=name)
        if name.startswith("eager") and free is not None and eager_bytes > 0.9 * free:
            row["time_us"] = f"out of memory (needs ~{eager_bytes / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free)"
            rows.append(row)
            continue
        med, _, _ = time_us(fn, device)
        times[name] = med
        peak = peak_bytes(fn, device)
        row.update(time_us=med, TFLOPs=flops / med * 1e-6, GBs=io_bytes / med * 1e-3,
                   copy_pct=100 * io_bytes / (med * 1e-6) / bandwidth)
        if peak is not None:
            row["peak_MiB"] = peak / 2**20
        rows.append(row)
    anchor = "sdpa-flash" if cuda else "sdpa"
    for row in rows:
        if row["provider"] in times:
            row[f"vs_{anchor}"] = times[anchor] / times[row["provider"]]
            if "eager + h2o scores" in times:
                row["vs_eager"] = times["eager + h2o scores"] / times[row["provider"]]
    return rows, times


def compress_rows(B, n, Hkv, D, budget, dtype, device, bandwidth, prefill_us, layers):
    """compress_kv_ of one layer (B sequences of n tokens to `budget`, into rows of 16-slot
    pages), and `layers` of them as a share of `layers` prefill attentions with H2O scores
    (prefill_us each). h2o also with SnapKV's max-pooled scores (pool 7)."""
    k, v, scores, cu, budgets, rows = compress_inputs([n] * B, Hkv, D, dtype, device, budget)
    out = []
    for policy, pool_size in (("window", 1), ("streaming", 1), ("h2o", 1), ("h2o", 7)):
        med, _, _ = time_us(lambda: torch.ops.squeeze.compress_kv_(k, v, scores, cu, budgets, policy, 4, 0.5,
                                                                   pool_size, "max", *rows), device)
        kept = B * Hkv * min(n, budget)
        io_bytes = 2 * 2 * kept * D * k.element_size() + k.shape[0] * Hkv * 4
        name = f"compress_kv {policy}" + (f" pool {pool_size}" if pool_size > 1 else "")
        out.append(dict(shape=f"compress B{B} x {n} Hkv{Hkv} D{D} -> {budget}, pages of 16",
                        dtype=str(dtype).replace("torch.", ""), provider=name, time_us=med,
                        GBs=io_bytes / med * 1e-3, copy_pct=100 * io_bytes / (med * 1e-6) / bandwidth,
                        prefill_pct=f"{100 * med / prefill_us:.2f}% of prefill ({layers} layers: "
                                    f"{layers * med / 1e3:.2f} ms vs {layers * prefill_us / 1e3:.1f} ms)"))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (runs on CPU too)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick or device == "cpu":
        H, Hkv, D, dtype, lengths_set = 4, 2, 64, torch.float32 if device == "cpu" else torch.bfloat16, [64, 256]
        compress_shape = dict(B=2, n=256, budget=64, layers=32)
    else:
        H, Hkv, D, dtype, lengths_set = 32, 8, 128, torch.bfloat16, [2048, 8192, 32768]
        compress_shape = dict(B=8, n=8192, budget=2048, layers=32)
    bandwidth = copy_bandwidth(device)
    rows = []
    for T in lengths_set:
        rows += attention_rows([T], "B1", H, Hkv, D, dtype, device, bandwidth)[0]
        ragged = [T, T // 2, T // 4, 3 * T // 4 + 1]
        rows += attention_rows(ragged, f"ragged B4 (max {T})", H, Hkv, D, dtype, device, bandwidth)[0]
    c = compress_shape
    _, times = attention_rows([c["n"]] * c["B"], f"B{c['B']}", H, Hkv, D, dtype, device, bandwidth)
    rows += compress_rows(c["B"], c["n"], Hkv, D, c["budget"], dtype, device, bandwidth,
                          times["squeeze + h2o scores"], c["layers"])
    anchor = "sdpa-flash" if device == "cuda" else "sdpa"
    columns = ["shape", "dtype", "provider", "time_us", "TFLOPs", "peak_MiB", "GBs", "copy_pct", f"vs_{anchor}",
               "vs_eager", "prefill_pct"]
    note = (f"TFLOPs: causal attention work 2*H*D*n^2 per sequence, for every provider (the scored ones do more). "
            f"GBs / copy_pct: q, k, v read and out written, against the copy bandwidth of this run "
            f"({bandwidth / 1e9:.0f} GB/s). peak_MiB: memory allocated beyond the inputs. "
            f"sdpa-flash: dense SDPA (FlashAttention backend, GQA) for B1, aten._flash_attention_forward "
            f"(FlashAttention-2 varlen) for ragged batches. compress rows: one layer; prefill_pct relates it to "
            f"the prefill attention with H2O scores of the same batch; the kept rows are written into shuffled pages "
            f"of 16 slots (each row owns ceil((budget + 1) / 16)).")
    name = "bench_prefill_quick" if args.quick or device == "cpu" else "bench_prefill"
    print(write_table(name, rows, columns, environment(device), note))


if __name__ == "__main__":
    main()
