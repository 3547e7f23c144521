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

#ifndef FORKATTN_HD
#if defined(__CUDACC__)
#define FORKATTN_HD __host__ __device__ __forceinline__
#else
#define FORKATTN_HD inline
#endif
#endif

namespace forkattn {

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

}  // namespace forkattn
