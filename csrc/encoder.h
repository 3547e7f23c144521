// Host entry points of the fused element-wise steps of a BERT encoder layer on CPU (issue #18's
// inference path, python/forkattn/models/bert.py): the epilogues that follow the layer's GEMMs, so
// that each is one pass over the GEMM output instead of a bias add, an activation or residual add
// and a LayerNorm as separate ATen ops (each its own pass and OpenMP region).
//
// Both work in place on x, a contiguous float32 tensor whose last dimension is the feature
// dimension C; every other dimension is flattened into rows. bias, weight and ln_bias are
// contiguous float32 [C]; residual has x's shape and is contiguous (it may not alias x).
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "cpu_dispatch.h"

namespace forkattn {

// x = gelu(x + bias), the exact (erf) GELU of torch.nn.functional.gelu.
void bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias);

// x = LayerNorm(x + bias + residual) * weight + ln_bias over the last dimension, with eps inside the
// square root as torch.nn.functional.layer_norm: BERT's "dense -> dropout (none in eval) -> add ->
// LayerNorm" after the attention output projection and after the FFN.
void bias_residual_layernorm_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& bias,
                                 const at::Tensor& weight, const at::Tensor& ln_bias, double eps);

// One BERT encoder layer (post-LN, exact GELU, no mask, eval) in one call, on `threads` threads that
// take row blocks (`chunks` per sequence) and never wait for a helper that has not started
// (csrc/encoder_layer.cpp). x [B, L, H] contiguous float32; qkv_w the concatenated [3H, H] weight
// (and the others) packed for oneDNN by torch.ops.mkldnn._reorder_linear_weight when `packed`, else
// plain [out, in]; biases and LayerNorm parameters float32 [features]. Returns a new [B, L, H].
at::Tensor encoder_layer_cpu(const at::Tensor& x, const at::Tensor& qkv_w, const at::Tensor& qkv_b,
                             const at::Tensor& attn_out_w, const at::Tensor& attn_out_b, const at::Tensor& ln1_w,
                             const at::Tensor& ln1_b, double ln1_eps, const at::Tensor& inter_w,
                             const at::Tensor& inter_b, const at::Tensor& out_w, const at::Tensor& out_b,
                             const at::Tensor& ln2_w, const at::Tensor& ln2_b, double ln2_eps, int64_t heads,
                             bool packed, int64_t chunks, int64_t threads);

// The same layer over packed sequences: x [T, H] contiguous float32 holds the tokens of sequence b
// at rows [cu_seqlens[b], cu_seqlens[b + 1]) (cu_seqlens [batch + 1], int32 or int64, CPU, from 0
// to T, non-decreasing; an empty sequence is allowed); `chunks` row blocks over all T rows, each
// attending per sequence. Returns a new [T, H].
at::Tensor encoder_layer_varlen_cpu(const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& qkv_w,
                                    const at::Tensor& qkv_b, const at::Tensor& attn_out_w,
                                    const at::Tensor& attn_out_b, const at::Tensor& ln1_w, const at::Tensor& ln1_b,
                                    double ln1_eps, const at::Tensor& inter_w, const at::Tensor& inter_b,
                                    const at::Tensor& out_w, const at::Tensor& out_b, const at::Tensor& ln2_w,
                                    const at::Tensor& ln2_b, double ln2_eps, int64_t heads, bool packed,
                                    int64_t chunks, int64_t threads);

// The same layer with every GEMM split over output columns instead of rows (csrc/encoder_layer.cpp:
// for few rows per thread, batch 1, where each thread's GEMM keeps all rows): qkv_w, attn_out_w,
// inter_w and out_w are lists of column parts ([n_p, in], plain or each packed by
// torch.ops.mkldnn._reorder_linear_weight when `packed`; part p gives the output columns after the
// parts before it), one chunk per part; attention and the LayerNorm steps run over `chunks` row
// blocks. Other arguments and the result as encoder_layer_varlen_cpu.
at::Tensor encoder_layer_cols_cpu(const at::Tensor& x, const at::Tensor& cu_seqlens, const std::vector<at::Tensor>& qkv_w,
                                  const at::Tensor& qkv_b, const std::vector<at::Tensor>& attn_out_w,
                                  const at::Tensor& attn_out_b, const at::Tensor& ln1_w, const at::Tensor& ln1_b,
                                  double ln1_eps, const std::vector<at::Tensor>& inter_w, const at::Tensor& inter_b,
                                  const std::vector<at::Tensor>& out_w, const at::Tensor& out_b,
                                  const at::Tensor& ln2_w, const at::Tensor& ln2_b, double ln2_eps, int64_t heads,
                                  bool packed, int64_t chunks, int64_t threads);

namespace cpu {
// csrc/cpu/encoder_cpu.cpp: x holds rows x cols floats, rows in parallel (small problems on one thread).
void bias_gelu_kernel(float* x, const float* bias, int64_t rows, int64_t cols);
void bias_residual_layernorm_kernel(float* x, const float* residual, const float* bias, const float* weight,
                                    const float* ln_bias, float eps, int64_t rows, int64_t cols);
}  // namespace cpu

}  // namespace forkattn

// The per-ISA variants of the CPU kernels above (csrc/cpu_dispatch.h).
FORKATTN_CPU_VARIANTS(bias_gelu_kernel)
FORKATTN_CPU_VARIANTS(bias_residual_layernorm_kernel)
