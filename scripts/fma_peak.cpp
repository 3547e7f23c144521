// This CPU's fp32 FMA peak: each of N threads runs 12 independent FMA chains, enough to cover the FMA
// latency on both pipes, 8-wide (ymm, AVX2) and, when built with -mavx512f, also 16-wide (zmm). Prints
// GFLOP/s per run (wall) and per thread (its own CPU time, so a thread descheduled on a loaded machine
// still reads its core's rate). Used to say how close a GEMM gets to the ceiling (docs/CPU_INFERENCE.md).
//   g++ -O2 -mavx2 -mfma -pthread scripts/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak 2 200000000
//   g++ -O2 -mavx512f -mfma -pthread scripts/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak 2 200000000
#include <immintrin.h>
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

static double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// 12 chains of `Vec` (8 or 16 floats: Set / Fma / Lane0 its intrinsics), `iters` FMAs each.
template <typename Vec, int W, Vec (*Set)(float), Vec (*Fma)(Vec, Vec, Vec), float (*Lane0)(Vec)>
static float chains(long iters, double* cpu_gflops) {
  const double c0 = thread_cpu_seconds();
  const Vec m = Set(0.9999f), c = Set(1e-4f);
  Vec a[12];
  for (int i = 0; i < 12; ++i) a[i] = Set(1.0f + i);
  for (long t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = Fma(a[i], m, c);
  }
  float sum = 0.f;
  for (int i = 0; i < 12; ++i) sum += Lane0(a[i]);
  *cpu_gflops = iters * 12.0 * W * 2 / (thread_cpu_seconds() - c0) / 1e9;
  return sum;  // keeps the chains live
}

static __m256 set8(float v) { return _mm256_set1_ps(v); }
static __m256 fma8(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
static float lane8(__m256 a) { return _mm256_cvtss_f32(a); }
#if defined(__AVX512F__)
static __m512 set16(float v) { return _mm512_set1_ps(v); }
static __m512 fma16(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
static float lane16(__m512 a) { return _mm512_cvtss_f32(a); }
#endif

using Chains = float (*)(long, double*);

static void run(const char* name, Chains fn, int width, int threads, long iters) {
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<double> rate(threads);
    std::vector<float> keep(threads);
    std::vector<std::thread> pool;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < threads; ++i) pool.emplace_back([&, i] { keep[i] = fn(iters, &rate[i]); });
    for (auto& t : pool) t.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("%s threads %d: %.1f GFLOP/s wall; per thread (CPU time):", name, threads,
           threads * iters * 12.0 * width * 2 / s / 1e9);
    for (int i = 0; i < threads; ++i) printf(" %.1f", rate[i]);
    printf("  (%.0f)\n", keep[0]);
  }
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 1;
  const long iters = argc > 2 ? atol(argv[2]) : 100000000L;
  run("ymm (AVX2)", chains<__m256, 8, set8, fma8, lane8>, 8, threads, iters);
#if defined(__AVX512F__)
  run("zmm (AVX-512)", chains<__m512, 16, set16, fma16, lane16>, 16, threads, iters);
#endif
}
