// forkattn's own tile matmul for the AVX2 and AVX512 variants (tiles.h's gemm() calls it there):
// register-blocked microkernels for the three products the attention kernels make, row-major:
//
//   C[m, n] = alpha * X . Y + beta * C      X(i, p): [m, k] rows (xt = false) or its transpose
//                                           stored [k, m] (xt = true); Y [k, n] rows, unit stride
//
// C, X and Y have any row strides. A microkernel is cpu/regblock.h's register block (the one the
// packed-panel GEMM runs too): an MR x (W NV) block of C in MR * NV vector accumulators (W = 16
// floats for zmm, 8 for ymm); per step p it loads NV vectors of Y's row p (StridedB: the last one
// masked to n) and broadcasts MR entries of X's column p from wherever they lie (RowsA: rows of X
// when xt = false; ColsA: a contiguous run of X's row p when xt = true): neither operand is packed.
// Its epilogue here: C = alpha * acc (+ beta * C, read only when beta != 0), masked to n.
// A . B^T (both operands with k contiguous) first transposes B into a per-thread [k, n] panel (W x W
// register transposes), read by every row block of the call.
//
// Blocking: k in steps of kKc (a step's Y panel, kKc x 64 floats = 32 KB for zmm, stays in the 48 KB
// L1 while every row block of X streams past it), then column panels, then MR-row blocks. C is
// written once per k step; beta applies on the first one only, and beta = 0 never reads C (so NaN
// or garbage there cannot leak). k = 0 gives C = beta * C (0 for beta = 0), as BLAS does.
//
// Register blocks: zmm (32 registers) 6 x 64 (24 accumulators), narrower panels 8 x 48, 12 x 32 and
// 12 x 16; ymm (16 registers) 6 x 16 (12 accumulators; 4 x 24 measured 0.6-0.85x of it) and 8 x 8.
// Internal linkage and the ISA's namespace (cpu/isa.h), as tiles.h: the DEFAULT variant gets nothing
// from here (its tiles go to MKL or the plain loop).
#pragma once

#include "cpu/isa.h"
#include "cpu/regblock.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace forkattn {
namespace cpu::CPU_CAPABILITY {
namespace {
namespace tile_gemm {

// The vector type and the register block are cpu/regblock.h's (shared with the panel GEMM).
using regblock::Mask;
using regblock::Simd;
using regblock::V;
using regblock::W;

constexpr int64_t kKc = 128;  // k per step

// C[0:MR, 0:W NV] (the last vector's columns limited by `last`) = alpha * X . Y + beta * C
// over k steps. X(i, p) = x[i * ldx + p] (XT = false) or x[p * ldx + i] (XT = true).
template <int MR, int NV, bool XT>
inline void micro(int64_t k, const float* x, int64_t ldx, const float* y, int64_t ldy, float* c, int64_t ldc,
                  float alpha, float beta, Mask last) {
  V acc[MR][NV];
  const regblock::StridedB yb{y, ldy, last};
  if constexpr (XT) {
    regblock::accumulate<MR, NV, 1>(acc, k, regblock::ColsA{x, ldx}, yb);
  } else {
    regblock::accumulate<MR, NV, 1>(acc, k, regblock::RowsA{x, ldx}, yb);
  }
  const V va = Simd::set1(alpha), vb = Simd::set1(beta);
  regblock::store_block(acc, [&](int i, int v, V t) __attribute__((always_inline)) {
    float* ci = c + i * ldc + W * v;
    const Mask mk = v == NV - 1 ? last : Simd::all();
    V r = Simd::mul(t, va);
    if (beta != 0.f) r = Simd::fmadd(vb, Simd::load(ci, mk), r);  // beta = 0 never reads C
    Simd::store(ci, mk, r);
  });
}

// The row blocks of one column panel (W NV columns, the last vector masked by `last`): MR rows at
// a time, then the m % MR rows left by the instantiation for exactly that many.
template <int MR, int NV, bool XT>
void panel(int64_t m, int64_t k, const float* x, int64_t ldx, const float* y, int64_t ldy, float* c, int64_t ldc,
           float alpha, float beta, Mask last) {
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
  constexpr int64_t kPanel = 4 * W > 32 ? 64 : 16;  // columns per panel: 6 x 64 zmm, 6 x 16 ymm
  for (int64_t p0 = 0; p0 == 0 || p0 < k; p0 += kKc) {
    const int64_t kc = std::min(kKc, k - p0);
    const float b = p0 == 0 ? beta : 1.f;
    const float* xp = XT ? x + p0 * ldx : x + p0;
    const float* yp = y + p0 * ldy;
    for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
      const int64_t nb = std::min<int64_t>(kPanel, n - j0);
      const Mask last = Simd::first((nb - 1) % W + 1);
      float* cj = c + j0;
      const float* yj = yp + j0;
      if constexpr (W == 16) {  // narrower panels take more rows to keep >= 12 FMA chains
        if (nb > 48) {
          panel<6, 4, XT>(m, kc, xp, ldx, yj, ldy, cj, ldc, alpha, b, last);
        } else if (nb > 32) {
          panel<8, 3, XT>(m, kc, xp, ldx, yj, ldy, cj, ldc, alpha, b, last);
        } else if (nb > 16) {
          panel<12, 2, XT>(m, kc, xp, ldx, yj, ldy, cj, ldc, alpha, b, last);
        } else {
          panel<12, 1, XT>(m, kc, xp, ldx, yj, ldy, cj, ldc, alpha, b, last);
        }
      } else if (nb > 8) {
        panel<6, 2, XT>(m, kc, xp, ldx, yj, ldy, cj, ldc, alpha, b, last);
      } else {
        panel<8, 1, XT>(m, kc, xp, ldx, yj, ldy, cj, ldc, alpha, b, last);
      }
    }
    if (k <= 0) break;
  }
}

// dst[p, j] = src[j, p] for j < n, p < k (src row stride lds, dst row stride ldd): W x W blocks in
// registers, partial blocks through masked loads and stores.
inline void transpose_into(const float* src, int64_t lds, int64_t n, int64_t k, float* dst, int64_t ldd) {
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    const int64_t nj = std::min<int64_t>(W, n - j0);
    const Mask jm = Simd::first(nj);
    for (int64_t p0 = 0; p0 < k; p0 += W) {
      const int64_t np = std::min<int64_t>(W, k - p0);
      const Mask pm = Simd::first(np);
      V r[W];
      for (int j = 0; j < W; ++j) r[j] = j < nj ? Simd::load(src + (j0 + j) * lds + p0, pm) : Simd::zero();
      Simd::transpose(r);
      for (int p = 0; p < np; ++p) Simd::store(dst + (p0 + p) * ldd + j0, jm, r[p]);
    }
  }
}

// C = alpha * X . B^T + beta * C with B [n, k] rows (stride ldb): B^T packed into a per-thread panel.
inline void gemm_abt(int64_t m, int64_t n, int64_t k, float alpha, const float* x, int64_t ldx, const float* b,
                     int64_t ldb, float beta, float* c, int64_t ldc) {
  thread_local std::vector<float> panel_buf;
  const int64_t ldy = (n + W - 1) / W * W;
  if (static_cast<int64_t>(panel_buf.size()) < k * ldy) panel_buf.resize(k * ldy);
  transpose_into(b, ldb, n, k, panel_buf.data(), ldy);
  gemm_rm<false>(m, n, k, alpha, x, ldx, panel_buf.data(), ldy, beta, c, ldc);
}

}  // namespace tile_gemm
}  // namespace
}  // namespace cpu::CPU_CAPABILITY
}  // namespace forkattn

#endif  // CPU_CAPABILITY_AVX512 || CPU_CAPABILITY_AVX2
