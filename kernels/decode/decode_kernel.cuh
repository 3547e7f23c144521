// Split-KV decode attention (Flash-Decoding) on CUDA cores.
//
// Grid (B x Hkv, row_blocks, num_splits), 128 threads. A block takes ROWS query rows of one
// kv-head (its GQA heads x new tokens, so the heads of a group share one pass over K/V) and one
// chunk of the sequence: chunk = ceil(L / num_splits) rounded up to TILE_N, from seqlens on the
// device, so the grid is fixed by the plan and the launch is CUDA-graph capturable. K/V tiles of
// TILE_N keys stream through shared memory with 16-byte cp.async in a two-stage pipeline.
// Scores: warp w computes rows w, w+4, ... with lane = key; online softmax in base 2 per row
// (warp shuffles); P @ V: 128 / ROWS threads per row, each owning D * ROWS / 128 dims in fp32.
// One split writes out directly; otherwise normalized fp32 partials + base-2 lse per row go to
// the workspace and decode_merge_kernel combines them. The algorithm is mirrored by
// python/forkattn/triton/decode.py, which the CPU CI tests under Triton's interpreter.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "decode/api.h"

namespace forkattn::kernels::decode {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTileN = 32;  // keys per tile (lane = key in the score phase)
constexpr int kPad = 8;     // elements of padding per smem row: conflict-free 16-byte reads

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Eight 16-bit values in a uint4 -> floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float* f) {
  const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_f(h[i]);
}

// N consecutive 16-bit values from shared memory -> floats, with the widest aligned loads.
template <typename T, int N>
__device__ __forceinline__ void load_row(const T* src, float* f) {
  if constexpr (N % 8 == 0) {
#pragma unroll
    for (int c = 0; c < N / 8; ++c) unpack8<T>(reinterpret_cast<const uint4*>(src)[c], f + 8 * c);
  } else if constexpr (N == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(src);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = to_f(h[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = to_f(src[i]);
  }
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Page of position pos of sequence b (-1: none, past the table, or an entry outside the pool,
// which is never dereferenced).
__device__ __forceinline__ int page_of(const DecodeAttentionParams& p, int b, int pos) {
  if (p.block_table == nullptr) return b;
  const int lp = pos / p.page_size;
  const int page =
      lp < p.pages_per_seq ? __ldg(p.block_table + static_cast<int64_t>(b) * p.block_table_batch_stride + lp) : -1;
  return page < p.num_pages ? page : -1;
}

template <typename T, int D, int ROWS>
struct Smem {
  T k[2][kTileN][D + kPad];
  T v[2][kTileN][D + kPad];
  float q[ROWS][D];
  float p[ROWS][kTileN];
  float corr[ROWS];
  float m[ROWS];
  float l[ROWS];
  int valid[2][kTileN];
};

template <typename T, int D, int ROWS>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeAttentionParams p) {
  static_assert(D % 8 == 0 && ROWS % kWarps == 0 && kThreads % ROWS == 0, "tile shape");
  constexpr int kChunks = D / 8;           // 16-byte chunks per K/V row
  constexpr int kRowsPerWarp = ROWS / kWarps;
  constexpr int kThreadsPerRow = kThreads / ROWS;
  constexpr int kDims = D / kThreadsPerRow;  // dims of one row owned by a thread in P @ V
  static_assert(kDims >= 1 && D % kThreadsPerRow == 0, "row split");
  __shared__ __align__(16) Smem<T, D, ROWS> sm;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int bh = blockIdx.x, rb = blockIdx.y, split = blockIdx.z;
  const int b = bh / p.kv_heads, hk = bh % p.kv_heads;
  const int L = min(max(__ldg(p.seqlens + b), 0), p.max_seqlen);
  const int per_split = (L + p.num_splits - 1) / p.num_splits;
  const int chunk = (per_split + kTileN - 1) / kTileN * kTileN;
  const int start = split * chunk;  // split * chunk may exceed L: then nothing to do
  const int end = min(L, start + chunk);
  const int n_tiles = end > start ? (end - start + kTileN - 1) / kTileN : 0;

  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  auto load_tile = [&](int tile, int stage) {
    const int n0 = start + tile * kTileN;
    for (int idx = tid; idx < kTileN * kChunks; idx += kThreads) {
      const int jj = idx / kChunks, c = idx % kChunks;
      const int pos = n0 + jj;
      const int page = pos < end ? page_of(p, b, pos) : -1;
      const bool ok = page >= 0;
      const int64_t off = ok ? static_cast<int64_t>(page) * p.cache_page_stride +
                                   static_cast<int64_t>(hk) * p.cache_head_stride +
                                   static_cast<int64_t>(pos % p.page_size) * p.cache_slot_stride + c * 8
                             : 0;
      cp_async_16(&sm.k[stage][jj][c * 8], kc + off, ok);
      cp_async_16(&sm.v[stage][jj][c * 8], vc + off, ok);
      if (c == 0) sm.valid[stage][jj] = ok;
    }
  };

  if (n_tiles > 0) load_tile(0, 0);
  cp_async_commit();

  // q rows, pre-scaled by scale * log2(e); rows past the group's are zeros and see no key.
  const T* qp = static_cast<const T*>(p.q);
  for (int idx = tid; idx < ROWS * D; idx += kThreads) {
    const int r = idx / D, d = idx % D, rg = rb * ROWS + r;
    float x = 0.f;
    if (rg < p.rows) {
      const int h = hk * p.group + rg / p.new_tokens, t = rg % p.new_tokens;
      x = to_f(qp[static_cast<int64_t>(b) * p.q_batch_stride + static_cast<int64_t>(h) * p.q_head_stride +
                  static_cast<int64_t>(t) * p.q_row_stride + d]) * p.scale_log2;
    }
    sm.q[r][d] = x;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp];
  int limit[kRowsPerWarp];  // last key each of the warp's rows sees
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int rg = rb * ROWS + warp + kWarps * i;
    m[i] = -INFINITY;
    l[i] = 0.f;
    limit[i] = rg < p.rows ? L - p.new_tokens + rg % p.new_tokens : -1;
  }
  const int my_row = tid / kThreadsPerRow, d0 = (tid % kThreadsPerRow) * kDims;
  const bool row_active = rb * ROWS + my_row < p.rows;
  const bool warp_active = rb * ROWS + warp < p.rows;  // the warp's first (smallest) row
  float acc[kDims];
#pragma unroll
  for (int e = 0; e < kDims; ++e) acc[e] = 0.f;

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_tiles) {
      load_tile(it + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // scores of key lane for the warp's rows, then the online-softmax update of each row; a warp
    // whose rows are all past the group's (MHA at T = 1 fills one row of 4) only clears its p rows
    if (warp_active) {
      const int pos = start + it * kTileN + lane;
      const bool key_ok = sm.valid[stage][lane] != 0;
      float s[kRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) s[i] = 0.f;
#pragma unroll 4
      for (int c = 0; c < kChunks; ++c) {
        float kf[8];
        unpack8<T>(*reinterpret_cast<const uint4*>(&sm.k[stage][lane][c * 8]), kf);
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          const float4 q0 = *reinterpret_cast<const float4*>(&sm.q[warp + kWarps * i][c * 8]);
          const float4 q1 = *reinterpret_cast<const float4*>(&sm.q[warp + kWarps * i][c * 8 + 4]);
          s[i] += q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] + q1.x * kf[4] + q1.y * kf[5] +
                  q1.z * kf[6] + q1.w * kf[7];
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const float si = (key_ok && pos <= limit[i]) ? s[i] : -INFINITY;
        const float m_new = fmaxf(m[i], warp_max(si));
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float pr = exp2f(si - m_use);
        const float corr = exp2f(m[i] - m_use);
        l[i] = l[i] * corr + warp_sum(pr);
        m[i] = m_new;
        const int r = warp + kWarps * i;
        sm.p[r][lane] = pr;
        if (lane == 0) sm.corr[r] = corr;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        sm.p[warp + kWarps * i][lane] = 0.f;
        if (lane == 0) sm.corr[warp + kWarps * i] = 1.f;
      }
    }
    __syncthreads();

    // acc = acc * corr + P @ V over the thread's dims of its row (rows past the group's skip it)
    if (row_active) {
      const float c = sm.corr[my_row];
#pragma unroll
      for (int e = 0; e < kDims; ++e) acc[e] *= c;
#pragma unroll 4
      for (int jj = 0; jj < kTileN; ++jj) {
        const float pj = sm.p[my_row][jj];
        float vf[kDims];
        load_row<T, kDims>(&sm.v[stage][jj][d0], vf);
#pragma unroll
        for (int e = 0; e < kDims; ++e) acc[e] = fmaf(pj, vf[e], acc[e]);
      }
    }
    __syncthreads();  // the next iteration refills this stage and p
  }

  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      sm.m[warp + kWarps * i] = m[i];
      sm.l[warp + kWarps * i] = l[i];
    }
  }
  __syncthreads();

  const int rg = rb * ROWS + my_row;
  if (rg >= p.rows) return;
  const int h = hk * p.group + rg / p.new_tokens, t = rg % p.new_tokens;
  const float lr = sm.l[my_row];
  const float inv = lr > 0.f ? 1.f / lr : 0.f;
  if (p.num_splits == 1) {
    T* op = static_cast<T*>(p.out) + static_cast<int64_t>(b) * p.out_batch_stride +
            static_cast<int64_t>(h) * p.out_head_stride + static_cast<int64_t>(t) * p.out_row_stride + d0;
#pragma unroll
    for (int e = 0; e < kDims; ++e) op[e] = from_f<T>(acc[e] * inv);
  } else {
    const int64_t row = ((static_cast<int64_t>(split) * p.batch + b) * p.heads + h) * p.new_tokens + t;
    float* op = p.o_partial + row * D + d0;
#pragma unroll
    for (int e = 0; e < kDims; ++e) op[e] = acc[e] * inv;
    if (d0 == 0) p.lse_partial[row] = lr > 0.f ? sm.m[my_row] + log2f(lr) : -INFINITY;
  }
}

// One warp per output row (b, h, t): out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_merge_kernel(const DecodeAttentionParams p) {
  constexpr int kPer = (D + 31) / 32;
  const int lane = threadIdx.x % 32;
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * p.new_tokens;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= total) return;
  float mx = -INFINITY;
  for (int s = lane; s < p.num_splits; s += 32) mx = fmaxf(mx, p.lse_partial[s * total + row]);
  mx = warp_max(mx);
  const float m_use = mx == -INFINITY ? 0.f : mx;
  float acc[kPer], den = 0.f;
#pragma unroll
  for (int e = 0; e < kPer; ++e) acc[e] = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float w = exp2f(p.lse_partial[s * total + row] - m_use);
    den += w;
    const float* o = p.o_partial + (s * total + row) * D;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int d = lane + 32 * e;
      if (d < D) acc[e] = fmaf(w, o[d], acc[e]);
    }
  }
  const float inv = den > 0.f ? 1.f / den : 0.f;
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.heads) * p.new_tokens));
  const int h = static_cast<int>((row / p.new_tokens) % p.heads), t = static_cast<int>(row % p.new_tokens);
  T* op = static_cast<T*>(p.out) + static_cast<int64_t>(b) * p.out_batch_stride +
          static_cast<int64_t>(h) * p.out_head_stride + static_cast<int64_t>(t) * p.out_row_stride;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int d = lane + 32 * e;
    if (d < D) op[d] = from_f<T>(acc[e] * inv);
  }
}

template <typename T, int D, int ROWS>
cudaError_t launch(const DecodeAttentionParams& p, cudaStream_t stream) {
  const int row_blocks = (p.rows + ROWS - 1) / ROWS;
  const dim3 grid(p.batch * p.kv_heads, row_blocks, p.num_splits);
  decode_split_kernel<T, D, ROWS><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * p.new_tokens;
  decode_merge_kernel<T, D><<<static_cast<unsigned>((total + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Rows per block: 4 when a kv-head has at most 4 query rows (MHA or small GQA groups at T=1),
// else 16 (more rows share each K/V tile). The Python split heuristic counts blocks of 16 rows;
// both give one row block when rows <= 4.
template <typename T, int D>
cudaError_t run_decode_attention(const DecodeAttentionParams& params, cudaStream_t stream) {
  if (params.rows <= 4) return launch<T, D, 4>(params, stream);
  return launch<T, D, 16>(params, stream);
}

}  // namespace forkattn::kernels::decode

// The generated file for (T, D) instantiates run_decode_attention<T, D> (declared in api.h).
#define FORKATTN_INSTANTIATE_DECODE_ATTENTION(T, D)                             \
  template cudaError_t forkattn::kernels::decode::run_decode_attention<T, D>( \
      const forkattn::kernels::decode::DecodeAttentionParams&, cudaStream_t);
