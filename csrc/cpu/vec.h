// Row primitives of the CPU kernels on ATen's at::vec (Vectorized<float>), with scalar tails.
// Include this header FIRST in a CPU kernel file (before any ATen header). Each kernel file is
// compiled once per ISA (cpu/isa.h): kWidth is 1 x 8 floats for DEFAULT (a plain array the
// compiler vectorizes for SSE2), 8 for AVX2 and 16 for AVX512; everything here is written for any
// kWidth, with hand intrinsics only where at::vec has no primitive (mask_ge_u16) and a portable
// version beside them. Only Sleef-free functions are used (exp_u20, erf, maximum, fmadd,
// conversions): libtorch does not export Sleef.
//
// NaN: row_max and max_nan propagate NaN (std::max drops it); exp_sub_sum gives std::exp's result
// (NaN for a NaN input or a NaN/inf `sub`), never a finite value for a NaN, so a NaN score makes
// its row NaN as in eager PyTorch.
#pragma once

#include "cpu/isa.h"

#include <ATen/cpu/vec/vec.h>  // its `#pragma unroll` needs -Wno-unknown-pragmas under GCC < 13
#include <ATen/cpu/vec/functional_base.h>  // vec_reduce_all (vec512.h, unlike vec256.h, does not include it)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace forkattn::cpu::CPU_CAPABILITY::vec {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();

// --- loads as fp32 ----------------------------------------------------------------------------------

inline Vec load_float(const float* x) { return Vec::loadu(x); }
inline Vec load_float(const c10::BFloat16* x) {
  Vec v;
  at::vec::load_fp32_from_bf16(x, v);
  return v;
}
inline Vec load_float(const c10::Half* x) {
  Vec v;
  at::vec::load_fp32_from_fp16(x, v);
  return v;
}

// dst[i] = float(src[i]) * scale; vectorized for float, Half and BFloat16, plain for other types.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n, float scale = 1.f) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    const Vec vs(scale);
    for (; i + kWidth <= n; i += kWidth) (load_float(src + i) * vs).store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

// --- reductions ---------------------------------------------------------------------------------------

inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Two accumulators: the FMA latency chain is halved for head_dim >= 16.
inline float dot(const float* x, const float* y, int64_t n) {
  int64_t i = 0;
  Vec acc0(0.f), acc1(0.f);
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    acc0 = at::vec::fmadd(Vec::loadu(x + i), Vec::loadu(y + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(x + i + kWidth), Vec::loadu(y + i + kWidth), acc1);
  }
  for (; i + kWidth <= n; i += kWidth) acc0 = at::vec::fmadd(Vec::loadu(x + i), Vec::loadu(y + i), acc0);
  float sum = reduce_sum(acc0 + acc1);
  for (; i < n; ++i) sum += x[i] * y[i];
  return sum;
}

// max that propagates NaN (std::max(a, NaN) returns a).
inline float max_nan(float a, float b) { return std::isnan(b) ? b : std::max(a, b); }

// max of x[0, n), NaN if any is NaN; -inf for n == 0.
inline float row_max(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -kInf;
  if (n >= kWidth) {
    Vec vm(-kInf);
    for (; i + kWidth <= n; i += kWidth) vm = at::vec::maximum(vm, Vec::loadu(x + i));  // propagates NaN
    m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; i < n; ++i) m = max_nan(m, x[i]);
  return m;
}

// x = exp(x - sub) in place; returns the sum of the results. -inf entries become 0.
inline float exp_sub_sum(float* x, int64_t n, float sub) {
  int64_t i = 0;
  // exp_u20 does not propagate NaN (nor handle inf - inf): when sub is NaN or +inf (a row holding a
  // NaN or inf score) every entry goes through std::exp, which gives the NaN eager PyTorch gives.
  const int64_t nvec = std::isfinite(sub) ? n : 0;
  const Vec vsub(sub);
  Vec vsum(0.f);
  for (; i + kWidth <= nvec; i += kWidth) {
    const Vec e = (Vec::loadu(x + i) - vsub).exp_u20();
    e.store(x + i);
    vsum = vsum + e;
  }
  float sum = reduce_sum(vsum);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - sub);
    sum += x[i];
  }
  return sum;
}

// --- masks ------------------------------------------------------------------------------------------

// A select mask for operator& (all bits set where u[i] >= threshold, 0 elsewhere) from kWidth
// 16-bit values; threshold <= 65536. `(x * s) & mask_ge_u16(u, t)` is exactly
// `u[i] >= t ? x[i] * s : 0.f`, also for a NaN x[i].
inline Vec mask_ge_u16(const uint16_t* u, uint32_t threshold) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kWidth == 16);
  const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)));
  const __mmask16 ge = _mm512_cmpgt_epi32_mask(x, _mm512_set1_epi32(static_cast<int>(threshold) - 1));
  return Vec(_mm512_castsi512_ps(_mm512_maskz_set1_epi32(ge, -1)));
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(kWidth == 8);
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)));
  return Vec(_mm256_castsi256_ps(_mm256_cmpgt_epi32(x, _mm256_set1_epi32(static_cast<int>(threshold) - 1))));
#else
  uint32_t bits[kWidth];
  for (int64_t i = 0; i < kWidth; ++i) bits[i] = u[i] >= threshold ? 0xffffffffu : 0u;
  return Vec::loadu(bits);
#endif
}

// --- element-wise updates -----------------------------------------------------------------------------

// x *= a
inline void scale(float* x, int64_t n, float a) {
  int64_t i = 0;
  const Vec va(a);
  for (; i + kWidth <= n; i += kWidth) (Vec::loadu(x + i) * va).store(x + i);
  for (; i < n; ++i) x[i] *= a;
}

// y += a * x
inline void axpy(float* y, float a, const float* x, int64_t n) {
  int64_t i = 0;
  const Vec va(a);
  for (; i + kWidth <= n; i += kWidth) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += a * x[i];
}

// y = y * c + a * x
inline void scale_axpy(float* y, float c, float a, const float* x, int64_t n) {
  int64_t i = 0;
  const Vec vc(c), va(a);
  for (; i + kWidth <= n; i += kWidth) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i) * vc).store(y + i);
  for (; i < n; ++i) y[i] = y[i] * c + a * x[i];
}

}  // namespace forkattn::cpu::CPU_CAPABILITY::vec
