"""Per-KV-head budgets: CalibratedHeads, from a per-model profile of how much each KV head
gains from its whole context (HeadGains). The plan is [B, L, Hkv]; the cache gives every
(sequence, layer, KV head) row its own budget.
"""
from dataclasses import dataclass

import torch

from .base import Allocator, check_spread, on_device, reported_groups, round_to_total, water_fill
from .files import HeadGains


@dataclass(frozen=True)
class CalibratedHeads(Allocator):
    """Per-KV-head budgets from a calibrated head-gain profile: a head whose loss falls more
    when it keeps its whole context keeps more of it (on SmolLM2-135M the heads of one layer
    differ far more, and more steadily across texts, than the layers do).

        w[l, h] = (max(g[l, h], 0) + prior * mean_(l, h) max(g, 0))^gamma
        b[s, l, h] = clamp(lam_s * w[l, h], floor * base, cap * base)   (and what a head can hold)
        sum_(l, h) b[s, l, h] = Hkv * L * floor(base)                   (equal KV held: uniform's total)
    g: the HeadGains values; with a tuple of HeadGains (one model and policy, measured at
    different fractions) each sequence uses the one whose fraction is nearest to its base
    budget / prompt length (ties: the smaller). prior > 0 shrinks the spread toward uniform and
    keeps a head of no measured gain above zero; lam_s by water-filling, integers by largest
    remainder. Returns a per-head plan: budgets int32 [B, L, Hkv].
    """

    gains: object
    gamma: float = 1.0
    floor: float = 0.5
    cap: float = 3.0
    prior: float = 0.5

    per_head = True

    def __post_init__(self):
        profiles = self.profiles
        if not profiles or not all(isinstance(g, HeadGains) for g in profiles):
            raise ValueError("gains: expected HeadGains or a non-empty tuple of them")
        first = profiles[0]
        if any((g.model, g.num_layers, g.num_kv_heads, g.policy) != (first.model, first.num_layers,
                                                                     first.num_kv_heads, first.policy)
               for g in profiles) or len({g.fraction for g in profiles}) != len(profiles):
            raise ValueError("gains: the head gains must share model, layers, heads and policy, at distinct fractions")
        check_spread(self.gamma, self.floor, self.cap)
        if not self.prior > 0:
            raise ValueError(f"prior: expected > 0, got {self.prior}")

    @property
    def profiles(self):
        """The HeadGains as a tuple sorted by fraction."""
        gains = self.gains if isinstance(self.gains, tuple) else (self.gains,)
        return tuple(sorted(gains, key=lambda g: getattr(g, "fraction", 0)))

    def allocate(self, request):
        B, L = request.similarity.shape
        profiles = self.profiles
        if profiles[0].num_layers != L:
            raise ValueError(f"gains: measured on {profiles[0].num_layers} layers, the model has {L}")
        heads = profiles[0].num_kv_heads
        device = request.similarity.device
        fractions = on_device(tuple(g.fraction for g in profiles), torch.float64, device)
        values = on_device(tuple(g.values for g in profiles), torch.float64, device)  # [K, L, Hkv]
        fraction = request.base.double()[:, None] / request.prompt_lens.double()[:, None].clamp_min(1)
        g = values[(fraction - fractions).abs().argmin(dim=1)].reshape(B, L * heads).clamp_min(0)
        mean = g.mean(1, keepdim=True)
        w = torch.where(mean > 0, (g + self.prior * mean).pow(self.gamma), torch.ones_like(g))
        base = request.base.double()[:, None]
        lo, hi = (t.repeat_interleave(heads, 1) for t in request.bounds(low=self.floor * base, high=self.cap * base))
        total = request.total() * heads
        x = round_to_total(water_fill(w, total, lo, hi), total, hi)
        labels, centroids = reported_groups(request.similarity)
        return x.view(B, L, heads), labels, centroids

    def describe(self):
        extra = "" if self.prior == 0.5 else f" prior={self.prior:g}"
        return f"calibrated heads gamma={self.gamma:g} floor={self.floor:g} cap={self.cap:g}{extra}"

