// DeBERTa's disentangled attention on CPU, the relative terms of a tile (included by disentangled_cpu.cpp
// alone, once per ISA variant): the problem's description, the position products of a query block (qp)
// and of a key tile (kp), adding them to a tile of scores along its diagonals (add_terms) and the
// backward's scatter of dS into dqp / dkp (scatter_terms). The algorithm is described atop
// disentangled_cpu.cpp.
#pragma once

#include "cpu/vec.h"  // first: it sets at::vec's ISA before any ATen header

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <utility>
#include <vector>

#include "cpu/dropout_cpu.h"
#include "cpu/tiles.h"
#include "disentangled.h"

namespace forkattn {
namespace cpu::CPU_CAPABILITY {
namespace {

using IVec = at::vec::Vectorized<int32_t>;

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

}  // namespace
}  // namespace cpu::CPU_CAPABILITY
}  // namespace forkattn
