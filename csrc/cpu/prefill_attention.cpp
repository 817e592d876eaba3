// prefill_attention on CPU: causal attention over packed variable-length sequences with
// optional H2O / observation-window column scores.
//
// Pass 1 walks each (sequence, KV head, block of queries) over the key blocks it sees with
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

namespace squeeze {
namespace {

// Tiles are multiplied with at::mm (BLAS); they are large enough for its per-call cost to vanish.
constexpr int64_t kQueryBlock = 64;   // pass 1: queries (times the group's heads) per work item
constexpr int64_t kKeyBlock = 256;    // pass 1: keys per tile; pass 2: keys per work item
constexpr int64_t kScoreQueries = 256;  // pass 2: queries (times the group's heads) per tile

// A block [lo, hi) of the local positions of one sequence (tokens start .. start + seq_len),
// for one KV head and the query heads of its group.
struct Item {
  int64_t start, seq_len, lo, hi, kv_head, cost;
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
// score_queries == 0 (H2O), the last score_queries queries otherwise.
inline int64_t window_start(int64_t n, int64_t score_queries) {
  return score_queries == 0 ? 0 : std::max<int64_t>(n - score_queries, 0);
}

// Keys [t0, t0 + n) of KV head g of a packed float [T, Hkv, D] tensor: an [n, D] view.
inline at::Tensor key_rows(const at::Tensor& packed, int64_t g, int64_t t0, int64_t n) {
  return packed.select(1, g).narrow(0, t0, n);
}

// The [n, group] (or [n, group, D]) slice of tokens [t0, t0 + n) and the query heads of KV
// head g in a packed [T, H] (or [T, H, D]) tensor.
inline at::Tensor group_slice(const at::Tensor& packed, int64_t g, int64_t group, int64_t t0, int64_t n) {
  return packed.narrow(0, t0, n).narrow(1, g * group, group);
}

// The local position of each row of a group tile: queries lo .. lo + n, each repeated for
// the group's heads (the tiles stack the heads of a query next to each other).
inline at::Tensor row_positions(int64_t lo, int64_t n, int64_t group) {
  return at::arange(lo, lo + n, at::TensorOptions().dtype(at::kLong)).repeat_interleave(group);
}

// True where key kb + j comes after the query of row i: the causal mask of a tile.
inline at::Tensor after_query(const at::Tensor& query_pos, int64_t kb, int64_t nk) {
  return at::arange(kb, kb + nk, query_pos.options()).unsqueeze(0) > query_pos.unsqueeze(1);
}

// Pass 1 for one item: out and lse of queries [lo, hi) of the group's heads, an online
// softmax over key tiles (q, k, v float). The heads share every K/V tile.
void attend(const Item& it, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t group,
            double scale, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t nq = it.hi - it.lo, D = q.size(2), t0 = it.start + it.lo;
  const at::Tensor q_tile = group_slice(q, it.kv_head, group, t0, nq).reshape({nq * group, D});
  const at::Tensor query_pos = row_positions(it.lo, nq, group);
  at::Tensor acc = at::zeros({nq * group, D}, q.options());
  at::Tensor m = at::full({nq * group}, -std::numeric_limits<float>::infinity(), q.options());
  at::Tensor l = at::zeros({nq * group}, q.options());
  for (int64_t kb = 0; kb < it.hi; kb += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, it.hi - kb);
    at::Tensor s = at::mm(q_tile, key_rows(k, it.kv_head, it.start + kb, nk).t()).mul_(scale);
    if (kb + nk - 1 > it.lo) s.masked_fill_(after_query(query_pos, kb, nk), -std::numeric_limits<float>::infinity());
    // Every query sees key 0 in the first tile, so m_new is finite from there on.
    const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(1)));
    const at::Tensor alpha = (m - m_new).exp_();  // 0 on the first tile (m = -inf)
    s.sub_(m_new.unsqueeze(1)).exp_();
    l.mul_(alpha).add_(s.sum(1));
    acc.mul_(alpha.unsqueeze(1)).addmm_(s, key_rows(v, it.kv_head, it.start + kb, nk));
    m = m_new;
  }
  group_slice(out, it.kv_head, group, t0, nq).copy_(acc.div_(l.unsqueeze(1)).view({nq, group, D}));
  group_slice(lse, it.kv_head, group, t0, nq).copy_(m.add_(l.log_()).view({nq, group}));
}

// Pass 2 for one item: column scores of keys [lo, hi) of KV head kv_head, summed over the
// group's query heads and over the queries of the window at or after each key.
void column_scores(const Item& it, int64_t score_queries, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& lse, int64_t group, double scale, const at::Tensor& scores) {
  const int64_t nk = it.hi - it.lo, D = q.size(2);
  const at::Tensor k_tile = key_rows(k, it.kv_head, it.start + it.lo, nk);
  at::Tensor col = at::zeros({nk}, k.options());
  for (int64_t qb = std::max(it.lo, window_start(it.seq_len, score_queries)); qb < it.seq_len; qb += kScoreQueries) {
    const int64_t nq = std::min(kScoreQueries, it.seq_len - qb);
    const at::Tensor q_tile = group_slice(q, it.kv_head, group, it.start + qb, nq).reshape({nq * group, D});
    const at::Tensor row_lse = group_slice(lse, it.kv_head, group, it.start + qb, nq).reshape({1, nq * group});
    at::Tensor p = at::mm(k_tile, q_tile.t()).mul_(scale).sub_(row_lse).exp_();  // [key, query row]
    if (it.hi - 1 > qb) p.masked_fill_(after_query(row_positions(qb, nq, group), it.lo, nk).t(), 0.f);
    col.add_(p.sum(1));
  }
  scores.select(1, it.kv_head).narrow(0, it.start + it.lo, nk).copy_(col);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v,
                                                                     const at::Tensor& cu_seqlens,
                                                                     int64_t max_seqlen, double scale,
                                                                     int64_t score_queries) {
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
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "k: the number of KV heads (", Hkv,
              ") must divide the number of query heads of q (", H, ")");
  TORCH_CHECK(max_seqlen >= 0, "max_seqlen: expected >= 0, got ", max_seqlen);
  check_scale(scale);
  TORCH_CHECK(score_queries >= -1, "score_queries: expected -1 (none), 0 (all) or W > 0, got ", score_queries);
  const std::vector<int64_t> cu = checked_offsets(cu_seqlens, T, q, "q");
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cu[b + 1] - cu[b] <= max_seqlen, "max_seqlen: expected >= every sequence length, got ",
                max_seqlen, " < ", cu[b + 1] - cu[b], " (sequence ", b, ")");
  }

  auto out = at::empty({T, H, D}, q.options());
  auto lse = at::empty({T, H}, q.options().dtype(at::kFloat));
  auto scores = at::empty({score_queries >= 0 ? T : 0, Hkv}, q.options().dtype(at::kFloat));
  const int64_t group = H / Hkv;

  // The tiles are multiplied in float: half-precision inputs are converted once (linear memory).
  const at::Tensor qf = q.to(at::kFloat), kf = k.to(at::kFloat), vf = v.to(at::kFloat);
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cu[b + 1] - cu[b];
    for (int64_t lo = 0; lo < n; lo += kQueryBlock) {
      const int64_t hi = std::min(lo + kQueryBlock, n);
      for (int64_t g = 0; g < Hkv; ++g) items.push_back({cu[b], n, lo, hi, g, hi});
    }
  }
  for_each_item(items, [&](const Item& it) { attend(it, qf, kf, vf, group, scale, out, lse); });
  if (score_queries < 0) return {out, lse, scores};

  items.clear();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cu[b + 1] - cu[b], q_first = window_start(n, score_queries);
    for (int64_t lo = 0; lo < n; lo += kKeyBlock) {
      const int64_t hi = std::min(lo + kKeyBlock, n);
      for (int64_t g = 0; g < Hkv; ++g) items.push_back({cu[b], n, lo, hi, g, n - std::max(lo, q_first)});
    }
  }
  for_each_item(items, [&](const Item& it) { column_scores(it, score_queries, qf, kf, lse, group, scale, scores); });
  return {out, lse, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) { m.impl("prefill_attention", &prefill_attention_cpu); }

}  // namespace squeeze
