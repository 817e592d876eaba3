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

# ---- prefill ----


def _check_prefill_packed(t, name):
    check_rank(t, 3, name)
    check_dtype(t, FLOAT_KV, name)
    check(t.shape[-1] <= 1 or t.stride(-1) == 1, f"{name}: last dimension must be contiguous, got strides {t.stride()}")


def _check_prefill_index(t, shape, name, ref, ref_name="k"):
    """An int32 contiguous index tensor of the given shape on ref's device."""
    check_rank(t, len(shape), name)
    check_dtype(t, torch.int32, name)
    check(tuple(t.shape) == tuple(shape), f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    check_device(t, ref, name, ref_name)
    check(t.is_contiguous(), f"{name}: expected a contiguous tensor, got strides {t.stride()}")


def _check_prefill_cu_seqlens(cu_seqlens, ref, ref_name):
    check_rank(cu_seqlens, 1, "cu_seqlens")
    check(cu_seqlens.shape[0] >= 1, "cu_seqlens: expected B+1 >= 1 entries, got 0")
    _check_prefill_index(cu_seqlens, tuple(cu_seqlens.shape), "cu_seqlens", ref, ref_name)


def prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_window):
    """q [T, H, D], k/v [T, Hkv, D] (same dtype), cu_seqlens int32 [B+1] ->
    out [T, H, D] (q's dtype), lse fp32 [T, H], scores fp32 [T, Hkv] ([0, Hkv] if score_window < 0)."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_prefill_packed(t, name)
        check_device(t, q, name, "q")
    T, H, D = q.shape
    Hkv = k.shape[1]
    check(k.dtype == q.dtype and v.dtype == q.dtype, f"k, v: expected dtype {q.dtype} (that of q), got {k.dtype} and {v.dtype}")
    check(tuple(v.shape) == tuple(k.shape), f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    check(k.shape[0] == T, f"k: expected {T} tokens (those of q), got shape {tuple(k.shape)}")
    check(k.shape[2] == D, f"k: expected head dim {D} (that of q), got shape {tuple(k.shape)}")
    check(Hkv > 0 and H % Hkv == 0, f"k: the number of KV heads ({Hkv}) must divide the query heads ({H})")
    _check_prefill_cu_seqlens(cu_seqlens, q, "q")
    check(max_seqlen >= 0, f"max_seqlen: expected >= 0, got {max_seqlen}")
    out = q.new_empty(T, H, D)
    lse = q.new_empty(T, H, dtype=torch.float32)
    scores = q.new_empty(T if score_window >= 0 else 0, Hkv, dtype=torch.float32)
    return out, lse, scores


def compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio,
                 k_cache, v_cache, lens, slot_pos, cache_scores):
    """k/v [T, Hkv, D], scores fp32 [T, Hkv] or [0, Hkv], cu_seqlens int32 [B+1], budget int32 [B];
    writes k_cache/v_cache [B, Hkv, C, D] (k's dtype), lens int32 [B], slot_pos int32 [B, Hkv, C],
    cache_scores fp32 [B, Hkv, C]."""
    _check_prefill_packed(k, "k")
    _check_prefill_packed(v, "v")
    check_device(v, k, "v", "k")
    check(v.dtype == k.dtype, f"v: expected dtype {k.dtype} (that of k), got {v.dtype}")
    check(tuple(v.shape) == tuple(k.shape), f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    T, Hkv, D = k.shape
    check_policy(policy)
    check(sinks >= 0, f"sinks: expected >= 0, got {sinks}")
    check(0.0 <= recent_ratio <= 1.0, f"recent_ratio: expected a value in [0, 1], got {recent_ratio}")
    check_rank(scores, 2, "scores")
    check_dtype(scores, torch.float32, "scores")
    check_device(scores, k, "scores", "k")
    check(scores.shape[1] == Hkv and scores.shape[0] in (0, T),
          f"scores: expected shape ({T}, {Hkv}) or (0, {Hkv}), got {tuple(scores.shape)}")
    check(policy != "h2o" or scores.shape[0] == T,
          f"scores: policy 'h2o' needs the column scores ({T}, {Hkv}) of prefill_attention, got shape {tuple(scores.shape)}")
    check(scores.is_contiguous(), f"scores: expected a contiguous tensor, got strides {scores.stride()}")
    _check_prefill_cu_seqlens(cu_seqlens, k, "k")
    B = cu_seqlens.shape[0] - 1
    _check_prefill_index(budget, (B,), "budget", k)
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        check_rank(t, 4, name)
        check(t.dtype == k.dtype, f"{name}: expected dtype {k.dtype} (that of k), got {t.dtype}")
        check_device(t, k, name, "k")
        check(t.shape[0] == B and t.shape[1] == Hkv and t.shape[3] == D,
              f"{name}: expected shape ({B}, {Hkv}, C, {D}), got {tuple(t.shape)}")
        check(t.shape[-1] <= 1 or t.stride(-1) == 1, f"{name}: last dimension must be contiguous, got strides {t.stride()}")
    C = k_cache.shape[2]
    check(v_cache.shape[2] == C, f"v_cache: expected capacity {C} (that of k_cache), got shape {tuple(v_cache.shape)}")
    _check_prefill_index(lens, (B,), "lens", k)
    _check_prefill_index(slot_pos, (B, Hkv, C), "slot_pos", k)
    check_rank(cache_scores, 3, "cache_scores")
    check_dtype(cache_scores, torch.float32, "cache_scores")
    check(tuple(cache_scores.shape) == (B, Hkv, C), f"cache_scores: expected shape {(B, Hkv, C)}, got {tuple(cache_scores.shape)}")
    check_device(cache_scores, k, "cache_scores", "k")
    check(cache_scores.is_contiguous(), f"cache_scores: expected a contiguous tensor, got strides {cache_scores.stride()}")

# ---- decode ----

FAKE_KERNELS = {
    # ---- layer dimension ----
    # ---- prefill ----
    "prefill_attention": prefill_attention,
    "compress_kv_": compress_kv_,
    # ---- decode ----
}
