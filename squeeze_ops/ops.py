"""Public, typed wrappers of torch.ops.squeeze.*: the math, shapes, dtypes and what each op
mutates. Validation happens in the op itself (C++ checks or the Triton launcher's metadata
check), so calling torch.ops.squeeze.* directly is just as safe."""
import torch

from .vocabulary import DEFAULT_POLICY, DEFAULT_RECENT_RATIO, DEFAULT_SINKS

__all__ = [
    # ---- layer dimension ----
    "add_rmsnorm_cossim",
    "add_cossim",
    "kmeans1d",
    "layer_budgets",
    # ---- prefill ----
    "prefill_attention",
    "compress_kv_",
    "compress_kv",
    # ---- decode ----
    "decode_attention",
    "cache_append_",
    "cache_evict_",
    "decode_step_",
]

# ---- layer dimension ----


def add_rmsnorm_cossim(residual: torch.Tensor, attn_out: torch.Tensor, weight: torch.Tensor,
                       cu_seqlens: torch.Tensor, cos_sum: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Attention epilogue of a pre-norm block that also measures the layer's importance.

    For every token t of sequence b (tokens cu_seqlens[b] <= t < cu_seqlens[b+1]):
        new_t = old_t + attn_out_t                     (rounded to residual's dtype, stored)
        out_t = new_t * rsqrt(mean(new_t^2) + eps) * weight        (fp32 math)
        cos_sum[b] += cos(old_t, new_t) = old.new / (max(|old|, 1e-8) * max(|new|, 1e-8))
    One pass over the data (the bytes of an add + RMSNorm). Summing cos_sum over the prompt
    and dividing by its length gives the layer score of SqueezeAttention (see plan_budgets).

    residual: [T, d] fp16/bf16/fp32, last dim contiguous; MUTATED (becomes new).
    attn_out: [T, d], residual's dtype. weight: [d], fp16/bf16/fp32.
    cu_seqlens: int32 [B + 1], 0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = T.
    cos_sum: fp32 [B]; MUTATED (accumulated, not overwritten: zero it before the prompt).
    Returns out [T, d] in residual's dtype.
    """
    return torch.ops.squeeze.add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps)


def add_cossim(residual: torch.Tensor, attn_out: torch.Tensor, cu_seqlens: torch.Tensor,
               cos_sum: torch.Tensor) -> None:
    """add_rmsnorm_cossim without the norm: residual <- residual + attn_out (MUTATED) and
    cos_sum[b] += sum over the tokens of sequence b of cos(old, new) (MUTATED). Same shapes."""
    torch.ops.squeeze.add_cossim(residual, attn_out, cu_seqlens, cos_sum)


def kmeans1d(x: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact optimal 1-D K-Means of every row of x (fp32 [B, N], N <= 256) into 1 <= k <= N groups.

    Minimises the within-group sum of squares globally (DP over the sorted distinct values,
    O(k N^2)); deterministic, and CPU and CUDA give identical labels. Groups are numbered by
    ascending centroid. Equal values always share a label. With m < k distinct values only
    labels 0..m-1 are used and centroids[:, m:] are NaN. Ties in cost: the split that makes
    the higher groups as large as possible wins.
    Returns labels int32 [B, N] and centroids fp32 [B, k].
    """
    return torch.ops.squeeze.kmeans1d(x, k)


def layer_budgets(sim: torch.Tensor, base, p: float, k: int = 3, min_budget: int = 1,
                  max_budget=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SqueezeAttention's per-layer KV budgets, clustering and formula in one launch.

    sim: fp32 [B, L] mean cosine similarity per layer (high = the layer changed little).
    base: uniform budget per layer in tokens (b_init * BASE): fp32 [B], or a number for all.
    Each row is clustered by kmeans1d(sim, k); the top group G (label k-1, the most similar
    layers) is squeezed to floor(p * base), every other layer gets
    floor(base * (L - p|G|) / (L - |G|)), so the total L * base is kept up to the floors
    (L * base - L < sum <= L * base before clamping). If G is empty (fewer distinct values than
    k) or holds every layer, every layer gets floor(base); p = 1 gives that uniform split too.
    Then budget = max(min_budget, budget) and, if max_budget (int32 [B] or a number) is given,
    min(max_budget, budget).
    Returns budgets int32 [B, L], labels int32 [B, L], centroids fp32 [B, k].
    """
    B = sim.shape[0]
    if not isinstance(base, torch.Tensor):
        base = torch.full((B,), float(base), dtype=torch.float32, device=sim.device)
    if max_budget is not None and not isinstance(max_budget, torch.Tensor):
        max_budget = torch.full((B,), int(max_budget), dtype=torch.int32, device=sim.device)
    return torch.ops.squeeze.layer_budgets(sim, base, p, k, min_budget, max_budget)


# ---- prefill ----


def prefill_attention(q, k, v, cu_seqlens, max_seqlen=None, scale=None, score_queries=-1):
    """Causal attention over packed variable-length sequences, optionally with the column
    scores that H2O / SnapKV select tokens by. Memory is linear in tokens: the probabilities
    are never materialised (GPU: flash-style Triton kernels; CPU: C++, chunked over queries).

    Sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1] of the packed tensors; i, j are
    positions inside it; query head h reads KV head g = h // (H // Hkv) (GQA):
        p[h, i, j]   = softmax_j(scale * q_i . k_j) over the keys j <= i
        out[i, h]    = sum_j p[h, i, j] v_j
        lse[i, h]    = log sum_{j <= i} exp(scale * q_i . k_j)      (natural log)
        scores[j, g] = sum_{h in group g} sum_{i in window, i >= j} p[h, i, j]
    The window is every query of the sequence for score_queries == 0 (H2O's accumulated
    attention), its last W queries for score_queries == W > 0 (SnapKV's observation window);
    score_queries < 0 computes no scores.

    Args:
        q: [T, H, D]; k, v: [T, Hkv, D], one dtype (fp16/bf16 on the GPU, also fp32 on CPU),
            last dim contiguous, H % Hkv == 0. GPU: D a power of two in [16, 256].
        cu_seqlens: int32 [B+1], the offsets 0 <= ... <= T of the sequences.
        max_seqlen: the longest sequence (it sizes the GPU grid); None reads it from
            cu_seqlens, which costs a host sync.
        scale: softmax scale, default D ** -0.5.
        score_queries: -1 (no scores), 0 (H2O) or W > 0 (last W queries).
    Returns:
        out [T, H, D] (q's dtype), lse fp32 [T, H], scores fp32 [T, Hkv] (an empty [0, Hkv]
        when score_queries < 0). Nothing is mutated.
    """
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.squeeze.prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_queries)


def _compress_args(k, scores, cu_seqlens, budget, policy, sinks):
    """Defaults of the compress wrappers: no scores -> empty [0, Hkv]; an int budget -> one
    per sequence; sinks 4 for streaming, 0 otherwise."""
    if scores is None:
        scores = k.new_empty(0, k.shape[1], dtype=torch.float32)
    if isinstance(budget, int):
        budget = torch.full((cu_seqlens.shape[0] - 1,), budget, dtype=torch.int32, device=k.device)
    if sinks is None:
        sinks = DEFAULT_SINKS.get(policy, 0)
    return scores, budget, sinks


def compress_kv_(k, v, scores, cu_seqlens, budget, policy, k_cache, v_cache, lens, slot_pos, cache_scores,
                 *, sinks=None, recent_ratio=DEFAULT_RECENT_RATIO):
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


def compress_kv(k, v, scores, cu_seqlens, budget, policy, capacity, *, sinks=None, recent_ratio=DEFAULT_RECENT_RATIO):
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

def _budget_tensor(budget, lens):
    """An int budget becomes the int32 [B] per-sequence budget tensor on lens' device."""
    if isinstance(budget, torch.Tensor):
        return budget
    return torch.full_like(lens, int(budget))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor,
                     scale: float | None = None, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over a layer cache (decode), GQA-aware.

    out[b, h] = sum_{j < lens[b]} p[b, h, j] * v_cache[b, h // G, j],
    p[b, h, :] = softmax_j(scale * q[b, h] . k_cache[b, h // G, j]),   G = H // Hkv.

    Args:
        q: [B, H, D] fp16/bf16 (fp32 also on CPU), last dim contiguous; H a multiple of Hkv.
        k_cache, v_cache: [B, Hkv, C, D] in q's dtype, last dim contiguous.
        lens: int32 [B], valid slots per sequence, 0 <= lens[b] <= C. A sequence with lens 0 gets zeros.
        scale: softmax scale, default 1 / sqrt(D).
        scores: optional fp32 [B, Hkv, C], MUTATED: scores[b, g, j] += sum over the G query heads of KV
            head g of p[b, h, j], for j < lens[b] (H2O's accumulated attention mass).
    Returns:
        out [B, H, D] in q's dtype.
    GPU: split-K Triton kernel, split count per sequence chosen on the device, no host sync.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.squeeze.decode_attention(q, k_cache, v_cache, lens, scale, scores)


def cache_append_(k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor, slot_pos: torch.Tensor,
                  scores: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor) -> None:
    """Append one token per sequence to a layer cache, in place.

    For every sequence b and KV head g: slot = lens[b]; k_cache[b, g, slot] = k_new[b, g],
    v_cache[b, g, slot] = v_new[b, g], slot_pos[b, g, slot] = pos[b], scores[b, g, slot] = 0; then
    lens[b] += 1.

    Args:
        k_cache, v_cache: [B, Hkv, C, D], MUTATED. lens: int32 [B], MUTATED; lens[b] < C required
            (capacity overflow is an error on CPU; on the GPU, without SQUEEZE_DEBUG=1, an append to a
            full cache is dropped).
        slot_pos: int32 [B, Hkv, C], MUTATED. scores: fp32 [B, Hkv, C], MUTATED.
        k_new, v_new: [B, Hkv, D] in the cache dtype. pos: int32 [B], the token's absolute position (>= 0).
    """
    torch.ops.squeeze.cache_append_(k_cache, v_cache, lens, slot_pos, scores, k_new, v_new, pos)


def cache_evict_(k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor, slot_pos: torch.Tensor,
                 scores: torch.Tensor, budget: torch.Tensor | int, policy: str = DEFAULT_POLICY, sinks: int | None = None,
                 recent_ratio: float = DEFAULT_RECENT_RATIO) -> None:
    """Evict tokens from a layer cache, per (sequence, KV head), while lens[b] > budget[b].

    Each round evicts one victim per (sequence, KV head):
      window:    the oldest token (smallest position);
      streaming: the oldest token with position >= sinks;
      h2o:       the lowest score among tokens that are neither sinks (position < sinks) nor among the
                 R = floor(budget[b] * recent_ratio) newest (position > max position - R); ties -> oldest.
    If no token qualifies: the oldest with position >= sinks, else the oldest. The last valid slot
    (lens - 1) is moved into the victim's slot (K, V, slot_pos, score); the freed slot gets slot_pos -1
    and score 0. Afterwards lens[b] = min(lens[b], budget[b]). Cost: one scan of the valid slots per
    evicted token (meant for the few tokens of a decode step; compress_kv_ compresses a prompt).

    Args:
        k_cache, v_cache: [B, Hkv, C, D], MUTATED. lens: int32 [B], MUTATED.
        slot_pos: int32 [B, Hkv, C], MUTATED. scores: fp32 [B, Hkv, C], MUTATED.
        budget: int32 [B] (or an int for every sequence), 0 <= budget[b] <= C.
        policy: "window", "streaming" or "h2o". sinks: protected first tokens (default 4 for streaming,
            0 otherwise; ignored by window). recent_ratio: H2O's recent share of the budget, in [0, 1].
    """
    sinks = DEFAULT_SINKS.get(policy, 0) if sinks is None else sinks
    torch.ops.squeeze.cache_evict_(k_cache, v_cache, lens, slot_pos, scores, _budget_tensor(budget, lens), policy,
                                   sinks, recent_ratio)


def decode_step_(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor, slot_pos: torch.Tensor,
                 scores: torch.Tensor, budget: torch.Tensor | int, scale: float | None = None, policy: str = DEFAULT_POLICY,
                 sinks: int | None = None, recent_ratio: float = DEFAULT_RECENT_RATIO,
                 accumulate_scores: bool | None = None) -> torch.Tensor:
    """One decode step of one layer, in place: the fused cache_append_ + decode_attention + cache_evict_.

    1. append k_new/v_new at slot lens[b] (slot_pos = pos[b], score 0), lens += 1;
    2. out = decode_attention(q, ...) over the lens slots, the new token included;
    3. if accumulate_scores: scores += the normalised probabilities summed over each group's query heads;
    4. evict per cache_evict_ while lens[b] > budget[b].

    Args: as decode_attention, cache_append_ and cache_evict_; requires lens[b] < C and
        budget[b] <= C - 1 (capacity >= budget + 1, checked on CPU). k_cache, v_cache, lens, slot_pos and
        scores are MUTATED. accumulate_scores defaults to policy == "h2o".
    Returns:
        out [B, H, D] in q's dtype.
    GPU: two launches (split pass with the append, combine-and-evict pass), no host sync: capturable in a
    CUDA graph and traceable by torch.compile(fullgraph=True).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sinks = DEFAULT_SINKS.get(policy, 0) if sinks is None else sinks
    accumulate_scores = policy == "h2o" if accumulate_scores is None else accumulate_scores
    return torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, k_cache, v_cache, lens, slot_pos, scores,
                                          _budget_tensor(budget, lens), scale, policy, sinks, recent_ratio,
                                          accumulate_scores)
