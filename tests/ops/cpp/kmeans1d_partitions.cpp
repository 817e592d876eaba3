// The CUDA kernel divides the clustering's work among threads in ways the CPU kernel does not:
// each thread runs the prefix-sum pass up to its own positions, and a DP cell's splits are
// scanned by `width` lanes that merge pairwise like the kernel's shuffles. csrc/kmeans1d.h claims
// both give the CPU's serial answer bit for bit. This program checks it on the host over random
// rows (with repeated values), every division the kernel can make, and exits 1 on a mismatch.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kmeans1d.h"

using namespace squeeze::kmeans;

struct Sums {
  std::vector<int32_t> count;
  std::vector<double> sum, sumsq, inv;
  std::vector<int16_t> item;
  int m = -1;

  explicit Sums(int n) : count(n + 1, -1), sum(n + 1, NAN), sumsq(n + 1, NAN), inv(n + 1), item(n, -1) {
    for (int w = 1; w <= n; ++w) inv[w] = 1.0 / static_cast<double>(w);
  }
  Prefix prefix() { return Prefix{count.data(), sum.data(), sumsq.data(), inv.data()}; }
  bool operator==(const Sums& o) const {
    if (m != o.m || item != o.item) return false;
    for (int j = 0; j <= m; ++j)  // bitwise: == on doubles, and no NaN is expected in entries 0..m
      if (count[j] != o.count[j] || sum[j] != o.sum[j] || sumsq[j] != o.sumsq[j]) return false;
    return true;
  }
};

// The CPU kernel's serial pass.
Sums serial(const std::vector<uint32_t>& s) {
  const int n = static_cast<int>(s.size());
  Sums out(n);
  prefix_origin(s.data(), out.prefix());
  Running run(s.data());
  for (int r = 0; r < n; ++r) {
    run.add(s.data(), r);
    run.emit(s.data(), n, r, out.prefix(), out.item.data(), &out.m);
  }
  return out;
}

// The CUDA kernel's division: thread tid of nt takes positions tid, tid + nt, ... (threads run in
// reverse order here, so no entry can rely on an earlier thread's writes).
Sums threaded(const std::vector<uint32_t>& s, int nt) {
  const int n = static_cast<int>(s.size());
  Sums out(n);
  prefix_origin(s.data(), out.prefix());
  for (int tid = nt - 1; tid >= 0; --tid) {
    for (int r = tid; r < n; r += nt) {
      Running run(s.data());
      for (int q = 0; q <= r; ++q) run.add(s.data(), q);
      run.emit(s.data(), n, r, out.prefix(), out.item.data(), &out.m);
    }
  }
  return out;
}

// One DP cell scanned by `width` lanes (lane l: splits c - 1 + l, step width), merged as the
// kernel's __shfl_xor_sync tree does; returns lane 0's (cost, split).
void lanes(const Prefix& P, const double* prev, int c, int j, int width, double* best, int* best_i) {
  std::vector<double> v(width, INFINITY);
  std::vector<int> at(width, j);
  for (int l = 0; l < width; ++l) dp_scan(P, prev, c - 1 + l, width, j, &v[l], &at[l]);
  for (int offset = width / 2; offset > 0; offset >>= 1) {
    const std::vector<double> v0 = v;
    const std::vector<int> at0 = at;
    for (int l = 0; l < width; ++l) {
      if (better(v0[l ^ offset], at0[l ^ offset], v[l], at[l])) {
        v[l] = v0[l ^ offset];
        at[l] = at0[l ^ offset];
      }
    }
  }
  *best = v[0];
  *best_i = at[0];
}

int main() {
  std::mt19937 gen(20261130);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  int failures = 0;
  for (int trial = 0; trial < 600; ++trial) {
    const int n = 1 + static_cast<int>(gen() % kMaxN);
    std::vector<uint32_t> s(n);
    // Rows of three kinds: random values; few values (long runs of equal keys); evenly spaced
    // values, where many splits of a cell cost exactly the same (the tie order decides).
    for (int i = 0; i < n; ++i) {
      const float x = trial % 3 == 0 ? uniform(gen)
                      : trial % 3 == 1 ? static_cast<float>(gen() % 7) * 0.125f - 0.25f
                                       : 0.0625f * static_cast<float>(i);
      s[i] = sort_key(x);
    }
    std::sort(s.begin(), s.end());

    Sums ref = serial(s);
    for (int nt : {1, 3, 32, 256, 1024}) failures += !(threaded(s, nt) == ref);

    // DP level 2 (k = 3) from level 1, every cell, every lane width the kernel can choose.
    const int m = ref.m;
    if (m < 3) continue;
    const Prefix P = ref.prefix();
    std::vector<double> prev(n + 1, NAN);
    for (int j = 1; j <= m - 2; ++j) prev[j] = cluster_cost(P, 0, j);
    for (int j = 2; j <= m - 1; ++j) {
      double want = INFINITY, got = INFINITY;
      int want_i = j, got_i = j;
      dp_scan(P, prev.data(), 1, 1, j, &want, &want_i);
      for (int width = 2; width <= 32; width *= 2) {
        lanes(P, prev.data(), 2, j, width, &got, &got_i);
        failures += !(got == want && got_i == want_i);
      }
    }
  }
  std::printf("%d mismatches\n", failures);
  return failures ? 1 : 0;
}
