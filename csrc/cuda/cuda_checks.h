// Shared by the CUDA host files (csrc/cuda/*.cpp, csrc/disentangled.cpp): the cuda backend's
// limits and the 16-byte row alignment its kernels need. Defined in csrc/cuda/attention_cuda.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "attention.h"
#include "common/philox.h"

namespace forkattn {

// q on a CUDA device of compute capability 8.0+, fp16 or bf16, head_dim 32, 64 or 128, batch and
// heads within the grid, lengths within int32; a clear ValueError / TypeError otherwise.
void check_cuda_limits(const at::Tensor& q, const AttnSizes& s);

// The kernels move rows with 16-byte copies: a 16-byte aligned base and strides that are
// multiples of 8 elements. Anything else (an odd slice) is copied once into a fresh tensor.
at::Tensor rows_aligned(const at::Tensor& t);

// The dropout fields of a kernel params struct (kernels/attention/params.h and
// kernels/disentangled/params.h name them alike) for dropout_p (already checked to be in [0, 1))
// and seed: dropout_p > 0 picks the DROPOUT instantiations.
template <typename Params>
void set_dropout(Params& p, double dropout_p, int64_t seed) {
  p.dropout = dropout_p > 0.0;
  p.dropout_threshold = p.dropout ? kernels::dropout_threshold16(dropout_p) : 0u;
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.dropout_seed = static_cast<uint64_t>(seed);  // a signed int64's bit pattern
}

}  // namespace forkattn
