"""Attention epilogue with the SqueezeAttention layer-importance measurement, in one pass.

For every token t (row of residual / attn_out, [T, d]):
    old = residual[t];  new = round(old + attn_out[t]);  residual[t] <- new
    out[t] = new * rsqrt(mean(new^2) + eps) * weight                    (NORM)
    cos_sum[seq(t)] += dot(old, new) / (max(|old|, 1e-8) * max(|new|, 1e-8))   (COSSIM)
All arithmetic in fp32 on the stored (rounded) new residual; seq(t) is found in cu_seqlens.
The similarity costs two extra row reductions of data already in registers and one fp32
atomic per sequence segment of a program: the bytes moved equal those of add + RMSNorm.
The accumulation order of the atomics is not fixed, so cos_sum may differ from run to run in
its last bits (the CPU kernel sums in a fixed order).
"""

import triton
import triton.language as tl

from squeeze_ops import _checks

from . import FP_FUSION

_COS_EPS = tl.constexpr(1e-8)  # same convention as squeeze_ops.reference.COS_EPS


@triton.jit
def _epilogue_kernel(
    res_ptr, attn_ptr, w_ptr, out_ptr, cu_ptr, cos_ptr,
    T, D, B, stride_res, stride_attn, stride_w, stride_out, stride_cos, eps,
    NORM: tl.constexpr, COSSIM: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]

    res_ptrs = res_ptr + r64 * stride_res + cols[None, :]
    old = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    attn = tl.load(attn_ptr + r64 * stride_attn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    stored = (old + attn).to(res_ptr.dtype.element_ty)
    tl.store(res_ptrs, stored, mask=mask)
    # The norm and the cosine read the residual as stored, so they agree with a later reader.
    new = stored.to(tl.float32)
    sq_new = tl.sum(new * new, axis=1)

    if NORM:
        w = tl.load(w_ptr + cols * stride_w, mask=cols < D, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(sq_new / D + eps)
        out = new * rstd[:, None] * w[None, :]
        tl.store(out_ptr + r64 * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    if COSSIM:
        dot = tl.sum(old * new, axis=1)
        sq_old = tl.sum(old * old, axis=1)
        cos = dot / (tl.maximum(tl.sqrt(sq_old), _COS_EPS) * tl.maximum(tl.sqrt(sq_new), _COS_EPS))

        # seq = the largest b in [0, B) with cu_seqlens[b] <= row (binary lifting: B is known
        # from the shape, so the step count is a compile-time constant). Clamped to [0, B), so
        # no cu_seqlens can send a load or an atomic out of bounds; rows outside
        # [cu_seqlens[seq], cu_seqlens[seq + 1]) count for no sequence.
        seq = tl.zeros([ROWS], dtype=tl.int32)
        for s in tl.static_range(SEARCH_STEPS):
            cand = seq + (1 << (SEARCH_STEPS - 1 - s))
            ok = row_ok & (cand < B)
            start = tl.load(cu_ptr + cand, mask=ok, other=0)
            seq = tl.where(ok & (start <= rows), cand, seq)
        lo = tl.load(cu_ptr + seq, mask=row_ok, other=0)
        hi = tl.load(cu_ptr + seq + 1, mask=row_ok, other=0)
        valid = row_ok & (rows >= lo) & (rows < hi)

        # One atomic for the program's first sequence; rows of later sequences (a program that
        # straddles a boundary) add their own.
        first = tl.min(tl.where(valid, seq, B), axis=0)
        in_first = valid & (seq == first)
        tl.atomic_add(cos_ptr + first * stride_cos, tl.sum(tl.where(in_first, cos, 0.0), axis=0),
                      mask=first < B, sem="relaxed")
        tl.atomic_add(cos_ptr + seq * stride_cos, cos, mask=valid & (seq != first), sem="relaxed")


def _config(d):
    """Tile of a program: all of a row (BLOCK_D), and several rows when rows are short so a
    program still moves a few KB; warps grow with the tile."""
    block_d = triton.next_power_of_2(max(d, 1))  # d = 0: a row of no elements
    rows = max(1, min(16, 2048 // block_d))
    num_warps = min(16, max(4, rows * block_d // 512))
    return block_d, rows, num_warps


def launch(residual, attn_out, weight, cu_seqlens, cos_sum, eps, out, *, cossim=True):
    """Runs the epilogue kernel on validated arguments. out=None (and weight=None) skips the
    norm (add_cossim); cossim=False skips the similarity (the benchmark's baseline)."""
    T, d = residual.shape
    B = cu_seqlens.shape[0] - 1
    if _checks.value_checks_wanted(cu_seqlens):
        _checks.check_cu_seqlens_values(cu_seqlens, T, ref_name="residual")
    if T == 0:
        return
    block_d, rows, num_warps = _config(d)
    norm = out is not None
    cossim = cossim and B > 0
    _epilogue_kernel[(triton.cdiv(T, rows),)](
        residual, attn_out, weight if norm else residual, out if norm else residual, cu_seqlens, cos_sum,
        T, d, B, residual.stride(0), attn_out.stride(0), weight.stride(0) if norm else 0, out.stride(0) if norm else 0,
        cos_sum.stride(0), eps,
        NORM=norm, COSSIM=cossim, ROWS=rows, BLOCK_D=block_d, SEARCH_STEPS=max(B - 1, 0).bit_length(),
        num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )


def add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps):
    """Launcher of torch.ops.squeeze.add_rmsnorm_cossim (schema arguments, op's output)."""
    out = _checks.add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps)
    launch(residual, attn_out, weight, cu_seqlens, cos_sum, eps, out)
    return out


def add_cossim(residual, attn_out, cu_seqlens, cos_sum):
    """Launcher of torch.ops.squeeze.add_cossim (schema arguments, no output)."""
    _checks.add_cossim(residual, attn_out, cu_seqlens, cos_sum)
    launch(residual, attn_out, None, cu_seqlens, cos_sum, 0.0, None)
