"""decode_step_ on the GPU: one layer's decode step over its paged rows in two launches.

1. Split pass (common.run_decode): writes the new token into slot lens[b, g] of each row (K, V,
   position pos[b], score 0) and attends over the lens + 1 slots, taking the new token from
   registers.
2. Combine-and-evict pass, one program per row: merges the splits into out, adds the normalised
   probabilities to the slot scores (accumulate_scores), then evicts that row's victims while it
   holds more than budget[b, g] tokens and stores lens[b, g].
No host synchronisation: the step can be captured in a CUDA graph and traced by torch.compile.
"""
from squeeze_ops import _checks

from .common import run_decode


def decode_step_(q, k_new, v_new, pos, k_pages, v_pages, pos_pages, score_pages, block_table, lens, budget, scale,
                 policy, sinks, recent_ratio, accumulate_scores):
    """Triton launcher of torch.ops.squeeze.decode_step_ (see squeeze_ops.ops.decode_step_)."""
    out = _checks.decode_step_(q, k_new, v_new, pos, k_pages, v_pages, pos_pages, score_pages, block_table, lens,
                               budget, scale, policy, sinks, recent_ratio, accumulate_scores)
    if _checks.value_checks_wanted(lens):
        _checks.check_paged_values(block_table.shape[2] * k_pages.shape[1], lens, append=True, budget=budget,
                                   pos=pos, block_table=block_table, num_pages=k_pages.shape[0])
    step = (k_new, v_new, pos, pos_pages, budget, policy, sinks, recent_ratio)
    return run_decode(q, k_pages, v_pages, block_table, lens, scale, score_pages, accumulate_scores, out, step)
