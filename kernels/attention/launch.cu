// Picks the instantiation for a call: dtype and head_dim here, causal inside each instantiation.
#include "attention/api.h"
#include "common/static_switch.h"

namespace forkattn::kernels::attention {

cudaError_t attention_fwd(const AttentionFwdParams& params, cudaStream_t stream) {
  return FA_DTYPE_SWITCH(params.is_bf16, T, [&] {
    return FA_HEADDIM_SWITCH(params.head_dim, kD, [&] { return run_attention_fwd<T, kD>(params, stream); });
  });
}

cudaError_t attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  return FA_DTYPE_SWITCH(params.is_bf16, T, [&] {
    return FA_HEADDIM_SWITCH(params.head_dim, kD, [&] { return run_attention_bwd<T, kD>(params, stream); });
  });
}

}  // namespace forkattn::kernels::attention
