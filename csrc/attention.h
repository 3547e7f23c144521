// Host entry points of fused attention. Layout follows SDPA: q [B, H, Lq, D],
// k and v [B, Hkv, Lk, D] with H % Hkv == 0 (GQA/MQA), optional bool
// key_padding_mask [B, Lk] (true = attend). causal aligns bottom-right when
// Lq != Lk: query i sees keys j <= i + (Lk - Lq). Rows with no visible key give
// zeros and zero gradients; their log-sum-exp is stored as +inf.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>
#include "cpu_dispatch.h"

namespace forkattn {

struct AttnSizes {
  int64_t batch, heads, kv_heads, len_q, len_k, head_dim;
};

// Validates shapes, devices and dtypes of the inputs; returns the sizes.
AttnSizes check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& key_padding_mask);

// check_attention_inputs plus the backward's dout, out (q's shape and dtype) and lse.
AttnSizes check_attention_bwd_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& key_padding_mask);

// dropout_p must be in [0, 1) (a ValueError naming it otherwise).
void check_dropout_p(double dropout_p);

// A backward with nothing to compute (no batch entry, query row, key or head): zero-fills dq, dk, dv
// and returns true, so the caller returns them without a kernel launch.
bool zero_grads_if_empty(const AttnSizes& s, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

// Allocates a [B, H, L, D] tensor whose memory is [B, L, H, D], so that
// out.transpose(1, 2).reshape(B, L, H * D) is a view.
at::Tensor empty_bhld(const at::Tensor& like, int64_t B, int64_t H, int64_t L, int64_t D);

// Returns (out, lse): out like q in layout empty_bhld, lse float32 [B, H, Lq].
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& key_padding_mask,
                                                     bool causal, double scale, double dropout_p = 0.0,
                                                     int64_t seed = 0);

// Returns (dq, dk, dv) with the shapes of q, k, v. dropout_p in [0, 1): attention dropout with
// kernels/common/philox.h's mask of `seed` (a signed int64's bit pattern); the backward redraws it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale, double dropout_p = 0.0, int64_t seed = 0);

// Varlen (packed sequences, FlashAttention's convention): q [total_q, H, D], k and v
// [total_k, Hkv, D], cu_seqlens int32 [B + 1]; sequence b is rows cu[b]..cu[b+1]. Returns out
// [total_q, H, D] contiguous and lse float32 [H, total_q]; the backward returns contiguous dq, dk,
// dv. The CPU versions read and validate cu_seqlens' values (free on the host).
std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, bool causal, double scale,
                                                            double dropout_p = 0.0, int64_t seed = 0);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale, double dropout_p = 0.0,
    int64_t seed = 0);

// Tests only: the CPU kernels' tile matmul (csrc/cpu/tiles.h gemm, the chosen ISA variant and the
// path FORKATTN_CPU_NAIVE_GEMM / FORKATTN_CPU_TILE_GEMM select), column-major BLAS convention, in
// place on c: c = alpha * op(a) op(b) + beta * c over flat fp32 buffers, extents checked.
at::Tensor tile_gemm_cpu(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const at::Tensor& a,
                         int64_t lda, const at::Tensor& b, int64_t ldb, double beta, at::Tensor c, int64_t ldc);

// Shared by the CPU and CUDA varlen entry points and kernels: the packed-sequence view, [total, H, D]
// -> [1, H, total, D], which the padded-batch checks and kernels understand.
at::Tensor packed_as_bhld(const at::Tensor& t);
// dtype/rank/device checks of one cu_seqlens tensor and that both have the same length.
void check_cu_seqlens(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const at::Tensor& q);
// Varlen backward: dout and out shaped like packed q [total_q, H, D], lse float32 [H, total_q];
// checked in the caller's layout before the [1, H, total, D] views go to check_attention_bwd_inputs,
// so a message shows the shapes the caller passed.
void check_varlen_bwd_shapes(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse);

#ifdef FORKATTN_WITH_CUDA
// CUDA versions (csrc/cuda/attention_cuda.cpp): fp16/bf16, head_dim 32, 64
// or 128, sm_80 or newer; same contract as the CPU ones, dropout included (the same mask bit for
// bit). Deterministic (no atomics).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      bool causal, double scale, double dropout_p = 0.0,
                                                      int64_t seed = 0);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale, double dropout_p = 0.0, int64_t seed = 0);

// Varlen (packed sequences): q [total_q, H, D], k and v [total_k, Hkv, D], cu_seqlens int32 [B + 1]
// on the device (their values are not validated here: that would need a host sync); returns
// out [total_q, H, D] contiguous and lse float32 [H, total_q]; the backward returns contiguous
// dq, dk, dv.
std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k, bool causal, double scale,
                                                             double dropout_p = 0.0, int64_t seed = 0);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale, double dropout_p = 0.0,
    int64_t seed = 0);
#endif  // FORKATTN_WITH_CUDA

namespace cpu {
// Kernels (csrc/cpu/attention_cpu.cpp). Inputs are already checked; out/lse and
// dq/dk/dv are allocated by the caller and fully overwritten.
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_padding_mask, bool causal, float scale,
                          double dropout_p, int64_t seed, at::Tensor& out, at::Tensor& lse);
void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          const std::optional<at::Tensor>& key_padding_mask, bool causal, float scale,
                          double dropout_p, int64_t seed, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);
void attention_varlen_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, bool causal, float scale, double dropout_p, int64_t seed,
                                 at::Tensor& out, at::Tensor& lse);
void attention_varlen_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, bool causal, float scale, double dropout_p, int64_t seed,
                                 at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);
void tile_gemm_kernel(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
}  // namespace cpu

}  // namespace forkattn

// The per-ISA variants of the CPU kernels above (csrc/cpu_dispatch.h).
FORKATTN_CPU_VARIANTS(attention_fwd_kernel)
FORKATTN_CPU_VARIANTS(attention_bwd_kernel)
FORKATTN_CPU_VARIANTS(attention_varlen_fwd_kernel)
FORKATTN_CPU_VARIANTS(attention_varlen_bwd_kernel)
FORKATTN_CPU_VARIANTS(tile_gemm_kernel)
