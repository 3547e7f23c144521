// The one register block of the AVX2 / AVX512 variants' fp32 matmuls: both the packed-panel GEMM
// (csrc/cpu/gemm_cpu.cpp: zmm 8 x 48, ymm 4 x 24) and the attention kernels' tile matmuls
// (cpu/tile_gemm.h: zmm 6 x 64 / 8 x 48 / 12 x 32 / 12 x 16, ymm 6 x 16 / 8 x 8) run it.
//
// An MR x (W NV) block of the output lives in MR * NV vector accumulators (W = 16 floats for zmm,
// 8 for ymm). accumulate() runs the k loop: per step p it loads NV vectors of B's row p and
// broadcasts MR entries of A's column p, then MR * NV FMAs, each output's chain in order of p
// (acc = a * b + acc from acc = 0: the order the GEMM's bit-for-bit tests pin). Where the operands
// lie is a policy:
//   A: RowsA (A(i, p) = a[i * ld + p], rows of A in place) or ColsA (a[p * ld + i], A stored
//      transposed: a contiguous run of row p);
//   B: PanelB (a packed panel, k-major, zero-padded to the block's width: full loads) or StridedB
//      (rows of B in place with any stride, the last vector masked to the valid columns).
// store_block() hands each finished accumulator to the caller's epilogue (beta = 0 / 1 store, bias,
// bias + GELU, masked or scalar tail: each caller's own, next to its kernel).
//
// Internal linkage and the ISA's namespace (cpu/isa.h): the DEFAULT variant gets nothing from here.
#pragma once

#include "cpu/isa.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace forkattn {
namespace cpu::CPU_CAPABILITY {
namespace {
namespace regblock {

// The vector type of this variant and the few operations the kernels need; Mask selects the
// leading lanes of a partial vector (loads of masked-off lanes read nothing and give 0).
#if defined(CPU_CAPABILITY_AVX512)
struct Simd {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int W = 16;
  static Mask first(int64_t n) { return Mask((1u << n) - 1); }  // 1 <= n <= 16
  static Mask all() { return Mask(0xffff); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, Mask m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  // r[j] (row j, 16 columns) -> r[p] (column p, 16 rows): 32-bit, 64-bit, then 128-bit interleaves
  static void transpose(V* r) {
    V t[16];
    for (int j = 0; j < 16; j += 2) {
      t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
      t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int j = 0; j < 16; j += 4) {
      const __m512d a = _mm512_castps_pd(t[j]), b = _mm512_castps_pd(t[j + 2]);
      const __m512d e = _mm512_castps_pd(t[j + 1]), f = _mm512_castps_pd(t[j + 3]);
      r[j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
      r[j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(e, f));
      r[j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(e, f));
    }
    // r[4 g + q] now holds, per 128-bit lane L, column p = 4 L + q of rows j = 4 g .. 4 g + 3
    for (int q = 0; q < 4; ++q) {
      const V a0 = _mm512_shuffle_f32x4(r[q], r[4 + q], 0x88);  // lanes 0, 2 of g = 0 | g = 1
      const V a1 = _mm512_shuffle_f32x4(r[q], r[4 + q], 0xdd);  // lanes 1, 3
      const V b0 = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0x88);
      const V b1 = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0xdd);
      t[q] = _mm512_shuffle_f32x4(a0, b0, 0x88);       // lane 0 of every g: p = q
      t[8 + q] = _mm512_shuffle_f32x4(a0, b0, 0xdd);   // lane 2: p = 8 + q
      t[4 + q] = _mm512_shuffle_f32x4(a1, b1, 0x88);   // lane 1: p = 4 + q
      t[12 + q] = _mm512_shuffle_f32x4(a1, b1, 0xdd);  // lane 3: p = 12 + q
    }
    std::copy(t, t + 16, r);
  }
};
#else
struct Simd {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int W = 8;
  static Mask first(int64_t n) {  // 1 <= n <= 8
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Mask all() { return _mm256_set1_epi32(-1); }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, Mask m, V v) { _mm256_maskstore_ps(p, m, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  // r[j] (row j, 8 columns) -> r[p] (column p, 8 rows): 32-bit, 64-bit, then 128-bit interleaves
  static void transpose(V* r) {
    V t[8], s[8];
    for (int j = 0; j < 8; j += 2) {
      t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
      t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int j = 0; j < 8; j += 4) {  // per 128-bit lane L: s[j + q] = column 4 L + q of rows j .. j + 3
      s[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
      s[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xee);
      s[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
      s[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xee);
    }
    for (int q = 0; q < 4; ++q) {
      r[q] = _mm256_permute2f128_ps(s[q], s[4 + q], 0x20);
      r[4 + q] = _mm256_permute2f128_ps(s[q], s[4 + q], 0x31);
    }
  }
};
#endif
using V = Simd::V;
using Mask = Simd::Mask;
constexpr int W = Simd::W;

// A operands: A(i, p) for row i of the block and k step p.
struct RowsA {  // rows of A in place
  const float* a;
  int64_t ld;
  float at(int i, int64_t p) const { return a[i * ld + p]; }
};
struct ColsA {  // A stored transposed ([k, m] rows): row p holds A(0.., p) contiguously
  const float* a;
  int64_t ld;
  float at(int i, int64_t p) const { return a[p * ld + i]; }
};

// B operands: vector v of B's row p (`last`: v is the block's last vector).
struct PanelB {  // a packed panel, k-major, ld floats a row, zero past N: every load is whole
  const float* b;
  int64_t ld;
  V load(int64_t p, int v, bool /*last*/) const { return Simd::load(b + p * ld + W * v); }
};
struct StridedB {  // rows of B in place; the block's last vector masked to the valid columns
  const float* b;
  int64_t ld;
  Mask tail;
  V load(int64_t p, int v, bool last) const { return last ? Simd::load(b + p * ld + W * v, tail) : Simd::load(b + p * ld + W * v); }
};

// acc[i][v] = sum over p < k of A(i, p) * B(p, W v ..), one FMA chain per output in order of p.
// KU: k steps per loop trip (the panel GEMM's measured unroll; 1 for the tile matmuls). The fully
// unrolled loops index acc only with constants, so GCC keeps all MR x NV accumulators in registers
// (without the pragmas GCC 12 kept acc in memory as well: a store per FMA, 88 GFLOP/s for 260).
template <int MR, int NV, int KU, class A, class B>
inline void accumulate(V (&acc)[MR][NV], int64_t k, const A& a, const B& b) {
  static_assert(KU == 1 || KU == 2 || KU == 4, "k unroll of 1, 2 or 4");
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = Simd::zero();
  }
  const auto step = [&](int64_t p) __attribute__((always_inline)) {
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = b.load(p, v, v == NV - 1);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V ab = Simd::set1(a.at(i, p));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = Simd::fmadd(ab, bv[v], acc[i][v]);
    }
  };
  // GCC's own unrolling of the k loop (a pragma needs a literal: one loop per KU); measured: a
  // hand-unrolled loop of KU calls of step() ran the zmm 8 x 48 panel tile 20% slower.
  if constexpr (KU == 4) {
#pragma GCC unroll 4
    for (int64_t p = 0; p < k; ++p) step(p);
  } else if constexpr (KU == 2) {
#pragma GCC unroll 2
    for (int64_t p = 0; p < k; ++p) step(p);
  } else {
    for (int64_t p = 0; p < k; ++p) step(p);
  }
}

// store(i, v, acc[i][v]) for every accumulator, vector-major (a per-vector value such as a bias
// vector is loaded once per v by a caller that caches it).
template <int MR, int NV, class Store>
inline void store_block(const V (&acc)[MR][NV], Store&& store) {
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) store(i, v, acc[i][v]);
  }
}

}  // namespace regblock
}  // namespace
}  // namespace cpu::CPU_CAPABILITY
}  // namespace forkattn

#endif  // CPU_CAPABILITY_AVX512 || CPU_CAPABILITY_AVX2
