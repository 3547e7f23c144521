// Parameters of the fused disentangled-attention kernels (DeBERTa-v2/v3). Torch-free: raw
// pointers, int64 strides in elements, sizes as int. q [B, H, Lq, D], k and v [B, H, Lk, D] (no
// GQA), pos_key / pos_query [H, rows, D] (head stride 0 when shared by the heads); every tensor
// has stride 1 in D and 16-byte aligned rows (the host glue copies inputs that are not).
//   s[i, j] = scale * (q_i . k_j + [c2p] q_i . pos_key[rel[i - j + Lk - 1]]
//                                + [p2c] k_j . pos_query[rel[i - j + Lk - 1]])
// over visible keys (key_padding_mask true); a row that sees no key gives zeros and lse = +inf.
#pragma once
#include <cstdint>

namespace forkattn::kernels::disentangled {

struct DisentangledFwdParams {
  const void* q;          // [B, H, Lq, D], fp16 or bf16
  const void* k;          // [B, H, Lk, D]
  const void* v;          // [B, H, Lk, D]
  const void* pos_key;    // [H, rows, D]; read when c2p
  const void* pos_query;  // [H, rows, D]; read when p2c
  const int64_t* rel_index;      // [Lq + Lk - 1] device, every entry in [0, rows) (checked by the host)
  const bool* key_padding_mask;  // [B, Lk], true = attend, stride 1 in Lk; nullptr = no mask
  void* out;                     // [B, H, Lq, D], written
  float* lse;                    // [B, H, Lq], natural log, +inf on rows that see no key; written

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t pk_head_stride, pk_row_stride;
  int64_t pq_head_stride, pq_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  int64_t mask_batch_stride;
  int64_t lse_batch_stride, lse_head_stride;  // row i of (b, h) at b * lse_batch_stride + h * lse_head_stride + i

  int batch, heads;
  int len_q, len_k, head_dim;  // head_dim in {32, 64, 128}
  float scale;                 // DeBERTa's: 1 / sqrt(head_dim * (1 + c2p + p2c)) unless given
  float scale_log2;            // scale * log2(e): the kernels work with exp2
  bool c2p, p2c;
  bool is_bf16;  // element type: bf16 if true, else fp16

  // Attention dropout, exactly the plain attention's (kernels/attention/params.h): probability
  // (b, h, i, j) is kept iff kernels/common/philox.h's u16 for the seed >= dropout_threshold, the
  // survivors scaled by dropout_scale; lse stays the undropped softmax's. dropout false (p = 0)
  // picks the instantiations without a line of it. The backward redraws the same mask.
  bool dropout;
  uint32_t dropout_threshold;  // dropout_threshold16(p)
  float dropout_scale;         // 1 / (1 - p)
  uint64_t dropout_seed;       // Philox key (a signed int64's bit pattern)
};

// The backward: dq (with the c2p term's dpos_key) per query block, dk and dv (with the p2c term's
// dpos_query) per key block. delta = rowsum(dout * out) comes in (the host computes it); the
// position gradients are fp32 accumulators [H, rows, D] with unit stride in D, zeroed by the host,
// summed into with atomics and left unscaled (the host multiplies by scale).
struct DisentangledBwdParams : DisentangledFwdParams {
  const void* dout;  // [B, H, Lq, D]
  void* dq;          // [B, H, Lq, D], written
  void* dk;          // [B, H, Lk, D], written (zeros at padded keys)
  void* dv;          // [B, H, Lk, D], written (zeros at padded keys)
  const float* delta;  // laid out like lse
  float* dpos_key;     // [H, rows, D] fp32, added to (c2p)
  float* dpos_query;   // [H, rows, D] fp32, added to (p2c)

  int64_t dout_batch_stride, dout_head_stride, dout_row_stride;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
  int64_t dpos_head_stride, dpos_row_stride;  // of both accumulators
};

}  // namespace forkattn::kernels::disentangled
