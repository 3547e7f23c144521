// Attention dropout inside the kernels: kernels/common/philox.h's mask, regenerated wherever a
// kernel needs it (the forward, dq and dk/dv kernels), never stored. Only the DROPOUT
// instantiations call this; dropout_p = 0 runs kernels without a line of it.
//
// A warp holds a 16 x (8 NJ) fragment of scores in the mma C layout (common.cuh). Its mask takes
// one Philox block per (query row, 8 key columns), and one lane needs only 2 of a block's 8
// columns, so the lanes that need the same blocks share the work: each draws NJ / 2 blocks into one
// word of keep bits (bit 8 i + c: column c of its i-th block) and the group exchanges words by
// shuffles. The result is a `keep` word with bit 4 j + e for fragment element c[j][e].
//   Rows = queries (forward, dq): lanes 4g..4g+3 (a quad) share rows g and g+8; quad lane t draws
//     blocks f = t NJ/2 .. with f = 2 j + r (key columns col0 + 8 j.., query row row0 + 8 r).
//   Rows = keys (dk/dv, the transposed fragment): lanes t, t+4, .., t+28 share queries 2t, 2t+1 of
//     every 8; lane g draws blocks f = g NJ/2 .. with f = 4 j + e (query m0 + 8 j + 2 t + (e & 1),
//     keys of block kb0 + (e >> 1)), of which it keeps column g.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/philox.h"

namespace forkattn::kernels::attention {

// The run-time part of the mask: seed, (b * heads + h), threshold (keep iff u16 >= threshold).
struct DropoutMask {
  uint64_t seed;
  uint32_t bh;
  uint32_t threshold;
};

// Keep bits of the 8 key columns 8 * block .. of query row `row`: bit c for column 8 * block + c.
__device__ __forceinline__ uint32_t keep_bits8(const DropoutMask& m, uint32_t row, uint32_t block) {
  const Philox4 r = philox4x32_10(m.seed, block, row, m.bh, kDropoutStream);
  uint32_t bits = 0;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    bits |= static_cast<uint32_t>((r.r[w] & 0xffffu) >= m.threshold) << (2 * w);
    bits |= static_cast<uint32_t>((r.r[w] >> 16) >= m.threshold) << (2 * w + 1);
  }
  return bits;
}

// Rows = queries: element c[j][e] is query row0 + 8 (e >> 1) (row0 = this lane's first row, the
// kernels' row_base) and key col0 + 8 j + 2 t + (e & 1), col0 a multiple of 8.
template <int NJ>
__device__ __forceinline__ uint32_t dropout_keep_rows(const DropoutMask& m, int row0, int col0, int lane) {
  static_assert(NJ % 2 == 0 && NJ <= 8, "NJ / 2 blocks of 8 bits per lane fit one word");
  constexpr int NB = NJ / 2;
  const int t = lane & 3;
  uint32_t mine = 0;
#pragma unroll
  for (int i = 0; i < NB; ++i) {
    const int f = t * NB + i;  // block (j, r) = (f >> 1, f & 1)
    mine |= keep_bits8(m, row0 + 8 * (f & 1), (col0 >> 3) + (f >> 1)) << (8 * i);
  }
  uint32_t keep = 0;
#pragma unroll
  for (int src = 0; src < 4; ++src) {
    const uint32_t w = __shfl_sync(0xffffffffu, mine, (lane & ~3) | src);
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      const int f = src * NB + i, j = f >> 1, r = f & 1;
      keep |= ((w >> (8 * i + 2 * t)) & 3u) << (4 * j + 2 * r);  // columns 2t, 2t + 1: e = 2r, 2r + 1
    }
  }
  return keep;
}

// Rows = keys: element c[j][e] is key 8 * kb0 + g + 8 (e >> 1) (kb0: the warp's first key block)
// and query m0 + 8 j + 2 t + (e & 1).
template <int NJ>
__device__ __forceinline__ uint32_t dropout_keep_cols(const DropoutMask& m, int kb0, int m0, int lane) {
  static_assert(NJ % 2 == 0 && NJ <= 8, "NJ / 2 blocks of 8 bits per lane fit one word");
  constexpr int NB = NJ / 2;
  const int g = lane >> 2, t = lane & 3;
  uint32_t mine = 0;
#pragma unroll
  for (int i = 0; i < NB; ++i) {
    const int f = g * NB + i;  // element (j, e) = (f >> 2, f & 3)
    mine |= keep_bits8(m, m0 + 8 * (f >> 2) + 2 * t + (f & 1), kb0 + ((f >> 1) & 1)) << (8 * i);
  }
  uint32_t keep = 0;
#pragma unroll
  for (int src = 0; src < 8; ++src) {
    const uint32_t w = __shfl_sync(0xffffffffu, mine, 4 * src + t);
#pragma unroll
    for (int i = 0; i < NB; ++i) keep |= ((w >> (8 * i + g)) & 1u) << (src * NB + i);
  }
  return keep;
}

template <typename Params>
__device__ __forceinline__ DropoutMask dropout_mask(const Params& p, int b, int h) {
  return {p.dropout_seed, static_cast<uint32_t>(b * p.heads + h), p.dropout_threshold};
}

}  // namespace forkattn::kernels::attention
