// Argument checks of kmeans1d and layer_budgets, shared by their CPU and CUDA kernels.
// Metadata checks always run; value checks (they read the data) always run on CPU and, on the
// GPU, only when SQUEEZE_DEBUG=1 (they would cost a host synchronisation).
#pragma once
#include <ATen/ATen.h>

#include "checks.h"
#include "kmeans1d.h"

namespace squeeze {

// x: fp32 [B, N] with a contiguous last dim, 1 <= k <= N <= 256.
inline void check_kmeans_args(const at::Tensor& x, int64_t k, const char* name) {
  check_dtype(x, at::kFloat, name);
  check_rank(x, 2, name);
  check_last_contiguous(x, name);
  const int64_t n = x.size(1);
  TORCH_CHECK(n <= kmeans::kMaxN, name, ": at most ", kmeans::kMaxN, " values per row, got ", n);
  TORCH_CHECK(k >= 1, "k: expected k >= 1, got ", k);
  TORCH_CHECK(k <= n, "k: expected k <= ", n, " (the number of values per row of ", name, "), got ", k);
  if (value_checks_enabled(x)) {
    TORCH_CHECK(at::isfinite(x).all().item<bool>(), name, ": expected finite values");
  }
}

inline void check_layer_budgets_args(const at::Tensor& sim, const at::Tensor& base, double p, int64_t k,
                                     int64_t min_budget, const c10::optional<at::Tensor>& max_budget) {
  check_kmeans_args(sim, k, "sim");
  check_dtype(base, at::kFloat, "base");
  check_rank(base, 1, "base");
  check_size(base, 0, sim.size(0), "base", " (one per row of sim)");
  check_same_device(base, sim, "base", "sim");
  TORCH_CHECK(p > 0.0 && std::isfinite(p), "p: expected a finite p > 0, got ", p);
  TORCH_CHECK(min_budget >= 0, "min_budget: expected >= 0, got ", min_budget);
  TORCH_CHECK(min_budget <= INT32_MAX, "min_budget: expected <= ", INT32_MAX, ", got ", min_budget);
  if (max_budget.has_value()) {
    const at::Tensor& mb = *max_budget;
    check_dtype(mb, at::kInt, "max_budget");
    check_rank(mb, 1, "max_budget");
    check_size(mb, 0, sim.size(0), "max_budget", " (one per row of sim)");
    check_same_device(mb, sim, "max_budget", "sim");
  }
  if (value_checks_enabled(sim)) {
    TORCH_CHECK((at::isfinite(base) & (base >= 0)).all().item<bool>(),
                "base: expected finite base budgets >= 0 (tokens)");
    if (max_budget.has_value()) {
      TORCH_CHECK((*max_budget >= 0).all().item<bool>(), "max_budget: expected budgets >= 0");
    }
  }
}

}  // namespace squeeze
