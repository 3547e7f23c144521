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
// Padding, NaN and empty rows as in attention_cpu.cpp: padded K/V rows of a mixed block are read as
// zeros, hidden scores are selected to -inf, padded keys get exactly zero gradients, a row that sees
// no key gets out = 0, lse = +inf and zero gradients.

#include "cpu/vec.h"  // first: it sets at::vec's ISA before any ATen header

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/tiles.h"
#include "disentangled.h"

namespace forkattn {
namespace cpu::CPU_CAPABILITY {  // one copy per ISA variant: cpu/isa.h
namespace {

using IVec = at::vec::Vectorized<int32_t>;

// Row-major tile products on tiles.h's column-major gemm; A [m, k] means m rows of k entries, row stride lda.
// C[m, n] = alpha * A . B^T + beta * C, with B [n, k].
void mm_abt(bool blas, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
            int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm(blas, true, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
// C[m, n] = alpha * A . B + beta * C, with A [m, k], B [k, n].
void mm_ab(bool blas, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
           int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm(blas, false, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
// C[m, n] = alpha * A^T . B + beta * C, with A [k, m], B [k, n].
void mm_atb(bool blas, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
            int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm(blas, false, true, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

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

struct Problem {
  int64_t B, H, Lq, Lk, D;
  int64_t bq, bk;
  bool c2p, p2c, blas;
  bool fp32_delta = false;  // backward: Delta from a recomputed fp32 output (fp16/bf16 inputs)
  float scale;
  Rows q, k, v, pk, pq;     // pk / pq: [H, rows, D] (p.at(0, h, row))
  const int64_t* table;     // rel_index [Lq + Lk - 1]
  const KeyPlan* plan;

  int64_t nqb() const { return (Lq + bq - 1) / bq; }
  // (min, max) of table[a, a + n)
  std::pair<int64_t, int64_t> table_range(int64_t a, int64_t n) const {
    const auto [lo, hi] = std::minmax_element(table + a, table + a + n);
    return {*lo, *hi};
  }
};

// Per-thread buffers of the relative terms of one query block and one of its key tiles.
struct Terms {
  std::vector<float> qp, kp;  // qp [bq, wq], kp [bk, wk]; the backward's dqp / dkp have the same shapes
  std::vector<int32_t> iq, ik;  // [bq + bk - 1]: delta - lo_q, delta - lo_k along the tile's diagonals
  int64_t lo_q = 0, wq = 0, lo_k = 0, wk = 0;
  bool have_qp = false;  // qp computed for the current query block (done at its first visible tile)

  Terms(const Problem& p, int64_t rows_cap)
      : qp(p.c2p ? p.bq * std::min(rows_cap, p.bq + p.Lk - 1) : 0),
        kp(p.p2c ? p.bk * std::min(rows_cap, p.bq + p.bk - 1) : 0),
        iq(p.c2p ? p.bq + p.bk - 1 : 0),
        ik(p.p2c ? p.bq + p.bk - 1 : 0) {}
};

// qp = scale * Q_block . pos_key[lo_q .. hi_q]^T over the rows the block's queries read (every key).
void query_terms(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t rows, Terms& t) {
  t.have_qp = true;
  if (!p.c2p) return;
  const auto [lo, hi] = p.table_range(i0, rows + p.Lk - 1);
  t.lo_q = lo;
  t.wq = hi - lo + 1;
  mm_abt(p.blas, rows, t.wq, p.D, p.scale, p.q.at(b, h, i0), p.q.sl, p.pk.at(0, h, lo), p.pk.sl, 0.f, t.qp.data(),
         t.wq);
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
  if (p.p2c) {
    const auto [lo, hi] = p.table_range(base, n);
    t.lo_k = lo;
    t.wk = hi - lo + 1;
    for (int64_t m = 0; m < n; ++m) t.ik[n - 1 - m] = static_cast<int32_t>(tab[m] - lo);
    mm_abt(p.blas, cols, t.wk, p.D, p.scale, kt, kld, p.pq.at(0, h, lo), p.pq.sl, 0.f, t.kp.data(), t.wk);
  }
}

// s[r, c] += qp[r, iq[rows - 1 - r + c]] + kp[c, ik[rows - 1 - r + c]]
void add_terms(const Problem& p, float* s, int64_t rows, int64_t cols, const Terms& t) {
  constexpr int64_t W = vec::kWidth;
  const IVec kstep = IVec::arange(0, static_cast<int32_t>(t.wk));  // column c's row of kp starts at c * wk
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * p.bk;
    const float* qrow = p.c2p ? t.qp.data() + r * t.wq : nullptr;
    const int32_t* iq = p.c2p ? t.iq.data() + (rows - 1 - r) : nullptr;
    const int32_t* ik = p.p2c ? t.ik.data() + (rows - 1 - r) : nullptr;
    int64_t c = 0;
    for (; c + W <= cols; c += W) {
      vec::Vec x = vec::Vec::loadu(row + c);
      if (p.c2p) x = x + at::vec::gather<4>(qrow, IVec::loadu(iq + c));
      if (p.p2c) {
        const IVec idx = IVec::loadu(ik + c) + kstep + IVec(static_cast<int32_t>(c * t.wk));
        x = x + at::vec::gather<4>(t.kp.data(), idx);
      }
      x.store(row + c);
    }
    for (; c < cols; ++c) {
      if (p.c2p) row[c] += qrow[iq[c]];
      if (p.p2c) row[c] += t.kp[c * t.wk + ik[c]];
    }
  }
}

// The backward of add_terms: dqp[r, iq[..]] += ds[r, c] (dqp in t.qp's shape) and dkp[c, ik[..]] +=
// ds[r, c] (dkp zeroed here, in t.kp's shape).
void scatter_terms(const Problem& p, const float* ds, int64_t rows, int64_t cols, const Terms& t, float* dqp,
                   float* dkp) {
  if (p.p2c) std::fill(dkp, dkp + cols * t.wk, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = ds + r * p.bk;
    if (p.c2p) {
      float* d = dqp + r * t.wq;
      const int32_t* iq = t.iq.data() + (rows - 1 - r);
      for (int64_t c = 0; c < cols; ++c) d[iq[c]] += row[c];
    }
    if (p.p2c) {
      const int32_t* ik = t.ik.data() + (rows - 1 - r);
      for (int64_t c = 0; c < cols; ++c) dkp[c * t.wk + ik[c]] += row[c];
    }
  }
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
    mm_abt(p.blas, rows, cols, p.D, p.scale, q, p.q.sl, kt, kld, 0.f, s, p.bk);
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
  Terms t;
  FwdScratch(const Problem& p, int64_t pos_rows)
      : s(p.bq * p.bk), acc(p.bq * p.D), m(p.bq), l(p.bq), kt(p.bk * p.D), vt(p.bk * p.D), t(p, pos_rows) {}
};

void fwd_query_block(const Problem& p, int64_t b, int64_t h, int64_t qb, const Rows& out, const LseRows& lse,
                     FwdScratch& w) {
  const int64_t D = p.D, i0 = qb * p.bq, rows = std::min(p.bq, p.Lq - i0);
  std::fill(w.m.begin(), w.m.end(), -kInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  for_each_key_tile(p, b, h, i0, rows, w.kt.data(), w.vt.data(), w.s.data(), w.t,
                    [&](int64_t, int64_t cols, const float*, int64_t, const float* vt, int64_t vld) {
                      online_softmax(w.s.data(), p.bk, rows, cols, w.m.data(), w.l.data(), w.acc.data(), D);
                      mm_ab(p.blas, rows, D, cols, 1.f, w.s.data(), p.bk, vt, vld, 1.f, w.acc.data(), D);  // acc += P V
                    });
  store_block(w.acc.data(), w.m.data(), w.l.data(), rows, D, out, lse, b, h, i0);
}

// ---------------------------------------------------------------------------------------------
// Backward (see attention_cpu.cpp for Delta and why 16-bit inputs recompute the fp32 output for it).

struct BwdScratch {
  std::vector<float> s, dp, dq, delta, lse, dk, dv, kt, vt, dqp, dkp;
  Terms t;
  BwdScratch(const Problem& p, int64_t pos_rows)
      : s(p.bq * p.bk), dp(p.bq * p.bk), dq(p.bq * p.D), delta(p.bq), lse(p.bq), dk(p.Lk * p.D), dv(p.Lk * p.D),
        kt(p.bk * p.D), vt(p.bk * p.D), t(p, pos_rows) {
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
                        mm_ab(p.blas, rows, D, cols, 1.f, s, p.bk, vt, vld, 1.f, w.dq.data(), D);
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
    mm_atb(p.blas, cols, D, rows, 1.f, s, p.bk, dout, io.dout.sl, 1.f, w.dv.data() + j0 * D, D);  // dV += P^T dO
    mm_abt(p.blas, rows, cols, D, 1.f, dout, io.dout.sl, vt, vld, 0.f, dp, p.bk);                  // dP = dO V^T
    for (int64_t r = 0; r < rows; ++r) softmax_grad_row(s + r * p.bk, dp + r * p.bk, cols, w.delta[r]);
    if (p.plan->at(b, j0 / p.bk) == kMixed) {
      mask_tile(dp, p.bk, rows, cols, p.plan->keep.data() + b * p.Lk + j0, false, 0, 0, 0, 0.f);
    }
    mm_atb(p.blas, cols, D, rows, scale, dp, p.bk, q, p.q.sl, 1.f, w.dk.data() + j0 * D, D);  // dK += s dS^T Q
    mm_ab(p.blas, rows, D, cols, scale, dp, p.bk, kt, kld, 1.f, w.dq.data(), D);              // dQ += s dS K
    if (p.c2p || p.p2c) scatter_terms(p, dp, rows, cols, w.t, w.dqp.data(), w.dkp.data());
    if (p.p2c) {  // dK += s dKP . pos_query, dpos_query += s dKP^T K
      const Terms& t = w.t;
      mm_ab(p.blas, cols, D, t.wk, scale, w.dkp.data(), t.wk, p.pq.at(0, h, t.lo_k), p.pq.sl, 1.f,
            w.dk.data() + j0 * D, D);
      mm_atb(p.blas, t.wk, D, cols, scale, w.dkp.data(), t.wk, kt, kld, 1.f,
             io.dpq + (h * io.pos_rows + t.lo_k) * D, D);
    }
  });
  if (p.c2p && w.t.have_qp) {  // dQ += s dQP . pos_key, dpos_key += s dQP^T Q
    const Terms& t = w.t;
    mm_ab(p.blas, rows, D, t.wq, scale, w.dqp.data(), t.wq, p.pk.at(0, h, t.lo_q), p.pk.sl, 1.f, w.dq.data(), D);
    mm_atb(p.blas, t.wq, D, rows, scale, w.dqp.data(), t.wq, q, p.q.sl, 1.f, io.dpk + (h * io.pos_rows + t.lo_q) * D,
           D);
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
                     float scale) {
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
  p.blas = blas_enabled();
  p.scale = scale;
  p.q = rows_of(qf);
  p.k = rows_of(kf);
  p.v = rows_of(vf);
  p.pk = pos_rows(pkf);
  p.pq = pos_rows(pqf);
  p.table = table.data_ptr<int64_t>();
  p.plan = &plan;
  return p;
}

int64_t pos_rows_of(const at::Tensor& pos_key, const at::Tensor& pos_query) {
  return pos_key.defined() ? pos_key.size(1) : pos_query.defined() ? pos_query.size(1) : 0;
}

}  // namespace

void disentangled_attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& pos_key, const at::Tensor& pos_query,
                                       const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
                                       float scale, at::Tensor& out, at::Tensor& lse) {
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), pkf = pos_f32(pos_key), pqf = pos_f32(pos_query);
  const at::Tensor table = rel_index.contiguous();
  const Tiles tiles = choose_tiles(q.size(0) * q.size(1), q.size(2));
  const KeyPlan plan = plan_keys(key_padding_mask, q.size(0), k.size(2), tiles.bk);
  const Problem p = make_problem(qf, kf, vf, pkf, pqf, table, plan, tiles, scale);
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
                                       at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dpos_key,
                                       at::Tensor& dpos_query) {
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), of = as_f32(out), dof = as_f32(dout);
  const at::Tensor pkf = pos_f32(pos_key), pqf = pos_f32(pos_query);
  const at::Tensor table = rel_index.contiguous();
  const Tiles tiles = choose_tiles(q.size(0) * q.size(1), q.size(2));
  const KeyPlan plan = plan_keys(key_padding_mask, q.size(0), k.size(2), tiles.bk);
  Problem p = make_problem(qf, kf, vf, pkf, pqf, table, plan, tiles, scale);
  p.fp32_delta = fp32_delta_enabled(q);
  const int64_t pos_rows = pos_rows_of(pos_key, pos_query);
  // Tasks: (chunk of the batch, head); enough chunks to keep the threads busy, each with its own
  // dpos partials [chunks, H, rows, D], summed in chunk order below.
  const int64_t want = 4 * at::get_num_threads();
  const int64_t chunks = std::clamp<int64_t>((want + p.H - 1) / p.H, 1, p.B);
  const int64_t part = p.H * pos_rows * p.D;
  at::Tensor dpk_parts = p.c2p ? at::zeros({chunks * part}, q.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor dpq_parts = p.p2c ? at::zeros({chunks * part}, q.options().dtype(at::kFloat)) : at::Tensor();
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
    if (!parts->defined()) continue;
    float* acc = parts->data_ptr<float>();
    for (int64_t c = 1; c < chunks; ++c) vec::axpy(acc, 1.f, acc + c * part, part);
    dst->copy_(parts->narrow(0, 0, part).view(dst->sizes()));
  }
}

}  // namespace cpu
}  // namespace forkattn
