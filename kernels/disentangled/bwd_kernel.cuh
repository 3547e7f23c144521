// Backward of DeBERTa's disentangled attention (forkattn/triton/disentangled_kernels.py's method
// with fwd_kernel.cuh's tiles): two kernels of 4 warps, no atomics except into the fp32 position
// gradient accumulators.
//   dq kernel, per 64-query block (each warp 16 query rows), over the visible 64-key tiles: the
//     scores recomputed with the position tile sB, P = exp2(s log2e scale - lse log2e),
//     dP = dO V^T, dS = P (dP - delta); dq += dS K; with c2p also dq += Z G_k and
//     dpos_key[rel[t0 + u]] += Z^T Q (Z split into T hi + lo: see a_fragment_split), where Z[i', u] = dS[i', i' - u + BN - 1] (the tile's dS by
//     diagonal, built from the warp's own rows of dS in shared memory sDS).
//   dk/dv kernel, per 64-key block (each warp 16 keys), over all 64-query tiles: the transposed
//     scores s^T = K Q^T plus sB^T, P^T, dv += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//     dk += dS^T Q; with p2c also dk += Y^T G_q and dpos_query[rel[t0 + u]] += Y K, where
//     Y[u, j'] = dS[u + j' - BN + 1, j']. At head_dim 128 the query tiles are swept twice, once per
//     64-column half of dk and dv (BwdConfig::kDSplit: registers; four 32-column sweeps with
//     dropout), dpos_query in the first sweep.
// dq and dk carry the softmax scale at the end; the position gradients are left unscaled (the host
// scales them). Rows that see no key (lse = +inf) and padded keys get exactly zero gradients.
// DROPOUT: the plain attention backward's: the forward's mask is redrawn (dropout_keep_rows in the
// dq kernel, dropout_keep_cols for the dk/dv kernel's transposed tiles), never stored; dV = (P *
// keep)^T dO times 1 / (1 - p), and dP becomes dP * keep / (1 - p) before dS = P (dP - delta), so
// dq, dk and both position gradients (all made from dS) follow; delta = rowsum(dO * O) needs no
// change, O holds the dropout.
#pragma once
#include <type_traits>

#include "disentangled/fwd_kernel.cuh"

namespace forkattn::kernels::disentangled {

using attention::dropout_keep_cols;
using attention::load_b_kn;
using attention::mma16816;
using attention::pack2;

template <int D>
struct BwdConfig {
  using F = FwdConfig<D>;
  static constexpr int kBlockM = F::kBlockM, kBlockN = F::kBlockN, kThreads = F::kThreads, kRow = F::kRow;
  static constexpr int kBRow = F::kBRow;
  // Q, dO, K, V (one stage each), the position rows, sB and sDS, per-key bias, per-row lse and delta
  static constexpr size_t kSmem = (2 * kBlockM + 2 * kBlockN + F::kPosRows) * kRow * 2 +
                                  (2 * kBlockM * kBRow + kBlockN + 2 * kBlockM) * sizeof(float);
  static_assert(kBlockM == kBlockN, "the dk/dv kernel stages its 64 key rows in the Q tile");
  // Registers of the dk/dv kernel (ptxas -v, sm_80 and sm_90a; chosen for 0 spills). Its dk and
  // dv accumulators ([16, D / kDSplit] fp32 per warp each) stay live over the whole sweep of
  // query tiles, and each tile is taken in kQuerySplit pieces of queries whose s^T and dS^T
  // ([16, 64 / kQuerySplit] each) sit next to them.
  //   D32: one piece (with two, the p2c-only kernel spills 12 bytes on sm_80: ptxas caps it at
  //     128 registers).
  //   D64: two pieces.
  //   D128: dk and dv of all 128 columns (128 registers) spill 8-64 bytes with one, two or four
  //     pieces, so the kernel sweeps the query tiles twice, once per 64-column half of dk and dv
  //     (kDSplit = 2; s^T and dS^T recomputed: about 1.5x the tensor-core work of one sweep, the
  //     position terms twice). Even then the both-terms kernel hits 255 registers and spilled
  //     24 bytes on sm_90a until the loops whose fragment loads ptxas hoists all at once are
  //     rolled: the pieces (kPieceUnroll), the K steps of s^T and dP^T (kKUnroll), and, 2 steps
  //     at a time, the K steps of the position products (kPosUnroll: p2c_into / c2p_into). Only
  //     loops that index no register array are rolled (a rolled index would put it in local memory).
  // The dq kernel needs no split (one [16, D] accumulator), but shares position_tile's unrolling.
  // Shared memory is the same at every split: 142,080 bytes at D128 (sm_80 allows 166,912).
  static constexpr int kQuerySplit = D == 32 ? 1 : 2;
  static constexpr int kDSplit = D == 128 ? 2 : 1;
  // With dropout the mask's Philox joins them. At D128 the both-terms kernel then spilled 12-32
  // bytes with two sweeps whatever else was tried (the mask drawn before or after s^T and dP^T,
  // four query pieces, rolled position products: sm_80 or sm_90a spilled), so it sweeps four
  // times, 32 columns of dk and dv each (s^T, dP^T and the mask recomputed per sweep).
  template <bool DROPOUT>
  static constexpr int kDSplitFor = DROPOUT && D == 128 ? 4 : kDSplit;
  static constexpr int kPieceUnroll = D == 128 ? 1 : kQuerySplit;
  static constexpr int kKUnroll = D == 128 ? 1 : D / 16;
  static constexpr int kPosUnroll = D == 128 ? 2 : D / 16;
  // The dq kernel's K steps of s and dP: all unrolled, but rolled with dropout at D128 (the mask's
  // Philox next to dq, s and dP spilled 16 bytes at 255 registers on sm_80).
  template <bool DROPOUT>
  static constexpr int kDqKUnroll = DROPOUT && D == 128 ? 1 : D / 16;
  static_assert(kBlockM % (16 * kQuerySplit) == 0, "query pieces of whole 16-column mma tiles");
  static_assert(D % (16 * kDSplit) == 0, "column halves of whole 16-column mma tiles");
  static_assert(D % (16 * kDSplitFor<true>) == 0, "column blocks of whole 16-column mma tiles");
};

// The backward kernels' shared memory, carved as BwdConfig::kSmem counts it: Q, dO, K, V tiles
// (one stage each), the position rows, sB and sDS ([BM][kBRow] fp32: the position terms and the
// warp's rows of dS, or of dS^T in the dk/dv kernel), the per-key bias, and the query tile's
// lse * log2e and delta (dk/dv kernel).
template <typename T, int D>
struct BwdSmem {
  T *q, *dout, *k, *v, *pos;
  float *pos_terms, *ds, *bias, *lse2, *delta;
  __device__ __forceinline__ explicit BwdSmem(unsigned char* base) {
    using C = BwdConfig<D>;
    q = reinterpret_cast<T*>(base);
    dout = q + C::kBlockM * C::kRow;
    k = dout + C::kBlockM * C::kRow;
    v = k + C::kBlockN * C::kRow;
    pos = v + C::kBlockN * C::kRow;
    pos_terms = reinterpret_cast<float*>(pos + C::F::kPosRows * C::kRow);
    ds = pos_terms + C::kBlockM * C::kBRow;
    bias = ds + C::kBlockM * C::kBRow;
    lse2 = bias + C::kBlockN;
    delta = lse2 + C::kBlockM;
  }
};

// The unscaled position terms of a tile into sB [BM][BROW] (every entry), from the position rows
// loaded into sP one term after the other; sP keeps the rows of the term loaded last: G_k when
// C2P_LAST (the dq kernel), else G_q (the dk/dv kernel). Waits for every cp.async group (the
// caller's K/V or Q/dO tile included) and ends with a block barrier. Block-uniform.
template <typename T, int D, bool C2P, bool P2C, bool C2P_LAST>
__device__ __forceinline__ void position_tile(float* sB, T* sP, const T* sQ, const T* sKs, const T* pk,
                                              const T* pq, int64_t pk_row_stride, int64_t pq_row_stride,
                                              const int64_t* rel, int t0, int n_rel, int tid) {
  using C = FwdConfig<D>;
  const int warp = tid / 32, lane = tid % 32;
  auto load = [&](const T* pos, int64_t row_stride) {
    load_pos_rows_async<C::kPosRows, D, C::kThreads>(sP, pos, row_stride, rel, t0, C::kDiag, n_rel, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  };
  // one term after the other: its rows into sP, its products stored into sB, or added when the
  // term before it is there already
  auto p2c = [&](auto add) {
    load(pq, pq_row_stride);
    p2c_into<T, D, decltype(add)::value, BwdConfig<D>::kPosUnroll>(sB, sP, sKs, warp, lane);
    __syncthreads();
  };
  auto c2p = [&](auto add) {
    load(pk, pk_row_stride);
    c2p_into<T, D, decltype(add)::value, BwdConfig<D>::kPosUnroll>(sB, sP, sQ, warp, lane);
    __syncthreads();
  };
  constexpr bool kFirst = C2P_LAST ? P2C : C2P;  // whether the term that goes first is on
  if constexpr (C2P_LAST) {
    if constexpr (P2C) p2c(std::false_type{});
    if constexpr (C2P) c2p(std::bool_constant<kFirst>{});
  } else {
    if constexpr (C2P) c2p(std::false_type{});
    if constexpr (P2C) p2c(std::bool_constant<kFirst>{});
  }
  if constexpr (!C2P && !P2C) {
    cp_async_wait<0>();
    __syncthreads();
  }
}

// An A fragment (16 x 16) whose element (row, col) is at(row, col), rounded to T.
template <typename T, typename At>
__device__ __forceinline__ void a_fragment(uint32_t (&a)[4], int lane, At&& at) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
    a[r] = pack2<T>(at(row, col), at(row, col + 1));
  }
}

// float(T(x)): x rounded to the element type.
template <typename T>
__device__ __forceinline__ float rounded(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__float2half_rn(x));
  } else {
    return __bfloat162float(__float2bfloat16_rn(x));
  }
}

// The same fragment split in two, hi = T(x) and lo = T(x - hi): hi + lo carries x to about twice
// T's precision. The position gradients sum many dS of one embedding row (every diagonal that
// clamps or buckets onto it): one rounding of each dS to T would add up past the 2x rule.
template <typename T, typename At>
__device__ __forceinline__ void a_fragment_split(uint32_t (&hi)[4], uint32_t (&lo)[4], int lane, At&& at) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
    const float x0 = at(row, col), x1 = at(row, col + 1);
    hi[r] = pack2<T>(x0, x1);
    lo[r] = pack2<T>(x0 - rounded<T>(x0), x1 - rounded<T>(x1));
  }
}

// acc [16 x D] += A (16 x 16) * B, B the rows k0..k0+15 of a [k][n] tile (row length ROW).
template <typename T, int ROW, int D>
__device__ __forceinline__ void mma_a_kn(float (&acc)[D / 8][4], const uint32_t (&a)[4], const T* b_tile, int k0,
                                         int lane) {
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    uint32_t b[4];
    load_b_kn<ROW>(b, b_tile, j * 16, k0, lane);
    mma16816<T>(acc[2 * j], a, b[0], b[1]);
    mma16816<T>(acc[2 * j + 1], a, b[2], b[3]);
  }
}

// dpos[rel[t0 + u0 + r]] += (A B)[r] for r < 16 (A = hi + lo: 16 diagonals x 16, B: 16 rows of a
// [k][n] tile), 16 columns at a time; diagonals off the tile or the table are skipped (their A rows
// are zero).
template <typename T, int ROW, int D>
__device__ __forceinline__ void add_dpos(float* dpos, int64_t row_stride, const int64_t* rel, int t0, int u0,
                                         int n_rel, const uint32_t (&a)[4], const uint32_t (&a_lo)[4],
                                         const T* b_tile, int lane) {
  const int g = lane >> 2, t = lane & 3;
  int64_t rows[2];
  bool ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int u = u0 + g + 8 * h, tt = t0 + u;
    ok[h] = u < FwdConfig<D>::kDiag && tt >= 0 && tt < n_rel;
    rows[h] = ok[h] ? rel[tt] : 0;
  }
#pragma unroll 1
  for (int j = 0; j < D / 16; ++j) {
    uint32_t b[4];
    load_b_kn<ROW>(b, b_tile, j * 16, 0, lane);
    float c[2][4];
    zero(c);
    mma16816<T>(c[0], a, b[0], b[1]);
    mma16816<T>(c[1], a, b[2], b[3]);
    mma16816<T>(c[0], a_lo, b[0], b[1]);
    mma16816<T>(c[1], a_lo, b[2], b[3]);
#pragma unroll
    for (int x = 0; x < 2; ++x) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, col = j * 16 + 8 * x + 2 * t + (e & 1);
        if (ok[h]) atomicAdd(dpos + rows[h] * row_stride + col, c[x][e]);
      }
    }
  }
}

template <typename T, int D, bool C2P, bool P2C, bool DROPOUT>
__global__ void __launch_bounds__(BwdConfig<D>::kThreads) disentangled_bwd_dq_kernel(const DisentangledBwdParams p) {
  using C = BwdConfig<D>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, ROW = C::kRow, NT = C::kThreads, BROW = C::kBRow;
  extern __shared__ __align__(16) unsigned char smem[];
  const BwdSmem<T, D> sm(smem);
  T *sQ = sm.q, *sdO = sm.dout, *sK = sm.k, *sV = sm.v, *sP = sm.pos;
  float *sB = sm.pos_terms, *sDS = sm.ds, *sBias = sm.bias;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int len_q = p.len_q, len_k = p.len_k, n_rel = len_q + len_k - 1;
  const HeadOperands<T, C2P, P2C> in(p, b, h);
  const T *q = in.q, *k = in.k, *v = in.v, *pk = in.pk, *pq = in.pq;
  const bool* mask = in.mask;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
  float* dpk = C2P ? p.dpos_key + h * p.dpos_head_stride : nullptr;
  const int n_tiles = cdiv(len_k, BN);

  load_tile_async<BM, D, NT>(sQ, q, p.q_row_stride, m0, len_q, tid);
  load_tile_async<BM, D, NT>(sdO, dout, p.dout_row_stride, m0, len_q, tid);
  cp_async_commit();
  float lse2[2], delta[2];  // rows row_base and row_base + 8; rows past len_q: P = 0
  const int row_base = m0 + warp * 16 + g;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_base + 8 * r;
    const int64_t at = b * p.lse_batch_stride + h * p.lse_head_stride + row;
    lse2[r] = row < len_q ? p.lse[at] * attention::kLog2e : INFINITY;
    delta[r] = row < len_q ? p.delta[at] : 0.f;
  }
  float dq[D / 8][4];
  zero(dq);
  DropoutMask drop{};
  if constexpr (DROPOUT) drop = dropout_mask(p, b, h);

  int n = next_key_tile<BN, NT>(0, n_tiles, mask, len_k, sBias, tid);
  while (n < n_tiles) {
    const int n0 = n * BN;
    const int t0 = m0 - n0 + len_k - BN;
    load_tile_async<BN, D, NT>(sK, k, p.k_row_stride, n0, len_k, tid, mask);
    load_tile_async<BN, D, NT>(sV, v, p.v_row_stride, n0, len_k, tid, mask);
    cp_async_commit();
    position_tile<T, D, C2P, P2C, true>(sB, sP, sQ, sK, pk, pq, p.pk_row_stride, p.pq_row_stride, p.rel_index, t0,
                                        n_rel, tid);
    uint32_t keep = 0;  // drawn before s and dp are live
    if constexpr (DROPOUT) keep = dropout_keep_rows<BN / 8>(drop, row_base, n0, lane);
    float s[BN / 8][4];
    zero(s);
    mma_tile_smem_a<T, ROW, D, BN, true, C::template kDqKUnroll<DROPOUT>>(s, sQ, warp * 16, sK, lane);
    float dp[BN / 8][4];
    zero(dp);
    mma_tile_smem_a<T, ROW, D, BN, true, C::template kDqKUnroll<DROPOUT>>(dp, sdO, warp * 16, sV, lane);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * t + (e & 1), r = e >> 1;
        float x = s[j][e];
        if constexpr (C2P || P2C) x += sB[(warp * 16 + g + 8 * r) * BROW + col];
        const float pr = sBias[col] == 0.f ? exp2f(x * p.scale_log2 - lse2[r]) : 0.f;
        float dpv = dp[j][e];
        if constexpr (DROPOUT) dpv = keep & (1u << (4 * j + e)) ? dpv * p.dropout_scale : 0.f;
        s[j][e] = pr * (dpv - delta[r]);  // dS (unscaled)
      }
    }
    mma_tile_reg_a<T, ROW, BN, D>(dq, s, sK, lane);
    if constexpr (C2P) {
      // the warp's rows of dS, then Z by diagonal from them
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sDS[(warp * 16 + g + 8 * (e >> 1)) * BROW + j * 8 + 2 * t + (e & 1)] = s[j][e];
      }
      __syncwarp();
      const float* ds = sDS + warp * 16 * BROW;
#pragma unroll 1
      for (int u0 = warp * 16; u0 < warp * 16 + FwdConfig<D>::kWarpDiag; u0 += 16) {
        uint32_t a[4];
        a_fragment<T>(a, lane, [&](int i, int uu) {  // Z[warp * 16 + i, u0 + uu]
          const int col = warp * 16 + i - (u0 + uu) + (BN - 1);
          return col >= 0 && col < BN ? ds[i * BROW + col] : 0.f;
        });
        mma_a_kn<T, ROW, D>(dq, a, sP, u0, lane);
        uint32_t a_lo[4];
        a_fragment_split<T>(a, a_lo, lane, [&](int uu, int i) {  // Z^T[u0 + uu, warp * 16 + i]
          const int col = warp * 16 + i - (u0 + uu) + (BN - 1);
          return col >= 0 && col < BN ? ds[i * BROW + col] : 0.f;
        });
        add_dpos<T, ROW, D>(dpk, p.dpos_row_stride, p.rel_index, t0, u0, n_rel, a, a_lo, sQ + warp * 16 * ROW,
                            lane);
      }
    }
    __syncthreads();  // sK, sV, sP, sB, sDS are refilled by the next tile
    n = next_key_tile<BN, NT>(n + 1, n_tiles, mask, len_k, sBias, tid);
  }
  cp_async_wait<0>();
  __syncthreads();
  stage_rows<T, D>(sQ, warp * 16, dq, p.scale, p.scale, lane);  // each warp reuses its own Q rows
  __syncthreads();
  T* dq_out = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
  store_tile<BM, D, NT>(dq_out, p.dq_row_stride, m0, len_q, sQ, tid);
}

template <typename T, int D, bool C2P, bool P2C, bool DROPOUT>
__global__ void __launch_bounds__(BwdConfig<D>::kThreads, 1) disentangled_bwd_dkdv_kernel(const DisentangledBwdParams p) {
  using C = BwdConfig<D>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, ROW = C::kRow, NT = C::kThreads, BROW = C::kBRow;
  extern __shared__ __align__(16) unsigned char smem[];
  const BwdSmem<T, D> sm(smem);
  T *sQ = sm.q, *sdO = sm.dout, *sK = sm.k, *sV = sm.v, *sP = sm.pos;
  float *sB = sm.pos_terms, *sDS = sm.ds, *sBias = sm.bias;
  float *sL = sm.lse2, *sDelta = sm.delta;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * BN, h = blockIdx.y, b = blockIdx.z;
  const int len_q = p.len_q, len_k = p.len_k, n_rel = len_q + len_k - 1;
  const HeadOperands<T, C2P, P2C> in(p, b, h);
  const T *q = in.q, *k = in.k, *v = in.v, *pk = in.pk, *pq = in.pq;
  const bool* mask = in.mask;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
  float* dpq = P2C ? p.dpos_query + h * p.dpos_head_stride : nullptr;

  // this block's keys: visible or not (one thread per key), and whether any is
  const int key = n0 + tid;
  const bool visible = tid < BN && key < len_k && (mask == nullptr || mask[key]);
  if (tid < BN) sBias[tid] = visible ? 0.f : -INFINITY;
  const bool live = __syncthreads_or(visible);
  load_tile_async<BN, D, NT>(sK, k, p.k_row_stride, n0, len_k, tid, mask);
  load_tile_async<BN, D, NT>(sV, v, p.v_row_stride, n0, len_k, tid, mask);
  cp_async_commit();

  constexpr int DH = D / C::template kDSplitFor<DROPOUT>;  // the columns of dk and dv one sweep accumulates
  const int key_row = warp * 16 + g;  // this lane's keys: key_row and key_row + 8 of the block
  // a padded key's gradients are exactly zero
  const float keep0 = sBias[key_row] == 0.f ? 1.f : 0.f, keep1 = sBias[key_row + 8] == 0.f ? 1.f : 0.f;
#pragma unroll 1
  for (int d0 = 0; d0 < D; d0 += DH) {  // one sweep over the query tiles per column block of dk, dv
    float dk[DH / 8][4], dv[DH / 8][4];
    zero(dk);
    zero(dv);
#pragma unroll 1  // one query tile at a time (an unrolled sweep spills at D128)
    for (int m0 = 0; live && m0 < len_q; m0 += BM) {
      const int t0 = m0 - n0 + len_k - BN;
      load_tile_async<BM, D, NT>(sQ, q, p.q_row_stride, m0, len_q, tid);
      load_tile_async<BM, D, NT>(sdO, dout, p.dout_row_stride, m0, len_q, tid);
      cp_async_commit();
      if (tid < BM) {
        const int row = m0 + tid;
        const int64_t at = b * p.lse_batch_stride + h * p.lse_head_stride + row;
        sL[tid] = row < len_q ? p.lse[at] * attention::kLog2e : INFINITY;
        sDelta[tid] = row < len_q ? p.delta[at] : 0.f;
      }
      position_tile<T, D, C2P, P2C, false>(sB, sP, sQ, sK, pk, pq, p.pk_row_stride, p.pq_row_stride, p.rel_index, t0,
                                           n_rel, tid);
      // the tile's queries in kQuerySplit pieces (registers: dk and dv are live)
#pragma unroll(C::kPieceUnroll)
      for (int piece = 0; piece < C::kQuerySplit; ++piece) {
        constexpr int HM = BM / C::kQuerySplit;
        const int c0 = piece * HM;
        float s[HM / 8][4];  // s^T: rows = this warp's keys, columns = queries c0 ..
        zero(s);
        mma_tile_smem_a<T, ROW, D, HM, true, C::kKUnroll>(s, sK, warp * 16, sQ + c0 * ROW, lane);
        float dp[HM / 8][4];
        zero(dp);
        mma_tile_smem_a<T, ROW, D, HM, true, C::kKUnroll>(dp, sV, warp * 16, sdO + c0 * ROW, lane);
        uint32_t keep = 0;  // the mask of the transposed piece
        if constexpr (DROPOUT) {
          keep = dropout_keep_cols<HM / 8>(dropout_mask(p, b, h), (n0 + warp * 16) >> 3, m0 + c0, lane);
        }
#pragma unroll
        for (int j = 0; j < HM / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = c0 + j * 8 + 2 * t + (e & 1), kr = key_row + 8 * (e >> 1);
            float x = s[j][e];
            if constexpr (C2P || P2C) x += sB[col * BROW + kr];
            const float pr = sBias[kr] == 0.f ? exp2f(x * p.scale_log2 - sL[col]) : 0.f;
            if constexpr (DROPOUT) {
              const bool kept = keep & (1u << (4 * j + e));
              s[j][e] = kept ? pr : 0.f;  // (P * keep)^T; 1 / (1 - p) joins dV at the end
              dp[j][e] = pr * ((kept ? dp[j][e] * p.dropout_scale : 0.f) - sDelta[col]);  // dS^T
            } else {
              s[j][e] = pr;                              // P^T
              dp[j][e] = pr * (dp[j][e] - sDelta[col]);  // dS^T (unscaled)
            }
          }
        }
        mma_tile_reg_a<T, ROW, HM, DH>(dv, s, sdO + c0 * ROW + d0, lane);
        mma_tile_reg_a<T, ROW, HM, DH>(dk, dp, sQ + c0 * ROW + d0, lane);
        if constexpr (P2C) {
#pragma unroll
          for (int j = 0; j < HM / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) sDS[(key_row + 8 * (e >> 1)) * BROW + c0 + j * 8 + 2 * t + (e & 1)] = dp[j][e];
          }
        }
      }
      if constexpr (P2C) {
        __syncwarp();
        const float* ds = sDS + warp * 16 * BROW;  // ds[j * BROW + i] = dS[i, warp * 16 + j]
        // the warp's keys touch diagonals BM - 16 (warp + 1) .. BM - 16 warp + 14 (+ BN - 64 = 0)
        const int u_first = BM - 16 * (warp + 1);
#pragma unroll 1
        for (int u0 = u_first; u0 < u_first + FwdConfig<D>::kWarpDiag; u0 += 16) {
          uint32_t a[4];
          a_fragment<T>(a, lane, [&](int j, int uu) {  // Y^T[warp * 16 + j, u0 + uu]
            const int i = u0 + uu + warp * 16 + j - (BN - 1);
            return i >= 0 && i < BM ? ds[j * BROW + i] : 0.f;
          });
          mma_a_kn<T, ROW, DH>(dk, a, sP + d0, u0, lane);
          if (d0 != 0) continue;  // dpos_query (every column) once, in the first sweep
          uint32_t a_lo[4];
          a_fragment_split<T>(a, a_lo, lane, [&](int uu, int j) {  // Y[u0 + uu, warp * 16 + j]
            const int i = u0 + uu + warp * 16 + j - (BN - 1);
            return i >= 0 && i < BM ? ds[j * BROW + i] : 0.f;
          });
          add_dpos<T, ROW, D>(dpq, p.dpos_row_stride, p.rel_index, t0, u0, n_rel, a, a_lo, sK + warp * 16 * ROW,
                              lane);
        }
      }
      __syncthreads();  // sQ, sdO, sP, sB, sDS, sL, sDelta are refilled by the next tile
    }
    cp_async_wait<0>();
    __syncthreads();
    stage_rows<T, DH, ROW>(sQ + d0, warp * 16, dk, p.scale * keep0, p.scale * keep1, lane);
    const float dv_mul = DROPOUT ? p.dropout_scale : 1.f;
    stage_rows<T, DH, ROW>(sdO + d0, warp * 16, dv, keep0 * dv_mul, keep1 * dv_mul, lane);
    __syncthreads();
    T* dk_out = static_cast<T*>(p.dk) + b * p.dk_batch_stride + h * p.dk_head_stride + d0;
    T* dv_out = static_cast<T*>(p.dv) + b * p.dv_batch_stride + h * p.dv_head_stride + d0;
    store_tile<BN, DH, NT, T, ROW>(dk_out, p.dk_row_stride, n0, len_k, sQ + d0, tid);
    store_tile<BN, DH, NT, T, ROW>(dv_out, p.dv_row_stride, n0, len_k, sdO + d0, tid);
    if (d0 + DH < D) __syncthreads();  // the next sweep refills sQ and sdO
  }
}

template <typename T, int D, bool DROPOUT>
cudaError_t run_disentangled_bwd(const DisentangledBwdParams& p, cudaStream_t stream) {
  using C = BwdConfig<D>;
  if (p.batch == 0 || p.heads == 0 || (p.len_q == 0 && p.len_k == 0)) return cudaSuccess;
  return FA_BOOL_SWITCH(p.c2p, kC2P, [&] {
    return FA_BOOL_SWITCH(p.p2c, kP2C, [&] {
      if (p.len_q > 0) {
        auto kernel = disentangled_bwd_dq_kernel<T, D, kC2P, kP2C, DROPOUT>;
        cudaError_t err = set_smem(kernel, C::kSmem);
        if (err != cudaSuccess) return err;
        kernel<<<dim3(cdiv(p.len_q, C::kBlockM), p.heads, p.batch), C::kThreads, C::kSmem, stream>>>(p);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
      if (p.len_k > 0) {
        auto kernel = disentangled_bwd_dkdv_kernel<T, D, kC2P, kP2C, DROPOUT>;
        cudaError_t err = set_smem(kernel, C::kSmem);
        if (err != cudaSuccess) return err;
        kernel<<<dim3(cdiv(p.len_k, C::kBlockN), p.heads, p.batch), C::kThreads, C::kSmem, stream>>>(p);
        return cudaGetLastError();
      }
      return cudaSuccess;
    });
  });
}

}  // namespace forkattn::kernels::disentangled

// As the forward's: run_disentangled_bwd<T, D, false> and <T, D, true>, each in its own file.
#define FORKATTN_INSTANTIATE_DISENTANGLED_BWD_(T, D, DROPOUT)                                      \
  template cudaError_t forkattn::kernels::disentangled::run_disentangled_bwd<T, D, DROPOUT>( \
      const forkattn::kernels::disentangled::DisentangledBwdParams&, cudaStream_t);
#define FORKATTN_INSTANTIATE_DISENTANGLED_BWD(T, D) FORKATTN_INSTANTIATE_DISENTANGLED_BWD_(T, D, false)
#define FORKATTN_INSTANTIATE_DISENTANGLED_BWD_DROPOUT(T, D) FORKATTN_INSTANTIATE_DISENTANGLED_BWD_(T, D, true)
