// decode_attention on the CPU: one query token per sequence over its rows of one layer, in
// parallel over rows; each row's query heads share one pass over its K/V.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "paged.h"

namespace squeeze {
namespace {

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                const at::Tensor& block_table, const at::Tensor& lens, double scale,
                                const std::optional<at::Tensor>& score_pages) {
  const at::Tensor scores = score_pages.has_value() ? *score_pages : at::Tensor();
  paged::Shape s = paged::check_pool(k_pages, v_pages, at::Tensor(), scores);
  paged::check_rows(block_table, lens, k_pages, s);
  const int64_t H = paged::check_query(q, k_pages, s);
  check_scale(scale);
  check_written({{&scores, "score_pages"}},
                {{&q, "q"}, {&k_pages, "k_pages"}, {&v_pages, "v_pages"}, {&block_table, "block_table"},
                 {&lens, "lens"}});
  paged::check_lens_values(lens, s, /*append=*/false);
  paged::check_block_table_values(block_table, s);

  at::Tensor out = at::empty({s.B, H, s.D}, q.options());
  const int64_t G = H / s.Hkv;
  const int32_t* n = lens.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_pages.scalar_type(), "decode_attention_cpu", [&] {
    paged::for_each_row(s.B, s.Hkv, s.capacity() * s.D * (G + 1), [&](int64_t b, int64_t g) {
      thread_local std::vector<float> work;
      const paged::Row<scalar_t> row(k_pages, v_pages, at::Tensor(), scores, block_table, b, g);
      const scalar_t* qg = q.data_ptr<scalar_t>() + b * q.stride(0) + g * G * q.stride(1);
      scalar_t* og = out.data_ptr<scalar_t>() + b * out.stride(0) + g * G * out.stride(1);
      paged::attend_group(row, n[b * s.Hkv + g], static_cast<const scalar_t*>(nullptr),
                          static_cast<const scalar_t*>(nullptr), qg, q.stride(1), og, out.stride(1), G,
                          static_cast<float>(scale), scores.defined(), work);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace squeeze
