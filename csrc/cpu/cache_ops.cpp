// cache_append_ and cache_evict_ on the CPU, in parallel over (sequence, KV head). lens is updated
// once per sequence after every head is done.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "decode.h"

namespace squeeze {
namespace {

void cache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lens,
                      const at::Tensor& slot_pos, const at::Tensor& scores, const at::Tensor& k_new,
                      const at::Tensor& v_new, const at::Tensor& pos) {
  const auto s = decode::check_kv(k_cache, v_cache, lens);
  decode::check_slots(slot_pos, scores, k_cache, s);
  decode::check_new_token(k_new, v_new, pos, k_cache, s);
  decode::check_lens_values(lens, s.C, /*append=*/true);
  decode::check_pos_values(pos);

  int32_t* n = lens.data_ptr<int32_t>();
  const int32_t* p = pos.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "cache_append_cpu", [&] {
    decode::for_each_head(s.B, s.Hkv, 2 * s.D, [&](int64_t b, int64_t h) {
      const decode::HeadSlots<scalar_t> slots(k_cache, v_cache, slot_pos, scores, b, h);
      decode::append_token(slots, n[b], k_new.data_ptr<scalar_t>() + b * k_new.stride(0) + h * k_new.stride(1),
                           v_new.data_ptr<scalar_t>() + b * v_new.stride(0) + h * v_new.stride(1), p[b]);
    });
  });
  for (int64_t b = 0; b < s.B; ++b) n[b] += 1;
}

void cache_evict_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lens,
                     const at::Tensor& slot_pos, const at::Tensor& scores, const at::Tensor& budget,
                     c10::string_view policy, int64_t sinks, double recent_ratio) {
  const auto s = decode::check_kv(k_cache, v_cache, lens);
  decode::check_slots(slot_pos, scores, k_cache, s);
  const Policy rule = decode::check_policy_args(budget, std::string(policy), sinks, recent_ratio, k_cache, s);
  decode::check_lens_values(lens, s.C, /*append=*/false);
  decode::check_budget_values(budget, s.C, /*append=*/false);

  int32_t* n = lens.data_ptr<int32_t>();
  const int32_t* keep = budget.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "cache_evict_cpu", [&] {
    decode::for_each_head(s.B, s.Hkv, 2 * s.C, [&](int64_t b, int64_t h) {
      const decode::HeadSlots<scalar_t> slots(k_cache, v_cache, slot_pos, scores, b, h);
      decode::evict_head(slots, n[b], keep[b], rule, sinks, decode::recent_count(keep[b], recent_ratio));
    });
  });
  for (int64_t b = 0; b < s.B; ++b) n[b] = std::min(n[b], keep[b]);
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) {
  m.impl("cache_append_", &cache_append_cpu);
  m.impl("cache_evict_", &cache_evict_cpu);
}

}  // namespace squeeze
