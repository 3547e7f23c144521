// Picks the disentangled-attention instantiation for a call: dtype, head_dim and dropout here, the
// c2p / p2c terms inside each instantiation.
#include "disentangled/api.h"
#include "common/static_switch.h"

namespace forkattn::kernels::disentangled {

cudaError_t disentangled_fwd(const DisentangledFwdParams& params, cudaStream_t stream) {
  return FA_DTYPE_SWITCH(params.is_bf16, T, [&] {
    return FA_HEADDIM_SWITCH(params.head_dim, kD, [&] {
      return FA_BOOL_SWITCH(params.dropout, kDropout, [&] { return run_disentangled_fwd<T, kD, kDropout>(params, stream); });
    });
  });
}

// head_dim 32, 64 and 128 (the dk/dv kernel's query split per head_dim: bwd_kernel.cuh's BwdConfig).
cudaError_t disentangled_bwd(const DisentangledBwdParams& params, cudaStream_t stream) {
  return FA_DTYPE_SWITCH(params.is_bf16, T, [&] {
    return FA_HEADDIM_SWITCH(params.head_dim, kD, [&] {
      return FA_BOOL_SWITCH(params.dropout, kDropout, [&] { return run_disentangled_bwd<T, kD, kDropout>(params, stream); });
    });
  });
}

}  // namespace forkattn::kernels::disentangled
