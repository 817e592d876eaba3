"""Public, typed wrappers of torch.ops.squeeze.*: the math, shapes, dtypes and what each op
mutates. Validation happens in the op itself (C++ checks or the Triton launcher's metadata
check), so calling torch.ops.squeeze.* directly is just as safe."""
import torch

__all__ = [
    # ---- layer dimension ----
    # ---- prefill ----
    "prefill_attention",
    "compress_kv_",
    "compress_kv",
    # ---- decode ----
]

# ---- layer dimension ----

# ---- prefill ----


def prefill_attention(q, k, v, cu_seqlens, max_seqlen=None, scale=None, score_window=-1):
    """Causal attention over packed variable-length sequences, optionally with the column
    scores that H2O / SnapKV select tokens by. Memory is linear in tokens: the probabilities
    are never materialised (GPU: flash-style Triton kernels; CPU: C++, chunked over queries).

    Sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1] of the packed tensors; i, j are
    positions inside it; query head h reads KV head g = h // (H // Hkv) (GQA):
        p[h, i, j]   = softmax_j(scale * q_i . k_j) over the keys j <= i
        out[i, h]    = sum_j p[h, i, j] v_j
        lse[i, h]    = log sum_{j <= i} exp(scale * q_i . k_j)      (natural log)
        scores[j, g] = sum_{h in group g} sum_{i in window, i >= j} p[h, i, j]
    The window is every query of the sequence for score_window == 0 (H2O's accumulated
    attention), its last W queries for score_window == W > 0 (SnapKV's observation window);
    score_window < 0 computes no scores.

    Args:
        q: [T, H, D]; k, v: [T, Hkv, D], one dtype (fp16/bf16 on the GPU, also fp32 on CPU),
            last dim contiguous, H % Hkv == 0. GPU: D a power of two in [16, 256].
        cu_seqlens: int32 [B+1], the offsets 0 <= ... <= T of the sequences.
        max_seqlen: the longest sequence (it sizes the GPU grid); None reads it from
            cu_seqlens, which costs a host sync.
        scale: softmax scale, default D ** -0.5.
        score_window: -1 (no scores), 0 (H2O) or W > 0 (last W queries).
    Returns:
        out [T, H, D] (q's dtype), lse fp32 [T, H], scores fp32 [T, Hkv] (an empty [0, Hkv]
        when score_window < 0). Nothing is mutated.
    """
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.squeeze.prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_window)


def _compress_args(k, scores, cu_seqlens, budget, policy, sinks):
    """Defaults of the compress wrappers: no scores -> empty [0, Hkv]; an int budget -> one
    per sequence; sinks 4 for streaming, 0 otherwise."""
    if scores is None:
        scores = k.new_empty(0, k.shape[1], dtype=torch.float32)
    if isinstance(budget, int):
        budget = torch.full((cu_seqlens.shape[0] - 1,), budget, dtype=torch.int32, device=k.device)
    if sinks is None:
        sinks = 4 if policy == "streaming" else 0
    return scores, budget, sinks


def compress_kv_(k, v, scores, cu_seqlens, budget, policy, k_cache, v_cache, lens, slot_pos, cache_scores,
                 *, sinks=None, recent_ratio=0.5):
    """Builds a layer's KV cache from the packed prompt K/V, in place: per (sequence b, KV
    head g) the prompt tokens that the policy keeps within budget[b], exactly the set that
    evicting one token at a time from the full prompt (scores fixed) would leave:
        window:    the newest budget tokens
        streaming: the first `sinks` tokens, then the newest
        h2o:       the first `sinks`, the R = floor(budget * recent_ratio) newest, and the
                   rest of the budget to the highest column scores (ties: the later token)
    (When the protected tokens alone exceed the budget, the oldest non-sinks go first, then
    the oldest sinks.) The kept tokens fill slots 0 .. lens[b]-1 in ascending position.

    Args:
        k, v: [T, Hkv, D] packed prompt keys/values (post-RoPE, as attended).
        scores: fp32 [T, Hkv] column scores of prefill_attention (needed by h2o), or None.
        cu_seqlens: int32 [B+1] offsets; budget: int32 [B] (or an int for all), each in
            [0, C] (checked on CPU; clamped on the GPU, checked there under SQUEEZE_DEBUG=1).
        policy: "window", "streaming" or "h2o". sinks: default 4 for streaming, 0 for h2o,
            ignored by window. recent_ratio: h2o's recent share of the budget.
    Mutates:
        k_cache, v_cache [B, Hkv, C, D] (k's dtype): rows of the kept tokens in slots < lens;
        lens int32 [B] = min(seq_len, budget); slot_pos int32 [B, Hkv, C]: the token's
        position in its sequence, -1 from lens on; cache_scores fp32 [B, Hkv, C]: its column
        score (0 without scores), 0 from lens on. K/V rows from lens on are left as they were.
    """
    scores, budget, sinks = _compress_args(k, scores, cu_seqlens, budget, policy, sinks)
    torch.ops.squeeze.compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio,
                                   k_cache, v_cache, lens, slot_pos, cache_scores)


def compress_kv(k, v, scores, cu_seqlens, budget, policy, capacity, *, sinks=None, recent_ratio=0.5):
    """compress_kv_ into a freshly allocated cache of capacity C = `capacity` (the budget plus
    room for the tokens still to come). Returns (k_cache [B, Hkv, C, D], v_cache, lens int32
    [B], slot_pos int32 [B, Hkv, C], cache_scores fp32 [B, Hkv, C]); K/V rows from lens on
    are uninitialised."""
    B, Hkv, D = cu_seqlens.shape[0] - 1, k.shape[1], k.shape[2]
    k_cache = k.new_empty(B, Hkv, capacity, D)
    v_cache = v.new_empty(B, Hkv, capacity, D)
    lens = torch.empty(B, dtype=torch.int32, device=k.device)
    slot_pos = torch.empty(B, Hkv, capacity, dtype=torch.int32, device=k.device)
    cache_scores = torch.empty(B, Hkv, capacity, dtype=torch.float32, device=k.device)
    compress_kv_(k, v, scores, cu_seqlens, budget, policy, k_cache, v_cache, lens, slot_pos, cache_scores,
                 sinks=sinks, recent_ratio=recent_ratio)
    return k_cache, v_cache, lens, slot_pos, cache_scores

# ---- decode ----
