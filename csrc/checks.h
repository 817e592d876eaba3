// Argument checks shared by the C++ kernels (CPU and CUDA). Every message names the argument
// and what was expected; all checks run before any tensor is written.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace squeeze {

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, name, ": expected dtype ", c10::toString(want), ", got ",
              c10::toString(t.scalar_type()));
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  TORCH_CHECK(t.dim() == rank, name, ": expected a ", rank, "-d tensor, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t want, const char* name) {
  TORCH_CHECK(t.size(dim) == want, name, ": expected size ", want, " in dim ", dim, ", got shape ",
              t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (that of ",
              ref_name, "), got ", t.device());
}

inline void check_last_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, ": last dimension must be contiguous, got strides ",
              t.strides());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

inline void check_float_kv(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat, name,
              ": expected dtype float16, bfloat16 or float32, got ", c10::toString(s));
}

// Sequence policies of the decode and compression ops.
enum class Policy : int { kWindow = 0, kStreaming = 1, kH2O = 2 };

inline Policy parse_policy(const std::string& policy) {
  if (policy == "window") return Policy::kWindow;
  if (policy == "streaming") return Policy::kStreaming;
  if (policy == "h2o") return Policy::kH2O;
  TORCH_CHECK(false, "policy: expected 'window', 'streaming' or 'h2o', got '", policy, "'");
}

}  // namespace squeeze
