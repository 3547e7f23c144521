// CPU attention kernels: blocked online softmax (flash-style), forward and backward.
//
// All arithmetic is fp32: fp16/bf16 inputs are widened once up front and the results rounded
// once at the end. Work is cut into [query block x key block] tiles; a tile's scores live in a
// per-thread scratch buffer, never an Lq x Lk matrix. The tile matmuls go to BLAS sgemm (the
// MKL that libtorch_cpu exports) with a plain loop as fallback; the softmax passes use cpu/vec.h.
//
// Masks: per batch, each key block is classified as skipped (no key attends), full (all
// attend) or mixed. Causal tiles past the diagonal are skipped and the diagonal ones are masked
// row by row: query i sees key j iff j <= i + (Lk - Lq). Hidden scores are *selected* to -inf
// (never added: inf + -inf = NaN), and in mixed blocks the padded K/V rows are read as zeros,
// so garbage there (inf, NaN) cannot reach any output or gradient (0 * NaN); padded keys get
// exactly zero gradients. NaN in a query or a visible key propagates as in eager PyTorch.
// A row that sees no key gets out = 0, lse = +inf, zero gradients.

#include "cpu/vec.h"  // first: it sets at::vec's ISA before any ATen header

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "attention.h"
#include "common/philox.h"
#include "cpu/philox_cpu.h"

// Fortran BLAS sgemm (LP64), exported by libtorch_cpu when torch is built with MKL. Weak, so
// the extension still loads against a torch without it; gemm() then uses its own loop.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (returns the previous one; 0 = the global setting). Inside our
// parallel region each tile matmul must stay on its own thread, or MKL nests a team of its own.
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));

namespace forkattn {
namespace cpu {
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

bool blas_enabled() {
  // FORKATTN_CPU_NAIVE_GEMM=1 forces the fallback loop (so tests can cover it).
  const char* env = std::getenv("FORKATTN_CPU_NAIVE_GEMM");
  return sgemm_ != nullptr && !(env && env[0] == '1');
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

void gemm(bool blas, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (blas) {
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

// Shapes and operands shared by the forward and backward passes. Varlen: Lq and Lk are the
// longest sequences and len_q/len_k (with q.start/k.start) give each one.
struct Problem {
  int64_t B, H, Hkv, Lq, Lk, D;
  bool causal, blas;
  bool fp32_delta = false;  // backward: Delta from a recomputed fp32 output (fp16/bf16 inputs)
  float scale;
  int64_t bq, bk;  // tile: query rows x keys
  Rows q, k, v;
  const KeyPlan* plan;
  std::vector<int64_t> q_start, k_start, len_q, len_k;  // varlen only (empty: padded batch)
  // Dropout (dropout_p > 0): kernels/common/philox.h's mask of (b, h, i, j), i and j counted inside
  // the sequence; kept entries scaled by 1 / (1 - p).
  bool dropout = false;
  uint64_t seed = 0;
  uint32_t drop_threshold = 0;
  float drop_scale = 1.f;

  int64_t lq(int64_t b) const { return len_q.empty() ? Lq : len_q[b]; }
  int64_t lk(int64_t b) const { return len_k.empty() ? Lk : len_k[b]; }
  int64_t off(int64_t b) const { return lk(b) - lq(b); }  // causal diagonal: j <= i + off
  int64_t nqb() const { return (Lq + bq - 1) / bq; }
  int64_t nqb(int64_t b) const { return (lq(b) + bq - 1) / bq; }
  // Keys [0, end) of sequence b are visible to at least one query row before i1.
  int64_t key_end(int64_t b, int64_t i1) const {
    return causal ? std::clamp<int64_t>(i1 + off(b), 0, lk(b)) : lk(b);
  }
  // Rows j0..j0+cols of K or V (src) for kv head hk: in place, or for a mixed block a copy in
  // `scratch` (bk x D) with the padded rows zeroed. Sets *ld to the row stride of the result.
  const float* kv_tile(const Rows& src, int64_t b, int64_t hk, int64_t j0, int64_t cols, float* scratch,
                       int64_t* ld) const;
  // Writes `fill` over hidden (query, key) entries of a tile when it has any (mixed or diagonal).
  void mask(float* s, int64_t b, int64_t i0, int64_t rows, int64_t j0, int64_t cols, float fill) const;
  // Dropout, one tile row (query i, keys j0 .. j0 + cols); u is scratch for drop_u16.
  // The leading keys of the row that may be visible (the rest are hidden: no Philox for them).
  int64_t drop_cols(int64_t b, int64_t i, int64_t j0, int64_t cols) const;
  // u[c] = the mask's u16 of (b, h, i, j0 + c) for c < n rounded up to 64; j0 a multiple of 8.
  void drop_u16(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, uint16_t* u) const;
  // x[c] *= keep(b, h, i, j0 + c) / (1 - p); hidden keys 0.
  void drop_row(float* x, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols, uint16_t* u) const;
  // Backward: s = P in, the dropped P out; dp = dP (of the dropped P) in, dS out.
  void drop_grad_row(float* s, float* dp, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols, float delta,
                     uint16_t* u) const;
  // S = scale * Q K^T for a tile into s (row stride bk), K rows from kt (row stride kld); hidden
  // keys -inf. False (and nothing computed) when the block is skipped.
  bool scores(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols, const float* kt,
              int64_t kld, float* s) const;
  // The key tiles query rows [i0, i0 + rows) of (b, h) see, skipped blocks left out: for each, the
  // scores S of the tile go to s and fn(j0, cols, kt, kld, vt, vld) runs with its K and V rows
  // (from kv_tile, in kscratch / vscratch for a mixed block).
  template <class Fn>
  void for_each_key_tile(int64_t b, int64_t h, int64_t i0, int64_t rows, float* kscratch, float* vscratch, float* s,
                         const Fn& fn) const {
    const int64_t hk = h / (H / Hkv), kend = key_end(b, i0 + rows);
    for (int64_t j0 = 0; j0 < kend; j0 += bk) {
      const int64_t cols = std::min(bk, kend - j0);
      if (plan->at(b, j0 / bk) == kSkip) continue;
      int64_t kld, vld;
      const float* kt = kv_tile(k, b, hk, j0, cols, kscratch, &kld);
      const float* vt = kv_tile(v, b, hk, j0, cols, vscratch, &vld);
      scores(b, h, i0, rows, j0, cols, kt, kld, s);
      fn(j0, cols, kt, kld, vt, vld);
    }
  }
};

const float* Problem::kv_tile(const Rows& src, int64_t b, int64_t hk, int64_t j0, int64_t cols, float* scratch,
                              int64_t* ld) const {
  const float* rows = src.at(b, hk, j0);
  if (plan->at(b, j0 / bk) != kMixed) {
    *ld = src.sl;
    return rows;
  }
  const uint8_t* keep = plan->keep.data() + b * Lk + j0;
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

void Problem::mask(float* s, int64_t b, int64_t i0, int64_t rows, int64_t j0, int64_t cols, float fill) const {
  const bool mixed = plan->at(b, j0 / bk) == kMixed;
  const bool diagonal = causal && j0 + cols - 1 > i0 + off(b);
  if (mixed || diagonal) {
    mask_tile(s, bk, rows, cols, mixed ? plan->keep.data() + b * Lk + j0 : nullptr, diagonal, i0, j0, off(b), fill);
  }
}

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

int64_t Problem::drop_cols(int64_t b, int64_t i, int64_t j0, int64_t cols) const {
  const int64_t n = plan->end(b, j0 / bk, cols);
  return causal ? std::min(n, std::clamp<int64_t>(i + off(b) + 1 - j0, 0, cols)) : n;
}

void Problem::drop_u16(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, uint16_t* u) const {
  // Philox block blk (keys 8 blk .. 8 blk + 7) is counter (blk, i, bh, kDropoutStream); 16 blocks
  // (128 keys) per call while more than 64 keys are left, else 8.
  const uint32_t bh = static_cast<uint32_t>(b * H + h), row = static_cast<uint32_t>(i);
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

void Problem::drop_row(float* x, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols, uint16_t* u) const {
  const int64_t n = drop_cols(b, i, j0, cols);
  drop_u16(b, h, i, j0, n, u);
  const Vec vs(drop_scale);
  int64_t c = 0;
  for (; c + vec::kWidth <= n; c += vec::kWidth) {
    ((Vec::loadu(x + c) * vs) & vec::mask_ge_u16(u + c, drop_threshold)).store(x + c);
  }
  for (; c < n; ++c) x[c] = u[c] >= drop_threshold ? x[c] * drop_scale : 0.f;
  std::fill(x + n, x + cols, 0.f);
}

// dS = P * (dP' - Delta) where dP' = dP * keep / (1 - p) is the gradient of the dropped P; taken as 0
// where the dropped P is 0 (dropped, or P underflowed to 0), so a NaN dP there cannot reach dS.
void Problem::drop_grad_row(float* s, float* dp, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols,
                            float delta, uint16_t* u) const {
  const int64_t n = drop_cols(b, i, j0, cols);
  drop_u16(b, h, i, j0, n, u);
  const Vec vs(drop_scale), vd(delta), zero(0.f);
  int64_t c = 0;
  for (; c + vec::kWidth <= n; c += vec::kWidth) {
    const Vec pr = Vec::loadu(s + c);
    const Vec pd = (pr * vs) & vec::mask_ge_u16(u + c, drop_threshold);
    const Vec d = (Vec::loadu(dp + c) * vs) & (pd != zero);
    pd.store(s + c);
    (pr * (d - vd)).store(dp + c);
  }
  for (; c < n; ++c) {
    const float pr = s[c];
    const float pd = u[c] >= drop_threshold ? pr * drop_scale : 0.f;
    const float d = pd != 0.f ? dp[c] * drop_scale : 0.f;
    s[c] = pd;
    dp[c] = pr * (d - delta);
  }
  std::fill(s + n, s + cols, 0.f);  // hidden keys (mixed or diagonal tiles, which mask() covers too)
  std::fill(dp + n, dp + cols, 0.f);
}

bool Problem::scores(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols, const float* kt,
                     int64_t kld, float* s) const {
  if (plan->at(b, j0 / bk) == kSkip) return false;
  gemm(blas, true, false, cols, rows, D, scale, kt, kld, q.at(b, h, i0), q.sl, 0.f, s, bk);
  mask(s, b, i0, rows, j0, cols, -kInf);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Dropout's u16 of one tile row: whole calls of 64 keys (drop_u16).
int64_t drop_u16_size(const Tiles& t) { return (t.bk + 63) / 64 * 64; }

struct FwdScratch {
  std::vector<float> s, acc, m, l, kt, vt;
  std::vector<uint16_t> u;  // dropout
  explicit FwdScratch(const Tiles& t, int64_t D)
      : s(t.bq * t.bk), acc(t.bq * D), m(t.bq), l(t.bq), kt(t.bk * D), vt(t.bk * D), u(drop_u16_size(t)) {}
};

// Folds a tile of scores (turned into probabilities in place) into the running max m, sum l
// and the accumulator rows acc, which are rescaled when the max grows. after(r, row) then runs on
// each row that has a visible key, while it is in L1 (dropout).
template <class RowFn>
void online_softmax(float* s, int64_t ld, int64_t rows, int64_t cols, float* m, float* l, float* acc, int64_t D,
                    const RowFn& after) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    const float m_new = vec::max_nan(m[r], vec::row_max(row, cols));
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

// Log-sum-exp rows: [B, H, Lq] strides, or varlen [H, total_q] (sb = 0, start = q starts).
struct LseRows {
  float* p;
  int64_t sb, sh, sl;
  const int64_t* start = nullptr;
  float* at(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + ((start ? start[b] : 0) + i) * sl; }
};

// One query block of one (batch, head): out rows and their lse.
void fwd_query_block(const Problem& p, int64_t b, int64_t h, int64_t qb, const Rows& out, const LseRows& lse,
                     FwdScratch& w) {
  const int64_t D = p.D, i0 = qb * p.bq, rows = std::min(p.bq, p.lq(b) - i0);
  if (rows <= 0) return;  // varlen: past this sequence's end
  std::fill(w.m.begin(), w.m.end(), -kInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  p.for_each_key_tile(b, h, i0, rows, w.kt.data(), w.vt.data(), w.s.data(),
                      [&](int64_t j0, int64_t cols, const float*, int64_t, const float* vt, int64_t vld) {
                        // dropout after l: lse is of the undropped P
                        online_softmax(w.s.data(), p.bk, rows, cols, w.m.data(), w.l.data(), w.acc.data(), D,
                                       [&](int64_t r, float* row) {
                                         if (p.dropout) p.drop_row(row, b, h, i0 + r, j0, cols, w.u.data());
                                       });
                        // acc += P V
                        gemm(p.blas, false, false, D, rows, cols, 1.f, vt, vld, w.s.data(), p.bk, 1.f, w.acc.data(), D);
                      });
  for (int64_t r = 0; r < rows; ++r) {
    const bool empty = w.l[r] == 0.f;
    float* o = out.at(b, h, i0 + r);
    std::copy(w.acc.begin() + r * D, w.acc.begin() + (r + 1) * D, o);
    vec::scale(o, D, empty ? 0.f : 1.f / w.l[r]);
    *lse.at(b, h, i0 + r) = empty ? kInf : w.m[r] + std::log(w.l[r]);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: one task per (batch, kv head) owns dK/dV of those keys and dQ of the query heads
// that share them (GQA), so no two threads write the same rows. Per tile, P is recomputed from
// lse and dS = P * (dP - Delta) with Delta = rowsum(dO * O).
//
// Delta must agree with the P and dP it is subtracted from: in exact arithmetic it equals
// sum_j P_ij dP_ij, and dS's row sums are zero. With fp16/bf16 inputs the saved O is rounded
// (relative error 2^-11 / 2^-8), so rowsum(dO * O) misses the fp32 sum by |dO||O| * 2^-11 / 2^-8;
// on a peaked row (one key takes nearly all the weight, dP_ij - Delta nearly cancels) that error
// dominates dq and dk (up to ~200x eager's error at L = 2, D = 16). So for 16-bit inputs the
// backward recomputes the fp32 output of each query block first (one more S and P V per tile;
// no extra memory, the dq scratch holds it; measured +11-23% backward time at B2 H12 L512 D64,
// +7% causal) and forms Delta from it; fp32 inputs use the saved O, which is that output already.

struct BwdScratch {
  std::vector<float> s, dp, dq, delta, lse, dk, dv, kt, vt;
  std::vector<uint16_t> u;  // dropout
  BwdScratch(const Tiles& t, int64_t Lk, int64_t D)
      : s(t.bq * t.bk), dp(t.bq * t.bk), dq(t.bq * D), delta(t.bq), lse(t.bq),
        dk(Lk * D), dv(Lk * D), kt(t.bk * D), vt(t.bk * D), u(drop_u16_size(t)) {}
};

struct BwdIO {
  Rows out, dout, dq, dk, dv;
  LseRows lse;
};

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

// Delta = rowsum(dO * O) for the query block's rows, O the fp32 output recomputed from lse
// (O = sum over visible tiles of P V, P = exp(S - lse)); w.dq holds O meanwhile.
void recomputed_delta(const Problem& p, const BwdIO& io, int64_t b, int64_t h, int64_t i0, int64_t rows,
                      BwdScratch& w) {
  const int64_t D = p.D;
  float* o = w.dq.data();
  std::fill(w.dq.begin(), w.dq.end(), 0.f);
  p.for_each_key_tile(b, h, i0, rows, w.kt.data(), w.vt.data(), w.s.data(),
                      [&](int64_t j0, int64_t cols, const float*, int64_t, const float* vt, int64_t vld) {
                        probs_from_lse(w.s.data(), p.bk, rows, cols, w.lse.data());
                        p.mask(w.s.data(), b, i0, rows, j0, cols, 0.f);
                        if (p.dropout) {  // O holds the dropout
                          for (int64_t r = 0; r < rows; ++r) {
                            p.drop_row(w.s.data() + r * p.bk, b, h, i0 + r, j0, cols, w.u.data());
                          }
                        }
                        gemm(p.blas, false, false, D, rows, cols, 1.f, vt, vld, w.s.data(), p.bk, 1.f, o, D);
                      });
  for (int64_t r = 0; r < rows; ++r) w.delta[r] = vec::dot(io.dout.at(b, h, i0 + r), o + r * D, D);
}

void bwd_query_block(const Problem& p, const BwdIO& io, int64_t b, int64_t h, int64_t qb, BwdScratch& w) {
  const int64_t D = p.D, i0 = qb * p.bq, rows = std::min(p.bq, p.lq(b) - i0);
  const float* q = p.q.at(b, h, i0);
  const float* dout = io.dout.at(b, h, i0);
  for (int64_t r = 0; r < rows; ++r) {
    w.delta[r] = vec::dot(io.dout.at(b, h, i0 + r), io.out.at(b, h, i0 + r), D);
    w.lse[r] = *io.lse.at(b, h, i0 + r);
  }
  if (p.fp32_delta) recomputed_delta(p, io, b, h, i0, rows, w);
  std::fill(w.dq.begin(), w.dq.end(), 0.f);
  float* s = w.s.data();
  float* dp = w.dp.data();
  p.for_each_key_tile(b, h, i0, rows, w.kt.data(), w.vt.data(), s, [&](int64_t j0, int64_t cols, const float* kt,
                                                                          int64_t kld, const float* vt, int64_t vld) {
    probs_from_lse(s, p.bk, rows, cols, w.lse.data());
    p.mask(s, b, i0, rows, j0, cols, 0.f);  // P = 0 exactly at hidden keys, even on a NaN row
    // dP = dO V^T, then dS = P * (dP - Delta), 0 at hidden keys. With dropout the forward's mask is
    // redrawn once per row, in the same pass: s becomes the dropped P and dP its gradient's.
    gemm(p.blas, true, false, cols, rows, D, 1.f, vt, vld, dout, io.dout.sl, 0.f, dp, p.bk);
    for (int64_t r = 0; r < rows; ++r) {
      if (p.dropout) {
        p.drop_grad_row(s + r * p.bk, dp + r * p.bk, b, h, i0 + r, j0, cols, w.delta[r], w.u.data());
      } else {
        softmax_grad_row(s + r * p.bk, dp + r * p.bk, cols, w.delta[r]);
      }
    }
    // dV += P^T dO (the dropped P with dropout)
    gemm(p.blas, false, true, D, cols, rows, 1.f, dout, io.dout.sl, s, p.bk, 1.f, w.dv.data() + j0 * D, D);
    p.mask(dp, b, i0, rows, j0, cols, 0.f);
    // dK += scale * dS^T Q ; dQ += scale * dS K
    gemm(p.blas, false, true, D, cols, rows, p.scale, q, p.q.sl, dp, p.bk, 1.f, w.dk.data() + j0 * D, D);
    gemm(p.blas, false, false, D, rows, cols, p.scale, kt, kld, dp, p.bk, 1.f, w.dq.data(), D);
  });
  for (int64_t r = 0; r < rows; ++r) std::copy(w.dq.begin() + r * D, w.dq.begin() + (r + 1) * D, io.dq.at(b, h, i0 + r));
}

void bwd_kv_head(const Problem& p, const BwdIO& io, int64_t b, int64_t hk, BwdScratch& w) {
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);
  const int64_t group = p.H / p.Hkv;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t qb = 0; qb < p.nqb(b); ++qb) bwd_query_block(p, io, b, h, qb, w);
  }
  // A padded key's gradients are exactly zero (a NaN query row would give it 0 * NaN).
  const uint8_t* keep = p.plan->keep.empty() ? nullptr : p.plan->keep.data() + b * p.Lk;
  for (int64_t j = 0; j < p.lk(b); ++j) {
    if (keep && !keep[j]) {
      std::fill(io.dk.at(b, hk, j), io.dk.at(b, hk, j) + p.D, 0.f);
      std::fill(io.dv.at(b, hk, j), io.dv.at(b, hk, j) + p.D, 0.f);
      continue;
    }
    std::copy(w.dk.begin() + j * p.D, w.dk.begin() + (j + 1) * p.D, io.dk.at(b, hk, j));
    std::copy(w.dv.begin() + j * p.D, w.dv.begin() + (j + 1) * p.D, io.dv.at(b, hk, j));
  }
}

Problem make_problem(const at::Tensor& qf, const at::Tensor& kf, const at::Tensor& vf, const KeyPlan& plan,
                     const Tiles& tiles, bool causal, float scale) {
  Problem p;
  p.bq = tiles.bq;
  p.bk = tiles.bk;
  p.B = qf.size(0);
  p.H = qf.size(1);
  p.Hkv = kf.size(1);
  p.Lq = qf.size(2);
  p.Lk = kf.size(2);
  p.D = qf.size(3);
  p.causal = causal;
  p.blas = blas_enabled();
  p.scale = scale;
  p.q = rows_of(qf);
  p.k = rows_of(kf);
  p.v = rows_of(vf);
  p.plan = &plan;
  return p;
}

void set_dropout(Problem& p, double dropout_p, int64_t seed) {
  if (dropout_p <= 0.0) return;
  p.dropout = true;
  p.seed = static_cast<uint64_t>(seed);  // a signed int64's bit pattern
  p.drop_threshold = ::forkattn::kernels::dropout_threshold16(dropout_p);
  p.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  TORCH_INTERNAL_ASSERT(p.bk % 8 == 0, "dropout needs key tiles of whole Philox blocks");
}

// Varlen: sequence b is rows cu[b]..cu[b+1] of the packed operands. The host reads cu_seqlens
// (CPU tensors) once; q and k rows then index through Rows::start.
void set_varlen(Problem& p, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_q,
                int64_t max_k) {
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  const int* a = cq.data_ptr<int>();
  const int* c = ck.data_ptr<int>();
  p.B = cq.numel() - 1;
  p.Lq = max_q;
  p.Lk = max_k;
  for (int64_t b = 0; b < p.B; ++b) {
    p.q_start.push_back(a[b]);
    p.len_q.push_back(a[b + 1] - a[b]);
    p.k_start.push_back(c[b]);
    p.len_k.push_back(c[b + 1] - c[b]);
  }
  for (Rows* r : {&p.q, &p.k, &p.v}) r->sb = 0;
  p.q.start = p.q_start.data();
  p.k.start = p.v.start = p.k_start.data();
}

// Output-side rows of a [B, H, L, D] (or varlen [1, H, total, D]) tensor indexed like q or k.
Rows io_rows(const at::Tensor& f, const Problem& p, bool like_q) {
  Rows r = rows_of(f);
  if (!p.len_q.empty()) {
    r.sb = 0;
    r.start = like_q ? p.q_start.data() : p.k_start.data();
  }
  return r;
}

// lse: padded [B, H, Lq]; varlen [H, total_q].
LseRows lse_rows(const at::Tensor& lse, const Problem& p) {
  float* d = lse.data_ptr<float>();
  if (p.len_q.empty()) return {d, lse.stride(0), lse.stride(1), lse.stride(2)};
  return {d, 0, lse.stride(0), lse.stride(1), p.q_start.data()};
}

void run_fwd(const Problem& p, const Tiles& tiles, at::Tensor& out, const at::Tensor& lse) {
  at::Tensor out_f = f32_output(out);
  const Rows out_rows = io_rows(out_f, p, true);
  const LseRows lr = lse_rows(lse, p);
  const int64_t nqb = p.nqb(), bh = p.B * p.H;
  // Largest query blocks (the last ones, under causal) first.
  run_tasks(
      bh * nqb, [&] { return FwdScratch(tiles, p.D); },
      [&](int64_t t, FwdScratch& w) {
        const int64_t qb = nqb - 1 - t / bh, b = (t % bh) / p.H, h = t % p.H;
        fwd_query_block(p, b, h, qb, out_rows, lr, w);
      });
  finish_output(out, out_f);
}

void run_bwd(const Problem& p, const Tiles& tiles, const at::Tensor& of, const at::Tensor& dof, const at::Tensor& lse,
             at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  at::Tensor dq_f = f32_output(dq), dk_f = f32_output(dk), dv_f = f32_output(dv);
  BwdIO io{io_rows(of, p, true), io_rows(dof, p, true), io_rows(dq_f, p, true), io_rows(dk_f, p, false),
           io_rows(dv_f, p, false), lse_rows(lse, p)};
  run_tasks(
      p.B * p.Hkv, [&] { return BwdScratch(tiles, p.Lk, p.D); },
      [&](int64_t t, BwdScratch& w) { bwd_kv_head(p, io, t / p.Hkv, t % p.Hkv, w); });
  finish_output(dq, dq_f);
  finish_output(dk, dk_f);
  finish_output(dv, dv_f);
}

}  // namespace

void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_padding_mask, bool causal, float scale,
                          double dropout_p, int64_t seed, at::Tensor& out, at::Tensor& lse) {
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v);
  const Tiles tiles = choose_tiles(q.size(0) * q.size(1), q.size(2));
  const KeyPlan plan = plan_keys(key_padding_mask, q.size(0), k.size(2), tiles.bk);
  Problem p = make_problem(qf, kf, vf, plan, tiles, causal, scale);
  set_dropout(p, dropout_p, seed);
  run_fwd(p, tiles, out, lse);
}

void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          const std::optional<at::Tensor>& key_padding_mask, bool causal, float scale,
                          double dropout_p, int64_t seed, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), of = as_f32(out), dof = as_f32(dout);
  const Tiles tiles = choose_tiles(q.size(0) * q.size(1), q.size(2));
  const KeyPlan plan = plan_keys(key_padding_mask, q.size(0), k.size(2), tiles.bk);
  Problem p = make_problem(qf, kf, vf, plan, tiles, causal, scale);
  p.fp32_delta = fp32_delta_enabled(q);
  set_dropout(p, dropout_p, seed);
  run_bwd(p, tiles, of, dof, lse, dq, dk, dv);
}

void attention_varlen_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, bool causal, float scale, double dropout_p, int64_t seed,
                                 at::Tensor& out, at::Tensor& lse) {
  const at::Tensor qf = as_f32(packed_as_bhld(q)), kf = as_f32(packed_as_bhld(k)), vf = as_f32(packed_as_bhld(v));
  const Tiles tiles = choose_tiles((cu_seqlens_q.numel() - 1) * q.size(1), max_seqlen_q);
  const KeyPlan plan = plan_keys(std::nullopt, 1, max_seqlen_k, tiles.bk);
  Problem p = make_problem(qf, kf, vf, plan, tiles, causal, scale);
  set_varlen(p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  set_dropout(p, dropout_p, seed);
  at::Tensor out4 = packed_as_bhld(out);
  run_fwd(p, tiles, out4, lse);
}

void attention_varlen_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, bool causal, float scale, double dropout_p, int64_t seed,
                                 at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const at::Tensor qf = as_f32(packed_as_bhld(q)), kf = as_f32(packed_as_bhld(k)), vf = as_f32(packed_as_bhld(v));
  const at::Tensor of = as_f32(packed_as_bhld(out)), dof = as_f32(packed_as_bhld(dout));
  const Tiles tiles = choose_tiles((cu_seqlens_q.numel() - 1) * q.size(1), max_seqlen_q);
  const KeyPlan plan = plan_keys(std::nullopt, 1, max_seqlen_k, tiles.bk);
  Problem p = make_problem(qf, kf, vf, plan, tiles, causal, scale);
  set_varlen(p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  p.fp32_delta = fp32_delta_enabled(q);
  set_dropout(p, dropout_p, seed);
  at::Tensor dq4 = packed_as_bhld(dq), dk4 = packed_as_bhld(dk), dv4 = packed_as_bhld(dv);
  run_bwd(p, tiles, of, dof, lse, dq4, dk4, dv4);
}

}  // namespace cpu
}  // namespace forkattn
