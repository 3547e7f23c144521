// Host entry points of DeBERTa's disentangled attention (forkattn.disentangled_attention's kernel
// backends; the Python contract is backends/families.py, DisentangledAttentionBackend).
//
// q [B, H, Lq, D], k and v [B, H, Lk, D] (no GQA), unit stride in D; pos_key / pos_query
// [H or 1, 2 * span, D] in q's dtype (a head stride of 0 when shared), given exactly when c2p / p2c
// is on; rel_index int64 [Lq + Lk - 1], entry (i - j) + Lk - 1 the row delta(i, j) in [0, 2 * span)
// of pos_key / pos_query that query i and key j read; key_padding_mask bool [B, Lk] (true = attend).
//   s[i, j] = scale * (q_i . k_j + [c2p] q_i . pos_key[delta(i, j)] + [p2c] k_j . pos_query[delta(i, j)])
// out = softmax over visible keys of s, times v. A row that sees no key gives zeros, lse = +inf
// and zero gradients; padded keys may hold anything (NaN, inf) and get zero gradients.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>
#include "cpu_dispatch.h"

namespace forkattn {

// Returns (out, lse): out like q in the layout of empty_bhld, lse float32 [B, H, Lq].
// dropout_p in [0, 1) (a ValueError otherwise): attention dropout with the plain attention's mask of
// (b, h, i, j) for `seed` (kernels/common/philox.h), survivors scaled by 1 / (1 - p); lse is the
// undropped softmax's. The backward must get the same dropout_p and seed.
std::tuple<at::Tensor, at::Tensor> disentangled_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& pos_key,
    const std::optional<at::Tensor>& pos_query, const at::Tensor& rel_index,
    const std::optional<at::Tensor>& key_padding_mask, double scale, bool c2p, bool p2c, double dropout_p = 0.0,
    int64_t seed = 0);

// Returns (dq, dk, dv, dpos_key, dpos_query): dq, dk, dv in the layout of empty_bhld; dpos_key /
// dpos_query contiguous [H, 2 * span, D] in q's dtype (summed over the batch in a fixed order, so
// the result does not depend on the thread count), or empty ({0}) for a term that is off or whose
// gradient is not wanted (want_dpos_key / want_dpos_query false: its products are skipped).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> disentangled_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
    double scale, bool c2p, bool p2c, double dropout_p = 0.0, int64_t seed = 0, bool want_dpos_key = true,
    bool want_dpos_query = true);

#ifdef FORKATTN_WITH_CUDA
// CUDA version (kernels/disentangled): fp16/bf16, head_dim 32, 64 or 128, compute capability 8.0+.
// The same contract as the CPU forward; rel_index on q's device (its range is checked with one
// device reduction and a host synchronisation); dropout_p and seed as for the CPU forward.
std::tuple<at::Tensor, at::Tensor> disentangled_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& pos_key,
    const std::optional<at::Tensor>& pos_query, const at::Tensor& rel_index,
    const std::optional<at::Tensor>& key_padding_mask, double scale, bool c2p, bool p2c, double dropout_p = 0.0,
    int64_t seed = 0);

// Backward: the CPU contract (dropout_p and seed too: the mask is redrawn); dpos_key / dpos_query
// are summed with fp32 atomics (their last bits may differ from run to run), Delta =
// rowsum(dout * out) from the stored output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> disentangled_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
    double scale, bool c2p, bool p2c, double dropout_p = 0.0, int64_t seed = 0);

namespace cuda {
// csrc/cuda/disentangled_cuda.cpp: params from checked tensors (pos_key / pos_query [H, rows, D],
// undefined for a term that is off; rel_index contiguous on the device), launch on the current stream.
void disentangled_attention_fwd_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& pos_key, const at::Tensor& pos_query,
                                       const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
                                       double scale, double dropout_p, int64_t seed, at::Tensor& out,
                                       at::Tensor& lse);
// dq, dk, dv written; dpos_key_acc / dpos_query_acc fp32 [H, rows, D] contiguous, zeroed, added to
// (undefined for a term that is off); lse and delta [B, H, Lq] contiguous fp32.
void disentangled_attention_bwd_launch(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& pos_key, const at::Tensor& pos_query,
                                       const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& rel_index,
                                       const std::optional<at::Tensor>& key_padding_mask, double scale,
                                       double dropout_p, int64_t seed, at::Tensor& dq, at::Tensor& dk,
                                       at::Tensor& dv, at::Tensor& dpos_key_acc, at::Tensor& dpos_query_acc);
}  // namespace cuda
#endif  // FORKATTN_WITH_CUDA

namespace cpu {
// Kernels (csrc/cpu/disentangled_cpu.cpp). Inputs are already checked (rel_index's values too);
// pos_key / pos_query are defined tensors [H, 2 * span, D] for the terms that are on (undefined
// otherwise); the outputs are allocated by the caller and fully overwritten.
void disentangled_attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& pos_key, const at::Tensor& pos_query,
                                       const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
                                       float scale, double dropout_p, int64_t seed, at::Tensor& out,
                                       at::Tensor& lse);
void disentangled_attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& pos_key, const at::Tensor& pos_query,
                                       const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rel_index,
                                       const std::optional<at::Tensor>& key_padding_mask, float scale,
                                       double dropout_p, int64_t seed, at::Tensor& dq, at::Tensor& dk,
                                       at::Tensor& dv, at::Tensor& dpos_key, at::Tensor& dpos_query);
}  // namespace cpu

}  // namespace forkattn

// The per-ISA variants of the CPU kernels above (csrc/cpu_dispatch.h).
FORKATTN_CPU_VARIANTS(disentangled_attention_fwd_kernel)
FORKATTN_CPU_VARIANTS(disentangled_attention_bwd_kernel)
