// decode_step_ on the CPU: attention over the cached slots and the new token (+ H2O scores), the
// append of the new token and the eviction of one layer, composed per row in one parallel pass
// from the same pieces as the separate ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "paged.h"

namespace squeeze {
namespace {

at::Tensor decode_step_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                           const at::Tensor& pos, const at::Tensor& k_pages, const at::Tensor& v_pages,
                           const at::Tensor& pos_pages, const at::Tensor& score_pages, const at::Tensor& block_table,
                           const at::Tensor& lens, const at::Tensor& budget, double scale, c10::string_view policy,
                           int64_t sinks, double recent_ratio, bool accumulate_scores) {
  paged::Shape s = paged::check_pool(k_pages, v_pages, pos_pages, score_pages);
  paged::check_rows(block_table, lens, k_pages, s);
  const int64_t H = paged::check_query(q, k_pages, s);
  paged::check_new_token(k_new, v_new, pos, k_pages, s);
  check_index(budget, {s.B, s.Hkv}, "budget", k_pages, "k_pages", " (the rows of block_table)");
  check_scale(scale);
  const Policy rule = check_policy_args(std::string(policy), sinks, recent_ratio);
  check_written({{&k_pages, "k_pages"}, {&v_pages, "v_pages"}, {&pos_pages, "pos_pages"},
                 {&score_pages, "score_pages"}, {&lens, "lens"}},
                {{&q, "q"}, {&block_table, "block_table"}, {&budget, "budget"}, {&k_new, "k_new"},
                 {&v_new, "v_new"}, {&pos, "pos"}});
  paged::check_lens_values(lens, s, /*append=*/true);
  paged::check_budget_values(budget, s);
  paged::check_pos_values(pos);
  paged::check_block_table_values(block_table, s);

  at::Tensor out = at::empty({s.B, H, s.D}, q.options());
  const int64_t G = H / s.Hkv;
  int32_t* n = lens.data_ptr<int32_t>();
  const int32_t* p = pos.data_ptr<int32_t>();
  const int32_t* keep = budget.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_pages.scalar_type(), "decode_step_cpu", [&] {
    paged::for_each_row(s.B, s.Hkv, s.capacity() * s.D * (G + 1), [&](int64_t b, int64_t g) {
      thread_local std::vector<float> work;
      const int64_t r = b * s.Hkv + g;
      const paged::Row<scalar_t> row(k_pages, v_pages, pos_pages, score_pages, block_table, b, g);
      const scalar_t* kn = k_new.data_ptr<scalar_t>() + b * k_new.stride(0) + g * k_new.stride(1);
      const scalar_t* vn = v_new.data_ptr<scalar_t>() + b * v_new.stride(0) + g * v_new.stride(1);
      const scalar_t* qg = q.data_ptr<scalar_t>() + b * q.stride(0) + g * G * q.stride(1);
      scalar_t* og = out.data_ptr<scalar_t>() + b * out.stride(0) + g * G * out.stride(1);
      const float mass = paged::attend_group(row, n[r], kn, vn, qg, q.stride(1), og, out.stride(1), G,
                                             static_cast<float>(scale), accumulate_scores, work);
      row.set_kv(n[r], kn, vn);
      row.set_pos(n[r], p[b]);
      row.set_score(n[r], mass);
      n[r] = static_cast<int32_t>(paged::evict_row(row, n[r] + 1, keep[r], rule, sinks, recent_ratio));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) { m.impl("decode_step_", &decode_step_cpu); }

}  // namespace squeeze
