// cache_append_ and cache_evict_ on the CPU, in parallel over rows (each row owns its lens entry).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "paged.h"

namespace squeeze {
namespace {

paged::Shape check_cache(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_pages,
                         const at::Tensor& score_pages, const at::Tensor& block_table, const at::Tensor& lens) {
  paged::Shape s = paged::check_pool(k_pages, v_pages, pos_pages, score_pages);
  paged::check_rows(block_table, lens, k_pages, s);
  return s;
}

void cache_append_cpu(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_pages,
                      const at::Tensor& score_pages, const at::Tensor& block_table, const at::Tensor& lens,
                      const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& pos) {
  const paged::Shape s = check_cache(k_pages, v_pages, pos_pages, score_pages, block_table, lens);
  paged::check_new_token(k_new, v_new, pos, k_pages, s);
  check_written({{&k_pages, "k_pages"}, {&v_pages, "v_pages"}, {&pos_pages, "pos_pages"},
                 {&score_pages, "score_pages"}, {&lens, "lens"}},
                {{&block_table, "block_table"}, {&k_new, "k_new"}, {&v_new, "v_new"}, {&pos, "pos"}});
  paged::check_lens_values(lens, s, /*append=*/true);
  paged::check_pos_values(pos);
  paged::check_block_table_values(block_table, s);

  int32_t* n = lens.data_ptr<int32_t>();
  const int32_t* p = pos.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_pages.scalar_type(), "cache_append_cpu", [&] {
    paged::for_each_row(s.B, s.Hkv, 2 * s.D, [&](int64_t b, int64_t g) {
      const int64_t r = b * s.Hkv + g;
      const paged::Row<scalar_t> row(k_pages, v_pages, pos_pages, score_pages, block_table, b, g);
      row.set_kv(n[r], k_new.data_ptr<scalar_t>() + b * k_new.stride(0) + g * k_new.stride(1),
                 v_new.data_ptr<scalar_t>() + b * v_new.stride(0) + g * v_new.stride(1));
      row.set_pos(n[r], p[b]);
      row.set_score(n[r], 0.0f);
      n[r] += 1;
    });
  });
}

void cache_evict_cpu(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_pages,
                     const at::Tensor& score_pages, const at::Tensor& block_table, const at::Tensor& lens,
                     const at::Tensor& budget, c10::string_view policy, int64_t sinks, double recent_ratio) {
  const paged::Shape s = check_cache(k_pages, v_pages, pos_pages, score_pages, block_table, lens);
  check_index(budget, {s.B, s.Hkv}, "budget", k_pages, "k_pages", " (the rows of block_table)");
  const Policy rule = check_policy_args(std::string(policy), sinks, recent_ratio);
  check_written({{&k_pages, "k_pages"}, {&v_pages, "v_pages"}, {&pos_pages, "pos_pages"},
                 {&score_pages, "score_pages"}, {&lens, "lens"}},
                {{&block_table, "block_table"}, {&budget, "budget"}});
  paged::check_lens_values(lens, s, /*append=*/false);
  paged::check_budget_values(budget, s);
  paged::check_block_table_values(block_table, s);

  int32_t* n = lens.data_ptr<int32_t>();
  const int32_t* keep = budget.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_pages.scalar_type(), "cache_evict_cpu", [&] {
    paged::for_each_row(s.B, s.Hkv, 2 * s.capacity(), [&](int64_t b, int64_t g) {
      const int64_t r = b * s.Hkv + g;
      const paged::Row<scalar_t> row(k_pages, v_pages, pos_pages, score_pages, block_table, b, g);
      n[r] = static_cast<int32_t>(paged::evict_row(row, n[r], keep[r], rule, sinks, recent_ratio));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) {
  m.impl("cache_append_", &cache_append_cpu);
  m.impl("cache_evict_", &cache_evict_cpu);
}

}  // namespace squeeze
