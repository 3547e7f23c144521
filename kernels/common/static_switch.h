// Compile-time choices from run-time values, shared by every kernel family's launch.cu: each macro
// calls the lambda in __VA_ARGS__ with NAME bound to a constant (FlashAttention's static_switch.h).
// An unsupported head_dim returns cudaErrorInvalidValue (the host glue checks it first). The head
// dims here are the ones kernels/common/generate.py instantiates (HEAD_DIMS): change both.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#define FA_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                 \
    if (COND) {                         \
      constexpr bool NAME = true;       \
      return __VA_ARGS__();             \
    } else {                            \
      constexpr bool NAME = false;      \
      return __VA_ARGS__();             \
    }                                   \
  }()

#define FA_DTYPE_SWITCH(IS_BF16, TYPE, ...) \
  [&] {                                     \
    if (IS_BF16) {                          \
      using TYPE = __nv_bfloat16;           \
      return __VA_ARGS__();                 \
    } else {                                \
      using TYPE = __half;                  \
      return __VA_ARGS__();                 \
    }                                       \
  }()

#define FA_HEADDIM_SWITCH(HEAD_DIM, NAME, ...) \
  [&] {                                        \
    if ((HEAD_DIM) == 32) {                    \
      constexpr int NAME = 32;                 \
      return __VA_ARGS__();                    \
    } else if ((HEAD_DIM) == 64) {             \
      constexpr int NAME = 64;                 \
      return __VA_ARGS__();                    \
    } else if ((HEAD_DIM) == 128) {            \
      constexpr int NAME = 128;                \
      return __VA_ARGS__();                    \
    }                                          \
    return cudaErrorInvalidValue;              \
  }()
