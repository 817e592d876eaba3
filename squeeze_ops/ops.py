"""Public, typed wrappers of torch.ops.squeeze.*: the math, shapes, dtypes and what each op
mutates. Validation happens in the op itself (C++ checks or the Triton launcher's metadata
check), so calling torch.ops.squeeze.* directly is just as safe."""
import torch

__all__ = [
    # ---- layer dimension ----
    # ---- prefill ----
    # ---- decode ----
]

# ---- layer dimension ----

# ---- prefill ----

# ---- decode ----
