"""compress_kv_ on the GPU: builds a layer cache from the packed prompt K/V in one launch,
one program per (sequence, KV head), with no host sync.

The kept positions of an n-token prompt, in ascending order, are a head [head_lo, head_hi),
the `heavy` highest-scoring positions of the middle [head_hi, tail_lo) (h2o only) and a tail
[tail_lo, n); the bounds follow from n, the budget, the policy, sinks and R (see
csrc/cpu/compress_kv.cpp, keep_plan, for why they equal step-by-step eviction). The heavy
hitters are found by a threshold on the device: scores map to order-preserving 32-bit keys,
and a bitwise binary search finds the largest (key, position) pair tau, pi such that `heavy`
middle tokens have (key, position) >= (tau, pi) (ties go to the larger position). A final
pass compacts the kept tokens into slots 0 .. lens-1 with a prefix sum and copies their K/V.
"""
import triton
import triton.language as tl

from squeeze_ops import _checks
from squeeze_ops.vocabulary import POLICY_CODES

from . import FP_FUSION
from .common import H2O, sequence_bounds


@triton.jit
def _order_keys(s):
    """fp32 scores -> int64 keys in [0, 2^32) in the same order (-0.0 counted as +0.0)."""
    bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648


@triton.jit
def _count_at_least(S, s_t, lo, hi, tau, pi, BLOCK: tl.constexpr):
    """Number of positions p in [lo, hi) with (key(S[p]), p) >= (tau, pi)."""
    count = tl.zeros([], tl.int32)
    for c0 in range(lo, hi, BLOCK):
        pos = c0 + tl.arange(0, BLOCK)
        ok = pos < hi
        key = _order_keys(tl.load(S + pos * s_t, mask=ok, other=0.0))
        count += tl.sum((ok & ((key > tau) | ((key == tau) & (pos >= pi)))).to(tl.int32), 0)
    return count


@triton.jit
def _compress_kv_kernel(K, V, Scores, CU, Budget, Recent, KC, VC, Lens, SlotPos, CacheScores,
                        sk_t, sk_h, sv_t, sv_h, skc_b, skc_h, skc_c, svc_b, svc_h, svc_c,
                        T_total, C, sinks,
                        HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        POLICY: tl.constexpr, HAS_SCORES: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    start, n = sequence_bounds(CU, b, T_total)
    budget = tl.minimum(tl.maximum(tl.load(Budget + b), 0), C)
    keep = tl.minimum(n, budget)
    if g == 0:
        tl.store(Lens + b, keep)

    # The plan (head_lo, head_hi, tail_lo, heavy); `window` comes with sinks = 0.
    n_sinks = tl.minimum(sinks, n)
    head_hi = n_sinks
    head_lo = n_sinks - tl.minimum(budget, n_sinks)
    tail_lo = n - tl.maximum(budget - n_sinks, 0)
    heavy = tl.zeros([], tl.int32)
    if POLICY == H2O:
        recent_start = tl.maximum(n - tl.load(Recent + b), n_sinks)
        protected = n_sinks + n - recent_start
        fits = budget >= protected
        head_lo = tl.where(fits, 0, head_lo)
        tail_lo = tl.where(fits, recent_start, tail_lo)
        heavy = tl.where(fits, budget - protected, 0)
    everything = n <= budget
    head_lo = tl.where(everything, 0, head_lo)
    head_hi = tl.where(everything, 0, head_hi)
    tail_lo = tl.where(everything, n - keep, tail_lo)
    heavy = tl.where(everything, 0, heavy)

    S = Scores + start * HKV + g
    # Threshold (tau, pi) of the heavy hitters: bit by bit, the largest pair that still has
    # `heavy` middle tokens at or above it. With no heavy hitter the search range is empty.
    tau = tl.zeros([], tl.int64)
    pi = tl.zeros([], tl.int32)
    if POLICY == H2O:
        search_hi = tl.where(heavy > 0, tail_lo, head_hi)
        step = tl.full([], 1 << 31, tl.int64)
        for _ in range(32):
            fits = _count_at_least(S, HKV, head_hi, search_hi, tau + step, 0, BLOCK) >= heavy
            tau = tl.where(fits, tau + step, tau)
            step = step // 2
        pos_step = tl.full([], 1, tl.int32)
        while pos_step * 2 <= n:
            pos_step *= 2
        while pos_step > 0:
            fits = _count_at_least(S, HKV, head_hi, search_hi, tau, pi + pos_step, BLOCK) >= heavy
            pi = tl.where(fits, pi + pos_step, pi)
            pos_step = pos_step // 2

    # Compaction: head, then heavy hitters in position order (prefix sum), then tail.
    n_head = head_hi - head_lo
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    row = (b * HKV + g).to(tl.int64) * C
    KC_bg = KC + b.to(tl.int64) * skc_b + g * skc_h
    VC_bg = VC + b.to(tl.int64) * svc_b + g * svc_h
    heavy_seen = tl.zeros([], tl.int32)
    for c0 in range(0, n, BLOCK_T):
        pos = c0 + tl.arange(0, BLOCK_T)
        ok = pos < n
        if HAS_SCORES:
            s = tl.load(S + pos * HKV, mask=ok, other=0.0)
        else:
            s = tl.zeros([BLOCK_T], tl.float32)
        in_head = (pos >= head_lo) & (pos < head_hi)
        in_tail = ok & (pos >= tail_lo)
        is_heavy = (pos >= head_hi) & (pos < tail_lo) & (heavy > 0)  # all false unless h2o
        if POLICY == H2O:
            key = _order_keys(s)
            is_heavy = is_heavy & ((key > tau) | ((key == tau) & (pos >= pi)))
        heavy_i = is_heavy.to(tl.int32)
        heavy_before = heavy_seen + tl.cumsum(heavy_i, 0) - heavy_i
        heavy_seen += tl.sum(heavy_i, 0)
        slot = tl.where(in_head, pos - head_lo,
                        tl.where(in_tail, n_head + heavy + pos - tail_lo, n_head + heavy_before))
        kept = (in_head | in_tail | is_heavy) & (slot < C)
        tl.store(SlotPos + row + slot, pos, mask=kept)
        tl.store(CacheScores + row + slot, s, mask=kept)
        src = (start + pos)[:, None]
        copy = kept[:, None] & dim_ok[None, :]
        k_rows = tl.load(K + src * sk_t + g * sk_h + dims[None, :], mask=copy)
        tl.store(KC_bg + slot[:, None] * skc_c + dims[None, :], k_rows, mask=copy)
        v_rows = tl.load(V + src * sv_t + g * sv_h + dims[None, :], mask=copy)
        tl.store(VC_bg + slot[:, None] * svc_c + dims[None, :], v_rows, mask=copy)

    # Unused slots: empty position, no score (their K/V stay as they were).
    for c0 in range(keep, C, BLOCK_T):
        slot = c0 + tl.arange(0, BLOCK_T)
        free = slot < C
        tl.store(SlotPos + row + slot, tl.full([BLOCK_T], -1, tl.int32), mask=free)
        tl.store(CacheScores + row + slot, tl.zeros([BLOCK_T], tl.float32), mask=free)

NUM_WARPS = 4


def tiles(device_type):
    """(BLOCK, BLOCK_T) of a launch on `device_type`: positions per chunk of the heavy-hitter
    threshold search, tokens per chunk of the copy. The interpreter (CPU tensors) gets small
    chunks so that small tests cross chunk boundaries."""
    return (1024, 64) if device_type == "cuda" else (64, 16)


def compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio,
                 k_cache, v_cache, lens, slot_pos, cache_scores):
    """Launcher of torch.ops.squeeze.compress_kv_ (see squeeze_ops.ops.compress_kv_).
    Budgets above the capacity are clamped to it (an error under SQUEEZE_DEBUG=1)."""
    _checks.compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio,
                       k_cache, v_cache, lens, slot_pos, cache_scores)
    T, Hkv, D = k.shape
    B, C = budget.shape[0], k_cache.shape[2]
    if _checks.value_checks_wanted(budget):
        _checks.check_cu_seqlens_values(cu_seqlens, T, ref_name="k")
        _checks.check(bool(((budget >= 0) & (budget <= C)).all()),
                    f"budget: expected values in [0, {C}] (the cache capacity), got {budget.tolist()}")
    if B == 0 or Hkv == 0:
        return
    # R = floor(budget * recent_ratio) in float64, as the CPU kernel and the reference do
    # (float32 would give floor(10 * 0.7) = 6).
    recent = (budget.clamp(0, C).double() * recent_ratio).floor().int() if policy == "h2o" else budget
    block, block_t = tiles(k.device.type)
    _compress_kv_kernel[(B, Hkv)](
        k, v, scores if scores.numel() else cache_scores, cu_seqlens, budget, recent,
        k_cache, v_cache, lens, slot_pos, cache_scores,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        T, C, 0 if policy == "window" else sinks,
        HKV=Hkv, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(max(D, 1)),
        POLICY=POLICY_CODES[policy], HAS_SCORES=scores.numel() > 0,
        BLOCK=block, BLOCK_T=block_t, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)
