// decode_attention on the CPU: one query token per sequence over its layer cache, in parallel over
// (sequence, KV head); each pair's query heads share one pass over its K/V rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "decode.h"

namespace squeeze {
namespace {

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& lens, double scale, const std::optional<at::Tensor>& scores) {
  const auto s = decode::check_kv(k_cache, v_cache, lens);
  const int64_t H = decode::check_query(q, k_cache, s);
  if (scores.has_value()) decode::check_slot_tensor(*scores, "scores", at::kFloat, k_cache, s);
  decode::check_lens_values(lens, s.C, /*append=*/false);

  at::Tensor out = at::empty({s.B, H, s.D}, q.options());
  const at::Tensor score_t = scores.has_value() ? *scores : at::Tensor();
  const int64_t G = H / s.Hkv;
  const int32_t* n = lens.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "decode_attention_cpu", [&] {
    decode::for_each_head(s.B, s.Hkv, s.C * s.D * (G + 1), [&](int64_t b, int64_t h) {
      thread_local std::vector<float> work;
      const decode::HeadSlots<scalar_t> slots(k_cache, v_cache, at::Tensor(), score_t, b, h);
      const scalar_t* qg = q.data_ptr<scalar_t>() + b * q.stride(0) + h * G * q.stride(1);
      scalar_t* og = out.data_ptr<scalar_t>() + b * out.stride(0) + h * G * out.stride(1);
      decode::attend_group(slots, n[b], qg, q.stride(1), og, out.stride(1), G, static_cast<float>(scale),
                           scores.has_value(), work);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace squeeze
