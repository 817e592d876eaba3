"""Public, typed wrappers of torch.ops.squeeze.*: the math, shapes, dtypes and what each op
mutates. Validation happens in the op itself (C++ checks or the Triton launcher's metadata
check), so calling torch.ops.squeeze.* directly is just as safe."""
import torch

__all__ = [
    # ---- layer dimension ----
    "add_rmsnorm_cossim",
    "add_cossim",
    "kmeans1d",
    "layer_budgets",
    # ---- prefill ----
    # ---- decode ----
]

# ---- layer dimension ----


def add_rmsnorm_cossim(residual: torch.Tensor, attn_out: torch.Tensor, weight: torch.Tensor,
                       cu_seqlens: torch.Tensor, cos_sum: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Attention epilogue of a pre-norm block that also measures the layer's importance.

    For every token t of sequence b (tokens cu_seqlens[b] <= t < cu_seqlens[b+1]):
        new_t = old_t + attn_out_t                     (rounded to residual's dtype, stored)
        out_t = new_t * rsqrt(mean(new_t^2) + eps) * weight        (fp32 math)
        cos_sum[b] += cos(old_t, new_t) = old.new / (max(|old|, 1e-8) * max(|new|, 1e-8))
    One pass over the data (the bytes of an add + RMSNorm). Summing cos_sum over the prompt
    and dividing by its length gives the layer score of SqueezeAttention (see plan_budgets).

    residual: [T, d] fp16/bf16/fp32, last dim contiguous; MUTATED (becomes new).
    attn_out: [T, d], residual's dtype. weight: [d], fp16/bf16/fp32.
    cu_seqlens: int32 [B + 1], 0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = T.
    cos_sum: fp32 [B]; MUTATED (accumulated, not overwritten: zero it before the prompt).
    Returns out [T, d] in residual's dtype.
    """
    return torch.ops.squeeze.add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps)


def add_cossim(residual: torch.Tensor, attn_out: torch.Tensor, cu_seqlens: torch.Tensor,
               cos_sum: torch.Tensor) -> None:
    """add_rmsnorm_cossim without the norm: residual <- residual + attn_out (MUTATED) and
    cos_sum[b] += sum over the tokens of sequence b of cos(old, new) (MUTATED). Same shapes."""
    torch.ops.squeeze.add_cossim(residual, attn_out, cu_seqlens, cos_sum)


def kmeans1d(x: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact optimal 1-D K-Means of every row of x (fp32 [B, N], N <= 256) into 1 <= k <= N groups.

    Minimises the within-group sum of squares globally (DP over the sorted distinct values,
    O(k N^2)); deterministic, and CPU and CUDA give identical labels. Groups are numbered by
    ascending centroid. Equal values always share a label. With m < k distinct values only
    labels 0..m-1 are used and centroids[:, m:] are NaN. Ties in cost: the split that makes
    the higher groups as large as possible wins.
    Returns labels int32 [B, N] and centroids fp32 [B, k].
    """
    return torch.ops.squeeze.kmeans1d(x, k)


def layer_budgets(sim: torch.Tensor, base, p: float, k: int = 3, min_budget: int = 1,
                  max_budget=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SqueezeAttention's per-layer KV budgets, clustering and formula in one launch.

    sim: fp32 [B, L] mean cosine similarity per layer (high = the layer changed little).
    base: uniform budget per layer in tokens (b_init * BASE): fp32 [B], or a number for all.
    Each row is clustered by kmeans1d(sim, k); the top group G (label k-1, the most similar
    layers) is squeezed to floor(p * base), every other layer gets
    floor(base * (L - p|G|) / (L - |G|)), so the total L * base is kept up to the floors
    (L * base - L < sum <= L * base before clamping). If G is empty (fewer distinct values than
    k) or holds every layer, every layer gets floor(base); p = 1 gives that uniform split too.
    Then budget = max(min_budget, budget) and, if max_budget (int32 [B] or a number) is given,
    min(max_budget, budget).
    Returns budgets int32 [B, L], labels int32 [B, L], centroids fp32 [B, k].
    """
    B = sim.shape[0]
    if not isinstance(base, torch.Tensor):
        base = torch.full((B,), float(base), dtype=torch.float32, device=sim.device)
    if max_budget is not None and not isinstance(max_budget, torch.Tensor):
        max_budget = torch.full((B,), int(max_budget), dtype=torch.int32, device=sim.device)
    return torch.ops.squeeze.layer_budgets(sim, base, p, k, min_budget, max_budget)


# ---- prefill ----

# ---- decode ----
