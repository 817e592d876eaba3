// compress_kv_ on CPU: builds a layer cache from the packed prompt K/V, keeping per
// (sequence, KV head) the tokens that evicting one at a time under the policy would keep.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"
#include "prefill_args.h"

namespace squeeze {
namespace {

using prefill::check_index;
using prefill::check_packed;
using prefill::checked_offsets;

// The kept positions of an n-token prompt, all of them in ascending order: the head
// [head_lo, head_hi), then the `heavy` highest-scoring positions of [head_hi, tail_lo), then
// the tail [tail_lo, n).
struct KeepPlan {
  int64_t head_lo, head_hi, tail_lo, heavy;
};

// Eviction from the full prompt, one token at a time with fixed scores, leaves:
//   window: the newest `budget`;
//   streaming: the sinks, then the newest; with budget < sinks only the newest `budget`
//     sinks (once no non-sink is left the oldest token goes);
//   h2o: the sinks, the R = floor(budget * recent_ratio) newest and the highest-scoring rest;
//     when sinks + recent alone exceed the budget, the oldest non-sinks go first, as in
//     streaming.
KeepPlan keep_plan(int64_t n, int64_t budget, Policy policy, int64_t sinks, double recent_ratio) {
  if (n <= budget || policy == Policy::kWindow) return {0, 0, n - std::min(n, budget), 0};
  const int64_t n_sinks = std::min(sinks, n);
  if (policy == Policy::kH2O) {
    const auto recent = static_cast<int64_t>(std::floor(static_cast<double>(budget) * recent_ratio));
    const int64_t recent_start = std::max(n - recent, n_sinks);
    const int64_t protected_tokens = n_sinks + (n - recent_start);
    if (budget >= protected_tokens) return {0, n_sinks, recent_start, budget - protected_tokens};
  }
  return {n_sinks - std::min(budget, n_sinks), n_sinks, n - std::max<int64_t>(budget - n_sinks, 0), 0};
}

void compress_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& scores,
                     const at::Tensor& cu_seqlens, const at::Tensor& budget, c10::string_view policy_name,
                     int64_t sinks, double recent_ratio, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& lens, const at::Tensor& slot_pos, const at::Tensor& cache_scores) {
  check_packed(k, "k");
  check_packed(v, "v");
  check_same_device(v, k, "v", "k");
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "v: expected dtype ", c10::toString(k.scalar_type()),
              " (that of k), got ", c10::toString(v.scalar_type()));
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected shape ", k.sizes(), " (that of k), got ", v.sizes());
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2);
  const Policy policy = parse_policy(std::string(policy_name));
  TORCH_CHECK(sinks >= 0, "sinks: expected >= 0, got ", sinks);
  TORCH_CHECK(recent_ratio >= 0.0 && recent_ratio <= 1.0, "recent_ratio: expected a value in [0, 1], got ",
              recent_ratio);
  check_rank(scores, 2, "scores");
  check_dtype(scores, at::kFloat, "scores");
  check_same_device(scores, k, "scores", "k");
  TORCH_CHECK(scores.size(1) == Hkv && (scores.size(0) == 0 || scores.size(0) == T), "scores: expected shape (", T,
              ", ", Hkv, ") or (0, ", Hkv, "), got ", scores.sizes());
  TORCH_CHECK(policy != Policy::kH2O || scores.size(0) == T, "scores: policy 'h2o' needs the column scores (", T,
              ", ", Hkv, ") of prefill_attention, got shape ", scores.sizes());
  check_contiguous(scores, "scores");
  const std::vector<int64_t> cu = checked_offsets(cu_seqlens, T, k, "k");
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  check_rank(budget, 1, "budget");
  check_size(budget, 0, B, "budget");
  check_index(budget, k, "budget", "k");
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_rank(*t, 4, name);
    check_dtype(*t, k.scalar_type(), name);
    check_same_device(*t, k, name, "k");
    TORCH_CHECK(t->size(0) == B && t->size(1) == Hkv && t->size(3) == D, name, ": expected shape (", B, ", ", Hkv,
                ", C, ", D, "), got ", t->sizes());
    check_last_contiguous(*t, name);
  }
  const int64_t C = k_cache.size(2);
  check_size(v_cache, 2, C, "v_cache");
  check_rank(lens, 1, "lens");
  check_size(lens, 0, B, "lens");
  check_index(lens, k, "lens", "k");
  check_rank(slot_pos, 3, "slot_pos");
  TORCH_CHECK(slot_pos.sizes() == at::IntArrayRef({B, Hkv, C}), "slot_pos: expected shape (", B, ", ", Hkv, ", ", C,
              "), got ", slot_pos.sizes());
  check_index(slot_pos, k, "slot_pos", "k");
  check_rank(cache_scores, 3, "cache_scores");
  check_dtype(cache_scores, at::kFloat, "cache_scores");
  TORCH_CHECK(cache_scores.sizes() == slot_pos.sizes(), "cache_scores: expected shape (", B, ", ", Hkv, ", ", C,
              "), got ", cache_scores.sizes());
  check_same_device(cache_scores, k, "cache_scores", "k");
  check_contiguous(cache_scores, "cache_scores");
  const int32_t* budget_ptr = budget.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(budget_ptr[b] >= 0 && budget_ptr[b] <= C, "budget: expected values in [0, ", C,
                "] (the cache capacity), got budget[", b, "] = ", budget_ptr[b]);
  }

  const bool has_scores = scores.size(0) > 0;
  const float* score_ptr = has_scores ? scores.data_ptr<float>() : nullptr;
  const auto* k_ptr = static_cast<const char*>(k.data_ptr());
  const auto* v_ptr = static_cast<const char*>(v.data_ptr());
  auto* kc_ptr = static_cast<char*>(k_cache.data_ptr());
  auto* vc_ptr = static_cast<char*>(v_cache.data_ptr());
  int32_t* lens_ptr = lens.data_ptr<int32_t>();
  int32_t* pos_ptr = slot_pos.data_ptr<int32_t>();
  float* cs_ptr = cache_scores.data_ptr<float>();
  const int64_t esize = k.element_size(), row_bytes = D * esize;
  for (int64_t b = 0; b < B; ++b)
    lens_ptr[b] = static_cast<int32_t>(std::min<int64_t>(cu[b + 1] - cu[b], budget_ptr[b]));

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> kept;
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / Hkv, g = bg % Hkv, start = cu[b], n = cu[b + 1] - cu[b];
      const KeepPlan plan = keep_plan(n, budget_ptr[b], policy, sinks, recent_ratio);
      auto score = [&](int64_t pos) { return has_scores ? score_ptr[(start + pos) * Hkv + g] : 0.f; };
      kept.clear();
      for (int64_t p = plan.head_lo; p < plan.head_hi; ++p) kept.push_back(p);
      if (plan.heavy > 0) {
        const auto middle = static_cast<int64_t>(kept.size());
        for (int64_t p = plan.head_hi; p < plan.tail_lo; ++p) kept.push_back(p);
        // The heavy hitters: highest score first, ties to the larger position.
        std::nth_element(kept.begin() + middle, kept.begin() + middle + plan.heavy, kept.end(),
                         [&](int64_t x, int64_t y) { return score(x) > score(y) || (score(x) == score(y) && x > y); });
        kept.resize(middle + plan.heavy);
        std::sort(kept.begin() + middle, kept.end());
      }
      for (int64_t p = plan.tail_lo; p < n; ++p) kept.push_back(p);

      const int64_t cache_row = (b * Hkv + g) * C;
      for (int64_t slot = 0; slot < C; ++slot) {
        const bool used = slot < static_cast<int64_t>(kept.size());
        pos_ptr[cache_row + slot] = used ? static_cast<int32_t>(kept[slot]) : -1;
        cs_ptr[cache_row + slot] = used ? score(kept[slot]) : 0.f;
        if (!used) continue;
        const int64_t t = start + kept[slot];
        std::memcpy(kc_ptr + (b * k_cache.stride(0) + g * k_cache.stride(1) + slot * k_cache.stride(2)) * esize,
                    k_ptr + (t * k.stride(0) + g * k.stride(1)) * esize, row_bytes);
        std::memcpy(vc_ptr + (b * v_cache.stride(0) + g * v_cache.stride(1) + slot * v_cache.stride(2)) * esize,
                    v_ptr + (t * v.stride(0) + g * v.stride(1)) * esize, row_bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) { m.impl("compress_kv_", &compress_kv_cpu); }

}  // namespace squeeze
