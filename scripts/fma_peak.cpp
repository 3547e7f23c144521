// This CPU's fp32 FMA peak (AVX2): each of N threads runs 12 independent 8-wide FMA chains, enough
// to cover the FMA latency on both pipes. Prints GFLOP/s per run (wall) and per thread (its own CPU
// time, so a thread descheduled on a loaded machine still reads its core's rate). Used to say how
// close a GEMM library gets to the ceiling (docs/CPU_INFERENCE.md).
//   g++ -O2 -mavx2 -mfma -pthread scripts/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak 2 200000000
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

static float chains(long iters, double* cpu_gflops) {
  const double c0 = thread_cpu_seconds();
  const __m256 m = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(1e-4f);
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.0f + i);
  for (long t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
  }
  float sum = 0.f, lanes[8];
  for (int i = 0; i < 12; ++i) {
    _mm256_storeu_ps(lanes, a[i]);
    sum += lanes[0];
  }
  *cpu_gflops = iters * 12.0 * 8 * 2 / (thread_cpu_seconds() - c0) / 1e9;
  return sum;  // keeps the chains live
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 1;
  const long iters = argc > 2 ? atol(argv[2]) : 100000000L;
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<double> rate(threads);
    std::vector<float> keep(threads);
    std::vector<std::thread> pool;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < threads; ++i) pool.emplace_back([&, i] { keep[i] = chains(iters, &rate[i]); });
    for (auto& t : pool) t.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("threads %d: %.1f GFLOP/s wall; per thread (CPU time):", threads, threads * iters * 12.0 * 8 * 2 / s / 1e9);
    for (int i = 0; i < threads; ++i) printf(" %.1f", rate[i]);
    printf("  (%.0f)\n", keep[0]);
  }
}
