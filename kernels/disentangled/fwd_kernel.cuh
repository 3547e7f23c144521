// Forward of DeBERTa's disentangled attention: kernels/attention/fwd_kernel.cuh's FlashAttention-2
// loop (one block of 4 warps per 64-query tile, head and batch entry; each warp owns 16 query
// rows; 64-key K/V tiles in two cp.async stages; key tiles with no visible key never loaded;
// online softmax in base 2, fp32 accumulators), with the two relative-position terms added to each
// tile's scores before the softmax. No [Lq, Lk] matrix and no [Lq, 2 span] product ever reaches
// global memory.
//
// The position terms of a tile (forkattn/triton/disentangled.py's method). A query tile of BM rows
// from m0 and a key tile of BN columns from n0 read BM + BN - 1 relative positions, one per diagonal
// u = i' - j' + BN - 1 (i', j' inside the tile): table entry t0 + u with t0 = m0 - n0 + Lk - BN.
// The tile loads, per diagonal, the position row it reads (G[u] = pos[rel_index[t0 + u]], an
// indexed cp.async of 128 rows; zeros for u = BM + BN - 1 and for entries off the table, which
// only rows >= Lq or columns >= Lk read), then with the tensor cores:
//   p2c: P[u, j'] = G_q[u] . k_j' for all 128 x BN (warp w takes u tiles 2w, 2w+1, in pieces) and stores
//        P[u, j'] at sB[i' = u + j' - BN + 1][j'] (each (i', j') has exactly one u: plain stores);
//   c2p: C[i', u] = q_i' . G_k[u] for the warp's own 16 rows and the 80 diagonals they touch (in pieces)
//        (u in [16w, 16w + 80)), added at sB[i'][j' = i' - u + BN - 1] (only the warp's rows);
// and every lane adds sB at its score fragment's positions. sB is an fp32 [BM, BN] tile in shared
// memory: the skew (a gather across lanes) goes through it instead of registers. One shared
// buffer holds the position rows (G_q first, then G_k), so the c2p load waits for the p2c product.
// DROPOUT: the plain attention forward's (kernels/attention/dropout.cuh, the same mask of
// (b, h, i, j)): after the running sum (lse stays undropped), dropped probabilities are zeroed
// before P V, and the survivors' 1 / (1 - p) joins the final 1 / l.
#pragma once
#include "attention/common.cuh"
#include "attention/dropout.cuh"
#include "common/static_switch.h"
#include "disentangled/api.h"

namespace forkattn::kernels::disentangled {

using attention::cdiv;
using attention::cp_async_commit;
using attention::cp_async_wait;
using attention::dropout_keep_rows;
using attention::dropout_mask;
using attention::DropoutMask;
using attention::finish_rows;
using attention::load_first_tiles;
using attention::load_tile_async;
using attention::mma_tile_reg_a;
using attention::mma_tile_smem_a;
using attention::next_key_tile;
using attention::online_softmax_step;
using attention::set_smem;
using attention::stage_rows;
using attention::store_tile;
using attention::zero;

template <int D>
struct FwdConfig {
  static constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kRow = attention::Smem<D>::kRow;
  static constexpr int kDiag = kBlockM + kBlockN - 1;  // diagonals of a tile
  static constexpr int kPosRows = 128;                 // kDiag rounded up to whole 16-row mma tiles
  static constexpr int kWarpDiag = 80;                 // diagonals one warp's 16 rows touch: 16 + BN - 1, rounded up
  static constexpr int kBRow = kBlockN + 8;            // fp32 row of sB, padded
  // Q, 2 stages of K and V, the position rows, sB, 2 stages of per-key bias
  static constexpr size_t kSmem = (kBlockM + 4 * kBlockN + kPosRows) * kRow * 2 +
                                  (kBlockM * kBRow + 2 * kBlockN) * sizeof(float);
  static_assert(kWarpDiag >= 16 + kBlockN - 1 && kWarpDiag % 16 == 0, "a warp's diagonals in whole tiles");
  static_assert(16 * (kWarps - 1) + kWarpDiag <= kPosRows && kPosRows >= kDiag, "position rows cover the tile");
  static_assert(kPosRows == 2 * 16 * kWarps, "p2c: two 16-row diagonal tiles per warp");
};

// The operands of batch entry b, head h: q, k, v, the position rows of the enabled terms
// (nullptr otherwise) and the key mask (nullptr: none). Shared by the forward and both backward
// kernels.
template <typename T, bool C2P, bool P2C>
struct HeadOperands {
  const T *q, *k, *v, *pk, *pq;
  const bool* mask;
  __device__ __forceinline__ HeadOperands(const DisentangledFwdParams& p, int b, int h)
      : q(static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride),
        k(static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride),
        v(static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride),
        pk(C2P ? static_cast<const T*>(p.pos_key) + h * p.pk_head_stride : nullptr),
        pq(P2C ? static_cast<const T*>(p.pos_query) + h * p.pq_head_stride : nullptr),
        mask(p.key_padding_mask ? p.key_padding_mask + b * p.mask_batch_stride : nullptr) {}
};

// Rows u = 0..ROWS-1 of a position tile: pos[rel[t0 + u]] for u < n_diag and 0 <= t0 + u < n_rel,
// zeros elsewhere. rel's entries are rows of pos (checked by the host).
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_pos_rows_async(T* tile, const T* pos, int64_t row_stride, const int64_t* rel,
                                                    int t0, int n_diag, int n_rel, int tid) {
  constexpr int kChunks = D / 8;
  static_assert((ROWS * kChunks) % THREADS == 0, "tile copy must divide evenly among threads");
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int idx = tid + i * THREADS;
    const int r = idx / kChunks, c = idx % kChunks;
    const int t = t0 + r;
    const bool valid = r < n_diag && t >= 0 && t < n_rel;
    const T* src = valid ? pos + rel[t] * row_stride + c * 8 : pos;
    attention::cp_async16(tile + r * attention::Smem<D>::kRow + c * 8, src, valid);
  }
}

// p2c of a tile into sB: P[u, j'] = G_q[u] . k_j' (G_q in sP, the K tile in sKs) stored (or, with
// ADD, added) at sB[u + j' - BN + 1][j'], every (i', j') of the tile once; warp w takes diagonals
// 32w .. 32w + 31, in pieces of 16 diagonals x 16 keys, one at a time (registers: the caller's
// accumulators are live; wider pieces spill at head_dim 128).
template <typename T, int D, bool ADD, int K_UNROLL = D / 16>
__device__ __forceinline__ void p2c_into(float* sB, const T* sP, const T* sKs, int warp, int lane) {
  using C = FwdConfig<D>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, ROW = C::kRow, BROW = C::kBRow;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll 1
  for (int piece = 0; piece < 2 * BN / 16; ++piece) {
    const int u_base = (2 * warp + piece / (BN / 16)) * 16, c_base = (piece % (BN / 16)) * 16;
    float c[2][4];
    zero(c);
    mma_tile_smem_a<T, ROW, D, 16, true, K_UNROLL>(c, sP, u_base, sKs + c_base * ROW, lane);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int u = u_base + g + (e >> 1) * 8, col = c_base + j * 8 + 2 * t + (e & 1);
        const int row = u + col - (BN - 1);
        if (row >= 0 && row < BM) sB[row * BROW + col] = ADD ? sB[row * BROW + col] + c[j][e] : c[j][e];
      }
    }
  }
}

// c2p of a tile into the warp's own 16 rows of sB: C[i', u] = q_i' . G_k[u] (G_k in sP) stored (or
// added) at sB[i'][i' - u + BN - 1]; the rows touch diagonals 16w .. 16w + 16 + BN - 2, taken in
// pieces of 16, one at a time.
template <typename T, int D, bool ADD, int K_UNROLL = D / 16>
__device__ __forceinline__ void c2p_into(float* sB, const T* sP, const T* sQ, int warp, int lane) {
  using C = FwdConfig<D>;
  constexpr int BN = C::kBlockN, ROW = C::kRow, BROW = C::kBRow;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll 1
  for (int u0 = warp * 16; u0 < warp * 16 + C::kWarpDiag; u0 += 16) {
    float c[2][4];
    zero(c);
    mma_tile_smem_a<T, ROW, D, 16, true, K_UNROLL>(c, sQ, warp * 16, sP + u0 * ROW, lane);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = warp * 16 + g + (e >> 1) * 8, u = u0 + j * 8 + 2 * t + (e & 1);
        const int col = row - u + (BN - 1);
        if (col >= 0 && col < BN) sB[row * BROW + col] = ADD ? sB[row * BROW + col] + c[j][e] : c[j][e];
      }
    }
  }
}

template <typename T, int D, bool C2P, bool P2C, bool DROPOUT>
__global__ void __launch_bounds__(FwdConfig<D>::kThreads) disentangled_fwd_kernel(const DisentangledFwdParams p) {
  using C = FwdConfig<D>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, ROW = C::kRow, NT = C::kThreads, BROW = C::kBRow;
  constexpr bool kPos = C2P || P2C;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * ROW;      // [2][BN][ROW]
  T* sV = sK + 2 * BN * ROW;  // [2][BN][ROW]
  T* sP = sV + 2 * BN * ROW;  // [kPosRows][ROW]: G_q, then G_k
  float* sB = reinterpret_cast<float*>(sP + C::kPosRows * ROW);  // [BM][BROW]: the position terms
  float* sBias = sB + BM * BROW;                                 // [2][BN]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int len_q = p.len_q, len_k = p.len_k, n_rel = len_q + len_k - 1;
  const HeadOperands<T, C2P, P2C> in(p, b, h);
  const T *q = in.q, *k = in.k, *v = in.v, *pk = in.pk, *pq = in.pq;
  const bool* mask = in.mask;
  const int n_tiles = cdiv(len_k, BN);

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
    const int n0 = n * BN;
    const int t0 = m0 - n0 + len_k - BN;  // table entry of diagonal u = 0
    const T* sKs = sK + stage * BN * ROW;
    const T* sVs = sV + stage * BN * ROW;
    const float* bias = sBias + stage * BN;
    if constexpr (P2C) load_pos_rows_async<C::kPosRows, D, NT>(sP, pq, p.pq_row_stride, p.rel_index, t0, C::kDiag,
                                                               n_rel, tid);
    cp_async_commit();
    // prefetch the next visible K/V tile into the other stage while this one is computed
    const int next = next_key_tile<BN, NT>(n + 1, n_tiles, mask, len_k, sBias + (stage ^ 1) * BN, tid);
    if (next < n_tiles) {
      load_tile_async<BN, D, NT>(sK + (stage ^ 1) * BN * ROW, k, p.k_row_stride, next * BN, len_k, tid, mask);
      load_tile_async<BN, D, NT>(sV + (stage ^ 1) * BN * ROW, v, p.v_row_stride, next * BN, len_k, tid, mask);
    }
    cp_async_commit();
    cp_async_wait<1>();  // Q, this K/V tile and G_q are in
    __syncthreads();

    if constexpr (P2C) {
      p2c_into<T, D, false>(sB, sP, sKs, warp, lane);
      __syncthreads();  // sB holds p2c everywhere; sP is free for G_k
    }
    if constexpr (C2P) {
      load_pos_rows_async<C::kPosRows, D, NT>(sP, pk, p.pk_row_stride, p.rel_index, t0, C::kDiag, n_rel, tid);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      c2p_into<T, D, P2C>(sB, sP, sQ, warp, lane);
      __syncwarp();  // the warp's own rows of sB are complete
    }

    float s[BN / 8][4];
    zero(s);
    mma_tile_smem_a<T, ROW, D, BN, true>(s, sQ, warp * 16, sKs, lane);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * t + (e & 1);
        float x = s[j][e];
        if constexpr (kPos) x += sB[(warp * 16 + g + (e >> 1) * 8) * BROW + col];
        // a select, not an added bias: inf + -inf would be NaN
        s[j][e] = bias[col] == 0.f ? x * p.scale_log2 : -INFINITY;
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

    __syncthreads();  // this stage, sP and sB are refilled by the next iteration
    n = next;
    stage ^= 1;
  }
  cp_async_wait<0>();
  __syncthreads();

  finish_rows<T, D>(sQ, acc, row_max, row_sum, DROPOUT ? p.dropout_scale : 1.f, p.lse + b * p.lse_batch_stride + h * p.lse_head_stride, row_base,
                    len_q, warp, lane);
  __syncthreads();
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  store_tile<BM, D, NT>(out, p.out_row_stride, m0, len_q, sQ, tid);
}

template <typename T, int D, bool DROPOUT>
cudaError_t run_disentangled_fwd(const DisentangledFwdParams& p, cudaStream_t stream) {
  using C = FwdConfig<D>;
  if (p.len_q == 0 || p.batch == 0 || p.heads == 0) return cudaSuccess;
  const dim3 grid(cdiv(p.len_q, C::kBlockM), p.heads, p.batch);
  return FA_BOOL_SWITCH(p.c2p, kC2P, [&] {
    return FA_BOOL_SWITCH(p.p2c, kP2C, [&] {
      auto kernel = disentangled_fwd_kernel<T, D, kC2P, kP2C, DROPOUT>;
      cudaError_t err = set_smem(kernel, C::kSmem);
      if (err != cudaSuccess) return err;
      kernel<<<grid, C::kThreads, C::kSmem, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

}  // namespace forkattn::kernels::disentangled

// The generated files for (T, D) instantiate run_disentangled_fwd<T, D, false> and <T, D, true>
// (declared in api.h), each in its own file.
#define FORKATTN_INSTANTIATE_DISENTANGLED_FWD_(T, D, DROPOUT)                                      \
  template cudaError_t forkattn::kernels::disentangled::run_disentangled_fwd<T, D, DROPOUT>( \
      const forkattn::kernels::disentangled::DisentangledFwdParams&, cudaStream_t);
#define FORKATTN_INSTANTIATE_DISENTANGLED_FWD(T, D) FORKATTN_INSTANTIATE_DISENTANGLED_FWD_(T, D, false)
#define FORKATTN_INSTANTIATE_DISENTANGLED_FWD_DROPOUT(T, D) FORKATTN_INSTANTIATE_DISENTANGLED_FWD_(T, D, true)
