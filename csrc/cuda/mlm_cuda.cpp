// CUDA host glue of MLM masking: params from tensors, one launch on the current stream.
// Compiled only when setup.py builds the CUDA kernels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "mlm.h"
#include "mlm/mlm_launch.h"

namespace forkattn {

void mlm_mask_cuda(FORKATTN_MLM_ARGS) {
  const mlm::Params p = make_mlm_params(input_ids, out_ids, out_labels, special_tokens_mask, attention_mask, labels,
                                        word_ids, special_ids, excluded_ids, vocab_size, mask_token_id, seed,
                                        t_select, t_mask, t_random, n_random, exact, min_masked);
  TORCH_CHECK_VALUE(input_ids.is_cuda(), "input_ids must be a CUDA tensor for the cuda backend, got ",
                    input_ids.device());
  if (input_ids.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(input_ids.device());
  const cudaError_t err = mlm::run_mlm_mask(p, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "mlm_mask CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace forkattn
