// Shared by the CUDA host files (csrc/cuda/*.cpp, csrc/disentangled.cpp): the cuda backend's
// limits and the 16-byte row alignment its kernels need. Defined in csrc/cuda/attention_cuda.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include "attention.h"

namespace forkattn {

// q on a CUDA device of compute capability 8.0+, fp16 or bf16, head_dim 32, 64 or 128, batch and
// heads within the grid, lengths within int32; a clear ValueError / TypeError otherwise.
void check_cuda_limits(const at::Tensor& q, const AttnSizes& s);

// The kernels move rows with 16-byte copies: a 16-byte aligned base and strides that are
// multiples of 8 elements. Anything else (an odd slice) is copied once into a fresh tensor.
at::Tensor rows_aligned(const at::Tensor& t);

}  // namespace forkattn
