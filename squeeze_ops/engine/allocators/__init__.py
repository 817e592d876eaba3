"""Layer allocators: how the KV budget of one request is spread over its decoder layers (or,
per KV head, over its layers' heads). The protocol is in base.py.

    Squeeze(p, k)             SqueezeAttention's formula, faithful: the default
    Uniform()                 every layer floor(base): the baseline (= Squeeze(p=1))
    SimilarityWeighted(...)   budget proportional to (1 - similarity)^gamma, floor and cap
    Coverage(...)             every layer keeps the same share of its observed attention mass
    Perturbation(...)         the budgets that minimise the residual-stream perturbation of eviction
    CalibratedHeads(...)      per KV head, from a per-model head-gain profile
    Fixed(budgets)            explicit per-layer (or per-head) budgets in tokens

Totals: every allocator but Squeeze and Fixed gives each sequence exactly the uniform
baseline's total L * floor(base) (per head: Hkv * L * floor(base)), unless the policy's minimum
budget needs more (floors win) or the layers cannot hold that much (the horizon wins), so they
compare with Uniform at equal KV held. The faithful Squeeze keeps its own rounding
(L * base - L < total <= L * base) and may give a layer more than it can hold; Fixed ignores
the base.
"""
from .base import Allocator, Needs, Request, needs_of, round_to_total, water_fill  # noqa: F401
from .files import HeadGains, LayerGains, SensitivityProfile  # noqa: F401
from .heads import CalibratedHeads  # noqa: F401
from .layer import Fixed, SimilarityWeighted, Squeeze, Uniform  # noqa: F401
from .observing import Coverage, Perturbation, retained_mass  # noqa: F401
