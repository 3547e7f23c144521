// A packed-panel fp32 GEMM for the CPU inference fast path (issue #18, docs/CPU_INFERENCE.md "A
// packed-panel AVX2 GEMM", "An AVX-512 tile"): y = x @ W^T (+ bias) (+ exact GELU) for nn.Linear's
// weight W [N, K], with W packed once into panels of NR output columns, each panel k-major: a
// [ceil(N / NR), K, NR] float32 tensor, the last panel zero-padded. NR is the CPU kernel variant's
// own (gemm_panel_cols(): 48 for AVX512, 24 for AVX2 / DEFAULT), and a packed weight's last
// dimension is checked against the variant in use, so a weight packed under one variant is never
// read with another's layout. A range of whole panels is a column part of the GEMM, so threads
// split one packed weight by columns without a copy.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "cpu_dispatch.h"

namespace forkattn {


// What the GEMM does to each output element after the sum, in its last store.
enum class GemmEpilogue : int { kNone = 0, kBias = 1, kBiasGelu = 2 };

// Output columns per packed panel in the CPU kernel variant in use (cpu_dispatch.h).
int64_t gemm_panel_cols();

// W [N, K] (float32, CPU, 2-D; any strides) packed into a new [ceil(N / NR), K, NR] float32 tensor,
// NR = gemm_panel_cols().
at::Tensor gemm_pack_cpu(const at::Tensor& w);

// ValueError naming `name` unless w is a contiguous weight packed by gemm_pack_cpu for [N, K] in the
// panel width of the variant in use (a weight packed under another variant names both widths).
void check_packed_weight(const at::Tensor& w, int64_t N, int64_t K, const char* name);

// y[:, n0:n1] = x @ W[n0:n1]^T with the epilogue (`bias` float32 [N] for kBias / kBiasGelu), in
// place: x [M, K] float32 with unit column stride (any row stride), packed from gemm_pack_cpu for
// W [N, K], y [M, N] float32 with unit column stride (any row stride: a column slice of a wider
// buffer). n0 must be a multiple of gemm_panel_cols() (a panel border); n1 <= N. Runs on the
// calling thread.
void gemm_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t N, const std::optional<at::Tensor>& bias,
                     int64_t epilogue, const at::Tensor& y, int64_t n0, int64_t n1);

// Checks of the above without the call (for callers that call the kernel themselves in a loop).
void check_gemm_args(const at::Tensor& x, const at::Tensor& packed, int64_t N, const std::optional<at::Tensor>& bias,
                     int64_t epilogue, const at::Tensor& y, const char* x_name, const char* w_name,
                     const char* y_name);

namespace cpu {
// csrc/cpu/gemm_cpu.cpp. gemm_pack_kernel: w row n at w + n * ldw, unit column stride.
void gemm_pack_kernel(const float* w, int64_t ldw, int64_t N, int64_t K, float* packed);
// The variant's panel width NR. gemm_pack_kernel writes ceil(N / NR) * K * NR floats.
int64_t gemm_panel_width_kernel();
// y + m * ldy + n for n in [n0, n1), n0 % NR == 0; bias (length >= n1) used by kBias / kBiasGelu.
void gemm_kernel(const float* x, int64_t ldx, int64_t M, int64_t K, const float* packed, int64_t n0, int64_t n1,
                 const float* bias, int epilogue, float* y, int64_t ldy);
}  // namespace cpu

}  // namespace forkattn

FORKATTN_CPU_VARIANTS(gemm_panel_width_kernel)
FORKATTN_CPU_VARIANTS(gemm_pack_kernel)
FORKATTN_CPU_VARIANTS(gemm_kernel)
