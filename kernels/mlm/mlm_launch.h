// Launcher of the MLM masking kernels (kernels/mlm/mlm.cu). Params: kernels/mlm/mlm.h.
#pragma once
#include <cuda_runtime_api.h>

#include "mlm/mlm.h"

namespace forkattn {
namespace mlm {
// One launch: a token-parallel kernel for plain bernoulli masking, or one block per sequence when the
// call ranks units (mode="exact" or min_masked > 0). Returns the launch error, if any.
cudaError_t run_mlm_mask(const Params& params, cudaStream_t stream);
}  // namespace mlm
}  // namespace forkattn
