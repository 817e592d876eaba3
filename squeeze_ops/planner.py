"""From the similarities measured during prefill to per-layer KV budgets (SqueezeAttention).

Engine flow for one batch of requests:
    cos_sum = torch.zeros(L, B, device=dev)                 # one row per decoder layer
    for l, layer in enumerate(layers):                       # prefill
        ...
        h = squeeze_ops.add_rmsnorm_cossim(residual, attn_out, w_post_attn_norm[l],
                                           cu_seqlens, cos_sum[l], eps)
        ...
    plan = plan_budgets(cos_sum, prompt_lens, b_init=0.2, p=0.35)
    # layer l of sequence b keeps plan.budgets[b, l] tokens
Everything stays on the device: no host synchronisation, so the planning can sit inside a
captured CUDA graph or a torch.compile(fullgraph=True) region.
"""
from typing import NamedTuple, Optional, Union

import torch

from . import _meta
from .ops import layer_budgets


class BudgetPlan(NamedTuple):
    budgets: torch.Tensor  # int32 [B, L]: KV tokens that layer l of sequence b keeps
    labels: torch.Tensor  # int32 [B, L]: group of each layer, 0 = least similar (most important)
    centroids: torch.Tensor  # fp32 [B, k]: mean similarity of each group (NaN: empty group)
    similarity: torch.Tensor  # fp32 [B, L]: mean cosine similarity of each layer


def plan_budgets(
    cos_sum: torch.Tensor,
    prompt_lens: torch.Tensor,
    *,
    b_init: Optional[float] = None,
    base_tokens: Union[float, torch.Tensor, None] = None,
    p: float,
    k: int = 3,
    min_budget: int = 1,
    max_budget: Union[int, torch.Tensor, None] = None,
) -> BudgetPlan:
    """Per-layer budgets of every sequence from the similarity sums of its prompt.

    cos_sum: fp32 [L, B], row l as accumulated by add_rmsnorm_cossim / add_cossim of layer l
        over the whole prompt (so cos_sum[l] is the contiguous [B] buffer that layer's call takes).
    prompt_lens: integer [B], prompt tokens of each sequence (the count behind each sum).
    similarity[b, l] = cos_sum[l, b] / prompt_lens[b] (0 for an empty prompt).
    Base budget per layer in tokens, exactly one of:
        b_init: fraction of the prompt, base = b_init * prompt_lens (BASE = prompt length, as in
            the authors' Llama code), computed in float64;
        base_tokens: tokens, a number or [B] tensor (e.g. b_init * 8000 for their Mistral code).
    p (> 0; p = 1 is the uniform baseline), k, min_budget, max_budget (number or int32 [B]):
        as in layer_budgets.
    Returns a BudgetPlan (budgets, labels, centroids, similarity), all on cos_sum's device.
    """
    _meta.check_dtype(cos_sum, torch.float32, "cos_sum")
    _meta.check_rank(cos_sum, 2, "cos_sum")
    B = cos_sum.shape[1]
    _meta.check(not prompt_lens.is_floating_point() and not prompt_lens.is_complex()
                and prompt_lens.dtype != torch.bool,
                f"prompt_lens: expected an integer dtype, got {prompt_lens.dtype}")
    _meta.check(prompt_lens.shape == (B,), f"prompt_lens: expected shape ({B},) (sequences of "
                f"cos_sum [L, B]), got {tuple(prompt_lens.shape)}")
    _meta.check_device(prompt_lens, cos_sum, "prompt_lens", "cos_sum")
    _meta.check((b_init is None) != (base_tokens is None), "b_init, base_tokens: pass exactly one of them")

    similarity = (cos_sum / prompt_lens.clamp_min(1).to(torch.float32)).t().contiguous()
    if b_init is not None:
        _meta.check(b_init >= 0, f"b_init: expected b_init >= 0, got {b_init}")
        base = (prompt_lens.to(torch.float64) * b_init).to(torch.float32)
    elif isinstance(base_tokens, torch.Tensor):
        base = base_tokens.to(torch.float32)
    else:
        base = base_tokens
    budgets, labels, centroids = layer_budgets(similarity, base, p, k, min_budget, max_budget)
    return BudgetPlan(budgets, labels, centroids, similarity)
