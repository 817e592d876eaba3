// The decode path on the CPU: argument checks and per-(sequence, KV head) kernels shared by
// decode_attention, cache_append_, cache_evict_ and decode_step_. One (sequence, KV head) pair is
// the unit of work everywhere: its query heads read its K/V rows once, and eviction is decided per
// KV head. Accumulation is in float32 whatever the cache dtype.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"

namespace squeeze::decode {

// ---------------------------------------------------------------------------------------------
// Argument checks (no data read), then value checks (CPU reads lens / budget / pos).
// ---------------------------------------------------------------------------------------------

struct CacheShape {
  int64_t B, Hkv, C, D;
};

// k_cache, v_cache [B, Hkv, C, D] (last dim contiguous), lens int32 [B].
inline CacheShape check_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lens) {
  check_rank(k_cache, 4, "k_cache");
  check_float_kv(k_cache, "k_cache");
  check_last_contiguous(k_cache, "k_cache");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache: expected shape ", k_cache.sizes(),
              " (that of k_cache), got ", v_cache.sizes());
  check_dtype(v_cache, k_cache.scalar_type(), "v_cache");
  check_same_device(v_cache, k_cache, "v_cache", "k_cache");
  check_last_contiguous(v_cache, "v_cache");
  CacheShape s{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3)};
  check_rank(lens, 1, "lens");
  check_size(lens, 0, s.B, "lens");
  check_dtype(lens, at::kInt, "lens");
  check_same_device(lens, k_cache, "lens", "k_cache");
  check_contiguous(lens, "lens");
  return s;
}

// A per-slot tensor ([B, Hkv, C], last dim contiguous): slot_pos (int32) or scores (float32).
inline void check_slot_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                              const at::Tensor& k_cache, const CacheShape& s) {
  check_rank(t, 3, name);
  TORCH_CHECK(t.size(0) == s.B && t.size(1) == s.Hkv && t.size(2) == s.C, name, ": expected shape [", s.B,
              ", ", s.Hkv, ", ", s.C, "] (that of k_cache without D), got ", t.sizes());
  check_dtype(t, dtype, name);
  check_same_device(t, k_cache, name, "k_cache");
  check_last_contiguous(t, name);
}

inline void check_slots(const at::Tensor& slot_pos, const at::Tensor& scores, const at::Tensor& k_cache,
                        const CacheShape& s) {
  check_slot_tensor(slot_pos, "slot_pos", at::kInt, k_cache, s);
  check_slot_tensor(scores, "scores", at::kFloat, k_cache, s);
}

// q [B, H, D] in the cache dtype, H a multiple of Hkv. Returns H.
inline int64_t check_query(const at::Tensor& q, const at::Tensor& k_cache, const CacheShape& s) {
  check_rank(q, 3, "q");
  TORCH_CHECK(q.size(0) == s.B && q.size(2) == s.D, "q: expected shape [", s.B, ", H, ", s.D,
              "] (batch and head dim of k_cache), got ", q.sizes());
  TORCH_CHECK(q.size(1) > 0 && q.size(1) % s.Hkv == 0, "q: the number of query heads (", q.size(1),
              ") must be a positive multiple of the number of KV heads (", s.Hkv, ")");
  check_dtype(q, k_cache.scalar_type(), "q");
  check_same_device(q, k_cache, "q", "k_cache");
  check_last_contiguous(q, "q");
  return q.size(1);
}

// k_new, v_new [B, Hkv, D] in the cache dtype, pos int32 [B].
inline void check_new_token(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& pos,
                            const at::Tensor& k_cache, const CacheShape& s) {
  for (auto [t, name] : {std::pair{&k_new, "k_new"}, std::pair{&v_new, "v_new"}}) {
    check_rank(*t, 3, name);
    TORCH_CHECK(t->size(0) == s.B && t->size(1) == s.Hkv && t->size(2) == s.D, name, ": expected shape [",
                s.B, ", ", s.Hkv, ", ", s.D, "], got ", t->sizes());
    check_dtype(*t, k_cache.scalar_type(), name);
    check_same_device(*t, k_cache, name, "k_cache");
    check_last_contiguous(*t, name);
  }
  check_rank(pos, 1, "pos");
  check_size(pos, 0, s.B, "pos");
  check_dtype(pos, at::kInt, "pos");
  check_same_device(pos, k_cache, "pos", "k_cache");
  check_contiguous(pos, "pos");
}

// budget int32 [B], policy name, sinks >= 0, recent_ratio in [0, 1].
inline Policy check_policy_args(const at::Tensor& budget, const std::string& policy, int64_t sinks,
                                double recent_ratio, const at::Tensor& k_cache, const CacheShape& s) {
  check_rank(budget, 1, "budget");
  check_size(budget, 0, s.B, "budget");
  check_dtype(budget, at::kInt, "budget");
  check_same_device(budget, k_cache, "budget", "k_cache");
  check_contiguous(budget, "budget");
  TORCH_CHECK(sinks >= 0, "sinks: expected a non-negative number of sink tokens, got ", sinks);
  TORCH_CHECK(recent_ratio >= 0.0 && recent_ratio <= 1.0, "recent_ratio: expected a value in [0, 1], got ",
              recent_ratio);
  return parse_policy(policy);
}

// 0 <= lens[b] <= C, or <= C - 1 when a token is about to be appended.
inline void check_lens_values(const at::Tensor& lens, int64_t C, bool append) {
  const int32_t* l = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < lens.size(0); ++b) {
    TORCH_CHECK(l[b] >= 0, "lens: expected non-negative lengths, got lens[", b, "] = ", l[b]);
    TORCH_CHECK(l[b] <= C, "lens: lens[", b, "] = ", l[b], " exceeds the cache capacity C = ", C);
    TORCH_CHECK(!append || l[b] < C, "lens: capacity overflow: sequence ", b, " already holds ", l[b],
                " tokens, the capacity C of k_cache, so no slot is left to append to");
  }
}

// 0 <= budget[b] <= C, or <= C - 1 for decode_step_ (the appended token needs a slot first).
inline void check_budget_values(const at::Tensor& budget, int64_t C, bool append) {
  const int32_t* p = budget.data_ptr<int32_t>();
  const int64_t max_budget = append ? C - 1 : C;
  for (int64_t b = 0; b < budget.size(0); ++b) {
    TORCH_CHECK(p[b] >= 0, "budget: expected non-negative budgets, got budget[", b, "] = ", p[b]);
    TORCH_CHECK(p[b] <= max_budget, "budget: budget[", b, "] = ", p[b], " exceeds the capacity C = ", C,
                append ? " minus the slot of the appended token (decode_step_ needs C >= budget + 1)" : "");
  }
}

inline void check_pos_values(const at::Tensor& pos) {
  const int32_t* p = pos.data_ptr<int32_t>();
  for (int64_t b = 0; b < pos.size(0); ++b)
    TORCH_CHECK(p[b] >= 0, "pos: expected non-negative token positions, got pos[", b, "] = ", p[b]);
}

// ---------------------------------------------------------------------------------------------
// Kernels on one (sequence, KV head).
// ---------------------------------------------------------------------------------------------

// The C slots of one (sequence, KV head): K/V rows and their slot_pos / scores entries.
template <typename scalar_t>
struct HeadSlots {
  scalar_t* k;
  scalar_t* v;
  int32_t* pos;
  float* score;
  int64_t k_stride, v_stride, pos_stride, score_stride;  // between consecutive slots
  int64_t D;

  // slot_pos / scores may be undefined tensors when the caller never touches them.
  HeadSlots(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_pos,
            const at::Tensor& scores, int64_t b, int64_t h)
      : k(k_cache.data_ptr<scalar_t>() + b * k_cache.stride(0) + h * k_cache.stride(1)),
        v(v_cache.data_ptr<scalar_t>() + b * v_cache.stride(0) + h * v_cache.stride(1)),
        pos(slot_pos.defined() ? slot_pos.data_ptr<int32_t>() + b * slot_pos.stride(0) + h * slot_pos.stride(1)
                               : nullptr),
        score(scores.defined() ? scores.data_ptr<float>() + b * scores.stride(0) + h * scores.stride(1) : nullptr),
        k_stride(k_cache.stride(2)),
        v_stride(v_cache.stride(2)),
        pos_stride(slot_pos.defined() ? slot_pos.stride(2) : 0),
        score_stride(scores.defined() ? scores.stride(2) : 0),
        D(k_cache.size(3)) {}

  int32_t& pos_at(int64_t j) const { return pos[j * pos_stride]; }
  float& score_at(int64_t j) const { return score[j * score_stride]; }
};

// Write one token into slot `slot`: K/V rows, its position, score 0.
template <typename scalar_t>
inline void append_token(const HeadSlots<scalar_t>& s, int64_t slot, const scalar_t* k_new,
                         const scalar_t* v_new, int32_t position) {
  std::copy(k_new, k_new + s.D, s.k + slot * s.k_stride);
  std::copy(v_new, v_new + s.D, s.v + slot * s.v_stride);
  s.pos_at(slot) = position;
  s.score_at(slot) = 0.0f;
}

// The G query heads q[0..G) (row stride q_stride) of one KV head attend over its first n slots:
// out[g] = softmax(scale * q[g] . k_j) v_j. With `scores`, adds the probabilities summed over the G
// heads to each slot's score. n = 0 gives zeros. `work` is scratch, resized here.
template <typename scalar_t>
inline void attend_group(const HeadSlots<scalar_t>& s, int64_t n, const scalar_t* q, int64_t q_stride,
                         scalar_t* out, int64_t out_stride, int64_t G, float scale, bool scores,
                         std::vector<float>& work) {
  const int64_t D = s.D;
  work.resize(G * (n + 2 * D) + D);
  float* p = work.data();            // [G, n] logits, then probabilities
  float* acc = p + G * n;            // [G, D] output accumulators
  float* qf = acc + G * D;           // [G, D] query heads, pre-scaled, in float32
  float* row = qf + G * D;           // one K or V row in float32
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = scale * static_cast<float>(q[g * q_stride + d]);
  for (int64_t j = 0; j < n; ++j) {  // each K row is read once for the whole group
    const scalar_t* k = s.k + j * s.k_stride;
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(k[d]);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * row[d];
      p[g * n + j] = dot;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, pg[j]);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += (pg[j] = std::exp(pg[j] - m));
    for (int64_t j = 0; j < n; ++j) pg[j] /= sum;
  }
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* v = s.v + j * s.v_stride;
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(v[d]);
    float mass = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      const float pj = p[g * n + j];
      mass += pj;
      float* a = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += pj * row[d];
    }
    if (scores) s.score_at(j) += mass;
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * out_stride + d] = static_cast<scalar_t>(acc[g * D + d]);
}

// H2O's recent window for a budget: floor(budget * recent_ratio), in double precision (as in every
// implementation, so all of them protect the same tokens).
inline int64_t recent_count(int64_t budget, double recent_ratio) {
  return static_cast<int64_t>(std::floor(static_cast<double>(budget) * recent_ratio));
}

// The eviction victim among the first n slots (the one rule of the library, see README):
//   window: the smallest position; streaming: the smallest position >= sinks;
//   h2o: among slots neither sink (position < sinks) nor recent (position > max position - recent),
//        the lowest score, ties -> the smallest position.
// If no slot qualifies: the smallest position >= sinks, else the smallest position. Identical keys
// (which valid caches never hold) resolve to the first slot.
template <typename scalar_t>
inline int64_t find_victim(const HeadSlots<scalar_t>& s, int64_t n, Policy policy, int64_t sinks,
                           int64_t recent) {
  int64_t newest = std::numeric_limits<int64_t>::min();
  if (policy == Policy::kH2O)
    for (int64_t j = 0; j < n; ++j) newest = std::max<int64_t>(newest, s.pos_at(j));
  // Lexicographic key (tier, score, position): tier 0 = a regular candidate, 1 = first fallback,
  // 2 = last fallback. The score only orders h2o's regular candidates.
  int64_t victim = 0, best_tier = 3, best_pos = 0;
  float best_score = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = s.pos_at(j);
    int64_t tier = 0;
    if (policy == Policy::kStreaming) tier = p < sinks ? 1 : 0;
    if (policy == Policy::kH2O) tier = p < sinks ? 2 : (p > newest - recent ? 1 : 0);
    const float score = (policy == Policy::kH2O && tier == 0) ? s.score_at(j) : 0.0f;
    const bool better = tier != best_tier ? tier < best_tier
                        : score != best_score ? score < best_score
                                              : p < best_pos;
    if (better) victim = j, best_tier = tier, best_score = score, best_pos = p;
  }
  return victim;
}

// Evicts from one (sequence, KV head) holding n tokens until it holds `keep`: each round moves the
// last valid slot into the victim's slot and frees the last one (slot_pos -1, score 0).
template <typename scalar_t>
inline void evict_head(const HeadSlots<scalar_t>& s, int64_t n, int64_t keep, Policy policy, int64_t sinks,
                       int64_t recent) {
  for (; n > keep; --n) {
    const int64_t victim = find_victim(s, n, policy, sinks, recent), last = n - 1;
    if (victim != last) {
      std::copy(s.k + last * s.k_stride, s.k + last * s.k_stride + s.D, s.k + victim * s.k_stride);
      std::copy(s.v + last * s.v_stride, s.v + last * s.v_stride + s.D, s.v + victim * s.v_stride);
      s.pos_at(victim) = s.pos_at(last);
      s.score_at(victim) = s.score_at(last);
    }
    s.pos_at(last) = -1;
    s.score_at(last) = 0.0f;
  }
}

// Runs fn(b, h) for every (sequence, KV head), in parallel once there is enough work: a decode
// step of a small model is microseconds of work per layer, less than waking the thread pool.
// `cost` estimates the elements one pair touches.
template <typename Fn>
inline void for_each_head(int64_t B, int64_t Hkv, int64_t cost, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cost, 1));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i / Hkv, i % Hkv);
  });
}

}  // namespace squeeze::decode
