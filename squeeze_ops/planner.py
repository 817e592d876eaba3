"""From the similarities measured during prefill to per-layer KV budgets (SqueezeAttention).

Engine flow for one batch of requests:
    cos_sum = torch.zeros(L, B, device=dev)                 # one row per decoder layer
    for l, layer in enumerate(layers):                       # prefill
        ...
        h = squeeze_ops.add_rmsnorm_cossim(residual, attn_out, w_post_attn_norm[l],
                                           cu_seqlens, cos_sum[l], eps)
        ...
    plan = allocate(cos_sum, prompt_lens, Squeeze(p=0.35), b_init=0.2, capacity=prompt_lens + G)
    # layer l of sequence b keeps plan.budgets[b, l] tokens
`allocate` is the one entry point; the allocator (squeeze_ops.allocators) decides how the
total is spread: the authors' formula by default, or one that redistributes, follows the
similarity continuously, ramps like PyramidKV or follows a calibrated sensitivity profile.
Everything stays on the device: no host synchronisation, so the planning can sit inside a
captured CUDA graph or a torch.compile(fullgraph=True) region. `diagnose(plan, capacity)`
reads a plan back (profile, groups, nominal vs effective budgets) and warns when it wastes
budget or its grouping degenerates.
"""
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from . import _meta
from .allocators import KNOTS, Request, Squeeze, perturbation_knots

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
    capacity: Optional[torch.Tensor] = None,
    min_budget: int = 1,
    max_budget: Union[int, torch.Tensor, None] = None,
    observed: Optional[torch.Tensor] = None,
    policy=None,
    perturbation: Optional[torch.Tensor] = None,
) -> BudgetPlan:
    """Per-layer budgets of every sequence from the similarity sums of its prompt, by any
    allocator of squeeze_ops.allocators (default: the authors' formula, Squeeze()).

    cos_sum: fp32 [L, B], row l as accumulated by add_rmsnorm_cossim / add_cossim of layer l
        over the whole prompt (so cos_sum[l] is the contiguous [B] buffer that layer's call takes).
    prompt_lens: integer [B], prompt tokens of each sequence (the count behind each sum).
    similarity[b, l] = cos_sum[l, b] / prompt_lens[b] (0 for an empty prompt).
    Base budget per layer in tokens, exactly one of:
        b_init: fraction of the prompt, base = b_init * prompt_lens (BASE = prompt length, as in
            the authors' Llama code), computed in float64;
        base_tokens: tokens, a number or [B] tensor (e.g. b_init * 8000 for their Mistral code).
    capacity: integer [B], tokens one layer of each sequence can hold (prompt + tokens to
        generate; default the prompt): the cap of the allocators that redistribute.
    min_budget: smallest budget of any layer (the policy's guard: sinks + 1, 2 for H2O).
    max_budget: number or int32 [B], optional hard cap applied last (no redistribution).
    observed: fp32 [B, L, Hkv, T_max], the attention mass each prompt position received from the
        last W prompt queries (pad_observed of observed_attention or prefill_attention's scores
        with score_window = W), and policy: the SequencePolicy; needed by Coverage only.
    perturbation: fp32 [B, L, KNOTS + 1], per layer attention_perturbation's curve of the
        policy the caches evict with; needed by Perturbation only.
    Returns a BudgetPlan (budgets int32 [B, L], or [B, L, Hkv] for a per-head allocator such as
    CalibratedHeads; labels, centroids, similarity), all on cos_sum's device, without reading
    anything back to the host.
    """
    _meta.check_dtype(cos_sum, torch.float32, "cos_sum")
    _meta.check_rank(cos_sum, 2, "cos_sum")
    B = cos_sum.shape[1]
    _check_lengths(prompt_lens, B, cos_sum, "prompt_lens")
    _meta.check((b_init is None) != (base_tokens is None), "b_init, base_tokens: pass exactly one of them")
    _meta.check(callable(getattr(allocator, "allocate", None)),
                f"allocator: expected an allocator of squeeze_ops.allocators, got {type(allocator).__name__}")
    if capacity is None:
        capacity = prompt_lens
    _check_lengths(capacity, B, cos_sum, "capacity")

    similarity = (cos_sum / prompt_lens.clamp_min(1).to(torch.float32)).t().contiguous()
    if b_init is not None:
        _meta.check(b_init >= 0, f"b_init: expected b_init >= 0, got {b_init}")
        base = (prompt_lens.to(torch.float64) * b_init).to(torch.float32)
    elif isinstance(base_tokens, torch.Tensor):
        base = base_tokens.to(torch.float32)
    else:
        base = torch.full((B,), float(base_tokens), dtype=torch.float32, device=cos_sum.device)
    if observed is not None:
        _meta.check_dtype(observed, torch.float32, "observed")
        _meta.check(observed.dim() == 4 and observed.shape[:2] == (B, cos_sum.shape[0]),
                    f"observed: expected shape [B={B}, L={cos_sum.shape[0]}, Hkv, T_max], got {tuple(observed.shape)}")
        _meta.check_device(observed, cos_sum, "observed", "cos_sum")
    if perturbation is not None:
        _meta.check_dtype(perturbation, torch.float32, "perturbation")
        _meta.check(perturbation.dim() == 3 and perturbation.shape[:2] == (B, cos_sum.shape[0])
                    and perturbation.shape[2] >= 2,
                    f"perturbation: expected shape [B={B}, L={cos_sum.shape[0]}, knots + 1 >= 2], "
                    f"got {tuple(perturbation.shape)}")
        _meta.check_device(perturbation, cos_sum, "perturbation", "cos_sum")
    request = Request(similarity, base, prompt_lens, capacity, min_budget, observed, policy, perturbation)
    budgets, labels, centroids = allocator.allocate(request)
    if max_budget is not None:
        if not isinstance(max_budget, torch.Tensor):
            max_budget = torch.full((B,), int(max_budget), dtype=torch.int32, device=cos_sum.device)
        cap = max_budget.to(budgets.dtype).view(B, *[1] * (budgets.dim() - 1))
        budgets = torch.minimum(budgets, cap)
    return BudgetPlan(budgets, labels, centroids, similarity)


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
    """The authors' formula: allocate(cos_sum, prompt_lens, Squeeze(p, k), ...).

    p (> 0; p = 1 is the uniform baseline), k, min_budget, max_budget (number or int32 [B]):
    as in layer_budgets; the other arguments as in allocate.
    """
    return allocate(cos_sum, prompt_lens, Squeeze(p, k), b_init=b_init, base_tokens=base_tokens,
                    min_budget=min_budget, max_budget=max_budget)


def _last_query_attention(q, k, lse, start, n, window, scale):
    """Attention probabilities of the last min(window, n) queries of the prompt packed at
    [start, start + n): fp32 [H, W, n], causal (0 above the diagonal), from the prefill's lse;
    query head h reads KV head h // (H / Hkv)."""
    first = max(n - window, 0)
    qs = q[start + first : start + n].float()  # [W, H, D]
    ks = k[start : start + n].float().repeat_interleave(q.shape[1] // k.shape[1], 1)  # [n, H, D]
    logits = scale * torch.einsum("ihd,jhd->hij", qs, ks)
    causal = torch.arange(n, device=q.device)[None, :] <= torch.arange(first, n, device=q.device)[:, None]
    return torch.exp(logits - lse[start + first : start + n].float().t()[:, :, None]).masked_fill(~causal, 0.0)


def observed_attention(q, k, lse, prompt_lens, window, scale):
    """Column scores of the last `window` queries of every prompt, from a prefill that computed
    another kind (e.g. H2O's all-query scores): the signal of the Coverage allocator.

        observed[j, g] = sum_{h in group g} sum_{i in the last W queries, i >= j}
                         exp(scale * q_i,h . k_j,g - lse[i, h])
    i.e. prefill_attention's scores with score_window = W, recomputed for W queries per prompt
    from its lse (W x T work per head, plain PyTorch). q [T, H, D], k [T, Hkv, D] packed,
    lse fp32 [T, H] (prefill_attention's), prompt_lens: host list of the B lengths.
    Returns fp32 [T, Hkv].
    """
    Hkv = k.shape[1]
    group = q.shape[1] // Hkv
    out = torch.zeros(q.shape[0], Hkv, dtype=torch.float32, device=q.device)
    start = 0
    for n in prompt_lens:
        p = _last_query_attention(q, k, lse, start, n, window, scale)
        out[start : start + n] = p.sum(1).view(Hkv, group, n).sum(1).t()
        start += n
    return out


def kept_order(n, policy, scores=None):
    """The prompt positions of an n-token prompt in the order a growing cache keeps them:
    a cache of b slots keeps the first min(b, n) (reference.kept_positions; its kept sets are
    nested in b). int64 [G, n], one row per KV head for h2o (G = Hkv; scores fp32 [n, Hkv]
    are its column scores), one row for window and streaming (G = 1).

    window: the newest first. streaming: the sinks (newest first), then the newest others.
    h2o: each position's entry budget (the smallest b that keeps it) by bisection on b,
    membership counted as in kept_positions (sinks, floor(b * recent_ratio) newest, heavy
    hitters by score, ties to the larger position). A heavy hitter's test counts the middle
    positions evicted after it (_AheadCounter): O(n sqrt(n)) time and memory per KV head and
    bisection step, at prefill.
    """
    t = torch.arange(n, device=scores.device if scores is not None else None)
    s = min(policy.sinks, n)
    if policy.kind != "h2o":
        return torch.where(t < s, s - t, n - t + s).argsort()[None]
    if scores is None or scores.shape[0] != n:
        raise ValueError(f"scores: the h2o kept order needs the prompt's column scores [n={n}, Hkv]")
    orders = []
    for column in scores.t().double():
        ahead = _AheadCounter(column, s)

        def kept(b):  # int64 [n] budgets -> bool [n]: position i kept by a cache of b[i] slots
            recent_start = torch.clamp(n - torch.floor(b.double() * policy.recent_ratio).long(), min=s)
            protected = s + n - recent_start
            heavy = ahead.count(recent_start) < b - protected  # decides only for the middle positions
            full = (t < s) | (t >= recent_start) | heavy
            # Fewer slots than protected tokens: the sinks, then the newest (or the newest sinks).
            short = torch.where(b >= s, (t < s) | (t >= n - (b - s)), (t >= s - b) & (t < s))
            return (b >= n) | torch.where(b >= protected, full, short)

        lo, hi = torch.zeros_like(t), torch.full_like(t, n)  # not kept at lo, kept at hi
        for _ in range(n.bit_length() + 1):
            mid = (lo + hi) // 2
            inside = kept(mid)
            lo, hi = torch.where(inside, lo, mid), torch.where(inside, mid, hi)
        orders.append(hi.argsort())
    return torch.stack(orders)


class _AheadCounter:
    """For every position i of a prompt and an end R[i]: how many positions u in [s, R[i]) an
    h2o cache evicts after i (u ahead of i: a higher score, or an equal score and u > i).

    Ranks in eviction order (0 = kept longest) make that a 2-D dominance count, answered from
    per-block prefix histograms: with blocks of S ~ sqrt(n) positions, C[j, x] counts the
    positions in [s, j * S) of rank < x, and the block holding R[i] is compared directly.
    Memory (n / S + 1) x (n + 1) counts plus n x S per query, instead of an n x n matrix.
    """

    def __init__(self, column, s):
        n = column.shape[0]
        device = column.device
        # Descending score, ties to the larger position: a stable sort of the reversed column.
        by_rank = n - 1 - column.flip(0).argsort(descending=True, stable=True)
        self.rank = torch.empty_like(by_rank)
        self.rank[by_rank] = torch.arange(n, device=device)
        self.block = max(1, int(n ** 0.5))
        blocks = -(-n // self.block)
        pos = torch.arange(n, device=device)
        counted = (pos >= s).long()
        hist = torch.zeros(blocks, n + 1, dtype=torch.long, device=device)
        hist.index_put_((pos // self.block, self.rank + 1), counted, accumulate=True)
        # C[j, x]: positions in [s, j * S) with rank < x (row 0: none).
        self.prefix = F.pad(hist.cumsum(1).cumsum(0), (0, 0, 1, 0))
        self.s, self.n = s, n

    def count(self, end):
        """int64 [n]: for each position i, the positions u in [s, end[i]) ahead of i."""
        n, S = self.n, self.block
        j = end // S
        whole = self.prefix[j, self.rank]
        u = j[:, None] * S + torch.arange(S, device=end.device)  # [n, S]: the block holding end
        inside = (u < end[:, None]) & (u >= self.s)
        partial = (inside & (self.rank[u.clamp_max(n - 1)] < self.rank[:, None])).sum(1)
        return whole + partial


def attention_perturbation(q, k, v, lse, out_proj, residual, prompt_lens, policy, window, scale, scores=None):
    """How far evicting a layer's prompt to b slots moves the residual stream, per prompt, at
    the budgets b_j = perturbation_knots(T)[j]: the signal of the Perturbation allocator.

        E[b, j] = mean over the last W queries i of  |Wo (o_i - o_i(b_j))|^2 / |x_i|^2
    o_i: query i's attention output over its whole prompt (all heads, [H * D]); o_i(b): the same
    attention restricted (and renormalised) to the b slots the policy keeps (kept_order, as
    reference.kept_positions with the prefill's scores; no slot: o_i(0) = 0); Wo the layer's
    output projection; x_i the residual stream after the attention is added (x_in + Wo o_i).
    E = 0 from b = T on (and for an empty prompt). Plain PyTorch at prefill: W x T x D work and
    W x T memory per query head, W x KNOTS output projections per prompt (and kept_order's
    O(T^1.5 log T) per KV head for h2o).
    q [T, H, D], k/v [T, Hkv, D] packed (keys after RoPE); lse fp32 [T, H] (prefill_attention's);
    out_proj [hidden, H * D] (the o_proj weight); residual [T, hidden] (x_in + attention);
    prompt_lens: host list of the B lengths; policy: the SequencePolicy; scores fp32 [T, Hkv]:
    the column scores the h2o cache is compressed with (h2o only).
    Returns fp32 [B, KNOTS + 1].
    """
    Hkv = k.shape[1]
    group = q.shape[1] // Hkv
    out = torch.zeros(len(prompt_lens), KNOTS + 1, dtype=torch.float32, device=q.device)
    start = 0
    for row, n in enumerate(prompt_lens):
        if n == 0:  # nothing to evict: E = 0
            continue
        p = _last_query_attention(q, k, lse, start, n, window, scale)  # [H, W, n]
        order = kept_order(n, policy, None if scores is None else scores[start : start + n]).to(q.device)
        kept = perturbation_knots(torch.tensor([n]), KNOTS)[0].long().to(q.device)  # slots kept at each knot
        # The kept-order positions between consecutive knots, padded to the longest segment
        # (lengths differ by at most one): segment sums by one batched product, never [W, T, D].
        width = -(-n // KNOTS)  # ceil(n / KNOTS): the longest segment
        slot = kept[:-1, None] + torch.arange(width, device=q.device)  # [KNOTS, width]
        in_segment = slot < kept[1:, None]
        slot = slot.clamp_max(n - 1)
        deltas = []
        for g in range(Hkv):
            first = order[min(g, order.shape[0] - 1)][slot]  # prompt positions [KNOTS, width]
            ph = p[g * group : (g + 1) * group].double()[..., first] * in_segment  # [group, W, KNOTS, width]
            vh = v[start : start + n, g].double()[first]  # [KNOTS, width, D]
            # Prefix sums over the segments (leading 0): the kept sums at every knot.
            mass = F.pad(ph.sum(-1).cumsum(-1), (1, 0))  # [group, W, KNOTS + 1]
            weighted = F.pad(torch.einsum("gwjs,jsd->gwjd", ph, vh).cumsum(-2), (0, 0, 1, 0))  # [.., KNOTS + 1, D]
            full = weighted[:, :, -1:] / mass[..., -1:, None]  # the last knot keeps the whole prompt
            deltas.append(full - weighted / mass.clamp_min(1e-300)[..., None])
        delta = torch.cat(deltas).permute(1, 2, 0, 3).reshape(p.shape[1], KNOTS + 1, -1)  # [W, KNOTS + 1, H * D]
        moved = delta @ out_proj.double().t()  # [W, KNOTS + 1, hidden]
        x = residual[start + n - p.shape[1] : start + n].double()  # [W, hidden]
        out[row] = (moved.pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-300)[:, None]).mean(0).float()
        start += n
    return out


def pad_observed(per_layer, prompt_lens, rows=None):
    """Per-layer packed column scores (L tensors [T_total, Hkv]) as fp32 [B, L, Hkv, T_max],
    zero past each prompt's end; rows: optional host list of prompt indices to take (forks)."""
    lens = list(prompt_lens)
    rows = list(range(len(lens))) if rows is None else list(rows)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    t_max = max(lens[i] for i in rows)
    stacked = torch.stack(per_layer).float()  # [L, T_total, Hkv]
    out = stacked.new_zeros(len(rows), stacked.shape[0], stacked.shape[2], t_max)
    for b, i in enumerate(rows):
        out[b, :, :, : lens[i]] = stacked[:, starts[i] : starts[i] + lens[i]].transpose(1, 2)
    return out


def _check_lengths(lengths, B, cos_sum, name):
    _meta.check(not lengths.is_floating_point() and not lengths.is_complex() and lengths.dtype != torch.bool,
                f"{name}: expected an integer dtype, got {lengths.dtype}")
    _meta.check(lengths.shape == (B,), f"{name}: expected shape ({B},) (sequences of cos_sum [L, B]), "
                f"got {tuple(lengths.shape)}")
    _meta.check_device(lengths, cos_sum, name, "cos_sum")


@dataclass
class Diagnostics:
    """What a plan does with its budget, per sequence (host data; see `diagnose`).

    similarity [B][L], labels [B][L] (group of each layer, 0 = most important),
    group_sizes [B][k], nominal [B][L] (the plan's budgets; [B][L][Hkv] for a per-head plan),
    effective (min(nominal, capacity): what a layer can actually hold), waste [B] (share of the nominal
    total that no layer can hold), largest_group [B] (share of the layers in the largest
    group), messages: the warnings raised.
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


def diagnose(plan, capacity, allocator=None, *, sequences=None, waste_tolerance=WASTE_TOLERANCE,
             group_tolerance=GROUP_TOLERANCE, warn=True) -> Diagnostics:
    """Diagnostics of a BudgetPlan (reads it back to the host: not for the decode path).

    capacity: integer [B] or a number, tokens one layer can hold (prompt + tokens to generate).
    allocator: the plan's allocator; groups are judged only for one that uses them (Squeeze
        with p != 1; None counts as one).
    sequences: the names of the plan's rows in the messages (default 0..B-1).
    Warns (warnings.warn, UserWarning; one warning per kind, naming the sequences) when a
    sequence's nominal total exceeds its effective one by more than waste_tolerance (budget no
    layer can hold), and when one group holds more than group_tolerance of a sequence's layers
    (the squeeze degenerates: nearly every layer squeezed, or nearly none).
    """
    budgets = plan.budgets.cpu()
    B, L = budgets.shape[:2]
    capacity = torch.as_tensor(capacity).cpu().expand(B)
    effective = torch.minimum(budgets, capacity.to(budgets.dtype).view(B, *[1] * (budgets.dim() - 1)))
    labels = plan.labels.cpu()
    k = plan.centroids.shape[1]
    sizes = torch.stack([(labels == g).sum(1) for g in range(k)], 1)
    waste = (1 - effective.flatten(1).sum(1).double() / budgets.flatten(1).sum(1).double().clamp_min(1)).tolist()
    largest = (sizes.max(1).values.double() / L).tolist()
    grouped = allocator is None or allocator.uses_groups
    names = list(range(B)) if sequences is None else list(sequences)
    messages = []
    wasteful = [b for b in range(B) if waste[b] > waste_tolerance]
    if wasteful:
        b = max(wasteful, key=lambda i: waste[i])
        over = [layer for layer in range(L) if bool((budgets[b, layer] > capacity[b]).any())]
        messages.append(
            f"wasted budget in sequences {[names[i] for i in wasteful]}: up to {100 * waste[b]:.1f}% of the "
            f"budget can never be used (sequence {names[b]}: layers {over} were given more tokens than they can "
            f"hold, {int(capacity[b])}); an allocator that redistributes (Squeeze(clamp=True), Continuous, "
            f"Pyramid, Calibrated, Coverage, Perturbation, CalibratedHeads) uses it")
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
