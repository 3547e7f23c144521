// Host side of KV-cache append and decode attention: argument checks shared by the CPU and
// CUDA entry points, output allocation, CPU kernel calls.
#include "decode.h"

#include <ATen/ATen.h>

#include "attention.h"
#include "checks.h"

namespace forkattn {

CacheSizes check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens,
                       const std::optional<at::Tensor>& block_table, int64_t max_seqlen) {
  FA_CHECK_DIM(k_cache, 4);
  FA_CHECK_FLOATING(k_cache);
  FA_CHECK_DTYPE(v_cache, k_cache.scalar_type());
  FA_CHECK_DEVICE(v_cache, k_cache.device());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.strides() == k_cache.strides(), "v_cache must have k_cache's strides ",
                    k_cache.strides(), ", got ", v_cache.strides());
  FA_CHECK_LAST_DIM_CONTIGUOUS(k_cache);
  FA_CHECK_DIM(seqlens, 1);
  FA_CHECK_DTYPE(seqlens, at::kInt);
  FA_CHECK_DEVICE(seqlens, k_cache.device());
  TORCH_CHECK_VALUE(seqlens.is_contiguous(), "seqlens must be contiguous");
  TORCH_CHECK_VALUE(max_seqlen >= 1, "max_seqlen must be at least 1, got ", max_seqlen);
  CacheSizes s{seqlens.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3), k_cache.size(0), 1};
  if (block_table.has_value()) {
    const at::Tensor& block_table_ = *block_table;
    FA_CHECK_DIM(block_table_, 2);
    FA_CHECK_DTYPE(block_table_, at::kInt);
    FA_CHECK_DEVICE(block_table_, k_cache.device());
    FA_CHECK_SIZE(block_table_, 0, s.batch);
    FA_CHECK_LAST_DIM_CONTIGUOUS(block_table_);
    s.pages_per_seq = block_table_.size(1);
    TORCH_CHECK_VALUE(s.pages_per_seq * s.page_size >= max_seqlen, "block_table has ", s.pages_per_seq,
                      " pages of ", s.page_size, " tokens per sequence, fewer than max_seqlen ", max_seqlen);
  } else {
    FA_CHECK_SIZE(k_cache, 0, s.batch);
    TORCH_CHECK_VALUE(k_cache.size(2) >= max_seqlen, "k_cache.size(2) must be at least max_seqlen ", max_seqlen,
                      " for a contiguous cache, got ", k_cache.size(2));
  }
  TORCH_CHECK_VALUE(s.head_dim >= 1 && s.head_dim <= 256, "head_dim (k_cache.size(3)) must be in [1, 256], got ",
                    s.head_dim);
  TORCH_CHECK_VALUE(s.kv_heads >= 1, "k_cache.size(1) (kv heads) must be at least 1");
  return s;
}

int64_t check_append_inputs(const CacheSizes& s, const at::Tensor& k_cache, const at::Tensor& k,
                            const at::Tensor& v) {
  FA_CHECK_DIM(k, 4);
  FA_CHECK_DTYPE(k, k_cache.scalar_type());
  FA_CHECK_DTYPE(v, k_cache.scalar_type());
  FA_CHECK_DEVICE(k, k_cache.device());
  FA_CHECK_DEVICE(v, k_cache.device());
  FA_CHECK_SIZE(k, 0, s.batch);
  FA_CHECK_SIZE(k, 1, s.kv_heads);
  FA_CHECK_SIZE(k, 3, s.head_dim);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  FA_CHECK_LAST_DIM_CONTIGUOUS(k);
  FA_CHECK_LAST_DIM_CONTIGUOUS(v);
  return k.size(2);
}

int64_t check_decode_inputs(const CacheSizes& s, const at::Tensor& k_cache, const at::Tensor& q,
                            const at::Tensor& o_partial, const at::Tensor& lse_partial, int64_t num_splits) {
  FA_CHECK_DIM(q, 4);
  FA_CHECK_DTYPE(q, k_cache.scalar_type());
  FA_CHECK_DEVICE(q, k_cache.device());
  FA_CHECK_SIZE(q, 0, s.batch);
  FA_CHECK_SIZE(q, 3, s.head_dim);
  FA_CHECK_LAST_DIM_CONTIGUOUS(q);
  const int64_t H = q.size(1), T = q.size(2);
  TORCH_CHECK_VALUE(H >= 1 && H % s.kv_heads == 0, "q has ", H, " heads, which must be a multiple of the cache's ",
                    s.kv_heads, " kv heads");
  TORCH_CHECK_VALUE(T >= 1 && T <= 16, "q.size(2) (new tokens) must be in [1, 16], got ", T);
  TORCH_CHECK_VALUE(num_splits >= 1, "num_splits must be at least 1, got ", num_splits);
  if (num_splits > 1) {
    FA_CHECK_DTYPE(o_partial, at::kFloat);
    FA_CHECK_DTYPE(lse_partial, at::kFloat);
    FA_CHECK_DEVICE(o_partial, k_cache.device());
    FA_CHECK_DEVICE(lse_partial, k_cache.device());
    TORCH_CHECK_VALUE(o_partial.is_contiguous() && lse_partial.is_contiguous(), "o_partial and lse_partial must be contiguous");
    TORCH_CHECK_VALUE(o_partial.dim() == 5 && o_partial.size(0) == num_splits && o_partial.size(1) == s.batch &&
                          o_partial.size(2) == H && o_partial.size(3) == T && o_partial.size(4) == s.head_dim,
                      "o_partial must have shape [", num_splits, ", ", s.batch, ", ", H, ", ", T, ", ", s.head_dim,
                      "], got ", o_partial.sizes());
    TORCH_CHECK_VALUE(lse_partial.dim() == 4 && lse_partial.size(0) == num_splits && lse_partial.size(1) == s.batch &&
                          lse_partial.size(2) == H && lse_partial.size(3) == T,
                      "lse_partial must have shape [", num_splits, ", ", s.batch, ", ", H, ", ", T, "], got ",
                      lse_partial.sizes());
  }
  return H;
}

namespace {

// The CPU entry points read lengths and the block table on the host anyway, so they validate them
// whatever KVCache's check says: a negative length, or an entry naming a page outside the pool
// (one the kernel would dereference), raises before anything is read or written. Same texts as
// python/forkattn/decode.py's seqlens_error / block_table_error.
void check_cache_state_cpu(const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table,
                           const CacheSizes& s, int64_t max_seqlen, const char* suffix) {
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0, "seqlens[", b, "] = ", lens[b], " is negative (a sequence's length is at least 0)",
                      suffix);
  }
  if (!block_table.has_value()) return;
  const int32_t* bt = block_table->data_ptr<int32_t>();
  const int64_t stride = block_table->stride(0);
  const int64_t pages = (max_seqlen + s.page_size - 1) / s.page_size;  // the columns a kernel reads
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t j = 0; j < pages; ++j) {
      const int64_t page = bt[b * stride + j];
      TORCH_CHECK_VALUE(page < s.num_pages, "block_table[", b, ", ", j, "] = ", page, ": row ", b, " names page ", page,
                        ", outside the pool [0, num_pages=", s.num_pages,
                        ") (an entry is a page index, or negative for no page)", suffix);
    }
  }
}

}  // namespace

void kv_append_cpu(at::Tensor k_cache, at::Tensor v_cache, at::Tensor seqlens,
                   const std::optional<at::Tensor>& block_table, const at::Tensor& k, const at::Tensor& v,
                   int64_t max_seqlen) {
  const CacheSizes s = check_cache(k_cache, v_cache, seqlens, block_table, max_seqlen);
  TORCH_CHECK_VALUE(k_cache.device().is_cpu(), "k_cache must be a CPU tensor for the cpu backend, got ",
                    k_cache.device());
  check_append_inputs(s, k_cache, k, v);
  check_cache_state_cpu(seqlens, block_table, s, max_seqlen, "; nothing was written");
  const int32_t* bt = block_table ? block_table->data_ptr<int32_t>() : nullptr;
  FORKATTN_CPU_DISPATCH(kv_append_kernel)(k_cache, v_cache, seqlens, bt, block_table ? block_table->stride(0) : 0, k, v,
                        max_seqlen);
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table,
                                const at::Tensor& o_partial, const at::Tensor& lse_partial,
                                int64_t max_seqlen, int64_t num_splits, double scale) {
  const CacheSizes s = check_cache(k_cache, v_cache, seqlens, block_table, max_seqlen);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor for the cpu backend, got ", q.device());
  const int64_t H = check_decode_inputs(s, k_cache, q, o_partial, lse_partial, 1);
  check_cache_state_cpu(seqlens, block_table, s, max_seqlen, "");
  at::Tensor out = empty_bhld(q, s.batch, H, q.size(2), s.head_dim);
  const int32_t* bt = block_table ? block_table->data_ptr<int32_t>() : nullptr;
  FORKATTN_CPU_DISPATCH(decode_kernel)(q, k_cache, v_cache, seqlens, bt, block_table ? block_table->stride(0) : 0, max_seqlen,
                     static_cast<float>(scale), out);
  return out;
}

}  // namespace forkattn
