// Picks the disentangled-attention instantiation for a call: dtype and head_dim here, the c2p /
// p2c terms inside each instantiation.
#include "disentangled/api.h"
#include "common/static_switch.h"

namespace forkattn::kernels::disentangled {

cudaError_t disentangled_fwd(const DisentangledFwdParams& params, cudaStream_t stream) {
  return FA_DTYPE_SWITCH(params.is_bf16, T, [&] {
    return FA_HEADDIM_SWITCH(params.head_dim, kD, [&] { return run_disentangled_fwd<T, kD>(params, stream); });
  });
}

// head_dim 64 only (generate_kernels.py's BWD_HEAD_DIMS): ptxas spills the dk/dv kernel at 128 (its
// two [16, 128] fp32 accumulators per warp) and, by a few bytes, at 32 on sm_80; the host routes
// those to Triton's backward.
cudaError_t disentangled_bwd(const DisentangledBwdParams& params, cudaStream_t stream) {
  return FA_DTYPE_SWITCH(params.is_bf16, T, [&] {
    if (params.head_dim == 64) return run_disentangled_bwd<T, 64>(params, stream);
    return cudaErrorInvalidValue;
  });
}

}  // namespace forkattn::kernels::disentangled
