// Parameters of KV-cache append and split-KV decode attention. Torch-free: filled by
// csrc/cuda/decode_cuda.cpp, read by the kernels in kernels/decode/.
//
// Cache storage is seen as pages: element (page, kv-head, slot, d) of k_cache / v_cache lives at
// page * c_page + head * c_head + slot * c_slot + d. Position pos of sequence b is in page
// block_table[b * bt_b + pos / page_size] (-1 = none), slot pos % page_size; a contiguous cache
// has block_table == nullptr, page b and page_size = max_seqlen. An entry outside [0, num_pages)
// is never dereferenced: decode gives its tokens no weight, append stops before it. The host does
// not read block_table (that would sync); KVCache's check=True refuses such a table beforehand.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace forkattn {

enum class DecodeDType { kHalf, kBFloat16 };

struct DecodeParams {
  const void* q;                        // [B, H, T, D], stride 1 in D
  int64_t q_b, q_h, q_t;                // strides of q, elements
  const void* k_cache;                  // pages, see above
  const void* v_cache;                  // same shape and strides as k_cache
  int64_t c_page, c_head, c_slot;       // strides of k_cache / v_cache, elements
  const int32_t* block_table;           // [B, pages_per_seq] or nullptr (contiguous)
  int64_t bt_b;                         // row stride of block_table
  const int32_t* seqlens;               // [B] tokens stored per sequence (clamped to [0, max_seqlen])
  void* out;                            // [B, H, T, D], dtype of q
  int64_t o_b, o_h, o_t;                // strides of out, elements
  float* o_partial;                     // [num_splits, B, H, T, D] fp32 normalized partial outputs
  float* lse_partial;                   // [num_splits, B, H, T] fp32 base-2 log-sum-exp of each partial
  int batch, heads, kv_heads, group;    // group = heads / kv_heads (GQA)
  int new_tokens;                       // T: the last T tokens of each sequence are the queries
  int rows;                             // group * new_tokens: query rows per kv-head
  int page_size, pages_per_seq, max_seqlen;
  int num_pages;                        // pages in the pool (k_cache.size(0)); larger entries are skipped
  int num_splits;                       // chunks per sequence; 1 writes out directly, no merge
  float scale_log2;                     // softmax scale * log2(e)
};

struct AppendParams {
  void* k_cache;                        // pages, see above
  void* v_cache;
  int64_t c_page, c_head, c_slot;       // strides of k_cache / v_cache, elements
  const int32_t* block_table;           // [B, pages_per_seq] or nullptr (contiguous)
  int64_t bt_b;
  int32_t* seqlens;                     // [B], advanced by the tokens written
  const void* k;                        // [B, Hkv, T, D], stride 1 in D
  const void* v;
  int64_t k_b, k_h, k_t, v_b, v_h, v_t; // strides of k and v, elements
  int batch, kv_heads, new_tokens, head_dim;
  int elem_bytes;                       // 2 (fp16/bf16) or 4 (fp32)
  int page_size, pages_per_seq, max_seqlen;
  int num_pages;                        // pages in the pool; a token on a larger entry is not written
};

// kernels/decode/decode_dispatch.cu: picks the instantiation for (dtype, head_dim 32/64/128).
cudaError_t run_decode(const DecodeParams& params, DecodeDType dtype, int head_dim, cudaStream_t stream);
// kernels/decode/kv_append.cu: one launch, one block per sequence; never writes out of bounds.
cudaError_t run_kv_append(const AppendParams& params, cudaStream_t stream);

// One instantiation per (dtype, head_dim), in its own generated .cu file.
template <typename T, int D>
cudaError_t run_decode_(const DecodeParams& params, cudaStream_t stream);

}  // namespace forkattn
