"""Metadata of every op: argument checks that need no data (rank, shape, dtype, device,
layout) and the outputs' shapes. Each function is registered as the op's fake kernel and is
called first by the op's Triton launcher, so the Python paths validate exactly alike; the C++
kernels carry the same checks through csrc/checks.h."""
import torch


def check(cond, msg):
    """Raise a ValueError naming the argument when `cond` is false (also on fake tensors)."""
    if not cond:
        raise ValueError(msg)


def check_dtype(t, dtypes, name):
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    check(t.dtype in dtypes, f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")


def check_rank(t, rank, name):
    check(t.dim() == rank, f"{name}: expected a {rank}-d tensor, got shape {tuple(t.shape)}")


def check_device(t, ref, name, ref_name):
    check(t.device == ref.device, f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def check_policy(policy):
    check(policy in POLICIES, f"policy: expected one of {POLICIES}, got {policy!r}")


POLICIES = ("window", "streaming", "h2o")
FLOAT_KV = (torch.float16, torch.bfloat16, torch.float32)

# ---- layer dimension ----
import math  # noqa: E402

KMEANS_MAX_N = 256  # the CUDA kernel keeps a row in shared memory


def _check_row_major(t, name):
    check(t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1,
          f"{name}: last dimension must be contiguous, got strides {tuple(t.stride())}")


def _check_epilogue(residual, attn_out, cu_seqlens, cos_sum):
    check_dtype(residual, FLOAT_KV, "residual")
    check_rank(residual, 2, "residual")
    _check_row_major(residual, "residual")
    check_dtype(attn_out, residual.dtype, "attn_out")
    check(attn_out.shape == residual.shape,
          f"attn_out: expected shape {tuple(residual.shape)} (that of residual), got {tuple(attn_out.shape)}")
    _check_row_major(attn_out, "attn_out")
    check_device(attn_out, residual, "attn_out", "residual")
    check_dtype(cu_seqlens, torch.int32, "cu_seqlens")
    check_rank(cu_seqlens, 1, "cu_seqlens")
    check(cu_seqlens.shape[0] >= 1, f"cu_seqlens: expected B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    check_device(cu_seqlens, residual, "cu_seqlens", "residual")
    check_dtype(cos_sum, torch.float32, "cos_sum")
    check_rank(cos_sum, 1, "cos_sum")
    check(cos_sum.shape[0] == cu_seqlens.shape[0] - 1,
          f"cos_sum: expected {cu_seqlens.shape[0] - 1} entries (one per sequence of cu_seqlens), "
          f"got shape {tuple(cos_sum.shape)}")
    check_device(cos_sum, residual, "cos_sum", "residual")


def add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps):
    _check_epilogue(residual, attn_out, cu_seqlens, cos_sum)
    check_dtype(weight, FLOAT_KV, "weight")
    check(weight.dim() == 1 and weight.shape[0] == residual.shape[1],
          f"weight: expected shape ({residual.shape[1]},), got {tuple(weight.shape)}")
    check_device(weight, residual, "weight", "residual")
    check(eps >= 0, f"eps: expected eps >= 0, got {eps}")
    return residual.new_empty(residual.shape)


def add_cossim(residual, attn_out, cu_seqlens, cos_sum):
    _check_epilogue(residual, attn_out, cu_seqlens, cos_sum)


def _check_kmeans(x, k, name):
    check_dtype(x, torch.float32, name)
    check_rank(x, 2, name)
    _check_row_major(x, name)
    n = x.shape[1]
    check(n <= KMEANS_MAX_N, f"{name}: at most {KMEANS_MAX_N} values per row, got {n}")
    check(k >= 1, f"k: expected k >= 1, got {k}")
    check(k <= n, f"k: expected k <= {n} (the number of values per row of {name}), got {k}")


def kmeans1d(x, k):
    _check_kmeans(x, k, "x")
    return x.new_empty(x.shape, dtype=torch.int32), x.new_empty((x.shape[0], k))


def layer_budgets(sim, base, p, k, min_budget, max_budget):
    _check_kmeans(sim, k, "sim")
    B = sim.shape[0]
    check_dtype(base, torch.float32, "base")
    check(base.dim() == 1 and base.shape[0] == B, f"base: expected shape ({B},), got {tuple(base.shape)}")
    check_device(base, sim, "base", "sim")
    check(p > 0 and math.isfinite(p), f"p: expected a finite p > 0, got {p}")
    check(0 <= min_budget <= 2**31 - 1, f"min_budget: expected 0 <= min_budget < 2**31, got {min_budget}")
    if max_budget is not None:
        check_dtype(max_budget, torch.int32, "max_budget")
        check(max_budget.dim() == 1 and max_budget.shape[0] == B,
              f"max_budget: expected shape ({B},), got {tuple(max_budget.shape)}")
        check_device(max_budget, sim, "max_budget", "sim")
    budgets = sim.new_empty(sim.shape, dtype=torch.int32)
    return budgets, sim.new_empty(sim.shape, dtype=torch.int32), sim.new_empty((B, k))

# ---- prefill ----

# ---- decode ----


def _check_last_contiguous(t, name):
    check(t.size(-1) <= 1 or t.stride(-1) == 1,
          f"{name}: last dimension must be contiguous, got strides {tuple(t.stride())}")


def _check_index_vector(t, B, name, ref):
    """An int32 [B] contiguous per-sequence vector (lens, pos, budget) on the cache's device."""
    check_rank(t, 1, name)
    check(t.shape[0] == B, f"{name}: expected shape ({B},) (one entry per sequence), got {tuple(t.shape)}")
    check_dtype(t, torch.int32, name)
    check_device(t, ref, name, "k_cache")
    check(t.is_contiguous(), f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")


def _check_kv(k_cache, v_cache, lens):
    """k_cache, v_cache [B, Hkv, C, D] (fp16/bf16/fp32, last dim contiguous), lens int32 [B]."""
    check_rank(k_cache, 4, "k_cache")
    check_dtype(k_cache, FLOAT_KV, "k_cache")
    _check_last_contiguous(k_cache, "k_cache")
    check(v_cache.shape == k_cache.shape,
          f"v_cache: expected shape {tuple(k_cache.shape)} (that of k_cache), got {tuple(v_cache.shape)}")
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
          f"{name}: expected shape {(B, Hkv, C)} (that of k_cache without D), got {tuple(t.shape)}")
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
          f"q: expected shape ({B}, H, {D}) (batch and head dim of k_cache), got {tuple(q.shape)}")
    check(q.shape[1] > 0 and q.shape[1] % Hkv == 0,
          f"q: the number of query heads ({q.shape[1]}) must be a positive multiple of the number of "
          f"KV heads ({Hkv})")
    check_dtype(q, k_cache.dtype, "q")
    check_device(q, k_cache, "q", "k_cache")
    _check_last_contiguous(q, "q")


def _check_new_token(k_new, v_new, pos, k_cache):
    """k_new, v_new [B, Hkv, D] in the cache dtype, pos int32 [B]."""
    B, Hkv, _, D = k_cache.shape
    for t, name in ((k_new, "k_new"), (v_new, "v_new")):
        check_rank(t, 3, name)
        check(tuple(t.shape) == (B, Hkv, D), f"{name}: expected shape {(B, Hkv, D)}, got {tuple(t.shape)}")
        check_dtype(t, k_cache.dtype, name)
        check_device(t, k_cache, name, "k_cache")
        _check_last_contiguous(t, name)
    _check_index_vector(pos, B, "pos", k_cache)


def _check_policy_args(budget, policy, sinks, recent_ratio, k_cache):
    _check_index_vector(budget, k_cache.shape[0], "budget", k_cache)
    check_policy(policy)
    check(sinks >= 0, f"sinks: expected a non-negative number of sink tokens, got {sinks}")
    check(0.0 <= recent_ratio <= 1.0, f"recent_ratio: expected a value in [0, 1], got {recent_ratio}")


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
    # ---- decode ----
    "decode_attention": decode_attention,
    "cache_append_": cache_append_,
    "cache_evict_": cache_evict_,
    "decode_step_": decode_step_,
}
