"""prefill_attention on the GPU: flash-style causal attention over packed variable-length
sequences, with optional H2O / observation-window column scores.

Pass 1 (_attention_kernel), one program per (query block, sequence, query head): an online
softmax over the key blocks at or before the block's last query, in base 2 (exp2 with
scale * log2(e) folded in), so memory is linear in tokens. It writes out and the natural-log
lse.

Pass 2 (_column_scores_kernel), only when scores are asked for, one program per (key block,
sequence, KV head): it keeps its keys in registers, walks the query blocks at or after them
(only the last W queries for score_queries = W > 0) for every query head of the group,
recomputes p = exp(scale q.k - lse) from pass 1's lse and sums it over queries and heads.
Each score has exactly one owner: no atomics, no T x T buffer.

Grids come from shapes and the host int max_seqlen only; programs past their sequence's end
return at once. Sequence bounds read from cu_seqlens are clamped into [0, T], so no value of
cu_seqlens makes a kernel access memory out of bounds.
"""
from collections import namedtuple

import torch
import triton
import triton.language as tl

from squeeze_ops import _checks

from . import FP_FUSION
from .common import sequence_bounds

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Tile sizes: queries x keys per tile, warps, software-pipelining stages.
Tiles = namedtuple("Tiles", "block_m block_n num_warps num_stages")


@triton.jit
def _attend_key_blocks(acc, l_i, m_i, q, K, V, sk_t, sv_t, rows, lo, hi, seq_len, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_POINTERS: tl.constexpr):
    """Online-softmax update of one query block with the keys [lo, hi) (K, V point at the
    sequence's first token). DIAGONAL blocks mask the keys after each query and past the end of
    the sequence; the others need no mask. The tiles are addressed by block pointers
    (BLOCK_POINTERS, the timed kernel) or, on a Triton without them, by pointer tensors (see
    block_pointers())."""
    if BLOCK_POINTERS:
        K_blocks = tl.make_block_ptr(K, shape=(HEAD_DIM, seq_len), strides=(1, sk_t), offsets=(0, lo),
                                     block_shape=(HEAD_DIM, BLOCK_N), order=(0, 1))
        V_blocks = tl.make_block_ptr(V, shape=(seq_len, HEAD_DIM), strides=(sv_t, 1), offsets=(lo, 0),
                                     block_shape=(BLOCK_N, HEAD_DIM), order=(1, 0))
    dims = tl.arange(0, HEAD_DIM)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        if BLOCK_POINTERS:
            if DIAGONAL:
                kt = tl.load(K_blocks, boundary_check=(1,), padding_option="zero")
                v = tl.load(V_blocks, boundary_check=(0,), padding_option="zero")
            else:
                kt = tl.load(K_blocks)
                v = tl.load(V_blocks)
            K_blocks = tl.advance(K_blocks, (0, BLOCK_N))
            V_blocks = tl.advance(V_blocks, (BLOCK_N, 0))
        else:
            k_offsets = cols.to(tl.int64)[None, :] * sk_t + dims[:, None]
            v_offsets = cols.to(tl.int64)[:, None] * sv_t + dims[None, :]
            if DIAGONAL:
                in_seq = cols < seq_len
                kt = tl.load(K + k_offsets, mask=in_seq[None, :], other=0.0)
                v = tl.load(V + v_offsets, mask=in_seq[:, None], other=0.0)
            else:
                kt = tl.load(K + k_offsets)
                v = tl.load(V + v_offsets)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if DIAGONAL:
            s = tl.where(rows[:, None] >= cols[None, :], s, float("-inf"))
        # Every query sees key 0 in the first block it visits, so m_new is finite from there on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None],
                     input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_kernel(Q, K, V, CU, Out, Lse, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                      T_total, qk_scale,
                      H: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_POINTERS: tl.constexpr):
    # The last query blocks of a sequence see the most keys: launch them first.
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    b = tl.program_id(1)
    h = tl.program_id(2)
    start, seq_len = sequence_bounds(CU, b, T_total)
    if m0 >= seq_len:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    q = tl.load(Q + (start + rows)[:, None] * sq_t + h * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
    K_seq = K + start * sk_t + (h // GROUP) * sk_h
    V_seq = V + start * sv_t + (h // GROUP) * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Key blocks that end before this query block's first row need no mask.
    diagonal = (m0 // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend_key_blocks(acc, l_i, m_i, q, K_seq, V_seq, sk_t, sv_t, rows, 0, diagonal,
                                       seq_len, qk_scale, HEAD_DIM, BLOCK_N, False, DOT_PRECISION, BLOCK_POINTERS)
    acc, l_i, m_i = _attend_key_blocks(acc, l_i, m_i, q, K_seq, V_seq, sk_t, sv_t, rows, diagonal,
                                       tl.minimum(m0 + BLOCK_M, seq_len), seq_len, qk_scale, HEAD_DIM, BLOCK_N, True,
                                       DOT_PRECISION, BLOCK_POINTERS)

    out = acc / l_i[:, None]
    tl.store(Out + (start + rows)[:, None] * so_t + h * so_h + dims[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(Lse + (start + rows) * H + h, (m_i + tl.math.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _score_query_blocks(acc, k, Q, Lse, sq_t, cols, lo, hi, seq_len, qk_scale,
                        H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Adds to acc[j] the probabilities p[i, j] of keys `cols` for the queries i in [lo, hi) of
    one head (Q, Lse point at the sequence's first token of that head)."""
    dims = tl.arange(0, HEAD_DIM)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_len
        qt = tl.load(Q + rows[None, :] * sq_t + dims[:, None], mask=row_ok[None, :], other=0.0)
        # lse = +inf past the end of the sequence makes those probabilities 0.
        lse2 = tl.load(Lse + rows * H, mask=row_ok, other=float("inf")) * LOG2E
        p = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
        if DIAGONAL:
            p = tl.where(rows[None, :] >= cols[:, None], p, 0.0)
        acc += tl.sum(p, 1)
    return acc


@triton.jit
def _column_scores_kernel(Q, K, CU, Lse, Scores, sq_t, sq_h, sk_t, sk_h, T_total, qk_scale, score_queries,
                          H: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1)
    g = tl.program_id(2)
    start, seq_len = sequence_bounds(CU, b, T_total)
    if n0 >= seq_len:
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < seq_len
    k = tl.load(K + (start + cols)[:, None] * sk_t + g * sk_h + dims[None, :], mask=col_ok[:, None], other=0.0)

    # Queries that count: all (H2O) or the last score_queries of the sequence, and for these
    # keys only those at or after the first key. Query blocks reaching below the block's last
    # key need the causal mask.
    first = tl.where(score_queries > 0, tl.maximum(seq_len - score_queries, 0), 0)
    lo = tl.maximum(n0, first)
    diagonal_end = lo + tl.cdiv(tl.maximum(tl.minimum(n0 + BLOCK_N, seq_len) - lo, 0), BLOCK_M) * BLOCK_M
    acc = tl.zeros([BLOCK_N], tl.float32)
    for i in range(GROUP):
        h = g * GROUP + i
        Q_h = Q + start * sq_t + h * sq_h
        Lse_h = Lse + start * H + h
        acc = _score_query_blocks(acc, k, Q_h, Lse_h, sq_t, cols, lo, diagonal_end, seq_len, qk_scale,
                                  H, HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
        acc = _score_query_blocks(acc, k, Q_h, Lse_h, sq_t, cols, diagonal_end, seq_len, seq_len, qk_scale,
                                  H, HEAD_DIM, BLOCK_M, False, DOT_PRECISION)
    tl.store(Scores + (start + cols) * HKV + g, acc, mask=col_ok)


def block_pointers():
    """Whether this Triton has block pointers (tl.make_block_ptr: removed in 3.9). The key/value
    tiles are loaded through them where it does: that path was timed on the H200 (Triton 3.6).
    The pointer-tensor path that Triton 3.9 and later take is tested on CPU under every Triton
    and compiles for sm_90 without register spills at bf16 (214 registers at D 128, Triton 3.9),
    but has not been timed on a GPU: bench_prefill times it beside the block-pointer kernel."""
    return tuple(map(int, triton.__version__.split(".")[:2])) < (3, 9)


def tiles(device, head_dim):
    """(attention tiles, column-score tiles) for a device and head dim.

    Under the interpreter (CPU tensors) the tiles are small so that small tests cross tile
    edges. On the GPU (sm_90, checked by compiling ahead of time: no register spills inside
    the loops for D 64 and 128): 128-query tiles over 64-key tiles, two warpgroups, for
    pass 1; pass 2 keeps 128 keys in registers."""
    if torch.device(device).type != "cuda":
        return Tiles(16, 16, 1, 1), Tiles(16, 16, 1, 1)
    if head_dim <= 64:
        return Tiles(128, 64, 8, 3), Tiles(128, 128, 8, 3)
    if head_dim <= 128:
        return Tiles(128, 64, 8, 3), Tiles(64, 128, 8, 3)
    return Tiles(64, 32, 8, 2), Tiles(64, 64, 8, 2)


def check_head_dim(D, name):
    _checks.check(16 <= D <= 256 and D & (D - 1) == 0,
                f"{name}: the Triton kernel needs a head dim that is a power of two in [16, 256], got {D}")


def prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_queries):
    """Launcher of torch.ops.squeeze.prefill_attention (see squeeze_ops.ops.prefill_attention)."""
    return launch(q, k, v, cu_seqlens, max_seqlen, scale, score_queries, *tiles(q.device, q.shape[-1]))


def launch(q, k, v, cu_seqlens, max_seqlen, scale, score_queries, attention_tiles, score_tiles,
           use_block_pointers=None):
    """prefill_attention with explicit tiles (tests use it to run the GPU tiles anywhere) and
    key-tile addressing (None: block_pointers(); tests and bench_prefill run both)."""
    out, lse, scores = _checks.prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_queries)
    # Defined even where no program writes (a sequence longer than max_seqlen, which only the
    # value checks can see): zeros, lse -inf.
    out.zero_()
    lse.fill_(float("-inf"))
    scores.zero_()
    T, H, D = q.shape
    Hkv = k.shape[1]
    check_head_dim(D, "q")
    if _checks.value_checks_wanted(cu_seqlens):
        _checks.check_cu_seqlens_values(cu_seqlens, T, max_seqlen)
    B = cu_seqlens.shape[0] - 1
    # No sequence holds more than the T tokens: a larger max_seqlen would only launch programs
    # that find no rows (2**31 of them at max_seqlen = 2**31).
    max_seqlen = min(max_seqlen, T)
    if q.numel() == 0 or B == 0 or max_seqlen == 0:
        return out, lse, scores
    qk_scale = scale * LOG2E.value
    # fp32 inputs get fp32 products (the GPU's default for fp32 tl.dot is TF32, ~1e-3 off).
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    a = attention_tiles
    _attention_kernel[(triton.cdiv(max_seqlen, a.block_m), B, H)](
        q, k, v, cu_seqlens, out, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), T, qk_scale,
        H=H, GROUP=H // Hkv, HEAD_DIM=D, BLOCK_M=a.block_m, BLOCK_N=a.block_n, DOT_PRECISION=precision,
        BLOCK_POINTERS=block_pointers() if use_block_pointers is None else use_block_pointers,
        num_warps=a.num_warps, num_stages=a.num_stages, enable_fp_fusion=FP_FUSION)
    if score_queries >= 0:
        s = score_tiles
        _column_scores_kernel[(triton.cdiv(max_seqlen, s.block_n), B, Hkv)](
            q, k, cu_seqlens, lse, scores, q.stride(0), q.stride(1), k.stride(0), k.stride(1), T, qk_scale,
            score_queries,
            H=H, HKV=Hkv, GROUP=H // Hkv, HEAD_DIM=D, BLOCK_M=s.block_m, BLOCK_N=s.block_n,
            DOT_PRECISION=precision, num_warps=s.num_warps, num_stages=s.num_stages,
            enable_fp_fusion=FP_FUSION)
    return out, lse, scores
