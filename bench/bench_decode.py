"""Decode-path benchmarks: decode_attention (with and without H2O scores) and the whole
decode_step_ against the anchors of the same run.

pytest-benchmark (CPU): the C++ kernels against their plain-PyTorch equivalents at a small size.
`python -m bench.bench_decode` (GPU): the table of the decode issue. Anchors, all in the same run:
  sdpa_flash   F.scaled_dot_product_attention, FlashAttention backend, dense, padded to the longest
  fa2_varlen   torch.ops.aten._flash_attention_forward with cu_seqlens over the packed ragged K/V
  torch        plain PyTorch (matmul, masked softmax, matmul) over the padded cache
  torch_scores the same plus the H2O score accumulation done the plain way
Lengths are equal (= L) or ragged U[L/4, L]. Bytes = the K+V the sequences actually hold (sum of
lens x Hkv x D x 2 x dtype size), the same for every provider, so TB/s compare like times. Short
caches (L <= 1024) are timed under CUDA graphs (launch cost would dominate otherwise).
`--quick` runs tiny shapes on the CPU (C++ kernels, no flash anchors) to keep main() working.
"""
import argparse

import torch
import torch.nn.functional as F

import squeeze_ops  # noqa: F401  (registers torch.ops.squeeze.*)
from bench.common import copy_bandwidth, environment, time_us, write_table

# ---- plain-PyTorch equivalents ----


def torch_decode_attention(q, k_cache, v_cache, lens, scale, scores=None):
    """Masked matmul-softmax-matmul over the padded cache; scores accumulated the plain way."""
    B, H, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    qg = q.view(B, Hkv, H // Hkv, D)
    logits = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * scale  # [B, Hkv, G, C]
    valid = torch.arange(C, device=q.device)[None, :] < lens[:, None].long()
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    if scores is not None:
        scores += p.sum(2)
    return torch.matmul(p.to(v_cache.dtype), v_cache).view(B, H, D)


# ---- pytest-benchmark: CPU kernels vs plain PyTorch ----

CPU_SHAPE = dict(B=4, H=8, Hkv=2, C=512, D=64)


def cpu_case(dtype=torch.float32):
    B, H, Hkv, C, D = CPU_SHAPE.values()
    q = torch.randn(B, H, D, dtype=dtype)
    k, v = (torch.randn(B, Hkv, C, D, dtype=dtype) for _ in range(2))
    lens = torch.randint(C // 4, C, (B,), dtype=torch.int32)
    return q, k, v, lens, torch.zeros(B, Hkv, C)


def test_cpu_decode_attention_kernel(benchmark):
    q, k, v, lens, scores = cpu_case()
    benchmark(torch.ops.squeeze.decode_attention, q, k, v, lens, 0.125, scores)


def test_cpu_decode_attention_plain_torch(benchmark):
    q, k, v, lens, scores = cpu_case()
    benchmark(torch_decode_attention, q, k, v, lens, 0.125, scores)


def test_cpu_decode_step_kernel(benchmark):
    """The whole step (append, attention, scores, one eviction) in the steady state lens = budget."""
    q, k, v, lens, scores = cpu_case()
    B, H, Hkv, C, D = CPU_SHAPE.values()
    slot_pos = torch.arange(C, dtype=torch.int32).expand(B, Hkv, C).contiguous()
    lens.fill_(C - 1)
    k_new, v_new = torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
    pos = torch.full((B,), C, dtype=torch.int32)
    budget = lens.clone()
    benchmark(torch.ops.squeeze.decode_step_, q, k_new, v_new, pos, k, v, lens, slot_pos, scores, budget, 0.125,
              "h2o", 4, 0.5, True)


# ---- main(): the GPU table ----

GPU_SHAPES = [  # (B, L, H, Hkv, D)
    (16, 16384, 32, 8, 128), (16, 16384, 32, 32, 128),
    (64, 4096, 32, 8, 128), (64, 4096, 32, 32, 128),
    (128, 256, 32, 8, 128), (128, 512, 32, 8, 128), (128, 1024, 32, 8, 128),
    (128, 256, 32, 32, 128), (128, 512, 32, 32, 128), (128, 1024, 32, 32, 128),
    (1, 8192, 9, 3, 64), (64, 1024, 9, 3, 64), (256, 256, 9, 3, 64),
]
QUICK_SHAPES = [(2, 64, 4, 2, 64), (3, 40, 9, 3, 64)]


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


def providers(q, k, v, lens, scale, L, device):
    """name -> zero-argument callable, for every provider that runs on this device."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    scores = torch.zeros(k.shape[:3], device=device)
    fns = {
        "squeeze": lambda: torch.ops.squeeze.decode_attention(q, k, v, lens, scale, None),
        "squeeze_scores": lambda: torch.ops.squeeze.decode_attention(q, k, v, lens, scale, scores),
        "torch": lambda: torch_decode_attention(q, k, v, lens, scale),
        "torch_scores": lambda: torch_decode_attention(q, k, v, lens, scale, scores),
    }
    q4 = q.view(B, H, 1, D)
    if device == "cuda":
        fns["sdpa_flash"] = sdpa_flash(q4, k, v, scale)
        lens64 = lens.long()
        valid = torch.arange(L, device=device)[None, :] < lens64[:, None]  # packed K/V, [total, Hkv, D]
        k_packed = k.transpose(1, 2)[valid].contiguous()
        v_packed = v.transpose(1, 2)[valid].contiguous()
        cu_k = torch.nn.functional.pad(lens64.cumsum(0), (1, 0)).int()
        cu_q = torch.arange(B + 1, dtype=torch.int32, device=device)
        max_k = int(lens.max())
        fns["fa2_varlen"] = lambda: torch.ops.aten._flash_attention_forward(
            q, k_packed, v_packed, cu_q, cu_k, 1, max_k, 0.0, False, False, scale=scale)[0]
    else:
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=Hkv != H)
    return fns


def step_provider(q, k, v, lens, scale, device):
    """The whole decode_step_ (append + attention + H2O scores + one eviction) in its steady state:
    capacity L + 1, budget = lens, so every call appends one token and evicts one."""
    B, H, D = q.shape
    _, Hkv, L, _ = k.shape
    kc = torch.cat([k, k[:, :, :1]], dim=2)
    vc = torch.cat([v, v[:, :, :1]], dim=2)
    slot_pos = torch.arange(L + 1, dtype=torch.int32, device=device).expand(B, Hkv, L + 1).contiguous()
    slot_pos.masked_fill_(slot_pos >= lens[:, None, None], -1)
    scores = torch.zeros(B, Hkv, L + 1, device=device)
    k_new, v_new = torch.randn_like(kc[:, :, 0]), torch.randn_like(vc[:, :, 0])
    pos = torch.full((B,), 1 << 20, dtype=torch.int32, device=device)
    budget, lens = lens.clone(), lens.clone()
    return lambda: torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, kc, vc, lens, slot_pos, scores, budget, scale,
                                                  "h2o", 4, 0.5, True)


def run_table(shapes, device, dtype):
    bandwidth = copy_bandwidth(device)
    rows = []
    for B, L, H, Hkv, D in shapes:
        for ragged in (False, True):
            q = torch.randn(B, H, D, dtype=dtype, device=device)
            k, v = (torch.randn(B, Hkv, L, D, dtype=dtype, device=device) for _ in range(2))
            lens = (torch.randint(L // 4, L + 1, (B,), device=device) if ragged
                    else torch.full((B,), L, device=device)).int()
            scale = D**-0.5
            nbytes = int(lens.sum()) * Hkv * D * 2 * k.element_size()
            graphs = device == "cuda" and L <= 1024
            fns = providers(q, k, v, lens, scale, L, device)
            fns["squeeze_step"] = step_provider(q, k, v, lens, scale, device)
            times = {name: time_us(fn, device, cuda_graph=graphs)[0] for name, fn in fns.items()}
            base = dict(shape=f"B{B} L{L} H{H}/{Hkv} D{D}", lens="U[L/4,L]" if ragged else "=L",
                        dtype=str(dtype).removeprefix("torch."), graphs="yes" if graphs else "no")
            for name, t in times.items():
                row = dict(base, provider=name, time_us=t, kv_MB=nbytes / 1e6, TBps=nbytes / t / 1e6,
                           pct_copy=100 * nbytes / (t * 1e-6) / bandwidth)
                if name == "squeeze":
                    for anchor in ("sdpa_flash", "fa2_varlen", "sdpa", "torch", "torch_scores"):
                        if anchor in times:
                            row[f"x_{anchor}"] = times[anchor] / t
                if name == "squeeze_scores":
                    row["scores_cost"] = t / times["squeeze"]
                if name == "squeeze_step":
                    row["step_vs_attn"] = t / times["squeeze_scores"]
                rows.append(row)
            print(f"{base['shape']} {base['lens']}: " + ", ".join(f"{n} {t:.1f}us" for n, t in times.items()),
                  flush=True)
    return rows, bandwidth


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = parser.parse_args(argv)
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows, bandwidth = run_table(QUICK_SHAPES if args.quick else GPU_SHAPES, device, dtype)
    columns = ["shape", "lens", "dtype", "graphs", "provider", "time_us", "kv_MB", "TBps", "pct_copy",
               "x_sdpa_flash", "x_fa2_varlen", "x_sdpa", "x_torch", "x_torch_scores", "scores_cost", "step_vs_attn"]
    note = (f"Copy bandwidth of this run: {bandwidth / 1e12:.3f} TB/s (read + write). TBps counts the K+V the "
            "sequences hold; x_* = anchor time / squeeze time; scores_cost = squeeze_scores / squeeze; "
            "step_vs_attn = whole decode_step_ (append + attention + scores + eviction) / squeeze_scores.")
    if SDPA_EXPANDED:
        note += (" SDPA-flash refused enable_gqa here: it ran over K/V expanded to every query head for cache "
                 f"shapes {sorted(SDPA_EXPANDED)}.")
    print(write_table("decode_quick" if device == "cpu" else "decode", rows, columns, environment(device), note))


if __name__ == "__main__":
    main()
