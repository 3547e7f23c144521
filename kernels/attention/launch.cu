// Picks the instantiation for a call: dtype, head_dim and dropout here, causal inside each
// instantiation.
#include "attention/api.h"
#include "common/static_switch.h"

namespace forkattn::kernels::attention {

cudaError_t attention_fwd(const AttentionFwdParams& params, cudaStream_t stream) {
  return FA_DTYPE_SWITCH(params.is_bf16, T, [&] {
    return FA_HEADDIM_SWITCH(params.head_dim, kD, [&] {
      return FA_BOOL_SWITCH(params.dropout, kDropout, [&] { return run_attention_fwd<T, kD, kDropout>(params, stream); });
    });
  });
}

cudaError_t attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  return FA_DTYPE_SWITCH(params.is_bf16, T, [&] {
    return FA_HEADDIM_SWITCH(params.head_dim, kD, [&] {
      return FA_BOOL_SWITCH(params.dropout, kDropout, [&] { return run_attention_bwd<T, kD, kDropout>(params, stream); });
    });
  });
}

}  // namespace forkattn::kernels::attention
