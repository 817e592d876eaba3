"""Allocators of the allocator study that the library does not recommend (research only):

    ClampedSqueeze(p, k)   the authors' group shares, scaled to the uniform total and capped at
                           what a layer can hold, the surplus redistributed (water-filling)
    Pyramid(ratio)         PyramidKV-style fixed linear ramp, `ratio` times more budget in the
                           first layer than in the last
    Calibrated(profile)    greedy marginal-gain allocation over a per-model sensitivity profile
                           (SensitivityProfile), alone or around the operating point (in context)
All of them give each sequence exactly the uniform total (research/README.md compares them).
"""
from dataclasses import dataclass

import torch

from squeeze_ops.engine.allocators import Allocator, SensitivityProfile, round_to_total, water_fill
from squeeze_ops.engine.allocators.base import conserve, on_device, reported_groups
from squeeze_ops.ops import kmeans1d
from squeeze_ops.vocabulary import DEFAULT_K, DEFAULT_P


@dataclass(frozen=True)
class ClampedSqueeze(Allocator):
    """The shares of Squeeze (p for the most similar group G, (L - p|G|) / (L - |G|) for the
    others) scaled to the uniform total, each layer capped at what it can hold; the surplus
    of capped layers goes to the uncapped ones in proportion to their shares."""

    p: float = DEFAULT_P
    k: int = DEFAULT_K

    uses_groups = True

    def __post_init__(self):
        if not self.p > 0:
            raise ValueError(f"p: expected p > 0, got {self.p}")
        if self.k < 1:
            raise ValueError(f"k: expected k >= 1, got {self.k}")

    def allocate(self, request):
        labels, centroids = kmeans1d(request.similarity, self.k)
        top = labels == self.k - 1
        n_top = top.sum(1, keepdim=True).double()
        L = request.num_layers
        whole = (n_top == 0) | (n_top == L)  # no group to squeeze: uniform
        other = (L - self.p * n_top) / (L - n_top).clamp_min(1)
        shares = torch.where(whole, 1.0, torch.where(top, self.p, other))
        return conserve(request, shares, *request.bounds()), labels, centroids

    def describe(self):
        return f"squeeze p={self.p:g} clamped" + ("" if self.k == DEFAULT_K else f" k={self.k}")


@dataclass(frozen=True)
class Pyramid(Allocator):
    """PyramidKV-style fixed schedule: budgets fall linearly from the first layer to the last,
    the first holding `ratio` times the last (ratio = 1: uniform); the signal is not read.
    Capped at what a layer can hold, the surplus redistributed, the total the uniform one."""

    ratio: float = 2.0

    def __post_init__(self):
        if not self.ratio >= 1:
            raise ValueError(f"ratio: expected ratio >= 1, got {self.ratio}")

    def allocate(self, request):
        B, L = request.similarity.shape
        depth = torch.linspace(0, 1, L, dtype=torch.float64, device=request.similarity.device)
        weights = (self.ratio + (1 - self.ratio) * depth).expand(B, L)
        labels, centroids = reported_groups(request.similarity)
        return conserve(request, weights, *request.bounds()), labels, centroids

    def describe(self):
        return f"pyramid ratio={self.ratio:g}"


@dataclass(frozen=True)
class Calibrated(Allocator):
    """Greedy marginal-gain allocation over sensitivity profiles.

    profile: one SensitivityProfile, or a tuple of profiles of one model and policy measured
        at different contexts (each with as many budgets); every sequence uses the profile
        whose context is nearest to its base budget / prompt length (ties: the smaller).
    Each layer's loss as a function of its budget is the profile's curve (piecewise linear
    between the measured fractions, SensitivityProfile.loss_curves), made convex (lower hull:
    diminishing returns). Every layer starts at the smallest measured fraction of the prompt
    (and at least `floor` * base); the rest of the uniform total buys budget segments in order
    of loss removed per token, which is optimal for a sum of convex curves. Budget no segment
    pays for raises the smallest layers.
    """

    profile: object
    floor: float = 0.0

    def __post_init__(self):
        if not 0 <= self.floor <= 1:
            raise ValueError(f"floor: expected a fraction of the base in [0, 1], got {self.floor}")
        profiles = self.profiles
        if not profiles or not all(isinstance(p, SensitivityProfile) for p in profiles):
            raise ValueError("profile: expected a SensitivityProfile or a non-empty tuple of them")
        first = profiles[0]
        if any((p.model, p.num_layers, p.policy, len(p.budgets)) != (first.model, first.num_layers, first.policy,
                                                                       len(first.budgets)) for p in profiles):
            raise ValueError("profile: the profiles must share model, layers, policy and number of budgets")
        if len({p.context for p in profiles}) != len(profiles):
            raise ValueError(f"profile: expected distinct contexts, got {[p.context for p in profiles]}")
        # Host data computed once, here: allocate() must trace under torch.compile from its first call.
        object.__setattr__(self, "_curves", self._measure_curves())

    @property
    def profiles(self):
        """The profiles as a tuple sorted by context."""
        profiles = self.profile if isinstance(self.profile, tuple) else (self.profile,)
        return tuple(sorted(profiles, key=lambda p: p.context))

    def _measure_curves(self):
        """(contexts (K), knots (K x (m + 1) fractions ending at 1), gains (K x L x m: loss removed
        per unit fraction on each segment, non-increasing along the segments)) as tuples."""
        contexts, knots, gains = [], [], []
        for prof in self.profiles:
            row = list(prof.budgets) + [1.0]
            contexts.append(prof.context)
            knots.append(tuple(row))
            gains.append(tuple(tuple(_convex_slopes(row, loss)) for loss in prof.loss_curves()))
        return tuple(contexts), tuple(knots), tuple(gains)

    def allocate(self, request):
        B, L = request.similarity.shape
        num_layers = self.profiles[0].num_layers
        if num_layers != L:
            raise ValueError(f"profile: measured on {num_layers} layers, the model has {L}")
        device = request.similarity.device
        contexts, knots, gains = self._curves
        prompt = request.prompt_lens.double()[:, None]
        # The profile of each sequence: nearest context to its base budget per prompt token.
        contexts = on_device(contexts, torch.float64, device)
        fraction = request.base.double()[:, None] / prompt.clamp_min(1)
        pick = (fraction - contexts).abs().argmin(dim=1)
        knots = on_device(knots, torch.float64, device)[pick]  # [B, m + 1]
        gains = on_device(gains, torch.float64, device)[pick]  # [B, L, m]
        lo, hi = request.bounds(low=torch.maximum(knots[:, :1] * prompt, self.floor * request.base.double()[:, None]))
        # Segment j of layer l covers [knots[j] * T, knots[j + 1] * T], cut below at lo.
        starts = torch.maximum((knots[:, :-1] * prompt)[:, None, :], lo[:, :, None])
        ends = torch.maximum((knots[:, 1:] * prompt)[:, None, :], lo[:, :, None])
        lengths = torch.where(gains > 0, ends - starts, 0.0)
        order = gains.reshape(B, -1).argsort(dim=1, descending=True, stable=True)
        sorted_len = lengths.reshape(B, -1).gather(1, order)
        spend = request.total() - lo.sum(1, keepdim=True)
        before = sorted_len.cumsum(1) - sorted_len
        bought = torch.minimum((spend - before).clamp(min=0), sorted_len)
        taken = torch.zeros_like(sorted_len).scatter(1, order, bought)
        x = torch.minimum(lo + taken.view(B, L, -1).sum(-1), hi)
        x = water_fill(torch.ones_like(x), request.total(), x, torch.maximum(hi, x))
        labels, centroids = reported_groups(request.similarity)
        return round_to_total(x, request.total(), hi), labels, centroids

    def describe(self):
        contexts = [p.context for p in self.profiles]
        where = "" if contexts == [1.0] else " in context " + "/".join(f"{c:g}" for c in contexts)
        return "calibrated" + where + (f" floor={self.floor:g}" if self.floor else "")


def _convex_slopes(knots, loss):
    """Slopes -d loss / d fraction of the lower convex hull of a non-increasing piecewise-linear
    curve (pool adjacent violators), one per segment, non-increasing along the segments."""
    blocks = []  # [slope, width, segments]
    for j in range(len(knots) - 1):
        width = knots[j + 1] - knots[j]
        blocks.append([(loss[j] - loss[j + 1]) / width, width, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            s2, w2, n2 = blocks.pop()
            s1, w1, n1 = blocks.pop()
            blocks.append([(s1 * w1 + s2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [slope for slope, _, n in blocks for _ in range(n)]
