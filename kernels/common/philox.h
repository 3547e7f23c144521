// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), usable from
// C++ host code and CUDA device code. Torch-free and CUDA-runtime-free.
//
// Layout matches Triton's tl.philox(seed, c0, c1, c2, c3) exactly (and so tl.randint4x(seed, offset),
// which is the counter (offset_lo, offset_hi, 0, 0)): key = (seed & 0xffffffff, seed >> 32), round
// multipliers 0xD2511F53 (applied to c0) and 0xCD9E8D57 (applied to c2), key increments 0x9E3779B9 /
// 0xBB67AE85, 10 rounds. curand's Philox4_32_10 uses the same constants. Verified bit for bit against
// Triton in tests/test_mlm.py (CPU vs Triton outputs) and against a Python reference there.
#pragma once
#include <stdint.h>
#if defined(__AVX2__) && !defined(__CUDA_ARCH__)
#include <immintrin.h>
#endif

#ifndef FORKATTN_HD
#if defined(__CUDACC__)
#define FORKATTN_HD __host__ __device__ __forceinline__
#else
#define FORKATTN_HD inline
#endif
#endif

namespace forkattn::kernels {

struct Philox4 {
  uint32_t r[4];
};

// One Philox4x32-10 block: four 32-bit outputs for counter (c0, c1, c2, c3) under a 64-bit seed.
FORKATTN_HD Philox4 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;  // mul.wide.u32 on the GPU
    const uint64_t p2 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Host only: 8 blocks at once, counters (c0[j], c1[j], c2, c3) for j < 8; the same numbers as 8 calls
// of philox4x32_10. out[i][j] = block j's r[i]. AVX2 when the host compiler targets it (vpmuludq on
// the even and odd 32-bit lanes), else a plain loop.
#if !defined(__CUDA_ARCH__)
inline void philox4x32_10_x8(uint64_t seed, const uint32_t* c0_in, const uint32_t* c1_in, uint32_t c2_in,
                             uint32_t c3_in, uint32_t out[4][8]) {
#if defined(__AVX2__)
  __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0_in));
  __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1_in));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(c2_in));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(c3_in));
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    // 32x32 -> 64 products of the even lanes and (shifted down) of the odd lanes
    const __m256i pe0 = _mm256_mul_epu32(c0, ma), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), ma);
    const __m256i pe2 = _mm256_mul_epu32(c2, mb), po2 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), mb);
    const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
    const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
    const __m256i hi2 = _mm256_blend_epi32(_mm256_srli_epi64(pe2, 32), po2, 0xAA);
    const __m256i lo2 = _mm256_blend_epi32(pe2, _mm256_slli_epi64(po2, 32), 0xAA);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi2, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[0]), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[1]), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[2]), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[3]), c3);
#else
  for (int j = 0; j < 8; ++j) {
    const Philox4 r = philox4x32_10(seed, c0_in[j], c1_in[j], c2_in, c3_in);
    for (int i = 0; i < 4; ++i) out[i][j] = r.r[i];
  }
#endif
}
#endif

// --- Attention dropout -----------------------------------------------------------------------------
// The probability of batch row b (varlen: sequence b), query head h, query row i and key column j
// (i and j counted inside the sequence) is kept iff u16(b, h, i, j) >= dropout_threshold16(p), and
// the kept ones are scaled by 1 / (1 - p). One Philox block gives the u16 of 8 key columns:
//   counter (j >> 3, i, b * heads + h, kDropoutStream), key = the 64-bit seed as above,
//   u16 = (block.r[(j & 7) >> 1] >> 16 * (j & 1)) & 0xffff   (even j: low half, odd j: high half).
// A mask element depends on the seed and its four indices only, never on tiling, threads or
// backend. python/forkattn/philox.py mirrors this in plain PyTorch (the eager backend and tests).
// kDropoutStream keeps these counters apart from the MLM sampler's (fourth word 0).
constexpr uint32_t kDropoutStream = 1u;

// keep iff u16 >= threshold: keep rate (65536 - threshold) / 65536, within 2^-17 of 1 - p.
// p in [0, 1), checked by the caller.
inline uint32_t dropout_threshold16(double p) {
  const double t = p * 65536.0 + 0.5;
  const uint32_t th = static_cast<uint32_t>(t);  // floor: t >= 0.5
  return th > 65535u ? 65535u : th;
}

// The u16 of key columns 8 * block .. 8 * block + 7 of query row `row` of (b * heads + h) = bh.
FORKATTN_HD void dropout_u16x8(uint64_t seed, uint32_t bh, uint32_t row, uint32_t block, uint32_t u[8]) {
  const Philox4 r = philox4x32_10(seed, block, row, bh, kDropoutStream);
  for (int w = 0; w < 4; ++w) {
    u[2 * w] = r.r[w] & 0xffffu;
    u[2 * w + 1] = r.r[w] >> 16;
  }
}

}  // namespace forkattn::kernels
