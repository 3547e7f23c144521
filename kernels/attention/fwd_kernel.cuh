// Forward: one block of 4 warps per (64-query tile, head, batch entry or packed sequence); each
// warp owns 16 query rows. K/V tiles of 64 keys stream through shared memory in two cp.async
// stages; key tiles with no visible key (padding, or past the causal limit) are never loaded.
// Online softmax in base 2 with fp32 accumulators; only lse is stored for the backward pass.
// DROPOUT: after the running sum (lse stays undropped), dropped probabilities are zeroed before
// P V; the survivors' 1 / (1 - p) joins the final 1 / l.
#pragma once
#include "attention/api.h"
#include "attention/common.cuh"
#include "attention/dropout.cuh"
#include "common/static_switch.h"

namespace forkattn::kernels::attention {

template <int D>
struct FwdConfig {
  static constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kRow = Smem<D>::kRow;
  // Q, 2 stages of K and V, 2 stages of per-key bias
  static constexpr size_t kSmem = (kBlockM + 4 * kBlockN) * kRow * 2 + 2 * kBlockN * sizeof(float);
};

template <typename T, int D, bool CAUSAL, bool DROPOUT>
__global__ void __launch_bounds__(FwdConfig<D>::kThreads) attention_fwd_kernel(const AttentionFwdParams p) {
  using C = FwdConfig<D>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, ROW = C::kRow, NT = C::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * ROW;       // [2][BN][ROW]
  T* sV = sK + 2 * BN * ROW;   // [2][BN][ROW]
  float* sBias = reinterpret_cast<float*>(sV + 2 * BN * ROW);  // [2][BN]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.heads / p.kv_heads);
  const Sequence seq = sequence(p, b);
  const int len_q = seq.len_q, len_k = seq.len_k;
  if (m0 >= len_q) return;  // varlen: this sequence is shorter than the grid
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + seq.q_start * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + seq.k_start * p.k_row_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + seq.k_start * p.v_row_stride;
  const bool* mask = p.key_padding_mask ? p.key_padding_mask + b * p.mask_batch_stride : nullptr;
  const int offset = len_k - len_q;  // causal: query i sees key j iff j <= i + offset

  int n_tiles = cdiv(len_k, BN);
  if constexpr (CAUSAL) {
    const int last_key = min(m0 + BM, len_q) - 1 + offset;  // the last key any row of this tile sees
    n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / BN + 1);
  }

  int n = load_first_tiles<BM, BN, D, NT>(sQ, sK, sV, sBias, q, p.q_row_stride, m0, len_q, k, p.k_row_stride, v,
                                          p.v_row_stride, n_tiles, mask, len_k, tid);

  float acc[D / 8][4];
  zero(acc);
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this lane's partial sums; reduced over the quad at the end
  const int g = lane >> 2, t = lane & 3;
  const int row_base = m0 + warp * 16 + g;  // rows row_base and row_base + 8
  DropoutMask drop{};
  if constexpr (DROPOUT) drop = dropout_mask(p, b, h);

  int stage = 0;
  while (n < n_tiles) {
    // prefetch the next visible tile into the other stage while this one is computed
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
    float s[BN / 8][4];
    zero(s);
    mma_tile_smem_a<T, ROW, D, BN, true>(s, sQ, warp * 16, sKs, lane);

    const int n0 = n * BN;
    const bool diagonal = CAUSAL && n0 + BN - 1 > m0 + offset;  // some key past some row's limit
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * t + (e & 1);
        // a select, not an added bias: inf + -inf would be NaN
        float x = bias[col] == 0.f ? s[j][e] * p.scale_log2 : -INFINITY;
        if (diagonal && n0 + col > row_base + (e >> 1) * 8 + offset) x = -INFINITY;
        s[j][e] = x;
      }
    }
    online_softmax_step(s, acc, row_max, row_sum);
    if constexpr (DROPOUT) {
      const uint32_t keep = dropout_keep_rows<BN / 8>(drop, row_base, n0, lane);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!(keep & (1u << (4 * j + e)))) s[j][e] = 0.f;
        }
      }
    }
    mma_tile_reg_a<T, ROW, BN, D>(acc, s, sVs, lane);

    __syncthreads();  // this stage is refilled by the next iteration's prefetch
    n = next;
    stage ^= 1;
  }
  cp_async_wait<0>();
  __syncthreads();

  finish_rows<T, D>(sQ, acc, row_max, row_sum, DROPOUT ? p.dropout_scale : 1.f,
                    p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start, row_base, len_q, warp, lane);
  __syncthreads();
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride + seq.q_start * p.out_row_stride;
  store_tile<BM, D, NT>(out, p.out_row_stride, m0, len_q, sQ, tid);
}

template <typename T, int D, bool DROPOUT>
cudaError_t run_attention_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  using C = FwdConfig<D>;
  if (p.len_q == 0 || p.batch == 0 || p.heads == 0) return cudaSuccess;
  const dim3 grid(cdiv(p.len_q, C::kBlockM), p.heads, p.batch);
  return FA_BOOL_SWITCH(p.causal, kCausal, [&] {
    auto kernel = attention_fwd_kernel<T, D, kCausal, DROPOUT>;
    cudaError_t err = set_smem(kernel, C::kSmem);
    if (err != cudaSuccess) return err;
    kernel<<<grid, C::kThreads, C::kSmem, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace forkattn::kernels::attention

// The generated files for (T, D) instantiate run_attention_fwd<T, D, false> and <T, D, true>
// (declared in api.h), each in its own file.
#define FORKATTN_INSTANTIATE_ATTENTION_FWD_(T, D, DROPOUT)                               \
  template cudaError_t forkattn::kernels::attention::run_attention_fwd<T, D, DROPOUT>( \
      const forkattn::kernels::attention::AttentionFwdParams&, cudaStream_t);
#define FORKATTN_INSTANTIATE_ATTENTION_FWD(T, D) FORKATTN_INSTANTIATE_ATTENTION_FWD_(T, D, false)
#define FORKATTN_INSTANTIATE_ATTENTION_FWD_DROPOUT(T, D) FORKATTN_INSTANTIATE_ATTENTION_FWD_(T, D, true)
