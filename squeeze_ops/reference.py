"""The readable specification: every op in plain PyTorch, computed in float32/float64.

Kernels are tested against these functions; they follow the SqueezeAttention paper
(arXiv 2404.04793) and the H2O / StreamingLLM policies as described in the README.
"""
import torch

# ---- layer dimension ----

# ---- prefill ----

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
