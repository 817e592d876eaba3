"""decode_attention on the GPU: split-K ("flash decoding") over a ragged layer cache, with optional
in-place H2O score accumulation. decode_step_ (decode_step.py) runs the same two passes with the
append folded into the first and the eviction into the second.

Split pass, grid (B, Hkv, S): program (b, g, s) reads K/V slots [s * split_len, (s + 1) * split_len)
of KV head g once for all G = H / Hkv query heads of its group (padded to >= 16 rows for tl.dot),
and writes its partial output and log-sum-exp; with scores wanted it also writes the logits.
The grid is static (from shapes only); each sequence uses cdiv(lens[b], split_len) of the S
splits, decided on the device, so the same launch serves short and long caches and the empty
programs of short sequences return at once. No value is read back to the host.

Combine pass, grid (B, Hkv): merges the splits of each query head, writes out, then (scores
wanted) turns the stored logits into probabilities with the final log-sum-exp and adds their sum
over the group's heads to scores[b, g, :lens[b]]; in decode_step_ it then evicts.

Everything is computed in base 2 (exp2/log2, logits pre-multiplied by scale * log2(e)).
"""
import functools
from collections import namedtuple

import torch
import triton
import triton.language as tl

from squeeze_ops import _meta

from . import FP_FUSION
from .cache_ops import POLICY_CODES, block_d, check_values, evict_block, evict_head, value_checks_wanted

LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per tile of the split pass
MIN_TILES_PER_SPLIT = 2  # keeps a split's K/V read large against its partial-output traffic


def _programs_wanted(device):
    """Split-pass programs that keep the device busy: several waves on a GPU (so the last, partial
    wave costs little); on the CPU interpreter a small number, enough for tests to exercise the
    combine of several splits."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 16


@functools.lru_cache(maxsize=1024)  # asked on every eager decode step (and reads device properties)
def split_plan(B, Hkv, C, device):
    """(split_len, S): every split covers split_len slots (a multiple of BLOCK_N), S = the most
    splits a sequence of C slots needs. Chosen from shapes only."""
    tiles = triton.cdiv(max(C, 1), BLOCK_N)
    splits = max(1, min(triton.cdiv(_programs_wanted(device), B * Hkv), triton.cdiv(tiles, MIN_TILES_PER_SPLIT)))
    tiles_per_split = triton.cdiv(tiles, splits)
    return tiles_per_split * BLOCK_N, triton.cdiv(tiles, tiles_per_split)


Tiles = namedtuple("Tiles", "block_d block_g score_block evict_block")


@functools.lru_cache(maxsize=1024)  # see split_plan
def decode_tiles(G, C, D):
    """Tiles of the two passes for G query heads per KV head, capacity C, head dim D."""
    block_g = triton.next_power_of_2(G)
    return Tiles(block_d(D), block_g, min(8192 // block_g, max(16, triton.next_power_of_2(C))), evict_block(C))


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, o_part_ptr, lse_part_ptr, logit_ptr,
    n_ptr, knew_ptr, vnew_ptr, tokpos_ptr, pos_ptr, score_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
    stride_nb, stride_nh, stride_wb, stride_wh, stride_pb, stride_ph, stride_pc, stride_sb, stride_sh, stride_sc,
    C, scale_log2, split_len,
    G: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    APPEND: tl.constexpr, SCORES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)
    Hkv = tl.num_programs(1)
    n_old = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), C)
    n = tl.minimum(n_old + 1, C) if APPEND else n_old
    start = split * split_len
    end = tl.minimum(start + split_len, n)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < G
    d_mask = offs_d < D
    k_row = k_ptr + b * stride_kb + h * stride_kh
    v_row = v_ptr + b * stride_vb + h * stride_vh

    if APPEND:
        # The new token goes to slot n_old, written by the split that covers it. No program reads
        # that slot from memory in this pass: the covering split adds it from registers below.
        tl.store(n_ptr + b, n, mask=(h == 0) & (split == 0))  # lens after the append, for the combine pass
        k_new = tl.load(knew_ptr + b * stride_nb + h * stride_nh + offs_d, mask=d_mask)
        v_new = tl.load(vnew_ptr + b * stride_wb + h * stride_wh + offs_d, mask=d_mask)
        mine = (n_old >= start) & (n_old < end)
        tl.store(k_row + n_old * stride_kc + offs_d, k_new, mask=d_mask & mine)
        tl.store(v_row + n_old * stride_vc + offs_d, v_new, mask=d_mask & mine)
        tl.store(pos_ptr + b * stride_pb + h * stride_ph + n_old * stride_pc, tl.load(tokpos_ptr + b), mask=mine)
        tl.store(score_ptr + b * stride_sb + h * stride_sh + n_old * stride_sc, 0.0, mask=mine)
        cached_end = tl.minimum(end, n_old)
    else:
        cached_end = end

    # Programs past the sequence's last split find no keys: the loop runs zero times and nothing
    # is loaded or stored (masks rather than a branch keep the loop at the top level).
    has_keys = start < end
    q = tl.load(q_ptr + b * stride_qb + (h * G + offs_h)[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :] & has_keys, other=0.0)
    logit_rows = logit_ptr + (b * Hkv * G + h * G + offs_h) * C
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for t in range(start, cached_end, BLOCK_N):
        offs_n = t + tl.arange(0, BLOCK_N)
        n_mask = offs_n < cached_end
        k = tl.load(k_row + offs_n[:, None] * stride_kc + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0)
        v = tl.load(v_row + offs_n[:, None] * stride_vc + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        if SCORES:
            tl.store(logit_rows[:, None] + offs_n[None, :], s, mask=h_mask[:, None] & n_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if APPEND:
        if mine:  # one more column of the online softmax: the new token
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2
            if SCORES:
                tl.store(logit_rows + n_old, s_new, mask=h_mask)
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new
    part = (b * Hkv + h) * S + split
    l_i = tl.where(has_keys, l_i, 1.0)
    tl.store(o_part_ptr + (part * G + offs_h)[:, None] * D + offs_d[None, :], acc / l_i[:, None],
             mask=h_mask[:, None] & d_mask[None, :] & has_keys)
    tl.store(lse_part_ptr + part * G + offs_h, m_i + tl.log2(l_i), mask=h_mask & has_keys)


@triton.jit
def _combine_kernel(
    o_part_ptr, lse_part_ptr, logit_ptr, n_ptr, out_ptr,
    k_ptr, v_ptr, lens_ptr, pos_ptr, score_ptr, budget_ptr,
    stride_ob, stride_oh, stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
    stride_pb, stride_ph, stride_pc, stride_sb, stride_sh, stride_sc,
    C, split_len, sinks,
    G: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, SCORE_BLOCK: tl.constexpr, EVICT_BLOCK: tl.constexpr,
    SCORES: tl.constexpr, EVICT: tl.constexpr, POLICY: tl.constexpr, RECENT_RATIO: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    Hkv = tl.num_programs(1)
    n = tl.minimum(tl.maximum(tl.load(n_ptr + b), 0), C)

    offs_h = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < G
    hd_mask = h_mask[:, None] & (offs_d < D)[None, :]

    # Merge the splits this sequence used (the same count the split pass derived from n).
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    part0 = (b * Hkv + h) * S
    for split in range(0, tl.cdiv(n, split_len)):
        lse_s = tl.load(lse_part_ptr + (part0 + split) * G + offs_h, mask=h_mask, other=0.0)
        o_s = tl.load(o_part_ptr + ((part0 + split) * G + offs_h)[:, None] * D + offs_d[None, :], mask=hd_mask,
                      other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse_s - m_new)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)  # lens 0: no split, the output is zeros
    tl.store(out_ptr + b * stride_ob + (h * G + offs_h)[:, None] * stride_oh + offs_d[None, :],
             (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=hd_mask)

    score_row = score_ptr + b * stride_sb + h * stride_sh
    if SCORES:
        lse = m_i + tl.log2(l_i)
        for t in range(0, n, SCORE_BLOCK):
            offs_n = t + tl.arange(0, SCORE_BLOCK)
            n_mask = offs_n < n
            s = tl.load(logit_ptr + (b * Hkv * G + h * G + offs_h)[:, None] * C + offs_n[None, :],
                        mask=h_mask[:, None] & n_mask[None, :], other=float("-inf"))
            mass = tl.sum(tl.exp2(s - lse[:, None]), 0)
            old = tl.load(score_row + offs_n * stride_sc, mask=n_mask, other=0.0)
            tl.store(score_row + offs_n * stride_sc, old + mass, mask=n_mask)

    if EVICT:
        tl.debug_barrier()  # the victim search reads the scores just written by other threads
        kept = evict_head(k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
                          pos_ptr + b * stride_pb + h * stride_ph, score_row,
                          stride_kc, stride_vc, stride_pc, stride_sc, n, tl.load(budget_ptr + b), sinks, D,
                          RECENT_RATIO, POLICY, EVICT_BLOCK, BLOCK_D)
        tl.store(lens_ptr + b, kept, mask=h == 0)


def run_decode(q, k_cache, v_cache, lens, scale, scores, accumulate, out, step=None):
    """Launches the split pass and the combine pass, writing `out` [B, H, D].

    scores: the per-slot scores tensor (may be None when not accumulating); accumulate: add the
    probabilities to it. step = (k_new, v_new, pos, slot_pos, budget, policy, sinks, recent_ratio)
    turns the two passes into decode_step_: append in the split pass, evict in the combine pass.
    """
    B, H, D = q.shape
    _, Hkv, C, _ = k_cache.shape
    G = H // Hkv
    split_len, S = split_plan(B, Hkv, C, q.device)
    tiles = decode_tiles(G, C, D)
    f32 = dict(dtype=torch.float32, device=q.device)
    o_part = torch.empty(B, Hkv, S, G, D, **f32)
    lse_part = torch.empty(B, Hkv, S, G, **f32)
    logits = torch.empty(B, H, C, **f32) if accumulate else lse_part  # lse_part: never read then
    if step is None:
        k_new = v_new = q
        pos = budget = n_buf = lens
        slot_pos, policy, sinks, recent_ratio = lens.view(1, 1, B), "window", 0, 0.0
        scores_t = scores if scores is not None else lse_part.view(1, 1, -1)
    else:
        k_new, v_new, pos, slot_pos, budget, policy, sinks, recent_ratio = step
        n_buf = torch.empty_like(lens)  # lens after the append, from the split pass to the combine pass
        scores_t = scores
    meta = dict(G=G, D=D, S=S, BLOCK_D=tiles.block_d)
    _split_kernel[(B, Hkv, S)](
        q, k_cache, v_cache, lens, o_part, lse_part, logits,
        n_buf, k_new, v_new, pos, slot_pos, scores_t,
        *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3],
        *k_new.stride()[:2], *v_new.stride()[:2], *slot_pos.stride(), *scores_t.stride(),
        C, scale * LOG2E, split_len,
        BLOCK_H=max(16, tiles.block_g), BLOCK_N=BLOCK_N, APPEND=step is not None, SCORES=accumulate,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **meta, num_warps=4, num_stages=2,
        enable_fp_fusion=FP_FUSION,
    )
    _combine_kernel[(B, Hkv)](
        o_part, lse_part, logits, n_buf, out,
        k_cache, v_cache, lens, slot_pos, scores_t, budget,
        *out.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], *slot_pos.stride(), *scores_t.stride(),
        C, split_len, sinks,
        BLOCK_G=tiles.block_g, SCORE_BLOCK=tiles.score_block, EVICT_BLOCK=tiles.evict_block, SCORES=accumulate,
        EVICT=step is not None,
        POLICY=POLICY_CODES[policy], RECENT_RATIO=float(recent_ratio), **meta, num_warps=8, enable_fp_fusion=FP_FUSION,
    )
    return out


def decode_attention(q, k_cache, v_cache, lens, scale, scores):
    """Triton launcher of torch.ops.squeeze.decode_attention (see squeeze_ops.ops.decode_attention)."""
    out = _meta.decode_attention(q, k_cache, v_cache, lens, scale, scores)
    if value_checks_wanted(lens):
        check_values(k_cache.shape[2], lens)
    return run_decode(q, k_cache, v_cache, lens, scale, scores, scores is not None, out)
