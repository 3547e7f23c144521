// Attention dropout for the CPU kernels (attention_cpu.cpp, disentangled_cpu.cpp): the mask of
// kernels/common/philox.h for one tile row, drawn many Philox blocks at a time (philox_cpu.h), and
// the two row updates that apply it. Element (b, h, i, j) is kept iff its u16 >= the threshold
// (dropout_threshold16(p)); kept entries are scaled by 1 / (1 - p). Both kernels draw the same mask
// for the same seed and shapes, so a DeBERTa layer drops exactly what plain attention would.
#pragma once

#include "cpu/vec.h"  // first: it sets at::vec's ISA before any ATen header

#include <algorithm>
#include <cstdint>

#include "common/philox.h"
#include "cpu/philox_cpu.h"

namespace forkattn::cpu::CPU_CAPABILITY {  // one copy per ISA variant: cpu/isa.h

// The dropout of one kernel call: off unless p > 0.
struct DropoutParams {
  bool on = false;
  uint64_t seed = 0;        // a signed int64's bit pattern
  uint32_t threshold = 0;   // kept iff u16 >= threshold
  float scale = 1.f;        // 1 / (1 - p)
};

inline DropoutParams make_dropout(double dropout_p, int64_t seed) {
  DropoutParams d;
  if (dropout_p <= 0.0) return d;
  d.on = true;
  d.seed = static_cast<uint64_t>(seed);
  d.threshold = ::forkattn::kernels::dropout_threshold16(dropout_p);
  d.scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  return d;
}

// u16 buffer of one tile row of `cols` keys: dropout_u16 writes whole calls of 64 keys.
inline int64_t dropout_u16_size(int64_t cols) { return (cols + 63) / 64 * 64; }

// Rows of a 4 x 8 word matrix as 8 x 4: 128-bit group t of dst (u16 8t .. 8t + 7) = words
// (w[0][t], w[1][t], w[2][t], w[3][t]). For one 8-block Philox group that is block t's 8 u16 in
// key order (low half first), the layout of kernels/common/philox.h.
inline void transpose_words_4x8(const uint32_t w[4][8], uint16_t* dst) {
#if defined(__AVX2__)
  const auto ld = [&](int r) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r])); };
  const __m256i a0 = ld(0), a1 = ld(1), a2 = ld(2), a3 = ld(3);
  const __m256i t0 = _mm256_unpacklo_epi32(a0, a1), t1 = _mm256_unpackhi_epi32(a0, a1);
  const __m256i t2 = _mm256_unpacklo_epi32(a2, a3), t3 = _mm256_unpackhi_epi32(a2, a3);
  const __m256i r0 = _mm256_unpacklo_epi64(t0, t2), r1 = _mm256_unpackhi_epi64(t0, t2);  // blocks 0|4, 1|5
  const __m256i r2 = _mm256_unpacklo_epi64(t1, t3), r3 = _mm256_unpackhi_epi64(t1, t3);  // blocks 2|6, 3|7
  __m256i* d = reinterpret_cast<__m256i*>(dst);
  _mm256_storeu_si256(d + 0, _mm256_permute2x128_si256(r0, r1, 0x20));
  _mm256_storeu_si256(d + 1, _mm256_permute2x128_si256(r2, r3, 0x20));
  _mm256_storeu_si256(d + 2, _mm256_permute2x128_si256(r0, r1, 0x31));
  _mm256_storeu_si256(d + 3, _mm256_permute2x128_si256(r2, r3, 0x31));
#else
  for (int t = 0; t < 8; ++t) {
    for (int r = 0; r < 4; ++r) {
      dst[8 * t + 2 * r] = static_cast<uint16_t>(w[r][t] & 0xffffu);
      dst[8 * t + 2 * r + 1] = static_cast<uint16_t>(w[r][t] >> 16);
    }
  }
#endif
}

// u[c] = the mask's u16 of (b, h, i, j0 + c) for c < n rounded up to 64 (bh = b * heads + h); j0 a
// multiple of 8. Philox block blk (keys 8 blk .. 8 blk + 7) is counter (blk, i, bh, kDropoutStream);
// 16 blocks (128 keys) per call while more than 64 keys are left, else 8.
inline void dropout_u16(uint64_t seed, uint32_t bh, uint32_t row, int64_t j0, int64_t n, uint16_t* u) {
  const uint32_t stream = ::forkattn::kernels::kDropoutStream;
  for (int64_t c = 0; c < n;) {
    const uint32_t blk = static_cast<uint32_t>((j0 + c) >> 3);
    if (n - c > 64) {
      uint32_t out[2][4][8];
      philox4x32_10_groups<2>(seed, blk, row, bh, stream, out);
      transpose_words_4x8(out[0], u + c);
      transpose_words_4x8(out[1], u + c + 64);
      c += 128;
    } else {
      uint32_t out[1][4][8];
      philox4x32_10_groups<1>(seed, blk, row, bh, stream, out);
      transpose_words_4x8(out[0], u + c);
      c += 64;
    }
  }
}

// x[c] = keep(u[c]) ? x[c] * scale : 0 for c < n; x[n, cols) = 0 (keys hidden to this row).
inline void dropout_apply_row(const DropoutParams& d, float* x, int64_t n, int64_t cols, const uint16_t* u) {
  using vec::Vec;
  const Vec vs(d.scale);
  int64_t c = 0;
  for (; c + vec::kWidth <= n; c += vec::kWidth) {
    ((Vec::loadu(x + c) * vs) & vec::mask_ge_u16(u + c, d.threshold)).store(x + c);
  }
  for (; c < n; ++c) x[c] = u[c] >= d.threshold ? x[c] * d.scale : 0.f;
  std::fill(x + n, x + cols, 0.f);
}

// Backward of one tile row: s = P in, the dropped P out; dp = dP (the gradient of the dropped P) in,
// dS = P * (dP' - delta) out, where dP' = dP * keep / (1 - p), taken as 0 where the dropped P is 0
// (dropped, or P underflowed to 0), so a NaN dP there cannot reach dS. Keys n .. cols get 0.
inline void dropout_grad_row(const DropoutParams& d, float* s, float* dp, int64_t n, int64_t cols, float delta,
                             const uint16_t* u) {
  using vec::Vec;
  const Vec vs(d.scale), vd(delta), zero(0.f);
  int64_t c = 0;
  for (; c + vec::kWidth <= n; c += vec::kWidth) {
    const Vec pr = Vec::loadu(s + c);
    const Vec pd = (pr * vs) & vec::mask_ge_u16(u + c, d.threshold);
    const Vec g = (Vec::loadu(dp + c) * vs) & (pd != zero);
    pd.store(s + c);
    (pr * (g - vd)).store(dp + c);
  }
  for (; c < n; ++c) {
    const float pr = s[c];
    const float pd = u[c] >= d.threshold ? pr * d.scale : 0.f;
    const float g = pd != 0.f ? dp[c] * d.scale : 0.f;
    s[c] = pd;
    dp[c] = pr * (g - delta);
  }
  std::fill(s + n, s + cols, 0.f);
  std::fill(dp + n, dp + cols, 0.f);
}

}  // namespace forkattn::cpu::CPU_CAPABILITY
