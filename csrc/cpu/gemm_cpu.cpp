// The packed-panel fp32 GEMM of csrc/gemm.h: y[:, n0:n1] = x @ W[n0:n1]^T (+ bias) (+ exact GELU).
//
// W is packed once (gemm_pack_kernel) into panels of kNr output columns, each k-major: panel p
// holds W[kNr p + j, k] at packed[(p * K + k) * kNr + j], zero past N. kNr is this variant's own
// (gemm_panel_width_kernel): 48 for AVX512, 24 for AVX2 and DEFAULT; the host checks that a packed
// weight ([panels, K, kNr]) has the width of the variant in use. The kernels walk
//   K in blocks of kKc (in practice all of K)  >  panels of kNr columns  >  row blocks of kMr
// and per (row block, panel, K block) run an kMr x kNr register tile:
// - AVX512: 8 x 48, 24 zmm accumulators, per k three 16-float loads of the panel and eight
//   broadcasts of x (one per row), 24 FMAs (12x32, 14x32, 6x64: docs/CPU_INFERENCE.md, "An AVX-512
//   tile"); the last panel's columns and the epilogue through masked loads and stores;
// - AVX2: 4 x 24, 12 ymm accumulators, three 8-float loads and four broadcasts per twelve FMAs,
//   k unrolled by 4 (a 6 x 16 tile measured 3-13% slower: docs/CPU_INFERENCE.md).
// BERT's widths (384 ... 3072) are multiples of 24 and of 48. The panel (K x kNr floats) stays in
// L2 while every row block of x passes over it. x is read in place (packing it into 6-row strips
// measured no faster on AVX2: each broadcast is a load from the row), the tile is stored with only
// the valid columns, added to y from the second K block on, and the epilogue (bias, bias + exact
// GELU: cpu/gelu.h, the bias + GELU pass's own math) applied in the last K block's store.
// DEFAULT runs a plain loop over the same packed layout (correct, not fast).
#include "cpu/isa.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "cpu/gelu.h"
#include "gemm.h"

namespace forkattn {
namespace cpu::CPU_CAPABILITY {  // one copy per ISA variant: cpu/isa.h
namespace {

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__FMA__)
#define FORKATTN_GEMM_ZMM 1
constexpr int64_t kNr = 48;  // output columns per panel: three zmm
constexpr int kMr = 8;       // rows per register tile
#else
constexpr int64_t kNr = 24;  // three ymm (AVX2); the DEFAULT loop uses the same layout
constexpr int kMr = 4;
#endif
// K block. Measured at BERT's shapes (M = 128, K 384..3072; docs/CPU_INFERENCE.md): blocks of 128,
// 256, 512, 768, 1024 and 1536 were 0-15% slower than none with the AVX2 tile (the tile's store and
// reload of y per block cost more than the L1 residency of the panel slice buys), so K is blocked
// only beyond 4096.
constexpr int64_t kKc = 4096;

inline float epilogue1(float v, const float* bias, int64_t j, int epilogue) {
  if (epilogue == static_cast<int>(GemmEpilogue::kNone)) return v;
  v += bias[j];
  return epilogue == static_cast<int>(GemmEpilogue::kBiasGelu) ? gelu(v) : v;
}

#if defined(FORKATTN_GEMM_ZMM)
constexpr int kNv = static_cast<int>(kNr / 16);  // 16-float vectors per panel row

// 16-wide exact GELU: the 8-wide one (cpu/gelu.h) on each half, so results match the bias + GELU pass.
inline __m512 gelu16(__m512 v) {
  const __m256 lo = gelu8(_mm512_castps512_ps256(v)), hi = gelu8(_mm512_extractf32x8_ps(v, 1));
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

// y rows [0, MR) x columns [0, nv) (+)= x[0:MR, 0:kc] @ panel slice bp [kc][kNr]; `add`: accumulate
// into y (a later K block); `bias` non-null in the last K block when the epilogue has one. The
// accumulators are an array that the fully unrolled loops index only with constants, so GCC keeps
// all MR x kNv of them in zmm registers (checked in the disassembly: no stack access in the k loop).
template <int MR>
inline void tile(const float* x, int64_t ldx, const float* bp, int64_t kc, float* y, int64_t ldy, int nv, bool add,
                 const float* bias, int epilogue) {
  __m512 acc[MR][kNv];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) acc[r][v] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k, bp += kNr) {
    __m512 b[kNv];
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) b[v] = _mm512_loadu_ps(bp + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
#pragma GCC unroll 4
      for (int v = 0; v < kNv; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  const bool gelu_too = epilogue == static_cast<int>(GemmEpilogue::kBiasGelu);
#pragma GCC unroll 4
  for (int v = 0; v < kNv; ++v) {
    const int cols = nv - 16 * v;  // valid columns of this vector (the last panel may have fewer)
    if (cols <= 0) break;
    const __mmask16 m = cols >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << cols) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* yr = y + r * ldy + 16 * v;
      __m512 t = acc[r][v];
      if (add) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m, yr));
      if (bias) {
        t = _mm512_add_ps(t, bv);
        if (gelu_too) t = gelu16(t);
      }
      _mm512_mask_storeu_ps(yr, m, t);
    }
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kNv = static_cast<int>(kNr / 8);  // 8-float vectors per panel row

// Rows [0, mr) of a finished tile acc into y's columns [0, nv): added to y's values when `add`, then
// the epilogue when `bias` is non-null (the last K block).
inline void store_tile(const float (*acc)[kNr], int mr, float* y, int64_t ldy, int nv, bool add, const float* bias,
                       int epilogue) {
  const bool gelu_too = epilogue == static_cast<int>(GemmEpilogue::kBiasGelu);
  if (nv == kNr) {
    __m256 b[kNv];
    for (int v = 0; v < kNv; ++v) b[v] = bias ? _mm256_loadu_ps(bias + 8 * v) : _mm256_setzero_ps();
    for (int r = 0; r < mr; ++r) {
      float* yr = y + r * ldy;
      for (int v = 0; v < kNv; ++v) {
        __m256 t = _mm256_load_ps(acc[r] + 8 * v);
        if (add) t = _mm256_add_ps(t, _mm256_loadu_ps(yr + 8 * v));
        if (bias) {
          t = _mm256_add_ps(t, b[v]);
          if (gelu_too) t = gelu8(t);
        }
        _mm256_storeu_ps(yr + 8 * v, t);
      }
    }
    return;
  }
  for (int r = 0; r < mr; ++r) {  // the last panel: only nv < kNr columns exist in y (and in bias)
    float* yr = y + r * ldy;
    for (int j = 0; j < nv; ++j) {
      const float v = add ? acc[r][j] + yr[j] : acc[r][j];
      yr[j] = bias ? epilogue1(v, bias, j, epilogue) : v;
    }
  }
}

// y rows [0, MR) x columns [0, nv) (+)= x[0:MR, 0:kc] @ panel slice bp [kc][24]; `add`: accumulate
// into y (a later K block); `bias` non-null in the last K block when the epilogue has one.
template <int MR>
inline void tile(const float* x, int64_t ldx, const float* bp, int64_t kc, float* y, int64_t ldy, int nv, bool add,
                 const float* bias, int epilogue) {
  static_assert(kNr == 24 && kMr == 4, "the tile below is written for 4 rows x 3 vectors");
  // Named accumulators, not arrays: GCC kept arrays of vectors on the stack (a store per FMA).
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00, a20 = a00, a21 = a00,
         a22 = a00, a30 = a00, a31 = a00, a32 = a00;
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k, bp += kNr) {
    const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8), b2 = _mm256_loadu_ps(bp + 16);
#define FORKATTN_GEMM_ROW(r)                               \
  if constexpr (MR > r) {                                  \
    const __m256 a = _mm256_broadcast_ss(x + r * ldx + k); \
    a##r##0 = _mm256_fmadd_ps(a, b0, a##r##0);             \
    a##r##1 = _mm256_fmadd_ps(a, b1, a##r##1);             \
    a##r##2 = _mm256_fmadd_ps(a, b2, a##r##2);             \
  }
    FORKATTN_GEMM_ROW(0) FORKATTN_GEMM_ROW(1) FORKATTN_GEMM_ROW(2) FORKATTN_GEMM_ROW(3)
#undef FORKATTN_GEMM_ROW
  }
  const __m256 c[kMr][kNv] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22}, {a30, a31, a32}};
  // Only the loop above touches the accumulators (so they stay in registers); the stores read a copy.
  alignas(32) float acc[MR][kNr];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kNv; ++v) _mm256_store_ps(acc[r] + 8 * v, c[r][v]);
  store_tile(acc, MR, y, ldy, nv, add, bias, epilogue);
}

#endif

#if defined(__AVX2__) && defined(__FMA__)
using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int, bool, const float*, int);
template <int... R>  // {nullptr, tile<1>, ..., tile<kMr>}: kTiles[mr] runs an mr-row block
constexpr std::array<TileFn, kMr + 1> tile_table(std::integer_sequence<int, R...>) {
  return {nullptr, tile<R + 1>...};
}
constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kMr>{});
#endif

}  // namespace

int64_t gemm_panel_width_kernel() { return kNr; }

void gemm_pack_kernel(const float* w, int64_t ldw, int64_t N, int64_t K, float* packed) {
  const int64_t panels = (N + kNr - 1) / kNr;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = packed + p * K * kNr;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kNr; ++j) {
        const int64_t n = p * kNr + j;
        dst[k * kNr + j] = n < N ? w[n * ldw + k] : 0.f;
      }
  }
}

void gemm_kernel(const float* x, int64_t ldx, int64_t M, int64_t K, const float* packed, int64_t n0, int64_t n1,
                 const float* bias, int epilogue, float* y, int64_t ldy) {
  if (M <= 0 || n1 <= n0) return;
  const bool has_bias = epilogue != static_cast<int>(GemmEpilogue::kNone);
  const int64_t p0 = n0 / kNr, p1 = (n1 + kNr - 1) / kNr;
  if (K == 0) {  // an empty sum: the epilogue of zero
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) y[m * ldy + n] = has_bias ? epilogue1(0.f, bias, n, epilogue) : 0.f;
    return;
  }
#if defined(__AVX2__) && defined(__FMA__)
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    const bool add = k0 > 0, last = k0 + kc == K;
    for (int64_t p = p0; p < p1; ++p) {
      const float* bp = packed + (p * K + k0) * kNr;
      const int nv = static_cast<int>(std::min<int64_t>(kNr, n1 - p * kNr));
      const float* b = last && has_bias ? bias + p * kNr : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, M - m0));
        kTiles[mr](x + m0 * ldx + k0, ldx, bp, kc, y + m0 * ldy + p * kNr, ldy, nv, add, b, epilogue);
      }
    }
  }
#else
  // Portable: the same packed layout, one row and one panel at a time (the compiler vectorises the
  // panel-wide inner loop for the baseline ISA).
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t p = p0; p < p1; ++p) {
      float acc[kNr] = {};
      const float* bp = packed + p * K * kNr;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < kNr; ++j) acc[j] += xr[k] * bp[k * kNr + j];
      const int64_t nv = std::min<int64_t>(kNr, n1 - p * kNr);
      for (int64_t j = 0; j < nv; ++j)
        y[m * ldy + p * kNr + j] = has_bias ? epilogue1(acc[j], bias + p * kNr, j, epilogue) : acc[j];
    }
  }
#endif
}

}  // namespace cpu::CPU_CAPABILITY
}  // namespace forkattn
