"""Helpers shared by the Triton kernels of more than one op: the policy codes, tile sizes,
sequence bounds of packed batches, paged row addressing, the eviction rule (cache_evict_ and
decode_step_), and the split-K decode passes (decode_attention and decode_step_).

Paged rows (README "Tensor conventions"): a row is one (sequence, layer, KV head); slot j of
row (b, g) lives at page block_table[b, g, j // PAGE], offset j % PAGE, of the pools k_pages,
v_pages [P, PAGE, D], pos_pages, score_pages [P, PAGE]; its capacity is C = M * PAGE. A page id
outside [0, P) is no page: loads from it read as empty (zero K/V, position -1, score 0), stores
to it are dropped, so no block-table value makes a kernel touch memory outside the pools.

Split-K decode. Split pass, grid (B, Hkv, S): program (b, g, s) reads slots
[s * split_len, (s + 1) * split_len) of row (b, g) once for all G = H / Hkv query heads of its
group (padded to >= 16 rows for tl.dot), and writes its partial output and log-sum-exp; with
scores wanted it also writes the logits. The grid is static (from shapes only); each row uses
cdiv(lens[b, g], split_len) of the S splits, decided on the device, so the same launch serves
short and long rows and the empty programs of short rows return at once. No value is read back
to the host. decode_step_ folds the append of the new token into this pass.

Combine pass, grid (B, Hkv): merges the splits of each query head, writes out, then (scores
wanted) turns the stored logits into probabilities with the final log-sum-exp and adds their
sum over the group's heads to the row's slot scores; decode_step_ then evicts in it.

Everything is computed in base 2 (exp2/log2, logits pre-multiplied by scale * log2(e)).
"""
import functools
from collections import namedtuple

import torch
import triton
import triton.language as tl

from squeeze_ops.vocabulary import POLICY_CODES

from . import FP_FUSION

# Policy codes (squeeze_ops.vocabulary; constexpr globals: visible inside @triton.jit functions).
WINDOW, STREAMING, H2O = (tl.constexpr(POLICY_CODES[name]) for name in ("window", "streaming", "h2o"))

INT32_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def sequence_bounds(CU, b, T_total):
    """First token (int64) and length of sequence b, clamped into [0, T_total]."""
    start = tl.minimum(tl.maximum(tl.load(CU + b), 0), T_total)
    end = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), T_total)
    return start.to(tl.int64), end - start


@triton.jit
def row_slots(table_row, slots, C, P, PAGE: tl.constexpr):
    """(page, offset in the page, on a page) of the given slots of one row (scalar or vector):
    slots outside [0, C) or on a page id outside [0, P) are not on a page (page 0 is returned
    for them, to be masked)."""
    inside = (slots >= 0) & (slots < C)
    page = tl.load(table_row + tl.where(inside, slots, 0) // PAGE, mask=inside, other=-1)
    ok = inside & (page >= 0) & (page < P)
    return tl.where(ok, page, 0).to(tl.int64), tl.where(inside, slots, 0) % PAGE, ok


@triton.jit
def score_key(s):
    """Scores as the policies compare them: NaN counts as -inf (kept last, evicted first)."""
    return tl.where(s != s, float("-inf"), s)


@triton.jit
def find_victim(table_row, pos_ptr, score_ptr, stride_pp, stride_ps, stride_sp, stride_ss, C, P, n, sinks, recent,
                PAGE: tl.constexpr, POLICY: tl.constexpr, BLOCK_C: tl.constexpr):
    """The slot to evict among the first n (>= 1) slots of one row.

    window: the smallest position; streaming: the smallest position >= sinks; h2o: among slots
    neither sink (position < sinks) nor recent (position > max position - recent), the lowest score
    (NaN counts as -inf), ties -> the smallest position. If no slot qualifies: the smallest
    position >= sinks, else the smallest position. As a lexicographic minimum of (tier, score,
    position, slot): tier 0 for a regular candidate, 1 and 2 for the two fallbacks; the score only
    orders h2o's tier 0. Slots on no page read position -1, score 0.
    """
    newest = tl.full([], -INT32_MAX, tl.int32)
    if POLICY == H2O:
        for start in range(0, n, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            page, at, ok = row_slots(table_row, offs, C, P, PAGE)
            p = tl.load(pos_ptr + page * stride_pp + at * stride_ps, mask=ok, other=-1)
            newest = tl.maximum(newest, tl.max(tl.where(offs < n, p, -INT32_MAX), 0))
    best_tier = tl.full([], 3, tl.int32)
    best_score = tl.full([], float("inf"), tl.float32)
    best_pos = tl.full([], INT32_MAX, tl.int32)
    best_slot = tl.full([], 0, tl.int32)
    for start in range(0, n, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        valid = offs < n
        page, at, ok = row_slots(table_row, offs, C, P, PAGE)
        p = tl.load(pos_ptr + page * stride_pp + at * stride_ps, mask=ok, other=-1)
        if POLICY == WINDOW:
            tier = tl.zeros([BLOCK_C], tl.int32)
        elif POLICY == STREAMING:
            tier = tl.where(p < sinks, 1, 0)
        else:
            tier = tl.where(p < sinks, 2, tl.where(p > newest - recent, 1, 0))
        tier = tl.where(valid, tier, 3)
        if POLICY == H2O:
            s = score_key(tl.load(score_ptr + page * stride_sp + at * stride_ss, mask=ok, other=0.0))
            key = tl.where(tier == 0, s, 0.0)
        else:
            key = tl.zeros([BLOCK_C], tl.float32)
        # This block's minimum, one component at a time.
        t = tl.min(tier, 0)
        match = tier == t
        k = tl.min(tl.where(match, key, float("inf")), 0)
        match = match & (key == k)
        q = tl.min(tl.where(match, p, INT32_MAX), 0)
        match = match & (p == q)
        slot = tl.min(tl.where(match, offs, INT32_MAX), 0)
        # Earlier blocks hold smaller slots, so on a full tie the running best stays.
        better = (t < best_tier) | ((t == best_tier) & ((k < best_score) | ((k == best_score) & (q < best_pos))))
        best_tier = tl.where(better, t, best_tier)
        best_score = tl.where(better, k, best_score)
        best_pos = tl.where(better, q, best_pos)
        best_slot = tl.where(better, slot, best_slot)
    # A block always matches (scores are NaN-free keys); the clamp keeps the slot inside the row.
    return tl.minimum(best_slot, n - 1)


@triton.jit
def evict_row(table_row, k_ptr, v_ptr, pos_ptr, score_ptr, stride_kp, stride_ks, stride_vp, stride_vs,
              stride_pp, stride_ps, stride_sp, stride_ss, C, P, n, budget, sinks, D,
              RECENT_RATIO: tl.constexpr, POLICY: tl.constexpr, PAGE: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Evicts from one row holding n tokens until it holds budget: each round moves the last slot
    into the victim's (K, V, position, score, as they read) and frees the last slot (position -1,
    score 0). Returns the number of tokens kept, min(n, budget).

    RECENT_RATIO is a compile-time constant so that floor(budget * recent_ratio) is computed in
    double precision, exactly as the CPU kernel and the reference do.
    """
    keep = tl.maximum(budget, 0)
    recent = tl.floor(keep.to(tl.float64) * tl.full([], RECENT_RATIO, tl.float64)).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m = n
    for _ in range(keep, n):
        victim = find_victim(table_row, pos_ptr, score_ptr, stride_pp, stride_ps, stride_sp, stride_ss, C, P, m,
                             sinks, recent, PAGE, POLICY, BLOCK_C)
        last = m - 1
        move = victim != last
        src, src_at, src_ok = row_slots(table_row, last, C, P, PAGE)
        dst, dst_at, dst_ok = row_slots(table_row, victim, C, P, PAGE)
        put = move & dst_ok
        k_row = tl.load(k_ptr + src * stride_kp + src_at * stride_ks + offs_d, mask=d_mask & src_ok, other=0.0)
        v_row = tl.load(v_ptr + src * stride_vp + src_at * stride_vs + offs_d, mask=d_mask & src_ok, other=0.0)
        tl.store(k_ptr + dst * stride_kp + dst_at * stride_ks + offs_d, k_row, mask=d_mask & put)
        tl.store(v_ptr + dst * stride_vp + dst_at * stride_vs + offs_d, v_row, mask=d_mask & put)
        last_pos = tl.load(pos_ptr + src * stride_pp + src_at * stride_ps, mask=src_ok, other=-1)
        last_score = tl.load(score_ptr + src * stride_sp + src_at * stride_ss, mask=src_ok, other=0.0)
        tl.store(pos_ptr + dst * stride_pp + dst_at * stride_ps, tl.where(move, last_pos, -1), mask=dst_ok)
        tl.store(score_ptr + dst * stride_sp + dst_at * stride_ss, tl.where(move, last_score, 0.0), mask=dst_ok)
        tl.store(pos_ptr + src * stride_pp + src_at * stride_ps, -1, mask=move & src_ok)
        tl.store(score_ptr + src * stride_sp + src_at * stride_ss, 0.0, mask=move & src_ok)
        # The next round's search reads what other threads of this program just wrote.
        tl.debug_barrier()
        m = last
    return m


# Tile helpers run on every eager launch: cached, since triton's host helpers cost microseconds.
@functools.lru_cache(maxsize=1024)
def block_d(D):
    return max(16, triton.next_power_of_2(D))


@functools.lru_cache(maxsize=1024)
def evict_block(C):
    """Slots per step of the victim search: wide, since one program scans a whole row and each
    step waits for its loads (a 16k-slot row takes 4 steps)."""
    return min(4096, max(16, triton.next_power_of_2(C)))


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
    splits a row of C slots needs. Chosen from shapes only."""
    tiles = triton.cdiv(max(C, 1), BLOCK_N)
    splits = max(1, min(triton.cdiv(_programs_wanted(device), max(B * Hkv, 1)), triton.cdiv(tiles, MIN_TILES_PER_SPLIT)))
    tiles_per_split = triton.cdiv(tiles, splits)
    return tiles_per_split * BLOCK_N, triton.cdiv(tiles, tiles_per_split)


Tiles = namedtuple("Tiles", "block_d block_g score_block evict_block")


@functools.lru_cache(maxsize=1024)  # see split_plan
def decode_tiles(G, C, D):
    """Tiles of the two passes for G query heads per KV head, row capacity C, head dim D."""
    block_g = triton.next_power_of_2(G)
    return Tiles(block_d(D), block_g, min(8192 // block_g, max(16, triton.next_power_of_2(C))), evict_block(C))


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, o_part_ptr, lse_part_ptr, logit_ptr,
    n_ptr, knew_ptr, vnew_ptr, tokpos_ptr, pos_ptr, score_ptr,
    stride_qb, stride_qh, stride_kp, stride_ks, stride_vp, stride_vs,
    stride_nb, stride_nh, stride_wb, stride_wh, stride_pp, stride_ps, stride_sp, stride_ss,
    M, P, scale_log2, split_len,
    G: tl.constexpr, D: tl.constexpr, S: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    APPEND: tl.constexpr, SCORES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)
    Hkv = tl.num_programs(1)
    row = b * Hkv + h
    C = M * PAGE
    table_row = table_ptr + row * M
    n_old = tl.minimum(tl.maximum(tl.load(lens_ptr + row), 0), C)
    n = tl.minimum(n_old + 1, C) if APPEND else n_old
    start = split * split_len
    end = tl.minimum(start + split_len, n)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < G
    d_mask = offs_d < D

    if APPEND:
        # The new token goes to slot n_old, written by the split that covers it. No program reads
        # that slot from memory in this pass: the covering split adds it from registers below.
        tl.store(n_ptr + row, n, mask=split == 0)  # lens after the append, for the combine pass
        k_new = tl.load(knew_ptr + b * stride_nb + h * stride_nh + offs_d, mask=d_mask)
        v_new = tl.load(vnew_ptr + b * stride_wb + h * stride_wh + offs_d, mask=d_mask)
        mine = (n_old >= start) & (n_old < end)
        new_page, new_at, new_ok = row_slots(table_row, n_old, C, P, PAGE)
        put = mine & new_ok
        tl.store(k_ptr + new_page * stride_kp + new_at * stride_ks + offs_d, k_new, mask=d_mask & put)
        tl.store(v_ptr + new_page * stride_vp + new_at * stride_vs + offs_d, v_new, mask=d_mask & put)
        tl.store(pos_ptr + new_page * stride_pp + new_at * stride_ps, tl.load(tokpos_ptr + b), mask=put)
        tl.store(score_ptr + new_page * stride_sp + new_at * stride_ss, 0.0, mask=put)
        cached_end = tl.minimum(end, n_old)
    else:
        cached_end = end

    # Programs past the row's last split find no keys: the loop runs zero times and nothing is
    # loaded or stored (masks rather than a branch keep the loop at the top level).
    has_keys = start < end
    q = tl.load(q_ptr + b * stride_qb + (h * G + offs_h)[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :] & has_keys, other=0.0)
    logit_rows = logit_ptr + (row * G + offs_h) * C
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for t in range(start, cached_end, BLOCK_N):
        offs_n = t + tl.arange(0, BLOCK_N)
        n_mask = offs_n < cached_end
        page, at, ok = row_slots(table_row, offs_n, C, P, PAGE)
        kv_mask = (n_mask & ok)[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + page[:, None] * stride_kp + at[:, None] * stride_ks + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(v_ptr + page[:, None] * stride_vp + at[:, None] * stride_vs + offs_d[None, :], mask=kv_mask,
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
    part = row * S + split
    l_i = tl.where(has_keys, l_i, 1.0)
    tl.store(o_part_ptr + (part * G + offs_h)[:, None] * D + offs_d[None, :], acc / l_i[:, None],
             mask=h_mask[:, None] & d_mask[None, :] & has_keys)
    tl.store(lse_part_ptr + part * G + offs_h, m_i + tl.log2(l_i), mask=h_mask & has_keys)


@triton.jit
def _combine_kernel(
    o_part_ptr, lse_part_ptr, logit_ptr, n_ptr, out_ptr,
    k_ptr, v_ptr, table_ptr, lens_ptr, pos_ptr, score_ptr, budget_ptr,
    stride_ob, stride_oh, stride_kp, stride_ks, stride_vp, stride_vs, stride_pp, stride_ps, stride_sp, stride_ss,
    M, P, split_len, sinks,
    G: tl.constexpr, D: tl.constexpr, S: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, SCORE_BLOCK: tl.constexpr, EVICT_BLOCK: tl.constexpr,
    SCORES: tl.constexpr, EVICT: tl.constexpr, POLICY: tl.constexpr, RECENT_RATIO: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    Hkv = tl.num_programs(1)
    row = b * Hkv + h
    C = M * PAGE
    table_row = table_ptr + row * M
    n = tl.minimum(tl.maximum(tl.load(n_ptr + row), 0), C)

    offs_h = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < G
    hd_mask = h_mask[:, None] & (offs_d < D)[None, :]

    # Merge the splits this row used (the same count the split pass derived from n).
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    part0 = row * S
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
    # lens 0: no split, the output is zeros. Decided by n, not by l_i, so that a NaN (a NaN or
    # Inf among the inputs) reaches the output and the scores as it does on the CPU.
    l_i = tl.where(n > 0, l_i, 1.0)
    tl.store(out_ptr + b * stride_ob + (h * G + offs_h)[:, None] * stride_oh + offs_d[None, :],
             (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=hd_mask)

    if SCORES:
        lse = m_i + tl.log2(l_i)
        for t in range(0, n, SCORE_BLOCK):
            offs_n = t + tl.arange(0, SCORE_BLOCK)
            n_mask = offs_n < n
            s = tl.load(logit_ptr + (row * G + offs_h)[:, None] * C + offs_n[None, :],
                        mask=h_mask[:, None] & n_mask[None, :], other=float("-inf"))
            mass = tl.sum(tl.exp2(s - lse[:, None]), 0)
            page, at, ok = row_slots(table_row, offs_n, C, P, PAGE)
            slot_score = score_ptr + page * stride_sp + at * stride_ss
            old = tl.load(slot_score, mask=n_mask & ok, other=0.0)
            tl.store(slot_score, old + mass, mask=n_mask & ok)

    if EVICT:
        tl.debug_barrier()  # the victim search reads the scores just written by other threads
        kept = evict_row(table_row, k_ptr, v_ptr, pos_ptr, score_ptr, stride_kp, stride_ks, stride_vp, stride_vs,
                         stride_pp, stride_ps, stride_sp, stride_ss, C, P, n, tl.load(budget_ptr + row), sinks, D,
                         RECENT_RATIO, POLICY, PAGE, EVICT_BLOCK, BLOCK_D)
        tl.store(lens_ptr + row, kept)


def run_decode(q, k_pages, v_pages, block_table, lens, scale, score_pages, accumulate, out, step=None):
    """Launches the split pass and the combine pass, writing `out` [B, H, D].

    score_pages: the score pool (may be None when not accumulating); accumulate: add the
    probabilities to it. step = (k_new, v_new, pos, pos_pages, budget, policy, sinks,
    recent_ratio) turns the two passes into decode_step_: append in the split pass, evict in the
    combine pass.
    """
    B, H, D = q.shape
    P, PAGE, _ = k_pages.shape
    Hkv, M = block_table.shape[1:]
    C = M * PAGE
    if B == 0:
        return out
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
        pos_pages, policy, sinks, recent_ratio = lens.view(1, -1), "window", 0, 0.0
        score_pages = score_pages if score_pages is not None else lse_part.view(1, -1)
    else:
        k_new, v_new, pos, pos_pages, budget, policy, sinks, recent_ratio = step
        n_buf = torch.empty_like(lens)  # lens after the append, from the split pass to the combine pass
    meta = dict(G=G, D=D, S=S, PAGE=PAGE, BLOCK_D=tiles.block_d)
    _split_kernel[(B, Hkv, S)](
        q, k_pages, v_pages, block_table, lens, o_part, lse_part, logits,
        n_buf, k_new, v_new, pos, pos_pages, score_pages,
        *q.stride()[:2], *k_pages.stride()[:2], *v_pages.stride()[:2],
        *k_new.stride()[:2], *v_new.stride()[:2], *pos_pages.stride(), *score_pages.stride(),
        M, P, scale * LOG2E, split_len,
        BLOCK_H=max(16, tiles.block_g), BLOCK_N=BLOCK_N, APPEND=step is not None, SCORES=accumulate,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **meta, num_warps=4, num_stages=2,
        enable_fp_fusion=FP_FUSION,
    )
    _combine_kernel[(B, Hkv)](
        o_part, lse_part, logits, n_buf, out,
        k_pages, v_pages, block_table, lens, pos_pages, score_pages, budget,
        *out.stride()[:2], *k_pages.stride()[:2], *v_pages.stride()[:2], *pos_pages.stride(), *score_pages.stride(),
        M, P, split_len, sinks,
        BLOCK_G=tiles.block_g, SCORE_BLOCK=tiles.score_block, EVICT_BLOCK=tiles.evict_block, SCORES=accumulate,
        EVICT=step is not None,
        POLICY=POLICY_CODES[policy], RECENT_RATIO=float(recent_ratio), **meta, num_warps=8, enable_fp_fusion=FP_FUSION,
    )
    return out
