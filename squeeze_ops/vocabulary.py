"""The words and defaults the whole library shares, defined once (C++: csrc/checks.h).

POLICIES          the sequence policies by name; a policy's code is its index (0 window,
                  1 streaming, 2 h2o), as csrc/checks.h numbers them
DEFAULT_POLICY    the policy of the op wrappers when none is named
DEFAULT_SINKS     protected first tokens per policy (StreamingLLM's 4 attention sinks)
DEFAULT_RECENT_RATIO  H2O's share of the budget kept for the newest tokens (heavy = recent)
DEFAULT_P, DEFAULT_K  SqueezeAttention's squeeze factor (the paper's 0.3-0.4) and groups
POOL_MODES        how compress_kv_ pools the selection scores over neighbouring positions
"""

POLICIES = ("window", "streaming", "h2o")
POLICY_CODES = {name: code for code, name in enumerate(POLICIES)}
DEFAULT_POLICY = "h2o"
DEFAULT_SINKS = {"window": 0, "streaming": 4, "h2o": 0}
DEFAULT_RECENT_RATIO = 0.5
DEFAULT_P = 0.35
DEFAULT_K = 3
POOL_MODES = ("max", "avg")
