// Entry points of the CUDA disentangled-attention kernels, callable from host C++ without nvcc.
// Each enqueues its kernels on `stream` (no host synchronisation, no allocation) and returns the
// first launch error, or cudaSuccess.
#pragma once
#include <cuda_runtime_api.h>

#include "disentangled/params.h"

namespace forkattn::kernels::disentangled {

// out and lse from q, k, v, pos_key, pos_query, rel_index.
cudaError_t disentangled_fwd(const DisentangledFwdParams& params, cudaStream_t stream);
// dq, dk, dv and the dpos accumulators from dout, q, k, v, pos_*, lse and delta (params.delta).
cudaError_t disentangled_bwd(const DisentangledBwdParams& params, cudaStream_t stream);

// One instantiation per (dtype, head_dim, dropout), each in its own generated .cu (generated/);
// c2p / p2c are switched inside each instantiation.
template <typename T, int D, bool DROPOUT>
cudaError_t run_disentangled_fwd(const DisentangledFwdParams& params, cudaStream_t stream);
template <typename T, int D, bool DROPOUT>
cudaError_t run_disentangled_bwd(const DisentangledBwdParams& params, cudaStream_t stream);

}  // namespace forkattn::kernels::disentangled
