// Argument checks shared by every host entry point. Each macro raises a Python
// exception (ValueError / TypeError / RuntimeError through c10) that names the
// argument and what was expected, so bad input never reaches a kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define FA_CHECK_DIM(x, n)                                                                      \
  TORCH_CHECK_VALUE((x).dim() == (n), #x " must have " #n " dimensions, got ", (x).dim(),      \
                    " (shape ", (x).sizes(), ")")

#define FA_CHECK_SIZE(x, d, expected)                                                           \
  TORCH_CHECK_VALUE((x).size(d) == (expected), #x ".size(" #d ") must be ", (expected), ", got ", \
                    (x).size(d), " (shape ", (x).sizes(), ")")

#define FA_CHECK_DEVICE(x, dev)                                                                 \
  TORCH_CHECK_VALUE((x).device() == (dev), #x " must be on ", (dev), " like the other inputs, got ", \
                    (x).device())

#define FA_CHECK_DTYPE(x, dt)                                                                   \
  TORCH_CHECK_TYPE((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())

#define FA_CHECK_FLOATING(x)                                                                    \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||       \
                       (x).scalar_type() == at::kBFloat16,                                     \
                   #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())

#define FA_CHECK_LAST_DIM_CONTIGUOUS(x)                                                         \
  TORCH_CHECK_VALUE((x).size(-1) == 1 || (x).stride(-1) == 1, #x " must have stride 1 in its last dimension, got strides ", \
                    (x).strides())
