// Host side of the fused encoder-layer epilogues (csrc/encoder.h): argument checks, then the CPU kernel.
#include "encoder.h"

#include <ATen/ATen.h>

#include <cmath>

#include "checks.h"

namespace forkattn {

namespace {

// x: float32, contiguous, on the CPU, at least 1-D with a non-empty last dimension. Returns C.
int64_t check_rows(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  FA_CHECK_DTYPE(x, at::kFloat);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension (rows x features), got a scalar");
  TORCH_CHECK_VALUE(x.is_contiguous(), "x must be contiguous, got strides ", x.strides(), " for shape ", x.sizes());
  return x.size(-1);
}

// A per-feature vector: float32 [C], contiguous, on x's device.
void check_vector(const at::Tensor& t, const char* name, int64_t C) {
  FA_CHECK_DEVICE_NAMED(t, name, at::Device(at::kCPU));
  FA_CHECK_DTYPE_NAMED(t, name, at::kFloat);
  FA_CHECK_DIM_NAMED(t, name, 1);
  FA_CHECK_SIZE_NAMED(t, name, 0, C);
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous, got stride ", t.strides());
}

}  // namespace

void bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias) {
  const int64_t C = check_rows(x);
  check_vector(bias, "bias", C);
  if (x.numel() == 0) return;
  FORKATTN_CPU_DISPATCH(bias_gelu_kernel)(x.data_ptr<float>(), bias.data_ptr<float>(), x.numel() / C, C);
}

void bias_residual_layernorm_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& bias,
                                 const at::Tensor& weight, const at::Tensor& ln_bias, double eps) {
  const int64_t C = check_rows(x);
  FA_CHECK_DEVICE(residual, at::Device(at::kCPU));
  FA_CHECK_DTYPE(residual, at::kFloat);
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ",
                    residual.sizes());
  TORCH_CHECK_VALUE(residual.is_contiguous(), "residual must be contiguous, got strides ", residual.strides());
  TORCH_CHECK_VALUE(x.numel() == 0 || !residual.is_alias_of(x), "residual must not share memory with x");
  check_vector(bias, "bias", C);
  check_vector(weight, "weight", C);
  check_vector(ln_bias, "ln_bias", C);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ", eps);
  if (x.numel() == 0) return;
  FORKATTN_CPU_DISPATCH(bias_residual_layernorm_kernel)(x.data_ptr<float>(), residual.data_ptr<float>(), bias.data_ptr<float>(),
                                      weight.data_ptr<float>(), ln_bias.data_ptr<float>(), static_cast<float>(eps),
                                      x.numel() / C, C);
}

}  // namespace forkattn
