"""Metadata of every op: argument checks that need no data (rank, shape, dtype, device,
layout) and the outputs' shapes. Each function is registered as the op's fake kernel and is
called first by the op's Triton launcher, so the Python paths validate exactly alike; the C++
kernels carry the same checks through csrc/checks.h."""
import torch


def check(cond, msg):
    """Raise a ValueError naming the argument when `cond` is false (also on fake tensors)."""
    if not cond:
        raise ValueError(msg)


def check_dtype(t, dtypes, name):
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    check(t.dtype in dtypes, f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")


def check_rank(t, rank, name):
    check(t.dim() == rank, f"{name}: expected a {rank}-d tensor, got shape {tuple(t.shape)}")


def check_device(t, ref, name, ref_name):
    check(t.device == ref.device, f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def check_policy(policy):
    check(policy in POLICIES, f"policy: expected one of {POLICIES}, got {policy!r}")


POLICIES = ("window", "streaming", "h2o")
FLOAT_KV = (torch.float16, torch.bfloat16, torch.float32)

# ---- layer dimension ----

# ---- prefill ----

# ---- decode ----

FAKE_KERNELS = {
    # ---- layer dimension ----
    # ---- prefill ----
    # ---- decode ----
}
