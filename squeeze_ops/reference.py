"""The readable specification: every op in plain PyTorch, computed in float32/float64.

Kernels are tested against these functions; they follow the SqueezeAttention paper
(arXiv 2404.04793) and the H2O / StreamingLLM policies as described in the README.
"""
import torch

# ---- layer dimension ----
import math  # noqa: E402

# Cosine of a zero vector: norms are clamped to COS_EPS (the convention of
# torch.nn.functional.cosine_similarity), so cos(0, v) = 0.
COS_EPS = 1e-8


def _cosine(a, b):
    """Per-row cosine similarity over the last dim, norms clamped to COS_EPS."""
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(COS_EPS) * b.norm(dim=-1).clamp_min(COS_EPS))


def add_cossim(residual, attn_out, cu_seqlens, cos_sum):
    """residual <- residual + attn_out (rounded to residual's dtype); for every sequence b,
    cos_sum[b] += sum over its tokens t of cos(old residual_t, new residual_t).

    The layer-importance measurement of SqueezeAttention (paper section 3.2): the residual
    stream entering a layer vs the same stream after the attention residual add. Returns the
    new residual in float32 (the value the norm of add_rmsnorm_cossim reads).
    """
    old = residual.to(torch.float32, copy=True)
    new = (old + attn_out.float()).to(residual.dtype)
    residual.copy_(new)
    new = new.float()
    cos = _cosine(old.double(), new.double())
    for b in range(cu_seqlens.numel() - 1):
        start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        cos_sum[b] += cos[start:end].sum().float()
    return new


def add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps):
    """add_cossim, then the next RMSNorm of the block on the new residual:
    out = new * rsqrt(mean(new^2) + eps) * weight, computed in float32, in residual's dtype."""
    new = add_cossim(residual, attn_out, cu_seqlens, cos_sum)
    rstd = torch.rsqrt(new.pow(2).mean(-1, keepdim=True) + eps)
    return (new * rstd * weight.float()).to(residual.dtype)


def _optimal_groups(values, counts, k):
    """Optimal partition of the distinct sorted `values` (weights `counts`) into k contiguous
    groups, minimising the weighted within-group sum of squares. Returns the k + 1 group
    boundaries (indices into values). Ties: the smallest split wins."""
    m = len(values)
    W, S, Q = [0.0], [0.0], [0.0]
    for v, w in zip(values, counts):
        W.append(W[-1] + w)
        S.append(S[-1] + w * v)
        Q.append(Q[-1] + w * v * v)

    def cost(i, j):  # sum of squares of items [i, j) around their mean
        s = S[j] - S[i]
        return (Q[j] - Q[i]) - s * s / (W[j] - W[i])

    inf = float("inf")
    D = [[0.0] + [inf] * m] + [[inf] * (m + 1) for _ in range(k)]
    split = [[0] * (m + 1) for _ in range(k + 1)]
    for c in range(1, k + 1):
        for j in range(c, m + 1):
            for i in range(c - 1, j):
                v = D[c - 1][i] + cost(i, j)
                if v < D[c][j]:
                    D[c][j], split[c][j] = v, i
    bounds = [m]
    for c in range(k, 0, -1):
        bounds.append(split[c][bounds[-1]])
    return bounds[::-1]


def kmeans1d(x, k):
    """Exact optimal 1-D K-Means of every row of x (fp32 [B, N]) into k groups.

    Optimal 1-D clusters are contiguous in sorted order, so a DP over the sorted distinct
    values (weighted by multiplicity: equal values share a group) finds the global optimum.
    Groups are numbered 0..k-1 by ascending centroid. With m < k distinct values only m groups
    are used (labels 0..m-1) and the centroids of groups m..k-1 are NaN.
    Returns labels int32 [B, N], centroids fp32 [B, k].
    """
    B, N = x.shape
    labels = torch.empty(B, N, dtype=torch.int32)
    centroids = torch.full((B, k), float("nan"))
    for b in range(B):
        values, item, counts = torch.unique(x[b].double(), return_inverse=True, return_counts=True)
        kk = min(k, len(values))
        bounds = _optimal_groups(values.tolist(), counts.tolist(), kk)
        group_of_item = torch.empty(len(values), dtype=torch.int32)
        for g in range(kk):
            group_of_item[bounds[g]:bounds[g + 1]] = g
            members = slice(bounds[g], bounds[g + 1])
            centroids[b, g] = (values[members] * counts[members]).sum() / counts[members].sum()
        labels[b] = group_of_item[item]
    return labels, centroids


def layer_budgets(sim, base, p, k, min_budget, max_budget):
    """SqueezeAttention's per-layer budgets (the formula of the authors' code).

    sim fp32 [B, L]: mean cosine similarity of each layer (high = the layer changed little);
    base fp32 [B]: uniform budget per layer in tokens (b_init * BASE). Each row is clustered by
    kmeans1d into k groups; the top group G (label k-1, the most similar layers) gets
    floor(p * base), every other layer floor(base * (L - p|G|) / (L - |G|)), which conserves the
    total up to the floors. If G is empty or holds every layer, all layers get floor(base).
    Then max(min_budget, .) and, if given, min(max_budget[b], .).
    Returns budgets int32 [B, L], labels int32 [B, L], centroids fp32 [B, k].
    """
    B, L = sim.shape
    labels, centroids = kmeans1d(sim, k)
    budgets = torch.empty(B, L, dtype=torch.int32)
    for b in range(B):
        in_top = labels[b] == k - 1
        top = int(in_top.sum())
        base_b = float(base[b])
        if top in (0, L):
            squeezed = other = math.floor(base_b)
        else:
            squeezed = math.floor(p * base_b)
            other = math.floor(base_b * (L - p * top) / (L - top))
        row = torch.where(in_top, squeezed, other).clamp_min(min_budget)
        if max_budget is not None:
            row = row.clamp_max(int(max_budget[b]))
        budgets[b] = row
    return budgets, labels, centroids

# ---- prefill ----


def _prefill_sequences(cu_seqlens):
    """(start, end) token range of every sequence of a packed batch."""
    cu = [int(c) for c in cu_seqlens]
    return list(zip(cu[:-1], cu[1:]))


def prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_queries):
    """Causal attention over packed sequences, with the probabilities materialised (small T).

    Sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1]; i, j are positions inside it;
    query head h reads KV head g = h // (H // Hkv):
        p[h, i, j]   = softmax_j(scale * q_i . k_j) over keys j <= i
        out[i, h]    = sum_j p[h, i, j] v_j
        lse[i, h]    = log sum_{j <= i} exp(scale * q_i . k_j)
        scores[j, g] = sum_{h in group g} sum_{i in window} p[h, i, j]
    where the window holds every query of the sequence (score_queries == 0, H2O) or its last
    W queries (score_queries == W > 0, SnapKV's observation window); score_queries < 0 computes
    no scores (an empty [0, Hkv] tensor). max_seqlen only sizes the kernels' grids.
    q [T, H, D], k/v [T, Hkv, D] -> out [T, H, D], lse [T, H], scores [T, Hkv], all float32.
    """
    T, H, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.zeros(T, H, dtype=torch.float64)
    scores = torch.zeros(T if score_queries >= 0 else 0, Hkv, dtype=torch.float64)
    for start, end in _prefill_sequences(cu_seqlens):
        n = end - start
        if n == 0:
            continue
        qs = q[start:end].double().transpose(0, 1)  # [H, n, D]
        ks = k[start:end].double().transpose(0, 1).repeat_interleave(group, 0)
        vs = v[start:end].double().transpose(0, 1).repeat_interleave(group, 0)
        logits = scale * qs @ ks.transpose(1, 2)  # [H, query, key]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
        p = torch.softmax(logits, -1)
        out[start:end] = (p @ vs).transpose(0, 1)
        lse[start:end] = torch.logsumexp(logits, -1).T
        if score_queries >= 0:
            first = 0 if score_queries == 0 else max(n - score_queries, 0)
            mass = p[:, first:, :].sum(1)  # [H, key]
            scores[start:end] = mass.view(Hkv, group, n).sum(1).T
    return out.float(), lse.float(), scores.float()


def kept_positions(n, budget, policy, sinks, recent_ratio, scores=None):
    """Positions (ascending) that a cache of `budget` slots keeps of an n-token prompt: the
    set that evicting one token at a time from the full prompt would leave (scores fixed).

    window: the newest `budget`. streaming: the first `sinks`, then the newest.
    h2o: the first `sinks`, the R = floor(budget * recent_ratio) newest, and the rest of the
    budget to the highest `scores` (float [n]) among the others, ties to the larger position.
    When the protected tokens alone exceed the budget, eviction takes the oldest non-sink
    first and, once only sinks remain, the oldest sink: what is left is the sinks, then the
    newest, or only the newest `budget` sinks.
    """
    if n <= budget:
        return torch.arange(n)
    if policy == "window":
        return torch.arange(n - budget, n)
    n_sinks = min(sinks, n)
    if policy == "h2o":
        recent = int(budget * recent_ratio)  # floor: both factors are >= 0
        recent_start = max(n - recent, n_sinks)
        protected = n_sinks + (n - recent_start)
        if budget >= protected:
            newest_first = torch.arange(n_sinks, recent_start).flip(0)
            order = torch.sort(scores[newest_first], descending=True, stable=True).indices
            heavy = newest_first[order[: budget - protected]].sort().values
            return torch.cat([torch.arange(n_sinks), heavy, torch.arange(recent_start, n)])
    if budget >= n_sinks:
        return torch.cat([torch.arange(n_sinks), torch.arange(n - (budget - n_sinks), n)])
    return torch.arange(n_sinks - budget, n_sinks)


def compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio,
                 k_cache, v_cache, lens, slot_pos, cache_scores):
    """Builds a layer cache from a packed prompt, in place: per (sequence b, KV head g) the
    kept_positions() of the prompt, in ascending position, in slots 0 .. lens[b]-1, with
    their K, V, position (slot_pos) and column score (cache_scores; 0 when `scores` is the
    empty [0, Hkv] tensor). lens[b] = min(seq_len, budget[b]); later slots get slot_pos -1
    and score 0, their K/V are left as they were.
    k/v [T, Hkv, D]; scores [T, Hkv] or [0, Hkv]; k_cache/v_cache [B, Hkv, C, D].
    """
    has_scores = scores.shape[0] > 0
    slot_pos.fill_(-1)
    cache_scores.zero_()
    for b, (start, end) in enumerate(_prefill_sequences(cu_seqlens)):
        n = end - start
        lens[b] = min(n, int(budget[b]))
        for g in range(k.shape[1]):
            col = scores[start:end, g] if has_scores else None
            kept = kept_positions(n, int(budget[b]), policy, sinks, recent_ratio, col)
            c = len(kept)
            k_cache[b, g, :c] = k[start + kept, g]
            v_cache[b, g, :c] = v[start + kept, g]
            slot_pos[b, g, :c] = kept.to(slot_pos.dtype)
            if has_scores:
                cache_scores[b, g, :c] = col[kept]

# ---- decode ----


def decode_attention(q, k_cache, v_cache, lens, scale, scores=None):
    """One query token per sequence over the first lens[b] slots of a layer cache.

    out[b, h] = sum_j p[b, h, j] v_cache[b, h // G, j], p[b, h] = softmax_j(scale * q[b, h] . k_cache[b, h // G, j])
    over j < lens[b], with G = H // Hkv query heads per KV head. A sequence with lens[b] = 0 gives zeros.
    When `scores` is given it is updated in place: scores[b, g, j] += sum over the G query heads h of KV
    head g of p[b, h, j]. Computed in float64; returns out in q's dtype.
    """
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        k = k_cache[b, :, :n].double().cpu().repeat_interleave(G, dim=0)  # [H, n, D]
        v = v_cache[b, :, :n].double().cpu().repeat_interleave(G, dim=0)
        p = torch.softmax(scale * torch.einsum("hd,hnd->hn", q[b].double().cpu(), k), dim=-1)
        out[b] = torch.einsum("hn,hnd->hd", p, v)
        if scores is not None:
            scores[b, :, :n] += p.view(Hkv, G, n).sum(1).to(scores.device, scores.dtype)
    return out.to(q.device, q.dtype)


def cache_append_(k_cache, v_cache, lens, slot_pos, scores, k_new, v_new, pos):
    """Write one new token per sequence at slot lens[b] (all KV heads): K/V from k_new/v_new [B, Hkv, D],
    slot_pos = pos[b], score 0; then lens[b] += 1. The cache must have a free slot."""
    for b in range(k_cache.shape[0]):
        slot = int(lens[b])
        k_cache[b, :, slot] = k_new[b]
        v_cache[b, :, slot] = v_new[b]
        slot_pos[b, :, slot] = pos[b]
        scores[b, :, slot] = 0
        lens[b] += 1


def recent_count(budget, recent_ratio):
    """H2O's recent window: the floor(budget * recent_ratio) newest positions are protected (both
    non-negative, so int() is the floor; computed in double precision like every kernel)."""
    return int(budget * recent_ratio)


def eviction_victim(positions, scores, policy, sinks, recent):
    """The slot to evict from one (sequence, KV head) holding `positions` / `scores` (lists, one per valid
    slot, in slot order).

    window: the oldest token. streaming: the oldest token that is not a sink (position < sinks).
    h2o: the lowest score among tokens that are neither sinks nor among the `recent` newest positions
    (position > max position - recent), ties -> the oldest. When no token qualifies (the protected set
    covers everything): the oldest non-sink, else the oldest token.
    """
    slots = range(len(positions))
    if policy == "window":
        candidates = list(slots)
    elif policy == "streaming":
        candidates = [j for j in slots if positions[j] >= sinks]
    else:
        newest = max(positions)
        candidates = [j for j in slots if sinks <= positions[j] <= newest - recent]
    if candidates:
        if policy == "h2o":
            return min(candidates, key=lambda j: (scores[j], positions[j]))
        return min(candidates, key=lambda j: positions[j])
    non_sinks = [j for j in slots if positions[j] >= sinks]
    return min(non_sinks or slots, key=lambda j: positions[j])


def cache_evict_(k_cache, v_cache, lens, slot_pos, scores, budget, policy, sinks, recent_ratio):
    """Evict, per (sequence, KV head), one token at a time while lens[b] > budget[b].

    Each round picks eviction_victim(...) among the valid slots and moves the last valid slot into it
    (K, V, slot_pos, score); the freed last slot gets slot_pos -1 and score 0. Afterwards
    lens[b] = min(lens[b], budget[b]).
    """
    B, Hkv = k_cache.shape[:2]
    for b in range(B):
        n, keep = int(lens[b]), int(budget[b])
        recent = recent_count(keep, recent_ratio)
        for h in range(Hkv):
            m = n
            while m > keep:
                positions = slot_pos[b, h, :m].tolist()
                victim = eviction_victim(positions, scores[b, h, :m].tolist(), policy, sinks, recent)
                last = m - 1
                for t in (k_cache, v_cache, slot_pos, scores):
                    t[b, h, victim] = t[b, h, last].clone()
                slot_pos[b, h, last] = -1
                scores[b, h, last] = 0
                m -= 1
        lens[b] = min(n, keep)


def decode_step_(q, k_new, v_new, pos, k_cache, v_cache, lens, slot_pos, scores, budget, scale, policy,
                 sinks, recent_ratio, accumulate_scores):
    """One decode step of one layer: append the new token, attend over the cache (the new token
    included), accumulate H2O scores when asked, evict while over budget. Returns out [B, H, D]."""
    cache_append_(k_cache, v_cache, lens, slot_pos, scores, k_new, v_new, pos)
    out = decode_attention(q, k_cache, v_cache, lens, scale, scores if accumulate_scores else None)
    cache_evict_(k_cache, v_cache, lens, slot_pos, scores, budget, policy, sinks, recent_ratio)
    return out
