"""From the similarities measured during prefill to per-layer KV budgets (SqueezeAttention).

Engine flow for one batch of requests:
    cos_sum = torch.zeros(L, B, device=dev)                 # one row per decoder layer
    for l, layer in enumerate(layers):                       # prefill
        ...
        h = squeeze_ops.add_rmsnorm_cossim(residual, attn_out, w_post_attn_norm[l],
                                           cu_seqlens, cos_sum[l], eps)
        ...
    plan = allocate(cos_sum, prompt_lens, Squeeze(p=0.35), b_init=0.2, horizon=prompt_lens + G)
    # layer l of sequence b keeps plan.budgets[b, l] tokens
`allocate` is the one entry point; the allocator (squeeze_ops.engine.allocators) decides how
the total is spread: the authors' formula by default, or one that follows the similarity
continuously, the observed attention, the perturbation of eviction or a calibrated profile.
Everything stays on the device: no host synchronisation, so the planning can sit inside a
captured CUDA graph or a torch.compile(fullgraph=True) region. `diagnose(plan, horizon)`
reads a plan back (profile, groups, nominal vs effective budgets) and reports when it wastes
budget or its grouping degenerates.
"""
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

from .. import _checks
from ..vocabulary import DEFAULT_K
from .allocators import Request, Squeeze, needs_of
from .allocators.base import describe

# Diagnostics thresholds: budget given beyond what layers can hold, share of layers in one group.
WASTE_TOLERANCE = 0.03
GROUP_TOLERANCE = 0.75


class BudgetPlan(NamedTuple):
    budgets: torch.Tensor  # int32 [B, L]: KV tokens that layer l of sequence b keeps ([B, L, Hkv]: per KV head)
    labels: torch.Tensor  # int32 [B, L]: group of each layer, 0 = least similar (most important)
    centroids: torch.Tensor  # fp32 [B, k]: mean similarity of each group (NaN: empty group)
    similarity: torch.Tensor  # fp32 [B, L]: mean cosine similarity of each layer


def allocate(
    cos_sum: torch.Tensor,
    prompt_lens: torch.Tensor,
    allocator=Squeeze(),
    *,
    b_init: Optional[float] = None,
    base_tokens: Union[float, torch.Tensor, None] = None,
    horizon: Optional[torch.Tensor] = None,
    min_budget: int = 1,
    max_budget: Union[int, torch.Tensor, None] = None,
    observed: Optional[torch.Tensor] = None,
    policy=None,
    perturbation: Optional[torch.Tensor] = None,
) -> BudgetPlan:
    """Per-layer budgets of every sequence from the similarity sums of its prompt, by any
    allocator (squeeze_ops.engine.allocators; default: the authors' formula, Squeeze()).

    similarity[b, l] = cos_sum[l, b] / prompt_lens[b]   (0 for an empty prompt)
    base[b] = b_init * prompt_lens[b]  (BASE = the prompt length, as in the authors' Llama code;
              float64), or base_tokens (e.g. b_init * 8000 for their Mistral code)

    Args:
        cos_sum: fp32 [L, B], row l as accumulated by add_rmsnorm_cossim / add_cossim of layer l
            over the whole prompt (cos_sum[l] is the contiguous [B] buffer that layer's call takes).
        prompt_lens: integer [B], prompt tokens of each sequence (the count behind each sum).
        allocator: how the total is spread (see squeeze_ops.engine.allocators.base).
        b_init / base_tokens: the base budget per layer, exactly one of them (base_tokens: a
            number or a [B] tensor of tokens).
        horizon: integer [B], tokens a layer can ever hold: prompt + tokens to generate
            (default: the prompt); the allocators that redistribute never exceed it.
        min_budget: smallest budget of any layer (the policy's guard: sinks + 1, 2 for H2O).
        max_budget: an int >= 0 or int32 [B], an optional hard cap applied last (no
            redistribution).
        observed: fp32 [B, L, Hkv, T_max], the attention mass each prompt position received from
            the last W prompt queries (signals.pad_observed of the prefill's scores), and
            policy: the SequencePolicy; read by allocators with observe = W.
        perturbation: fp32 [B, L, KNOTS + 1], per layer signals.attention_perturbation's curve
            of the policy the caches evict with; read by Perturbation.
    Returns:
        a BudgetPlan (budgets int32 [B, L], or [B, L, Hkv] for a per-head allocator; labels,
        centroids, similarity), all on cos_sum's device, without reading anything back to the host.
    """
    needs = needs_of(allocator)
    _checks.check_dtype(cos_sum, torch.float32, "cos_sum")
    _checks.check_rank(cos_sum, 2, "cos_sum")
    L, B = cos_sum.shape
    _check_lengths(prompt_lens, B, cos_sum, "prompt_lens")
    _checks.check((b_init is None) != (base_tokens is None), "b_init, base_tokens: pass exactly one of them")
    if horizon is None:
        horizon = prompt_lens
    _check_lengths(horizon, B, cos_sum, "horizon")
    _checks.check(isinstance(min_budget, int) and min_budget >= 0,
                  lambda: f"min_budget: expected an int >= 0, got {min_budget!r}")

    similarity = (cos_sum / prompt_lens.clamp_min(1).to(torch.float32)).t().contiguous()
    if b_init is not None:
        _checks.check(b_init >= 0, lambda: f"b_init: expected b_init >= 0, got {b_init}")
        base = (prompt_lens.to(torch.float64) * b_init).to(torch.float32)
    elif isinstance(base_tokens, torch.Tensor):
        _checks.check(base_tokens.shape == (B,), lambda: f"base_tokens: expected shape ({B},), got "
                      f"{tuple(base_tokens.shape)}")
        _checks.check_device(base_tokens, cos_sum, "base_tokens", "cos_sum")
        base = base_tokens.to(torch.float32)
    else:
        _checks.check(base_tokens >= 0, lambda: f"base_tokens: expected >= 0, got {base_tokens}")
        base = torch.full((B,), float(base_tokens), dtype=torch.float32, device=cos_sum.device)
    if observed is not None:
        _checks.check_dtype(observed, torch.float32, "observed")
        _checks.check(observed.dim() == 4 and observed.shape[:2] == (B, L),
                      lambda: f"observed: expected shape [B={B}, L={L}, Hkv, T_max], got {tuple(observed.shape)}")
        _checks.check_device(observed, cos_sum, "observed", "cos_sum")
    if needs.perturbation:
        _checks.check(perturbation is not None, lambda: f"perturbation: {describe(allocator)} reads the attention "
                      "perturbation curves of the prefill; pass perturbation=")
    if perturbation is not None:
        _checks.check_dtype(perturbation, torch.float32, "perturbation")
        _checks.check(perturbation.dim() == 3 and perturbation.shape[:2] == (B, L) and perturbation.shape[2] >= 2,
                      lambda: f"perturbation: expected shape [B={B}, L={L}, knots + 1 >= 2], "
                      f"got {tuple(perturbation.shape)}")
        _checks.check_device(perturbation, cos_sum, "perturbation", "cos_sum")
    if max_budget is not None:
        max_budget = _max_budget_tensor(max_budget, B, cos_sum)
    request = Request(similarity, base, prompt_lens, horizon, min_budget, observed, policy, perturbation)
    budgets, labels, centroids = allocator.allocate(request)
    if max_budget is not None:
        budgets = torch.minimum(budgets, max_budget.to(budgets.dtype).view(B, *[1] * (budgets.dim() - 1)))
    return BudgetPlan(budgets, labels, centroids, similarity)


def _max_budget_tensor(max_budget, B, cos_sum):
    """max_budget (an int or an integer [B] tensor) as int32 [B] on cos_sum's device, validated:
    its values are read back (a host sync) only on the CPU or under SQUEEZE_DEBUG=1."""
    if not isinstance(max_budget, torch.Tensor):
        _checks.check(isinstance(max_budget, int) and not isinstance(max_budget, bool) and 0 <= max_budget < 2**31,
                      lambda: f"max_budget: expected an int in [0, 2**31) or an int32 [B] tensor, got {max_budget!r}")
        return torch.full((B,), max_budget, dtype=torch.int32, device=cos_sum.device)
    _check_lengths(max_budget, B, cos_sum, "max_budget")
    if _checks.value_checks_wanted(max_budget):
        _checks.check(bool((max_budget >= 0).all()), lambda: f"max_budget: expected budgets >= 0, got "
                      f"{max_budget.tolist()}")
    return max_budget


def plan_budgets(
    cos_sum: torch.Tensor,
    prompt_lens: torch.Tensor,
    *,
    b_init: Optional[float] = None,
    base_tokens: Union[float, torch.Tensor, None] = None,
    p: float,
    k: int = DEFAULT_K,
    min_budget: int = 1,
    max_budget: Union[int, torch.Tensor, None] = None,
) -> BudgetPlan:
    """The authors' formula: allocate(cos_sum, prompt_lens, Squeeze(p, k), ...).

    p (> 0; p = 1 is the uniform baseline), k, min_budget, max_budget (number or int32 [B]):
    as in layer_budgets; the other arguments as in allocate.
    """
    return allocate(cos_sum, prompt_lens, Squeeze(p, k), b_init=b_init, base_tokens=base_tokens,
                    min_budget=min_budget, max_budget=max_budget)


def _check_lengths(lengths, B, cos_sum, name):
    _checks.check(not lengths.is_floating_point() and not lengths.is_complex() and lengths.dtype != torch.bool,
                f"{name}: expected an integer dtype, got {lengths.dtype}")
    _checks.check(lengths.shape == (B,), f"{name}: expected shape ({B},) (sequences of cos_sum [L, B]), "
                f"got {tuple(lengths.shape)}")
    _checks.check_device(lengths, cos_sum, name, "cos_sum")


@dataclass
class Diagnostics:
    """What a plan does with its budget, per sequence (host data; see `diagnose`).

    similarity [B][L], labels [B][L] (group of each layer, 0 = most important),
    group_sizes [B][k], nominal [B][L] (the plan's budgets; [B][L][Hkv] for a per-head plan),
    effective (min(nominal, horizon): what a layer can actually hold), waste [B] (share of the
    nominal total that no layer can hold), largest_group [B] (share of the layers in the
    largest group), messages: what the plan does wrong (empty: nothing).
    """

    similarity: list
    labels: list
    group_sizes: list
    nominal: list
    effective: list
    waste: list
    largest_group: list
    messages: list

    def table(self, b=0):
        """Markdown: per layer of sequence b its similarity, group, nominal and effective budget."""
        lines = ["| layer | similarity | group | nominal | effective |", "|---|---|---|---|---|"]
        for layer, sim in enumerate(self.similarity[b]):
            nominal, effective = budget_text(self.nominal[b][layer]), budget_text(self.effective[b][layer])
            lines.append(f"| {layer} | {sim:.4f} | G{self.labels[b][layer] + 1} | {nominal} | {effective} |")
        return "\n".join(lines)


def budget_text(budget):
    """A layer's budget (Diagnostics.nominal[b][l]), or its heads' budgets joined by '/'."""
    return "/".join(map(str, budget)) if isinstance(budget, list) else str(budget)


def diagnose(plan, horizon, allocator=None, *, sequences=None, waste_tolerance=WASTE_TOLERANCE,
             group_tolerance=GROUP_TOLERANCE, warn=False) -> Diagnostics:
    """Diagnostics of a BudgetPlan (reads it back to the host: not for the decode path).

    Args:
        plan: the BudgetPlan. horizon: integer [B] or a number, tokens a layer can ever hold
            (prompt + tokens to generate).
        allocator: the plan's allocator; groups are judged only for one that acts on them
            (uses_groups, e.g. Squeeze with p != 1; None counts as one).
        sequences: the names of the plan's rows in the messages (default 0..B-1).
        warn: also warnings.warn every message (UserWarning).
    Returns:
        Diagnostics, whose messages say (one per kind, naming the sequences) when a sequence's
        nominal total exceeds its effective one by more than waste_tolerance (budget no layer
        can hold), and when one group holds more than group_tolerance of a sequence's layers
        (the squeeze degenerates: nearly every layer squeezed, or nearly none).
    """
    budgets = plan.budgets.cpu()
    B, L = budgets.shape[:2]
    horizon = torch.as_tensor(horizon).cpu().expand(B)
    effective = torch.minimum(budgets, horizon.to(budgets.dtype).view(B, *[1] * (budgets.dim() - 1)))
    labels = plan.labels.cpu()
    k = plan.centroids.shape[1]
    sizes = torch.stack([(labels == g).sum(1) for g in range(k)], 1)
    waste = (1 - effective.flatten(1).sum(1).double() / budgets.flatten(1).sum(1).double().clamp_min(1)).tolist()
    largest = (sizes.max(1).values.double() / L).tolist()
    grouped = allocator is None or needs_of(allocator).uses_groups
    names = list(range(B)) if sequences is None else list(sequences)
    messages = []
    wasteful = [b for b in range(B) if waste[b] > waste_tolerance]
    if wasteful:
        b = max(wasteful, key=lambda i: waste[i])
        over = [layer for layer in range(L) if bool((budgets[b, layer] > horizon[b]).any())]
        messages.append(
            f"wasted budget in sequences {[names[i] for i in wasteful]}: up to {100 * waste[b]:.1f}% of the "
            f"budget can never be used (sequence {names[b]}: layers {over} were given more tokens than they can "
            f"hold, {int(horizon[b])}); an allocator that redistributes (SimilarityWeighted, Coverage, "
            f"Perturbation, CalibratedHeads) uses it")
    degenerate = [b for b in range(B) if grouped and largest[b] > group_tolerance]
    if degenerate:
        b = max(degenerate, key=lambda i: largest[i])
        g = int(sizes[b].argmax())
        messages.append(
            f"degenerate grouping in sequences {[names[i] for i in degenerate]}: one group holds more than "
            f"{100 * group_tolerance:.0f}% of the layers (sequence {names[b]}: G{g + 1} holds {int(sizes[b, g])} "
            f"of {L}), so the squeeze acts on nearly all layers or nearly none")
    if warn:
        for message in messages:
            warnings.warn(message, stacklevel=2)
    return Diagnostics(plan.similarity.cpu().tolist(), labels.tolist(), sizes.tolist(), budgets.tolist(),
                       effective.tolist(), waste, largest, messages)
