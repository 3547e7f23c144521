// KV-cache append: one launch, one block per sequence. Thread 0 counts how many of the T new
// tokens fit (stopping at the first position >= max_seqlen or on a missing page: an entry < 0 or
// >= num_pages, so nothing is ever written out of bounds: the "clamp" of the no-check mode), the block copies them in
// 16-byte vectors (element-wise when a row is not 16-byte aligned), then thread 0 advances
// seqlens[b]. Only block b reads or writes seqlens[b], so there is no cross-block race and the
// launch is CUDA-graph capturable.
#include <cstdint>

#include "decode/decode_params.h"

namespace forkattn {
namespace {

constexpr int kAppendThreads = 256;

template <typename V>
__global__ void __launch_bounds__(kAppendThreads) kv_append_kernel(const AppendParams p) {
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
          const int page = p.block_table[b * p.bt_b + lp];
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
    const int64_t page = p.block_table != nullptr ? p.block_table[b * p.bt_b + pos / p.page_size] : b;
    const int64_t dst = (page * p.c_page + h * p.c_head + static_cast<int64_t>(pos % p.page_size) * p.c_slot) * eb +
                        static_cast<int64_t>(u) * kUnit;
    const int64_t ks = (static_cast<int64_t>(b) * p.k_b + h * p.k_h + static_cast<int64_t>(t) * p.k_t) * eb +
                       static_cast<int64_t>(u) * kUnit;
    const int64_t vs = (static_cast<int64_t>(b) * p.v_b + h * p.v_h + static_cast<int64_t>(t) * p.v_t) * eb +
                       static_cast<int64_t>(u) * kUnit;
    *reinterpret_cast<V*>(kc + dst) = *reinterpret_cast<const V*>(kp + ks);
    *reinterpret_cast<V*>(vc + dst) = *reinterpret_cast<const V*>(vp + vs);
  }
  __syncthreads();
  if (threadIdx.x == 0) p.seqlens[b] = L + n;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

}  // namespace

cudaError_t run_kv_append(const AppendParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  const int per16 = 16 / p.elem_bytes;
  const bool vec = p.head_dim % per16 == 0 && aligned16(p.k_cache) && aligned16(p.v_cache) && aligned16(p.k) &&
                   aligned16(p.v) && p.c_page % per16 == 0 && p.c_head % per16 == 0 && p.c_slot % per16 == 0 &&
                   p.k_b % per16 == 0 && p.k_h % per16 == 0 && p.k_t % per16 == 0 && p.v_b % per16 == 0 &&
                   p.v_h % per16 == 0 && p.v_t % per16 == 0;
  if (vec) {
    kv_append_kernel<uint4><<<p.batch, kAppendThreads, 0, stream>>>(p);
  } else if (p.elem_bytes == 4) {
    kv_append_kernel<uint32_t><<<p.batch, kAppendThreads, 0, stream>>>(p);
  } else if (p.elem_bytes == 2) {
    kv_append_kernel<uint16_t><<<p.batch, kAppendThreads, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace forkattn
