"""Layer allocators: how the KV budget of one sequence is spread over its decoder layers (or,
per KV head, over its layers' heads).

Every allocator is a frozen dataclass (plain data: hashable, comparable, printable) with one
method, `allocate(request) -> (budgets, labels, centroids)`, called by the planner
(`squeeze_ops.planner.allocate`). A `Request` carries the per-request signal measured during
prefill (similarity [B, L]) and the sizes: the uniform base budget per layer, the prompt
lengths, what a layer can hold and the policy's smallest workable budget.

    Squeeze(p, k)             the authors' formula (layer_budgets), faithful: the default
    Squeeze(p, k, clamp=True) the same shares, capped at what a layer can hold, the surplus
                              redistributed to the uncapped layers
    Uniform()                 every layer floor(base): the baseline (= Squeeze(p=1))
    Continuous(gamma, ...)    budget proportional to (1 - similarity)^gamma, floor and cap
    Pyramid(ratio)            fixed linear ramp, `ratio` times more budget in the first layer
                              than in the last (PyramidKV)
    Calibrated(profile, ...)  greedy marginal-gain allocation over a per-model sensitivity
                              profile measured once on calibration text (SensitivityProfile),
                              alone or around the operating point (in context)
    Coverage(gamma, ...)      per request: every layer keeps the same share of its weighted
                              observed attention mass (last W prompt queries), weights
                              (1 - similarity)^gamma
    Perturbation(power, ...)  per request: the budgets that minimise the summed residual-stream
                              perturbation (to a power) that the policy's eviction causes for
                              the last W prompt queries, optionally weighted per layer by the
                              loss per unit of perturbation (LayerGains, fitted once)
    CalibratedHeads(gains, ...) per KV head: budgets that follow a per-model profile of how much
                              each head gains from its whole context (HeadGains, measured once);
                              a per-head plan [B, L, Hkv]
    Fixed(budgets)            explicit per-layer (or per-head) budgets in tokens (measurement, replay)

Totals: the allocators that redistribute (Squeeze(clamp=True), Continuous, Pyramid,
Calibrated, Coverage, Perturbation, CalibratedHeads) give every sequence exactly the uniform
baseline's total L * floor(base) (per head: Hkv * L * floor(base), what uniform holds over its
heads), so they are compared with Uniform at equal KV held, unless the policy's minimum budget
per layer needs more (floors win) or the layers cannot hold that much (capacity wins). The faithful
Squeeze keeps its own rounding (L * base - L < total <= L * base) and may give a layer more
than it can hold. Fixed ignores the base.

Everything in `allocate` is tensor work on the request's device with shapes known on the
host: no host synchronisation, so planning can sit in a captured CUDA graph or a
torch.compile(fullgraph=True) region.
"""
import json
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import NamedTuple, Optional

import torch

from .ops import kmeans1d, layer_budgets

# Groups reported (labels, centroids) by the allocators that do not group layers themselves.
REPORTED_GROUPS = 3
PROFILE_FORMAT = "squeeze-ops/sensitivity-profile"
GAINS_FORMAT = "squeeze-ops/layer-gains"
HEAD_GAINS_FORMAT = "squeeze-ops/head-gains"
PROFILE_VERSION = 1
# Budgets at which the Perturbation signal is measured: KNOTS + 1 evenly spaced fractions of the prompt.
KNOTS = 64


class Request(NamedTuple):
    """What an allocator sees of a batch of B sequences with L layers (all on one device).

    similarity:  fp32 [B, L] mean cos(x_in, x_mid) of each layer over the prompt.
    base:        fp32 [B] uniform budget per layer in tokens (b_init * prompt length, or given).
    prompt_lens: int [B] prompt tokens.
    capacity:    int [B] tokens one layer can hold (prompt + tokens still to generate).
    min_budget:  smallest workable budget of a layer (the policy's guard, e.g. sinks + 1).
    observed:    fp32 [B, L, Hkv, T_max] or None: per layer and KV head the attention mass each
                 prompt position received from the last W prompt queries (prefill_attention's
                 scores with score_window = W), 0 past a prompt's end; read by Coverage.
    policy:      the SequencePolicy the caches evict with, or None; read by Coverage.
    perturbation: fp32 [B, L, KNOTS + 1] or None: per layer the residual-stream perturbation
                 E(b) of evicting the prompt to b = perturbation_knots(prompt_lens)[j] slots
                 (planner.attention_perturbation); read by Perturbation.
    """

    similarity: torch.Tensor
    base: torch.Tensor
    prompt_lens: torch.Tensor
    capacity: torch.Tensor
    min_budget: int
    observed: Optional[torch.Tensor] = None
    policy: object = None
    perturbation: Optional[torch.Tensor] = None

    @property
    def num_layers(self):
        return self.similarity.shape[1]

    def total(self):
        """float64 [B, 1]: the uniform baseline's total L * floor(base)."""
        return self.base.double().floor()[:, None] * self.num_layers

    def bounds(self, low=None, high=None):
        """float64 [B, L] integer bounds of a layer's budget: at least min_budget (and
        floor(low)), at most its capacity (and floor(high)); lower bounds win where they cross.
        low, high: float64 broadcastable to [B, L]."""
        shape = self.similarity.shape
        lo = torch.full(shape, float(self.min_budget), dtype=torch.float64, device=self.similarity.device)
        hi = self.capacity.double()[:, None].expand(shape)
        if low is not None:
            lo = torch.maximum(lo, low.floor())
        if high is not None:
            hi = torch.minimum(hi, high.floor())
        return lo, torch.maximum(hi, lo)


def _on_device(values, dtype, device):
    """A constant table (nested tuples) as a tensor on `device`: a graph constant when traced,
    else uploaded once per device so that later plans read nothing from the host (a capturable
    region must then be warmed up first). Shared: never modified."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _uploaded(values, dtype, device)


@lru_cache(maxsize=256)
def _uploaded(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


def _groups(similarity, k):
    """kmeans1d labels and centroids with k capped at the number of layers."""
    return kmeans1d(similarity, min(k, similarity.shape[1]))


def water_fill(weights, total, lo, hi):
    """x[b, l] = clamp(lam_b * weights[b, l], lo[b, l], hi[b, l]) with sum_l x[b, l] = total[b].

    weights >= 0, float64 [B, L]; total float64 [B, 1]; lo <= hi float64 [B, L]. The sum is a
    non-decreasing piecewise-linear function of lam with breakpoints lo/w and hi/w; it is
    evaluated at every breakpoint and lam interpolated exactly on the segment holding the
    total. A total below sum(lo) gives lo, above sum(hi) gives hi. Layers of weight 0 stay at lo.
    Returns float64 [B, L].
    """
    positive = weights > 0
    safe = torch.where(positive, weights, torch.ones_like(weights))
    zero = torch.zeros_like(weights)
    breaks = torch.cat([zero[:, :1], torch.where(positive, lo / safe, zero), torch.where(positive, hi / safe, zero)], 1)
    breaks = breaks.sort(dim=1).values  # [B, 2L + 1]
    sums = (breaks[:, :, None] * weights[:, None, :]).clamp(lo[:, None, :], hi[:, None, :]).sum(-1)
    last = breaks.shape[1] - 1
    j = ((sums <= total).sum(1, keepdim=True) - 1).clamp(0, last)
    j_next = (j + 1).clamp_max(last)
    lam0, lam1 = breaks.gather(1, j), breaks.gather(1, j_next)
    s0, s1 = sums.gather(1, j), sums.gather(1, j_next)
    rising = s1 > s0
    step = torch.where(rising, (total - s0) / torch.where(rising, s1 - s0, torch.ones_like(s0)), torch.zeros_like(s0))
    lam = lam0 + step.clamp(0, 1) * (lam1 - lam0)
    return (lam * weights).clamp(lo, hi)


def round_to_total(x, total, hi):
    """Integer budgets from real ones (float64 [B, L]) with the same total: floor every layer,
    then give one more token to the layers with the largest fractional parts (ties: lower
    layer first) until the total (float64 [B, 1], integer-valued) is reached, never above hi.
    Returns int32 [B, L]."""
    floors = x.floor()
    missing = total - floors.sum(1, keepdim=True)
    room = floors < hi
    fraction = torch.where(room, x - floors, torch.full_like(x, -1.0))
    order = fraction.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)
    return (floors + ((rank < missing) & room).to(floors.dtype)).to(torch.int32)


def _conserve(request, weights, lo, hi):
    """Budgets proportional to weights within [lo, hi], summing to the uniform total."""
    total = request.total()
    return round_to_total(water_fill(weights, total, lo, hi), total, hi)


@dataclass(frozen=True)
class Squeeze:
    """SqueezeAttention (ALGORITHM.md section 4): 1-D K-Means of the similarity into k groups;
    the most similar group G is squeezed to p * base, the other layers share what it gives up.

    clamp=False: the authors' formula exactly (layer_budgets): floor(p * base) and
        floor(base * (L - p|G|) / (L - |G|)), no cap; budget above what a layer can hold is
        wasted. p = 1 is the uniform baseline.
    clamp=True: the same shares (p for G, (L - p|G|) / (L - |G|) for the others) scaled to the
        uniform total, each layer capped at what it can hold; the surplus of capped layers goes
        to the uncapped ones in proportion to their shares (water-filling).
    """

    p: float = 0.35
    k: int = 3
    clamp: bool = False

    def __post_init__(self):
        if not self.p > 0:
            raise ValueError(f"p: expected p > 0, got {self.p}")
        if self.k < 1:
            raise ValueError(f"k: expected k >= 1, got {self.k}")

    @property
    def uses_groups(self):
        return self.p != 1.0

    def allocate(self, request):
        if not self.clamp:
            return layer_budgets(request.similarity, request.base, self.p, self.k, request.min_budget, None)
        labels, centroids = kmeans1d(request.similarity, self.k)
        top = labels == self.k - 1
        n_top = top.sum(1, keepdim=True).double()
        L = request.num_layers
        whole = (n_top == 0) | (n_top == L)  # no group to squeeze: uniform
        other = (L - self.p * n_top) / (L - n_top).clamp_min(1)
        shares = torch.where(whole, 1.0, torch.where(top, self.p, other))
        return _conserve(request, shares, *request.bounds()), labels, centroids

    def describe(self):
        return f"squeeze p={self.p:g}" + (" clamped" if self.clamp else "") + ("" if self.k == 3 else f" k={self.k}")


@dataclass(frozen=True)
class Uniform:
    """The baseline: every layer keeps floor(base) tokens (at least min_budget)."""

    uses_groups = False

    def allocate(self, request):
        budgets = request.base.floor()[:, None].expand(request.similarity.shape)
        labels, centroids = _groups(request.similarity, REPORTED_GROUPS)
        return budgets.clamp_min(request.min_budget).to(torch.int32), labels, centroids

    def describe(self):
        return "uniform"


def _check_spread(gamma, floor, cap):
    """The parameters shared by Continuous and Coverage."""
    if not gamma >= 0:
        raise ValueError(f"gamma: expected gamma >= 0, got {gamma}")
    _check_bounds(floor, cap)


def _check_bounds(floor, cap):
    """Floor and cap of a layer's budget as multiples of the base."""
    if not 0 <= floor <= 1:
        raise ValueError(f"floor: expected a fraction of the base in [0, 1], got {floor}")
    if not cap >= 1:
        raise ValueError(f"cap: expected a multiple of the base >= 1, got {cap}")


@dataclass(frozen=True)
class Continuous:
    """Budget proportional to (1 - similarity_l)^gamma: the less attention changed a layer's
    residual stream, the fewer tokens it keeps; gamma = 0 is uniform, larger gamma follows
    the similarity more sharply. Every layer keeps at least floor(floor * base) and at most
    floor(cap * base) tokens (and what it can hold); what the bounds cut is redistributed over
    the others (water-filling), so the total is the uniform one.
    """

    gamma: float = 1.0
    floor: float = 0.25
    cap: float = 4.0

    uses_groups = False

    def __post_init__(self):
        _check_spread(self.gamma, self.floor, self.cap)

    def allocate(self, request):
        # (1 - s) is clamped away from 0 so that a layer of similarity 1 still gets its floor
        # and a profile of equal similarities is exactly uniform.
        weights = (1.0 - request.similarity.double()).clamp_min(1e-6).pow(self.gamma)
        base = request.base.double()[:, None]
        lo, hi = request.bounds(low=self.floor * base, high=self.cap * base)
        labels, centroids = _groups(request.similarity, REPORTED_GROUPS)
        return _conserve(request, weights, lo, hi), labels, centroids

    def describe(self):
        return f"continuous gamma={self.gamma:g} floor={self.floor:g} cap={self.cap:g}"


@dataclass(frozen=True)
class Pyramid:
    """PyramidKV-style fixed schedule: budgets fall linearly from the first layer to the last,
    the first holding `ratio` times the last (ratio = 1: uniform); the signal is not read.
    Capped at what a layer can hold, the surplus redistributed, the total the uniform one."""

    ratio: float = 2.0

    uses_groups = False

    def __post_init__(self):
        if not self.ratio >= 1:
            raise ValueError(f"ratio: expected ratio >= 1, got {self.ratio}")

    def allocate(self, request):
        B, L = request.similarity.shape
        depth = torch.linspace(0, 1, L, dtype=torch.float64, device=request.similarity.device)
        weights = (self.ratio + (1 - self.ratio) * depth).expand(B, L)
        labels, centroids = _groups(request.similarity, REPORTED_GROUPS)
        return _conserve(request, weights, *request.bounds()), labels, centroids

    def describe(self):
        return f"pyramid ratio={self.ratio:g}"


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


def _bisect(budgets, total, a, b, steps):
    """For budgets(x) [B, L] whose sum falls as x [B, 1] grows: a fixed number of bisection
    steps (no host synchronisation) narrowing [a, b] to sum(budgets(b)) <= total < sum(budgets(a))
    (where the range allows). Returns (a, b)."""
    for _ in range(steps):
        mid = (a + b) / 2
        fits = budgets(mid).sum(1, keepdim=True) <= total
        a, b = torch.where(fits, a, mid), torch.where(fits, mid, b)
    return a, b


class _Observing:
    """Allocators whose signal comes from the last `window` prompt queries."""

    def _check_window(self):
        if self.window < 1:
            raise ValueError(f"window: expected >= 1 observed queries, got {self.window}")

    @property
    def observation_window(self):
        return self.window


@dataclass(frozen=True)
class Coverage(_Observing):
    """Per request, from the prefill's observed attention: every layer keeps the same share of
    its weighted attention mass (minimax), with weights w_l = (1 - similarity_l)^gamma.

    C_l(b) = share of layer l's attention mass, as the last `window` prompt queries spread it,
    that the policy keeps with b slots (retained_mass). The budgets solve
        min_alpha  such that  b_l = smallest b with w_l (1 - C_l(b)) <= alpha w_max,
        clamped to [floor * base, cap * base] (and what a layer can hold), sum_l b_l <= total,
    by bisection on alpha (a fixed number of steps: no host synchronisation), so a layer whose
    attention is spread wide, or whose residual stream attention changes most, gets more; the
    uniform total is then filled exactly. gamma = 0 equalises the kept share alone.
    Needs Request.observed (SqueezeKVCache.build reads it from a prefill with observe=window)
    and Request.policy.
    """

    gamma: float = 0.5
    floor: float = 0.75
    cap: float = 1.5
    window: int = 32

    uses_groups = False
    needs_observed = True
    STEPS = 40

    def __post_init__(self):
        _check_spread(self.gamma, self.floor, self.cap)
        self._check_window()

    def allocate(self, request):
        if request.observed is None or request.policy is None:
            raise ValueError("observed: Coverage needs the prefill's observed attention (prefill with "
                             f"observe={self.window}) and the policy")
        curves = retained_mass(request.observed, request.prompt_lens, request.policy)
        w = (1.0 - request.similarity.double()).clamp_min(1e-6).pow(self.gamma)
        w = w / w.max(dim=1, keepdim=True).values
        base = request.base.double()[:, None]
        lo, hi = request.bounds(low=self.floor * base, high=self.cap * base)
        total = request.total()

        def budgets(alpha):
            return _budget_for_share(curves, 1.0 - alpha / w).clamp(min=lo).minimum(hi)

        _, b = _bisect(budgets, total, torch.zeros_like(total), torch.ones_like(total), self.STEPS)
        x = budgets(b)
        x = water_fill(torch.ones_like(x), total, x, torch.maximum(hi, x))
        labels, centroids = _groups(request.similarity, REPORTED_GROUPS)
        return round_to_total(x, total, hi), labels, centroids

    def describe(self):
        return f"coverage gamma={self.gamma:g} floor={self.floor:g} cap={self.cap:g}" + (
            "" if self.window == 32 else f" window={self.window}")


def perturbation_knots(prompt_lens, knots=KNOTS):
    """float64 [B, knots + 1]: the budgets floor(j * T / knots), j = 0..knots, at which the
    Perturbation signal is measured (0 and T included; repeated when T < knots)."""
    j = torch.arange(knots + 1, dtype=torch.float64, device=prompt_lens.device)
    return (prompt_lens.double()[:, None] * j / knots).floor()


def _interpolate(curves, knots, at):
    """curves float64 [B, L, n] given at the non-decreasing knots [B, n], read at `at` [B, L, m]
    (within [knots[0], knots[-1]]) by linear interpolation. Returns float64 [B, L, m]."""
    B, L, n = curves.shape
    knots = knots[:, None, :].expand(B, L, n).contiguous()
    j = (torch.searchsorted(knots, at.contiguous(), right=True) - 1).clamp(0, n - 2)
    x0, x1 = knots.gather(-1, j), knots.gather(-1, j + 1)
    y0, y1 = curves.gather(-1, j), curves.gather(-1, j + 1)
    wide = x1 > x0
    step = torch.where(wide, (at - x0) / torch.where(wide, x1 - x0, torch.ones_like(x0)), torch.zeros_like(x0))
    return y0 + step.clamp(0, 1) * (y1 - y0)


class _JsonFile:
    """save / load of a calibration result through its to_json / from_json."""

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_json(json.load(f))


def _check_format(data, fmt):
    if data.get("format") != fmt or data.get("version") != PROFILE_VERSION:
        raise ValueError(f"profile: expected format {fmt!r} version {PROFILE_VERSION}, got "
                         f"{data.get('format')!r} version {data.get('version')}")


@dataclass(frozen=True)
class LayerGains(_JsonFile):
    """How much one model's loss moves per unit of a layer's residual perturbation.

    values[l] > 0: nats/token of loss per unit of E_l (Perturbation's signal) under `policy`,
    normalised to mean 1 over the layers (only their ratios matter to an allocation). Fitted
    once per model and policy on calibration text (squeeze_ops.calibration.fit_gains); keep the
    file next to the model's settings and load it at run time.
    """

    model: str
    num_layers: int
    policy: str
    values: tuple
    source: str = ""

    def __post_init__(self):
        if len(self.values) != self.num_layers or not all(v > 0 for v in self.values):
            raise ValueError(f"values: expected {self.num_layers} positive layer gains, got {self.values}")

    def to_json(self):
        return {"format": GAINS_FORMAT, "version": PROFILE_VERSION, "model": self.model,
                "num_layers": self.num_layers, "policy": self.policy, "values": list(self.values),
                "source": self.source}

    @classmethod
    def from_json(cls, data):
        _check_format(data, GAINS_FORMAT)
        return cls(data["model"], int(data["num_layers"]), data["policy"], tuple(float(v) for v in data["values"]),
                   data.get("source", ""))


@dataclass(frozen=True)
class Perturbation(_Observing):
    """Per request, from the prefill: the budgets that minimise the summed perturbation of
    the residual stream that eviction causes, to a power.

    E_l(b) = mean over the last `window` prompt queries of |Wo (o - o(b))|^2 / |x|^2: how far
    restricting layer l's attention to the b slots the policy keeps moves the residual stream
    (planner.attention_perturbation). With `gains` (LayerGains: g_l, the loss per unit of E_l
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
    Needs Request.perturbation (SqueezeKVCache.build reads it from a prefill with
    observe=window and the policy in `perturb`).
    """

    power: float = 2.0
    floor: float = 0.25
    cap: float = 4.0
    window: int = 32
    gains: Optional[LayerGains] = None

    uses_groups = False
    needs_perturbation = True
    STEPS = 64
    LOG_PRICE = (-30.0, 10.0)  # bisection range of log(lam)

    def __post_init__(self):
        if not self.power > 0:
            raise ValueError(f"power: expected > 0, got {self.power}")
        _check_bounds(self.floor, self.cap)
        self._check_window()
        if self.gains is not None and not isinstance(self.gains, LayerGains):
            raise ValueError(f"gains: expected LayerGains or None, got {type(self.gains).__name__}")

    def allocate(self, request):
        if request.perturbation is None:
            raise ValueError("perturbation: Perturbation needs the prefill's attention perturbation curves "
                             f"(prefill with observe={self.window} and the policy)")
        curves = request.perturbation.double()
        if self.gains is not None:
            if self.gains.num_layers != request.num_layers:
                raise ValueError(f"gains: expected the gains of {request.num_layers} layers, got "
                                 f"{self.gains.num_layers} ({self.gains.model})")
            curves = curves * _on_device(self.gains.values, torch.float64, curves.device)[None, :, None]
        knots = perturbation_knots(request.prompt_lens, curves.shape[-1] - 1)
        base = request.base.double()[:, None]
        lo, hi = request.bounds(low=self.floor * base, high=self.cap * base)
        # Candidate budgets: the knots, clamped into each layer's bounds (E = 0 past the prompt).
        budgets = torch.minimum(torch.maximum(knots[:, None, :], lo[..., None]), hi[..., None])
        cost = _interpolate(curves, knots,
                            budgets.minimum(knots[:, None, -1:])).clamp_min(0).pow(self.power)
        cost = cost / cost.amax(dim=(1, 2), keepdim=True).clamp_min(1e-300)  # scale-free prices
        total = request.total()

        def take(log_price):  # [B, 1] -> the budgets [B, L] bought at that price
            j = (cost + log_price.exp()[:, :, None] * budgets).argmin(-1, keepdim=True)
            return budgets.gather(-1, j)[..., 0]

        a, b = _bisect(take, total, torch.full_like(total, self.LOG_PRICE[0]),
                       torch.full_like(total, self.LOG_PRICE[1]), self.STEPS)
        under, over = take(b), take(a)
        gap = over.sum(1, keepdim=True) - under.sum(1, keepdim=True)
        t = ((total - under.sum(1, keepdim=True)) / gap.clamp_min(1e-30)).clamp(0, 1)
        x = under + t * (over - under)
        x = water_fill(torch.ones_like(x), total, x, torch.maximum(hi, x))
        labels, centroids = _groups(request.similarity, REPORTED_GROUPS)
        return round_to_total(x, total, hi), labels, centroids

    def describe(self):
        return f"perturbation power={self.power:g} floor={self.floor:g} cap={self.cap:g}" + (
            "" if self.window == 32 else f" window={self.window}") + ("" if self.gains is None else " gained")


@dataclass(frozen=True)
class Fixed:
    """Explicit budgets in tokens, the same for every sequence (at least min_budget): a tuple
    of L per-layer budgets, or of L tuples of Hkv per-KV-head budgets (a per-head plan, see
    CalibratedHeads). The base budget is ignored: the total is the caller's. Used to measure
    sensitivity profiles and to replay a schedule."""

    budgets: tuple

    uses_groups = False

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
        row = _on_device(self.budgets, torch.int32, request.similarity.device)  # [L] or [L, Hkv]
        labels, centroids = _groups(request.similarity, REPORTED_GROUPS)
        budgets = row.clamp_min(request.min_budget).expand(request.similarity.shape[0], *row.shape)
        return budgets.contiguous(), labels, centroids

    def describe(self):
        return "fixed per head" if self.per_head else "fixed"


@dataclass(frozen=True)
class HeadGains(_JsonFile):
    """How much one model's loss falls when a single KV head keeps its whole context.

    values[l][h]: mean NLL decrease (nats/token) when only KV head h of layer l keeps its full
    cache while every other (layer, head) keeps `fraction` * prompt length tokens under
    `policy`, relative to all of them at the fraction (small negative values: noise). Measured
    once per model and policy on calibration text (squeeze_ops.calibration.measure_head_gains);
    keep the file next to the model's settings and load it at run time.
    """

    model: str
    num_layers: int
    num_kv_heads: int
    policy: str
    fraction: float
    values: tuple
    source: str = ""

    def __post_init__(self):
        if len(self.values) != self.num_layers or any(len(row) != self.num_kv_heads for row in self.values):
            raise ValueError(f"values: expected {self.num_layers} rows of {self.num_kv_heads} head gains")
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction: expected a fraction of the prompt in (0, 1), got {self.fraction}")

    def to_json(self):
        return {"format": HEAD_GAINS_FORMAT, "version": PROFILE_VERSION, "model": self.model,
                "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "policy": self.policy,
                "fraction": self.fraction, "values": [list(row) for row in self.values], "source": self.source}

    @classmethod
    def from_json(cls, data):
        _check_format(data, HEAD_GAINS_FORMAT)
        return cls(data["model"], int(data["num_layers"]), int(data["num_kv_heads"]), data["policy"],
                   float(data["fraction"]), tuple(tuple(float(v) for v in row) for row in data["values"]),
                   data.get("source", ""))


@dataclass(frozen=True)
class CalibratedHeads:
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
    remainder. Returns a per-head plan: budgets int32 [B, L, Hkv] (SqueezeKVCache then holds
    one row per sequence and KV head).
    """

    gains: object
    gamma: float = 1.0
    floor: float = 0.5
    cap: float = 3.0
    prior: float = 0.5

    uses_groups = False
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
        _check_spread(self.gamma, self.floor, self.cap)
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
        fractions = _on_device(tuple(g.fraction for g in profiles), torch.float64, device)
        values = _on_device(tuple(g.values for g in profiles), torch.float64, device)  # [K, L, Hkv]
        fraction = request.base.double()[:, None] / request.prompt_lens.double()[:, None].clamp_min(1)
        g = values[(fraction - fractions).abs().argmin(dim=1)].reshape(B, L * heads).clamp_min(0)
        mean = g.mean(1, keepdim=True)
        w = torch.where(mean > 0, (g + self.prior * mean).pow(self.gamma), torch.ones_like(g))
        base = request.base.double()[:, None]
        lo, hi = (t.repeat_interleave(heads, 1) for t in request.bounds(low=self.floor * base, high=self.cap * base))
        total = request.total() * heads
        x = round_to_total(water_fill(w, total, lo, hi), total, hi)
        labels, centroids = _groups(request.similarity, REPORTED_GROUPS)
        return x.view(B, L, heads), labels, centroids

    def describe(self):
        extra = "" if self.prior == 0.5 else f" prior={self.prior:g}"
        return f"calibrated heads gamma={self.gamma:g} floor={self.floor:g} cap={self.cap:g}{extra}"


@dataclass(frozen=True)
class SensitivityProfile(_JsonFile):
    """How much one model's loss rises when a single layer's cache is compressed.

    values[j][l]: mean NLL change (nats/token) when only layer l keeps budgets[j] * prompt
    length tokens (under `policy`) while every other layer keeps `context` * prompt length
    tokens, relative to every layer at `context`. context = 1: the other layers keep their full
    cache (the layer's loss in isolation); context < 1: the profile is measured around that
    operating point (in context: values above it are gains, below it losses), which sees how
    layers interact once all of them are compressed. budgets: increasing fractions of the
    prompt, all in (0, 1). Measured once per model, policy and context on calibration text
    (squeeze_ops.calibration.measure_profile); keep the file next to the model's settings and
    load it at run time.
    """

    model: str
    num_layers: int
    policy: str
    budgets: tuple
    values: tuple
    source: str = ""
    context: float = 1.0

    def __post_init__(self):
        if list(self.budgets) != sorted(set(self.budgets)) or not all(0 < f < 1 for f in self.budgets):
            raise ValueError(f"budgets: expected increasing fractions in (0, 1), got {self.budgets}")
        if len(self.values) != len(self.budgets) or any(len(row) != self.num_layers for row in self.values):
            raise ValueError(f"values: expected {len(self.budgets)} rows of {self.num_layers} layer values")
        if not 0 < self.context <= 1:
            raise ValueError(f"context: expected a fraction of the prompt in (0, 1], got {self.context}")

    def to_json(self):
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "model": self.model,
                "num_layers": self.num_layers, "policy": self.policy, "context": self.context,
                "budgets": list(self.budgets), "values": [list(row) for row in self.values], "source": self.source}

    @classmethod
    def from_json(cls, data):
        _check_format(data, PROFILE_FORMAT)
        return cls(data["model"], int(data["num_layers"]), data["policy"], tuple(float(f) for f in data["budgets"]),
                   tuple(tuple(float(v) for v in row) for row in data["values"]), data.get("source", ""),
                   float(data.get("context", 1.0)))

    def loss_curves(self):
        """Per layer, the loss at the knots budgets + (1,) as a non-negative, non-increasing
        list ending at 0 (host data). Past the largest measured budget the loss is taken flat:
        exactly 0 at the full prompt for context = 1, no further gain assumed otherwise."""
        curves = []
        for layer in range(self.num_layers):
            tail = 0.0 if self.context == 1 else self.values[-1][layer]
            loss = [max(row[layer] - tail, 0.0) for row in self.values] + [0.0]
            for j in range(len(loss) - 2, -1, -1):
                loss[j] = max(loss[j], loss[j + 1])
            curves.append(loss)
        return curves


@dataclass(frozen=True)
class Calibrated:
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

    uses_groups = False

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

    @property
    def profiles(self):
        """The profiles as a tuple sorted by context."""
        profiles = self.profile if isinstance(self.profile, tuple) else (self.profile,)
        return tuple(sorted(profiles, key=lambda p: p.context))

    @cached_property
    def _curves(self):
        """(contexts (K), knots (K x (m + 1) fractions ending at 1), gains (K x L x m: loss removed
        per unit fraction on each segment, non-increasing along the segments)) as tuples: host
        data, computed once."""
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
        contexts = _on_device(contexts, torch.float64, device)
        fraction = request.base.double()[:, None] / prompt.clamp_min(1)
        pick = (fraction - contexts).abs().argmin(dim=1)
        knots = _on_device(knots, torch.float64, device)[pick]  # [B, m + 1]
        gains = _on_device(gains, torch.float64, device)[pick]  # [B, L, m]
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
        labels, centroids = _groups(request.similarity, REPORTED_GROUPS)
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
