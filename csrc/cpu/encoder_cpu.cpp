// CPU kernels of the fused encoder-layer epilogues (csrc/encoder.h): one pass over a GEMM output
// per epilogue, rows in parallel. fp32 in and out; LayerNorm statistics in fp32 over the row held
// in registers/L1 (mean first, then the centred sum of squares: no cancellation).
#include "vec.h"  // first: selects at::vec's AVX2 path

#include <ATen/Parallel.h>

#include <cmath>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "encoder.h"

namespace forkattn {
namespace cpu::CPU_CAPABILITY {  // one copy per ISA variant: cpu/isa.h
namespace {

using vec::kWidth;
using vec::Vec;

// Below this many elements per task a problem runs on one thread: at BERT's batch-1 sizes a
// LayerNorm row block is tens of microseconds of work, about what an OpenMP fork/join costs on a
// quiet machine, and far less than a region costs when the cores are oversubscribed (a thread of
// the team descheduled makes every other one wait at the barrier).
constexpr int64_t kMinElemsPerTask = 1 << 16;

template <typename F>
void for_rows(int64_t rows, int64_t cols, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

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

}  // namespace

void bias_gelu_kernel(float* x, const float* bias, int64_t rows, int64_t cols) {
  const Vec half(0.5f), one(1.f), alpha(static_cast<float>(M_SQRT1_2));
  for_rows(rows, cols, [&](int64_t r) {
    float* row = x + r * cols;
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; i + 8 <= cols; i += 8) {
      _mm256_storeu_ps(row + i, gelu8(_mm256_add_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(bias + i))));
    }
#endif
    for (; i + kWidth <= cols; i += kWidth) {  // ATen's vectorized GELU: x * 0.5 * (1 + erf(x / sqrt 2))
      const Vec v = Vec::loadu(row + i) + Vec::loadu(bias + i);
      (v * half * (one + (v * alpha).erf())).store(row + i);
    }
    for (; i < cols; ++i) row[i] = gelu(row[i] + bias[i]);
  });
}

void bias_residual_layernorm_kernel(float* x, const float* residual, const float* bias, const float* weight,
                                    const float* ln_bias, float eps, int64_t rows, int64_t cols) {
  for_rows(rows, cols, [&](int64_t r) {
    float* row = x + r * cols;
    const float* res = residual + r * cols;
    int64_t i = 0;
    Vec vsum(0.f);
    for (; i + kWidth <= cols; i += kWidth) {
      const Vec v = Vec::loadu(row + i) + Vec::loadu(bias + i) + Vec::loadu(res + i);
      v.store(row + i);
      vsum = vsum + v;
    }
    float sum = vec::reduce_sum(vsum);
    for (; i < cols; ++i) {
      row[i] = row[i] + bias[i] + res[i];
      sum += row[i];
    }
    const float mean = sum / static_cast<float>(cols);
    const Vec vmean(mean);
    Vec vsq(0.f);
    for (i = 0; i + kWidth <= cols; i += kWidth) {
      const Vec d = Vec::loadu(row + i) - vmean;
      vsq = at::vec::fmadd(d, d, vsq);
    }
    float sq = vec::reduce_sum(vsq);
    for (; i < cols; ++i) sq += (row[i] - mean) * (row[i] - mean);
    const float rstd = 1.f / std::sqrt(sq / static_cast<float>(cols) + eps);
    const Vec vrstd(rstd);
    for (i = 0; i + kWidth <= cols; i += kWidth) {
      const Vec y = (Vec::loadu(row + i) - vmean) * vrstd;
      at::vec::fmadd(y, Vec::loadu(weight + i), Vec::loadu(ln_bias + i)).store(row + i);
    }
    for (; i < cols; ++i) row[i] = (row[i] - mean) * rstd * weight[i] + ln_bias[i];
  });
}

}  // namespace cpu
}  // namespace forkattn
