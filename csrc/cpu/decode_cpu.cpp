// CPU KV-cache append and decode attention.
//
// Decode: at::parallel_for over (batch x kv-head); one task streams its sequence's K and V once
// in blocks of kBlock keys, converted to fp32 once per block and shared by all G x T query rows
// of the kv-head (the GQA heads and the new tokens), with an online softmax per row. Dot products,
// conversions and the P @ V updates are vectorized over head_dim with cpu/vec.h (at::vec).
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
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(R * D), acc(R * D), kf(kBlock * D), vf(kBlock * D), m(R), l(R), s(kBlock);
    std::vector<int64_t> limit(R);
    std::vector<char> valid(kBlock);
    std::vector<const float*> krow(kBlock), vrow(kBlock);  // fp32 rows: the cache itself, or kf/vf
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, hk = task % Hkv;
      const int64_t L = std::clamp<int64_t>(lens[b], 0, max_seqlen);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t h = hk * G + r / Tn, t = r % Tn;
        vec::to_float(qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2), qf.data() + r * D, D, scale);
        limit[r] = L - Tn + t;  // last visible key
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t j0 = 0; j0 < L; j0 += kBlock) {
        const int64_t nb = std::min(kBlock, L - j0);
        for (int64_t jj = 0; jj < nb; ++jj) {
          const int64_t pos = j0 + jj;
          const int64_t page = (pos / cv.page_size < pages_per_seq) ? cv.page(b, pos) : -1;
          valid[jj] = page >= 0;
          if (!valid[jj]) continue;
          if constexpr (std::is_same_v<T, float>) {  // read fp32 caches in place
            krow[jj] = kc + cv.offset(page, hk, pos);
            vrow[jj] = vc + cv.offset(page, hk, pos);
          } else {
            vec::to_float(kc + cv.offset(page, hk, pos), kf.data() + jj * D, D);
            vec::to_float(vc + cv.offset(page, hk, pos), vf.data() + jj * D, D);
            krow[jj] = kf.data() + jj * D;
            vrow[jj] = vf.data() + jj * D;
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          const int64_t n = std::min(nb, limit[r] - j0 + 1);  // keys of this block the row sees
          if (n <= 0) continue;
          const float* qr = qf.data() + r * D;
          float bmax = kNegInf;
          for (int64_t jj = 0; jj < n; ++jj) {
            s[jj] = valid[jj] ? vec::dot(qr, krow[jj], D) : kNegInf;
            bmax = std::max(bmax, s[jj]);
          }
          if (bmax == kNegInf) continue;
          const float m_new = std::max(m[r], bmax);
          const float corr = std::exp(m[r] - m_new);  // 0 on the first visible block
          float* ar = acc.data() + r * D;
          float lsum = 0.f;
          bool first = true;
          for (int64_t jj = 0; jj < n; ++jj) {
            if (s[jj] == kNegInf) continue;
            const float p = std::exp(s[jj] - m_new);
            lsum += p;
            if (first) {
              vec::scale_axpy(ar, corr, p, vrow[jj], D);
              first = false;
            } else {
              vec::axpy(ar, p, vrow[jj], D);
            }
          }
          l[r] = l[r] * corr + lsum;
          m[r] = m_new;
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t h = hk * G + r / Tn, t = r % Tn;
        T* orow = op + b * out.stride(0) + h * out.stride(1) + t * out.stride(2);
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[r * D + d] * inv);
      }
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
