// CPU KV-cache append and decode attention.
//
// Decode: at::parallel_for over (batch x kv-head x context split); one task streams its range of
// the sequence's K and V once in blocks of kBlock keys, converted to fp32 once per block and shared
// by all G x T query rows of the kv-head (the GQA heads and the new tokens), with an online softmax
// per row. Each K/V row is loaded once per group of 4 query rows (the scores of 4 rows per K load,
// the P V of 4 rows per V load with the accumulators of a slice of head_dim in registers). When
// B x Hkv tasks cannot fill the threads (B = 1, MQA) the context is split and the partial
// (acc, max, sum) states are merged after. Vectorized over head_dim with cpu/vec.h (at::vec).
#include "cpu/vec.h"  // first: it sets at::vec's ISA before any ATen header

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "decode.h"

namespace forkattn {
namespace cpu::CPU_CAPABILITY {  // one copy per ISA variant: cpu/isa.h
namespace {

constexpr int64_t kBlock = 64;  // keys per block
using vec::Vec;

struct CacheView {
  int64_t page_stride, head_stride, slot_stride;  // strides of k_cache / v_cache (head_dim stride 1)
  int64_t page_size;
  const int32_t* block_table;  // nullptr: contiguous, page b for sequence b
  int64_t block_table_batch_stride;
  // Page of position pos of sequence b, or -1 when the block table has none.
  inline int64_t page(int64_t b, int64_t pos) const {
    return block_table ? static_cast<int64_t>(block_table[b * block_table_batch_stride + pos / page_size]) : b;
  }
  inline int64_t offset(int64_t page, int64_t h, int64_t pos) const {
    return page * page_stride + h * head_stride + (pos % page_size) * slot_stride;
  }
};

CacheView cache_view(const at::Tensor& c, const int32_t* block_table, int64_t block_table_batch_stride) {
  return {c.stride(0), c.stride(1), c.stride(2), c.size(2), block_table, block_table_batch_stride};
}

// Number of tokens of an append of T at length L that fit: stops at the first position that is
// at or past max_seqlen or lies on a missing page. A negative L writes nothing. (The entry point,
// csrc/decode.cpp, has already refused negative lengths and entries >= num_pages.)
inline int64_t tokens_that_fit(const CacheView& cv, int64_t b, int64_t L, int64_t T, int64_t max_seqlen,
                               int64_t pages_per_seq) {
  if (L < 0) return 0;
  int64_t n = 0;
  for (; n < T; ++n) {
    const int64_t pos = L + n;
    if (pos >= max_seqlen) break;
    if (cv.block_table && (pos / cv.page_size >= pages_per_seq || cv.page(b, pos) < 0)) break;
  }
  return n;
}

template <typename T>
void append_impl(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& seqlens, const CacheView& cv,
                 const at::Tensor& k, const at::Tensor& v, int64_t max_seqlen, int64_t pages_per_seq) {
  const int64_t B = k.size(0), Hkv = k.size(1), Tn = k.size(2), D = k.size(3);
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  int32_t* lens = seqlens.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lens[b];
      const int64_t n = tokens_that_fit(cv, b, L, Tn, max_seqlen, pages_per_seq);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = L + t, page = cv.page(b, pos);
        for (int64_t h = 0; h < Hkv; ++h) {
          std::memcpy(kc + cv.offset(page, h, pos), kp + b * k.stride(0) + h * k.stride(1) + t * k.stride(2),
                      D * sizeof(T));
          std::memcpy(vc + cv.offset(page, h, pos), vp + b * v.stride(0) + h * v.stride(1) + t * v.stride(2),
                      D * sizeof(T));
        }
      }
      lens[b] = static_cast<int32_t>(L + n);
    }
  });
}

constexpr int64_t kRowGroup = 4;  // query rows that share each K/V row load (a GQA group of 4)
constexpr int64_t kMinSplitKeys = 256;  // a context split is at least this long (the merge stays cheap)

// s[r] = dot(q_r, k) for nr <= 4 rows of stride D: the K row is loaded once for all of them.
template <int NR>
inline void dots(const float* q, int64_t D, const float* k, float* s) {
  Vec a[NR];
  for (int r = 0; r < NR; ++r) a[r] = Vec(0.f);
  int64_t d = 0;
  for (; d + vec::kWidth <= D; d += vec::kWidth) {
    const Vec kv = Vec::loadu(k + d);
    for (int r = 0; r < NR; ++r) a[r] = at::vec::fmadd(Vec::loadu(q + r * D + d), kv, a[r]);
  }
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (NR == 4) {  // the four horizontal sums at once (3 hadds instead of 4 reduce trees)
    static_assert(vec::kWidth == 8);
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  } else {
    for (int r = 0; r < NR; ++r) s[r] = vec::reduce_sum(a[r]);
  }
#else
  for (int r = 0; r < NR; ++r) s[r] = vec::reduce_sum(a[r]);
#endif
  for (; d < D; ++d) {
    for (int r = 0; r < NR; ++r) s[r] += q[r * D + d] * k[d];
  }
}

// acc_r[0, D) += sum_j p[r * ld + j] * v_j[0, D) for nr <= 4 rows and n keys: each V row is loaded
// once for all rows, and the accumulators of a 2-vector slice of D stay in registers over the keys.
template <int NR>
inline void pv(const float* p, int64_t ld, const float* const* vrow, int64_t n, float* acc, int64_t D) {
  constexpr int64_t W = vec::kWidth;
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    Vec a[NR][2];
    for (int r = 0; r < NR; ++r) {
      a[r][0] = Vec::loadu(acc + r * D + d);
      a[r][1] = Vec::loadu(acc + r * D + d + W);
    }
    for (int64_t j = 0; j < n; ++j) {
      const Vec v0 = Vec::loadu(vrow[j] + d), v1 = Vec::loadu(vrow[j] + d + W);
      for (int r = 0; r < NR; ++r) {
        const Vec pr(p[r * ld + j]);
        a[r][0] = at::vec::fmadd(pr, v0, a[r][0]);
        a[r][1] = at::vec::fmadd(pr, v1, a[r][1]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      a[r][0].store(acc + r * D + d);
      a[r][1].store(acc + r * D + d + W);
    }
  }
  for (; d < D; ++d) {
    for (int r = 0; r < NR; ++r) {
      float x = acc[r * D + d];
      for (int64_t j = 0; j < n; ++j) x += p[r * ld + j] * vrow[j][d];
      acc[r * D + d] = x;
    }
  }
}

template <int NR>
void group_block(const float* q, int64_t D, const float* const* krow, const float* const* vrow, int64_t nb, float* s,
                 int64_t ld, float* acc, bool scores) {
  if (scores) {
    float tmp[NR];
    for (int64_t j = 0; j < nb; ++j) {
      dots<NR>(q, D, krow[j], tmp);
      for (int r = 0; r < NR; ++r) s[r * ld + j] = tmp[r];
    }
  } else {
    pv<NR>(s, ld, vrow, nb, acc, D);
  }
}

// Scores (scores = true) or P V (false) of rows [r0, r0 + nr), nr <= kRowGroup.
void row_group(int64_t nr, const float* q, int64_t D, const float* const* krow, const float* const* vrow, int64_t nb,
               float* s, int64_t ld, float* acc, bool scores) {
  switch (nr) {
    case 4: return group_block<4>(q, D, krow, vrow, nb, s, ld, acc, scores);
    case 3: return group_block<3>(q, D, krow, vrow, nb, s, ld, acc, scores);
    case 2: return group_block<2>(q, D, krow, vrow, nb, s, ld, acc, scores);
    default: return group_block<1>(q, D, krow, vrow, nb, s, ld, acc, scores);
  }
}

// Running softmax state of R rows over one key range: unnormalized acc [R, D], max m, sum l.
struct RowState {
  std::vector<float> acc, m, l;
  RowState(int64_t R, int64_t D) : acc(R * D), m(R), l(R) {}
};

// Streams keys [k_lo, min(k_hi, L)) of (b, hk) once, in blocks of kBlock: the fp32 rows of a block
// are shared by all R = G x T query rows of the kv-head, kRowGroup rows per K/V load. NaN in a query
// or a visible key propagates to its row (row_max / exp_sub_sum keep it), as in eager PyTorch.
template <typename T>
void decode_range(const T* kc, const T* vc, const CacheView& cv, int64_t pages_per_seq, int64_t b, int64_t hk,
                  int64_t L, int64_t k_lo, int64_t k_hi, const float* qf, const int64_t* limit, int64_t R, int64_t D,
                  RowState& st, std::vector<float>& kf, std::vector<float>& vf, std::vector<float>& s,
                  std::vector<const float*>& krow, std::vector<const float*>& vrow, const float* zeros) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::fill(st.acc.begin(), st.acc.end(), 0.f);
  std::fill(st.m.begin(), st.m.end(), kNegInf);
  std::fill(st.l.begin(), st.l.end(), 0.f);
  std::vector<char> valid(kBlock);
  const int64_t end = std::min(k_hi, L);
  for (int64_t j0 = k_lo; j0 < end; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, end - j0);
    for (int64_t jj = 0; jj < nb; ++jj) {
      const int64_t pos = j0 + jj;
      const int64_t page = (pos / cv.page_size < pages_per_seq) ? cv.page(b, pos) : -1;
      valid[jj] = page >= 0;
      if (!valid[jj]) {  // no page: score -inf, weight 0, read as zeros
        krow[jj] = vrow[jj] = zeros;
      } else if constexpr (std::is_same_v<T, float>) {  // read fp32 caches in place
        krow[jj] = kc + cv.offset(page, hk, pos);
        vrow[jj] = vc + cv.offset(page, hk, pos);
      } else {
        vec::to_float(kc + cv.offset(page, hk, pos), kf.data() + jj * D, D);
        vec::to_float(vc + cv.offset(page, hk, pos), vf.data() + jj * D, D);
        krow[jj] = kf.data() + jj * D;
        vrow[jj] = vf.data() + jj * D;
      }
    }
    int64_t n_any = 0;  // keys of the block that some row sees
    for (int64_t r = 0; r < R; ++r) n_any = std::max(n_any, std::min(nb, limit[r] - j0 + 1));
    if (n_any <= 0) continue;
    for (int64_t r0 = 0; r0 < R; r0 += kRowGroup) {
      const int64_t nr = std::min(kRowGroup, R - r0);
      row_group(nr, qf + r0 * D, D, krow.data(), vrow.data(), n_any, s.data() + r0 * kBlock, kBlock, nullptr, true);
    }
    for (int64_t r = 0; r < R; ++r) {
      float* row = s.data() + r * kBlock;
      const int64_t n = std::max<int64_t>(0, std::min(nb, limit[r] - j0 + 1));  // keys this row sees
      for (int64_t jj = 0; jj < n; ++jj) {
        if (!valid[jj]) row[jj] = kNegInf;
      }
      std::fill(row + n, row + n_any, 0.f);
      const float m_new = vec::max_nan(st.m[r], vec::row_max(row, n));
      if (m_new == kNegInf) {  // nothing visible yet
        std::fill(row, row + n, 0.f);
        continue;
      }
      const float sum = vec::exp_sub_sum(row, n, m_new);
      const float corr = std::exp(st.m[r] - m_new);  // 0 on the first visible block
      if (corr != 1.f) vec::scale(st.acc.data() + r * D, D, corr);
      st.l[r] = st.l[r] * corr + sum;
      st.m[r] = m_new;
    }
    for (int64_t r0 = 0; r0 < R; r0 += kRowGroup) {
      const int64_t nr = std::min(kRowGroup, R - r0);
      row_group(nr, nullptr, D, krow.data(), vrow.data(), n_any, s.data() + r0 * kBlock, kBlock,
                st.acc.data() + r0 * D, false);
    }
  }
}

// Context splits per sequence: B x Hkv tasks alone leave threads idle (B = 1, MQA), so each
// sequence is cut into up to `splits` ranges of whole blocks, at least kMinSplitKeys long, whose
// partial states are merged afterwards.
int64_t choose_splits(int64_t B, int64_t Hkv, int64_t max_len) {
  const int64_t threads = at::get_num_threads(), base = B * Hkv;
  if (threads <= 1 || base >= 2 * threads) return 1;
  const int64_t want = (2 * threads + base - 1) / base;
  return std::max<int64_t>(1, std::min(want, max_len / kMinSplitKeys));
}

template <typename T>
void decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& seqlens, const CacheView& cv, int64_t max_seqlen, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Tn = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), G = H / Hkv, R = G * Tn;
  const int64_t pages_per_seq = cv.block_table ? (max_seqlen + k_cache.size(2) - 1) / k_cache.size(2) : 1;
  const T* qp = q.data_ptr<T>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max<int64_t>(max_len, std::clamp<int64_t>(lens[b], 0, max_seqlen));
  const int64_t S = choose_splits(B, Hkv, max_len);
  // S > 1: the partial states of every (b, hk, split), merged below.
  std::vector<float> part_acc(S > 1 ? B * Hkv * S * R * D : 0), part_m(S > 1 ? B * Hkv * S * R : 0),
      part_l(S > 1 ? B * Hkv * S * R : 0);

  auto store = [&](int64_t b, int64_t hk, const float* acc, const float* l) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hk * G + r / Tn, t = r % Tn;
      T* orow = op + b * out.stride(0) + h * out.stride(1) + t * out.stride(2);
      const float inv = l[r] == 0.f ? 0.f : 1.f / l[r];  // no visible key: zeros; NaN stays NaN
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[r * D + d] * inv);
    }
  };

  at::parallel_for(0, B * Hkv * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(R * D), kf(kBlock * D), vf(kBlock * D), s(R * kBlock), zeros(D, 0.f);
    std::vector<int64_t> limit(R);
    std::vector<const float*> krow(kBlock), vrow(kBlock);  // fp32 rows: the cache itself, or kf/vf
    RowState st(R, D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / S, c = task % S, b = bh / Hkv, hk = bh % Hkv;
      const int64_t L = std::clamp<int64_t>(lens[b], 0, max_seqlen);
      const int64_t nblocks = (L + kBlock - 1) / kBlock, per = (nblocks + S - 1) / S;
      const int64_t k_lo = c * per * kBlock, k_hi = (c + 1) * per * kBlock;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t h = hk * G + r / Tn, t = r % Tn;
        vec::to_float(qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2), qf.data() + r * D, D, scale);
        limit[r] = L - Tn + t;  // last visible key
      }
      decode_range(kc, vc, cv, pages_per_seq, b, hk, L, k_lo, k_hi, qf.data(), limit.data(), R, D, st, kf, vf, s,
                   krow, vrow, zeros.data());
      if (S == 1) {
        store(b, hk, st.acc.data(), st.l.data());
      } else {
        std::copy(st.acc.begin(), st.acc.end(), part_acc.begin() + task * R * D);
        std::copy(st.m.begin(), st.m.end(), part_m.begin() + task * R);
        std::copy(st.l.begin(), st.l.end(), part_l.begin() + task * R);
      }
    }
  });
  if (S == 1) return;
  // Merge: out_r = sum_c e_c acc_c / sum_c e_c l_c, e_c = exp(m_c - max_c m_c); an empty split
  // (m = -inf) weighs 0; a NaN max propagates.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(R * D), l(R);
    for (int64_t bh = begin; bh < end; ++bh) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = 0; r < R; ++r) {
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < S; ++c) M = vec::max_nan(M, part_m[(bh * S + c) * R + r]);
        l[r] = 0.f;
        if (M == -std::numeric_limits<float>::infinity()) continue;
        for (int64_t c = 0; c < S; ++c) {
          const int64_t i = (bh * S + c) * R + r;
          if (part_m[i] == -std::numeric_limits<float>::infinity()) continue;
          const float e = std::exp(part_m[i] - M);
          l[r] += e * part_l[i];
          vec::axpy(acc.data() + r * D, e, part_acc.data() + i * D, D);
        }
      }
      store(bh / Hkv, bh % Hkv, acc.data(), l.data());
    }
  });
}

}  // namespace

void kv_append_kernel(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& seqlens, const int32_t* block_table,
                      int64_t block_table_batch_stride, const at::Tensor& k, const at::Tensor& v, int64_t max_seqlen) {
  const int64_t pages_per_seq = block_table ? (max_seqlen + k_cache.size(2) - 1) / k_cache.size(2) : 1;
  const CacheView cv = cache_view(k_cache, block_table, block_table_batch_stride);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "kv_append_cpu", [&] {
    append_impl<scalar_t>(k_cache, v_cache, seqlens, cv, k, v, max_seqlen, pages_per_seq);
  });
}

void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& seqlens, const int32_t* block_table, int64_t block_table_batch_stride,
                   int64_t max_seqlen, float scale, at::Tensor& out) {
  const CacheView cv = cache_view(k_cache, block_table, block_table_batch_stride);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention_cpu", [&] {
    decode_impl<scalar_t>(q, k_cache, v_cache, seqlens, cv, max_seqlen, scale, out);
  });
}

}  // namespace cpu
}  // namespace forkattn
