// A packed-panel fp32 GEMM for the CPU inference fast path (issue #18, docs/CPU_INFERENCE.md "A
// packed-panel AVX2 GEMM"): y = x @ W^T (+ bias) (+ exact GELU) for nn.Linear's weight W [N, K],
// with W packed once into panels of kGemmNR output columns, each panel k-major ([K][kGemmNR],
// the last one zero-padded): ceil(N / kGemmNR) * K * kGemmNR floats in all. A range of whole panels
// is a column part of the GEMM, so threads split one packed weight by columns without a copy.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "cpu_dispatch.h"

namespace forkattn {

constexpr int64_t kGemmNR = 24;  // output columns per packed panel (csrc/cpu/gemm_cpu.cpp: the 4 x 24 tile)

// What the GEMM does to each output element after the sum, in its last store.
enum class GemmEpilogue : int { kNone = 0, kBias = 1, kBiasGelu = 2 };

// Floats of W [N, K] packed into panels.
inline int64_t gemm_packed_numel(int64_t N, int64_t K) { return (N + kGemmNR - 1) / kGemmNR * kGemmNR * K; }

// W [N, K] (float32, CPU, 2-D; any strides) packed into a new 1-D float32 tensor of
// gemm_packed_numel(N, K) floats.
at::Tensor gemm_pack_cpu(const at::Tensor& w);

// y[:, n0:n1] = x @ W[n0:n1]^T with the epilogue (`bias` float32 [N] for kBias / kBiasGelu), in
// place: x [M, K] float32 with unit column stride (any row stride), packed from gemm_pack_cpu for
// W [N, K], y [M, N] float32 with unit column stride (any row stride: a column slice of a wider
// buffer). n0 must be a multiple of kGemmNR (a panel border); n1 <= N. Runs on the calling thread.
void gemm_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t N, const std::optional<at::Tensor>& bias,
                     int64_t epilogue, const at::Tensor& y, int64_t n0, int64_t n1);

// Checks of the above without the call (for callers that call the kernel themselves in a loop).
void check_gemm_args(const at::Tensor& x, const at::Tensor& packed, int64_t N, const std::optional<at::Tensor>& bias,
                     int64_t epilogue, const at::Tensor& y, const char* x_name, const char* w_name,
                     const char* y_name);

namespace cpu {
// csrc/cpu/gemm_cpu.cpp. gemm_pack_kernel: w row n at w + n * ldw, unit column stride.
void gemm_pack_kernel(const float* w, int64_t ldw, int64_t N, int64_t K, float* packed);
// y + m * ldy + n for n in [n0, n1), n0 % kGemmNR == 0; bias (length >= n1) used by kBias / kBiasGelu.
void gemm_kernel(const float* x, int64_t ldx, int64_t M, int64_t K, const float* packed, int64_t n0, int64_t n1,
                 const float* bias, int epilogue, float* y, int64_t ldy);
}  // namespace cpu

}  // namespace forkattn

FORKATTN_CPU_VARIANTS(gemm_pack_kernel)
FORKATTN_CPU_VARIANTS(gemm_kernel)
