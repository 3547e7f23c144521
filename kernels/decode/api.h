// Entry points of the CUDA KV-cache kernels, callable from host C++ without nvcc. Each enqueues
// its kernels on `stream` (no host synchronisation, no allocation) and returns the first launch
// error, or cudaSuccess.
#pragma once
#include <cuda_runtime_api.h>

#include "decode/params.h"

namespace forkattn::kernels::decode {

// out from q and the cache: one split-KV pass, plus a merge kernel when num_splits > 1.
cudaError_t decode_attention(const DecodeAttentionParams& params, cudaStream_t stream);
// Writes k, v after each sequence's seqlens[b] tokens and advances seqlens: one launch, one block
// per sequence; never writes out of bounds.
cudaError_t kv_append(const KvAppendParams& params, cudaStream_t stream);

// One instantiation per (dtype, head_dim), each in its own generated .cu (generated/).
template <typename T, int D>
cudaError_t run_decode_attention(const DecodeAttentionParams& params, cudaStream_t stream);

}  // namespace forkattn::kernels::decode
