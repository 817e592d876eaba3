"""Allocators that read what the prefill observed of a request's attention: the attention
mass of its last W prompt queries (Coverage) and the residual-stream perturbation that
eviction causes for them (Perturbation). The prefill records both (signals.py) when the
settings ask for them (SqueezeSettings.prefill_needs).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ..signals import interpolate, perturbation_knots
from .base import Allocator, bisect, check_bounds, check_spread, on_device, reported_groups, round_to_total, water_fill
from .files import LayerGains


def retained_mass(observed, prompt_lens, policy):
    """Share of each layer's observed attention mass that a cache of b slots keeps, b = 0..T_max.

    observed: fp32 [B, L, Hkv, T_max] (Request.observed); prompt_lens int [B]; policy: a
    SequencePolicy. The kept set of b slots (reference.kept_positions): window, the newest b
    positions; streaming, the first `sinks` and the newest b - sinks; h2o, the b positions of
    highest observed mass per KV head (the heavy hitters that the recent queries see; the
    recent share is not modelled).
    Returns float64 [B, L, T_max + 1], non-decreasing in b, 0 at b = 0 and 1 from b = T on.
    """
    B, L, _, T_max = observed.shape
    per_head = observed.double()
    if policy.kind == "h2o":
        kept = per_head.sort(dim=-1, descending=True).values.sum(2).cumsum(-1)
        kept = torch.cat([torch.zeros_like(kept[..., :1]), kept], -1)
    else:
        prefix = per_head.sum(2).cumsum(-1)
        prefix = torch.cat([torch.zeros_like(prefix[..., :1]), prefix], -1)  # [B, L, T_max + 1]: mass before j

        def mass_before(j):  # j [B, T_max + 1] -> [B, L, T_max + 1]
            return prefix.gather(-1, j[:, None, :].expand(B, L, -1))

        b = torch.arange(T_max + 1, device=observed.device)
        T = prompt_lens.long()[:, None].expand(B, T_max + 1)
        s = T.clamp(max=policy.sinks if policy.kind == "streaming" else 0)
        # b <= s: the newest b sinks [s - b, s); b > s: the sinks [0, s) and the newest [max(T - b + s, s), T).
        sinks = mass_before(s) - mass_before((s - b).clamp(min=0))
        newest = mass_before(T) - mass_before(torch.maximum(T - b + s, s).clamp(max=T_max))
        kept = sinks + torch.where((b > s)[:, None, :], newest, torch.zeros_like(newest))
    total = kept[..., -1:].clamp_min(1e-30)
    return (kept / total).clamp(max=1.0)


def _budget_for_share(curves, share):
    """Smallest (real) b with curves[..., b] >= share, by linear interpolation between slots.
    curves float64 [B, L, n] non-decreasing; share float64 [B, L]. Returns float64 [B, L]."""
    n = curves.shape[-1]
    j = torch.searchsorted(curves, share[..., None].contiguous()).clamp(1, n - 1)  # first C[j] >= share
    c0, c1 = curves.gather(-1, j - 1)[..., 0], curves.gather(-1, j)[..., 0]
    step = ((share - c0) / (c1 - c0).clamp_min(1e-30)).clamp(0, 1)
    b = (j[..., 0] - 1).double() + step
    return torch.where(share <= 0, torch.zeros_like(b), b)



def _check_observe(observe):
    if not isinstance(observe, int) or observe < 1:
        raise ValueError(f"observe: expected >= 1 observed prompt queries, got {observe!r}")


@dataclass(frozen=True)
class Coverage(Allocator):
    """Per request, from the prefill's observed attention: every layer keeps the same share of
    its weighted attention mass (minimax), with weights w_l = (1 - similarity_l)^gamma.

    C_l(b) = share of layer l's attention mass, as the last `observe` prompt queries spread it,
    that the policy keeps with b slots (retained_mass). The budgets solve
        min_alpha  such that  b_l = smallest b with w_l (1 - C_l(b)) <= alpha w_max,
        clamped to [floor * base, cap * base] (and what a layer can hold), sum_l b_l <= total,
    by bisection on alpha (a fixed number of steps: no host synchronisation), so a layer whose
    attention is spread wide, or whose residual stream attention changes most, gets more; the
    uniform total is then filled exactly. gamma = 0 equalises the kept share alone.
    Needs Request.observed (the prefill records it with observe=W)
    and Request.policy.
    """

    gamma: float = 0.5
    floor: float = 0.75
    cap: float = 1.5
    observe: int = 32

    STEPS = 40

    def __post_init__(self):
        check_spread(self.gamma, self.floor, self.cap)
        _check_observe(self.observe)

    def allocate(self, request):
        if request.observed is None or request.policy is None:
            raise ValueError("observed: Coverage needs the prefill's observed attention (prefill with "
                             f"observe={self.observe}) and the policy")
        curves = retained_mass(request.observed, request.prompt_lens, request.policy)
        w = (1.0 - request.similarity.double()).clamp_min(1e-6).pow(self.gamma)
        w = w / w.max(dim=1, keepdim=True).values
        base = request.base.double()[:, None]
        lo, hi = request.bounds(low=self.floor * base, high=self.cap * base)
        total = request.total()

        def budgets(alpha):
            return _budget_for_share(curves, 1.0 - alpha / w).clamp(min=lo).minimum(hi)

        _, b = bisect(budgets, total, torch.zeros_like(total), torch.ones_like(total), self.STEPS)
        x = budgets(b)
        x = water_fill(torch.ones_like(x), total, x, torch.maximum(hi, x))
        labels, centroids = reported_groups(request.similarity)
        return round_to_total(x, total, hi), labels, centroids

    def describe(self):
        return f"coverage gamma={self.gamma:g} floor={self.floor:g} cap={self.cap:g}" + (
            "" if self.observe == 32 else f" observe={self.observe}")



@dataclass(frozen=True)
class Perturbation(Allocator):
    """Per request, from the prefill: the budgets that minimise the summed perturbation of
    the residual stream that eviction causes, to a power.

    E_l(b) = mean over the last `observe` prompt queries of |Wo (o - o(b))|^2 / |x|^2: how far
    restricting layer l's attention to the b slots the policy keeps moves the residual stream
    (signals.attention_perturbation). With `gains` (LayerGains: g_l, the loss per unit of E_l
    at layer l, fitted once per model and policy) the signal is g_l E_l(b), else E_l(b). The
    budgets solve
        min  sum_l (g_l E_l(b_l))^power   such that  sum_l b_l = total,
             floor * base <= b_l <= cap * base (and what a layer can hold),
    over the lower convex hull of each curve (known at KNOTS + 1 budgets, linear between): for a
    price lam per token each layer takes argmin_b (g_l E_l(b))^power + lam * b, lam is found by a fixed
    number of bisection steps on log(lam) (no host synchronisation) and the two hull vertices
    around the total are interpolated. power > 1 weighs the worst layers more (power -> inf
    equalises E). Unlike attention mass, E is small for a layer whose evicted tokens carry values
    like the kept ones (diffuse attention over similar tokens), whatever their share.
    Needs Request.perturbation (the prefill records it for the policy).
    """

    power: float = 2.0
    floor: float = 0.25
    cap: float = 4.0
    observe: int = 32
    gains: Optional[LayerGains] = None

    needs_perturbation = True
    STEPS = 64
    LOG_PRICE = (-30.0, 10.0)  # bisection range of log(lam)

    def __post_init__(self):
        if not self.power > 0:
            raise ValueError(f"power: expected > 0, got {self.power}")
        check_bounds(self.floor, self.cap)
        _check_observe(self.observe)
        if self.gains is not None and not isinstance(self.gains, LayerGains):
            raise ValueError(f"gains: expected LayerGains or None, got {type(self.gains).__name__}")

    def allocate(self, request):
        if request.perturbation is None:
            raise ValueError("perturbation: Perturbation needs the prefill's attention perturbation curves "
                             f"(prefill with observe={self.observe} and the policy)")
        curves = request.perturbation.double()
        if self.gains is not None:
            if self.gains.num_layers != request.num_layers:
                raise ValueError(f"gains: expected the gains of {request.num_layers} layers, got "
                                 f"{self.gains.num_layers} ({self.gains.model})")
            curves = curves * on_device(self.gains.values, torch.float64, curves.device)[None, :, None]
        knots = perturbation_knots(request.prompt_lens, curves.shape[-1] - 1)
        base = request.base.double()[:, None]
        lo, hi = request.bounds(low=self.floor * base, high=self.cap * base)
        # Candidate budgets: the knots, clamped into each layer's bounds (E = 0 past the prompt).
        budgets = torch.minimum(torch.maximum(knots[:, None, :], lo[..., None]), hi[..., None])
        cost = interpolate(curves, knots,
                            budgets.minimum(knots[:, None, -1:])).clamp_min(0).pow(self.power)
        cost = cost / cost.amax(dim=(1, 2), keepdim=True).clamp_min(1e-300)  # scale-free prices
        total = request.total()

        def take(log_price):  # [B, 1] -> the budgets [B, L] bought at that price
            j = (cost + log_price.exp()[:, :, None] * budgets).argmin(-1, keepdim=True)
            return budgets.gather(-1, j)[..., 0]

        a, b = bisect(take, total, torch.full_like(total, self.LOG_PRICE[0]),
                       torch.full_like(total, self.LOG_PRICE[1]), self.STEPS)
        under, over = take(b), take(a)
        gap = over.sum(1, keepdim=True) - under.sum(1, keepdim=True)
        t = ((total - under.sum(1, keepdim=True)) / gap.clamp_min(1e-30)).clamp(0, 1)
        x = under + t * (over - under)
        x = water_fill(torch.ones_like(x), total, x, torch.maximum(hi, x))
        labels, centroids = reported_groups(request.similarity)
        return round_to_total(x, total, hi), labels, centroids

    def describe(self):
        return f"perturbation power={self.power:g} floor={self.floor:g} cap={self.cap:g}" + (
            "" if self.observe == 32 else f" observe={self.observe}") + ("" if self.gains is None else " gained")

