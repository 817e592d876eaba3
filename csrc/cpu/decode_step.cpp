// decode_step_ on the CPU: append, attention (+ H2O scores) and eviction of one layer, composed per
// (sequence, KV head) in one parallel pass from the same pieces as the separate ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "decode.h"

namespace squeeze {
namespace {

at::Tensor decode_step_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                           const at::Tensor& pos, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& lens, const at::Tensor& slot_pos, const at::Tensor& scores,
                           const at::Tensor& budget, double scale, c10::string_view policy, int64_t sinks,
                           double recent_ratio, bool accumulate_scores) {
  const auto s = decode::check_kv(k_cache, v_cache, lens);
  decode::check_slots(slot_pos, scores, k_cache, s);
  const int64_t H = decode::check_query(q, k_cache, s);
  decode::check_new_token(k_new, v_new, pos, k_cache, s);
  const Policy rule = decode::check_policy_args(budget, std::string(policy), sinks, recent_ratio, k_cache, s);
  decode::check_lens_values(lens, s.C, /*append=*/true);
  decode::check_budget_values(budget, s.C, /*append=*/true);
  decode::check_pos_values(pos);

  at::Tensor out = at::empty({s.B, H, s.D}, q.options());
  const int64_t G = H / s.Hkv;
  int32_t* n = lens.data_ptr<int32_t>();
  const int32_t* p = pos.data_ptr<int32_t>();
  const int32_t* keep = budget.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "decode_step_cpu", [&] {
    decode::for_each_head(s.B, s.Hkv, s.C * s.D * (G + 1), [&](int64_t b, int64_t h) {
      thread_local std::vector<float> work;
      const decode::HeadSlots<scalar_t> slots(k_cache, v_cache, slot_pos, scores, b, h);
      decode::append_token(slots, n[b], k_new.data_ptr<scalar_t>() + b * k_new.stride(0) + h * k_new.stride(1),
                           v_new.data_ptr<scalar_t>() + b * v_new.stride(0) + h * v_new.stride(1), p[b]);
      const scalar_t* qg = q.data_ptr<scalar_t>() + b * q.stride(0) + h * G * q.stride(1);
      scalar_t* og = out.data_ptr<scalar_t>() + b * out.stride(0) + h * G * out.stride(1);
      decode::attend_group(slots, n[b] + 1, qg, q.stride(1), og, out.stride(1), G, static_cast<float>(scale),
                           accumulate_scores, work);
      decode::evict_head(slots, n[b] + 1, keep[b], rule, sinks, decode::recent_count(keep[b], recent_ratio));
    });
  });
  for (int64_t b = 0; b < s.B; ++b) n[b] = std::min(n[b] + 1, keep[b]);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) { m.impl("decode_step_", &decode_step_cpu); }

}  // namespace squeeze
