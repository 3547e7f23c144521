// Host entry points of KV-cache append and decode attention.
//
// Cache storage is seen by every kernel as pages: k_cache, v_cache [num_pages, Hkv, page_size, D]
// with an int32 block_table [B, pages_per_seq] (page index, -1 = none), or, when block_table is
// absent, the contiguous layout [B, Hkv, max_seqlen, D] read as page b of sequence b with
// page_size = max_seqlen. seqlens int32 [B] holds the tokens stored per sequence.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include "cpu_dispatch.h"

namespace forkattn {

struct CacheSizes {
  int64_t batch, kv_heads, page_size, head_dim, num_pages, pages_per_seq;
};

// Validates the cache tensors (shapes, dtypes, devices, strides); returns the sizes.
CacheSizes check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens,
                       const std::optional<at::Tensor>& block_table, int64_t max_seqlen);
// Validates k, v [B, Hkv, T, D] against the cache; returns T.
int64_t check_append_inputs(const CacheSizes& s, const at::Tensor& k_cache, const at::Tensor& k,
                            const at::Tensor& v);
// Validates q [B, H, T, D] and the split-KV workspace; returns the number of query heads.
int64_t check_decode_inputs(const CacheSizes& s, const at::Tensor& k_cache, const at::Tensor& q,
                            const at::Tensor& o_partial, const at::Tensor& lse_partial, int64_t num_splits);

// Writes k, v at positions seqlens[b] + t, advances seqlens; tokens that do not fit are dropped.
void kv_append_cpu(at::Tensor k_cache, at::Tensor v_cache, at::Tensor seqlens,
                   const std::optional<at::Tensor>& block_table, const at::Tensor& k, const at::Tensor& v,
                   int64_t max_seqlen);
// out [B, H, T, D] with [B, T, H, D] memory. The CPU kernel does not split (o_partial unused).
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table,
                                const at::Tensor& o_partial, const at::Tensor& lse_partial,
                                int64_t max_seqlen, int64_t num_splits, double scale);
#ifdef FORKATTN_WITH_CUDA
void kv_append_cuda(at::Tensor k_cache, at::Tensor v_cache, at::Tensor seqlens,
                    const std::optional<at::Tensor>& block_table, const at::Tensor& k, const at::Tensor& v,
                    int64_t max_seqlen);
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table,
                                 const at::Tensor& o_partial, const at::Tensor& lse_partial,
                                 int64_t max_seqlen, int64_t num_splits, double scale);
#endif  // FORKATTN_WITH_CUDA

namespace cpu {
// csrc/cpu/decode_cpu.cpp; inputs already checked.
void kv_append_kernel(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& seqlens, const int32_t* block_table,
                      int64_t block_table_batch_stride, const at::Tensor& k, const at::Tensor& v, int64_t max_seqlen);
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& seqlens, const int32_t* block_table, int64_t block_table_batch_stride,
                   int64_t max_seqlen, float scale, at::Tensor& out);
}  // namespace cpu

}  // namespace forkattn

// The per-ISA variants of the CPU kernels above (csrc/cpu_dispatch.h).
FORKATTN_CPU_VARIANTS(kv_append_kernel)
FORKATTN_CPU_VARIANTS(decode_kernel)
