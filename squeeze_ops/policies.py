"""Plain-data settings of the two compression dimensions.

- `SequencePolicy`: which tokens a layer keeps once it holds more than its budget (sliding
  window, StreamingLLM sinks + window, H2O heavy hitters + recent), and how H2O scores are
  gathered at prefill (every prompt query, or an observation window of the last W queries).
- `SqueezeSettings`: how the total budget is spread over the layers (SqueezeAttention):
  a uniform base budget `b_init * T` (or `base_tokens` given directly), the squeeze factor
  `p` applied to the least important of `k` layer groups, and an optional clamp; or any
  allocator of squeeze_ops.allocators in place of that formula.
  `p = 1` is the uniform baseline. `None` in place of settings means the full cache.
"""
from dataclasses import dataclass

from .allocators import Fixed, Squeeze, Uniform

POLICY_KINDS = ("window", "streaming", "h2o")


@dataclass(frozen=True)
class SequencePolicy:
    """Token-eviction rule of every layer cache (see README "Shared semantics").

    kind:         "window" (newest tokens), "streaming" (first `sinks` + newest) or "h2o"
                  (`sinks` + the newest floor(budget * recent_ratio) + highest scores).
    sinks:        tokens with position < sinks are never evicted (streaming, h2o).
    recent_ratio: h2o only: share of the budget protected as the newest tokens.
    score_window: h2o only: 0 scores every key by the attention mass of all later prompt
                  queries (H2O); W > 0 uses only the last W prompt queries (SnapKV-style).
    """

    kind: str = "window"
    sinks: int = 0
    recent_ratio: float = 0.5
    score_window: int = 0

    def __post_init__(self):
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"kind: expected one of {POLICY_KINDS}, got {self.kind!r}")
        if self.sinks < 0:
            raise ValueError(f"sinks: expected >= 0, got {self.sinks}")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio: expected a value in [0, 1], got {self.recent_ratio}")
        if self.score_window < 0:
            raise ValueError(f"score_window: expected >= 0, got {self.score_window}")

    @classmethod
    def window(cls):
        return cls("window")

    @classmethod
    def streaming(cls, sinks=4):
        return cls("streaming", sinks=sinks)

    @classmethod
    def h2o(cls, sinks=0, recent_ratio=0.5, score_window=0):
        return cls("h2o", sinks=sinks, recent_ratio=recent_ratio, score_window=score_window)

    @property
    def needs_scores(self):
        """H2O is the only policy that reads attention scores."""
        return self.kind == "h2o"

    @property
    def min_budget(self):
        """Smallest per-layer budget the policy works with (ALGORITHM.md section 4):
        a window needs one token, StreamingLLM its sinks plus one, H2O one heavy + one recent."""
        return {"window": 1, "streaming": self.sinks + 1, "h2o": max(2, self.sinks + 1)}[self.kind]

    def describe(self):
        if self.kind == "window":
            return "window"
        if self.kind == "streaming":
            return f"streaming({self.sinks} sinks)"
        scoring = f", last {self.score_window} queries" if self.score_window else ""
        return f"h2o(recent {self.recent_ratio:g}, {self.sinks} sinks{scoring})"


@dataclass(frozen=True)
class SqueezeSettings:
    """Per-layer budget allocation of one sequence (ALGORITHM.md section 4).

    b_init:      uniform budget as a fraction of the prompt length T (BASE = T), or
    base_tokens: the uniform budget in tokens (b_init * BASE given directly).
    p:           budget factor of the least important layer group; the other layers share
                 what it gives up, so the total L * base is conserved. p = 1: uniform.
    k:           number of layer groups found by 1-D K-Means on the similarity profile.
    clamp:       cap every layer's budget at T + the tokens still to generate (a layer
                 cannot hold more); the authors' code does not clamp (default off).
    allocator:   an allocator of squeeze_ops.allocators (Squeeze(clamp=True), Continuous,
                 Pyramid, Calibrated, ...) in place of the formula; p and k then stay at
                 their defaults (they belong to the allocator). None: Squeeze(p, k).
    """

    b_init: float | None = None
    base_tokens: int | None = None
    p: float = 1.0
    k: int = 3
    clamp: bool = False
    allocator: object = None

    def __post_init__(self):
        if (self.b_init is None) == (self.base_tokens is None):
            raise ValueError("SqueezeSettings: give exactly one of b_init and base_tokens")
        if self.b_init is not None and not self.b_init > 0:
            raise ValueError(f"b_init: expected > 0, got {self.b_init}")
        if self.base_tokens is not None and self.base_tokens < 1:
            raise ValueError(f"base_tokens: expected >= 1, got {self.base_tokens}")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p: expected a value in (0, 1], got {self.p}")
        if self.k < 1:
            raise ValueError(f"k: expected >= 1, got {self.k}")
        if self.allocator is not None and (self.p != 1.0 or self.k != 3):
            raise ValueError("allocator: give p and k to the allocator, not to SqueezeSettings")

    @classmethod
    def uniform(cls, b_init=None, base_tokens=None, clamp=False):
        """The baseline: every layer gets the same budget (p = 1)."""
        return cls(b_init=b_init, base_tokens=base_tokens, p=1.0, clamp=clamp)

    @classmethod
    def fixed(cls, budgets):
        """Explicit budgets in tokens, L per-layer ones or L rows of Hkv per-head ones
        (allocators.Fixed; the base budget, which Fixed ignores, is set to 1): for measuring
        sensitivities and replaying a schedule."""
        rows = [b.tolist() if hasattr(b, "tolist") else b for b in budgets]
        return cls(base_tokens=1, allocator=Fixed(tuple(
            tuple(int(x) for x in b) if isinstance(b, (list, tuple)) else int(b) for b in rows)))

    @property
    def strategy(self):
        """The allocator the planner runs for these settings."""
        return Squeeze(self.p, self.k) if self.allocator is None else self.allocator

    @property
    def is_uniform(self):
        return self.strategy in (Squeeze(1.0, self.k), Uniform())

    def describe(self):
        base = f"b_init {self.b_init:g}" if self.b_init is not None else f"{self.base_tokens} tokens"
        if self.allocator is not None:
            return f"{self.allocator.describe()}, {base}"
        return f"uniform, {base}" if self.is_uniform else f"squeeze p {self.p:g} k {self.k}, {base}"
