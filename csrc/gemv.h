// The one-row GEMMs of a batch-1 decode step on every thread (issue #18, GPT-2 generate on CPU;
// python/forkattn/models/cpu_inference_gpt.py). MKL runs a GEMM with M = 1 as a GEMV on the calling
// thread only, whatever torch.get_num_threads() says (measured: at 2 threads all of the CPU time of
// 12 c_fc GEMVs is on the main thread), so a batch-1 step left the second core idle for ~70% of its
// time. This splits the weight's output columns into one contiguous chunk per thread, each a GEMV
// on its own thread: the step streams its weights from memory on every core.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace forkattn {

// y = x @ W (+ bias), x [M, K] float32 (small M), W either [K, N] (w_in_out, x @ w) or nn.Linear's
// [N, K] (x @ w.T); bias [N] or None. A new contiguous [M, N]. At one thread, one ATen call.
at::Tensor linear_split_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                            bool w_in_out);

}  // namespace forkattn
