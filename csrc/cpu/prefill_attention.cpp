// prefill_attention on CPU: causal attention over packed variable-length sequences with
// optional H2O / observation-window column scores.
//
// Pass 1 walks each (sequence, query head, block of queries) over the key blocks it sees with
// an online softmax, so memory stays linear in tokens (a 32k prompt never needs a T x T
// buffer). Pass 2, only when scores are asked for, walks each (sequence, KV head, block of
// keys) over the queries at or after it, recomputes p = exp(scale q.k - lse) from pass 1's
// log-sum-exp and sums it over the queries and the query heads of the group: every score is
// owned by one work item, so no atomics are needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "prefill_args.h"

namespace squeeze {
namespace {

constexpr int64_t kQueryBlock = 32;
constexpr int64_t kKeyBlock = 64;

// A block [lo, hi) of the local positions of one sequence (tokens start .. start + seq_len),
// for one head.
struct Item {
  int64_t start, seq_len, lo, hi, head, cost;
};

// Runs fn on every item over the intra-op threads. Causal work is uneven (the last query
// block of a sequence sees all of its keys), so the items go heaviest first and are dealt out
// round-robin, which keeps the threads' totals close.
template <typename F>
void for_each_item(std::vector<Item>& items, const F& fn) {
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = w; i < n; i += workers) fn(items[i]);
    }
  });
}

// First local query of the scoring window of an n-token sequence: every query for
// score_window == 0 (H2O), the last score_window queries otherwise.
inline int64_t window_start(int64_t n, int64_t score_window) {
  return score_window == 0 ? 0 : std::max<int64_t>(n - score_window, 0);
}

// Rows of a packed [T, heads, D] tensor.
template <typename scalar_t>
struct Packed {
  const scalar_t* data;
  int64_t stride_t, stride_h;
  const scalar_t* row(int64_t t, int64_t h) const { return data + t * stride_t + h * stride_h; }
};

// Keys [k0, k0 + nk) of KV head g, transposed into kt[d * kKeyBlock + j] so that the dot
// products of one query with the whole block vectorise over j.
template <typename scalar_t>
void load_keys_t(const Packed<scalar_t>& k, int64_t t0, int64_t nk, int64_t g, int64_t D, float* kt) {
  for (int64_t j = 0; j < nk; ++j) {
    const scalar_t* row = k.row(t0 + j, g);
    for (int64_t d = 0; d < D; ++d) kt[d * kKeyBlock + j] = static_cast<float>(row[d]);
  }
}

// Queries [t0, t0 + nq) of head h, multiplied by the softmax scale.
template <typename scalar_t>
void load_queries(const Packed<scalar_t>& q, int64_t t0, int64_t nq, int64_t h, int64_t D, float scale, float* qf) {
  for (int64_t i = 0; i < nq; ++i) {
    const scalar_t* row = q.row(t0 + i, h);
    for (int64_t d = 0; d < D; ++d) qf[i * D + d] = scale * static_cast<float>(row[d]);
  }
}

// s[j] = qrow . k_j for the first nk keys of a transposed key block.
inline void dot_keys(const float* qrow, const float* kt, int64_t nk, int64_t D, float* s) {
  std::fill(s, s + nk, 0.f);
  for (int64_t d = 0; d < D; ++d) {
    const float qd = qrow[d];
    const float* kd = kt + d * kKeyBlock;
    for (int64_t j = 0; j < nk; ++j) s[j] += qd * kd[j];
  }
}

// Pass 1 for one item: out and lse of queries [lo, hi) of head `head`.
template <typename scalar_t>
void attend(const Item& it, const Packed<scalar_t>& q, const Packed<scalar_t>& k, const Packed<scalar_t>& v,
            int64_t H, int64_t group, int64_t D, float scale, scalar_t* out, float* lse) {
  const int64_t nq = it.hi - it.lo, g = it.head / group;
  std::vector<float> qf(nq * D), acc(nq * D, 0.f), kt(D * kKeyBlock), vf(kKeyBlock * D), s(kKeyBlock);
  std::vector<float> m(nq, -std::numeric_limits<float>::infinity()), l(nq, 0.f);
  load_queries(q, it.start + it.lo, nq, it.head, D, scale, qf.data());
  for (int64_t kb = 0; kb < it.hi; kb += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, it.hi - kb);
    load_keys_t(k, it.start + kb, nk, g, D, kt.data());
    for (int64_t j = 0; j < nk; ++j) {
      const scalar_t* row = v.row(it.start + kb + j, g);
      for (int64_t d = 0; d < D; ++d) vf[j * D + d] = static_cast<float>(row[d]);
    }
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t t = it.lo + i;
      const int64_t seen = std::min(nk, t + 1 - kb);  // causal: keys kb .. t
      if (seen <= 0) continue;
      dot_keys(&qf[i * D], kt.data(), seen, D, s.data());
      const float m_new = std::max(m[i], *std::max_element(s.begin(), s.begin() + seen));
      const float alpha = std::exp(m[i] - m_new);  // 0 on the first block (m = -inf)
      float* a = &acc[i * D];
      for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      float sum = 0.f;
      for (int64_t j = 0; j < seen; ++j) {
        const float p = std::exp(s[j] - m_new);
        sum += p;
        const float* vj = &vf[j * D];
        for (int64_t d = 0; d < D; ++d) a[d] += p * vj[d];
      }
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t t = it.start + it.lo + i;
    scalar_t* o = out + (t * H + it.head) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[i * D + d] / l[i]);
    lse[t * H + it.head] = m[i] + std::log(l[i]);
  }
}

// Pass 2 for one item: column scores of keys [lo, hi) of KV head `head`, summed over the
// group's query heads and over the queries of the window at or after each key.
template <typename scalar_t>
void column_scores(const Item& it, int64_t score_window, const Packed<scalar_t>& q,
                   const Packed<scalar_t>& k, const float* lse, int64_t H, int64_t Hkv, int64_t group, int64_t D,
                   float scale, float* scores) {
  const int64_t nk = it.hi - it.lo, seq_len = it.seq_len;
  const int64_t q_first = window_start(seq_len, score_window);
  std::vector<float> kt(D * kKeyBlock), qf(kQueryBlock * D), s(kKeyBlock), col(nk, 0.f);
  load_keys_t(k, it.start + it.lo, nk, it.head, D, kt.data());
  for (int64_t h = it.head * group; h < (it.head + 1) * group; ++h) {
    for (int64_t qb = std::max(it.lo, q_first); qb < seq_len; qb += kQueryBlock) {
      const int64_t nq = std::min(kQueryBlock, seq_len - qb);
      load_queries(q, it.start + qb, nq, h, D, scale, qf.data());
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t t = qb + i;
        const int64_t seen = std::min(nk, t + 1 - it.lo);
        dot_keys(&qf[i * D], kt.data(), seen, D, s.data());
        const float row_lse = lse[(it.start + t) * H + h];
        for (int64_t j = 0; j < seen; ++j) col[j] += std::exp(s[j] - row_lse);
      }
    }
  }
  for (int64_t j = 0; j < nk; ++j) scores[(it.start + it.lo + j) * Hkv + it.head] = col[j];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v,
                                                                     const at::Tensor& cu_seqlens,
                                                                     int64_t max_seqlen, double scale,
                                                                     int64_t score_window) {
  check_packed(q, "q");
  check_packed(k, "k");
  check_packed(v, "v");
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "k, v: expected dtype ",
              c10::toString(q.scalar_type()), " (that of q), got ", c10::toString(k.scalar_type()), " and ",
              c10::toString(v.scalar_type()));
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected shape ", k.sizes(), " (that of k), got ", v.sizes());
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == T, "k: expected ", T, " tokens (those of q), got shape ", k.sizes());
  TORCH_CHECK(k.size(2) == D, "k: expected head dim ", D, " (that of q), got shape ", k.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "k: the number of KV heads (", Hkv, ") must divide the query heads (", H,
              ")");
  TORCH_CHECK(max_seqlen >= 0, "max_seqlen: expected >= 0, got ", max_seqlen);
  const std::vector<int64_t> cu = checked_offsets(cu_seqlens, T, q, "q");
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cu[b + 1] - cu[b] <= max_seqlen, "max_seqlen: expected >= every sequence length, got ",
                max_seqlen, " < ", cu[b + 1] - cu[b], " (sequence ", b, ")");
  }

  auto out = at::empty({T, H, D}, q.options());
  auto lse = at::empty({T, H}, q.options().dtype(at::kFloat));
  auto scores = at::empty({score_window >= 0 ? T : 0, Hkv}, q.options().dtype(at::kFloat));
  const int64_t group = H / Hkv;
  const float fscale = static_cast<float>(scale);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefill_attention_cpu", [&] {
    const Packed<scalar_t> qp{q.data_ptr<scalar_t>(), q.stride(0), q.stride(1)};
    const Packed<scalar_t> kp{k.data_ptr<scalar_t>(), k.stride(0), k.stride(1)};
    const Packed<scalar_t> vp{v.data_ptr<scalar_t>(), v.stride(0), v.stride(1)};
    float* lse_ptr = lse.data_ptr<float>();

    std::vector<Item> items;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = cu[b + 1] - cu[b];
      for (int64_t lo = 0; lo < n; lo += kQueryBlock) {
        const int64_t hi = std::min(lo + kQueryBlock, n);
        for (int64_t h = 0; h < H; ++h) items.push_back({cu[b], n, lo, hi, h, hi});
      }
    }
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    for_each_item(items, [&](const Item& it) { attend(it, qp, kp, vp, H, group, D, fscale, out_ptr, lse_ptr); });

    if (score_window < 0) return;
    items.clear();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = cu[b + 1] - cu[b];
      const int64_t q_first = window_start(n, score_window);
      for (int64_t lo = 0; lo < n; lo += kKeyBlock) {
        const int64_t hi = std::min(lo + kKeyBlock, n);
        for (int64_t g = 0; g < Hkv; ++g) items.push_back({cu[b], n, lo, hi, g, n - std::max(lo, q_first)});
      }
    }
    float* scores_ptr = scores.data_ptr<float>();
    for_each_item(items, [&](const Item& it) {
      column_scores(it, score_window, qp, kp, lse_ptr, H, Hkv, group, D, fscale, scores_ptr);
    });
  });
  return {out, lse, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) { m.impl("prefill_attention", &prefill_attention_cpu); }

}  // namespace squeeze
