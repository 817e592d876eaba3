"""Public, typed wrappers of torch.ops.squeeze.*: the math, shapes, dtypes and what each op
mutates. Validation happens in the op itself (C++ checks or the Triton launcher's metadata
check), so calling torch.ops.squeeze.* directly is just as safe."""
import torch

__all__ = [
    # ---- layer dimension ----
    # ---- prefill ----
    # ---- decode ----
    "decode_attention",
    "cache_append_",
    "cache_evict_",
    "decode_step_",
]

# ---- layer dimension ----

# ---- prefill ----

# ---- decode ----

_DEFAULT_SINKS = {"window": 0, "streaming": 4, "h2o": 0}


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
                 scores: torch.Tensor, budget: torch.Tensor | int, policy: str = "h2o", sinks: int | None = None,
                 recent_ratio: float = 0.5) -> None:
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
    sinks = _DEFAULT_SINKS.get(policy, 0) if sinks is None else sinks
    torch.ops.squeeze.cache_evict_(k_cache, v_cache, lens, slot_pos, scores, _budget_tensor(budget, lens), policy,
                                   sinks, recent_ratio)


def decode_step_(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor, slot_pos: torch.Tensor,
                 scores: torch.Tensor, budget: torch.Tensor | int, scale: float | None = None, policy: str = "h2o",
                 sinks: int | None = None, recent_ratio: float = 0.5,
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
    sinks = _DEFAULT_SINKS.get(policy, 0) if sinks is None else sinks
    accumulate_scores = policy == "h2o" if accumulate_scores is None else accumulate_scores
    return torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, k_cache, v_cache, lens, slot_pos, scores,
                                          _budget_tensor(budget, lens), scale, policy, sinks, recent_ratio,
                                          accumulate_scores)
