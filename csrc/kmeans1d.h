// Exact 1-D K-Means and the SqueezeAttention budget formula: the arithmetic shared by the CPU
// kernels (csrc/cpu/kmeans1d.cpp) and the CUDA kernels (csrc/cuda/kmeans1d.cu).
//
// Clustering of one row x[0..n) into k groups:
//  1. Values are ordered by an order-preserving uint32 key (-0 and +0 share a key), and the
//     m distinct values u_0 < ... < u_{m-1} with their multiplicities w_j are the DP's items,
//     so equal values always land in the same group.
//  2. Prefix sums over the items, in float64, of the count W, of w*v and of w*v^2, where
//     v = u - u_0 (the shift keeps sum-of-squares cancellation small for similarities near 1).
//     Every sum is taken serially in position order on both CPU and GPU, so both see the same
//     bits.
//  3. D[c][j] = least within-group sum of squares of the first j items in c groups,
//     D[c][j] = min_{c-1 <= i < j} D[c-1][i] + cost(i, j); optimal 1-D clusters are
//     contiguous in sorted order, so this is the global optimum (O(k m^2)).
//     Ties in cost: the smallest split i wins (the last group is made as large as possible,
//     recursively), so the answer is deterministic, however the scan is parallelised.
//  4. kk = min(k, m) groups are used (every optimum with m >= k items uses all k groups);
//     labels 0..kk-1 by ascending centroid, groups kk..k-1 are empty with NaN centroids.
// Every operation below is done in the same order on host and device (nvcc --fmad=false, and no
// FMA contraction on the host), so CPU and CUDA give identical labels, centroids and budgets.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define SQZ_HD __host__ __device__ __forceinline__
#else
#define SQZ_HD inline
#endif

namespace squeeze {
namespace kmeans {

// Largest row length the kernels accept (the CUDA kernel holds one row in shared memory).
constexpr int64_t kMaxN = 256;

// Order-preserving key: key(a) < key(b) iff a < b for non-NaN floats; -0 and +0 map to one key.
SQZ_HD uint32_t sort_key(float x) {
  if (x == 0.0f) x = 0.0f;
  uint32_t u;
#ifdef __CUDA_ARCH__
  u = __float_as_uint(x);
#else
  std::memcpy(&u, &x, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

SQZ_HD float key_value(uint32_t key) {
  uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Prefix sums of the items of one row. Arrays have n + 1 entries; entry j sums items [0, j).
struct Prefix {
  int32_t* count;  // W: number of values
  double* sum;     // S: sum of w * (u - shift)
  double* sumsq;   // Q: sum of w * (u - shift)^2
  double* inv;     // inv[w] = 1 / w for w in [1, n] (inv[0] = 0): a multiply instead of a division
};

// The shift of the prefix sums: the row's least value (sorted[0]).
SQZ_HD double row_shift(const uint32_t* sorted) { return static_cast<double>(key_value(sorted[0])); }

// The prefix sums are one serial pass over the sorted positions, in this order: Running holds
// the pass's state after some position r (sums of positions [0, r], centred on the row's least
// value), emit() writes what the pass writes at r. The CPU runs the pass once (O(n)); on the GPU
// each thread runs it up to its own positions (O(n^2) additions, O(n) deep, no shared-memory
// round trip per step), so both hold the same bits.
struct Running {
  double shift, sum = 0.0, sumsq = 0.0;
  int before = 0;  // distinct values before the last position added

  SQZ_HD explicit Running(const uint32_t* sorted) : shift(row_shift(sorted)) {}

  SQZ_HD void add(const uint32_t* sorted, int q) {
    const double v = static_cast<double>(key_value(sorted[q])) - shift;
    sum += v;
    sumsq += v * v;
    before += q > 0 && sorted[q] != sorted[q - 1];
  }

  // item[r]; at the last position of a value, its prefix entry (count, S, Q); at the last
  // position of the row, m. Entry 0 is prefix_origin's.
  SQZ_HD void emit(const uint32_t* sorted, int n, int r, Prefix P, int16_t* item, int* m) const {
    item[r] = static_cast<int16_t>(before);
    if (r + 1 < n && sorted[r + 1] == sorted[r]) return;
    P.count[before + 1] = r + 1;
    P.sum[before + 1] = sum;
    P.sumsq[before + 1] = sumsq;
    if (r + 1 == n) *m = before + 1;
  }
};

// Entry 0 of the prefix sums (nothing summed); returns the shift, the row's least value.
SQZ_HD double prefix_origin(const uint32_t* sorted, Prefix P) {
  P.count[0] = 0;
  P.sum[0] = 0.0;
  P.sumsq[0] = 0.0;
  return row_shift(sorted);
}

// Within-group sum of squares of items [i, j): Q - S^2 / W.
SQZ_HD double cluster_cost(const Prefix& P, int i, int j) {
  const double s = P.sum[j] - P.sum[i];
  return (P.sumsq[j] - P.sumsq[i]) - s * s * P.inv[P.count[j] - P.count[i]];
}

// Range of item counts j for which D[c][j] is needed when kk groups are used in all:
// at least c items for c groups, and at least kk - c items left for the later groups. The last
// level needs one cell, D[kk][m] (the whole row): the backtrack starts there.
SQZ_HD int dp_first(int c, int kk, int m) { return c == kk ? m : c; }
SQZ_HD int dp_last(int c, int kk, int m) { return m - (kk - c); }

// Order of the DP's candidates (cost, split): lower cost first, then the smaller split. Every
// cell's answer is the least candidate in this order, whichever way the scan is divided.
SQZ_HD bool better(double v, int i, double best, int best_i) { return v < best || (v == best && i < best_i); }

// Scans the splits i = first, first + step, ... < j of cell (c, j), c >= 2, with row
// prev = D[c-1][.], into (best, best_i). Start from (INFINITY, j): the CPU scans every split
// (first = c - 1, step = 1), each GPU lane a stride of them before the lanes merge.
SQZ_HD void dp_scan(const Prefix& P, const double* prev, int first, int step, int j, double* best, int* best_i) {
  for (int i = first; i < j; i += step) {
    const double v = prev[i] + cluster_cost(P, i, j);
    if (better(v, i, *best, *best_i)) {
      *best = v;
      *best_i = i;
    }
  }
}

// Group boundaries in items: group c holds items [bounds[c], bounds[c+1]). split holds the rows
// c = 2..kk of the DP's splits with a row stride of `stride`, row c at (c - 2) * stride.
SQZ_HD void backtrack(const int16_t* split, int stride, int kk, int m, int16_t* bounds) {
  bounds[kk] = static_cast<int16_t>(m);
  for (int c = kk; c >= 2; --c) bounds[c - 1] = split[(c - 2) * stride + bounds[c]];
  bounds[0] = 0;
}

// Group of item j.
SQZ_HD int group_of(const int16_t* bounds, int kk, int j) {
  int g = 0;
  while (g + 1 < kk && j >= bounds[g + 1]) ++g;
  return g;
}

SQZ_HD float centroid(const Prefix& P, const int16_t* bounds, int g, double shift) {
  const int i = bounds[g], j = bounds[g + 1];
  return static_cast<float>(shift + (P.sum[j] - P.sum[i]) / static_cast<double>(P.count[j] - P.count[i]));
}

// The authors' reallocation (docs/METHOD.md#budgets) for one layer: the top group (top_count
// layers of L) gets floor(p * base), every other layer floor(base * (L - p*|G|) / (L - |G|)),
// so the total is conserved up to the floors. Uniform floor(base) when the top group is empty
// or holds every layer. Then max(min_budget, .), saturated to int32 (NaN -> min_budget), and
// min(max_budget, .) when has_max.
SQZ_HD int32_t layer_budget(double base, double p, int L, int top_count, bool in_top,
                            int64_t min_budget, bool has_max, int32_t max_budget) {
  double b;
  if (top_count == 0 || top_count == L) {
    b = floor(base);
  } else if (in_top) {
    b = floor(p * base);
  } else {
    b = floor(base * (static_cast<double>(L) - p * static_cast<double>(top_count)) /
              static_cast<double>(L - top_count));
  }
  b = fmin(fmax(b, static_cast<double>(min_budget)), 2147483647.0);
  const int32_t v = static_cast<int32_t>(b);
  return has_max && max_budget < v ? max_budget : v;
}

}  // namespace kmeans
}  // namespace squeeze
