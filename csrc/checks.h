// Argument checks shared by every host entry point. Each macro raises a Python
// exception (ValueError / TypeError through c10) that names the argument and what
// was expected, so bad input never reaches a kernel. The *_NAMED forms take the
// name to print (for optionals unwrapped into another variable).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define FA_CHECK_DIM_NAMED(x, name, n)                                                          \
  TORCH_CHECK_VALUE((x).dim() == (n), name, " must have " #n " dimensions, got ", (x).dim(),    \
                    " (shape ", (x).sizes(), ")")
#define FA_CHECK_DIM(x, n) FA_CHECK_DIM_NAMED(x, #x, n)

#define FA_CHECK_SIZE_NAMED(x, name, d, expected)                                               \
  TORCH_CHECK_VALUE((x).size(d) == (expected), name, ".size(" #d ") must be ", (expected), ", got ", \
                    (x).size(d), " (shape ", (x).sizes(), ")")
#define FA_CHECK_SIZE(x, d, expected) FA_CHECK_SIZE_NAMED(x, #x, d, expected)

#define FA_CHECK_DEVICE_NAMED(x, name, dev)                                                     \
  TORCH_CHECK_VALUE((x).device() == (dev), name, " must be on ", (dev), " like the other inputs, got ", \
                    (x).device())
#define FA_CHECK_DEVICE(x, dev) FA_CHECK_DEVICE_NAMED(x, #x, dev)

#define FA_CHECK_DTYPE_NAMED(x, name, dt)                                                       \
  TORCH_CHECK_TYPE((x).scalar_type() == (dt), name, " must have dtype ", (dt), ", got ", (x).scalar_type())
#define FA_CHECK_DTYPE(x, dt) FA_CHECK_DTYPE_NAMED(x, #x, dt)

#define FA_CHECK_FLOATING(x)                                                                    \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||       \
                       (x).scalar_type() == at::kBFloat16,                                     \
                   #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())

#define FA_CHECK_LAST_DIM_CONTIGUOUS_NAMED(x, name)                                             \
  TORCH_CHECK_VALUE((x).numel() == 0 || (x).size(-1) <= 1 || (x).stride(-1) == 1, name,                 \
                    " must have stride 1 in its last dimension, got strides ",                                \
                    (x).strides())
#define FA_CHECK_LAST_DIM_CONTIGUOUS(x) FA_CHECK_LAST_DIM_CONTIGUOUS_NAMED(x, #x)
