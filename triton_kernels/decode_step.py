"""decode_step_ on the GPU: one layer's decode step in two launches.

1. Split pass (common.run_decode): writes the new token into slot lens[b] (K, V, slot_pos = pos,
   score 0) and attends over the lens[b] + 1 slots, taking the new token from registers.
2. Combine-and-evict pass, one program per (sequence, KV head): merges the splits into out,
   adds the normalised probabilities to scores (accumulate_scores), then evicts that head's victims
   while it holds more than budget[b] tokens and stores lens[b].
No host synchronisation: the step can be captured in a CUDA graph and traced by torch.compile.
"""
from squeeze_ops import _checks

from .common import run_decode


def decode_step_(q, k_new, v_new, pos, k_cache, v_cache, lens, slot_pos, scores, budget, scale, policy, sinks,
                 recent_ratio, accumulate_scores):
    """Triton launcher of torch.ops.squeeze.decode_step_ (see squeeze_ops.ops.decode_step_)."""
    out = _checks.decode_step_(q, k_new, v_new, pos, k_cache, v_cache, lens, slot_pos, scores, budget, scale,
                             policy, sinks, recent_ratio, accumulate_scores)
    if _checks.value_checks_wanted(lens):
        _checks.check_cache_values(k_cache.shape[2], lens, append=True, budget=budget, pos=pos)
    step = (k_new, v_new, pos, slot_pos, budget, policy, sinks, recent_ratio)
    return run_decode(q, k_cache, v_cache, lens, scale, scores, accumulate_scores, out, step)
