// Backward, three kernels on one stream, no atomics (deterministic):
//   1. delta = rowsum(dout * out), fp32 [B, H, Lq];
//   2. dq: one block per (64-query tile, head, batch), K/V tiles streamed as in the forward
//      pass; recomputes P from lse and accumulates dQ = dS K in registers;
//   3. dk/dv: one block per (64-key tile, kv head, batch), each warp owning 16 keys; Q/dO tiles
//      of every query head of the GQA group stream through two cp.async stages; dV = P^T dO
//      and dK = dS^T Q accumulate in registers. Key tiles with no visible key write zeros at
//      once; with causal, query tiles entirely before the key tile are not visited.
// dS = P * (dP - delta), P = exp2(s * scale_log2 - lse * log2 e): a row that saw no key has
// lse = +inf, so P = 0 and every gradient it touches is zero.
// DROPOUT: the forward's mask is redrawn (dropout.cuh), never stored: dV = (P * keep)^T dO times
// 1 / (1 - p), and dP becomes dP * keep / (1 - p) before dS = P * (dP - delta); delta =
// rowsum(dO * O) needs no change, O holds the dropout.
#pragma once
#include "attention/api.h"
#include "attention/common.cuh"
#include "attention/dropout.cuh"
#include "common/static_switch.h"

namespace forkattn::kernels::attention {

// --- 1. delta -----------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(128) attention_bwd_delta_kernel(const AttentionBwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const Sequence seq = sequence(p, b);
  const int row = blockIdx.x * 4 + warp;
  if (row >= seq.len_q) return;
  const int64_t qrow = seq.q_start + row;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride +
                  qrow * p.dout_row_stride;
  const T* out = static_cast<const T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
                 qrow * p.out_row_stride;
  float sum = 0.f;
#pragma unroll
  for (int d = lane * 2; d < D; d += 64) {
    const float2 x = unpack2<T>(*reinterpret_cast<const uint32_t*>(dout + d));
    const float2 y = unpack2<T>(*reinterpret_cast<const uint32_t*>(out + d));
    sum += x.x * y.x + x.y * y.y;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) p.delta[b * p.lse_batch_stride + h * p.lse_head_stride + qrow] = sum;
}

// --- 2. dq --------------------------------------------------------------------------------------

template <int D>
struct DqConfig {
  static constexpr int kBlockM = 64, kBlockN = (D == 128 ? 32 : 64), kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kRow = Smem<D>::kRow;
  // Q, dO, 2 stages of K and V, 2 stages of per-key bias
  static constexpr size_t kSmem = (2 * kBlockM + 4 * kBlockN) * kRow * 2 + 2 * kBlockN * sizeof(float);
};

template <typename T, int D, bool CAUSAL, bool DROPOUT>
__global__ void __launch_bounds__(DqConfig<D>::kThreads) attention_bwd_dq_kernel(const AttentionBwdParams p) {
  using C = DqConfig<D>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, ROW = C::kRow, NT = C::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + BM * ROW;
  T* sK = sdO + BM * ROW;      // [2][BN][ROW]
  T* sV = sK + 2 * BN * ROW;   // [2][BN][ROW]
  float* sBias = reinterpret_cast<float*>(sV + 2 * BN * ROW);  // [2][BN]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.heads / p.kv_heads);
  const Sequence seq = sequence(p, b);
  const int len_q = seq.len_q, len_k = seq.len_k;
  if (m0 >= len_q) return;  // varlen: this sequence is shorter than the grid
  const int64_t q_row0 = seq.q_start, k_row0 = seq.k_start;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + q_row0 * p.q_row_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride +
                  q_row0 * p.dout_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + k_row0 * p.k_row_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + k_row0 * p.v_row_stride;
  const bool* mask = p.key_padding_mask ? p.key_padding_mask + b * p.mask_batch_stride : nullptr;
  const int offset = len_k - len_q;

  int n_tiles = cdiv(len_k, BN);
  if constexpr (CAUSAL) {
    const int last_key = min(m0 + BM, len_q) - 1 + offset;  // the last key any row of this tile sees
    n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / BN + 1);
  }

  load_tile_async<BM, D, NT>(sQ, q, p.q_row_stride, m0, len_q, tid);
  load_tile_async<BM, D, NT>(sdO, dout, p.dout_row_stride, m0, len_q, tid);
  cp_async_commit();
  int n = next_key_tile<BN, NT>(0, n_tiles, mask, len_k, sBias, tid);
  if (n < n_tiles) {
    load_tile_async<BN, D, NT>(sK, k, p.k_row_stride, n * BN, len_k, tid, mask);
    load_tile_async<BN, D, NT>(sV, v, p.v_row_stride, n * BN, len_k, tid, mask);
  }
  cp_async_commit();

  const int g = lane >> 2, t = lane & 3;
  const int row_base = m0 + warp * 16 + g;
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_base + r * 8;
    const int64_t i = b * p.lse_batch_stride + h * p.lse_head_stride + q_row0 + row;
    lse2[r] = row < len_q ? p.lse[i] * kLog2e : INFINITY;
    delta[r] = row < len_q ? p.delta[i] : 0.f;
  }
  float dq[D / 8][4];
  zero(dq);
  DropoutMask drop{};
  if constexpr (DROPOUT) drop = dropout_mask(p, b, h);

  int stage = 0;
  while (n < n_tiles) {
    const int next = next_key_tile<BN, NT>(n + 1, n_tiles, mask, len_k, sBias + (stage ^ 1) * BN, tid);
    if (next < n_tiles) {
      load_tile_async<BN, D, NT>(sK + (stage ^ 1) * BN * ROW, k, p.k_row_stride, next * BN, len_k, tid, mask);
      load_tile_async<BN, D, NT>(sV + (stage ^ 1) * BN * ROW, v, p.v_row_stride, next * BN, len_k, tid, mask);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* sKs = sK + stage * BN * ROW;
    const T* sVs = sV + stage * BN * ROW;
    const float* bias = sBias + stage * BN;
    float s[BN / 8][4], dp[BN / 8][4];
    zero(s);
    zero(dp);
    mma_tile_smem_a<T, ROW, D, BN, true>(s, sQ, warp * 16, sKs, lane);
    mma_tile_smem_a<T, ROW, D, BN, true>(dp, sdO, warp * 16, sVs, lane);

    const int n0 = n * BN;
    const bool diagonal = CAUSAL && n0 + BN - 1 > m0 + offset;
    uint32_t keep = 0;
    if constexpr (DROPOUT) keep = dropout_keep_rows<BN / 8>(drop, row_base, n0, lane);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * t + (e & 1);
        // hidden keys: P = dS = 0 by select (a NaN row's lse or delta must not reach them)
        const bool hidden = bias[col] != 0.f || (diagonal && n0 + col > row_base + (e >> 1) * 8 + offset);
        const float prob = exp2f(s[j][e] * p.scale_log2 - lse2[e >> 1]);
        float dpv = dp[j][e];
        if constexpr (DROPOUT) dpv = keep & (1u << (4 * j + e)) ? dpv * p.dropout_scale : 0.f;
        s[j][e] = hidden ? 0.f : prob * (dpv - delta[e >> 1]);  // dS
      }
    }
    mma_tile_reg_a<T, ROW, BN, D>(dq, s, sKs, lane);

    __syncthreads();
    n = next;
    stage ^= 1;
  }
  cp_async_wait<0>();
  __syncthreads();

  stage_rows<T, D>(sQ, warp * 16, dq, p.scale, p.scale, lane);
  __syncthreads();
  T* dq_out = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride + q_row0 * p.dq_row_stride;
  store_tile<BM, D, NT>(dq_out, p.dq_row_stride, m0, len_q, sQ, tid);
}

// --- 3. dk, dv ----------------------------------------------------------------------------------

// DROPOUT at head_dim 128: query tiles of 16, as S^T, dP^T and the mask do not fit next to the
// dk/dv accumulators with 32 (ptxas spills 4-28 bytes on sm_90a however the mask is placed).
template <int D, bool DROPOUT>
struct DkvConfig {
  static constexpr int kBlockN = 64, kBlockM = (D == 128 ? (DROPOUT ? 16 : 32) : 64), kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRow = Smem<D>::kRow;
  // K, V, 2 stages of Q and dO, 2 stages of lse, delta and tile row (DROPOUT: and query head)
  static constexpr size_t kSmem =
      (2 * kBlockN + 4 * kBlockM) * kRow * 2 + 4 * kBlockM * sizeof(float) + (DROPOUT ? 4 : 2) * sizeof(int);
};

template <typename T, int D, bool CAUSAL, bool DROPOUT>
__global__ void __launch_bounds__(DkvConfig<D, DROPOUT>::kThreads) attention_bwd_dkdv_kernel(const AttentionBwdParams p) {
  using C = DkvConfig<D, DROPOUT>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, ROW = C::kRow, NT = C::kThreads;
  static_assert(BN == 16 * C::kWarps, "each warp owns 16 keys");
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BN * ROW;
  T* sQ = sV + BN * ROW;       // [2][BM][ROW]
  T* sdO = sQ + 2 * BM * ROW;  // [2][BM][ROW]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * ROW);  // [2][BM], log2 units
  float* sDelta = sLse + 2 * BM;                               // [2][BM]
  int* sTileRow = reinterpret_cast<int*>(sDelta + 2 * BM);     // [2]: first query row of each stage
  int* sTileHead = sTileRow + 2;                               // [2]: its query head (DROPOUT only)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int n0 = blockIdx.x * BN, hk = blockIdx.y, b = blockIdx.z;
  const int group = p.heads / p.kv_heads;
  const Sequence seq = sequence(p, b);
  const int len_q = seq.len_q, len_k = seq.len_k;
  if (n0 >= len_k) return;  // varlen: this sequence is shorter than the grid
  const int64_t q_row0 = seq.q_start, k_row0 = seq.k_start;
  const bool* mask = p.key_padding_mask ? p.key_padding_mask + b * p.mask_batch_stride : nullptr;
  const int offset = len_k - len_q;
  T* dk_out = static_cast<T*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride + k_row0 * p.dk_row_stride;
  T* dv_out = static_cast<T*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride + k_row0 * p.dv_row_stride;

  // Query tiles that can see a key of this tile, per query head of the group.
  const int m_tiles = cdiv(len_q, BM);
  const int m_begin = CAUSAL ? max(0, n0 - offset) / BM : 0;  // query n0 - offset is the first to see key n0
  const int per_head = max(0, m_tiles - m_begin);
  const int total = group * per_head;
  const bool tile_visible = (mask == nullptr)
                                ? true
                                : __syncthreads_or(tid < BN && n0 + tid < len_k && mask[n0 + tid]);
  if (!tile_visible || total == 0) {  // no query sees these keys: zero gradients
    store_zeros<BN, D, NT, T>(dk_out, p.dk_row_stride, n0, len_k, tid);
    store_zeros<BN, D, NT, T>(dv_out, p.dv_row_stride, n0, len_k, tid);
    return;
  }

  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + k_row0 * p.k_row_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + k_row0 * p.v_row_stride;
  load_tile_async<BN, D, NT>(sK, k, p.k_row_stride, n0, len_k, tid, mask);
  load_tile_async<BN, D, NT>(sV, v, p.v_row_stride, n0, len_k, tid, mask);
  cp_async_commit();

  // Q, dO, lse and delta of the next (query head, query tile) into stage `st`; heads of the group
  // outer, query tiles inner. Counters instead of it / per_head keep the register count down.
  int next_head = hk * group, next_mt = m_begin;
  auto load_q_tile = [&](int st) {
    const int m0 = next_mt * BM;
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + next_head * p.q_head_stride + q_row0 * p.q_row_stride;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + next_head * p.dout_head_stride +
                    q_row0 * p.dout_row_stride;
    load_tile_async<BM, D, NT>(sQ + st * BM * ROW, q, p.q_row_stride, m0, len_q, tid);
    load_tile_async<BM, D, NT>(sdO + st * BM * ROW, dout, p.dout_row_stride, m0, len_q, tid);
    if (tid < BM) {
      const int row = m0 + tid;
      const int64_t i = b * p.lse_batch_stride + next_head * p.lse_head_stride + q_row0 + row;
      sLse[st * BM + tid] = row < len_q ? p.lse[i] * kLog2e : INFINITY;
      sDelta[st * BM + tid] = row < len_q ? p.delta[i] : 0.f;
    }
    if (tid == 0) {
      sTileRow[st] = m0;
      if constexpr (DROPOUT) sTileHead[st] = next_head;
    }
    if (++next_mt == m_tiles) {
      next_mt = m_begin;
      ++next_head;
    }
  };
  load_q_tile(0);
  cp_async_commit();

  const int g = lane >> 2, t = lane & 3;
  const int key_base = n0 + warp * 16 + g;  // this lane's keys: key_base, key_base + 8
  float key_bias[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key_base + r * 8;
    key_bias[r] = key < len_k && (mask == nullptr || mask[key]) ? 0.f : -INFINITY;
  }
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);

  for (int it = 0; it < total; ++it) {
    const int stage = it & 1;
    if (it + 1 < total) load_q_tile(stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* sQs = sQ + stage * BM * ROW;
    const T* sdOs = sdO + stage * BM * ROW;
    const float* lse2 = sLse + stage * BM;
    const float* delta = sDelta + stage * BM;
    const int m0 = sTileRow[stage];
    float st[BM / 8][4], dpt[BM / 8][4];  // S^T and dP^T: rows are this warp's keys
    zero(st);
    zero(dpt);
    mma_tile_smem_a<T, ROW, D, BM, true>(st, sK, warp * 16, sQs, lane);
    mma_tile_smem_a<T, ROW, D, BM, true>(dpt, sV, warp * 16, sdOs, lane);

    const bool diagonal = CAUSAL && n0 + BN - 1 > m0 + offset;
    uint32_t keep = 0;
    if constexpr (DROPOUT) {
      const DropoutMask drop = dropout_mask(p, b, sTileHead[stage]);
      keep = dropout_keep_cols<BM / 8>(drop, (n0 + warp * 16) >> 3, m0, lane);
    }
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * t + (e & 1);  // query m0 + col
        // Padded keys' K/V rows were loaded as zeros, so their scores are finite unless the query
        // row is NaN; their dk/dv are zeroed at the end whatever reached them (no per-element
        // select here: it costs registers this kernel does not have at head_dim 128).
        float x = st[j][e] * p.scale_log2 + key_bias[e >> 1];
        if (diagonal && key_base + (e >> 1) * 8 > m0 + col + offset) x = -INFINITY;
        const float prob = exp2f(x - lse2[col]);
        if constexpr (DROPOUT) {
          const bool kept = keep & (1u << (4 * j + e));
          st[j][e] = kept ? prob : 0.f;  // (P * keep)^T; 1 / (1 - p) joins dV at the end
          dpt[j][e] = prob * ((kept ? dpt[j][e] * p.dropout_scale : 0.f) - delta[col]);  // dS^T
        } else {
          st[j][e] = prob;                              // P^T
          dpt[j][e] = prob * (dpt[j][e] - delta[col]);  // dS^T
        }
      }
    }
    mma_tile_reg_a<T, ROW, BM, D>(dv, st, sdOs, lane);
    mma_tile_reg_a<T, ROW, BM, D>(dk, dpt, sQs, lane);

    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();
  __syncthreads();

  // A padded key's gradients are exactly zero (dS^T Q with a NaN query row would be 0 * NaN).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key_bias[r] != 0.f) {
#pragma unroll
      for (int j = 0; j < D / 8; ++j) dk[j][2 * r] = dk[j][2 * r + 1] = dv[j][2 * r] = dv[j][2 * r + 1] = 0.f;
    }
  }
  stage_rows<T, D>(sK, warp * 16, dk, p.scale, p.scale, lane);
  const float dv_mul = DROPOUT ? p.dropout_scale : 1.f;
  stage_rows<T, D>(sV, warp * 16, dv, dv_mul, dv_mul, lane);
  __syncthreads();
  store_tile<BN, D, NT>(dk_out, p.dk_row_stride, n0, len_k, sK, tid);
  store_tile<BN, D, NT>(dv_out, p.dv_row_stride, n0, len_k, sV, tid);
}

template <typename T, int D, bool DROPOUT>
cudaError_t run_attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  // Empty q or k: nothing to launch (the host glue zero-fills the other side's gradients).
  if (p.len_q == 0 || p.len_k == 0 || p.batch == 0 || p.heads == 0) return cudaSuccess;
  attention_bwd_delta_kernel<T, D><<<dim3(cdiv(p.len_q, 4), p.heads, p.batch), 128, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return FA_BOOL_SWITCH(p.causal, kCausal, [&] {
    {
      using C = DqConfig<D>;
      auto kernel = attention_bwd_dq_kernel<T, D, kCausal, DROPOUT>;
      cudaError_t e = set_smem(kernel, C::kSmem);
      if (e != cudaSuccess) return e;
      kernel<<<dim3(cdiv(p.len_q, C::kBlockM), p.heads, p.batch), C::kThreads, C::kSmem, stream>>>(p);
      e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    using C = DkvConfig<D, DROPOUT>;
    auto kernel = attention_bwd_dkdv_kernel<T, D, kCausal, DROPOUT>;
    cudaError_t e = set_smem(kernel, C::kSmem);
    if (e != cudaSuccess) return e;
    kernel<<<dim3(cdiv(p.len_k, C::kBlockN), p.kv_heads, p.batch), C::kThreads, C::kSmem, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace forkattn::kernels::attention

// The generated files for (T, D) instantiate run_attention_bwd<T, D, false> and <T, D, true>
// (declared in api.h), each in its own file.
#define FORKATTN_INSTANTIATE_ATTENTION_BWD_(T, D, DROPOUT)                               \
  template cudaError_t forkattn::kernels::attention::run_attention_bwd<T, D, DROPOUT>( \
      const forkattn::kernels::attention::AttentionBwdParams&, cudaStream_t);
#define FORKATTN_INSTANTIATE_ATTENTION_BWD(T, D) FORKATTN_INSTANTIATE_ATTENTION_BWD_(T, D, false)
#define FORKATTN_INSTANTIATE_ATTENTION_BWD_DROPOUT(T, D) FORKATTN_INSTANTIATE_ATTENTION_BWD_(T, D, true)
