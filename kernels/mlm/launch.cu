// Picks the MLM masking kernel for a call (per token, or per sequence when units are ranked).
#include "mlm/api.h"
#include "mlm/mask_kernel.cuh"

namespace forkattn::kernels::mlm {

cudaError_t mlm_mask(const MlmMaskParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.len == 0) return cudaSuccess;
  if (params.exact || params.min_masked > 0) {
    const int64_t grid = params.batch < 65535 * 32 ? params.batch : 65535 * 32;
    row_kernel<<<static_cast<unsigned int>(grid), kRowThreads, 0, stream>>>(params);
  } else {
    const int64_t groups = params.batch * ((params.len + 3) / 4);
    int64_t grid = (groups + kTokenThreads - 1) / kTokenThreads;
    if (grid > 65535 * 64) grid = 65535 * 64;
    token_kernel<<<static_cast<unsigned int>(grid), kTokenThreads, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace forkattn::kernels::mlm
