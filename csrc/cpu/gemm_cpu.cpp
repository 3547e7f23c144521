// The packed-panel fp32 GEMM of csrc/gemm.h: y[:, n0:n1] = x @ W[n0:n1]^T (+ bias) (+ exact GELU).
//
// W is packed once (gemm_pack_kernel) into panels of kNr output columns, each k-major: panel p
// holds W[kNr p + j, k] at packed[(p * K + k) * kNr + j], zero past N. kNr is this variant's own
// (gemm_panel_width_kernel): 48 for AVX512, 24 for AVX2 and DEFAULT; the host checks that a packed
// weight ([panels, K, kNr]) has the width of the variant in use. The kernels walk
//   K in blocks of kKc (in practice all of K)  >  panels of kNr columns  >  row blocks of kMr
// and per (row block, panel, K block) run a kMr x kNr register tile, cpu/regblock.h's register block
// (the one the attention kernels' tile matmuls run too: cpu/tile_gemm.h) over the packed panel:
// - AVX512: 8 x 48, 24 zmm accumulators, per k three 16-float loads of the panel and eight
//   broadcasts of x (one per row), 24 FMAs, k unrolled by 2 (12x32, 14x32, 6x64: docs/CPU_INFERENCE.md,
//   "An AVX-512 tile"); the last panel's columns and the epilogue through masked loads and stores;
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

#include "cpu/gelu.h"
#include "cpu/regblock.h"
#include "gemm.h"

namespace forkattn {
namespace cpu::CPU_CAPABILITY {  // one copy per ISA variant: cpu/isa.h
namespace {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kNr = 48;  // output columns per panel: three zmm
constexpr int kMr = 8;       // rows per register tile
constexpr int kKu = 2;       // k steps per loop trip of the register block
#else
constexpr int64_t kNr = 24;  // three ymm (AVX2); the DEFAULT loop uses the same layout
constexpr int kMr = 4;
constexpr int kKu = 4;
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

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
using regblock::Simd;
using regblock::V;
using regblock::W;
constexpr int kNv = static_cast<int>(kNr / W);  // vectors per panel row

// The vector exact GELU: cpu/gelu.h's 8-wide one (on each half of a zmm), so results match the
// bias + GELU pass's.
inline V gelu_v(V v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256 lo = gelu8(_mm512_castps512_ps256(v)), hi = gelu8(_mm512_extractf32x8_ps(v, 1));
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
#else
  return gelu8(v);
#endif
}

// y rows [0, MR) x columns [0, nv) (+)= x[0:MR, 0:kc] @ panel slice bp [kc][kNr]: cpu/regblock.h's
// register block (A: rows of x in place; B: the packed panel), then the store: added to y (`add`, a
// later K block), then bias (+ GELU) when `bias` is non-null (the last K block). A partial last
// panel stores its nv valid columns through masked stores (zmm), or per element (ymm, with the
// scalar GELU: the outputs of the 4 x 24 ymm tile before it became this block, bit for bit).
template <int MR>
inline void tile(const float* x, int64_t ldx, const float* bp, int64_t kc, float* y, int64_t ldy, int nv, bool add,
                 const float* bias, int epilogue) {
  V acc[MR][kNv];
  regblock::accumulate<MR, kNv, kKu>(acc, kc, regblock::RowsA{x, ldx}, regblock::PanelB{bp, kNr});
  const bool gelu_too = epilogue == static_cast<int>(GemmEpilogue::kBiasGelu);
  regblock::store_block(acc, [&](int r, int v, V t) __attribute__((always_inline)) {
    const int cols = nv - W * v;  // valid columns of this vector (the last panel may have fewer)
    if (cols <= 0) return;
    float* yr = y + r * ldy + W * v;
#if defined(CPU_CAPABILITY_AVX512)
    const auto m = cols >= W ? Simd::all() : Simd::first(cols);
    if (add) t = Simd::add(t, Simd::load(yr, m));
    if (bias) {
      t = Simd::add(t, Simd::load(bias + W * v, m));
      if (gelu_too) t = gelu_v(t);
    }
    Simd::store(yr, m, t);
#else
    if (nv < kNr) {  // the last panel: only nv < kNr columns exist in y (and in bias)
      alignas(32) float a[W];
      Simd::store(a, t);
      for (int j = 0; j < std::min(cols, W); ++j) {
        const float e = add ? a[j] + yr[j] : a[j];
        yr[j] = bias ? epilogue1(e, bias + W * v, j, epilogue) : e;
      }
      return;
    }
    if (add) t = Simd::add(t, Simd::load(yr));
    if (bias) {
      t = Simd::add(t, Simd::load(bias + W * v));
      if (gelu_too) t = gelu_v(t);
    }
    Simd::store(yr, t);
#endif
  });
}

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
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
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
