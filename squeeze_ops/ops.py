"""Public, typed wrappers of torch.ops.squeeze.*: the math, shapes, dtypes and what each op
mutates, with defaults. Validation happens in the op itself (C++ checks or the Triton
launcher's checks), so calling torch.ops.squeeze.* directly is just as safe.

The paged KV cache (README "Tensor conventions"): one pool per model, k_pages / v_pages
[P, S, D], pos_pages int32 [P, S] (the position a slot holds, -1 empty) and score_pages fp32
[P, S] (H2O's accumulated attention mass); a row is one (sequence, layer, KV head), with a
block table row of M page ids (slot j at page table[j // S], offset j % S; capacity
C = M * S) and a length. The decode ops take one layer's rows of B sequences:
block_table int32 [B, Hkv, M], lens int32 [B, Hkv], budget int32 [B, Hkv]. A page id outside
[0, P) (conventionally -1) is no page: its slots read as empty and writes to them are dropped;
value checks (on CPU, and on the GPU under SQUEEZE_DEBUG=1) refuse ids other than -1 outside
the pool and a page listed twice (by two rows, or by two entries of one row).
"""
import torch

from .vocabulary import DEFAULT_K, DEFAULT_POLICY, DEFAULT_RECENT_RATIO, DEFAULT_SINKS

__all__ = [
    # ---- layer dimension ----
    "add_rmsnorm_cossim",
    "add_cossim",
    "kmeans1d",
    "layer_budgets",
    # ---- prefill ----
    "prefill_attention",
    "compress_kv_",
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
    One pass over the data (the bytes of an add + RMSNorm). Summing cos_sum over the prompt and
    dividing by its length gives the layer score of SqueezeAttention (engine.planner.allocate).

    Args:
        residual: [T, d] fp16/bf16/fp32, last dim contiguous.
        attn_out: [T, d], residual's dtype. weight: [d], fp16/bf16/fp32 (any stride).
        cu_seqlens: int32 [B + 1] contiguous, 0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = T.
        cos_sum: fp32 [B]. eps: finite, >= 0.
    Returns:
        out [T, d] in residual's dtype.
    Mutates:
        residual (becomes new); cos_sum (accumulated, not overwritten: zero it before the prompt).
    """
    return torch.ops.squeeze.add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps)


def add_cossim(residual: torch.Tensor, attn_out: torch.Tensor, cu_seqlens: torch.Tensor,
               cos_sum: torch.Tensor) -> None:
    """add_rmsnorm_cossim without the norm: residual <- residual + attn_out and
    cos_sum[b] += sum over the tokens of sequence b of cos(old, new).

    Args: as add_rmsnorm_cossim. Returns: nothing. Mutates: residual, cos_sum.
    """
    torch.ops.squeeze.add_cossim(residual, attn_out, cu_seqlens, cos_sum)


def kmeans1d(x: torch.Tensor, k: int = DEFAULT_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact optimal 1-D K-Means of every row of x into 1 <= k <= N groups.

    Minimises the within-group sum of squares globally (DP over the sorted distinct values,
    O(k N^2)); deterministic, and CPU and CUDA give identical labels. Groups are numbered by
    ascending centroid. Equal values always share a label. With m < k distinct values only
    labels 0..m-1 are used and centroids[:, m:] are NaN. Ties in cost: the split that makes
    the higher groups as large as possible wins.

    Args:
        x: fp32 [B, N], N <= 256, finite. k: the number of groups.
    Returns:
        labels int32 [B, N], centroids fp32 [B, k].
    Mutates: nothing.
    """
    return torch.ops.squeeze.kmeans1d(x, k)


def layer_budgets(sim: torch.Tensor, base, p: float, k: int = DEFAULT_K, min_budget: int = 1,
                  max_budget=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SqueezeAttention's per-layer KV budgets, clustering and formula in one launch.

    Each row is clustered by kmeans1d(sim, k); the top group G (label k-1, the most similar
    layers) is squeezed to floor(p * base), every other layer gets
        floor(base * (L - p|G|) / (L - |G|)),
    so the total L * base is kept up to the floors (L * base - L < sum <= L * base before the
    bounds). If G is empty (fewer distinct values than k) or holds every layer, every layer
    gets floor(base); p = 1 gives that uniform split too. Then budget = max(min_budget,
    budget) and, if max_budget is given, min(max_budget, budget).

    Args:
        sim: fp32 [B, L] mean cosine similarity per layer (high = the layer changed little).
        base: uniform budget per layer in tokens (b_init * BASE): fp32 [B], or a number for all.
        p: finite, > 0. k: 1 <= k <= L. min_budget: >= 0.
        max_budget: int32 [B] or a number, optional.
    Returns:
        budgets int32 [B, L], labels int32 [B, L], centroids fp32 [B, k].
    Mutates: nothing.
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
    score_queries == -1 computes no scores.

    Args:
        q: [T, H, D]; k, v: [T, Hkv, D], one dtype (fp16/bf16 on the GPU, also fp32 on CPU),
            last dim contiguous, H % Hkv == 0. GPU: D a power of two in [16, 256].
        cu_seqlens: int32 [B+1] contiguous, the offsets 0 <= ... <= T of the sequences.
        max_seqlen: the longest sequence (it sizes the GPU grid); None reads it from
            cu_seqlens, which costs a host sync. Rows of a sequence longer than max_seqlen
            are zeros (lse -inf) on the GPU; an error where value checks run.
        scale: softmax scale, finite and > 0, default D ** -0.5.
        score_queries: -1 (no scores), 0 (H2O) or W > 0 (last W queries).
    Returns:
        out [T, H, D] (q's dtype), lse fp32 [T, H], scores fp32 [T, Hkv] (an empty [0, Hkv]
        when score_queries == -1).
    Mutates: nothing.
    """
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.squeeze.prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_queries)


def compress_kv_(k, v, scores, cu_seqlens, budget, policy, k_pages, v_pages, pos_pages, score_pages, block_table,
                 lens, *, sinks=None, recent_ratio=DEFAULT_RECENT_RATIO, pool_size=1, pool_mode="max"):
    """Builds one layer's rows of the paged cache from the packed prompt K/V, in place: per
    (sequence b, KV head g) the prompt tokens that the policy keeps within budget[b, g],
    exactly the set that evicting one token at a time from the full prompt (scores fixed)
    would leave:
        window:    the newest budget tokens
        streaming: the first `sinks` tokens, then the newest
        h2o:       the first `sinks`, the R = floor(budget * recent_ratio) newest, and the
                   rest of the budget to the highest selection scores (ties: the later token)
    (When the protected tokens alone exceed the budget, the oldest non-sinks go first, then
    the oldest sinks.) The selection score of position j is its column score pooled over
    pool_size neighbours inside the sequence (SnapKV): the max ("max") or the mean ("avg") of
    the scores at j - r .. j + r, r = pool_size // 2 (pool_size 1: the score itself); NaN counts
    as -inf. The kept tokens fill slots 0 .. lens[b, g]-1 in ascending position.

    Args:
        k, v: [T, Hkv, D] packed prompt keys/values (post-RoPE, as attended).
        scores: fp32 [T, Hkv] column scores of prefill_attention (needed by h2o), or None.
        cu_seqlens: int32 [B+1]; budget: int32 [B, Hkv] (or an int for every row), each in
            [0, C] (checked where value checks run; clamped on the GPU otherwise).
        policy: "window", "streaming" or "h2o". sinks: default vocabulary.DEFAULT_SINKS (4 for
            streaming), ignored by window. recent_ratio: h2o's recent share of the budget.
        pool_size: odd, >= 1. pool_mode: "max" or "avg".
        k_pages, v_pages [P, S, D] (k's dtype), pos_pages int32 [P, S], score_pages fp32 [P, S]:
            the pool. block_table: int32 [B, Hkv, M], the rows' pages.
    Returns: nothing.
    Mutates:
        the rows' slots in the pool: slots < lens get the kept tokens' K, V, position and
        selection score (0 without scores); later slots (up to C) position -1 and score 0,
        their K/V left as they were; lens int32 [B, Hkv] = min(seq_len, budget).
    """
    # Of arguments the op refuses (a k or cu_seqlens of another rank), only that it refuses them.
    B = cu_seqlens.shape[0] - 1 if cu_seqlens.dim() == 1 else 0
    Hkv = k.shape[1] if k.dim() == 3 else 0
    if scores is None:
        scores = k.new_empty(0, Hkv, dtype=torch.float32)
    if isinstance(budget, int):
        budget = torch.full((B, Hkv), budget, dtype=torch.int32, device=k.device)
    sinks = DEFAULT_SINKS.get(policy, 0) if sinks is None else sinks
    torch.ops.squeeze.compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio, pool_size,
                                   pool_mode, k_pages, v_pages, pos_pages, score_pages, block_table, lens)


# ---- decode ----


def _budget_tensor(budget, lens):
    """An int budget becomes the int32 [B, Hkv] budget of every row, on lens' device."""
    if isinstance(budget, torch.Tensor):
        return budget
    return torch.full_like(lens, int(budget))


def decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                     lens: torch.Tensor, scale: float | None = None,
                     score_pages: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its rows of one layer (decode), GQA-aware.

        out[b, h] = sum_{j < lens[b, g]} p[b, h, j] * V[b, g, j],
        p[b, h, :] = softmax_j(scale * q[b, h] . K[b, g, j]),   g = h // G, G = H // Hkv,
    K/V[b, g, j]: slot j of row (b, g), read through its block table.

    Args:
        q: [B, H, D] fp16/bf16 (fp32 also on CPU), last dim contiguous; H a multiple of Hkv.
        k_pages, v_pages: [P, S, D] in q's dtype, last dim contiguous.
        block_table: int32 [B, Hkv, M]; lens: int32 [B, Hkv], 0 <= lens <= C = M * S (a row
            with lens 0 gives zeros).
        scale: softmax scale, finite and > 0, default 1 / sqrt(D).
        score_pages: optional fp32 [P, S].
    Returns:
        out [B, H, D] in q's dtype.
    Mutates:
        score_pages, when given: the score of slot j of row (b, g) += sum over the G query
        heads of KV head g of p[b, h, j], for j < lens[b, g] (H2O's accumulated attention mass).
    GPU: split-K Triton kernel, split count per row chosen on the device, no host sync.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.squeeze.decode_attention(q, k_pages, v_pages, block_table, lens, scale, score_pages)


def cache_append_(k_pages: torch.Tensor, v_pages: torch.Tensor, pos_pages: torch.Tensor, score_pages: torch.Tensor,
                  block_table: torch.Tensor, lens: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                  pos: torch.Tensor) -> None:
    """Append one token per sequence to each of its rows of one layer, in place.

    For every row (b, g): slot = lens[b, g]; its K, V, position and score become k_new[b, g],
    v_new[b, g], pos[b] and 0; then lens[b, g] += 1.

    Args:
        k_pages, v_pages [P, S, D], pos_pages int32 [P, S], score_pages fp32 [P, S]: the pool.
        block_table: int32 [B, Hkv, M]. lens: int32 [B, Hkv], lens < C = M * S required (an
            error where value checks run; on the GPU otherwise the append to a full row is
            dropped).
        k_new, v_new: [B, Hkv, D] in the pool's dtype. pos: int32 [B], >= 0.
    Returns: nothing.
    Mutates: the appended slots in the pool, lens.
    """
    torch.ops.squeeze.cache_append_(k_pages, v_pages, pos_pages, score_pages, block_table, lens, k_new, v_new, pos)


def cache_evict_(k_pages: torch.Tensor, v_pages: torch.Tensor, pos_pages: torch.Tensor, score_pages: torch.Tensor,
                 block_table: torch.Tensor, lens: torch.Tensor, budget: torch.Tensor | int,
                 policy: str = DEFAULT_POLICY, sinks: int | None = None,
                 recent_ratio: float = DEFAULT_RECENT_RATIO) -> None:
    """Evict tokens from each row of one layer while lens[b, g] > budget[b, g].

    Each round evicts one victim per row:
      window:    the oldest token (smallest position);
      streaming: the oldest token with position >= sinks;
      h2o:       the lowest score (NaN counts as -inf) among tokens that are neither sinks
                 (position < sinks) nor among the R = floor(budget[b, g] * recent_ratio)
                 newest (position > max position - R); ties -> the oldest.
    If no token qualifies: the oldest with position >= sinks, else the oldest. The row's last
    slot (lens - 1) is moved into the victim's slot (K, V, position, score); the freed slot
    gets position -1 and score 0. Afterwards lens = min(lens, budget). Cost: one scan of the
    row per evicted token (meant for the few tokens of a decode step; compress_kv_ compresses
    a prompt).

    Args:
        the pool, block_table and lens as in cache_append_.
        budget: int32 [B, Hkv] (or an int for every row), 0 <= budget <= C.
        policy: "window", "streaming" or "h2o". sinks: protected first tokens (default
            vocabulary.DEFAULT_SINKS; ignored by window). recent_ratio: in [0, 1].
    Returns: nothing.
    Mutates: the rows' slots in the pool, lens.
    """
    sinks = DEFAULT_SINKS.get(policy, 0) if sinks is None else sinks
    torch.ops.squeeze.cache_evict_(k_pages, v_pages, pos_pages, score_pages, block_table, lens,
                                   _budget_tensor(budget, lens), policy, sinks, recent_ratio)


def decode_step_(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor,
                 k_pages: torch.Tensor, v_pages: torch.Tensor, pos_pages: torch.Tensor, score_pages: torch.Tensor,
                 block_table: torch.Tensor, lens: torch.Tensor, budget: torch.Tensor | int,
                 scale: float | None = None, policy: str = DEFAULT_POLICY, sinks: int | None = None,
                 recent_ratio: float = DEFAULT_RECENT_RATIO,
                 accumulate_scores: bool | None = None) -> torch.Tensor:
    """One decode step of one layer, in place: the fused cache_append_ + decode_attention +
    cache_evict_. Per row (b, g) holding n = lens[b, g] tokens:

    1. the G query heads of KV head g attend over the n cached slots and the new token
       (k_new / v_new[b, g], taken from the inputs);
    2. the new token is written into slot n (position pos[b]); with accumulate_scores every
       cached slot's score += its probability summed over the G heads and the new slot's
       score is the new token's (else 0); lens = n + 1;
    3. the row is evicted to budget[b, g] (cache_evict_).
    Where slot n lies on a page this equals cache_append_, decode_attention and cache_evict_ in
    sequence; on no page (e.g. a padding row of -1 pages) the new token is attended, not stored.

    Args: as decode_attention, cache_append_ and cache_evict_; requires lens < C (the slot of
        the appended token) and budget <= C: a row of budget b never holds more than b + 1
        slots, and a row whose budget exceeds every length it reaches never evicts and needs
        only those. accumulate_scores defaults to policy == "h2o".
    Returns:
        out [B, H, D] in q's dtype.
    Mutates: the rows' slots in the pool, lens.
    GPU: two launches (split pass with the append, combine-and-evict pass), no host sync:
    capturable in a CUDA graph and traceable by torch.compile(fullgraph=True).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sinks = DEFAULT_SINKS.get(policy, 0) if sinks is None else sinks
    accumulate_scores = policy == "h2o" if accumulate_scores is None else accumulate_scores
    return torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, k_pages, v_pages, pos_pages, score_pages,
                                          block_table, lens, _budget_tensor(budget, lens), scale, policy, sinks,
                                          recent_ratio, accumulate_scores)
