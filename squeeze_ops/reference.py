"""The readable specification: every op in plain PyTorch, computed in float32/float64.

Kernels are tested against these functions; they follow the SqueezeAttention paper
(arXiv 2404.04793) and the H2O / StreamingLLM policies as described in the README.
"""
import torch

# ---- layer dimension ----

# ---- prefill ----


def _prefill_sequences(cu_seqlens):
    """(start, end) token range of every sequence of a packed batch."""
    cu = [int(c) for c in cu_seqlens]
    return list(zip(cu[:-1], cu[1:]))


def prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_window):
    """Causal attention over packed sequences, with the probabilities materialised (small T).

    Sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1]; i, j are positions inside it;
    query head h reads KV head g = h // (H // Hkv):
        p[h, i, j]   = softmax_j(scale * q_i . k_j) over keys j <= i
        out[i, h]    = sum_j p[h, i, j] v_j
        lse[i, h]    = log sum_{j <= i} exp(scale * q_i . k_j)
        scores[j, g] = sum_{h in group g} sum_{i in window} p[h, i, j]
    where the window holds every query of the sequence (score_window == 0, H2O) or its last
    W queries (score_window == W > 0, SnapKV's observation window); score_window < 0 computes
    no scores (an empty [0, Hkv] tensor). max_seqlen only sizes the kernels' grids.
    q [T, H, D], k/v [T, Hkv, D] -> out [T, H, D], lse [T, H], scores [T, Hkv], all float32.
    """
    T, H, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.zeros(T, H, dtype=torch.float64)
    scores = torch.zeros(T if score_window >= 0 else 0, Hkv, dtype=torch.float64)
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
        if score_window >= 0:
            first = 0 if score_window == 0 else max(n - score_window, 0)
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
