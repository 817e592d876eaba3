// Argument checks shared by the C++ kernels (CPU and CUDA), the C++ side of
// squeeze_ops/_checks.py. Every message names the argument and what was expected; all checks
// run before any tensor is written. Value checks (they read the data) always run on CPU and, on
// the GPU, only when SQUEEZE_DEBUG=1 (they would cost a host synchronisation).
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace squeeze {

// `what` (optional) says where an expected dtype or size comes from, e.g. " (that of k_pages)".
inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name, const char* what = "") {
  TORCH_CHECK(t.scalar_type() == want, name, ": expected dtype ", c10::toString(want), what, ", got ",
              c10::toString(t.scalar_type()));
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  TORCH_CHECK(t.dim() == rank, name, ": expected a ", rank, "-d tensor, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t want, const char* name, const char* what = "") {
  TORCH_CHECK(t.size(dim) == want, name, ": expected size ", want, " in dim ", dim, what, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (that of ", ref_name, "), got ",
              t.device());
}

inline void check_last_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
              ": last dimension must be contiguous, got strides ", t.strides());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

inline void check_float_kv(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat, name,
              ": expected dtype float16, bfloat16 or float32, got ", c10::toString(s));
}

// An int32 contiguous index tensor (lengths, budgets, positions, offsets, page ids) of the given
// shape (`what`: where it comes from) on ref's device.
inline void check_index(const at::Tensor& t, at::IntArrayRef shape, const char* name, const at::Tensor& ref,
                        const char* ref_name, const char* what = "") {
  check_rank(t, static_cast<int64_t>(shape.size()), name);
  check_dtype(t, at::kInt, name);
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, what, ", got ", t.sizes());
  check_same_device(t, ref, name, ref_name);
  check_contiguous(t, name);
}

inline void check_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale: expected a finite softmax scale > 0, got ", scale);
}

// Written tensors must not overlap themselves (an expanded view) nor any other argument: the
// result would depend on the order of the writes. The rules of PyTorch's in-place ops
// (at::has_internal_overlap, at::get_overlap_status): interleaved views count as disjoint.
using Named = std::pair<const at::Tensor*, const char*>;

inline void check_written(std::initializer_list<Named> written, std::initializer_list<Named> read = {}) {
  std::vector<Named> args;
  for (const auto& [t, name] : written) {
    if (!t->defined()) continue;
    TORCH_CHECK(at::has_internal_overlap(*t) != at::MemOverlap::Yes, name,
                ": a written tensor must not overlap itself (an expanded view, strides ", t->strides(),
                "); pass a materialised tensor");
    args.push_back({t, name});
  }
  const size_t num_written = args.size();
  for (const auto& arg : read)
    if (arg.first->defined()) args.push_back(arg);
  for (size_t i = 0; i < num_written; ++i) {
    for (size_t j = i + 1; j < args.size(); ++j) {
      const auto status = at::get_overlap_status(*args[i].first, *args[j].first);
      TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, args[i].second,
                  ": must not share memory with ", args[j].second);
    }
  }
}

inline bool debug_checks_enabled() {
  const char* v = std::getenv("SQUEEZE_DEBUG");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

inline bool value_checks_enabled(const at::Tensor& t) { return t.is_cpu() || debug_checks_enabled(); }

// Validates cu_seqlens (int32 [B+1] contiguous on ref's device: 0, non-decreasing, ending at
// total_tokens) and returns its offsets. Reads the values, so only the CPU kernels call it.
inline std::vector<int64_t> checked_offsets(const at::Tensor& cu_seqlens, int64_t total_tokens,
                                            const at::Tensor& ref, const char* ref_name) {
  check_rank(cu_seqlens, 1, "cu_seqlens");
  TORCH_CHECK(cu_seqlens.size(0) >= 1, "cu_seqlens: expected B + 1 >= 1 entries, got 0");
  check_index(cu_seqlens, cu_seqlens.sizes(), "cu_seqlens", ref, ref_name);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int64_t n = cu_seqlens.size(0);
  TORCH_CHECK(cu[0] == 0, "cu_seqlens: expected cu_seqlens[0] == 0, got ", cu[0]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    TORCH_CHECK(cu[i + 1] >= cu[i], "cu_seqlens: expected non-decreasing offsets, got cu_seqlens[", i, "] = ", cu[i],
                " > cu_seqlens[", i + 1, "] = ", cu[i + 1]);
  }
  TORCH_CHECK(cu[n - 1] == total_tokens, "cu_seqlens: expected the last offset to equal the ", total_tokens,
              " packed tokens of ", ref_name, ", got ", cu[n - 1]);
  return std::vector<int64_t>(cu, cu + n);
}

// A packed [T, heads, D] tensor of keys, values or queries.
inline void check_packed(const at::Tensor& t, const char* name) {
  check_rank(t, 3, name);
  check_float_kv(t, name);
  check_last_contiguous(t, name);
}

// Sequence policies of the decode and compression ops, numbered as squeeze_ops/vocabulary.py.
enum class Policy : int { kWindow = 0, kStreaming = 1, kH2O = 2 };

inline Policy check_policy_args(const std::string& policy, int64_t sinks, double recent_ratio) {
  TORCH_CHECK(policy == "window" || policy == "streaming" || policy == "h2o",
              "policy: expected one of ('window', 'streaming', 'h2o'), got '", policy, "'");
  TORCH_CHECK(sinks >= 0, "sinks: expected a non-negative number of sink tokens, got ", sinks);
  TORCH_CHECK(recent_ratio >= 0.0 && recent_ratio <= 1.0, "recent_ratio: expected a value in [0, 1], got ",
              recent_ratio);
  return policy == "window" ? Policy::kWindow : policy == "streaming" ? Policy::kStreaming : Policy::kH2O;
}

// Scores as the policies compare them: NaN counts as -inf (kept last, evicted first).
inline float score_key(float s) { return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s; }

}  // namespace squeeze
