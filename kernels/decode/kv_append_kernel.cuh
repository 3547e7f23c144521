// KV-cache append: one launch, one block per sequence. Thread 0 counts how many of the T new
// tokens fit (stopping at the first position >= max_seqlen or on a missing page: an entry < 0 or
// >= num_pages, so nothing is ever written out of bounds: the "clamp" of the no-check mode), the block copies them in
// 16-byte vectors (element-wise when a row is not 16-byte aligned), then thread 0 advances
// seqlens[b]. Only block b reads or writes seqlens[b], so there is no cross-block race and the
// launch is CUDA-graph capturable. Launched by kv_append() in launch.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "decode/params.h"

namespace forkattn::kernels::decode {

constexpr int kAppendThreads = 256;

template <typename V>
__global__ void __launch_bounds__(kAppendThreads) kv_append_kernel(const KvAppendParams p) {
  const int b = blockIdx.x;
  __shared__ int s_len, s_n;
  if (threadIdx.x == 0) {
    const int L = p.seqlens[b];
    int n = 0;
    if (L >= 0) {
      for (; n < p.new_tokens; ++n) {
        const int64_t pos = static_cast<int64_t>(L) + n;
        if (pos >= p.max_seqlen) break;
        if (p.block_table != nullptr) {
          const int64_t lp = pos / p.page_size;
          if (lp >= p.pages_per_seq) break;
          const int page = p.block_table[b * p.block_table_batch_stride + lp];
          if (page < 0 || page >= p.num_pages) break;
        }
      }
    }
    s_len = L;
    s_n = n;
  }
  __syncthreads();
  const int L = s_len, n = s_n;
  // V is the copy unit; strides are in elements of elem_bytes.
  constexpr int kUnit = sizeof(V);
  const int per_elem = kUnit / p.elem_bytes > 0 ? kUnit / p.elem_bytes : 1;
  const int units = p.head_dim / per_elem;  // units per row
  const int64_t total = static_cast<int64_t>(n) * p.kv_heads * units;
  char* kc = static_cast<char*>(p.k_cache);
  char* vc = static_cast<char*>(p.v_cache);
  const char* kp = static_cast<const char*>(p.k);
  const char* vp = static_cast<const char*>(p.v);
  const int64_t eb = p.elem_bytes;
  for (int64_t idx = threadIdx.x; idx < total; idx += kAppendThreads) {
    const int t = static_cast<int>(idx / (static_cast<int64_t>(p.kv_heads) * units));
    const int h = static_cast<int>((idx / units) % p.kv_heads);
    const int u = static_cast<int>(idx % units);
    const int pos = L + t;
    const int64_t page =
        p.block_table != nullptr ? p.block_table[b * p.block_table_batch_stride + pos / p.page_size] : b;
    const int64_t slot = pos % p.page_size;
    const int64_t dst = (page * p.cache_page_stride + h * p.cache_head_stride + slot * p.cache_slot_stride) * eb +
                        static_cast<int64_t>(u) * kUnit;
    const int64_t ks = (b * p.k_batch_stride + h * p.k_head_stride + t * p.k_row_stride) * eb +
                       static_cast<int64_t>(u) * kUnit;
    const int64_t vs = (b * p.v_batch_stride + h * p.v_head_stride + t * p.v_row_stride) * eb +
                       static_cast<int64_t>(u) * kUnit;
    *reinterpret_cast<V*>(kc + dst) = *reinterpret_cast<const V*>(kp + ks);
    *reinterpret_cast<V*>(vc + dst) = *reinterpret_cast<const V*>(vp + vs);
  }
  __syncthreads();
  if (threadIdx.x == 0) p.seqlens[b] = L + n;
}

}  // namespace forkattn::kernels::decode
