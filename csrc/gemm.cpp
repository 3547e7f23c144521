// Host side of the packed-panel GEMM (csrc/gemm.h): argument checks, packing, the kernel call.
#include "gemm.h"

#include <ATen/ATen.h>

#include "checks.h"

namespace forkattn {

int64_t gemm_panel_cols() { return FORKATTN_CPU_DISPATCH(gemm_panel_width_kernel)(); }

at::Tensor gemm_pack_cpu(const at::Tensor& w) {
  TORCH_CHECK_VALUE(w.device().is_cpu(), "w must be a CPU tensor, got ", w.device());
  FA_CHECK_DTYPE_NAMED(w, "w", at::kFloat);
  TORCH_CHECK_VALUE(w.dim() == 2, "w must be [out_features, in_features], got shape ", w.sizes());
  const at::Tensor wc = w.stride(1) == 1 ? w : w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), nr = gemm_panel_cols();
  at::Tensor packed = at::empty({(N + nr - 1) / nr, K, nr}, w.options());
  if (packed.numel() > 0)
    FORKATTN_CPU_DISPATCH(gemm_pack_kernel)(wc.data_ptr<float>(), wc.stride(0), N, K, packed.data_ptr<float>());
  return packed;
}

void check_packed_weight(const at::Tensor& w, int64_t N, int64_t K, const char* name) {
  const int64_t nr = gemm_panel_cols(), panels = (N + nr - 1) / nr;
  TORCH_CHECK_VALUE(w.dim() != 3 || w.size(2) == nr, name, " was packed into panels of ", w.size(2),
                    " columns (another CPU kernel variant's layout), but the variant in use (",
                    cpu::isa_name(cpu::chosen_isa()), ") reads panels of ", nr,
                    ": pack the weight again with gemm_pack_cpu");
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == panels && w.size(1) == K && w.size(2) == nr && w.is_contiguous(),
                    name, " must be a weight packed by gemm_pack_cpu for [N, K] = [", N, ", ", K,
                    "] (a contiguous [", panels, ", ", K, ", ", nr, "]), got shape ", w.sizes(), " with strides ",
                    w.strides());
}

void check_gemm_args(const at::Tensor& x, const at::Tensor& packed, int64_t N, const std::optional<at::Tensor>& bias,
                     int64_t epilogue, const at::Tensor& y, const char* x_name, const char* w_name,
                     const char* y_name) {
  const auto float_cpu = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
    FA_CHECK_DTYPE_NAMED(t, name, at::kFloat);
  };
  float_cpu(x, x_name);
  float_cpu(packed, w_name);
  float_cpu(y, y_name);
  TORCH_CHECK_VALUE(x.dim() == 2, x_name, " must be [rows, in_features], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1, x_name, " must have unit column stride, got strides ",
                    x.strides());
  TORCH_CHECK_VALUE(N >= 0, "N must be >= 0, got ", N);
  const int64_t K = x.size(1);
  check_packed_weight(packed, N, K, w_name);
  TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == N, y_name, " must be [", x.size(0), ", ",
                    N, "], got shape ", y.sizes());
  TORCH_CHECK_VALUE((y.size(1) <= 1 || y.stride(1) == 1) && (y.size(0) <= 1 || y.stride(0) >= N), y_name,
                    " must have unit column stride and rows that do not overlap, got strides ", y.strides());
  TORCH_CHECK_VALUE(y.numel() == 0 || !y.is_alias_of(x), y_name, " must not share memory with ", x_name);
  TORCH_CHECK_VALUE(epilogue >= 0 && epilogue <= static_cast<int64_t>(GemmEpilogue::kBiasGelu),
                    "epilogue must be 0 (none), 1 (bias) or 2 (bias + exact GELU), got ", epilogue);
  if (epilogue != static_cast<int64_t>(GemmEpilogue::kNone)) {
    TORCH_CHECK_VALUE(bias.has_value(), "bias must be given for epilogue ", epilogue);
    float_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                      "bias must be a contiguous [", N, "], got shape ", bias->sizes());
  }
}

void gemm_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t N, const std::optional<at::Tensor>& bias,
                     int64_t epilogue, const at::Tensor& y, int64_t n0, int64_t n1) {
  check_gemm_args(x, packed, N, bias, epilogue, y, "x", "packed", "y");
  const int64_t nr = packed.size(2);  // the variant's width: checked above
  TORCH_CHECK_VALUE(n0 >= 0 && n0 % nr == 0 && n0 <= n1 && n1 <= N, "n0 and n1 must satisfy 0 <= n0 <= n1 <= N = ", N,
                    " with n0 a multiple of the panel width ", nr, ", got ", n0, " and ", n1);
  if (x.size(0) == 0 || n1 == n0) return;
  FORKATTN_CPU_DISPATCH(gemm_kernel)(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), packed.data_ptr<float>(),
                                     n0, n1, epilogue ? bias->data_ptr<float>() : nullptr, static_cast<int>(epilogue),
                                     y.data_ptr<float>(), y.stride(0));
}

}  // namespace forkattn
