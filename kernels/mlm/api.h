// Entry point of the CUDA MLM masking kernels, callable from host C++ without nvcc.
#pragma once
#include <cuda_runtime_api.h>

#include "mlm/params.h"

namespace forkattn::kernels::mlm {

// One launch: a token-parallel kernel for plain bernoulli masking, or one block per sequence when the
// call ranks units (mode="exact" or min_masked > 0). Returns the launch error, if any.
cudaError_t mlm_mask(const MlmMaskParams& params, cudaStream_t stream);

}  // namespace forkattn::kernels::mlm
