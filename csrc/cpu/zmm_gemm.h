// forkattn's own tile matmul for the AVX512 variant (tiles.h's gemm() calls it there): register-
// blocked zmm microkernels for the three products the attention kernels make, written row-major:
//
//   C[m, n] = alpha * X . Y + beta * C      X(i, p): [m, k] rows (xt = false) or its transpose
//                                           stored [k, m] (xt = true); Y [k, n] rows, unit stride
//
// C, X and Y have any row strides. A microkernel keeps an MR x (16 NV) block of C in MR * NV zmm
// accumulators; per step p it loads NV vectors of Y's row p (the last one masked to n) and
// broadcasts MR entries of X's column p from wherever they lie (rows of X when xt = false, a
// contiguous run of X's row p when xt = true): neither operand is packed. A . B^T (both operands
// with k contiguous) first transposes B into a per-thread [k, n] panel (16 x 16 register
// transposes), read by every row block of the call.
//
// Blocking: k in steps of kKc (a step's Y panel, kKc x 64 floats = 32 KB, stays in the 48 KB L1
// while every row block of X streams past it), then 64-column panels, then MR-row blocks. C is
// written once per k step; beta applies on the first one only, and beta = 0 never reads C (so NaN
// or garbage there cannot leak). k = 0 gives C = beta * C (0 for beta = 0), as BLAS does.
//
// Internal linkage and the ISA's namespace (cpu/isa.h), as tiles.h: only the AVX512 variant
// includes anything here.
#pragma once

#include "cpu/isa.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace forkattn {
namespace cpu::CPU_CAPABILITY {
namespace {
namespace zmm {

constexpr int64_t kKc = 128;  // k per step: the step's 64-column Y panel is 32 KB

// C[0:MR, 0:16 NV] (the last vector's columns limited by `last`) = alpha * X . Y + beta * C
// over k steps. X(i, p) = x[i * ldx + p] (XT = false) or x[p * ldx + i] (XT = true).
template <int MR, int NV, bool XT>
inline void micro(int64_t k, const float* x, int64_t ldx, const float* y, int64_t ldy, float* c, int64_t ldc,
                  float alpha, float beta, __mmask16 last) {
  // The unroll pragmas are needed: without them GCC 12 keeps acc[][] in memory as well as in
  // registers (a store per FMA; measured 88 GFLOP/s instead of 260).
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  const float* xr[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) xr[i] = XT ? x + i : x + i * ldx;
  for (int64_t p = 0; p < k; ++p) {
    const float* yp = y + p * ldy;
    __m512 yv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV - 1; ++v) yv[v] = _mm512_loadu_ps(yp + 16 * v);
    yv[NV - 1] = _mm512_maskz_loadu_ps(last, yp + 16 * (NV - 1));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(XT ? x[p * ldx + i] : xr[i][p]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xb, yv[v], acc[i][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xffff);
      __m512 r = _mm512_mul_ps(acc[i][v], va);
      if (beta != 0.f) r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk, ci + 16 * v), r);
      _mm512_mask_storeu_ps(ci + 16 * v, mk, r);
    }
  }
}

// The row blocks of one column panel (16 NV columns, the last vector masked by `last`): MR rows
// at a time, then the m % MR rows left by the instantiation for exactly that many.
template <int MR, int NV, bool XT>
void panel(int64_t m, int64_t k, const float* x, int64_t ldx, const float* y, int64_t ldy, float* c, int64_t ldc,
           float alpha, float beta, __mmask16 last) {
  const auto x_at = [&](int64_t i) { return XT ? x + i : x + i * ldx; };
  int64_t i = 0;
  for (; i + MR <= m; i += MR) micro<MR, NV, XT>(k, x_at(i), ldx, y, ldy, c + i * ldc, ldc, alpha, beta, last);
  if (i == m) return;
  const int64_t r = m - i;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((r == R + 1 ? micro<R + 1, NV, XT>(k, x_at(i), ldx, y, ldy, c + i * ldc, ldc, alpha, beta, last) : void()),
     ...);
  }(std::make_integer_sequence<int, MR - 1>{});
}

// C = alpha * X . Y + beta * C, row-major (see the top of the file).
template <bool XT>
void gemm_rm(int64_t m, int64_t n, int64_t k, float alpha, const float* x, int64_t ldx, const float* y, int64_t ldy,
             float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  for (int64_t p0 = 0; p0 == 0 || p0 < k; p0 += kKc) {
    const int64_t kc = std::min(kKc, k - p0);
    const float b = p0 == 0 ? beta : 1.f;
    const float* xp = XT ? x + p0 * ldx : x + p0;
    const float* yp = y + p0 * ldy;
    for (int64_t j0 = 0; j0 < n; j0 += 64) {
      const int64_t nb = std::min<int64_t>(64, n - j0);
      const __mmask16 last = __mmask16((1u << ((nb - 1) % 16 + 1)) - 1);
      float* cj = c + j0;
      // 6 x 64 (24 accumulators); narrower panels take 12 rows to keep >= 12 FMA chains
      if (nb > 48) {
        panel<6, 4, XT>(m, kc, xp, ldx, yp + j0, ldy, cj, ldc, alpha, b, last);
      } else if (nb > 32) {
        panel<8, 3, XT>(m, kc, xp, ldx, yp + j0, ldy, cj, ldc, alpha, b, last);
      } else if (nb > 16) {
        panel<12, 2, XT>(m, kc, xp, ldx, yp + j0, ldy, cj, ldc, alpha, b, last);
      } else {
        panel<12, 1, XT>(m, kc, xp, ldx, yp + j0, ldy, cj, ldc, alpha, b, last);
      }
    }
    if (k <= 0) break;
  }
}

// dst[p, j] = src[j, p] for j < n, p < k (src row stride lds, dst row stride ldd): 16 x 16 blocks in
// registers, partial blocks through masked loads and stores.
inline void transpose_into(const float* src, int64_t lds, int64_t n, int64_t k, float* dst, int64_t ldd) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, n - j0);
    const __mmask16 jm = __mmask16((1u << nj) - 1);
    for (int64_t p0 = 0; p0 < k; p0 += 16) {
      const int64_t np = std::min<int64_t>(16, k - p0);
      const __mmask16 pm = __mmask16((1u << np) - 1);
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        r[j] = j < nj ? _mm512_maskz_loadu_ps(pm, src + (j0 + j) * lds + p0) : _mm512_setzero_ps();
      }
      // 16 x 16 transpose: 32-bit, 64-bit, then 128-bit lane interleaves
      __m512 t[16];
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
      // r[4 g + q] now holds, per 128-bit lane L, row p = 4 L + q of rows j = 4 g .. 4 g + 3
      for (int q = 0; q < 4; ++q) {
        const __m512 a0 = _mm512_shuffle_f32x4(r[q], r[4 + q], 0x88);       // lanes 0,2 of g0 | g1
        const __m512 a1 = _mm512_shuffle_f32x4(r[q], r[4 + q], 0xdd);       // lanes 1,3
        const __m512 b0 = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0x88);
        const __m512 b1 = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0xdd);
        t[q] = _mm512_shuffle_f32x4(a0, b0, 0x88);       // lane 0: p = q
        t[8 + q] = _mm512_shuffle_f32x4(a0, b0, 0xdd);   // lane 2: p = 8 + q
        t[4 + q] = _mm512_shuffle_f32x4(a1, b1, 0x88);   // lane 1: p = 4 + q
        t[12 + q] = _mm512_shuffle_f32x4(a1, b1, 0xdd);  // lane 3: p = 12 + q
      }
      for (int p = 0; p < np; ++p) _mm512_mask_storeu_ps(dst + (p0 + p) * ldd + j0, jm, t[p]);
    }
  }
}

// C = alpha * X . B^T + beta * C with B [n, k] rows (stride ldb): B^T packed into a per-thread panel.
inline void gemm_abt(int64_t m, int64_t n, int64_t k, float alpha, const float* x, int64_t ldx, const float* b,
                     int64_t ldb, float beta, float* c, int64_t ldc) {
  thread_local std::vector<float> panel_buf;
  const int64_t ldy = (n + 15) / 16 * 16;
  if (static_cast<int64_t>(panel_buf.size()) < k * ldy) panel_buf.resize(k * ldy);
  transpose_into(b, ldb, n, k, panel_buf.data(), ldy);
  gemm_rm<false>(m, n, k, alpha, x, ldx, panel_buf.data(), ldy, beta, c, ldc);
}

}  // namespace zmm
}  // namespace
}  // namespace cpu::CPU_CAPABILITY
}  // namespace forkattn

#endif  // CPU_CAPABILITY_AVX512
