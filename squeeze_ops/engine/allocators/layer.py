"""Allocators that read only the layer similarity (or nothing): the authors' formula, the
uniform baseline, a continuous weighting by the similarity, and explicit budgets.

    Squeeze(p, k)                 SqueezeAttention's formula (layer_budgets), faithful: the default
    Uniform()                     every layer floor(base): the baseline (= Squeeze(p=1))
    SimilarityWeighted(gamma, ..) budget proportional to (1 - similarity)^gamma, floor and cap
    Fixed(budgets)                explicit per-layer (or per-head) budgets in tokens
"""
import math
from dataclasses import dataclass

import torch

from ...ops import layer_budgets
from ...vocabulary import DEFAULT_K, DEFAULT_P
from .base import Allocator, check_number, check_spread, conserve, on_device, reported_groups


@dataclass(frozen=True)
class Squeeze(Allocator):
    """SqueezeAttention (docs/METHOD.md#budgets): 1-D K-Means of the similarity into k groups; the most
    similar group G keeps floor(p * base), every other layer floor(base * (L - p|G|) / (L - |G|)),
    so the total L * base is kept up to the floors; no cap, so budget above what a layer can
    hold is wasted (the diagnostics say so). p = 1 is the uniform baseline."""

    p: float = DEFAULT_P
    k: int = DEFAULT_K

    def __post_init__(self):
        check_number(self.p, "p")
        check_number(self.k, "k", integral=True)
        if not (self.p > 0 and math.isfinite(self.p)):
            raise ValueError(f"p: expected a finite p > 0, got {self.p}")
        if self.k < 1:
            raise ValueError(f"k: expected k >= 1, got {self.k}")

    @property
    def uses_groups(self):
        return self.p != 1.0

    def allocate(self, request):
        if self.p == 1.0:  # uniform: no grouping needed (and none possible with fewer layers than k)
            return Uniform().allocate(request)
        if self.k > request.num_layers:
            raise ValueError(f"k: Squeeze(p={self.p:g}) groups the layers into k = {self.k} groups, the model "
                             f"has {request.num_layers} layers")
        return layer_budgets(request.similarity, request.base, self.p, self.k, request.min_budget, None)

    def describe(self):
        return f"squeeze p={self.p:g}" + ("" if self.k == DEFAULT_K else f" k={self.k}")


@dataclass(frozen=True)
class Uniform(Allocator):
    """The baseline: every layer keeps floor(base) tokens (at least min_budget)."""

    cap = 1.0

    def allocate(self, request):
        budgets = request.base.floor()[:, None].expand(request.similarity.shape)
        labels, centroids = reported_groups(request.similarity)
        return budgets.clamp_min(request.min_budget).to(torch.int32), labels, centroids

    def describe(self):
        return "uniform"


@dataclass(frozen=True)
class SimilarityWeighted(Allocator):
    """Budget proportional to (1 - similarity_l)^gamma: the less attention changed a layer's
    residual stream, the fewer tokens it keeps; gamma = 0 is uniform, larger gamma follows
    the similarity more sharply. Every layer keeps at least floor(floor * base) and at most
    floor(cap * base) tokens (and what it can hold); what the bounds cut is redistributed over
    the others (water-filling), so the total is the uniform one.
    """

    gamma: float = 1.0
    floor: float = 0.25
    cap: float = 4.0

    def __post_init__(self):
        check_spread(self.gamma, self.floor, self.cap)

    def allocate(self, request):
        # (1 - s) is clamped away from 0 so that a layer of similarity 1 still gets its floor
        # and a profile of equal similarities is exactly uniform.
        weights = (1.0 - request.similarity.double()).clamp_min(1e-6).pow(self.gamma)
        base = request.base.double()[:, None]
        lo, hi = request.bounds(low=self.floor * base, high=self.cap * base)
        labels, centroids = reported_groups(request.similarity)
        return conserve(request, weights, lo, hi), labels, centroids

    def describe(self):
        return f"similarity-weighted gamma={self.gamma:g} floor={self.floor:g} cap={self.cap:g}"


@dataclass(frozen=True)
class Fixed(Allocator):
    """Explicit budgets in tokens, the same for every sequence (at least min_budget): a tuple
    of L per-layer budgets, or of L tuples of Hkv per-KV-head budgets (a per-head plan). The
    base budget is ignored: the total is the caller's. For measuring sensitivities and
    replaying a schedule."""

    budgets: tuple

    def __post_init__(self):
        rows = {len(b) if isinstance(b, tuple) else None for b in self.budgets}
        if len(rows) > 1 or 0 in rows:
            raise ValueError(f"budgets: expected L budgets or L tuples of as many head budgets, got {self.budgets}")

    @property
    def per_head(self):
        return bool(self.budgets) and isinstance(self.budgets[0], tuple)

    def allocate(self, request):
        if len(self.budgets) != request.num_layers:
            raise ValueError(f"budgets: expected {request.num_layers} layer budgets, got {len(self.budgets)}")
        row = on_device(self.budgets, torch.int32, request.similarity.device)  # [L] or [L, Hkv]
        labels, centroids = reported_groups(request.similarity)
        budgets = row.clamp_min(request.min_budget).expand(request.similarity.shape[0], *row.shape)
        return budgets.contiguous(), labels, centroids

    def describe(self):
        return "fixed per head" if self.per_head else "fixed"
