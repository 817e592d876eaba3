"""Every Python check of the ops' arguments, in one place (the C++ kernels carry the same
checks through csrc/checks.h and csrc/paged.h):

- metadata checks (rank, shape, dtype, device, layout, overlap of written tensors) and the
  outputs' shapes: one function per op, registered as the op's fake kernel and called first by
  its Triton launcher, so the Python paths validate exactly alike;
- value checks (lengths, budgets, positions, offsets, block tables), which read tensors back
  to the host: the Triton launchers run them when `value_checks_wanted` says so, i.e. for CPU
  tensors and, on the GPU, only under SQUEEZE_DEBUG=1 (a host sync would break CUDA-graph
  capture). Without them the GPU kernels clamp every index they follow and never follow a page
  id outside the pool.
Every message names the argument and what was expected; every check runs before any write.
"""
import contextlib
import math
import os

import torch
from torch._subclasses.fake_tensor import is_fake

from .vocabulary import POLICIES, POOL_MODES

# Set by `forced_value_checks` (tests): overrides the device / SQUEEZE_DEBUG rule.
_FORCED = None

FLOAT_KV = (torch.float16, torch.bfloat16, torch.float32)
KMEANS_MAX_N = 256  # the CUDA kernel keeps a row in shared memory


def value_checks_wanted(t):
    """Whether the value checks of a call on tensor t's device run: for CPU tensors, and on the
    GPU only under SQUEEZE_DEBUG=1 (they synchronise with the host); never while torch.compile
    traces (a data-dependent check would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    if _FORCED is not None:
        return _FORCED
    return t.device.type == "cpu" or os.environ.get("SQUEEZE_DEBUG") == "1"


@contextlib.contextmanager
def forced_value_checks(enabled):
    """Within the block, value checks run (True) or not (False) whatever the device: tests use
    False to drive the Triton launchers on CPU tensors as they run on a GPU."""
    global _FORCED
    saved, _FORCED = _FORCED, enabled
    try:
        yield
    finally:
        _FORCED = saved


# ---- generic checks ----


def check(cond, msg):
    """Raise a ValueError naming the argument when `cond` is false (also on fake tensors). msg: the
    message, or a function making it, so that the checks every eager call runs format nothing
    when they pass."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def check_dtype(t, dtypes, name, what=""):
    """what: where the expected dtype comes from, e.g. " (that of k_pages)"."""
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    check(t.dtype in dtypes, lambda: f"{name}: expected dtype {' or '.join(map(str, dtypes))}{what}, got {t.dtype}")


def check_rank(t, rank, name):
    check(t.dim() == rank, lambda: f"{name}: expected a {rank}-d tensor, got shape {tuple(t.shape)}")


def check_shape(t, shape, name, what=""):
    check(tuple(t.shape) == tuple(shape), lambda: f"{name}: expected shape {tuple(shape)}{what}, got {tuple(t.shape)}")


def check_device(t, ref, name, ref_name):
    check(t.device == ref.device, lambda: f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def check_last_contiguous(t, name):
    check(t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1,
          lambda: f"{name}: last dimension must be contiguous, got strides {tuple(t.stride())}")


def check_contiguous(t, name):
    check(t.is_contiguous(), lambda: f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")


def check_policy(policy):
    check(policy in POLICIES, lambda: f"policy: expected one of {POLICIES}, got {policy!r}")


def check_scale(scale):
    check(math.isfinite(scale) and scale > 0, lambda: f"scale: expected a finite softmax scale > 0, got {scale}")


def check_policy_args(policy, sinks, recent_ratio):
    check_policy(policy)
    check(sinks >= 0, lambda: f"sinks: expected a non-negative number of sink tokens, got {sinks}")
    check(0.0 <= recent_ratio <= 1.0, lambda: f"recent_ratio: expected a value in [0, 1], got {recent_ratio}")


def check_index(t, shape, name, ref, ref_name, what=""):
    """An int32 contiguous index tensor (lengths, budgets, positions, offsets, page ids) of the
    given shape (what: where it comes from) on ref's device."""
    check_rank(t, len(shape), name)
    check_dtype(t, torch.int32, name)
    check_shape(t, shape, name, what)
    check_device(t, ref, name, ref_name)
    check_contiguous(t, name)


def check_cu_seqlens(cu_seqlens, ref, ref_name):
    """int32 [B + 1], B >= 0, contiguous, on ref's device."""
    check_rank(cu_seqlens, 1, "cu_seqlens")
    check(cu_seqlens.shape[0] >= 1, lambda: f"cu_seqlens: expected B + 1 >= 1 entries, got shape "
          f"{tuple(cu_seqlens.shape)}")
    check_index(cu_seqlens, tuple(cu_seqlens.shape), "cu_seqlens", ref, ref_name)


# ---- memory overlap (the rules of PyTorch's in-place ops) ----


def _dense(t):
    """Whether t's elements fill one range of memory without gaps or repeats (some order of
    its dims is contiguous)."""
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _span(t):
    """[first byte, end byte) of a dense tensor's elements."""
    start = t.storage_offset() * t.element_size()
    return start, start + t.numel() * t.element_size()


def has_internal_overlap(t):
    """Whether two elements of t share memory (a dim of size > 1 with stride 0, as an expand()
    makes); only that case is detected, as in PyTorch."""
    return any(s > 1 and st == 0 for s, st in zip(t.shape, t.stride()))


def overlaps(a, b):
    """Whether a and b share memory, where it can be told cheaply (as at::get_overlap_status):
    the same view, or two dense tensors whose memory ranges intersect. Interleaved views of one
    buffer (e.g. K and V pages of a [P, 2, S, D] pool) count as disjoint."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride():
        return True
    if _dense(a) and _dense(b):
        (a0, a1), (b0, b1) = _span(a), _span(b)
        return a0 < b1 and b0 < a1
    return False


def _memory_key(t):
    """(device, storage address) of a tensor whose memory can be compared; None for None,
    empty, meta and fake (tracing) tensors. A plain torch.Tensor is never fake: the costlier
    is_fake runs for subclasses only."""
    if t is None or t.numel() == 0 or t.device.type == "meta" or (type(t) is not torch.Tensor and is_fake(t)):
        return None
    return t.device, t.untyped_storage().data_ptr()


def check_written(written, read=()):
    """written, read: sequences of (tensor, name). A written tensor must not overlap itself
    (the result would depend on the order of the writes), nor another argument. Only tensors
    of one storage can overlap, so the pairs are compared within each storage."""
    for t, name in written:
        if t is None:
            continue
        check(not has_internal_overlap(t), lambda: f"{name}: a written tensor must not overlap itself (an expanded "
              f"view, strides {tuple(t.stride())}); pass a materialised tensor")
    storages = {}
    for args, is_written in ((written, True), (read, False)):  # written first: they name the error
        for t, name in args:
            key = _memory_key(t)
            if key is not None:
                storages.setdefault(key, []).append((t, name, is_written))
    for group in storages.values():
        for i, (t, name, is_written) in enumerate(group):
            if not is_written:
                break
            for other, other_name, _ in group[i + 1 :]:
                check(not overlaps(t, other), lambda: f"{name}: must not share memory with {other_name}")


# ---- value checks (host reads) ----


def check_cu_seqlens_values(cu_seqlens, total_tokens, max_seqlen=None, ref_name="q"):
    """cu_seqlens starts at 0, never decreases and ends at the total_tokens packed tokens of
    ref_name; max_seqlen (if given) covers every sequence."""
    cu = cu_seqlens.cpu().long()
    check(int(cu[0]) == 0, lambda: f"cu_seqlens: expected cu_seqlens[0] == 0, got {int(cu[0])}")
    lengths = cu[1:] - cu[:-1]
    check(bool((lengths >= 0).all()), lambda: f"cu_seqlens: expected non-decreasing offsets, got {cu.tolist()}")
    check(int(cu[-1]) == total_tokens, lambda: f"cu_seqlens: expected the last offset to equal the {total_tokens} "
          f"packed tokens of {ref_name}, got {int(cu[-1])}")
    if max_seqlen is not None and lengths.numel():
        longest = int(lengths.max())
        check(longest <= max_seqlen, lambda: f"max_seqlen: expected >= every sequence length, got {max_seqlen} < "
              f"{longest}")


def _first(mask, t):
    """(index tuple, value) of the first True of mask in t, for messages."""
    where = tuple(int(i) for i in mask.nonzero()[0])
    return list(where), int(t[where])


def check_block_table_values(block_table, num_pages):
    """Page ids in [-1, P) (-1: no page), and no page listed twice in the call: by two rows, or
    by two entries of one row (its slots would overlap)."""
    table = block_table.cpu()
    bad = (table < -1) | (table >= num_pages)
    if bool(bad.any()):
        where, value = _first(bad, table)
        check(False, f"block_table: expected page ids in [-1, {num_pages}) (-1: no page), got block_table{where} "
              f"= {value}")
    pages = table[table >= 0]
    unique, counts = pages.unique(return_counts=True)
    if bool((counts > 1).any()):
        page = int(unique[counts > 1][0])
        rows = (table == page).nonzero()[:2, :2].tolist()
        check(False, f"block_table: page {page} is listed twice (by rows {rows[0]} and {rows[1]}, as "
              f"[sequence, KV head]); a page belongs to one row, at one entry")


def check_paged_values(capacity, lens, *, append=False, budget=None, pos=None, block_table=None, num_pages=None):
    """The value checks of the paged ops: 0 <= lens <= C (< C when appending: the new token needs
    a slot), 0 <= budget <= C, pos >= 0, block_table's page ids, where C = M * page_size is a
    row's capacity."""
    lens_h = lens.cpu()
    for bad, what in ((lens_h < 0, "expected non-negative lengths"), (lens_h > capacity, f"exceeds the capacity "
                      f"C = {capacity} of a row (block_table width x page size)")):
        if bool(bad.any()):
            where, value = _first(bad, lens_h)
            check(False, f"lens: lens{where} = {value}: {what}")
    if append and bool((lens_h >= capacity).any()):
        where, value = _first(lens_h >= capacity, lens_h)
        check(False, f"lens: capacity overflow: row {where} already holds {value} tokens, the capacity C = "
              f"{capacity} of a row (block_table width x page size), so no slot is left to append to")
    if budget is not None:
        budget_h = budget.cpu()
        for bad, what in ((budget_h < 0, "expected non-negative budgets"),
                          (budget_h > capacity, f"exceeds the capacity C = {capacity} of a row (block_table "
                                                "width x page size)")):
            if bool(bad.any()):
                where, value = _first(bad, budget_h)
                check(False, f"budget: budget{where} = {value}: {what}")
    if pos is not None:
        pos_h = pos.cpu()
        if bool((pos_h < 0).any()):
            where, value = _first(pos_h < 0, pos_h)
            check(False, f"pos: expected non-negative token positions, got pos{where} = {value}")
    if block_table is not None:
        check_block_table_values(block_table, num_pages)


# ---- layer dimension ----


def _check_epilogue(residual, attn_out, cu_seqlens, cos_sum, weight=None):
    check_dtype(residual, FLOAT_KV, "residual")
    check_rank(residual, 2, "residual")
    check_last_contiguous(residual, "residual")
    check_dtype(attn_out, residual.dtype, "attn_out", " (that of residual)")
    check_shape(attn_out, residual.shape, "attn_out", " (that of residual)")
    check_last_contiguous(attn_out, "attn_out")
    check_device(attn_out, residual, "attn_out", "residual")
    if weight is not None:
        check_dtype(weight, FLOAT_KV, "weight")
        check_shape(weight, (residual.shape[1],), "weight", " (the width of residual)")
        check_device(weight, residual, "weight", "residual")
    check_cu_seqlens(cu_seqlens, residual, "residual")
    check_dtype(cos_sum, torch.float32, "cos_sum")
    check_rank(cos_sum, 1, "cos_sum")
    check(cos_sum.shape[0] == cu_seqlens.shape[0] - 1,
          lambda: f"cos_sum: expected {cu_seqlens.shape[0] - 1} entries (one per sequence of cu_seqlens), "
          f"got shape {tuple(cos_sum.shape)}")
    check_device(cos_sum, residual, "cos_sum", "residual")
    check_written([(residual, "residual"), (cos_sum, "cos_sum")],
                  [(attn_out, "attn_out"), (weight, "weight"), (cu_seqlens, "cu_seqlens")])


def add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps):
    _check_epilogue(residual, attn_out, cu_seqlens, cos_sum, weight)
    check(math.isfinite(eps) and eps >= 0, lambda: f"eps: expected a finite eps >= 0, got {eps}")
    return residual.new_empty(residual.shape)


def add_cossim(residual, attn_out, cu_seqlens, cos_sum):
    _check_epilogue(residual, attn_out, cu_seqlens, cos_sum)


def _check_kmeans(x, k, name):
    check_dtype(x, torch.float32, name)
    check_rank(x, 2, name)
    check_last_contiguous(x, name)
    n = x.shape[1]
    check(n <= KMEANS_MAX_N, lambda: f"{name}: at most {KMEANS_MAX_N} values per row, got {n}")
    check(k >= 1, lambda: f"k: expected k >= 1, got {k}")
    check(k <= n, lambda: f"k: expected k <= {n} (the number of values per row of {name}), got {k}")


def kmeans1d(x, k):
    _check_kmeans(x, k, "x")
    return x.new_empty(x.shape, dtype=torch.int32), x.new_empty((x.shape[0], k))


def layer_budgets(sim, base, p, k, min_budget, max_budget):
    _check_kmeans(sim, k, "sim")
    B = sim.shape[0]
    check_dtype(base, torch.float32, "base")
    check_shape(base, (B,), "base", " (one per row of sim)")
    check_device(base, sim, "base", "sim")
    check(p > 0 and math.isfinite(p), lambda: f"p: expected a finite p > 0, got {p}")
    check(0 <= min_budget <= 2**31 - 1, lambda: f"min_budget: expected 0 <= min_budget < 2**31, got {min_budget}")
    if max_budget is not None:
        check_dtype(max_budget, torch.int32, "max_budget")
        check_shape(max_budget, (B,), "max_budget", " (one per row of sim)")
        check_device(max_budget, sim, "max_budget", "sim")
    budgets = sim.new_empty(sim.shape, dtype=torch.int32)
    return budgets, sim.new_empty(sim.shape, dtype=torch.int32), sim.new_empty((B, k))

# ---- prefill ----


def _check_packed(t, name):
    check_rank(t, 3, name)
    check_dtype(t, FLOAT_KV, name)
    check_last_contiguous(t, name)


def prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_queries):
    """q [T, H, D], k/v [T, Hkv, D] (same dtype), cu_seqlens int32 [B+1] ->
    out [T, H, D] (q's dtype), lse fp32 [T, H], scores fp32 [T, Hkv] ([0, Hkv] if score_queries < 0)."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_packed(t, name)
        check_device(t, q, name, "q")
    T, H, D = q.shape
    Hkv = k.shape[1]
    check(k.dtype == q.dtype and v.dtype == q.dtype,
          lambda: f"k, v: expected dtype {q.dtype} (that of q), got {k.dtype} and {v.dtype}")
    check_shape(v, k.shape, "v", " (that of k)")
    check(k.shape[0] == T, lambda: f"k: expected {T} tokens (those of q), got shape {tuple(k.shape)}")
    check(k.shape[2] == D, lambda: f"k: expected head dim {D} (that of q), got shape {tuple(k.shape)}")
    check(Hkv > 0 and H % Hkv == 0,
          lambda: f"k: the number of KV heads ({Hkv}) must divide the number of query heads of q ({H})")
    check_cu_seqlens(cu_seqlens, q, "q")
    check(max_seqlen >= 0, lambda: f"max_seqlen: expected >= 0, got {max_seqlen}")
    check_scale(scale)
    check(score_queries >= -1, lambda: f"score_queries: expected -1 (none), 0 (all) or W > 0, got {score_queries}")
    out = q.new_empty(T, H, D)
    lse = q.new_empty(T, H, dtype=torch.float32)
    scores = q.new_empty(T if score_queries >= 0 else 0, Hkv, dtype=torch.float32)
    return out, lse, scores


# ---- the paged KV cache ----


def check_pool(k_pages, v_pages, pos_pages=None, score_pages=None):
    """K/V pages [P, S, D] (fp16/bf16/fp32, last dim contiguous, one dtype), position pages
    int32 [P, S], score pages fp32 [P, S] (last dims contiguous). Returns (P, S, D)."""
    check_rank(k_pages, 3, "k_pages")
    check_dtype(k_pages, FLOAT_KV, "k_pages")
    check_last_contiguous(k_pages, "k_pages")
    check_shape(v_pages, k_pages.shape, "v_pages", " (that of k_pages)")
    check_dtype(v_pages, k_pages.dtype, "v_pages", " (that of k_pages)")
    check_device(v_pages, k_pages, "v_pages", "k_pages")
    check_last_contiguous(v_pages, "v_pages")
    P, S, D = k_pages.shape
    check(S > 0, lambda: f"k_pages: expected a page size > 0, got shape {tuple(k_pages.shape)}")
    for t, name, dtype in ((pos_pages, "pos_pages", torch.int32), (score_pages, "score_pages", torch.float32)):
        if t is not None:
            check_rank(t, 2, name)
            check_shape(t, (P, S), name, " (that of k_pages without D)")
            check_dtype(t, dtype, name)
            check_device(t, k_pages, name, "k_pages")
            check_last_contiguous(t, name)
    return P, S, D


def check_rows(block_table, lens, k_pages):
    """block_table int32 [B, Hkv, M] (Hkv > 0), lens int32 [B, Hkv], both contiguous on the
    pool's device. Returns (B, Hkv, M)."""
    check_rank(block_table, 3, "block_table")
    check_dtype(block_table, torch.int32, "block_table")
    check_device(block_table, k_pages, "block_table", "k_pages")
    check_contiguous(block_table, "block_table")
    B, Hkv, M = block_table.shape
    check(Hkv > 0, lambda: f"block_table: expected at least one KV head, got shape {tuple(block_table.shape)}")
    check_index(lens, (B, Hkv), "lens", k_pages, "k_pages", " (the rows of block_table)")
    return B, Hkv, M


def _check_query(q, B, Hkv, D, k_pages):
    """q [B, H, D] in the pool's dtype with H a positive multiple of Hkv."""
    check_rank(q, 3, "q")
    check(q.shape[0] == B and q.shape[2] == D, lambda: f"q: expected shape ({B}, H, {D}) (the rows of block_table "
          f"and the head dim of k_pages), got {tuple(q.shape)}")
    check(q.shape[1] > 0 and q.shape[1] % Hkv == 0, lambda: f"q: the number of query heads ({q.shape[1]}) must be "
          f"a positive multiple of the number of KV heads ({Hkv})")
    check_dtype(q, k_pages.dtype, "q", " (that of k_pages)")
    check_device(q, k_pages, "q", "k_pages")
    check_last_contiguous(q, "q")


def _check_new_token(k_new, v_new, pos, B, Hkv, D, k_pages):
    """k_new, v_new [B, Hkv, D] in the pool's dtype, pos int32 [B]."""
    for t, name in ((k_new, "k_new"), (v_new, "v_new")):
        check_rank(t, 3, name)
        check_shape(t, (B, Hkv, D), name, " (the rows of block_table and the head dim of k_pages)")
        check_dtype(t, k_pages.dtype, name, " (that of k_pages)")
        check_device(t, k_pages, name, "k_pages")
        check_last_contiguous(t, name)
    check_index(pos, (B,), "pos", k_pages, "k_pages", " (the sequences of block_table)")


def _cache_args(k_pages, v_pages, pos_pages, score_pages, block_table, lens):
    _, _, D = check_pool(k_pages, v_pages, pos_pages, score_pages)
    return (*check_rows(block_table, lens, k_pages), D)


_POOL_NAMES = ("k_pages", "v_pages", "pos_pages", "score_pages")


def decode_attention(q, k_pages, v_pages, block_table, lens, scale, score_pages):
    _, _, D = check_pool(k_pages, v_pages, None, score_pages)
    B, Hkv, _ = check_rows(block_table, lens, k_pages)
    _check_query(q, B, Hkv, D, k_pages)
    check_scale(scale)
    check_written([(score_pages, "score_pages")],
                  [(q, "q"), (k_pages, "k_pages"), (v_pages, "v_pages"), (block_table, "block_table"), (lens, "lens")])
    return q.new_empty(q.shape)


def cache_append_(k_pages, v_pages, pos_pages, score_pages, block_table, lens, k_new, v_new, pos):
    B, Hkv, _, D = _cache_args(k_pages, v_pages, pos_pages, score_pages, block_table, lens)
    _check_new_token(k_new, v_new, pos, B, Hkv, D, k_pages)
    check_written(list(zip((k_pages, v_pages, pos_pages, score_pages, lens), _POOL_NAMES + ("lens",))),
                  [(block_table, "block_table"), (k_new, "k_new"), (v_new, "v_new"), (pos, "pos")])


def cache_evict_(k_pages, v_pages, pos_pages, score_pages, block_table, lens, budget, policy, sinks, recent_ratio):
    B, Hkv, _, _ = _cache_args(k_pages, v_pages, pos_pages, score_pages, block_table, lens)
    check_index(budget, (B, Hkv), "budget", k_pages, "k_pages", " (the rows of block_table)")
    check_policy_args(policy, sinks, recent_ratio)
    check_written(list(zip((k_pages, v_pages, pos_pages, score_pages, lens), _POOL_NAMES + ("lens",))),
                  [(block_table, "block_table"), (budget, "budget")])


def decode_step_(q, k_new, v_new, pos, k_pages, v_pages, pos_pages, score_pages, block_table, lens, budget, scale,
                 policy, sinks, recent_ratio, accumulate_scores):
    B, Hkv, _, D = _cache_args(k_pages, v_pages, pos_pages, score_pages, block_table, lens)
    _check_query(q, B, Hkv, D, k_pages)
    _check_new_token(k_new, v_new, pos, B, Hkv, D, k_pages)
    check_index(budget, (B, Hkv), "budget", k_pages, "k_pages", " (the rows of block_table)")
    check_scale(scale)
    check_policy_args(policy, sinks, recent_ratio)
    check_written(list(zip((k_pages, v_pages, pos_pages, score_pages, lens), _POOL_NAMES + ("lens",))),
                  [(q, "q"), (block_table, "block_table"), (budget, "budget"), (k_new, "k_new"), (v_new, "v_new"),
                   (pos, "pos")])
    return q.new_empty(q.shape)


def compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio, pool_size, pool_mode,
                 k_pages, v_pages, pos_pages, score_pages, block_table, lens):
    """k/v [T, Hkv, D], scores fp32 [T, Hkv] or [0, Hkv], cu_seqlens int32 [B+1], budget int32
    [B, Hkv]; writes the rows of block_table [B, Hkv, M] in the pool and lens [B, Hkv]."""
    _check_packed(k, "k")
    _check_packed(v, "v")
    check_device(v, k, "v", "k")
    check(v.dtype == k.dtype, lambda: f"v: expected dtype {k.dtype} (that of k), got {v.dtype}")
    check_shape(v, k.shape, "v", " (that of k)")
    T, Hkv, D = k.shape
    check_policy_args(policy, sinks, recent_ratio)
    check(pool_size >= 1 and pool_size % 2 == 1, lambda: f"pool_size: expected an odd number of positions >= 1 "
          f"(1: no pooling), got {pool_size}")
    check(pool_mode in POOL_MODES, lambda: f"pool_mode: expected one of {POOL_MODES}, got {pool_mode!r}")
    check_rank(scores, 2, "scores")
    check_dtype(scores, torch.float32, "scores")
    check_device(scores, k, "scores", "k")
    check(scores.shape[1] == Hkv and scores.shape[0] in (0, T),
          lambda: f"scores: expected shape ({T}, {Hkv}) or (0, {Hkv}), got {tuple(scores.shape)}")
    check(policy != "h2o" or scores.shape[0] == T,
          lambda: f"scores: policy 'h2o' needs the column scores ({T}, {Hkv}) of prefill_attention, "
                  f"got shape {tuple(scores.shape)}")
    check_contiguous(scores, "scores")
    check_cu_seqlens(cu_seqlens, k, "k")
    B = cu_seqlens.shape[0] - 1
    check(k_pages.dtype == k.dtype, lambda: f"k_pages: expected dtype {k.dtype} (that of k), got {k_pages.dtype}")
    check_device(k_pages, k, "k_pages", "k")
    _, _, page_dim = check_pool(k_pages, v_pages, pos_pages, score_pages)
    check(page_dim == D, lambda: f"k_pages: expected head dim {D} (that of k), got shape {tuple(k_pages.shape)}")
    check(block_table.dim() == 3 and block_table.shape[:2] == (B, Hkv), lambda: f"block_table: expected shape "
          f"({B}, {Hkv}, M) (the sequences of cu_seqlens and the KV heads of k), got {tuple(block_table.shape)}")
    check_rows(block_table, lens, k_pages)
    check_index(budget, (B, Hkv), "budget", k, "k", " (the sequences of cu_seqlens and the KV heads of k)")
    check_written(list(zip((k_pages, v_pages, pos_pages, score_pages, lens), _POOL_NAMES + ("lens",))),
                  [(k, "k"), (v, "v"), (scores, "scores"), (cu_seqlens, "cu_seqlens"), (budget, "budget"),
                   (block_table, "block_table")])


FAKE_KERNELS = {
    # ---- layer dimension ----
    "add_rmsnorm_cossim": add_rmsnorm_cossim,
    "add_cossim": add_cossim,
    "kmeans1d": kmeans1d,
    "layer_budgets": layer_budgets,
    # ---- prefill ----
    "prefill_attention": prefill_attention,
    "compress_kv_": compress_kv_,
    # ---- decode ----
    "decode_attention": decode_attention,
    "cache_append_": cache_append_,
    "cache_evict_": cache_evict_,
    "decode_step_": decode_step_,
}
