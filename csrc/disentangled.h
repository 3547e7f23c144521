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
std::tuple<at::Tensor, at::Tensor> disentangled_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& pos_key,
    const std::optional<at::Tensor>& pos_query, const at::Tensor& rel_index,
    const std::optional<at::Tensor>& key_padding_mask, double scale, bool c2p, bool p2c);

// Returns (dq, dk, dv, dpos_key, dpos_query): dq, dk, dv in the layout of empty_bhld; dpos_key /
// dpos_query contiguous [H, 2 * span, D] in q's dtype (summed over the batch in a fixed order, so
// the result does not depend on the thread count), or empty ({0}) for a term that is off.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> disentangled_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
    double scale, bool c2p, bool p2c);

namespace cpu {
// Kernels (csrc/cpu/disentangled_cpu.cpp). Inputs are already checked (rel_index's values too);
// pos_key / pos_query are defined tensors [H, 2 * span, D] for the terms that are on (undefined
// otherwise); the outputs are allocated by the caller and fully overwritten.
void disentangled_attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& pos_key, const at::Tensor& pos_query,
                                       const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
                                       float scale, at::Tensor& out, at::Tensor& lse);
void disentangled_attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& pos_key, const at::Tensor& pos_query,
                                       const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rel_index,
                                       const std::optional<at::Tensor>& key_padding_mask, float scale,
                                       at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dpos_key,
                                       at::Tensor& dpos_query);
}  // namespace cpu

}  // namespace forkattn

// The per-ISA variants of the CPU kernels above (csrc/cpu_dispatch.h).
FORKATTN_CPU_VARIANTS(disentangled_attention_fwd_kernel)
FORKATTN_CPU_VARIANTS(disentangled_attention_bwd_kernel)
