// CUDA kernels of kmeans1d and layer_budgets: one thread block per row (sequence), the row and
// the DP in shared memory, the arithmetic of csrc/kmeans1d.h (so the partitions match the CPU
// kernels bit for bit). layer_budgets clusters and applies the budget formula in the same
// launch. Nothing is read back to the host: the launch is capturable in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "layer_args.h"

namespace squeeze {
namespace {

using namespace kmeans;

// Shared-memory layout of one row of n values clustered into k groups: byte offsets of its
// arrays, each 8-byte aligned.
struct Layout {
  size_t inv, sum, sumsq, prev, cur, count, keys, sorted, item, split, bounds, total = 0;

  __host__ __device__ size_t take(size_t bytes) {
    const size_t at = total;
    total += (bytes + 7) & ~size_t(7);
    return at;
  }
  __host__ __device__ Layout(int n, int k) {
    inv = take(sizeof(double) * (n + 1));
    sum = take(sizeof(double) * (n + 1));
    sumsq = take(sizeof(double) * (n + 1));
    prev = take(sizeof(double) * (n + 1));
    cur = take(sizeof(double) * (n + 1));
    count = take(sizeof(int32_t) * (n + 1));
    keys = take(sizeof(uint32_t) * n);
    sorted = take(sizeof(uint32_t) * n);
    item = take(sizeof(int16_t) * n);
    split = take(sizeof(int16_t) * (k > 1 ? k - 1 : 1) * (n + 1));
    bounds = take(sizeof(int16_t) * (k + 1));
  }
};

// Threads per row: a DP level spreads its ~n cells over them, so more threads make each scan
// shorter (n = 128: 8 lanes per cell, 16 splits each). 32 registers a thread, no spills (sm_90).
constexpr int kThreads = 1024;

// One DP level: cells j in [lo, hi] of D[c][.] from prev = D[c-1][.]. Each cell gets `width`
// consecutive lanes (as many as the block has to spare, at most a warp) that scan interleaved
// splits and merge with shuffles; the order `better` makes the result the CPU's sequential one.
// The last level has a single cell, so a whole warp shares its scan.
__device__ void dp_level(const Prefix& P, const double* prev, double* cur, int16_t* split_row, int c, int lo,
                         int hi) {
  const int cells = hi - lo + 1;
  int width = 32;
  while (width > 1 && width * cells > kThreads) width >>= 1;
  const int tid = threadIdx.x, lane = tid & (width - 1);
  const unsigned mask = width == 32 ? 0xffffffffu : ((1u << width) - 1) << ((tid & 31) & ~(width - 1));
  for (int j = lo + tid / width; j <= hi; j += kThreads / width) {
    double best = INFINITY;
    int best_i = j;
    dp_scan(P, prev, c - 1 + lane, width, j, &best, &best_i);
    for (int offset = width / 2; offset > 0; offset >>= 1) {
      const double other = __shfl_xor_sync(mask, best, offset, width);
      const int other_i = __shfl_xor_sync(mask, best_i, offset, width);
      if (better(other, other_i, best, best_i)) {
        best = other;
        best_i = other_i;
      }
    }
    if (lane == 0) {
      cur[j] = best;
      split_row[j] = static_cast<int16_t>(best_i);
    }
  }
}

// budgets == nullptr: kmeans1d. Otherwise layer_budgets with base [B], optional max_budget [B].
__global__ void __launch_bounds__(kThreads)
    kmeans1d_kernel(const float* __restrict__ x, int64_t x_stride, int n, int k, int32_t* __restrict__ labels,
                    float* __restrict__ centroids, int32_t* __restrict__ budgets, const float* __restrict__ base,
                    double p, int64_t min_budget, const int32_t* __restrict__ max_budget) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout lay(n, k);
  double* inv = reinterpret_cast<double*>(smem + lay.inv);
  double* prev = reinterpret_cast<double*>(smem + lay.prev);
  double* cur = reinterpret_cast<double*>(smem + lay.cur);
  uint32_t* keys = reinterpret_cast<uint32_t*>(smem + lay.keys);
  uint32_t* sorted = reinterpret_cast<uint32_t*>(smem + lay.sorted);
  int16_t* item = reinterpret_cast<int16_t*>(smem + lay.item);
  int16_t* split = reinterpret_cast<int16_t*>(smem + lay.split);
  int16_t* bounds = reinterpret_cast<int16_t*>(smem + lay.bounds);
  const Prefix P{reinterpret_cast<int32_t*>(smem + lay.count), reinterpret_cast<double*>(smem + lay.sum),
                 reinterpret_cast<double*>(smem + lay.sumsq), inv};
  __shared__ int s_m;
  __shared__ double s_shift;

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, nt = kThreads;
  const float* xb = x + b * x_stride;
  for (int i = tid; i < n; i += nt) keys[i] = sort_key(xb[i]);
  for (int w = tid; w <= n; w += nt) inv[w] = w == 0 ? 0.0 : 1.0 / static_cast<double>(w);
  __syncthreads();

  // Counting sort: the position of value i is the number of values before it in (key, index)
  // order, so every position is written exactly once.
  for (int i = tid; i < n; i += nt) {
    const uint32_t ki = keys[i];
    int r = 0;
    for (int j = 0; j < n; ++j) r += (keys[j] < ki) | ((keys[j] == ki) & (j < i));
    sorted[r] = ki;
  }
  __syncthreads();
  if (tid == 0) s_shift = prefix_origin(sorted, P);
  for (int r = tid; r < n; r += nt) {
    Running run(sorted);
    for (int q = 0; q <= r; ++q) run.add(sorted, q);
    run.emit(sorted, n, r, P, item, &s_m);
  }
  __syncthreads();

  const int m = s_m, kk = min(k, m), stride = n + 1;
  for (int j = dp_first(1, kk, m) + tid; j <= dp_last(1, kk, m); j += nt) prev[j] = cluster_cost(P, 0, j);
  __syncthreads();
  for (int c = 2; c <= kk; ++c) {
    dp_level(P, prev, cur, split + (c - 2) * stride, c, dp_first(c, kk, m), dp_last(c, kk, m));
    __syncthreads();
    double* t = prev;
    prev = cur;
    cur = t;
  }
  if (tid == 0) backtrack(split, stride, kk, m, bounds);
  __syncthreads();

  const int top = kk == k ? P.count[m] - P.count[bounds[k - 1]] : 0;
  for (int i = tid; i < n; i += nt) {
    // Binary search of the value's key among the sorted keys gives its item.
    const uint32_t ki = keys[i];
    int lo = 0, hi = n - 1;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (sorted[mid] < ki) lo = mid + 1; else hi = mid;
    }
    const int label = group_of(bounds, kk, item[lo]);
    labels[b * n + i] = label;
    if (budgets) {
      budgets[b * n + i] = layer_budget(base[b], p, n, top, label == k - 1, min_budget, max_budget != nullptr,
                                        max_budget ? max_budget[b] : 0);
    }
  }
  for (int g = tid; g < k; g += nt) centroids[b * k + g] = g < kk ? centroid(P, bounds, g, s_shift) : nanf("");
}

void launch(const at::Tensor& x, int64_t k, const at::Tensor& labels, const at::Tensor& centroids,
            const at::Tensor* budgets, const at::Tensor* base, double p, int64_t min_budget,
            const at::Tensor* max_budget) {
  const int64_t B = x.size(0);
  const int n = static_cast<int>(x.size(1));
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const size_t smem = Layout(n, static_cast<int>(k)).total;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kmeans1d_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kmeans1d_kernel<<<static_cast<unsigned>(B), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), x.stride(0), n, static_cast<int>(k), labels.data_ptr<int32_t>(),
      centroids.data_ptr<float>(), budgets ? budgets->data_ptr<int32_t>() : nullptr,
      base ? base->data_ptr<float>() : nullptr, p, min_budget,
      max_budget ? max_budget->data_ptr<int32_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> kmeans1d_cuda(const at::Tensor& x, int64_t k) {
  check_kmeans_args(x, k, "x");
  auto labels = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kInt));
  auto centroids = at::empty({x.size(0), k}, x.options());
  launch(x, k, labels, centroids, nullptr, nullptr, 0.0, 0, nullptr);
  return {labels, centroids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_budgets_cuda(const at::Tensor& sim, const at::Tensor& base,
                                                                   double p, int64_t k, int64_t min_budget,
                                                                   const c10::optional<at::Tensor>& max_budget) {
  check_layer_budgets_args(sim, base, p, k, min_budget, max_budget);
  auto budgets = at::empty({sim.size(0), sim.size(1)}, sim.options().dtype(at::kInt));
  auto labels = at::empty_like(budgets);
  auto centroids = at::empty({sim.size(0), k}, sim.options());
  const auto base_c = base.contiguous();
  const auto max_c = max_budget.has_value() ? max_budget->contiguous() : at::Tensor();
  launch(sim, k, labels, centroids, &budgets, &base_c, p, min_budget, max_c.defined() ? &max_c : nullptr);
  return {budgets, labels, centroids};
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CUDA, m) {
  m.impl("kmeans1d", &kmeans1d_cuda);
  m.impl("layer_budgets", &layer_budgets_cuda);
}

}  // namespace squeeze
