"""squeeze-ops: fused kernels for layer-wise KV-cache budgets (SqueezeAttention) and the
sequence policies it composes with (sliding window, StreamingLLM, H2O).

`import squeeze_ops` loads the op library and registers every op as `torch.ops.squeeze.*`;
`squeeze_ops.ops` holds the typed public wrappers, `squeeze_ops.reference` the plain-PyTorch
specification of each op, `squeeze_ops.engine` the cache, planner and allocators built on
them, `squeeze_ops.models` the Llama runner and the transformers integration
(`squeeze_ops.SqueezeCache`, imported on first use: transformers is optional).
"""
from . import _library  # noqa: F401  (registers torch.ops.squeeze.*)
from . import ops, reference  # noqa: F401
from .engine import (BudgetPlan, MemoryReport, PrefillNeeds, PrefillRecord, SequencePolicy,  # noqa: F401
                     SqueezeKVCache, SqueezeSettings, allocate, diagnose, plan_budgets, prefill_needs)
from .ops import *  # noqa: F401,F403

__version__ = "0.1.0"  # as in pyproject.toml


def __getattr__(name):
    # The transformers integration is optional: imported (with transformers) on first use.
    if name == "SqueezeCache":
        from .models.hf import SqueezeCache
        return SqueezeCache
    raise AttributeError(f"module 'squeeze_ops' has no attribute {name!r}")
