// CUDA MLM masking kernels. All per-token rules live in rules.h, shared with the CPU kernel, so the two
// agree bit for bit; this file only distributes tokens over threads. Launched by mlm_mask() in launch.cu.
#pragma once
#include <cuda_runtime.h>

#include "mlm/rules.h"

namespace forkattn::kernels::mlm {

constexpr int kTokenThreads = 256;
constexpr int kRowThreads = 256;

__device__ __forceinline__ void do_token(const MlmMaskParams& p, int64_t b, int64_t l, uint32_t key) {
  if (l >= p.len) return;
  const int64_t id = load_id(p, b, l);
  bool sel = eligible(p, b, l, id);
  if (sel) sel = p.word_ids.ptr ? bernoulli_word(p, b, l) : key < p.t_select;
  write_token(p, b, l, id, sel);
}

// Bernoulli masking without ranking: one thread per group of 4 tokens (one Philox block gives the
// 4 selection keys), grid-stride over the batch.
__global__ void __launch_bounds__(kTokenThreads) token_kernel(const MlmMaskParams p) {
  const int64_t groups_per_row = (p.len + 3) >> 2;
  const int64_t total = p.batch * groups_per_row;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = g / groups_per_row, l0 = (g - b * groups_per_row) << 2;
    const Philox4 keys = philox4x32_10(p.seed, static_cast<uint32_t>(l0 >> 2), static_cast<uint32_t>(b), 0u, 0u);
    // Four explicit calls, not a loop over keys.r[i]: a runtime index would put keys on the stack.
    do_token(p, b, l0, keys.r[0]);
    do_token(p, b, l0 + 1, keys.r[1]);
    do_token(p, b, l0 + 2, keys.r[2]);
    do_token(p, b, l0 + 3, keys.r[3]);
  }
}

__device__ __forceinline__ unsigned long long block_sum(unsigned long long v, unsigned long long* s) {
  // s: one shared slot, zeroed by the caller before a __syncthreads.
  atomicAdd(s, v);
  __syncthreads();
  const unsigned long long total = *s;
  return total;
}

// One block per sequence: count units, pick k, find the k-th smallest composite key by an 8-bit radix
// select (8 passes, keys recomputed each pass: no scratch memory), then write the sequence.
__global__ void __launch_bounds__(kRowThreads) row_kernel(const MlmMaskParams p) {
  __shared__ unsigned long long s_n, s_below;
  __shared__ unsigned int s_hist[256];
  __shared__ unsigned long long s_prefix;
  __shared__ long long s_rank;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    if (threadIdx.x == 0) {
      s_n = 0;
      s_below = 0;
    }
    __syncthreads();
    unsigned long long n = 0, below = 0;
    for (int64_t l = threadIdx.x; l < p.len; l += blockDim.x) {
      const TokenInfo t = token_info(p, b, l, true);
      if (t.unit) {
        ++n;
        below += t.key < p.t_select;
      }
    }
    n = block_sum(n, &s_n);
    below = block_sum(below, &s_below);
    const int64_t k = quota(p, static_cast<int64_t>(n), static_cast<int64_t>(below));
    const bool by_rank = k != static_cast<int64_t>(below);
    uint64_t kth = 0;
    if (by_rank && k > 0) {
      uint64_t prefix = 0, prefix_mask = 0;
      long long rank = k;  // 1-based rank of the wanted key among those matching prefix
      for (int shift = 56; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) s_hist[i] = 0;
        __syncthreads();
        for (int64_t l = threadIdx.x; l < p.len; l += blockDim.x) {
          const TokenInfo t = token_info(p, b, l, true);
          if (t.unit && (t.composite & prefix_mask) == prefix) {
            atomicAdd(&s_hist[(t.composite >> shift) & 255u], 1u);
          }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
          long long below_digit = 0;
          unsigned int digit = 0;
          for (; digit < 255u; ++digit) {
            if (below_digit + s_hist[digit] >= rank) break;
            below_digit += s_hist[digit];
          }
          s_prefix = prefix | (static_cast<uint64_t>(digit) << shift);
          s_rank = rank - below_digit;
        }
        __syncthreads();
        prefix = s_prefix;
        rank = s_rank;
        prefix_mask |= static_cast<uint64_t>(255u) << shift;
        __syncthreads();  // s_prefix / s_rank / s_hist are rewritten in the next pass
      }
      kth = prefix;
    }
    for (int64_t l = threadIdx.x; l < p.len; l += blockDim.x) {
      const TokenInfo t = token_info(p, b, l, false);
      const bool sel = t.selectable && (by_rank ? (k > 0 && t.composite <= kth) : t.key < p.t_select);
      write_token(p, b, l, load_id(p, b, l), sel);
    }
    __syncthreads();  // s_n / s_below are reset for the next row
  }
}

}  // namespace forkattn::kernels::mlm
