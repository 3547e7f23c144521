// CUDA host glue of MLM masking: params from tensors, one launch on the current stream.
// Compiled only when setup.py builds the CUDA kernels.
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include "mlm.h"
#include "mlm/api.h"

namespace forkattn {

void mlm_mask_cuda(const at::Tensor& input_ids, const at::Tensor& out_ids, const at::Tensor& out_labels,
                   const std::optional<at::Tensor>& special_tokens_mask,
                   const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& labels,
                   const std::optional<at::Tensor>& word_ids, const std::vector<int64_t>& special_ids,
                   const std::vector<int64_t>& excluded_ids, int64_t /*vocab_size: only the CPU kernel checks ids*/,
                   int64_t mask_token_id, int64_t seed, int64_t t_select, int64_t t_mask, int64_t t_random,
                   int64_t n_random, bool exact, int64_t min_masked) {
  kernels::mlm::MlmMaskParams p;
  fill_mlm_mask_params(&p, input_ids, out_ids, out_labels, special_tokens_mask, attention_mask, labels, word_ids,
                       special_ids, excluded_ids, mask_token_id, seed, t_select, t_mask, t_random, n_random, exact,
                       min_masked);
  TORCH_CHECK_VALUE(input_ids.is_cuda(), "input_ids must be a CUDA tensor for the cuda backend, got ",
                    input_ids.device());
  if (input_ids.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(input_ids.device());
  const cudaError_t err = kernels::mlm::mlm_mask(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "mlm_mask CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace forkattn
