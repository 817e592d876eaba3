// CPU kernels of add_rmsnorm_cossim and add_cossim (the attention epilogue that measures layer
// importance, docs/METHOD.md#layer-importance). Tokens in parallel, one pass over each row; the
// per-token cosines are then summed per sequence in a fixed order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"

namespace squeeze {
namespace {

// Norms below this count as zero in the cosine: cos = dot / (max(|a|, eps) * max(|b|, eps)),
// the convention of torch.nn.functional.cosine_similarity, so a zero vector has cosine 0.
constexpr double kCosEps = 1e-8;
// Independent partial sums per row: lets the compiler vectorise the fp32 accumulation.
constexpr int kLanes = 16;

void check_epilogue_args(const at::Tensor& residual, const at::Tensor& attn_out, const at::Tensor& weight,
                         const at::Tensor& cu_seqlens, const at::Tensor& cos_sum) {
  check_float_kv(residual, "residual");
  check_rank(residual, 2, "residual");
  check_last_contiguous(residual, "residual");
  check_dtype(attn_out, residual.scalar_type(), "attn_out", " (that of residual)");
  TORCH_CHECK(attn_out.sizes() == residual.sizes(), "attn_out: expected shape ", residual.sizes(),
              " (that of residual), got ", attn_out.sizes());
  check_last_contiguous(attn_out, "attn_out");
  check_same_device(attn_out, residual, "attn_out", "residual");
  if (weight.defined()) {
    check_float_kv(weight, "weight");
    check_rank(weight, 1, "weight");
    check_size(weight, 0, residual.size(1), "weight", " (the width of residual)");
    check_same_device(weight, residual, "weight", "residual");
  }
  check_rank(cu_seqlens, 1, "cu_seqlens");
  TORCH_CHECK(cu_seqlens.size(0) >= 1, "cu_seqlens: expected B + 1 >= 1 entries, got shape ", cu_seqlens.sizes());
  check_dtype(cos_sum, at::kFloat, "cos_sum");
  check_rank(cos_sum, 1, "cos_sum");
  check_size(cos_sum, 0, cu_seqlens.size(0) - 1, "cos_sum", " (one per sequence of cu_seqlens)");
  check_same_device(cos_sum, residual, "cos_sum", "residual");
  check_written({{&residual, "residual"}, {&cos_sum, "cos_sum"}},
                {{&attn_out, "attn_out"}, {&weight, "weight"}, {&cu_seqlens, "cu_seqlens"}});
  checked_offsets(cu_seqlens, residual.size(0), residual, "residual");
}

// residual <- residual + attn_out; out <- rmsnorm(residual) * weight when out is given;
// cos_sum[b] += sum of per-token cos(old, new). Statistics use the stored (rounded) residual.
template <typename scalar_t>
void epilogue(const at::Tensor& residual, const at::Tensor& attn_out, const float* w, double eps,
              const at::Tensor& cu_seqlens, const at::Tensor& cos_sum, at::Tensor* out) {
  const int64_t T = residual.size(0), d = residual.size(1);
  scalar_t* res = residual.data_ptr<scalar_t>();
  const scalar_t* attn = attn_out.data_ptr<scalar_t>();
  scalar_t* o = out ? out->data_ptr<scalar_t>() : nullptr;
  const int64_t rs = residual.stride(0), as = attn_out.stride(0);
  std::vector<float> cos_tok(T);

  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> row(d);
    for (int64_t t = t0; t < t1; ++t) {
      scalar_t* r = res + t * rs;
      const scalar_t* a = attn + t * as;
      float dot[kLanes] = {}, oo[kLanes] = {}, nn[kLanes] = {};
      for (int64_t j0 = 0; j0 < d; j0 += kLanes) {
        const int lanes = static_cast<int>(std::min<int64_t>(kLanes, d - j0));
        for (int l = 0; l < lanes; ++l) {
          const int64_t j = j0 + l;
          const float old = static_cast<float>(r[j]);
          const scalar_t stored = static_cast<scalar_t>(old + static_cast<float>(a[j]));
          r[j] = stored;
          const float v = static_cast<float>(stored);
          row[j] = v;
          dot[l] += old * v;
          oo[l] += old * old;
          nn[l] += v * v;
        }
      }
      double sdot = 0, soo = 0, snn = 0;
      for (int l = 0; l < kLanes; ++l) {
        sdot += dot[l];
        soo += oo[l];
        snn += nn[l];
      }
      const double norms = std::max(std::sqrt(soo), kCosEps) * std::max(std::sqrt(snn), kCosEps);
      cos_tok[t] = static_cast<float>(sdot / norms);
      if (o) {
        const float rstd = static_cast<float>(1.0 / std::sqrt(snn / static_cast<double>(d) + eps));
        scalar_t* orow = o + t * d;
        for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<scalar_t>(row[j] * rstd * w[j]);
      }
    }
  });

  const int32_t* c = cu_seqlens.data_ptr<int32_t>();
  auto cs = cos_sum.accessor<float, 1>();
  at::parallel_for(0, cos_sum.size(0), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s = 0;
      for (int64_t t = c[b]; t < c[b + 1]; ++t) s += cos_tok[t];
      cs[b] = static_cast<float>(cs[b] + s);
    }
  });
}

void run_epilogue(const at::Tensor& residual, const at::Tensor& attn_out, const float* w, double eps,
                  const at::Tensor& cu_seqlens, const at::Tensor& cos_sum, at::Tensor* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "add_rmsnorm_cossim", [&] {
    epilogue<scalar_t>(residual, attn_out, w, eps, cu_seqlens, cos_sum, out);
  });
}

at::Tensor add_rmsnorm_cossim_cpu(const at::Tensor& residual, const at::Tensor& attn_out, const at::Tensor& weight,
                                  const at::Tensor& cu_seqlens, const at::Tensor& cos_sum, double eps) {
  check_epilogue_args(residual, attn_out, weight, cu_seqlens, cos_sum);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps: expected a finite eps >= 0, got ", eps);
  auto out = at::empty(residual.sizes(), residual.options());
  const auto w = weight.to(at::kFloat).contiguous();
  run_epilogue(residual, attn_out, w.data_ptr<float>(), eps, cu_seqlens, cos_sum, &out);
  return out;
}

void add_cossim_cpu(const at::Tensor& residual, const at::Tensor& attn_out, const at::Tensor& cu_seqlens,
                    const at::Tensor& cos_sum) {
  check_epilogue_args(residual, attn_out, at::Tensor(), cu_seqlens, cos_sum);
  run_epilogue(residual, attn_out, nullptr, 0.0, cu_seqlens, cos_sum, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(squeeze, CPU, m) {
  m.impl("add_rmsnorm_cossim", &add_rmsnorm_cossim_cpu);
  m.impl("add_cossim", &add_cossim_cpu);
}

}  // namespace squeeze
