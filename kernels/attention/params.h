// Parameters of the fused attention kernels (forward and backward). Torch-free: raw pointers,
// int64 strides in elements, sizes as int. Layout follows SDPA: q [B, H, Lq, D], k and v
// [B, Hkv, Lk, D] with H % Hkv == 0; every tensor has stride 1 in D and 16-byte aligned rows
// (the host glue copies inputs that are not). causal is bottom-right aligned: query i sees
// key j iff j <= i + (Lk - Lq).
#pragma once
#include <cstdint>

namespace forkattn::kernels::attention {

struct AttentionFwdParams {
  const void* q;  // [B, H, Lq, D], fp16 or bf16
  const void* k;  // [B, Hkv, Lk, D]
  const void* v;  // [B, Hkv, Lk, D]
  const bool* key_padding_mask;  // [B, Lk], true = attend, stride 1 in Lk; nullptr = no mask
  void* out;                     // [B, H, Lq, D], written (zeros on rows that see no key)
  float* lse;  // [B, H, Lq] (varlen: [H, total_q]), natural log; +inf on rows that see no key.
               // forward: written; backward: read

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  int64_t mask_batch_stride;
  // lse (and the backward's delta): row i of (b, h) at b * lse_batch_stride + h * lse_head_stride
  // + i, plus cu_seqlens_q[b] for varlen
  int64_t lse_batch_stride, lse_head_stride;

  // Varlen (packed sequences, FlashAttention's convention): sequence b is rows
  // cu_seqlens_q[b]..cu_seqlens_q[b+1] of q/out/dout/dq and cu_seqlens_k[b].. of k/v/dk/dv, the
  // batch strides are 0 and len_q/len_k are the maximum lengths (they size the grid).
  // nullptr = a padded batch of len_q/len_k rows each.
  const int* cu_seqlens_q;  // [B + 1] int32, device
  const int* cu_seqlens_k;  // [B + 1] int32, device

  int batch, heads, kv_heads;  // kv_heads divides heads (GQA/MQA)
  int len_q, len_k, head_dim;  // head_dim in {32, 64, 128}; varlen: maximum lengths
  float scale;       // softmax scale (usually head_dim ** -0.5)
  float scale_log2;  // scale * log2(e): the kernels work with exp2
  bool causal;
  bool is_bf16;  // element type: bf16 if true, else fp16

  // Attention dropout (kernels/common/philox.h's mask of (b, h, i, j), i and j counted inside the
  // sequence; b the sequence for varlen): each probability is kept iff its u16 >= dropout_threshold,
  // survivors scaled by dropout_scale. dropout false (p = 0) picks the instantiations without it.
  bool dropout;
  uint32_t dropout_threshold;  // dropout_threshold16(p)
  float dropout_scale;         // 1 / (1 - p)
  uint64_t dropout_seed;       // Philox key (a signed int64's bit pattern)
};

struct AttentionBwdParams : AttentionFwdParams {
  const void* dout;  // [B, H, Lq, D], gradient of out (out itself is AttentionFwdParams::out, read)
  void* dq;          // [B, H, Lq, D], written
  void* dk;          // [B, Hkv, Lk, D], written (summed over the query heads of a group)
  void* dv;          // [B, Hkv, Lk, D], written
  float* delta;      // workspace laid out like lse: rowsum(dout * out)

  int64_t dout_batch_stride, dout_head_stride, dout_row_stride;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
};

}  // namespace forkattn::kernels::attention
