// See gemv.h.
#include "gemv.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>


namespace forkattn {

at::Tensor linear_split_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                            bool w_in_out) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && w.device().is_cpu(), "x and w must be CPU tensors, got ", x.device(),
                    " and ", w.device());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
                    "x and w must be float32, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && w.dim() == 2, "x must be [M, K] and w 2-D, got x ", x.sizes(), " and w ",
                    w.sizes());
  const int64_t K = x.size(1), N = w_in_out ? w.size(1) : w.size(0);
  TORCH_CHECK_VALUE((w_in_out ? w.size(0) : w.size(1)) == K, "w must be ", w_in_out ? "[K, N]" : "[N, K]",
                    " with K = x.size(1) = ", K, ", got ", w.sizes());
  if (bias) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                          bias->size(0) == N,
                      "bias must be a float32 CPU [", N, "] tensor, got ", bias->scalar_type(), " ", bias->sizes());
  }
  // Inference only (the decode fast path runs under no_grad): the chunks write slices of one output,
  // which autograd cannot follow; and grad mode is per thread, so the workers get their own guard.
  const bool grads = x.requires_grad() || w.requires_grad() || (bias && bias->requires_grad());
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && grads),
                    "linear_split_cpu is for inference: call it under torch.no_grad() (an input requires grad)");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  // One chunk per thread, a multiple of 16 columns (64 bytes of each weight row for [K, N]).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(16, (N / threads + 15) / 16 * 16);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    const at::NoGradGuard no_grad;
    const at::Tensor ws = w_in_out ? w.slice(1, n0, n1) : w.slice(0, n0, n1).t();
    at::Tensor ys = y.slice(1, n0, n1);
    if (bias) {
      at::addmm_out(ys, bias->slice(0, n0, n1), xc, ws);
    } else {
      at::mm_out(ys, xc, ws);
    }
  });
  return y;
}

}  // namespace forkattn
