"""compress_kv_ on the GPU: builds one layer's paged rows from the packed prompt K/V in one
launch, one program per (sequence, KV head), with no host sync (a second, small launch first
pools the column scores over neighbouring positions when pool_size > 1).

The kept positions of an n-token prompt, in ascending order, are a head [head_lo, head_hi),
the `heavy` highest-scoring positions of the middle [head_hi, tail_lo) (h2o only) and a tail
[tail_lo, n); the bounds follow from n, the budget, the policy, sinks and R (see
csrc/cpu/compress_kv.cpp, keep_plan, for why they equal step-by-step eviction). The heavy
hitters are found by a threshold on the device: scores map to order-preserving 32-bit keys,
and a bitwise binary search finds the largest (key, position) pair tau, pi such that `heavy`
middle tokens have (key, position) >= (tau, pi) (ties go to the larger position). A final
pass compacts the kept tokens into slots 0 .. lens-1 with a prefix sum and copies their K/V
through the row's block table (common.row_slots: a page id outside the pool is never followed).
Scores compare as common.score_key does: NaN counts as -inf.
"""
import triton
import triton.language as tl

from squeeze_ops import _checks
from squeeze_ops.vocabulary import POLICY_CODES

from . import FP_FUSION
from .common import H2O, row_slots, score_key, sequence_bounds


@triton.jit
def _order_keys(s):
    """fp32 scores -> int64 keys in [0, 2^32) in the same order (-0.0 counted as +0.0, NaN as -inf)."""
    s = score_key(s)
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
def _pool_kernel(Scores, Pooled, CU, T_total, RADIUS: tl.constexpr, MAX: tl.constexpr, HKV: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Pooled[t, g] = max or mean of score_key(Scores) over the positions t - RADIUS .. t + RADIUS
    of t's sequence; one program per (sequence, KV head)."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    start, n = sequence_bounds(CU, b, T_total)
    S = Scores + start * HKV + g
    for c0 in range(0, n, BLOCK):
        pos = c0 + tl.arange(0, BLOCK)
        ok = pos < n
        acc = tl.full([BLOCK], float("-inf") if MAX else 0.0, tl.float32)
        for d in tl.static_range(-RADIUS, RADIUS + 1):
            at = pos + d
            inside = ok & (at >= 0) & (at < n)
            x = score_key(tl.load(S + at * HKV, mask=inside, other=0.0))
            if MAX:
                acc = tl.where(inside, tl.maximum(acc, x), acc)
            else:
                acc += tl.where(inside, x, 0.0)
        if not MAX:
            width = tl.maximum(tl.minimum(pos + RADIUS + 1, n) - tl.maximum(pos - RADIUS, 0), 1)
            acc = acc / width.to(tl.float32)
        tl.store(Pooled + (start + pos) * HKV + g, acc, mask=ok)


@triton.jit
def _compress_kv_kernel(K, V, Scores, CU, Budget, Recent, KP, VP, PosP, ScoreP, Table, Lens,
                        sk_t, sk_h, sv_t, sv_h, skp_p, skp_s, svp_p, svp_s, spp_p, spp_s, ssp_p, ssp_s,
                        T_total, M, P, sinks,
                        HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                        POLICY: tl.constexpr, HAS_SCORES: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    row = b.to(tl.int64) * HKV + g
    C = M * PAGE
    table_row = Table + row * M
    start, n = sequence_bounds(CU, b, T_total)
    budget = tl.minimum(tl.maximum(tl.load(Budget + row), 0), C)
    keep = tl.minimum(n, budget)
    tl.store(Lens + row, keep)

    # The plan (head_lo, head_hi, tail_lo, heavy); `window` comes with sinks = 0.
    n_sinks = tl.minimum(sinks, n)
    head_hi = n_sinks
    head_lo = n_sinks - tl.minimum(budget, n_sinks)
    tail_lo = n - tl.maximum(budget - n_sinks, 0)
    heavy = tl.zeros([], tl.int32)
    if POLICY == H2O:
        recent_start = tl.maximum(n - tl.load(Recent + row), n_sinks)
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
    heavy_seen = tl.zeros([], tl.int32)
    for c0 in range(0, n, BLOCK_T):
        pos = c0 + tl.arange(0, BLOCK_T)
        ok = pos < n
        if HAS_SCORES:
            s = score_key(tl.load(S + pos * HKV, mask=ok, other=0.0))
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
        page, at, on_page = row_slots(table_row, slot, C, P, PAGE)
        kept = (in_head | in_tail | is_heavy) & on_page
        tl.store(PosP + page * spp_p + at * spp_s, pos, mask=kept)
        tl.store(ScoreP + page * ssp_p + at * ssp_s, s, mask=kept)
        src = (start + pos)[:, None]
        copy = kept[:, None] & dim_ok[None, :]
        k_rows = tl.load(K + src * sk_t + g * sk_h + dims[None, :], mask=copy)
        tl.store(KP + page[:, None] * skp_p + at[:, None] * skp_s + dims[None, :], k_rows, mask=copy)
        v_rows = tl.load(V + src * sv_t + g * sv_h + dims[None, :], mask=copy)
        tl.store(VP + page[:, None] * svp_p + at[:, None] * svp_s + dims[None, :], v_rows, mask=copy)

    # Unused slots of the row: empty position, no score (their K/V stay as they were).
    for c0 in range(keep, C, BLOCK_T):
        slot = c0 + tl.arange(0, BLOCK_T)
        page, at, on_page = row_slots(table_row, slot, C, P, PAGE)
        tl.store(PosP + page * spp_p + at * spp_s, tl.full([BLOCK_T], -1, tl.int32), mask=on_page)
        tl.store(ScoreP + page * ssp_p + at * ssp_s, tl.zeros([BLOCK_T], tl.float32), mask=on_page)

NUM_WARPS = 4


def tiles(device_type):
    """(BLOCK, BLOCK_T) of a launch on `device_type`: positions per chunk of the heavy-hitter
    threshold search, tokens per chunk of the copy. The interpreter (CPU tensors) gets small
    chunks so that small tests cross chunk boundaries."""
    return (1024, 64) if device_type == "cuda" else (64, 16)


def compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio, pool_size, pool_mode,
                 k_pages, v_pages, pos_pages, score_pages, block_table, lens):
    """Launcher of torch.ops.squeeze.compress_kv_ (see squeeze_ops.ops.compress_kv_).
    Budgets above a row's capacity are clamped to it (an error when value checks run)."""
    _checks.compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio, pool_size, pool_mode,
                         k_pages, v_pages, pos_pages, score_pages, block_table, lens)
    T, Hkv, D = k.shape
    P, PAGE, _ = k_pages.shape
    B, _, M = block_table.shape
    if _checks.value_checks_wanted(budget):
        _checks.check_cu_seqlens_values(cu_seqlens, T, ref_name="k")
        _checks.check_paged_values(M * PAGE, lens.new_zeros(lens.shape), budget=budget, block_table=block_table,
                                   num_pages=P)
    if B == 0:
        return
    block, block_t = tiles(k.device.type)
    has_scores = scores.numel() > 0
    if has_scores and pool_size > 1:
        pooled = scores.new_empty(scores.shape)
        # A radius past T - 1 reaches no further inside any sequence, and RADIUS unrolls a loop.
        radius = min(pool_size // 2, max(T - 1, 0))
        _pool_kernel[(B, Hkv)](scores, pooled, cu_seqlens, T, RADIUS=radius, MAX=pool_mode == "max",
                               HKV=Hkv, BLOCK=block_t, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)
        scores = pooled
    # R = floor(budget * recent_ratio) in float64, as the CPU kernel and the reference do
    # (float32 would give floor(10 * 0.7) = 6).
    recent = (budget.clamp(0, M * PAGE).double() * recent_ratio).floor().int() if policy == "h2o" else budget
    _compress_kv_kernel[(B, Hkv)](
        k, v, scores if has_scores else score_pages, cu_seqlens, budget, recent,
        k_pages, v_pages, pos_pages, score_pages, block_table, lens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_pages.stride()[:2], *v_pages.stride()[:2],
        *pos_pages.stride(), *score_pages.stride(),
        T, M, P, 0 if policy == "window" else sinks,
        HKV=Hkv, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(max(D, 1)), PAGE=PAGE,
        POLICY=POLICY_CODES[policy], HAS_SCORES=has_scores,
        BLOCK=block, BLOCK_T=block_t, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)
