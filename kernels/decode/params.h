// Parameters of KV-cache append and split-KV decode attention. Torch-free: raw pointers, int64
// strides in elements, sizes as int; filled by csrc/cuda/decode_cuda.cpp.
//
// Cache storage is seen as pages: element (page, kv-head, slot, d) of k_cache / v_cache lives at
// page * cache_page_stride + head * cache_head_stride + slot * cache_slot_stride + d. Position pos
// of sequence b is in page block_table[b * block_table_batch_stride + pos / page_size] (-1 = none),
// slot pos % page_size; a contiguous cache has block_table == nullptr, page b and
// page_size = max_seqlen. An entry outside [0, num_pages) is never dereferenced: decode gives its
// tokens no weight, append stops before it. The host does not read block_table (that would sync);
// KVCache's check=True refuses such a table beforehand.
#pragma once
#include <cstdint>

namespace forkattn::kernels::decode {

struct DecodeAttentionParams {
  const void* q;          // [B, H, T, D], fp16 or bf16, stride 1 in D
  const void* k_cache;    // pages, see above
  const void* v_cache;    // same shape and strides as k_cache
  const int32_t* block_table;  // [B, pages_per_seq] or nullptr (contiguous)
  const int32_t* seqlens;      // [B] tokens stored per sequence (clamped to [0, max_seqlen])
  void* out;                   // [B, H, T, D], dtype of q
  float* o_partial;            // [num_splits, B, H, T, D] fp32 normalized partial outputs
  float* lse_partial;          // [num_splits, B, H, T] fp32 base-2 log-sum-exp of each partial

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t cache_page_stride, cache_head_stride, cache_slot_stride;  // k_cache and v_cache
  int64_t block_table_batch_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;

  int batch, heads, kv_heads, group;  // group = heads / kv_heads (GQA)
  int new_tokens;                     // T: the last T tokens of each sequence are the queries
  int rows;                           // group * new_tokens: query rows per kv-head
  int head_dim;                       // in {32, 64, 128}
  int page_size, pages_per_seq, max_seqlen;
  int num_pages;                      // pages in the pool (k_cache.size(0)); larger entries are skipped
  int num_splits;                     // chunks per sequence; 1 writes out directly, no merge
  float scale_log2;                   // softmax scale * log2(e)
  bool is_bf16;                       // element type: bf16 if true, else fp16
};

struct KvAppendParams {
  void* k_cache;                // pages, see above
  void* v_cache;
  const int32_t* block_table;   // [B, pages_per_seq] or nullptr (contiguous)
  int32_t* seqlens;             // [B], advanced by the tokens written
  const void* k;                // [B, Hkv, T, D], stride 1 in D
  const void* v;

  int64_t cache_page_stride, cache_head_stride, cache_slot_stride;  // k_cache and v_cache
  int64_t block_table_batch_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;

  int batch, kv_heads, new_tokens, head_dim;
  int elem_bytes;               // 2 (fp16/bf16) or 4 (fp32)
  int page_size, pages_per_seq, max_seqlen;
  int num_pages;                // pages in the pool; a token on a larger entry is not written
};

}  // namespace forkattn::kernels::decode
