// Picks the decode instantiation for a call (dtype, head_dim; rows per block inside each
// instantiation) and launches the append kernel.
#include <initializer_list>

#include "decode/api.h"
#include "decode/kv_append_kernel.cuh"
#include "common/static_switch.h"

namespace forkattn::kernels::decode {

cudaError_t decode_attention(const DecodeAttentionParams& params, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  return FA_DTYPE_SWITCH(params.is_bf16, T, [&] {
    return FA_HEADDIM_SWITCH(params.head_dim, kD, [&] { return run_decode_attention<T, kD>(params, stream); });
  });
}

namespace {
bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }
}  // namespace

cudaError_t kv_append(const KvAppendParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  // 16-byte copies when every row start is 16-byte aligned, else one element at a time
  const int per16 = 16 / p.elem_bytes;
  bool vec = p.head_dim % per16 == 0;
  for (const void* ptr : {static_cast<const void*>(p.k_cache), static_cast<const void*>(p.v_cache), p.k, p.v}) {
    vec = vec && aligned16(ptr);
  }
  for (const int64_t stride : {p.cache_page_stride, p.cache_head_stride, p.cache_slot_stride, p.k_batch_stride,
                               p.k_head_stride, p.k_row_stride, p.v_batch_stride, p.v_head_stride, p.v_row_stride}) {
    vec = vec && stride % per16 == 0;
  }
  if (vec) {
    kv_append_kernel<uint4><<<p.batch, kAppendThreads, 0, stream>>>(p);
  } else if (p.elem_bytes == 4) {
    kv_append_kernel<uint32_t><<<p.batch, kAppendThreads, 0, stream>>>(p);
  } else if (p.elem_bytes == 2) {
    kv_append_kernel<uint16_t><<<p.batch, kAppendThreads, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace forkattn::kernels::decode
