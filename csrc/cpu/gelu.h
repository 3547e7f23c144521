// The exact (erf) GELU of torch.nn.functional.gelu for the CPU kernels: a scalar version and, where the
// variant has AVX2 + FMA, an 8-wide one (csrc/cpu/encoder_cpu.cpp's bias + GELU pass and the GEMM's
// bias + GELU epilogue, csrc/cpu/gemm_cpu.cpp, share it so both give the same results).
#pragma once

#include "cpu/isa.h"

#include <cmath>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace forkattn::cpu::CPU_CAPABILITY {

inline float gelu(float v) { return 0.5f * v * (1.f + std::erf(v * static_cast<float>(M_SQRT1_2))); }

#if defined(__AVX2__) && defined(__FMA__)
// exp(x) for x <= 0 (the erf below needs exp(-z^2) only): Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2 / 2, then the degree-7 Taylor polynomial of e^r (truncation 1.3e-9 relative: below
// fp32's half ulp) and 2^n from the exponent bits. x below -87 is clamped (2^-126 * e^r, the
// smallest normal range; erf needs exp(-z^2) only next to 1 - r t exp(...), where it is < 1e-37).
inline __m256 exp_nonpos(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2's high part: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// gelu(v) = 0.5 v (1 + erf(v / sqrt 2)) with erf from Abramowitz & Stegun 7.1.26, the formula and
// constants of ATen's vectorized erf (max |error| 1.5e-7), so results track eager's; its exp is the
// polynomial above instead of Sleef's (not exported by libtorch; at::vec's erf calls it per vector).
inline __m256 gelu8(__m256 v) {
  const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
  const __m256 z = _mm256_mul_ps(v, _mm256_set1_ps(static_cast<float>(M_SQRT1_2)));
  const __m256 zsign = _mm256_and_ps(sign, z), az = _mm256_xor_ps(zsign, z);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), az, one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp_nonpos(_mm256_xor_ps(sign, _mm256_mul_ps(z, z)));
  const __m256 erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, one);  // 1 - r t exp(-z^2)
  const __m256 erf = _mm256_xor_ps(zsign, erf_abs);
  return _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(0.5f)), _mm256_add_ps(one, erf));
}
#endif

}  // namespace forkattn::cpu::CPU_CAPABILITY
