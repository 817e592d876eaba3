"""The allocator protocol and the arithmetic the allocators share.

An allocator spreads the KV budget of a request over its decoder layers (or, per KV head, over
its layers' heads). The planner (`squeeze_ops.engine.planner.allocate`) hands it a `Request`
and takes back `(budgets, labels, centroids)`:

    budgets    int32 [B, L] tokens each layer keeps (a per-head allocator: [B, L, Hkv])
    labels     int32 [B, L] a group per layer (0 = most important); reported, and judged by the
               diagnostics when the allocator acts on groups (`uses_groups`)
    centroids  fp32 [B, k] mean similarity of each group (NaN: empty group)

`Allocator` is the base class of the library's allocators and states the protocol. A user
allocator may subclass it or be any object with an `allocate(request)` method; the optional
needs below then keep their defaults. `needs_of` reads them once, when settings are made.

    observe             W > 0: reads Request.observed, the attention of the last W prompt
                        queries (the prefill records it with observe=W); 0: none
    needs_perturbation  reads Request.perturbation (the prefill records it for the policy)
    per_head            plans per KV head: budgets [B, L, Hkv]
    uses_groups         its labels are the groups it acted on
    cap                 the largest budget it gives a layer (or head), as a multiple of the
                        base; None when unbounded (up to what a layer can ever hold). The
                        engine stages each layer's prompt at that bound during prefill.

Everything an allocator does is tensor work on the request's device with shapes known on the
host: no host synchronisation, so a plan can sit in a captured CUDA graph or a
torch.compile(fullgraph=True) region.
"""
import numbers
from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from ...ops import kmeans1d

# Groups reported (labels, centroids) by the allocators that do not group layers themselves.
REPORTED_GROUPS = 3


class Request(NamedTuple):
    """What an allocator sees of a batch of B sequences with L layers (all on one device).

    similarity:  fp32 [B, L] mean cos(x_in, x_mid) of each layer over the prompt.
    base:        fp32 [B] uniform budget per layer in tokens (b_init * prompt length, or given).
    prompt_lens: int [B] prompt tokens.
    horizon:     int [B] tokens a layer can ever hold: prompt + tokens still to generate.
    min_budget:  smallest workable budget of a layer (the policy's guard, e.g. sinks + 1).
    observed:    fp32 [B, L, Hkv, T_max] or None: per layer and KV head the attention mass each
                 prompt position received from the last W prompt queries (prefill_attention's
                 scores with score_queries = W), 0 past a prompt's end.
    policy:      the SequencePolicy the caches evict with, or None.
    perturbation: fp32 [B, L, KNOTS + 1] or None: per layer the residual-stream perturbation
                 E(b) of evicting the prompt to b = perturbation_knots(prompt_lens)[j] slots
                 (signals.attention_perturbation).
    """

    similarity: torch.Tensor
    base: torch.Tensor
    prompt_lens: torch.Tensor
    horizon: torch.Tensor
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
        floor(low)), at most its horizon (and floor(high)); lower bounds win where they cross.
        low, high: float64 broadcastable to [B, L]."""
        shape = self.similarity.shape
        lo = torch.full(shape, float(self.min_budget), dtype=torch.float64, device=self.similarity.device)
        hi = self.horizon.double()[:, None].expand(shape)
        if low is not None:
            lo = torch.maximum(lo, low.floor())
        if high is not None:
            hi = torch.minimum(hi, high.floor())
        return lo, torch.maximum(hi, lo)


class Allocator:
    """Base class of the allocators (see the module docstring for the protocol)."""

    observe = 0
    needs_perturbation = False
    per_head = False
    uses_groups = False
    cap = None

    def allocate(self, request):
        """(budgets, labels, centroids) of the request; see the module docstring."""
        raise TypeError(f"{type(self).__name__}: an allocator defines allocate(request)")

    def describe(self):
        """A short name with the parameters, for tables and messages."""
        return type(self).__name__


class Needs(NamedTuple):
    """The optional needs of one allocator, read once (see the module docstring)."""

    observe: int
    perturbation: bool
    per_head: bool
    uses_groups: bool
    cap: Optional[float]


def needs_of(allocator):
    """The Needs of `allocator`, validated: an object without a callable allocate(), or with an
    optional need of the wrong type, raises TypeError / ValueError naming `allocator`."""
    if not callable(getattr(allocator, "allocate", None)):
        raise TypeError(f"allocator: expected an object with an allocate(request) method, got "
                        f"{type(allocator).__name__}")
    observe = getattr(allocator, "observe", 0)
    cap = getattr(allocator, "cap", None)
    flags = {name: getattr(allocator, name, False) for name in ("needs_perturbation", "per_head", "uses_groups")}
    if not isinstance(observe, int) or isinstance(observe, bool) or observe < 0:
        raise ValueError(f"allocator: observe must be an int >= 0 (prompt queries observed), got {observe!r}")
    if cap is not None and not (isinstance(cap, (int, float)) and cap >= 1):
        raise ValueError(f"allocator: cap must be None or a multiple of the base >= 1, got {cap!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"allocator: {name} must be a bool, got {value!r}")
    return Needs(observe, flags["needs_perturbation"], flags["per_head"], flags["uses_groups"],
                 None if cap is None else float(cap))


def describe(allocator):
    """allocator.describe(), or its type name for a user allocator without one."""
    text = getattr(allocator, "describe", None)
    return text() if callable(text) else type(allocator).__name__


def on_device(values, dtype, device):
    """A constant table (nested tuples) as a tensor on `device`: a graph constant when traced,
    else uploaded once per device so that later plans read nothing from the host (a capturable
    region must then be warmed up first). Shared: never modified."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _uploaded(values, dtype, device)


@lru_cache(maxsize=256)
def _uploaded(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


def reported_groups(similarity, k=REPORTED_GROUPS):
    """kmeans1d labels and centroids of the similarity, k capped at the number of layers."""
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


def conserve(request, weights, lo, hi):
    """Budgets proportional to weights within [lo, hi], summing to the uniform total."""
    total = request.total()
    return round_to_total(water_fill(weights, total, lo, hi), total, hi)


def bisect(budgets, total, a, b, steps):
    """For budgets(x) [B, L] whose sum falls as x [B, 1] grows: a fixed number of bisection
    steps (no host synchronisation) narrowing [a, b] to sum(budgets(b)) <= total < sum(budgets(a))
    (where the range allows). Returns (a, b)."""
    for _ in range(steps):
        mid = (a + b) / 2
        fits = budgets(mid).sum(1, keepdim=True) <= total
        a, b = torch.where(fits, a, mid), torch.where(fits, mid, b)
    return a, b


def check_number(value, name, integral=False):
    """A setting's type: a real number (an int with integral; a bool is neither), else a TypeError
    naming it (rather than one from the first comparison that meets it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integral else numbers.Real):
        raise TypeError(f"{name}: expected {'an int' if integral else 'a number'}, got {type(value).__name__} "
                        f"{value!r}")


def check_spread(gamma, floor, cap):
    """The parameters of the allocators that weigh layers by a power of a signal."""
    check_number(gamma, "gamma")
    if not gamma >= 0:
        raise ValueError(f"gamma: expected gamma >= 0, got {gamma}")
    check_bounds(floor, cap)


def check_bounds(floor, cap):
    """Floor and cap of a layer's budget as multiples of the base."""
    check_number(floor, "floor")
    check_number(cap, "cap")
    if not 0 <= floor <= 1:
        raise ValueError(f"floor: expected a fraction of the base in [0, 1], got {floor}")
    if not cap >= 1:
        raise ValueError(f"cap: expected a multiple of the base >= 1, got {cap}")
