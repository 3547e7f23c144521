// CPU kernels of the fused encoder-layer epilogues (csrc/encoder.h): one pass over a GEMM output
// per epilogue, rows in parallel. fp32 in and out; LayerNorm statistics in fp32 over the row held
// in registers/L1 (mean first, then the centred sum of squares: no cancellation).
#include "vec.h"  // first: selects at::vec's AVX2 path

#include <ATen/Parallel.h>

#include <cmath>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "cpu/gelu.h"
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
