// Chooses the decode instantiation for (dtype, head_dim); the instantiations live in the
// generated decode_{fp16,bf16}_hd{32,64,128}.cu files.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "decode/decode_params.h"

namespace forkattn {

extern template cudaError_t run_decode_<__half, 32>(const DecodeParams&, cudaStream_t);
extern template cudaError_t run_decode_<__half, 64>(const DecodeParams&, cudaStream_t);
extern template cudaError_t run_decode_<__half, 128>(const DecodeParams&, cudaStream_t);
extern template cudaError_t run_decode_<__nv_bfloat16, 32>(const DecodeParams&, cudaStream_t);
extern template cudaError_t run_decode_<__nv_bfloat16, 64>(const DecodeParams&, cudaStream_t);
extern template cudaError_t run_decode_<__nv_bfloat16, 128>(const DecodeParams&, cudaStream_t);

namespace {
template <typename T>
cudaError_t by_head_dim(const DecodeParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 32: return run_decode_<T, 32>(p, stream);
    case 64: return run_decode_<T, 64>(p, stream);
    case 128: return run_decode_<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
}  // namespace

cudaError_t run_decode(const DecodeParams& params, DecodeDType dtype, int head_dim, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  return dtype == DecodeDType::kHalf ? by_head_dim<__half>(params, head_dim, stream)
                                     : by_head_dim<__nv_bfloat16>(params, head_dim, stream);
}

}  // namespace forkattn
