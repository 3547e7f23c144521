// CUDA host glue of KV-cache append and decode attention: shared checks (csrc/decode.cpp),
// params filling, the current stream, a launch-error check. Compiled only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "attention.h"
#include "decode.h"
#include "decode/api.h"

namespace forkattn {
namespace {

using kernels::decode::DecodeAttentionParams;
using kernels::decode::KvAppendParams;

void check_cuda_cache(const at::Tensor& k_cache, const CacheSizes& s) {
  TORCH_CHECK_VALUE(k_cache.is_cuda(), "k_cache must be a CUDA tensor for the cuda backend, got ", k_cache.device());
  const int64_t per16 = 16 / static_cast<int64_t>(k_cache.element_size());
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 && k_cache.stride(0) % per16 == 0 &&
                        k_cache.stride(1) % per16 == 0 && k_cache.stride(2) % per16 == 0,
                    "k_cache and v_cache must be 16-byte aligned with strides a multiple of 16 bytes for the cuda "
                    "backend, got strides ", k_cache.strides());
  TORCH_CHECK_VALUE(s.page_size <= INT32_MAX && s.num_pages <= INT32_MAX, "cache too large for int32 indexing");
}

// The cache fields both params structs share: pointers, strides and sizes of the paged cache.
template <typename Params>
void fill_cache(Params& p, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens,
                const std::optional<at::Tensor>& block_table, const CacheSizes& s, int64_t max_seqlen) {
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_table = block_table ? block_table->data_ptr<int32_t>() : nullptr;
  p.seqlens = seqlens.data_ptr<int32_t>();
  p.cache_page_stride = k_cache.stride(0);
  p.cache_head_stride = k_cache.stride(1);
  p.cache_slot_stride = k_cache.stride(2);
  p.block_table_batch_stride = block_table ? block_table->stride(0) : 0;
  p.page_size = static_cast<int>(s.page_size);
  p.pages_per_seq = static_cast<int>((max_seqlen + s.page_size - 1) / s.page_size);
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.num_pages = static_cast<int>(s.num_pages);
}

}  // namespace

void kv_append_cuda(at::Tensor k_cache, at::Tensor v_cache, at::Tensor seqlens,
                    const std::optional<at::Tensor>& block_table, const at::Tensor& k, const at::Tensor& v,
                    int64_t max_seqlen) {
  const CacheSizes s = check_cache(k_cache, v_cache, seqlens, block_table, max_seqlen);
  TORCH_CHECK_VALUE(k_cache.is_cuda(), "k_cache must be a CUDA tensor for the cuda backend, got ", k_cache.device());
  const int64_t T = check_append_inputs(s, k_cache, k, v);
  TORCH_CHECK_VALUE(s.num_pages <= INT32_MAX, "k_cache has ", s.num_pages, " pages, more than int32 indexing allows");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  KvAppendParams p{};
  fill_cache(p, k_cache, v_cache, seqlens, block_table, s, max_seqlen);
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.batch = static_cast<int>(s.batch);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.new_tokens = static_cast<int>(T);
  p.head_dim = static_cast<int>(s.head_dim);
  p.elem_bytes = static_cast<int>(k_cache.element_size());
  const cudaError_t err = kernels::decode::kv_append(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "kv_append (cuda) launch failed: ", cudaGetErrorString(err));
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table,
                                 const at::Tensor& o_partial, const at::Tensor& lse_partial,
                                 int64_t max_seqlen, int64_t num_splits, double scale) {
  const CacheSizes s = check_cache(k_cache, v_cache, seqlens, block_table, max_seqlen);
  check_cuda_cache(k_cache, s);
  const int64_t H = check_decode_inputs(s, k_cache, q, o_partial, lse_partial, num_splits);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "q must be float16 or bfloat16 for the cuda backend, got ", q.scalar_type());
  TORCH_CHECK_VALUE(s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 128,
                    "head_dim must be 32, 64 or 128 for the cuda backend, got ", s.head_dim);
  TORCH_CHECK_VALUE(num_splits <= 65535, "num_splits must be at most 65535, got ", num_splits);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t T = q.size(2);
  at::Tensor out = empty_bhld(q, s.batch, H, T, s.head_dim);
  DecodeAttentionParams p{};
  fill_cache(p, k_cache, v_cache, seqlens, block_table, s, max_seqlen);
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.o_partial = num_splits > 1 ? o_partial.data_ptr<float>() : nullptr;
  p.lse_partial = num_splits > 1 ? lse_partial.data_ptr<float>() : nullptr;
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.out_batch_stride = out.stride(0), p.out_head_stride = out.stride(1), p.out_row_stride = out.stride(2);
  p.batch = static_cast<int>(s.batch);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.group = static_cast<int>(H / s.kv_heads);
  p.new_tokens = static_cast<int>(T);
  p.rows = p.group * p.new_tokens;
  p.head_dim = static_cast<int>(s.head_dim);
  p.num_splits = static_cast<int>(num_splits);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  const cudaError_t err = kernels::decode::decode_attention(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "decode_attention (cuda) launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace forkattn
