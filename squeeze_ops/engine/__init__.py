"""The engine layer built on the ops: sequence policies and squeeze settings (policies), the
allocators that spread a request's budget over its layers (allocators), the planner, the
prefill signals some allocators read (signals), the KV cache (cache), per-model calibration
(calibration) and the recommended settings of the measured model (presets)."""
from .allocators import (Allocator, CalibratedHeads, Coverage, Fixed, HeadGains, LayerGains,  # noqa: F401
                         Perturbation, SimilarityWeighted, Squeeze, Uniform)
from .cache import MemoryReport, PrefillRecord, SqueezeKVCache  # noqa: F401
from .planner import BudgetPlan, Diagnostics, allocate, diagnose, plan_budgets  # noqa: F401
from .policies import PrefillNeeds, SequencePolicy, SqueezeSettings, prefill_needs  # noqa: F401
from .presets import recommended, recommended_allocator  # noqa: F401
