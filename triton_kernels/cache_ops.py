"""cache_append_ and cache_evict_ on the GPU, and the eviction rule that decode_step_'s
combine-and-evict pass shares with them.

Layer cache (README): k_cache/v_cache [B, Hkv, C, D], lens int32 [B], slot_pos int32 [B, Hkv, C]
(-1 = empty), scores fp32 [B, Hkv, C]. Slots are unordered; a policy tells old from new by slot_pos.

Nothing here reads a value back to the host, so every launch can be captured in a CUDA graph.
Without SQUEEZE_DEBUG=1 the value checks (lens, budget, pos) run only for CPU tensors; the
kernels instead clamp lens to [0, C] and never write outside the first C slots: an append to a
full cache is dropped, and the eviction only moves slots below lens.
"""
import functools
import os

import triton
import triton.language as tl

from squeeze_ops import _meta

from . import FP_FUSION

# Policy codes, as in csrc/checks.h (constexpr globals: visible inside @triton.jit functions).
WINDOW, STREAMING, H2O = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
POLICY_CODES = {"window": WINDOW.value, "streaming": STREAMING.value, "h2o": H2O.value}

INT32_MAX = tl.constexpr(2**31 - 1)


def value_checks_wanted(t):
    """Data-dependent checks need the values on the host: always for CPU tensors, on the GPU only
    under SQUEEZE_DEBUG=1 (they synchronise, so not inside CUDA-graph capture or torch.compile)."""
    return t.device.type == "cpu" or os.environ.get("SQUEEZE_DEBUG") == "1"


def check_values(C, lens, *, append=False, budget=None, pos=None):
    """The value checks of the C++ kernels: 0 <= lens <= C (< C when appending), 0 <= budget <= C
    (<= C - 1 when appending: decode_step_ needs C >= budget + 1), pos >= 0."""
    for b, n in enumerate(lens.tolist()):
        _meta.check(n >= 0, f"lens: expected non-negative lengths, got lens[{b}] = {n}")
        _meta.check(n <= C, f"lens: lens[{b}] = {n} exceeds the cache capacity C = {C}")
        _meta.check(not append or n < C, f"lens: capacity overflow: sequence {b} already holds {n} tokens, the "
                    f"capacity C of k_cache, so no slot is left to append to")
    if budget is not None:
        max_budget = C - 1 if append else C
        why = " minus the slot of the appended token (decode_step_ needs C >= budget + 1)" if append else ""
        for b, keep in enumerate(budget.tolist()):
            _meta.check(keep >= 0, f"budget: expected non-negative budgets, got budget[{b}] = {keep}")
            _meta.check(keep <= max_budget, f"budget: budget[{b}] = {keep} exceeds the capacity C = {C}{why}")
    if pos is not None:
        for b, p in enumerate(pos.tolist()):
            _meta.check(p >= 0, f"pos: expected non-negative token positions, got pos[{b}] = {p}")


@triton.jit
def find_victim(pos_row, score_row, stride_p, stride_s, n, sinks, recent,
                POLICY: tl.constexpr, BLOCK_C: tl.constexpr):
    """The slot to evict among the first n (>= 1) slots of one (sequence, KV head).

    window: the smallest position; streaming: the smallest position >= sinks; h2o: among slots
    neither sink (position < sinks) nor recent (position > max position - recent), the lowest score,
    ties -> the smallest position. If no slot qualifies: the smallest position >= sinks, else the
    smallest position. As a lexicographic minimum of (tier, score, position, slot): tier 0 for a
    regular candidate, 1 and 2 for the two fallbacks; the score only orders h2o's tier 0.
    """
    newest = tl.full([], -INT32_MAX, tl.int32)
    if POLICY == H2O:
        for start in range(0, n, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            p = tl.load(pos_row + offs * stride_p, mask=offs < n, other=-INT32_MAX)
            newest = tl.maximum(newest, tl.max(p, 0))
    best_tier = tl.full([], 3, tl.int32)
    best_score = tl.full([], float("inf"), tl.float32)
    best_pos = tl.full([], INT32_MAX, tl.int32)
    best_slot = tl.full([], 0, tl.int32)
    for start in range(0, n, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        valid = offs < n
        p = tl.load(pos_row + offs * stride_p, mask=valid, other=0)
        if POLICY == WINDOW:
            tier = tl.zeros([BLOCK_C], tl.int32)
        elif POLICY == STREAMING:
            tier = tl.where(p < sinks, 1, 0)
        else:
            tier = tl.where(p < sinks, 2, tl.where(p > newest - recent, 1, 0))
        tier = tl.where(valid, tier, 3)
        if POLICY == H2O:
            s = tl.load(score_row + offs * stride_s, mask=valid, other=0.0)
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
    # Only NaN scores leave a block without a match; the clamp keeps even them inside the cache.
    return tl.minimum(best_slot, n - 1)


@triton.jit
def evict_head(k_row, v_row, pos_row, score_row, stride_k, stride_v, stride_p, stride_s, n, budget, sinks, D,
               RECENT_RATIO: tl.constexpr, POLICY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Evicts from one (sequence, KV head) holding n tokens until it holds budget: each round moves
    the last valid slot into the victim's (K, V, slot_pos, score) and frees the last slot
    (slot_pos -1, score 0). Returns the number of tokens kept, min(n, budget).

    RECENT_RATIO is a compile-time constant so that floor(budget * recent_ratio) is computed in
    double precision, exactly as the CPU kernel and the reference do.
    """
    keep = tl.maximum(budget, 0)
    recent = tl.floor(keep.to(tl.float64) * tl.full([], RECENT_RATIO, tl.float64)).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m = n
    for _ in range(keep, n):
        victim = find_victim(pos_row, score_row, stride_p, stride_s, m, sinks, recent, POLICY, BLOCK_C)
        last = m - 1
        move = victim != last
        tl.store(k_row + victim * stride_k + offs_d, tl.load(k_row + last * stride_k + offs_d, mask=d_mask),
                 mask=d_mask & move)
        tl.store(v_row + victim * stride_v + offs_d, tl.load(v_row + last * stride_v + offs_d, mask=d_mask),
                 mask=d_mask & move)
        last_pos = tl.load(pos_row + last * stride_p)
        last_score = tl.load(score_row + last * stride_s)
        tl.store(pos_row + victim * stride_p, tl.where(move, last_pos, -1))
        tl.store(score_row + victim * stride_s, tl.where(move, last_score, 0.0))
        tl.store(pos_row + last * stride_p, -1, mask=move)
        tl.store(score_row + last * stride_s, 0.0, mask=move)
        # The next round's search reads what other threads of this program just wrote.
        tl.debug_barrier()
        m = last
    return m


@triton.jit
def _append_kernel(k_ptr, v_ptr, lens_ptr, pos_ptr, score_ptr, knew_ptr, vnew_ptr, tokpos_ptr,
                   stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
                   stride_pb, stride_ph, stride_pc, stride_sb, stride_sh, stride_sc,
                   stride_nb, stride_nh, stride_wb, stride_wh,
                   Hkv, C, D, BLOCK_D: tl.constexpr):
    # One program per sequence: it reads lens[b] and writes it back, so no other program races it.
    b = tl.program_id(0).to(tl.int64)
    slot = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), C)
    room = slot < C
    position = tl.load(tokpos_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = (offs_d < D) & room
    for h in range(0, Hkv):
        k = tl.load(knew_ptr + b * stride_nb + h * stride_nh + offs_d, mask=d_mask)
        v = tl.load(vnew_ptr + b * stride_wb + h * stride_wh + offs_d, mask=d_mask)
        tl.store(k_ptr + b * stride_kb + h * stride_kh + slot * stride_kc + offs_d, k, mask=d_mask)
        tl.store(v_ptr + b * stride_vb + h * stride_vh + slot * stride_vc + offs_d, v, mask=d_mask)
        tl.store(pos_ptr + b * stride_pb + h * stride_ph + slot * stride_pc, position, mask=room)
        tl.store(score_ptr + b * stride_sb + h * stride_sh + slot * stride_sc, 0.0, mask=room)
    tl.store(lens_ptr + b, slot + 1, mask=room)


@triton.jit
def _evict_kernel(k_ptr, v_ptr, n_ptr, lens_ptr, pos_ptr, score_ptr, budget_ptr,
                  stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
                  stride_pb, stride_ph, stride_pc, stride_sb, stride_sh, stride_sc,
                  C, D, sinks, RECENT_RATIO: tl.constexpr, POLICY: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (sequence, KV head). n_ptr holds lens as it was before the launch: lens itself
    # is rewritten by the head-0 program while the others may still be starting.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n = tl.minimum(tl.maximum(tl.load(n_ptr + b), 0), C)
    kept = evict_head(k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
                      pos_ptr + b * stride_pb + h * stride_ph, score_ptr + b * stride_sb + h * stride_sh,
                      stride_kc, stride_vc, stride_pc, stride_sc, n, tl.load(budget_ptr + b), sinks, D,
                      RECENT_RATIO, POLICY, BLOCK_C, BLOCK_D)
    tl.store(lens_ptr + b, kept, mask=h == 0)


# Tile helpers run on every eager launch: cached, since triton's host helpers cost microseconds.
@functools.lru_cache(maxsize=1024)
def block_d(D):
    return max(16, triton.next_power_of_2(D))


@functools.lru_cache(maxsize=1024)
def evict_block(C):
    """Slots per step of the victim search: wide, since one program scans a whole (sequence, head)
    and each step waits for its loads (a 16k-slot head takes 4 steps)."""
    return min(4096, max(16, triton.next_power_of_2(C)))


def cache_append_(k_cache, v_cache, lens, slot_pos, scores, k_new, v_new, pos):
    """Triton launcher of torch.ops.squeeze.cache_append_ (see squeeze_ops.ops.cache_append_)."""
    _meta.cache_append_(k_cache, v_cache, lens, slot_pos, scores, k_new, v_new, pos)
    B, Hkv, C, D = k_cache.shape
    if value_checks_wanted(lens):
        check_values(C, lens, append=True, pos=pos)
    _append_kernel[(B,)](
        k_cache, v_cache, lens, slot_pos, scores, k_new, v_new, pos,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *slot_pos.stride(), *scores.stride(),
        *k_new.stride()[:2], *v_new.stride()[:2],
        Hkv, C, D, BLOCK_D=block_d(D), enable_fp_fusion=FP_FUSION,
    )


def cache_evict_(k_cache, v_cache, lens, slot_pos, scores, budget, policy, sinks, recent_ratio):
    """Triton launcher of torch.ops.squeeze.cache_evict_ (see squeeze_ops.ops.cache_evict_)."""
    _meta.cache_evict_(k_cache, v_cache, lens, slot_pos, scores, budget, policy, sinks, recent_ratio)
    B, Hkv, C, D = k_cache.shape
    if value_checks_wanted(lens):
        check_values(C, lens, budget=budget)
    _evict_kernel[(B, Hkv)](
        k_cache, v_cache, lens.clone(), lens, slot_pos, scores, budget,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *slot_pos.stride(), *scores.stride(),
        C, D, sinks, RECENT_RATIO=float(recent_ratio), POLICY=POLICY_CODES[policy],
        BLOCK_C=evict_block(C), BLOCK_D=block_d(D), num_warps=8, enable_fp_fusion=FP_FUSION,
    )
