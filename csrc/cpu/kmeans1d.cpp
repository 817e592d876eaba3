// CPU kernels of kmeans1d and layer_budgets: rows (sequences) in parallel with at::parallel_for,
// the arithmetic of csrc/kmeans1d.h run serially within a row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "checks.h"
#include "layer_args.h"

// The clustering must match the CUDA kernel bit for bit (compiled with --fmad=false): keep the
// host compiler from contracting a*b+c into an FMA in the shared arithmetic.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace squeeze {
namespace {

using namespace kmeans;

// Per-thread buffers of one row's clustering.
struct Workspace {
  std::vector<uint32_t> keys, sorted;
  std::vector<int32_t> count;
  std::vector<double> sum, sumsq, inv, prev, cur;
  std::vector<int16_t> item, split, bounds;

  Workspace(int n, int k)
      : keys(n), sorted(n), count(n + 1), sum(n + 1), sumsq(n + 1), inv(n + 1), prev(n + 1),
        cur(n + 1), item(n), split(static_cast<size_t>(std::max(k - 1, 1)) * (n + 1)), bounds(k + 1) {
    inv[0] = 0.0;
    for (int w = 1; w <= n; ++w) inv[w] = 1.0 / static_cast<double>(w);
  }
};

// Rows per parallel task: enough DP work (~k n^2 cost evaluations a row) to pay for a thread.
int64_t grain(int64_t n, int64_t k) { return std::max<int64_t>(1, 32768 / (k * n * n)); }

// Clusters x[0..n) into k groups: labels[0..n), centroids[0..k). Returns the number of values in
// the top group (label k - 1; 0 when fewer than k distinct values leave it empty).
int cluster_row(const float* x, int n, int k, int32_t* labels, float* centroids, Workspace& ws) {
  for (int i = 0; i < n; ++i) ws.keys[i] = sort_key(x[i]);
  std::copy(ws.keys.begin(), ws.keys.end(), ws.sorted.begin());
  std::sort(ws.sorted.begin(), ws.sorted.end());

  Prefix P{ws.count.data(), ws.sum.data(), ws.sumsq.data(), ws.inv.data()};
  const double shift = prefix_origin(ws.sorted.data(), P);
  int m = 0;
  Running run(ws.sorted.data());
  for (int r = 0; r < n; ++r) {
    run.add(ws.sorted.data(), r);
    run.emit(ws.sorted.data(), n, r, P, ws.item.data(), &m);
  }
  const int kk = std::min(k, m);
  const int stride = n + 1;

  for (int j = dp_first(1, kk, m); j <= dp_last(1, kk, m); ++j) ws.prev[j] = cluster_cost(P, 0, j);
  for (int c = 2; c <= kk; ++c) {
    for (int j = dp_first(c, kk, m); j <= dp_last(c, kk, m); ++j) {
      double best = INFINITY;
      int best_i = j;
      dp_scan(P, ws.prev.data(), c - 1, 1, j, &best, &best_i);
      ws.cur[j] = best;
      ws.split[(c - 2) * stride + j] = static_cast<int16_t>(best_i);
    }
    std::swap(ws.prev, ws.cur);
  }
  backtrack(ws.split.data(), stride, kk, m, ws.bounds.data());

  for (int i = 0; i < n; ++i) {
    const auto pos = std::lower_bound(ws.sorted.begin(), ws.sorted.end(), ws.keys[i]) - ws.sorted.begin();
    labels[i] = group_of(ws.bounds.data(), kk, ws.item[pos]);
  }
  for (int g = 0; g < k; ++g)
    centroids[g] = g < kk ? centroid(P, ws.bounds.data(), g, shift) : std::numeric_limits<float>::quiet_NaN();
  return kk == k ? P.count[m] - P.count[ws.bounds[k - 1]] : 0;
}

std::tuple<at::Tensor, at::Tensor> kmeans1d_cpu(const at::Tensor& x, int64_t k) {
  check_kmeans_args(x, k, "x");
  const int64_t B = x.size(0), n = x.size(1);
  auto labels = at::empty({B, n}, x.options().dtype(at::kInt));
  auto centroids = at::empty({B, k}, x.options());
  const float* xp = x.data_ptr<float>();
  int32_t* lp = labels.data_ptr<int32_t>();
  float* cp = centroids.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, B, grain(n, k), [&](int64_t b0, int64_t b1) {
    Workspace ws(n, k);
    for (int64_t b = b0; b < b1; ++b) cluster_row(xp + b * xs, n, k, lp + b * n, cp + b * k, ws);
  });
  return {labels, centroids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_budgets_cpu(const at::Tensor& sim, const at::Tensor& base,
                                                                  double p, int64_t k, int64_t min_budget,
                                                                  const c10::optional<at::Tensor>& max_budget) {
  check_layer_budgets_args(sim, base, p, k, min_budget, max_budget);
  const int64_t B = sim.size(0), L = sim.size(1);
  auto budgets = at::empty({B, L}, sim.options().dtype(at::kInt));
  auto labels = at::empty({B, L}, sim.options().dtype(at::kInt));
  auto centroids = at::empty({B, k}, sim.options());
  const auto base_c = base.contiguous();
  const auto max_c = max_budget.has_value() ? max_budget->contiguous() : at::Tensor();
  const float* sp = sim.data_ptr<float>();
  const float* basep = base_c.data_ptr<float>();
  const int32_t* maxp = max_c.defined() ? max_c.data_ptr<int32_t>() : nullptr;
  int32_t* bp = budgets.data_ptr<int32_t>();
  int32_t* lp = labels.data_ptr<int32_t>();
  float* cp = centroids.data_ptr<float>();
  const int64_t ss = sim.stride(0);
  at::parallel_for(0, B, grain(L, k), [&](int64_t b0, int64_t b1) {
    Workspace ws(L, k);
    for (int64_t b = b0; b < b1; ++b) {
      const int top = cluster_row(sp + b * ss, L, k, lp + b * L, cp + b * k, ws);
      const int32_t cap = maxp ? maxp[b] : 0;
      for (int64_t l = 0; l < L; ++l) {
        const bool in_top = lp[b * L + l] == k - 1;
        bp[b * L + l] = layer_budget(basep[b], p, L, top, in_top, min_budget, maxp != nullptr, cap);
      }
    }
  });
  return {budgets, labels, centroids};
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) {
  m.impl("kmeans1d", &kmeans1d_cpu);
  m.impl("layer_budgets", &layer_budgets_cpu);
}

}  // namespace squeeze
