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
import math  # noqa: E402

KMEANS_MAX_N = 256  # the CUDA kernel keeps a row in shared memory


def _check_row_major(t, name):
    check(t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1,
          f"{name}: last dimension must be contiguous, got strides {tuple(t.stride())}")


def _check_epilogue(residual, attn_out, cu_seqlens, cos_sum):
    check_dtype(residual, FLOAT_KV, "residual")
    check_rank(residual, 2, "residual")
    _check_row_major(residual, "residual")
    check_dtype(attn_out, residual.dtype, "attn_out")
    check(attn_out.shape == residual.shape,
          f"attn_out: expected shape {tuple(residual.shape)} (that of residual), got {tuple(attn_out.shape)}")
    _check_row_major(attn_out, "attn_out")
    check_device(attn_out, residual, "attn_out", "residual")
    check_dtype(cu_seqlens, torch.int32, "cu_seqlens")
    check_rank(cu_seqlens, 1, "cu_seqlens")
    check(cu_seqlens.shape[0] >= 1,
          f"cu_seqlens: expected B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    check_device(cu_seqlens, residual, "cu_seqlens", "residual")
    check_dtype(cos_sum, torch.float32, "cos_sum")
    check_rank(cos_sum, 1, "cos_sum")
    check(cos_sum.shape[0] == cu_seqlens.shape[0] - 1,
          f"cos_sum: expected {cu_seqlens.shape[0] - 1} entries (one per sequence of cu_seqlens), "
          f"got shape {tuple(cos_sum.shape)}")
    check_device(cos_sum, residual, "cos_sum", "residual")


def add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps):
    _check_epilogue(residual, attn_out, cu_seqlens, cos_sum)
    check_dtype(weight, FLOAT_KV, "weight")
    check(weight.dim() == 1 and weight.shape[0] == residual.shape[1],
          f"weight: expected shape ({residual.shape[1]},), got {tuple(weight.shape)}")
    check_device(weight, residual, "weight", "residual")
    check(eps >= 0, f"eps: expected eps >= 0, got {eps}")
    return residual.new_empty(residual.shape)


def add_cossim(residual, attn_out, cu_seqlens, cos_sum):
    _check_epilogue(residual, attn_out, cu_seqlens, cos_sum)


def _check_kmeans(x, k, name):
    check_dtype(x, torch.float32, name)
    check_rank(x, 2, name)
    _check_row_major(x, name)
    n = x.shape[1]
    check(n <= KMEANS_MAX_N, f"{name}: at most {KMEANS_MAX_N} values per row, got {n}")
    check(k >= 1, f"k: expected k >= 1, got {k}")
    check(k <= n, f"k: expected k <= {n} (the number of values per row of {name}), got {k}")


def kmeans1d(x, k):
    _check_kmeans(x, k, "x")
    return x.new_empty(x.shape, dtype=torch.int32), x.new_empty((x.shape[0], k))


def layer_budgets(sim, base, p, k, min_budget, max_budget):
    _check_kmeans(sim, k, "sim")
    B = sim.shape[0]
    check_dtype(base, torch.float32, "base")
    check(base.dim() == 1 and base.shape[0] == B, f"base: expected shape ({B},), got {tuple(base.shape)}")
    check_device(base, sim, "base", "sim")
    check(p > 0 and math.isfinite(p), f"p: expected a finite p > 0, got {p}")
    check(0 <= min_budget <= 2**31 - 1, f"min_budget: expected 0 <= min_budget < 2**31, got {min_budget}")
    if max_budget is not None:
        check_dtype(max_budget, torch.int32, "max_budget")
        check(max_budget.dim() == 1 and max_budget.shape[0] == B,
              f"max_budget: expected shape ({B},), got {tuple(max_budget.shape)}")
        check_device(max_budget, sim, "max_budget", "sim")
    budgets = sim.new_empty(sim.shape, dtype=torch.int32)
    return budgets, sim.new_empty(sim.shape, dtype=torch.int32), sim.new_empty((B, k))

# ---- prefill ----

# ---- decode ----

FAKE_KERNELS = {
    # ---- layer dimension ----
    "add_rmsnorm_cossim": add_rmsnorm_cossim,
    "add_cossim": add_cossim,
    "kmeans1d": kmeans1d,
    "layer_budgets": layer_budgets,
    # ---- prefill ----
    # ---- decode ----
}
