// Entry points of the CUDA attention kernels, callable from host C++ without nvcc.
// Each enqueues its kernels on `stream` (no host synchronisation, no allocation) and returns
// the first launch error, or cudaSuccess.
#pragma once
#include <cuda_runtime_api.h>

#include "attention/params.h"

namespace forkattn::kernels::attention {

// out and lse from q, k, v.
cudaError_t attention_fwd(const AttentionFwdParams& params, cudaStream_t stream);
// dq, dk, dv from dout, q, k, v, out, lse; uses params.delta as workspace. Deterministic:
// dq comes from its own kernel, dk/dv sum a GQA group inside one block; no atomics.
cudaError_t attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);

// One instantiation per (dtype, head_dim, dropout), each in its own generated .cu (generated/).
template <typename T, int D, bool DROPOUT>
cudaError_t run_attention_fwd(const AttentionFwdParams& params, cudaStream_t stream);
template <typename T, int D, bool DROPOUT>
cudaError_t run_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);

}  // namespace forkattn::kernels::attention
