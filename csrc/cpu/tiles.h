// Tile helpers shared by the CPU kernels of fused attention (attention_cpu.cpp) and disentangled
// attention (disentangled_cpu.cpp): tile matmuls (cpu/tile_gemm.h in the AVX2 / AVX512 variants), fp32 operand rows, the key-padding plan and
// masks, the online softmax and the task scheduler. Internal linkage (an anonymous namespace): each
// kernel file gets its own copy, compiled with the at::vec ISA cpu/vec.h selected for it.
#pragma once

#include "cpu/vec.h"  // first: it sets at::vec's ISA before any ATen header

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/tile_gemm.h"  // the AVX2 and AVX512 variants' own tile matmul

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>


// Fortran BLAS sgemm (LP64), exported by libtorch_cpu when torch is built with MKL. Weak, so
// the extension still loads against a torch without it; gemm() then uses its own loop.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (returns the previous one; 0 = the global setting). Inside our
// parallel region each tile matmul must stay on its own thread, or MKL nests a team of its own.
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));

namespace forkattn {
namespace cpu::CPU_CAPABILITY {  // one copy per ISA variant: cpu/isa.h
namespace {

using vec::kInf;
using vec::Vec;

// Tile sizes: query rows x keys (the key block is also the granularity of padding skips).
struct Tiles {
  int64_t bq, bk;
};

// Tall query tiles reuse each K/V tile across more rows (measured best: 256 x 128 on an AVX2
// EPYC for BERT/GPT-2 shapes); shrunk when (batch x heads x query tiles) would starve threads.
Tiles choose_tiles(int64_t batch_heads, int64_t Lq) {
  Tiles t{256, 128};
  const int64_t want = 4 * at::get_num_threads();
  while (t.bq > 32 && batch_heads * ((Lq + t.bq - 1) / t.bq) < want) t.bq /= 2;
  t.bq = std::max<int64_t>(1, std::min(t.bq, Lq));
  return t;
}

// ---------------------------------------------------------------------------------------------
// Matmul of tiles. Column-major BLAS convention: C[m, n] = alpha * op(A) * op(B) + beta * C.
// A row-major [r, c] matrix with row stride ld is a column-major [c, r] one with the same ld.

// Which matmul the tiles get: the plain loop (FORKATTN_CPU_NAIVE_GEMM=1, so tests can cover it, or
// a torch without MKL), MKL's sgemm_, or in the AVX2 and AVX512 variants forkattn's own register-
// blocked kernels (cpu/tile_gemm.h; FORKATTN_CPU_TILE_GEMM=blas sends their tiles to MKL instead,
// to compare: MKL takes its AVX2 path on AMD CPUs, ~100 GFLOP/s per thread at these tiles on Zen 5).
enum class TileGemm : uint8_t { kLoop, kBlas, kOwn };

TileGemm tile_gemm_path() {
  const char* naive = std::getenv("FORKATTN_CPU_NAIVE_GEMM");
  if (naive && naive[0] == '1') return TileGemm::kLoop;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const char* env = std::getenv("FORKATTN_CPU_TILE_GEMM");
  if (!(env && std::string_view(env) == "blas")) return TileGemm::kOwn;
#endif
  return sgemm_ != nullptr ? TileGemm::kBlas : TileGemm::kLoop;
}

// fp16/bf16 backward: Delta from the recomputed fp32 output (see the backward's comment), unless
// FORKATTN_CPU_ROUNDED_DELTA=1 (the previous rowsum(dO * rounded O), kept to measure the cost).
bool fp32_delta_enabled(const at::Tensor& q) {
  const char* env = std::getenv("FORKATTN_CPU_ROUNDED_DELTA");
  return q.scalar_type() != at::kFloat && !(env && env[0] == '1');
}

// Keeps MKL single-threaded on this thread while alive.
class SerialBlas {
 public:
  SerialBlas() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int prev_;
};

void gemm(TileGemm path, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // Row-major, C^T [n, m] = op(B)^T . op(A)^T: X = op(B)^T is B's rows (tb: stored transposed),
  // Y = op(A)^T is A's rows (ta: A^T's, packed by gemm_abt). (T, T) is not used by the kernels.
  if (path == TileGemm::kOwn && !(ta && tb)) {
    if (ta) {
      tile_gemm::gemm_abt(n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
    } else if (tb) {
      tile_gemm::gemm_rm<true>(n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
    } else {
      tile_gemm::gemm_rm<false>(n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
    }
    return;
  }
#endif
  if (path != TileGemm::kLoop && sgemm_ != nullptr) {
    const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
    const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
    sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      float sum = 0.f;
      for (int64_t p = 0; p < k; ++p) {
        sum += (ta ? a[p + i * lda] : a[i + p * lda]) * (tb ? b[j + p * ldb] : b[p + j * ldb]);
      }
      float& out = c[i + j * ldc];
      out = beta == 0.f ? alpha * sum : alpha * sum + beta * out;
    }
  }
}

// Row-major tile products on the column-major gemm above; A [m, k] means m rows of k entries, row stride lda.
// C[m, n] = alpha * A . B^T + beta * C, with B [n, k].
void mm_abt(TileGemm path, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
            int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm(path, true, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
// C[m, n] = alpha * A . B + beta * C, with A [m, k], B [k, n].
void mm_ab(TileGemm path, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
           int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm(path, false, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
// C[m, n] = alpha * A^T . B + beta * C, with A [k, m], B [k, n].
void mm_atb(TileGemm path, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
            int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm(path, false, true, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// dst[p, j] = src[j, p] for j < n, p < k (row strides lds, ldd).
void transpose_rows(const float* src, int64_t lds, int64_t n, int64_t k, float* dst, int64_t ldd) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  tile_gemm::transpose_into(src, lds, n, k, dst, ldd);
#else  // 16 source rows at a time: their lines stay in L1 while each destination row gets 16 floats
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    for (int64_t p = 0; p < k; ++p) {
      for (int64_t j = j0; j < std::min(n, j0 + 16); ++j) dst[p * ldd + j] = src[j * lds + p];
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Operands: fp32 [B, H, L, D] rows with any batch/head/row strides and unit stride in D.
// Varlen (packed sequences): one [1, H, total, D] operand, batch stride 0, and sequence b's
// rows start at row start[b].

struct Rows {
  float* p;
  int64_t sb, sh, sl;               // strides of batch, head, row
  const int64_t* start = nullptr;   // varlen: first row of each sequence
  float* at(int64_t b, int64_t h, int64_t i) const {
    return p + b * sb + h * sh + ((start ? start[b] : 0) + i) * sl;
  }
};

// t as fp32 with a BLAS-usable row stride (>= D): a view when it already is one, else a copy.
at::Tensor as_f32(const at::Tensor& t) {
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  if (f.size(2) > 1 && f.stride(2) < f.size(3)) f = f.contiguous();
  return f;
}

Rows rows_of(const at::Tensor& f) {
  // A single row may have any stride; BLAS only needs ld >= D.
  const int64_t sl = f.size(2) > 1 ? f.stride(2) : f.size(3);
  return {f.data_ptr<float>(), f.stride(0), f.stride(1), sl};
}

// fp32 buffer the kernel writes for `dst`: dst itself when it is fp32, else a scratch tensor
// that finish_output() rounds into dst.
at::Tensor f32_output(const at::Tensor& dst) {
  return dst.scalar_type() == at::kFloat ? dst : at::empty(dst.sizes(), dst.options().dtype(at::kFloat));
}

void finish_output(at::Tensor& dst, const at::Tensor& f32) {
  if (!dst.is_same(f32)) dst.copy_(f32);
}

// ---------------------------------------------------------------------------------------------
// Masking.

enum BlockState : uint8_t { kSkip = 0, kFull = 1, kMixed = 2 };

// Which key blocks each batch row attends to, and which keys of the mixed ones.
struct KeyPlan {
  int64_t nkb = 0;                // key blocks
  std::vector<uint8_t> state;     // [B, nkb] BlockState
  std::vector<uint8_t> keep;      // [B, Lk] 1 = attend, 0 = padded; empty without a mask
  std::vector<int32_t> last;      // [B, nkb] one past the block's last attended key, from the block's start
  BlockState at(int64_t b, int64_t kb) const { return state.empty() ? kFull : BlockState(state[b * nkb + kb]); }
  // Keys [j0, j0 + end) of block kb (cols keys) hold every attended one.
  int64_t end(int64_t b, int64_t kb, int64_t cols) const { return last.empty() ? cols : last[b * nkb + kb]; }
};

KeyPlan plan_keys(const std::optional<at::Tensor>& key_padding_mask, int64_t B, int64_t Lk, int64_t bk) {
  KeyPlan plan;
  plan.nkb = (Lk + bk - 1) / bk;
  if (!key_padding_mask) return plan;
  const at::Tensor mask = key_padding_mask->contiguous();
  const bool* mp = mask.data_ptr<bool>();
  plan.state.assign(B * plan.nkb, kSkip);
  plan.last.assign(B * plan.nkb, 0);
  plan.keep.resize(B * Lk);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t kb = 0; kb < plan.nkb; ++kb) {
      const int64_t j0 = kb * bk, j1 = std::min(Lk, j0 + bk);
      int64_t attend = 0;
      for (int64_t j = j0; j < j1; ++j) {
        attend += mp[b * Lk + j];
        plan.keep[b * Lk + j] = mp[b * Lk + j] ? 1 : 0;
        if (mp[b * Lk + j]) plan.last[b * plan.nkb + kb] = static_cast<int32_t>(j + 1 - j0);
      }
      plan.state[b * plan.nkb + kb] = attend == 0 ? kSkip : (attend == j1 - j0 ? kFull : kMixed);
    }
  }
  return plan;
}

// Rows j0..j0+cols of K or V (src) for batch b, head h, in key block j0 / bk of `plan`: in place, or
// for a mixed block a copy in `scratch` (cols x D) with the padded rows zeroed, so garbage there
// (NaN, inf) never reaches a product. Sets *ld to the row stride of the result.
const float* key_tile(const Rows& src, const KeyPlan& plan, int64_t b, int64_t h, int64_t j0, int64_t cols,
                      int64_t bk, int64_t Lk, int64_t D, float* scratch, int64_t* ld) {
  const float* rows = src.at(b, h, j0);
  if (plan.at(b, j0 / bk) != kMixed) {
    *ld = src.sl;
    return rows;
  }
  const uint8_t* keep = plan.keep.data() + b * Lk + j0;
  for (int64_t c = 0; c < cols; ++c) {
    if (keep[c]) {
      std::copy(rows + c * src.sl, rows + c * src.sl + D, scratch + c * D);
    } else {
      std::fill(scratch + c * D, scratch + (c + 1) * D, 0.f);
    }
  }
  *ld = D;
  return scratch;
}

// Writes `fill` over the entries of hidden keys in a tile s[rows, cols] (row stride ld) whose
// first query is i0 and first key j0: keys with keep[c] == 0 (when keep is given), and when
// causal keys j > i + off. A select, not an added bias: a NaN or inf score is replaced too.
void mask_tile(float* s, int64_t ld, int64_t rows, int64_t cols, const uint8_t* keep, bool causal, int64_t i0,
               int64_t j0, int64_t off, float fill) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    if (keep) {
      for (int64_t c = 0; c < cols; ++c) row[c] = keep[c] ? row[c] : fill;
    }
    if (causal) {
      const int64_t visible = std::clamp<int64_t>(i0 + r + off + 1 - j0, 0, cols);
      std::fill(row + visible, row + cols, fill);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row primitives: cpu/vec.h, plus the softmax gradient.

// ds = p * (dp - delta) in place of dp.
void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
  int64_t c = 0;
  const Vec vd(delta);
  for (; c + Vec::size() <= n; c += Vec::size()) (Vec::loadu(p + c) * (Vec::loadu(dp + c) - vd)).store(dp + c);
  for (; c < n; ++c) dp[c] = p[c] * (dp[c] - delta);
}

// ---------------------------------------------------------------------------------------------
// Scheduling: tasks handed out one at a time (an atomic counter) to the threads of one
// at::parallel_for, so uneven tasks (padding, causal) balance; each thread builds its
// scratch once.

template <class MakeScratch, class Fn>
void run_tasks(int64_t n, const MakeScratch& make_scratch, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const SerialBlas serial_blas;
    auto scratch = make_scratch();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t, scratch);
  });
}

// max over x[0, n), NaN when one is NaN (vec::row_max's result). AVX512: two independent max chains
// and the NaN test as a mask OR beside them (at::vec::maximum puts its NaN blend on the one chain),
// a masked tail instead of the scalar loop. Exact, so any order gives the same bits.
inline float row_max(const float* x, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 m0 = _mm512_set1_ps(-kInf), m1 = m0;
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, a);
    m1 = _mm512_max_ps(m1, b);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 a = _mm512_mask_loadu_ps(_mm512_set1_ps(-kInf), k, x + i);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, a);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
#else
  return vec::row_max(x, n);
#endif
}

// Folds a tile of scores (turned into probabilities in place) into the running max m, sum l
// and the accumulator rows acc, which are rescaled when the max grows. after(r, row) then runs on
// each row that has a visible key, while it is in L1 (the attention kernel's dropout).
template <class RowFn>
void online_softmax(float* s, int64_t ld, int64_t rows, int64_t cols, float* m, float* l, float* acc, int64_t D,
                    const RowFn& after) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    const float m_new = vec::max_nan(m[r], row_max(row, cols));
    if (m_new == -kInf) {  // nothing visible yet: this row of P is zero
      std::fill(row, row + cols, 0.f);
      continue;
    }
    const float sum = vec::exp_sub_sum(row, cols, m_new);
    const float corr = std::exp(m[r] - m_new);  // 0 on the first visible tile
    if (corr != 1.f) vec::scale(acc + r * D, D, corr);
    l[r] = l[r] * corr + sum;
    m[r] = m_new;
    after(r, row);
  }
}

inline void online_softmax(float* s, int64_t ld, int64_t rows, int64_t cols, float* m, float* l, float* acc,
                           int64_t D) {
  online_softmax(s, ld, rows, cols, m, l, acc, D, [](int64_t, float*) {});
}

// Log-sum-exp rows: [B, H, Lq] strides, or varlen [H, total_q] (sb = 0, start = q starts).
struct LseRows {
  float* p;
  int64_t sb, sh, sl;
  const int64_t* start = nullptr;
  float* at(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + ((start ? start[b] : 0) + i) * sl; }
};

// A finished query block (rows from i0 of batch b, head h): out = acc / l and lse = m + log l per row;
// a row that saw no key (l = 0) gets zeros and lse = +inf.
void store_block(const float* acc, const float* m, const float* l, int64_t rows, int64_t D, const Rows& out,
                 const LseRows& lse, int64_t b, int64_t h, int64_t i0) {
  for (int64_t r = 0; r < rows; ++r) {
    const bool empty = l[r] == 0.f;
    float* o = out.at(b, h, i0 + r);
    std::copy(acc + r * D, acc + (r + 1) * D, o);
    vec::scale(o, D, empty ? 0.f : 1.f / l[r]);
    *lse.at(b, h, i0 + r) = empty ? kInf : m[r] + std::log(l[r]);
  }
}

// P = exp(S - lse) for a tile; rows with lse = +inf (no visible key) become zeros.
void probs_from_lse(float* s, int64_t ld, int64_t rows, int64_t cols, const float* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    if (std::isinf(lse[r])) {
      std::fill(row, row + cols, 0.f);
    } else {
      vec::exp_sub_sum(row, cols, lse[r]);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace forkattn
