// CPU kernels of DeBERTa's disentangled attention: attention_cpu.cpp's blocked online softmax with
// two relative-position terms added to each tile of scores, forward and backward.
//
//   s[i, j] = scale * (q_i . k_j + [c2p] q_i . pos_key[delta(i, j)] + [p2c] k_j . pos_query[delta(i, j)])
//
// with delta(i, j) = rel_index[i - j + Lk - 1]. The position rows are few (2 * span), so the products
// are formed against them and gathered, never as Lq x Lk matrices: per query block (rows i0..) once,
// qp[r, w] = scale * q_i . pos_key[lo_q + w] over the rows [lo_q, hi_q] the block's queries read; per
// key tile (cols j0..) of that block, kp[c, w] = scale * k_j . pos_query[lo_k + w] over the rows the
// tile reads (a band of rows + cols - 1 distances i - j, fewer rows where the log buckets or the clamp
// merge distances). The tile's scores then gather qp[r, delta - lo_q] and kp[c, delta - lo_k] along its
// diagonals (AVX2 gathers). The backward recomputes P from lse and scatters dS back into the same
// places: dqp (per query block) gives dq += scale * dqp . pos_key and dpos_key += scale * dqp^T q; dkp
// (per tile) gives dk += scale * dkp . pos_query and dpos_query += scale * dkp^T k.
//
// Scheduling: the forward runs one task per (batch, head, query block). The backward runs one task
// per (head, chunk of the batch): it owns dK / dV of its keys and a private dpos_key / dpos_query
// partial, and the partials are summed in chunk order afterwards, so the gradients into the position
// embeddings do not depend on which thread ran what.
//
// Dropout (dropout_p > 0) is attention_cpu.cpp's, from cpu/dropout_cpu.h: the mask of (b, h, i, j) that
// plain attention draws for the same seed and shapes, applied to P after the online softmax's row sums
// (the lse stays the undropped softmax's); the backward redraws it per tile row.
//
// Padding, NaN and empty rows as in attention_cpu.cpp: padded K/V rows of a mixed block are read as
// zeros, hidden scores are selected to -inf, padded keys get exactly zero gradients, a row that sees
// no key gets out = 0, lse = +inf and zero gradients.

#include "cpu/vec.h"  // first: it sets at::vec's ISA before any ATen header

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <utility>
#include <vector>

#include "cpu/dropout_cpu.h"  // attention_cpu.cpp's Philox mask of a tile row
#include "cpu/tiles.h"
#include "disentangled.h"

namespace forkattn {
namespace cpu::CPU_CAPABILITY {  // one copy per ISA variant: cpu/isa.h
namespace {

using IVec = at::vec::Vectorized<int32_t>;

// [H, rows, D] position embeddings as fp32 rows (head stride 0 when shared); BLAS needs ld >= D.
at::Tensor pos_f32(const at::Tensor& t) {
  if (!t.defined()) return t;
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  if (f.size(1) > 1 && f.stride(1) < f.size(2)) f = f.contiguous();
  return f;
}

Rows pos_rows(const at::Tensor& f) {
  if (!f.defined()) return {nullptr, 0, 0, 0};
  return {f.data_ptr<float>(), 0, f.stride(0), f.size(1) > 1 ? f.stride(1) : f.size(2)};
}

// Position rows transposed once per call into `buf`, [H, D, rows] (*out: p.at(0, h, d)): B of qp = q . pos_key^T
// and kp = k . pos_query^T, read in place (transposing each chunk's band instead was 7% of the L512 forward).
// `buf` is the calling thread's and kept across calls: a fresh 3 MB buffer cost ~900 page faults (1.2 ms) a call.
// Row stride rows + 16: with a power of two (512) the rows of a k-panel share two L1 sets.
void pos_transposed(const Rows& src, int64_t H, int64_t rows, int64_t D, std::vector<float>& buf, Rows* out) {
  if (!src.p) return;
  const int64_t ld = rows + 16;
  if (static_cast<int64_t>(buf.size()) < H * D * ld) buf.resize(H * D * ld);
  *out = {buf.data(), 0, D * ld, ld};
  for (int64_t h = 0; h < H; ++h) transpose_rows(src.at(0, h, 0), src.sl, rows, D, out->at(0, h, 0), ld);
}

struct Problem {
  int64_t B, H, Lq, Lk, D, bq, bk;
  bool c2p, p2c;
  TileGemm gemm_path;  // tiles.h: the plain loop, MKL or our own (AVX2 / AVX512)
  bool fp32_delta = false;  // backward: Delta from a recomputed fp32 output (fp16/bf16 inputs)
  float scale;
  Rows q, k, v, pk, pq;     // pk / pq: [H, rows, D] (p.at(0, h, row))
  Rows pkt, pqt;            // the same transposed, [H, D, rows] (p.at(0, h, d)): pos_transposed
  const int64_t* table;     // rel_index [Lq + Lk - 1]
  const KeyPlan* plan;
  DropoutParams drop;       // the mask of (b, h, i, j): the plain attention's for the same seed and shapes

  int64_t nqb() const { return (Lq + bq - 1) / bq; }
  // (min, max) of table[a, a + n)
  std::pair<int64_t, int64_t> table_range(int64_t a, int64_t n) const {
    const auto [lo, hi] = std::minmax_element(table + a, table + a + n);
    return {*lo, *hi};
  }
};

// Per-thread buffers of the relative terms of one query block and one of its key tiles.
// The positional products are formed in chunks of kChunk query rows (qp) or key columns (kp): a
// chunk reads only chunk + keys - 1 (or chunk + queries - 1) position rows, where the whole block
// reads rows + keys - 1, so the products no row uses shrink from (rows - 1) / keys of the useful
// ones to (kChunk - 1) / keys (at L128 with 128 x 128 tiles: from 0.99 to 0.24; kp likewise per query).
// A tuning constant: 32 and 64 measured alike (1 thread, B4 L128 and B1 L512); 32 wastes less at L128.
constexpr int64_t kChunk = 32;

// How the relative terms of an 8 x 8 block of a tile are read (for_blocks).
enum BlockKind { kGather, kNear, kRun };

// Position rows [lo, lo + w) a chunk reads; its products sit in the block's buffer at column lo - block lo.
struct Band {
  int64_t lo, w;
};

struct Terms {
  static constexpr int64_t kPad = 8;  // a window load of 8 from a row's last entry stays inside qp / kp
  std::vector<float> qp, kp;  // qp [bq, wq], kp [bk, wk]; the backward's dqp / dkp have the same shapes
  std::vector<int32_t> iq, ik;  // [bq + bk - 1]: delta - lo_q, delta - lo_k along the tile's diagonals
  // run[x]: how many entries from x on step down by exactly 1 (i*[x + t] == i*[x] - t): where a run
  // covers a block of the tile, the terms are contiguous slices of qp / kp rows (no gathers).
  // near[x]: how many step down by 0 or 1 (the log buckets: a bucket spans one or more distances);
  // there the 8 terms of a block's row (column) lie in 8 consecutive entries of qp (kp): one load and
  // a lane permute instead of a gather.
  std::vector<int32_t> run, near;
  std::vector<Band> qband, kband;  // per chunk of query rows / key columns
  int64_t lo_q = 0, wq = 0, lo_k = 0, wk = 0;
  bool have_qp = false;  // qp computed for the current query block (done at its first visible tile)

  Terms(const Problem& p, int64_t rows_cap)
      : qp(p.c2p ? p.bq * std::min(rows_cap, p.bq + p.Lk - 1) + kPad : 0),
        kp(p.p2c ? p.bk * std::min(rows_cap, p.bq + p.bk - 1) + kPad : 0),
        iq(p.c2p ? p.bq + p.bk - 1 : 0),
        ik(p.p2c ? p.bq + p.bk - 1 : 0),
        run(p.bq + p.bk - 1),
        near(p.bq + p.bk - 1),
        qband((p.bq + kChunk - 1) / kChunk),
        kband((p.bk + kChunk - 1) / kChunk) {}
};

// qp = scale * Q_block . pos_key[lo_q .. hi_q]^T over the rows the block's queries read (every key).
void query_terms(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t rows, Terms& t) {
  t.have_qp = true;
  if (!p.c2p) return;
  const auto [lo, hi] = p.table_range(i0, rows + p.Lk - 1);
  t.lo_q = lo;
  t.wq = hi - lo + 1;
  for (int64_t r0 = 0, c = 0; r0 < rows; r0 += kChunk, ++c) {  // rows r0.. read table[i0 + r0, + n + Lk - 1)
    const int64_t n = std::min(kChunk, rows - r0);
    const auto [clo, chi] = p.table_range(i0 + r0, n + p.Lk - 1);
    t.qband[c] = {clo, chi - clo + 1};
    mm_ab(p.gemm_path, n, chi - clo + 1, p.D, p.scale, p.q.at(b, h, i0 + r0), p.q.sl, p.pkt.at(0, h, 0) + clo,
          p.pkt.sl, 0.f, t.qp.data() + r0 * t.wq + (clo - lo), t.wq);
  }
}

// The tile (rows from i0, cols from j0) reads table[base + m], m in [0, rows + cols - 1), base =
// i0 - j0 - (cols - 1) + Lk - 1; row r's column c reads m = (cols - 1) + r - c. Stored reversed
// (i*[n - 1 - m]) so that row r's columns read i*[rows - 1 - r + c], c = 0, 1, ...: one window.
// p2c: also kp = scale * K_tile . pos_query[lo_k .. hi_k]^T.
void tile_terms(const Problem& p, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols, const float* kt,
                int64_t kld, Terms& t) {
  const int64_t n = rows + cols - 1, base = i0 - j0 - (cols - 1) + p.Lk - 1;
  const int64_t* tab = p.table + base;
  if (p.c2p) {
    for (int64_t m = 0; m < n; ++m) t.iq[n - 1 - m] = static_cast<int32_t>(tab[m] - t.lo_q);
  }
  // x = n - 1 - m: i*[x + 1] == i*[x] - 1 exactly when tab[m - 1] == tab[m] - 1
  t.run[n - 1] = t.near[n - 1] = 1;
  for (int64_t x = n - 2; x >= 0; --x) {
    const int64_t m = n - 1 - x, step = tab[m] - tab[m - 1];
    t.run[x] = step == 1 ? t.run[x + 1] + 1 : 1;
    t.near[x] = step == 0 || step == 1 ? t.near[x + 1] + 1 : 1;
  }
  if (p.p2c) {
    const auto [lo, hi] = p.table_range(base, n);
    t.lo_k = lo;
    t.wk = hi - lo + 1;
    for (int64_t m = 0; m < n; ++m) t.ik[n - 1 - m] = static_cast<int32_t>(tab[m] - lo);
    // columns c0.. (cc of them) read tab[cols - c0 - cc, + rows + cc - 1)
    for (int64_t c0 = 0, c = 0; c0 < cols; c0 += kChunk, ++c) {
      const int64_t cc = std::min(kChunk, cols - c0);
      const auto [clo, chi] = p.table_range(base + cols - c0 - cc, rows + cc - 1);
      t.kband[c] = {clo, chi - clo + 1};
      mm_ab(p.gemm_path, cc, chi - clo + 1, p.D, p.scale, kt + c0 * kld, kld, p.pqt.at(0, h, 0) + clo, p.pqt.sl, 0.f,
            t.kp.data() + c0 * t.wk + (clo - lo), t.wk);
    }
  }
}

// s[r, c] += qp[r, iq[rows - 1 - r + c]] + kp[c, ik[rows - 1 - r + c]] for row r, columns [ca, cb): gathers.
void add_span(const Problem& p, float* s, int64_t rows, int64_t r, int64_t ca, int64_t cb, const Terms& t) {
  constexpr int64_t W = vec::kWidth;
  const IVec kstep = IVec::arange(0, static_cast<int32_t>(t.wk));  // column c's row of kp starts at c * wk
  float* row = s + r * p.bk;
  const float* qrow = p.c2p ? t.qp.data() + r * t.wq : nullptr;
  const int32_t* iq = p.c2p ? t.iq.data() + (rows - 1 - r) : nullptr;
  const int32_t* ik = p.p2c ? t.ik.data() + (rows - 1 - r) : nullptr;
  int64_t c = ca;
  for (; c + W <= cb; c += W) {
    vec::Vec x = vec::Vec::loadu(row + c);
    if (p.c2p) x = x + at::vec::gather<4>(qrow, IVec::loadu(iq + c));
    if (p.p2c) {
      const IVec idx = IVec::loadu(ik + c) + kstep + IVec(static_cast<int32_t>(c * t.wk));
      x = x + at::vec::gather<4>(t.kp.data(), idx);
    }
    x.store(row + c);
  }
  for (; c < cb; ++c) {
    if (p.c2p) row[c] += qrow[iq[c]];
    if (p.p2c) row[c] += t.kp[c * t.wk + ik[c]];
  }
}

// The backward of add_span: dqp[r, iq[..]] += ds[r, c], dkp[c, ik[..]] += ds[r, c].
void scatter_span(const Problem& p, const float* ds, int64_t rows, int64_t r, int64_t ca, int64_t cb, const Terms& t,
                  float* dqp, float* dkp) {
  const float* row = ds + r * p.bk;
  if (p.c2p) {
    float* d = dqp + r * t.wq;
    const int32_t* iq = t.iq.data() + (rows - 1 - r);
    for (int64_t c = ca; c < cb; ++c) d[iq[c]] += row[c];
  }
  if (p.p2c) {
    const int32_t* ik = t.ik.data() + (rows - 1 - r);
    for (int64_t c = ca; c < cb; ++c) dkp[c * t.wk + ik[c]] += row[c];
  }
}

#if defined(__AVX2__)
// 8 x 8 blocks of the tile whose 15 diagonals lie on one run (every entry one position row further
// than its right neighbour's, as where the buckets are the identity): along a row the c2p terms are a
// reversed slice of that row of qp, and down a column the p2c terms are a slice of that column's row
// of kp, so both are plain loads (the p2c block transposed in registers) instead of gathers.
inline __m256 reversed(__m256 v) { return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)); }

inline void transpose8(__m256 v[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  v[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  v[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  v[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  v[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Rows r0.. and columns c0.. of the tile: row r0 + u reads qp at iq[x0 - u + v] for column c0 + v,
// and column c0 + v reads kp at ik[x0 + v - u] for row r0 + u (x0 = rows - 1 - r0 + c0). On a run
// (`run`) those are iq[x0 - u] - v and ik[x0 + v] + u: plain loads. Elsewhere (the log buckets) the
// gathers go along a row of qp and down a column of the tile, i.e. along one row of kp (one or two
// cache lines each, where a gather along a row of the tile reads 8 rows of kp), then transposed.
inline __m256i reversed_idx(const int32_t* x) {
  return _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)),
                                     _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0));
}

// kind kRun: plain loads; kNear: the 8 entries lie in qp[row, base .. base + 7] (base the smallest
// index), so one load and a lane permute by index - base; kGather: AVX2 gathers.
void add_block8(const Problem& p, float* s, int64_t rows, int64_t r0, int64_t c0, const Terms& t, BlockKind kind) {
  const int64_t x0 = rows - 1 - r0 + c0;
  __m256 kv[8] = {};  // read only when p.p2c (initialised: GCC cannot see that)
  if (p.p2c) {
    for (int64_t v = 0; v < 8; ++v) {
      const float* krow = t.kp.data() + (c0 + v) * t.wk;
      if (kind == kRun) {
        kv[v] = _mm256_loadu_ps(krow + t.ik[x0 + v]);
      } else if (kind == kNear) {  // u: ik[x0 + v - u], the smallest at u = 0
        const int32_t base = t.ik[x0 + v];
        const __m256i off = _mm256_sub_epi32(reversed_idx(t.ik.data() + x0 + v - 7), _mm256_set1_epi32(base));
        kv[v] = _mm256_permutevar8x32_ps(_mm256_loadu_ps(krow + base), off);
      } else {
        kv[v] = _mm256_i32gather_ps(krow, reversed_idx(t.ik.data() + x0 + v - 7), 4);
      }
    }
    transpose8(kv);
  }
  for (int64_t u = 0; u < 8; ++u) {
    float* row = s + (r0 + u) * p.bk + c0;
    __m256 x = _mm256_loadu_ps(row);
    if (p.c2p) {
      const float* qrow = t.qp.data() + (r0 + u) * t.wq;
      const int32_t* iq = t.iq.data() + x0 - u;  // column v: iq[v], the smallest at v = 7
      const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(iq));
      __m256 y;
      if (kind == kRun) {
        y = reversed(_mm256_loadu_ps(qrow + iq[0] - 7));
      } else if (kind == kNear) {
        y = _mm256_permutevar8x32_ps(_mm256_loadu_ps(qrow + iq[7]), _mm256_sub_epi32(idx, _mm256_set1_epi32(iq[7])));
      } else {
        y = _mm256_i32gather_ps(qrow, idx, 4);
      }
      x = _mm256_add_ps(x, y);
    }
    if (p.p2c) x = _mm256_add_ps(x, kv[u]);
    _mm256_storeu_ps(row, x);
  }
}

void scatter_block8(const Problem& p, const float* ds, int64_t rows, int64_t r0, int64_t c0, const Terms& t,
                    float* dqp, float* dkp, BlockKind kind) {
  const bool run = kind == kRun;
  const int64_t x0 = rows - 1 - r0 + c0;
  __m256 dv[8];
  for (int64_t u = 0; u < 8; ++u) {
    const float* row = ds + (r0 + u) * p.bk + c0;
    dv[u] = _mm256_loadu_ps(row);
    if (!p.c2p) continue;
    const int32_t* iq = t.iq.data() + x0 - u;
    float* d = dqp + (r0 + u) * t.wq;
    if (run) {
      d += iq[0] - 7;
      _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), reversed(dv[u])));
    } else {
      for (int64_t v = 0; v < 8; ++v) d[iq[v]] += row[v];
    }
  }
  if (!p.p2c) return;
  transpose8(dv);
  for (int64_t v = 0; v < 8; ++v) {
    float* d = dkp + (c0 + v) * t.wk;
    if (run) {
      d += t.ik[x0 + v];
      _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), dv[v]));
    } else {
      alignas(32) float col[8];
      _mm256_store_ps(col, dv[v]);
      for (int64_t u = 0; u < 8; ++u) d[t.ik[x0 + v - u]] += col[u];
    }
  }
}
#endif

// Runs blk(r0, c0, kind) on the full 8 x 8 blocks of the tile (AVX2 builds; kind: whether the block's
// 15 diagonals lie on one run of the table, or on steps of 0 or 1) and span(r, ca, cb) on the rest.
template <class Block, class Span>
void for_blocks(int64_t rows, int64_t cols, const Terms& t, const Block& blk, const Span& span) {
  int64_t r0 = 0;
#if defined(__AVX2__)
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) {  // diagonals x0 - 7 .. x0 + 7
      const int64_t x = rows - 8 - r0 + c0;
      blk(r0, c0, t.run[x] >= 15 ? kRun : t.near[x] >= 15 ? kNear : kGather);
    }
    if (c0 < cols) {
      for (int64_t u = 0; u < 8; ++u) span(r0 + u, c0, cols);
    }
  }
#else
  (void)t;
  (void)blk;
#endif
  for (; r0 < rows; ++r0) span(r0, 0, cols);
}

void add_terms(const Problem& p, float* s, int64_t rows, int64_t cols, const Terms& t) {
  for_blocks(
      rows, cols, t,
      [&](int64_t r0, int64_t c0, BlockKind kind) {
#if defined(__AVX2__)
        add_block8(p, s, rows, r0, c0, t, kind);
#endif
      },
      [&](int64_t r, int64_t ca, int64_t cb) { add_span(p, s, rows, r, ca, cb, t); });
}

// The backward of add_terms: dqp[r, iq[..]] += ds[r, c] (dqp in t.qp's shape) and dkp[c, ik[..]] +=
// ds[r, c] (dkp in t.kp's shape, zeroed here over the bands its chunks read).
void scatter_terms(const Problem& p, const float* ds, int64_t rows, int64_t cols, const Terms& t, float* dqp,
                   float* dkp) {
  if (p.p2c) {
    for (int64_t c0 = 0, c = 0; c0 < cols; c0 += kChunk, ++c) {
      const Band band = t.kband[c];
      for (int64_t j = c0; j < std::min(cols, c0 + kChunk); ++j) {
        float* d = dkp + j * t.wk + (band.lo - t.lo_k);
        std::fill(d, d + band.w, 0.f);
      }
    }
  }
  for_blocks(
      rows, cols, t,
      [&](int64_t r0, int64_t c0, BlockKind kind) {
#if defined(__AVX2__)
        scatter_block8(p, ds, rows, r0, c0, t, dqp, dkp, kind);
#endif
      },
      [&](int64_t r, int64_t ca, int64_t cb) { scatter_span(p, ds, rows, r, ca, cb, t, dqp, dkp); });
}

// The key tiles query rows [i0, i0 + rows) of (b, h) see, skipped blocks left out: for each, the tile's
// scores S (hidden keys -inf) go to s and fn(j0, cols, kt, kld, vt, vld) runs with its K and V rows
// (in kscratch / vscratch for a mixed block). Computes t's query-block terms at the first visible tile.
template <class Fn>
void for_each_key_tile(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t rows, float* kscratch,
                       float* vscratch, float* s, Terms& t, const Fn& fn) {
  t.have_qp = false;
  const float* q = p.q.at(b, h, i0);
  for (int64_t j0 = 0; j0 < p.Lk; j0 += p.bk) {
    const int64_t cols = std::min(p.bk, p.Lk - j0);
    const BlockState state = p.plan->at(b, j0 / p.bk);
    if (state == kSkip) continue;
    if (!t.have_qp) query_terms(p, b, h, i0, rows, t);
    int64_t kld, vld;
    const float* kt = key_tile(p.k, *p.plan, b, h, j0, cols, p.bk, p.Lk, p.D, kscratch, &kld);
    const float* vt = key_tile(p.v, *p.plan, b, h, j0, cols, p.bk, p.Lk, p.D, vscratch, &vld);
    mm_abt(p.gemm_path, rows, cols, p.D, p.scale, q, p.q.sl, kt, kld, 0.f, s, p.bk);
    if (p.c2p || p.p2c) {
      tile_terms(p, h, i0, rows, j0, cols, kt, kld, t);
      add_terms(p, s, rows, cols, t);
    }
    if (state == kMixed) {
      mask_tile(s, p.bk, rows, cols, p.plan->keep.data() + b * p.Lk + j0, false, 0, 0, 0, -kInf);
    }
    fn(j0, cols, kt, kld, vt, vld);
  }
}

// P (from S - lse, rows with lse = +inf zero) with hidden keys exactly 0, even on a NaN row.
void tile_probs(const Problem& p, float* s, int64_t b, int64_t rows, int64_t j0, int64_t cols, const float* lse) {
  probs_from_lse(s, p.bk, rows, cols, lse);
  if (p.plan->at(b, j0 / p.bk) == kMixed) {
    mask_tile(s, p.bk, rows, cols, p.plan->keep.data() + b * p.Lk + j0, false, 0, 0, 0, 0.f);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

struct FwdScratch {
  std::vector<float> s, acc, m, l, kt, vt;
  std::vector<uint16_t> u;  // dropout: the u16 of one tile row
  Terms t;
  FwdScratch(const Problem& p, int64_t pos_rows)
      : s(p.bq * p.bk), acc(p.bq * p.D), m(p.bq), l(p.bq), kt(p.bk * p.D), vt(p.bk * p.D),
        u(p.drop.on ? dropout_u16_size(p.bk) : 0), t(p, pos_rows) {}
};

// Dropout of row i of a tile (keys j0 .. j0 + cols) of P: kept entries scaled, dropped ones and keys
// past the block's last visible one zeroed.
void drop_row(const Problem& p, float* row, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols, uint16_t* u) {
  const int64_t n = p.plan->end(b, j0 / p.bk, cols);
  dropout_u16(p.drop.seed, static_cast<uint32_t>(b * p.H + h), static_cast<uint32_t>(i), j0, n, u);
  dropout_apply_row(p.drop, row, n, cols, u);
}

void fwd_query_block(const Problem& p, int64_t b, int64_t h, int64_t qb, const Rows& out, const LseRows& lse,
                     FwdScratch& w) {
  const int64_t D = p.D, i0 = qb * p.bq, rows = std::min(p.bq, p.Lq - i0);
  std::fill(w.m.begin(), w.m.end(), -kInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  for_each_key_tile(p, b, h, i0, rows, w.kt.data(), w.vt.data(), w.s.data(), w.t,
                    [&](int64_t j0, int64_t cols, const float*, int64_t, const float* vt, int64_t vld) {
                      if (p.drop.on) {  // dropout after l: the lse is the undropped softmax's
                        online_softmax(w.s.data(), p.bk, rows, cols, w.m.data(), w.l.data(), w.acc.data(), D,
                                       [&](int64_t r, float* row) { drop_row(p, row, b, h, i0 + r, j0, cols, w.u.data()); });
                      } else {
                        online_softmax(w.s.data(), p.bk, rows, cols, w.m.data(), w.l.data(), w.acc.data(), D);
                      }
                      mm_ab(p.gemm_path, rows, D, cols, 1.f, w.s.data(), p.bk, vt, vld, 1.f, w.acc.data(), D);  // acc += P V
                    });
  store_block(w.acc.data(), w.m.data(), w.l.data(), rows, D, out, lse, b, h, i0);
}

// ---------------------------------------------------------------------------------------------
// Backward (see attention_cpu.cpp for Delta and why 16-bit inputs recompute the fp32 output for it).

struct BwdScratch {
  std::vector<float> s, dp, dq, delta, lse, dk, dv, kt, vt, dqp, dkp;
  std::vector<uint16_t> u;  // dropout
  Terms t;
  BwdScratch(const Problem& p, int64_t pos_rows)
      : s(p.bq * p.bk), dp(p.bq * p.bk), dq(p.bq * p.D), delta(p.bq), lse(p.bq), dk(p.Lk * p.D), dv(p.Lk * p.D),
        kt(p.bk * p.D), vt(p.bk * p.D), u(p.drop.on ? dropout_u16_size(p.bk) : 0), t(p, pos_rows) {
    dqp.resize(t.qp.size());
    dkp.resize(t.kp.size());
  }
};

struct BwdIO {
  Rows out, dout, dq, dk, dv;
  LseRows lse;
  float* dpk;  // this task's dpos_key partial [H, rows, D] (nullptr when c2p is off)
  float* dpq;  // dpos_query partial
  int64_t pos_rows;
};

void bwd_query_block(const Problem& p, const BwdIO& io, int64_t b, int64_t h, int64_t qb, BwdScratch& w) {
  const int64_t D = p.D, i0 = qb * p.bq, rows = std::min(p.bq, p.Lq - i0);
  const float* q = p.q.at(b, h, i0);
  const float* dout = io.dout.at(b, h, i0);
  const float scale = p.scale;
  for (int64_t r = 0; r < rows; ++r) {
    w.delta[r] = vec::dot(io.dout.at(b, h, i0 + r), io.out.at(b, h, i0 + r), D);
    w.lse[r] = *io.lse.at(b, h, i0 + r);
  }
  float* s = w.s.data();
  if (p.fp32_delta) {  // O recomputed in fp32 (in w.dq), Delta = rowsum(dO * O)
    std::fill(w.dq.begin(), w.dq.end(), 0.f);
    for_each_key_tile(p, b, h, i0, rows, w.kt.data(), w.vt.data(), s, w.t,
                      [&](int64_t j0, int64_t cols, const float*, int64_t, const float* vt, int64_t vld) {
                        tile_probs(p, s, b, rows, j0, cols, w.lse.data());
                        if (p.drop.on) {  // O holds the dropout
                          for (int64_t r = 0; r < rows; ++r) drop_row(p, s + r * p.bk, b, h, i0 + r, j0, cols, w.u.data());
                        }
                        mm_ab(p.gemm_path, rows, D, cols, 1.f, s, p.bk, vt, vld, 1.f, w.dq.data(), D);
                      });
    for (int64_t r = 0; r < rows; ++r) w.delta[r] = vec::dot(io.dout.at(b, h, i0 + r), w.dq.data() + r * D, D);
  }
  std::fill(w.dq.begin(), w.dq.end(), 0.f);
  std::fill(w.dqp.begin(), w.dqp.end(), 0.f);
  float* dp = w.dp.data();
  for_each_key_tile(p, b, h, i0, rows, w.kt.data(), w.vt.data(), s, w.t, [&](int64_t j0, int64_t cols,
                                                                           const float* kt, int64_t kld,
                                                                           const float* vt, int64_t vld) {
    tile_probs(p, s, b, rows, j0, cols, w.lse.data());
    mm_abt(p.gemm_path, rows, cols, D, 1.f, dout, io.dout.sl, vt, vld, 0.f, dp, p.bk);  // dP = dO V^T
    if (p.drop.on) {  // the forward's mask redrawn per row: s becomes the dropped P and dp dS
      const int64_t n = p.plan->end(b, j0 / p.bk, cols);
      for (int64_t r = 0; r < rows; ++r) {
        dropout_u16(p.drop.seed, static_cast<uint32_t>(b * p.H + h), static_cast<uint32_t>(i0 + r), j0, n, w.u.data());
        dropout_grad_row(p.drop, s + r * p.bk, dp + r * p.bk, n, cols, w.delta[r], w.u.data());
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) softmax_grad_row(s + r * p.bk, dp + r * p.bk, cols, w.delta[r]);
    }
    mm_atb(p.gemm_path, cols, D, rows, 1.f, s, p.bk, dout, io.dout.sl, 1.f, w.dv.data() + j0 * D, D);  // dV += P^T dO
    if (p.plan->at(b, j0 / p.bk) == kMixed) {
      mask_tile(dp, p.bk, rows, cols, p.plan->keep.data() + b * p.Lk + j0, false, 0, 0, 0, 0.f);
    }
    mm_atb(p.gemm_path, cols, D, rows, scale, dp, p.bk, q, p.q.sl, 1.f, w.dk.data() + j0 * D, D);  // dK += s dS^T Q
    mm_ab(p.gemm_path, rows, D, cols, scale, dp, p.bk, kt, kld, 1.f, w.dq.data(), D);              // dQ += s dS K
    if (p.c2p || p.p2c) scatter_terms(p, dp, rows, cols, w.t, w.dqp.data(), w.dkp.data());
    if (p.p2c) {  // dK += s dKP . pos_query, dpos_query += s dKP^T K, per chunk of columns over its band
      const Terms& t = w.t;
      for (int64_t c0 = 0, c = 0; c0 < cols; c0 += kChunk, ++c) {
        const int64_t cc = std::min(kChunk, cols - c0);
        const Band band = t.kband[c];
        const float* dkp = w.dkp.data() + c0 * t.wk + (band.lo - t.lo_k);
        mm_ab(p.gemm_path, cc, D, band.w, scale, dkp, t.wk, p.pq.at(0, h, band.lo), p.pq.sl, 1.f,
              w.dk.data() + (j0 + c0) * D, D);
        mm_atb(p.gemm_path, band.w, D, cc, scale, dkp, t.wk, kt + c0 * kld, kld, 1.f,
               io.dpq + (h * io.pos_rows + band.lo) * D, D);
      }
    }
  });
  if (p.c2p && w.t.have_qp) {  // dQ += s dQP . pos_key, dpos_key += s dQP^T Q, per chunk of rows over its band
    const Terms& t = w.t;
    for (int64_t r0 = 0, c = 0; r0 < rows; r0 += kChunk, ++c) {
      const int64_t n = std::min(kChunk, rows - r0);
      const Band band = t.qband[c];
      const float* dqp = w.dqp.data() + r0 * t.wq + (band.lo - t.lo_q);
      mm_ab(p.gemm_path, n, D, band.w, scale, dqp, t.wq, p.pk.at(0, h, band.lo), p.pk.sl, 1.f, w.dq.data() + r0 * D, D);
      mm_atb(p.gemm_path, band.w, D, n, scale, dqp, t.wq, q + r0 * p.q.sl, p.q.sl, 1.f,
             io.dpk + (h * io.pos_rows + band.lo) * D, D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) std::copy(w.dq.begin() + r * D, w.dq.begin() + (r + 1) * D, io.dq.at(b, h, i0 + r));
}

void bwd_head(const Problem& p, const BwdIO& io, int64_t b, int64_t h, BwdScratch& w) {
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);
  for (int64_t qb = 0; qb < p.nqb(); ++qb) bwd_query_block(p, io, b, h, qb, w);
  // A padded key's gradients are exactly zero (a NaN query row would give it 0 * NaN).
  const uint8_t* keep = p.plan->keep.empty() ? nullptr : p.plan->keep.data() + b * p.Lk;
  for (int64_t j = 0; j < p.Lk; ++j) {
    const bool hidden = keep && !keep[j];
    float* dk = io.dk.at(b, h, j);
    float* dv = io.dv.at(b, h, j);
    if (hidden) {
      std::fill(dk, dk + p.D, 0.f);
      std::fill(dv, dv + p.D, 0.f);
    } else {
      std::copy(w.dk.begin() + j * p.D, w.dk.begin() + (j + 1) * p.D, dk);
      std::copy(w.dv.begin() + j * p.D, w.dv.begin() + (j + 1) * p.D, dv);
    }
  }
}

Problem make_problem(const at::Tensor& qf, const at::Tensor& kf, const at::Tensor& vf, const at::Tensor& pkf,
                     const at::Tensor& pqf, const at::Tensor& table, const KeyPlan& plan, const Tiles& tiles,
                     float scale, double dropout_p, int64_t seed) {
  Problem p;
  p.B = qf.size(0);
  p.H = qf.size(1);
  p.Lq = qf.size(2);
  p.Lk = kf.size(2);
  p.D = qf.size(3);
  p.bq = tiles.bq;
  p.bk = tiles.bk;
  p.c2p = pkf.defined();
  p.p2c = pqf.defined();
  p.gemm_path = tile_gemm_path();
  p.scale = scale;
  p.q = rows_of(qf);
  p.k = rows_of(kf);
  p.v = rows_of(vf);
  p.pk = pos_rows(pkf);
  p.pq = pos_rows(pqf);
  thread_local std::vector<float> pkt, pqt;  // the kernels run one call at a time per calling thread
  pos_transposed(p.pk, p.H, p.c2p ? pkf.size(1) : 0, p.D, pkt, &p.pkt);
  pos_transposed(p.pq, p.H, p.p2c ? pqf.size(1) : 0, p.D, pqt, &p.pqt);
  p.table = table.data_ptr<int64_t>();
  p.plan = &plan;
  p.drop = make_dropout(dropout_p, seed);
  TORCH_INTERNAL_ASSERT(!p.drop.on || p.bk % 8 == 0, "dropout needs key tiles of whole Philox blocks");
  return p;
}

int64_t pos_rows_of(const at::Tensor& pos_key, const at::Tensor& pos_query) {
  return pos_key.defined() ? pos_key.size(1) : pos_query.defined() ? pos_query.size(1) : 0;
}

}  // namespace

void disentangled_attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& pos_key, const at::Tensor& pos_query,
                                       const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
                                       float scale, double dropout_p, int64_t seed, at::Tensor& out,
                                       at::Tensor& lse) {
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), pkf = pos_f32(pos_key), pqf = pos_f32(pos_query);
  const at::Tensor table = rel_index.contiguous();
  const Tiles tiles = choose_tiles(q.size(0) * q.size(1), q.size(2));
  const KeyPlan plan = plan_keys(key_padding_mask, q.size(0), k.size(2), tiles.bk);
  const Problem p = make_problem(qf, kf, vf, pkf, pqf, table, plan, tiles, scale, dropout_p, seed);
  const int64_t pos_rows = pos_rows_of(pos_key, pos_query);
  at::Tensor out_f = f32_output(out);
  const Rows out_rows = rows_of(out_f);
  const LseRows lr{lse.data_ptr<float>(), lse.stride(0), lse.stride(1), lse.stride(2)};
  const int64_t nqb = p.nqb(), bh = p.B * p.H;
  run_tasks(
      bh * nqb, [&] { return FwdScratch(p, pos_rows); },
      [&](int64_t t, FwdScratch& w) { fwd_query_block(p, (t % bh) / p.H, t % p.H, t / bh, out_rows, lr, w); });
  finish_output(out, out_f);
}

void disentangled_attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& pos_key, const at::Tensor& pos_query,
                                       const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rel_index,
                                       const std::optional<at::Tensor>& key_padding_mask, float scale,
                                       double dropout_p, int64_t seed, at::Tensor& dq, at::Tensor& dk,
                                       at::Tensor& dv, at::Tensor& dpos_key, at::Tensor& dpos_query) {
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), of = as_f32(out), dof = as_f32(dout);
  const at::Tensor pkf = pos_f32(pos_key), pqf = pos_f32(pos_query);
  const at::Tensor table = rel_index.contiguous();
  const Tiles tiles = choose_tiles(q.size(0) * q.size(1), q.size(2));
  const KeyPlan plan = plan_keys(key_padding_mask, q.size(0), k.size(2), tiles.bk);
  Problem p = make_problem(qf, kf, vf, pkf, pqf, table, plan, tiles, scale, dropout_p, seed);
  p.fp32_delta = fp32_delta_enabled(q);
  const int64_t pos_rows = pos_rows_of(pos_key, pos_query);
  // Tasks: (chunk of the batch, head); enough chunks to keep the threads busy, each with its own
  // dpos partials [chunks, H, rows, D], summed in chunk order below. With one chunk and an fp32
  // contiguous output (the bench shapes: ceil(4 * threads / H) = 1), the partial is the output itself:
  // no second buffer to fault in and zero, no copy.
  const int64_t want = 4 * at::get_num_threads();
  const int64_t chunks = std::clamp<int64_t>((want + p.H - 1) / p.H, 1, p.B);
  const int64_t part = p.H * pos_rows * p.D;
  auto partials = [&](bool on, at::Tensor& dst) {
    if (!on) return at::Tensor();
    if (chunks == 1 && dst.scalar_type() == at::kFloat && dst.is_contiguous() && dst.numel() == part) {
      return at::Tensor(dst.zero_());
    }
    return at::zeros({chunks * part}, q.options().dtype(at::kFloat));
  };
  at::Tensor dpk_parts = partials(p.c2p, dpos_key), dpq_parts = partials(p.p2c, dpos_query);
  at::Tensor dq_f = f32_output(dq), dk_f = f32_output(dk), dv_f = f32_output(dv);
  const BwdIO io{rows_of(of), rows_of(dof), rows_of(dq_f), rows_of(dk_f), rows_of(dv_f),
                 LseRows{lse.data_ptr<float>(), lse.stride(0), lse.stride(1), lse.stride(2)}, nullptr, nullptr,
                 pos_rows};
  run_tasks(
      chunks * p.H, [&] { return BwdScratch(p, pos_rows); },
      [&](int64_t t, BwdScratch& w) {
        const int64_t c = t / p.H, h = t % p.H;
        BwdIO mine = io;
        if (p.c2p) mine.dpk = dpk_parts.data_ptr<float>() + c * part;
        if (p.p2c) mine.dpq = dpq_parts.data_ptr<float>() + c * part;
        for (int64_t b = c * p.B / chunks; b < (c + 1) * p.B / chunks; ++b) bwd_head(p, mine, b, h, w);
      });
  finish_output(dq, dq_f);
  finish_output(dk, dk_f);
  finish_output(dv, dv_f);
  // dpos = the partials summed in chunk order (the same sum whatever thread ran a chunk)
  for (auto [parts, dst] : {std::pair{&dpk_parts, &dpos_key}, std::pair{&dpq_parts, &dpos_query}}) {
    if (!parts->defined() || parts->is_same(*dst)) continue;  // accumulated in place
    float* acc = parts->data_ptr<float>();
    for (int64_t c = 1; c < chunks; ++c) vec::axpy(acc, 1.f, acc + c * part, part);
    dst->copy_(parts->narrow(0, 0, part).view(dst->sizes()));
  }
}

}  // namespace cpu
}  // namespace forkattn
