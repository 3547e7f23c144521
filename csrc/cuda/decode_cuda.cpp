// CUDA host glue of KV-cache append and decode attention: shared checks (csrc/decode.cpp),
// params filling, the current stream, a launch-error check. Compiled only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "attention.h"
#include "decode.h"
#include "decode/decode_params.h"

namespace forkattn {
namespace {

void check_cuda_cache(const at::Tensor& k_cache, const CacheSizes& s) {
  TORCH_CHECK_VALUE(k_cache.is_cuda(), "k_cache must be a CUDA tensor for the cuda backend, got ", k_cache.device());
  const int64_t per16 = 16 / static_cast<int64_t>(k_cache.element_size());
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 && k_cache.stride(0) % per16 == 0 &&
                        k_cache.stride(1) % per16 == 0 && k_cache.stride(2) % per16 == 0,
                    "k_cache and v_cache must be 16-byte aligned with strides a multiple of 16 bytes for the cuda "
                    "backend, got strides ", k_cache.strides());
  TORCH_CHECK_VALUE(s.page_size <= INT32_MAX && s.num_pages <= INT32_MAX, "cache too large for int32 indexing");
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
  AppendParams p{};
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.c_page = k_cache.stride(0);
  p.c_head = k_cache.stride(1);
  p.c_slot = k_cache.stride(2);
  p.block_table = block_table ? block_table->data_ptr<int32_t>() : nullptr;
  p.bt_b = block_table ? block_table->stride(0) : 0;
  p.seqlens = seqlens.data_ptr<int32_t>();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_b = k.stride(0);
  p.k_h = k.stride(1);
  p.k_t = k.stride(2);
  p.v_b = v.stride(0);
  p.v_h = v.stride(1);
  p.v_t = v.stride(2);
  p.batch = static_cast<int>(s.batch);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.new_tokens = static_cast<int>(T);
  p.head_dim = static_cast<int>(s.head_dim);
  p.elem_bytes = static_cast<int>(k_cache.element_size());
  p.page_size = static_cast<int>(s.page_size);
  p.pages_per_seq = static_cast<int>((max_seqlen + s.page_size - 1) / s.page_size);
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.num_pages = static_cast<int>(s.num_pages);
  const cudaError_t err = run_kv_append(p, c10::cuda::getCurrentCUDAStream().stream());
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
  DecodeParams p{};
  p.q = q.data_ptr();
  p.q_b = q.stride(0);
  p.q_h = q.stride(1);
  p.q_t = q.stride(2);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.c_page = k_cache.stride(0);
  p.c_head = k_cache.stride(1);
  p.c_slot = k_cache.stride(2);
  p.block_table = block_table ? block_table->data_ptr<int32_t>() : nullptr;
  p.bt_b = block_table ? block_table->stride(0) : 0;
  p.seqlens = seqlens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.o_b = out.stride(0);
  p.o_h = out.stride(1);
  p.o_t = out.stride(2);
  p.o_partial = num_splits > 1 ? o_partial.data_ptr<float>() : nullptr;
  p.lse_partial = num_splits > 1 ? lse_partial.data_ptr<float>() : nullptr;
  p.batch = static_cast<int>(s.batch);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.group = static_cast<int>(H / s.kv_heads);
  p.new_tokens = static_cast<int>(T);
  p.rows = p.group * p.new_tokens;
  p.page_size = static_cast<int>(s.page_size);
  p.pages_per_seq = static_cast<int>((max_seqlen + s.page_size - 1) / s.page_size);
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.num_pages = static_cast<int>(s.num_pages);
  p.num_splits = static_cast<int>(num_splits);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const DecodeDType dt = q.scalar_type() == at::kHalf ? DecodeDType::kHalf : DecodeDType::kBFloat16;
  const cudaError_t err = run_decode(p, dt, static_cast<int>(s.head_dim), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "decode_attention (cuda) launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace forkattn
