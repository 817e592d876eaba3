"""Plain-data settings of the two compression dimensions, and what a prefill must record for them.

- `SequencePolicy`: which tokens a layer keeps once it holds more than its budget (sliding
  window, StreamingLLM sinks + window, H2O heavy hitters + recent), and which prompt queries
  H2O's scores sum over (all of them, or the last W: SnapKV-style).
- `SqueezeSettings`: how a request's total budget is spread over its layers: a base budget
  per layer (`b_init` times the prompt length, or `base_tokens`) and an allocator
  (SqueezeAttention's formula `Squeeze(p, k)` by default; `uniform()` is the baseline).
  `None` in place of settings means the full cache.
- `PrefillNeeds`: the signals a prefill records for a policy and its settings
  (`prefill_needs(policy, settings)`); the cache refuses a record that lacks them.
"""
import math
from dataclasses import dataclass, field
from typing import NamedTuple

from ..vocabulary import DEFAULT_RECENT_RATIO, DEFAULT_SINKS, POLICIES, POOL_MODES
from .allocators import Fixed, Squeeze, Uniform, needs_of
from .allocators.base import check_number
from .allocators.base import describe as describe_allocator

# prefill_attention's score_queries for "no scores".
NO_SCORES = -1


@dataclass(frozen=True)
class SequencePolicy:
    """Token-eviction rule of every layer cache (docs/METHOD.md#sequence-policies).

    kind:          "window" (newest tokens), "streaming" (first `sinks` + newest) or "h2o"
                   (`sinks` + the newest floor(budget * recent_ratio) + highest scores).
    sinks:         tokens with position < sinks are never evicted (streaming, h2o); default
                   per kind (vocabulary.DEFAULT_SINKS: 4 for streaming).
    recent_ratio:  h2o only: share of the budget protected as the newest tokens.
    score_queries: h2o only: 0 scores every key by the attention mass of all later prompt
                   queries (H2O); W > 0 by the last W prompt queries only (SnapKV-style).
    pool_size, pool_mode: h2o only: the prompt is compressed by its scores pooled over
                   pool_size neighbouring positions, their max ("max") or mean ("avg")
                   (SnapKV's pooling; 1: the scores themselves).
    """

    kind: str
    sinks: int = None
    recent_ratio: float = DEFAULT_RECENT_RATIO
    score_queries: int = 0
    pool_size: int = 1
    pool_mode: str = "max"

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"kind: expected one of {POLICIES}, got {self.kind!r}")
        if self.sinks is None:
            object.__setattr__(self, "sinks", DEFAULT_SINKS[self.kind])
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks: expected an int >= 0, got {self.sinks!r}")
        check_number(self.recent_ratio, "recent_ratio")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio: expected a value in [0, 1], got {self.recent_ratio}")
        if not isinstance(self.score_queries, int) or self.score_queries < 0:
            raise ValueError(f"score_queries: expected an int >= 0, got {self.score_queries!r}")
        if not isinstance(self.pool_size, int) or self.pool_size < 1 or self.pool_size % 2 == 0:
            raise ValueError(f"pool_size: expected an odd int >= 1, got {self.pool_size!r}")
        if self.pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode: expected one of {POOL_MODES}, got {self.pool_mode!r}")

    @classmethod
    def window(cls):
        return cls("window")

    @classmethod
    def streaming(cls, sinks=DEFAULT_SINKS["streaming"]):
        return cls("streaming", sinks=sinks)

    @classmethod
    def h2o(cls, sinks=DEFAULT_SINKS["h2o"], recent_ratio=DEFAULT_RECENT_RATIO, score_queries=0, pool_size=1,
            pool_mode="max"):
        return cls("h2o", sinks=sinks, recent_ratio=recent_ratio, score_queries=score_queries, pool_size=pool_size,
                   pool_mode=pool_mode)

    @property
    def needs_scores(self):
        """H2O is the only policy that reads attention scores."""
        return self.kind == "h2o"

    @property
    def min_budget(self):
        """Smallest per-layer budget the policy works with (docs/METHOD.md#budgets): a window needs one
        token, StreamingLLM its sinks plus one, H2O one heavy + one recent."""
        return {"window": 1, "streaming": self.sinks + 1, "h2o": max(2, self.sinks + 1)}[self.kind]

    def describe(self):
        if self.kind == "window":
            return "window"
        if self.kind == "streaming":
            return f"streaming({self.sinks} sinks)"
        scoring = f", last {self.score_queries} queries" if self.score_queries else ""
        pooling = f", {self.pool_mode}-pooled over {self.pool_size}" if self.pool_size > 1 else ""
        return f"h2o(recent {self.recent_ratio:g}, {self.sinks} sinks{scoring}{pooling})"


@dataclass(frozen=True)
class SqueezeSettings:
    """How one request's KV budget is spread over its layers (docs/METHOD.md#budgets).

    b_init:      the base budget per layer as a fraction of the prompt length T (BASE = T), or
    base_tokens: the base budget per layer in tokens (b_init * BASE given directly).
    allocator:   how the total (L times the base) is spread: any allocator of
                 squeeze_ops.engine.allocators or an object following its protocol
                 (checked here); default Squeeze() (the authors' formula, vocabulary.DEFAULT_P).
    """

    b_init: float = None
    base_tokens: int = None
    allocator: object = field(default_factory=Squeeze)

    def __post_init__(self):
        if (self.b_init is None) == (self.base_tokens is None):
            raise ValueError("SqueezeSettings: give exactly one of b_init and base_tokens")
        if self.b_init is not None:
            check_number(self.b_init, "b_init")
            if not (math.isfinite(self.b_init) and self.b_init > 0):
                raise ValueError(f"b_init: expected a finite fraction > 0, got {self.b_init}")
        if self.base_tokens is not None:
            check_number(self.base_tokens, "base_tokens")
            if not (math.isfinite(self.base_tokens) and self.base_tokens >= 1):
                raise ValueError(f"base_tokens: expected a finite number of tokens >= 1, got {self.base_tokens}")
        needs_of(self.allocator)  # a clear error now rather than inside the cache's build

    @classmethod
    def uniform(cls, b_init=None, base_tokens=None):
        """The baseline: every layer gets the same budget."""
        return cls(b_init=b_init, base_tokens=base_tokens, allocator=Uniform())

    @classmethod
    def squeeze(cls, b_init=None, base_tokens=None, p=None, k=None):
        """SqueezeAttention's formula with the given p and k (defaults: vocabulary)."""
        args = {name: value for name, value in (("p", p), ("k", k)) if value is not None}
        return cls(b_init=b_init, base_tokens=base_tokens, allocator=Squeeze(**args))

    @classmethod
    def fixed(cls, budgets):
        """Explicit budgets in tokens, L per-layer ones or L rows of Hkv per-head ones
        (allocators.Fixed; the base budget, which Fixed ignores, is set to 1): for measuring
        sensitivities and replaying a schedule."""
        rows = [b.tolist() if hasattr(b, "tolist") else b for b in budgets]
        return cls(base_tokens=1, allocator=Fixed(tuple(
            tuple(int(x) for x in b) if isinstance(b, (list, tuple)) else int(b) for b in rows)))

    @property
    def needs(self):
        """The allocator's Needs (allocators.base)."""
        return needs_of(self.allocator)

    @property
    def is_uniform(self):
        return isinstance(self.allocator, Uniform) or (isinstance(self.allocator, Squeeze) and self.allocator.p == 1.0)

    def prefill_needs(self, policy):
        """What a prefill must record for this allocator under `policy` (see PrefillNeeds)."""
        return prefill_needs(policy, self)

    def describe(self):
        base = f"b_init {self.b_init:g}" if self.b_init is not None else f"{self.base_tokens} tokens"
        return f"{describe_allocator(self.allocator)}, {base}"


class PrefillNeeds(NamedTuple):
    """The signals a prefill records (LlamaRunner.prefill, the transformers integration).

    score_queries: prefill_attention's column scores the policy compresses by: -1 none
                   (window, streaming), 0 all later prompt queries (H2O), W the last W
                   (SnapKV-style).
    observe:       W > 0: also the column scores of the last W prompt queries (allocators with
                   observe = W); 0: none.
    perturb:       the policies whose attention perturbation over the last `observe` queries
                   is recorded (the Perturbation allocator's signal).
    """

    score_queries: int = NO_SCORES
    observe: int = 0
    perturb: tuple = ()

    def union(self, other):
        """Needs that serve both (one prefill for several policies and settings)."""
        if NO_SCORES not in (self.score_queries, other.score_queries) and self.score_queries != other.score_queries:
            raise ValueError(f"score_queries: one prefill cannot score by both {self.score_queries} and "
                             f"{other.score_queries} queries")
        if 0 not in (self.observe, other.observe) and self.observe != other.observe:
            raise ValueError(f"observe: one prefill cannot observe both {self.observe} and {other.observe} queries")
        return PrefillNeeds(max(self.score_queries, other.score_queries), max(self.observe, other.observe),
                            tuple(dict.fromkeys(self.perturb + other.perturb)))

    def check(self):
        """Raise a ValueError naming the field when these needs cannot be recorded; returns self."""
        if self.score_queries < NO_SCORES or self.observe < 0:
            raise ValueError(f"needs: expected score_queries >= -1 and observe >= 0, got {self}")
        if self.perturb and not self.observe:
            raise ValueError("perturb: the perturbation is measured over the last `observe` prompt queries; "
                             "observe must be > 0")
        for policy in self.perturb:
            if not isinstance(policy, SequencePolicy):
                raise TypeError(f"perturb: expected SequencePolicies, got {type(policy).__name__}")
            if policy.needs_scores and self.score_queries != policy.score_queries:
                raise ValueError(f"perturb: {policy.describe()} keeps tokens by the prefill's scores; record them "
                                 f"(score_queries={policy.score_queries}, got {self.score_queries})")
        return self

    def covers(self, other):
        """Whether a prefill that recorded these needs serves `other`."""
        return ((other.score_queries == NO_SCORES or other.score_queries == self.score_queries)
                and (other.observe == 0 or other.observe == self.observe)
                and set(other.perturb) <= set(self.perturb))


def prefill_needs(policy, settings=None):
    """PrefillNeeds of a batch under `policy`: settings is one SqueezeSettings, None (the full
    cache) or a list of them; allocators observing different windows cannot share a prefill."""
    if not isinstance(policy, SequencePolicy):
        raise TypeError(f"policy: expected a SequencePolicy, got {type(policy).__name__}")
    needs = PrefillNeeds(policy.score_queries if policy.needs_scores else NO_SCORES)
    for setting in settings if isinstance(settings, (list, tuple)) else [settings]:
        if setting is None:
            continue
        if not isinstance(setting, SqueezeSettings):
            raise TypeError(f"settings: expected SqueezeSettings or None, got {type(setting).__name__}")
        allocator = setting.needs
        needs = needs.union(PrefillNeeds(NO_SCORES, allocator.observe, (policy,) if allocator.perturbation else ()))
    return needs.check()
