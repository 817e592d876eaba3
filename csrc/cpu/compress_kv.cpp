// compress_kv_ on CPU: builds one layer's rows of the paged cache from the packed prompt K/V,
// keeping per (sequence, KV head) the tokens that evicting one at a time under the policy would
// keep, written through the rows' block tables.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "checks.h"
#include "paged.h"

namespace squeeze {
namespace {

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

// The selection scores of one (sequence, KV head): its column scores pooled over pool_size
// neighbouring positions inside the sequence (SnapKV), max or mean; NaN counts as -inf.
void pooled(const float* col, int64_t stride, int64_t n, int64_t pool_size, bool pool_max, std::vector<float>& out) {
  out.resize(n);
  const int64_t r = pool_size / 2;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t lo = std::max<int64_t>(j - r, 0), hi = std::min<int64_t>(j + r + 1, n);
    double acc = pool_max ? -std::numeric_limits<double>::infinity() : 0.0;
    for (int64_t i = lo; i < hi; ++i) {
      const double x = score_key(col[i * stride]);
      acc = pool_max ? std::max(acc, x) : acc + x;
    }
    out[j] = static_cast<float>(pool_max ? acc : acc / static_cast<double>(hi - lo));
  }
}

void compress_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& scores,
                     const at::Tensor& cu_seqlens, const at::Tensor& budget, c10::string_view policy_name,
                     int64_t sinks, double recent_ratio, int64_t pool_size, c10::string_view pool_mode,
                     const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_pages,
                     const at::Tensor& score_pages, const at::Tensor& block_table, const at::Tensor& lens) {
  check_packed(k, "k");
  check_packed(v, "v");
  check_same_device(v, k, "v", "k");
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "v: expected dtype ", c10::toString(k.scalar_type()),
              " (that of k), got ", c10::toString(v.scalar_type()));
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected shape ", k.sizes(), " (that of k), got ", v.sizes());
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2);
  const Policy policy = check_policy_args(std::string(policy_name), sinks, recent_ratio);
  TORCH_CHECK(pool_size >= 1 && pool_size % 2 == 1, "pool_size: expected an odd number of positions >= 1 (1: no "
              "pooling), got ", pool_size);
  TORCH_CHECK(pool_mode == "max" || pool_mode == "avg", "pool_mode: expected one of ('max', 'avg'), got '",
              std::string(pool_mode), "'");
  check_rank(scores, 2, "scores");
  check_dtype(scores, at::kFloat, "scores");
  check_same_device(scores, k, "scores", "k");
  TORCH_CHECK(scores.size(1) == Hkv && (scores.size(0) == 0 || scores.size(0) == T), "scores: expected shape (", T,
              ", ", Hkv, ") or (0, ", Hkv, "), got ", scores.sizes());
  TORCH_CHECK(policy != Policy::kH2O || scores.size(0) == T, "scores: policy 'h2o' needs the column scores (", T,
              ", ", Hkv, ") of prefill_attention, got shape ", scores.sizes());
  check_contiguous(scores, "scores");
  check_rank(cu_seqlens, 1, "cu_seqlens");
  TORCH_CHECK(cu_seqlens.size(0) >= 1, "cu_seqlens: expected B + 1 >= 1 entries, got 0");
  const int64_t B = cu_seqlens.size(0) - 1;
  check_dtype(k_pages, k.scalar_type(), "k_pages", " (that of k)");
  check_same_device(k_pages, k, "k_pages", "k");
  paged::Shape s = paged::check_pool(k_pages, v_pages, pos_pages, score_pages);
  TORCH_CHECK(s.D == D, "k_pages: expected head dim ", D, " (that of k), got shape ", k_pages.sizes());
  TORCH_CHECK(block_table.dim() == 3 && block_table.size(0) == B && block_table.size(1) == Hkv,
              "block_table: expected shape (", B, ", ", Hkv, ", M) (the sequences of cu_seqlens and the KV heads of k), "
              "got ", block_table.sizes());
  paged::check_rows(block_table, lens, k_pages, s);
  check_index(budget, {B, Hkv}, "budget", k, "k", " (the sequences of cu_seqlens and the KV heads of k)");
  check_written({{&k_pages, "k_pages"}, {&v_pages, "v_pages"}, {&pos_pages, "pos_pages"},
                 {&score_pages, "score_pages"}, {&lens, "lens"}},
                {{&k, "k"}, {&v, "v"}, {&scores, "scores"}, {&cu_seqlens, "cu_seqlens"}, {&budget, "budget"},
                 {&block_table, "block_table"}});
  const std::vector<int64_t> cu = checked_offsets(cu_seqlens, T, k, "k");
  paged::check_budget_values(budget, s);
  paged::check_block_table_values(block_table, s);

  const bool has_scores = scores.size(0) > 0, pool_max = pool_mode == "max";
  const float* score_ptr = has_scores ? scores.data_ptr<float>() : nullptr;
  const int32_t* budget_ptr = budget.data_ptr<int32_t>();
  int32_t* lens_ptr = lens.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "compress_kv_cpu", [&] {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> kept;
      std::vector<float> key;
      for (int64_t bg = begin; bg < end; ++bg) {
        const int64_t b = bg / Hkv, g = bg % Hkv, start = cu[b], n = cu[b + 1] - cu[b];
        const paged::Row<scalar_t> row(k_pages, v_pages, pos_pages, score_pages, block_table, b, g);
        const KeepPlan plan = keep_plan(n, budget_ptr[bg], policy, sinks, recent_ratio);
        if (has_scores) pooled(score_ptr + start * Hkv + g, Hkv, n, pool_size, pool_max, key);
        auto score = [&](int64_t p) { return has_scores ? key[p] : 0.f; };
        kept.clear();
        for (int64_t p = plan.head_lo; p < plan.head_hi; ++p) kept.push_back(p);
        if (plan.heavy > 0) {
          const auto middle = static_cast<int64_t>(kept.size());
          for (int64_t p = plan.head_hi; p < plan.tail_lo; ++p) kept.push_back(p);
          // The heavy hitters: highest (pooled) score first, ties to the larger position.
          std::nth_element(kept.begin() + middle, kept.begin() + middle + plan.heavy, kept.end(),
                           [&](int64_t x, int64_t y) { return score(x) > score(y) || (score(x) == score(y) && x > y); });
          kept.resize(middle + plan.heavy);
          std::sort(kept.begin() + middle, kept.end());
        }
        for (int64_t p = plan.tail_lo; p < n; ++p) kept.push_back(p);

        const auto num_kept = static_cast<int64_t>(kept.size());
        for (int64_t slot = 0; slot < row.capacity(); ++slot) {
          if (slot >= num_kept) {
            row.set_pos(slot, -1);
            row.set_score(slot, 0.f);
            continue;
          }
          const int64_t t = start + kept[slot];
          row.set_kv(slot, k.data_ptr<scalar_t>() + t * k.stride(0) + g * k.stride(1),
                     v.data_ptr<scalar_t>() + t * v.stride(0) + g * v.stride(1));
          row.set_pos(slot, static_cast<int32_t>(kept[slot]));
          row.set_score(slot, score(kept[slot]));
        }
        lens_ptr[bg] = static_cast<int32_t>(num_kept);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) { m.impl("compress_kv_", &compress_kv_cpu); }

}  // namespace squeeze
