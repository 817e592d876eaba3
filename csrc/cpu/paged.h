// The paged KV cache on the CPU: argument checks and per-row kernels shared by compress_kv_,
// decode_attention, cache_append_, cache_evict_ and decode_step_.
//
// Pool: k_pages, v_pages [P, S, D], pos_pages int32 [P, S], score_pages fp32 [P, S]. A row is
// one (sequence, layer, KV head): its block table lists its pages, slot j of the row lives at
// page block_table[j / S], offset j % S, and its capacity is C = M * S (M: the table's width).
// A page id outside [0, P) is no page: its slots read as empty (K and V zero, position -1,
// score 0) and writes to them are dropped (-1 marks the entries a row does not use; other ids
// outside the pool are refused by the value checks). One row is the unit of work everywhere:
// its query heads read its K/V once, and eviction is decided per row. Accumulation is in
// float32 whatever the cache dtype.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"

namespace squeeze::paged {

// ---------------------------------------------------------------------------------------------
// Argument checks (no data read), then value checks (CPU reads lens / budget / pos / pages).
// ---------------------------------------------------------------------------------------------

struct Shape {
  int64_t P, S, D;   // pages, page size, head dim
  int64_t B, Hkv, M;  // sequences, KV heads, table width
  int64_t capacity() const { return M * S; }
};

// k_pages, v_pages [P, S, D] (one float dtype, last dim contiguous); pos_pages int32 [P, S] and
// score_pages fp32 [P, S] when given (undefined: not an argument of the op).
inline Shape check_pool(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_pages,
                        const at::Tensor& score_pages) {
  check_rank(k_pages, 3, "k_pages");
  check_float_kv(k_pages, "k_pages");
  check_last_contiguous(k_pages, "k_pages");
  TORCH_CHECK(v_pages.sizes() == k_pages.sizes(), "v_pages: expected shape ", k_pages.sizes(),
              " (that of k_pages), got ", v_pages.sizes());
  check_dtype(v_pages, k_pages.scalar_type(), "v_pages", " (that of k_pages)");
  check_same_device(v_pages, k_pages, "v_pages", "k_pages");
  check_last_contiguous(v_pages, "v_pages");
  Shape s{k_pages.size(0), k_pages.size(1), k_pages.size(2), 0, 0, 0};
  TORCH_CHECK(s.S > 0, "k_pages: expected a page size > 0, got shape ", k_pages.sizes());
  for (const auto& [t, name, dtype] : {std::tuple{&pos_pages, "pos_pages", at::kInt},
                                       std::tuple{&score_pages, "score_pages", at::kFloat}}) {
    if (!t->defined()) continue;
    check_rank(*t, 2, name);
    TORCH_CHECK(t->size(0) == s.P && t->size(1) == s.S, name, ": expected shape [", s.P, ", ", s.S,
                "] (that of k_pages without D), got ", t->sizes());
    check_dtype(*t, dtype, name);
    check_same_device(*t, k_pages, name, "k_pages");
    check_last_contiguous(*t, name);
  }
  return s;
}

// block_table int32 [B, Hkv, M] (Hkv > 0) and lens int32 [B, Hkv], contiguous, on the pool's device.
inline void check_rows(const at::Tensor& block_table, const at::Tensor& lens, const at::Tensor& k_pages, Shape& s) {
  check_rank(block_table, 3, "block_table");
  check_dtype(block_table, at::kInt, "block_table");
  check_same_device(block_table, k_pages, "block_table", "k_pages");
  check_contiguous(block_table, "block_table");
  s.B = block_table.size(0), s.Hkv = block_table.size(1), s.M = block_table.size(2);
  TORCH_CHECK(s.Hkv > 0, "block_table: expected at least one KV head, got shape ", block_table.sizes());
  check_index(lens, {s.B, s.Hkv}, "lens", k_pages, "k_pages", " (the rows of block_table)");
}

// q [B, H, D] in the pool's dtype, H a positive multiple of Hkv. Returns H.
inline int64_t check_query(const at::Tensor& q, const at::Tensor& k_pages, const Shape& s) {
  check_rank(q, 3, "q");
  TORCH_CHECK(q.size(0) == s.B && q.size(2) == s.D, "q: expected shape [", s.B, ", H, ", s.D,
              "] (the rows of block_table and the head dim of k_pages), got ", q.sizes());
  TORCH_CHECK(q.size(1) > 0 && q.size(1) % s.Hkv == 0, "q: the number of query heads (", q.size(1),
              ") must be a positive multiple of the number of KV heads (", s.Hkv, ")");
  check_dtype(q, k_pages.scalar_type(), "q", " (that of k_pages)");
  check_same_device(q, k_pages, "q", "k_pages");
  check_last_contiguous(q, "q");
  return q.size(1);
}

// k_new, v_new [B, Hkv, D] in the pool's dtype, pos int32 [B].
inline void check_new_token(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& pos,
                            const at::Tensor& k_pages, const Shape& s) {
  for (auto [t, name] : {std::pair{&k_new, "k_new"}, std::pair{&v_new, "v_new"}}) {
    check_rank(*t, 3, name);
    TORCH_CHECK(t->size(0) == s.B && t->size(1) == s.Hkv && t->size(2) == s.D, name, ": expected shape [", s.B,
                ", ", s.Hkv, ", ", s.D, "] (the rows of block_table and the head dim of k_pages), got ", t->sizes());
    check_dtype(*t, k_pages.scalar_type(), name, " (that of k_pages)");
    check_same_device(*t, k_pages, name, "k_pages");
    check_last_contiguous(*t, name);
  }
  check_index(pos, {s.B}, "pos", k_pages, "k_pages", " (the sequences of block_table)");
}

// 0 <= lens <= C (< C when a token is about to be appended).
inline void check_lens_values(const at::Tensor& lens, const Shape& s, bool append) {
  const int32_t* l = lens.data_ptr<int32_t>();
  for (int64_t r = 0; r < s.B * s.Hkv; ++r) {
    const int64_t b = r / s.Hkv, g = r % s.Hkv;
    TORCH_CHECK(l[r] >= 0, "lens: lens[", b, ", ", g, "] = ", l[r], ": expected non-negative lengths");
    TORCH_CHECK(l[r] <= s.capacity(), "lens: lens[", b, ", ", g, "] = ", l[r], ": exceeds the capacity C = ",
                s.capacity(), " of a row (block_table width x page size)");
    TORCH_CHECK(!append || l[r] < s.capacity(), "lens: capacity overflow: row [", b, ", ", g, "] already holds ",
                l[r], " tokens, the capacity C = ", s.capacity(),
                " of a row (block_table width x page size), so no slot is left to append to");
  }
}

// 0 <= budget <= C. (An append needs lens < C, check_lens_values; a row whose budget is C then
// fills up and refuses the next append, which is what a row sized to its horizon wants.)
inline void check_budget_values(const at::Tensor& budget, const Shape& s) {
  const int32_t* p = budget.data_ptr<int32_t>();
  for (int64_t r = 0; r < s.B * s.Hkv; ++r) {
    TORCH_CHECK(p[r] >= 0, "budget: budget[", r / s.Hkv, ", ", r % s.Hkv, "] = ", p[r],
                ": expected non-negative budgets");
    TORCH_CHECK(p[r] <= s.capacity(), "budget: budget[", r / s.Hkv, ", ", r % s.Hkv, "] = ", p[r],
                ": exceeds the capacity C = ", s.capacity(), " of a row (block_table width x page size)");
  }
}

inline void check_pos_values(const at::Tensor& pos) {
  const int32_t* p = pos.data_ptr<int32_t>();
  for (int64_t b = 0; b < pos.size(0); ++b)
    TORCH_CHECK(p[b] >= 0, "pos: expected non-negative token positions, got pos[", b, "] = ", p[b]);
}

// Page ids in [-1, P) (-1: no page), and no page listed twice in the call: by two rows, or by two
// entries of one row (its slots would overlap).
inline void check_block_table_values(const at::Tensor& block_table, const Shape& s) {
  const int32_t* t = block_table.data_ptr<int32_t>();
  std::vector<int64_t> owner(s.P, -1);
  for (int64_t i = 0; i < s.B * s.Hkv * s.M; ++i) {
    const int64_t row = i / s.M;
    TORCH_CHECK(t[i] >= -1 && t[i] < s.P, "block_table: expected page ids in [-1, ", s.P,
                ") (-1: no page), got block_table[", row / s.Hkv, ", ", row % s.Hkv, ", ", i % s.M, "] = ", t[i]);
    if (t[i] < 0) continue;
    TORCH_CHECK(owner[t[i]] < 0, "block_table: page ", t[i], " is listed twice (by rows [", owner[t[i]] / s.Hkv,
                ", ", owner[t[i]] % s.Hkv, "] and [", row / s.Hkv, ", ", row % s.Hkv,
                "], as [sequence, KV head]); a page belongs to one row, at one entry");
    owner[t[i]] = row;
  }
}

// ---------------------------------------------------------------------------------------------
// One row, read and written through its block table.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct Row {
  const int32_t* table;  // M page ids
  int64_t M, S, P, D;
  scalar_t* k;  // the pools, or null when the op does not touch them
  scalar_t* v;
  int32_t* pos;
  float* score;
  int64_t k_page, k_slot, v_page, v_slot, pos_page, pos_slot, score_page, score_slot;  // strides

  Row(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_pages,
      const at::Tensor& score_pages, const at::Tensor& block_table, int64_t b, int64_t g)
      : table(block_table.data_ptr<int32_t>() + (b * block_table.size(1) + g) * block_table.size(2)),
        M(block_table.size(2)), S(k_pages.size(1)), P(k_pages.size(0)), D(k_pages.size(2)),
        k(k_pages.data_ptr<scalar_t>()), v(v_pages.data_ptr<scalar_t>()),
        pos(pos_pages.defined() ? pos_pages.data_ptr<int32_t>() : nullptr),
        score(score_pages.defined() ? score_pages.data_ptr<float>() : nullptr),
        k_page(k_pages.stride(0)), k_slot(k_pages.stride(1)), v_page(v_pages.stride(0)), v_slot(v_pages.stride(1)),
        pos_page(pos_pages.defined() ? pos_pages.stride(0) : 0), pos_slot(pos_pages.defined() ? pos_pages.stride(1) : 0),
        score_page(score_pages.defined() ? score_pages.stride(0) : 0),
        score_slot(score_pages.defined() ? score_pages.stride(1) : 0) {}

  int64_t capacity() const { return M * S; }

  // The page of slot j, or -1 for no page (an id outside the pool).
  int64_t page(int64_t j) const {
    const int64_t p = table[j / S];
    return p >= 0 && p < P ? p : -1;
  }
  const scalar_t* k_at(int64_t j) const {  // null: no page
    const int64_t p = page(j);
    return p < 0 ? nullptr : k + p * k_page + (j % S) * k_slot;
  }
  const scalar_t* v_at(int64_t j) const {
    const int64_t p = page(j);
    return p < 0 ? nullptr : v + p * v_page + (j % S) * v_slot;
  }
  int32_t pos_at(int64_t j) const {
    const int64_t p = page(j);
    return p < 0 ? -1 : pos[p * pos_page + (j % S) * pos_slot];
  }
  float score_at(int64_t j) const {
    const int64_t p = page(j);
    return p < 0 ? 0.0f : score[p * score_page + (j % S) * score_slot];
  }
  void set_kv(int64_t j, const scalar_t* k_row, const scalar_t* v_row) const {
    const int64_t p = page(j);
    if (p < 0) return;
    std::copy(k_row, k_row + D, k + p * k_page + (j % S) * k_slot);
    std::copy(v_row, v_row + D, v + p * v_page + (j % S) * v_slot);
  }
  void set_pos(int64_t j, int32_t value) const {
    const int64_t p = page(j);
    if (p >= 0) pos[p * pos_page + (j % S) * pos_slot] = value;
  }
  void set_score(int64_t j, float value) const {
    const int64_t p = page(j);
    if (p >= 0) score[p * score_page + (j % S) * score_slot] = value;
  }
  // Slot src's K, V, position and score into slot dst, as they read (zeros from no page).
  void move(int64_t src, int64_t dst) const {
    const int64_t p = page(dst);
    if (p < 0) return;
    const scalar_t* ks = k_at(src);
    const scalar_t* vs = v_at(src);
    scalar_t* kd = k + p * k_page + (dst % S) * k_slot;
    scalar_t* vd = v + p * v_page + (dst % S) * v_slot;
    if (ks) std::copy(ks, ks + D, kd); else std::fill(kd, kd + D, scalar_t(0));
    if (vs) std::copy(vs, vs + D, vd); else std::fill(vd, vd + D, scalar_t(0));
    set_pos(dst, pos_at(src));
    set_score(dst, score_at(src));
  }
};

// ---------------------------------------------------------------------------------------------
// Kernels on one row.
// ---------------------------------------------------------------------------------------------

// The G query heads q[0..G) (row stride q_stride) of one KV head attend over the row's first n
// slots and, when k_new is given, the new token (k_new / v_new, from the inputs): out[g] =
// softmax(scale * q[g] . k_j) v_j. With `scores`, adds the probabilities summed over the G heads
// to each cached slot's score and returns the new token's share (0 without k_new). n + new = 0
// gives zeros. `work` is scratch, resized here.
template <typename scalar_t>
inline float attend_group(const Row<scalar_t>& row, int64_t n, const scalar_t* k_new, const scalar_t* v_new,
                          const scalar_t* q, int64_t q_stride, scalar_t* out, int64_t out_stride, int64_t G,
                          float scale, bool scores, std::vector<float>& work) {
  const int64_t D = row.D, m = n + (k_new ? 1 : 0);
  work.resize(G * (m + 2 * D) + D);
  float* p = work.data();            // [G, m] logits, then probabilities
  float* acc = p + G * m;            // [G, D] output accumulators
  float* qf = acc + G * D;           // [G, D] query heads, pre-scaled, in float32
  float* kv = qf + G * D;            // one K or V row in float32
  auto load = [&](const scalar_t* src) {
    for (int64_t d = 0; d < D; ++d) kv[d] = src ? static_cast<float>(src[d]) : 0.0f;
  };
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = scale * static_cast<float>(q[g * q_stride + d]);
  for (int64_t j = 0; j < m; ++j) {  // each K row is read once for the whole group
    load(j < n ? row.k_at(j) : k_new);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * kv[d];
      p[g * m + j] = dot;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * m;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < m; ++j) mx = std::max(mx, pg[j]);
    float sum = 0.0f;
    for (int64_t j = 0; j < m; ++j) sum += (pg[j] = std::exp(pg[j] - mx));
    for (int64_t j = 0; j < m; ++j) pg[j] /= sum;
  }
  std::fill(acc, acc + G * D, 0.0f);
  float new_mass = 0.0f;
  for (int64_t j = 0; j < m; ++j) {
    load(j < n ? row.v_at(j) : v_new);
    float mass = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      const float pj = p[g * m + j];
      mass += pj;
      float* a = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += pj * kv[d];
    }
    if (!scores) continue;
    if (j < n) row.set_score(j, row.score_at(j) + mass); else new_mass = mass;
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * out_stride + d] = static_cast<scalar_t>(acc[g * D + d]);
  return new_mass;
}

// H2O's recent window for a budget: floor(budget * recent_ratio), in double precision (as in every
// implementation, so all of them protect the same tokens).
inline int64_t recent_count(int64_t budget, double recent_ratio) {
  return static_cast<int64_t>(std::floor(static_cast<double>(budget) * recent_ratio));
}

// The eviction victim among the first n slots (the one rule of the library, docs/METHOD.md#eviction):
//   window: the smallest position; streaming: the smallest position >= sinks;
//   h2o: among slots neither sink (position < sinks) nor recent (position > max position - recent),
//        the lowest score (NaN counts as -inf), ties -> the smallest position.
// If no slot qualifies: the smallest position >= sinks, else the smallest position. Identical keys
// resolve to the first slot.
template <typename scalar_t>
inline int64_t find_victim(const Row<scalar_t>& row, int64_t n, Policy policy, int64_t sinks, int64_t recent) {
  int64_t newest = std::numeric_limits<int64_t>::min();
  if (policy == Policy::kH2O)
    for (int64_t j = 0; j < n; ++j) newest = std::max<int64_t>(newest, row.pos_at(j));
  // Lexicographic key (tier, score, position): tier 0 = a regular candidate, 1 = first fallback,
  // 2 = last fallback. The score only orders h2o's regular candidates.
  int64_t victim = 0, best_tier = 3, best_pos = 0;
  float best_score = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = row.pos_at(j);
    int64_t tier = 0;
    if (policy == Policy::kStreaming) tier = p < sinks ? 1 : 0;
    if (policy == Policy::kH2O) tier = p < sinks ? 2 : (p > newest - recent ? 1 : 0);
    const float score = (policy == Policy::kH2O && tier == 0) ? score_key(row.score_at(j)) : 0.0f;
    const bool better = tier != best_tier ? tier < best_tier
                        : score != best_score ? score < best_score
                                              : p < best_pos;
    if (better) victim = j, best_tier = tier, best_score = score, best_pos = p;
  }
  return victim;
}

// Evicts from a row holding n tokens until it holds `keep`: each round moves the last slot into
// the victim's slot and frees the last one (position -1, score 0). Returns min(n, keep).
template <typename scalar_t>
inline int64_t evict_row(const Row<scalar_t>& row, int64_t n, int64_t keep, Policy policy, int64_t sinks,
                         double recent_ratio) {
  const int64_t recent = recent_count(keep, recent_ratio);
  for (; n > keep; --n) {
    const int64_t victim = find_victim(row, n, policy, sinks, recent), last = n - 1;
    if (victim != last) row.move(last, victim);
    row.set_pos(last, -1);
    row.set_score(last, 0.0f);
  }
  return n;
}

// Runs fn(b, g) for every row, in parallel once there is enough work: a decode step of a small
// model is microseconds of work per layer, less than waking the thread pool. `cost` estimates
// the elements one row touches.
template <typename Fn>
inline void for_each_row(int64_t B, int64_t Hkv, int64_t cost, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cost, 1));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i / Hkv, i % Hkv);
  });
}

}  // namespace squeeze::paged
