// Argument checks shared by the prefill ops (prefill_attention, compress_kv_) on CPU.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "checks.h"

// In their own namespace: other areas' headers may define helpers of the same names.
namespace squeeze::prefill {

// A packed [T, heads, D] tensor of keys, values or queries.
inline void check_packed(const at::Tensor& t, const char* name) {
  check_rank(t, 3, name);
  check_float_kv(t, name);
  check_last_contiguous(t, name);
}

// An int32 contiguous tensor on `ref`'s device (cu_seqlens, budget, lens, slot_pos).
inline void check_index(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_dtype(t, at::kInt, name);
  check_same_device(t, ref, name, ref_name);
  check_contiguous(t, name);
}

// Validates cu_seqlens (int32 [B+1]: 0, non-decreasing, ending at total_tokens) and returns
// its offsets. Reads the values, so only the CPU kernels call it.
inline std::vector<int64_t> checked_offsets(const at::Tensor& cu_seqlens, int64_t total_tokens,
                                            const at::Tensor& ref, const char* ref_name) {
  check_rank(cu_seqlens, 1, "cu_seqlens");
  TORCH_CHECK(cu_seqlens.size(0) >= 1, "cu_seqlens: expected B+1 >= 1 entries, got 0");
  check_index(cu_seqlens, ref, "cu_seqlens", ref_name);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int64_t n = cu_seqlens.size(0);
  TORCH_CHECK(cu[0] == 0, "cu_seqlens: expected cu_seqlens[0] == 0, got ", cu[0]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    TORCH_CHECK(cu[i + 1] >= cu[i], "cu_seqlens: expected non-decreasing offsets, got cu_seqlens[", i,
                "] = ", cu[i], " > cu_seqlens[", i + 1, "] = ", cu[i + 1]);
  }
  TORCH_CHECK(cu[n - 1] == total_tokens, "cu_seqlens: expected the last offset to equal the ", total_tokens,
              " packed tokens, got ", cu[n - 1]);
  return std::vector<int64_t>(cu, cu + n);
}

}  // namespace squeeze::prefill
