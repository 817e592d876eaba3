"""Every Python check of the ops' arguments, in one place (the C++ kernels carry the same
checks through csrc/checks.h):

- metadata checks (rank, shape, dtype, device, layout) and the outputs' shapes: one function
  per op, registered as the op's fake kernel and called first by its Triton launcher, so the
  Python paths validate exactly alike;
- value checks (lengths, budgets, positions, offsets), which read tensors back to the host:
  the Triton launchers run them when `value_checks_wanted` says so, i.e. for CPU tensors and,
  on the GPU, only under SQUEEZE_DEBUG=1 (a host sync would break CUDA-graph capture). Without
  them the GPU kernels clamp every index they follow.
"""
import contextlib
import math
import os

import torch

from .vocabulary import POLICIES

# Set by `forced_value_checks` (tests): overrides the device / SQUEEZE_DEBUG rule.
_FORCED = None


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


def check(cond, msg):
    """Raise a ValueError naming the argument when `cond` is false (also on fake tensors). msg: the
    message, or a function making it, so that the checks every eager call runs format nothing
    when they pass."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def check_dtype(t, dtypes, name):
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    check(t.dtype in dtypes, lambda: f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")


def check_rank(t, rank, name):
    check(t.dim() == rank, lambda: f"{name}: expected a {rank}-d tensor, got shape {tuple(t.shape)}")


def check_device(t, ref, name, ref_name):
    check(t.device == ref.device, lambda: f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def check_policy(policy):
    check(policy in POLICIES, lambda: f"policy: expected one of {POLICIES}, got {policy!r}")


FLOAT_KV = (torch.float16, torch.bfloat16, torch.float32)

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


def check_cache_values(C, lens, *, append=False, budget=None, pos=None):
    """The value checks of the decode ops: 0 <= lens <= C (< C when appending), 0 <= budget <= C
    (<= C - 1 when appending: decode_step_ needs C >= budget + 1), pos >= 0."""
    for b, n in enumerate(lens.tolist()):
        check(n >= 0, lambda: f"lens: expected non-negative lengths, got lens[{b}] = {n}")
        check(n <= C, lambda: f"lens: lens[{b}] = {n} exceeds the cache capacity C = {C}")
        check(not append or n < C, lambda: f"lens: capacity overflow: sequence {b} already holds {n} tokens, the "
              f"capacity C of k_cache, so no slot is left to append to")
    if budget is not None:
        max_budget = C - 1 if append else C
        why = " minus the slot of the appended token (decode_step_ needs C >= budget + 1)" if append else ""
        for b, keep in enumerate(budget.tolist()):
            check(keep >= 0, lambda: f"budget: expected non-negative budgets, got budget[{b}] = {keep}")
            check(keep <= max_budget, lambda: f"budget: budget[{b}] = {keep} exceeds the capacity C = {C}{why}")
    if pos is not None:
        for b, p in enumerate(pos.tolist()):
            check(p >= 0, lambda: f"pos: expected non-negative token positions, got pos[{b}] = {p}")

# ---- layer dimension ----

KMEANS_MAX_N = 256  # the CUDA kernel keeps a row in shared memory


def _check_row_major(t, name):
    check(t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1,
          lambda: f"{name}: last dimension must be contiguous, got strides {tuple(t.stride())}")


def _check_epilogue(residual, attn_out, cu_seqlens, cos_sum):
    check_dtype(residual, FLOAT_KV, "residual")
    check_rank(residual, 2, "residual")
    _check_row_major(residual, "residual")
    check_dtype(attn_out, residual.dtype, "attn_out")
    check(attn_out.shape == residual.shape,
          lambda: f"attn_out: expected shape {tuple(residual.shape)} (that of residual), got {tuple(attn_out.shape)}")
    _check_row_major(attn_out, "attn_out")
    check_device(attn_out, residual, "attn_out", "residual")
    check_dtype(cu_seqlens, torch.int32, "cu_seqlens")
    check_rank(cu_seqlens, 1, "cu_seqlens")
    check(cu_seqlens.shape[0] >= 1,
          lambda: f"cu_seqlens: expected B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    check_device(cu_seqlens, residual, "cu_seqlens", "residual")
    check_dtype(cos_sum, torch.float32, "cos_sum")
    check_rank(cos_sum, 1, "cos_sum")
    check(cos_sum.shape[0] == cu_seqlens.shape[0] - 1,
          lambda: f"cos_sum: expected {cu_seqlens.shape[0] - 1} entries (one per sequence of cu_seqlens), "
          f"got shape {tuple(cos_sum.shape)}")
    check_device(cos_sum, residual, "cos_sum", "residual")


def add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps):
    _check_epilogue(residual, attn_out, cu_seqlens, cos_sum)
    check_dtype(weight, FLOAT_KV, "weight")
    check(weight.dim() == 1 and weight.shape[0] == residual.shape[1],
          lambda: f"weight: expected shape ({residual.shape[1]},), got {tuple(weight.shape)}")
    check_device(weight, residual, "weight", "residual")
    check(eps >= 0, lambda: f"eps: expected eps >= 0, got {eps}")
    return residual.new_empty(residual.shape)


def add_cossim(residual, attn_out, cu_seqlens, cos_sum):
    _check_epilogue(residual, attn_out, cu_seqlens, cos_sum)


def _check_kmeans(x, k, name):
    check_dtype(x, torch.float32, name)
    check_rank(x, 2, name)
    _check_row_major(x, name)
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
    check(base.dim() == 1 and base.shape[0] == B, lambda: f"base: expected shape ({B},), got {tuple(base.shape)}")
    check_device(base, sim, "base", "sim")
    check(p > 0 and math.isfinite(p), lambda: f"p: expected a finite p > 0, got {p}")
    check(0 <= min_budget <= 2**31 - 1, lambda: f"min_budget: expected 0 <= min_budget < 2**31, got {min_budget}")
    if max_budget is not None:
        check_dtype(max_budget, torch.int32, "max_budget")
        check(max_budget.dim() == 1 and max_budget.shape[0] == B,
              lambda: f"max_budget: expected shape ({B},), got {tuple(max_budget.shape)}")
        check_device(max_budget, sim, "max_budget", "sim")
    budgets = sim.new_empty(sim.shape, dtype=torch.int32)
    return budgets, sim.new_empty(sim.shape, dtype=torch.int32), sim.new_empty((B, k))

# ---- prefill ----


def _check_prefill_packed(t, name):
    check_rank(t, 3, name)
    check_dtype(t, FLOAT_KV, name)
    check(t.shape[-1] <= 1 or t.stride(-1) == 1,
          lambda: f"{name}: last dimension must be contiguous, got strides {t.stride()}")


def _check_prefill_index(t, shape, name, ref, ref_name="k"):
    """An int32 contiguous index tensor of the given shape on ref's device."""
    check_rank(t, len(shape), name)
    check_dtype(t, torch.int32, name)
    check(tuple(t.shape) == tuple(shape), lambda: f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    check_device(t, ref, name, ref_name)
    check(t.is_contiguous(), lambda: f"{name}: expected a contiguous tensor, got strides {t.stride()}")


def _check_prefill_cu_seqlens(cu_seqlens, ref, ref_name):
    check_rank(cu_seqlens, 1, "cu_seqlens")
    check(cu_seqlens.shape[0] >= 1, "cu_seqlens: expected B+1 >= 1 entries, got 0")
    _check_prefill_index(cu_seqlens, tuple(cu_seqlens.shape), "cu_seqlens", ref, ref_name)


def prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_queries):
    """q [T, H, D], k/v [T, Hkv, D] (same dtype), cu_seqlens int32 [B+1] ->
    out [T, H, D] (q's dtype), lse fp32 [T, H], scores fp32 [T, Hkv] ([0, Hkv] if score_queries < 0)."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_prefill_packed(t, name)
        check_device(t, q, name, "q")
    T, H, D = q.shape
    Hkv = k.shape[1]
    check(k.dtype == q.dtype and v.dtype == q.dtype,
          lambda: f"k, v: expected dtype {q.dtype} (that of q), got {k.dtype} and {v.dtype}")
    check(tuple(v.shape) == tuple(k.shape),
          lambda: f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    check(k.shape[0] == T, lambda: f"k: expected {T} tokens (those of q), got shape {tuple(k.shape)}")
    check(k.shape[2] == D, lambda: f"k: expected head dim {D} (that of q), got shape {tuple(k.shape)}")
    check(Hkv > 0 and H % Hkv == 0, lambda: f"k: the number of KV heads ({Hkv}) must divide the query heads ({H})")
    _check_prefill_cu_seqlens(cu_seqlens, q, "q")
    check(max_seqlen >= 0, lambda: f"max_seqlen: expected >= 0, got {max_seqlen}")
    out = q.new_empty(T, H, D)
    lse = q.new_empty(T, H, dtype=torch.float32)
    scores = q.new_empty(T if score_queries >= 0 else 0, Hkv, dtype=torch.float32)
    return out, lse, scores


def compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio,
                 k_cache, v_cache, lens, slot_pos, cache_scores):
    """k/v [T, Hkv, D], scores fp32 [T, Hkv] or [0, Hkv], cu_seqlens int32 [B+1], budget int32 [B];
    writes k_cache/v_cache [B, Hkv, C, D] (k's dtype), lens int32 [B], slot_pos int32 [B, Hkv, C],
    cache_scores fp32 [B, Hkv, C]."""
    _check_prefill_packed(k, "k")
    _check_prefill_packed(v, "v")
    check_device(v, k, "v", "k")
    check(v.dtype == k.dtype, lambda: f"v: expected dtype {k.dtype} (that of k), got {v.dtype}")
    check(tuple(v.shape) == tuple(k.shape),
          lambda: f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    T, Hkv, D = k.shape
    check_policy(policy)
    check(sinks >= 0, lambda: f"sinks: expected >= 0, got {sinks}")
    check(0.0 <= recent_ratio <= 1.0, lambda: f"recent_ratio: expected a value in [0, 1], got {recent_ratio}")
    check_rank(scores, 2, "scores")
    check_dtype(scores, torch.float32, "scores")
    check_device(scores, k, "scores", "k")
    check(scores.shape[1] == Hkv and scores.shape[0] in (0, T),
          lambda: f"scores: expected shape ({T}, {Hkv}) or (0, {Hkv}), got {tuple(scores.shape)}")
    check(policy != "h2o" or scores.shape[0] == T,
          lambda: f"scores: policy 'h2o' needs the column scores ({T}, {Hkv}) of prefill_attention, "
                  f"got shape {tuple(scores.shape)}")
    check(scores.is_contiguous(), lambda: f"scores: expected a contiguous tensor, got strides {scores.stride()}")
    _check_prefill_cu_seqlens(cu_seqlens, k, "k")
    B = cu_seqlens.shape[0] - 1
    _check_prefill_index(budget, (B,), "budget", k)
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        check_rank(t, 4, name)
        check(t.dtype == k.dtype, lambda: f"{name}: expected dtype {k.dtype} (that of k), got {t.dtype}")
        check_device(t, k, name, "k")
        check(t.shape[0] == B and t.shape[1] == Hkv and t.shape[3] == D,
              lambda: f"{name}: expected shape ({B}, {Hkv}, C, {D}), got {tuple(t.shape)}")
        check(t.shape[-1] <= 1 or t.stride(-1) == 1,
              lambda: f"{name}: last dimension must be contiguous, got strides {t.stride()}")
    C = k_cache.shape[2]
    check(v_cache.shape[2] == C,
          lambda: f"v_cache: expected capacity {C} (that of k_cache), got shape {tuple(v_cache.shape)}")
    _check_prefill_index(lens, (B,), "lens", k)
    _check_prefill_index(slot_pos, (B, Hkv, C), "slot_pos", k)
    check_rank(cache_scores, 3, "cache_scores")
    check_dtype(cache_scores, torch.float32, "cache_scores")
    check(tuple(cache_scores.shape) == (B, Hkv, C),
          lambda: f"cache_scores: expected shape {(B, Hkv, C)}, got {tuple(cache_scores.shape)}")
    check_device(cache_scores, k, "cache_scores", "k")
    check(cache_scores.is_contiguous(),
          lambda: f"cache_scores: expected a contiguous tensor, got strides {cache_scores.stride()}")

# ---- decode ----


def _check_last_contiguous(t, name):
    check(t.size(-1) <= 1 or t.stride(-1) == 1,
          lambda: f"{name}: last dimension must be contiguous, got strides {tuple(t.stride())}")


def _check_index_vector(t, B, name, ref):
    """An int32 [B] contiguous per-sequence vector (lens, pos, budget) on the cache's device."""
    check_rank(t, 1, name)
    check(t.shape[0] == B, lambda: f"{name}: expected shape ({B},) (one entry per sequence), got {tuple(t.shape)}")
    check_dtype(t, torch.int32, name)
    check_device(t, ref, name, "k_cache")
    check(t.is_contiguous(), lambda: f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")


def _check_kv(k_cache, v_cache, lens):
    """k_cache, v_cache [B, Hkv, C, D] (fp16/bf16/fp32, last dim contiguous), lens int32 [B]."""
    check_rank(k_cache, 4, "k_cache")
    check_dtype(k_cache, FLOAT_KV, "k_cache")
    _check_last_contiguous(k_cache, "k_cache")
    check(v_cache.shape == k_cache.shape,
          lambda: f"v_cache: expected shape {tuple(k_cache.shape)} (that of k_cache), got {tuple(v_cache.shape)}")
    check_dtype(v_cache, k_cache.dtype, "v_cache")
    check_device(v_cache, k_cache, "v_cache", "k_cache")
    _check_last_contiguous(v_cache, "v_cache")
    _check_index_vector(lens, k_cache.shape[0], "lens", k_cache)
    return tuple(k_cache.shape)


def _check_slot_tensor(t, name, dtype, k_cache):
    """slot_pos (int32) or scores (fp32): [B, Hkv, C], last dim contiguous."""
    B, Hkv, C, _ = k_cache.shape
    check_rank(t, 3, name)
    check(tuple(t.shape) == (B, Hkv, C),
          lambda: f"{name}: expected shape {(B, Hkv, C)} (that of k_cache without D), got {tuple(t.shape)}")
    check_dtype(t, dtype, name)
    check_device(t, k_cache, name, "k_cache")
    _check_last_contiguous(t, name)


def _check_cache(k_cache, v_cache, lens, slot_pos, scores):
    shape = _check_kv(k_cache, v_cache, lens)
    _check_slot_tensor(slot_pos, "slot_pos", torch.int32, k_cache)
    _check_slot_tensor(scores, "scores", torch.float32, k_cache)
    return shape


def _check_query(q, k_cache):
    """q [B, H, D] in the cache dtype with H a positive multiple of Hkv."""
    B, Hkv, _, D = k_cache.shape
    check_rank(q, 3, "q")
    check(q.shape[0] == B and q.shape[2] == D,
          lambda: f"q: expected shape ({B}, H, {D}) (batch and head dim of k_cache), got {tuple(q.shape)}")
    check(q.shape[1] > 0 and q.shape[1] % Hkv == 0,
          lambda: f"q: the number of query heads ({q.shape[1]}) must be a positive multiple of the number of "
          f"KV heads ({Hkv})")
    check_dtype(q, k_cache.dtype, "q")
    check_device(q, k_cache, "q", "k_cache")
    _check_last_contiguous(q, "q")


def _check_new_token(k_new, v_new, pos, k_cache):
    """k_new, v_new [B, Hkv, D] in the cache dtype, pos int32 [B]."""
    B, Hkv, _, D = k_cache.shape
    for t, name in ((k_new, "k_new"), (v_new, "v_new")):
        check_rank(t, 3, name)
        check(tuple(t.shape) == (B, Hkv, D), lambda: f"{name}: expected shape {(B, Hkv, D)}, got {tuple(t.shape)}")
        check_dtype(t, k_cache.dtype, name)
        check_device(t, k_cache, name, "k_cache")
        _check_last_contiguous(t, name)
    _check_index_vector(pos, B, "pos", k_cache)


def _check_policy_args(budget, policy, sinks, recent_ratio, k_cache):
    _check_index_vector(budget, k_cache.shape[0], "budget", k_cache)
    check_policy(policy)
    check(sinks >= 0, lambda: f"sinks: expected a non-negative number of sink tokens, got {sinks}")
    check(0.0 <= recent_ratio <= 1.0, lambda: f"recent_ratio: expected a value in [0, 1], got {recent_ratio}")


def decode_attention(q, k_cache, v_cache, lens, scale, scores):
    _check_kv(k_cache, v_cache, lens)
    _check_query(q, k_cache)
    if scores is not None:
        _check_slot_tensor(scores, "scores", torch.float32, k_cache)
    return q.new_empty(q.shape)


def cache_append_(k_cache, v_cache, lens, slot_pos, scores, k_new, v_new, pos):
    _check_cache(k_cache, v_cache, lens, slot_pos, scores)
    _check_new_token(k_new, v_new, pos, k_cache)


def cache_evict_(k_cache, v_cache, lens, slot_pos, scores, budget, policy, sinks, recent_ratio):
    _check_cache(k_cache, v_cache, lens, slot_pos, scores)
    _check_policy_args(budget, policy, sinks, recent_ratio, k_cache)


def decode_step_(q, k_new, v_new, pos, k_cache, v_cache, lens, slot_pos, scores, budget, scale, policy,
                 sinks, recent_ratio, accumulate_scores):
    _check_cache(k_cache, v_cache, lens, slot_pos, scores)
    _check_query(q, k_cache)
    _check_new_token(k_new, v_new, pos, k_cache)
    _check_policy_args(budget, policy, sinks, recent_ratio, k_cache)
    return q.new_empty(q.shape)


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
