"""add_rmsnorm_cossim vs its plain-PyTorch equivalent (eager add + RMSNorm + cosine + per-sequence
index_add) and vs the same kernel with the similarity switched off.

GPU rows: `squeeze*` launch the Triton kernel directly (what a captured CUDA graph replays; the
targets are read on these); `op *` call the public ops, torch.ops dispatch and argument checks
included (what an eager caller pays: where that host work outlasts the kernel, the op row shows it).

CPU: `pytest bench/bench_add_rmsnorm_cossim.py --benchmark-only`.
GPU table: `python -m bench.bench_add_rmsnorm_cossim` (--quick: small shapes, also on CPU).
Targets (H100/H200, [8192, 4096] bf16): >= 85% of the copy bandwidth, within 3% of no-similarity.
"""
import argparse

import torch

import squeeze_ops
from bench.common import copy_bandwidth, environment, time_us, write_table

EPS = 1e-6


def make_inputs(T, d, B, dtype, device):
    cu = torch.linspace(0, T, B + 1).round().to(torch.int32).to(device)
    residual = torch.randn(T, d, device=device).to(dtype)
    attn_out = torch.randn(T, d, device=device).to(dtype)
    weight = torch.ones(d, device=device, dtype=dtype)
    cos_sum = torch.zeros(B, device=device)
    return residual, attn_out, weight, cu, cos_sum


def eager_epilogue(residual, attn_out, weight, seq_ids, cos_sum, eps):
    """What an engine does without the fused op: the add, a cosine over the residual copies,
    a scatter into the per-sequence sums, then the RMSNorm."""
    old = residual.to(torch.float32, copy=True)
    residual.add_(attn_out)
    new = residual.float()
    cos_sum.index_add_(0, seq_ids, torch.nn.functional.cosine_similarity(old, new, dim=-1, eps=1e-8))
    rstd = torch.rsqrt(new.pow(2).mean(-1, keepdim=True) + eps)
    return (new * rstd * weight.float()).to(residual.dtype)


def seq_ids_of(cu, T):
    return torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu.diff(), output_size=T)


# ---- pytest-benchmark (CPU kernel vs plain PyTorch) ----

CPU_SHAPE = dict(T=512, d=1024, B=4, dtype=torch.float32, device="cpu")


def test_cpu_add_rmsnorm_cossim(benchmark):
    residual, attn_out, weight, cu, cos_sum = make_inputs(**CPU_SHAPE)
    out = benchmark(squeeze_ops.add_rmsnorm_cossim, residual, attn_out, weight, cu, cos_sum, EPS)
    assert out.shape == residual.shape


def test_cpu_add_cossim(benchmark):
    residual, attn_out, _, cu, cos_sum = make_inputs(**CPU_SHAPE)
    benchmark(squeeze_ops.add_cossim, residual, attn_out, cu, cos_sum)


def test_cpu_eager_composite(benchmark):
    residual, attn_out, weight, cu, cos_sum = make_inputs(**CPU_SHAPE)
    seq_ids = seq_ids_of(cu, residual.shape[0])
    out = benchmark(eager_epilogue, residual, attn_out, weight, seq_ids, cos_sum, EPS)
    assert out.shape == residual.shape


# ---- GPU table ----

def providers(device):
    """name -> fn(residual, attn_out, weight, cu, cos_sum, seq_ids)."""
    eager = lambda r, a, w, cu, cs, ids: eager_epilogue(r, a, w, ids, cs, EPS)  # noqa: E731
    if device == "cpu":
        return {"cpu kernel": lambda r, a, w, cu, cs, ids: squeeze_ops.add_rmsnorm_cossim(r, a, w, cu, cs, EPS),
                "eager": eager}
    from squeeze_ops.triton_kernels.add_rmsnorm_cossim import launch

    def kernel(norm, cossim):
        def run(r, a, w, cu, cs, ids):
            out = torch.empty_like(r) if norm else None
            launch(r, a, w if norm else None, cu, cs, EPS, out, cossim=cossim)
            return out
        return run

    return {"squeeze": kernel(True, True), "squeeze no-sim": kernel(True, False),
            "squeeze add_cossim": kernel(False, True),
            "op add_rmsnorm_cossim": lambda r, a, w, cu, cs, ids: squeeze_ops.add_rmsnorm_cossim(r, a, w, cu, cs, EPS),
            "op add_cossim": lambda r, a, w, cu, cs, ids: squeeze_ops.add_cossim(r, a, cu, cs),
            "eager": eager}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes (works on CPU)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick or device == "cpu":
        shapes = [(256, 512, 2, torch.float32), (257, 1000, 3, torch.float32)]
    else:
        shapes = [(8192, 4096, 8, torch.bfloat16), (8192, 4096, 1, torch.bfloat16),
                  (8192, 4096, 64, torch.float16), (2048, 4096, 4, torch.bfloat16),
                  (16384, 8192, 8, torch.bfloat16), (32768, 2048, 16, torch.bfloat16),
                  (4096, 5120, 8, torch.float32)]
    bw = copy_bandwidth(device)
    rows = []
    for T, d, B, dtype in shapes:
        residual, attn_out, weight, cu, cos_sum = make_inputs(T, d, B, dtype, device)
        seq_ids = seq_ids_of(cu, T)
        es = residual.element_size()
        times = {}
        for name, fn in providers(device).items():
            no_norm = name.endswith("add_cossim")
            # Bytes of the op: read residual + attn_out, write residual (+ out, + weight).
            nbytes = (3 if no_norm else 4) * T * d * es + (0 if no_norm else d * weight.element_size())
            med, p20, p80 = time_us(lambda: fn(residual, attn_out, weight, cu, cos_sum, seq_ids), device)
            times[name] = med
            rows.append({"shape": f"[{T}, {d}] B={B}", "dtype": str(dtype).replace("torch.", ""),
                         "provider": name, "time_us": med, "p20_us": p20, "p80_us": p80, "MB": nbytes / 1e6,
                         "GB/s": nbytes / med / 1e3, "% copy bw": 100 * nbytes / (med * 1e-6) / bw})
        for r in rows[-len(times):]:
            r["speed-up vs eager"] = times["eager"] / r["time_us"]
            if "squeeze no-sim" in times and r["provider"] == "squeeze":
                r["vs no-sim"] = f"{100 * (times['squeeze'] / times['squeeze no-sim'] - 1):+.1f}%"
    columns = ["shape", "dtype", "provider", "time_us", "p20_us", "p80_us", "MB", "GB/s", "% copy bw",
               "speed-up vs eager", "vs no-sim"]
    note = (f"Copy bandwidth of this run: {bw / 1e9:.0f} GB/s (read + write). Targets on [8192, 4096] bf16: "
            ">= 85% of it, and within 3% of the same kernel with the similarity off (no-sim).")
    # Smoke runs (quick, or on the CPU) stay out of bench/results/.
    name = "add_rmsnorm_cossim_quick" if args.quick or device == "cpu" else "add_rmsnorm_cossim"
    print(write_table(name, rows, columns, environment(device), note))


if __name__ == "__main__":
    main()
