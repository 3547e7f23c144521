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
#include "cpu/tiles.h"  // gemm, rows, key plan, online softmax, scheduler (shared with disentangled_cpu.cpp)

namespace forkattn {
namespace cpu {
namespace {

using vec::kInf;
using vec::Vec;

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
  // Multiplies tile entry (r, c) (row stride bk) by keep(b, h, i0 + r, j0 + c) / (1 - p).
  void drop(float* s, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols) const;
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
  return key_tile(src, *plan, b, hk, j0, cols, bk, Lk, D, scratch, ld);
}

void Problem::mask(float* s, int64_t b, int64_t i0, int64_t rows, int64_t j0, int64_t cols, float fill) const {
  const bool mixed = plan->at(b, j0 / bk) == kMixed;
  const bool diagonal = causal && j0 + cols - 1 > i0 + off(b);
  if (mixed || diagonal) {
    mask_tile(s, bk, rows, cols, mixed ? plan->keep.data() + b * Lk + j0 : nullptr, diagonal, i0, j0, off(b), fill);
  }
}

void Problem::drop(float* s, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols) const {
  namespace k = ::forkattn::kernels;
  const uint32_t bh = static_cast<uint32_t>(b * H + h);
  const int64_t blk0 = j0 >> 3, blk1 = (j0 + cols + 7) >> 3;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * bk;
    const uint32_t i = static_cast<uint32_t>(i0 + r);
    // 8 Philox blocks (64 key columns) per philox4x32_10_x8 call: block blk is counter
    // (blk, i, bh, kDropoutStream), its u16 for column 8 * blk + t is half t & 1 of word t >> 1.
    for (int64_t g = blk0; g < blk1; g += 8) {
      uint32_t c0[8], c1[8], out[4][8];
      for (int t = 0; t < 8; ++t) {
        c0[t] = static_cast<uint32_t>(g + t);
        c1[t] = i;
      }
      k::philox4x32_10_x8(seed, c0, c1, bh, k::kDropoutStream, out);
      const int64_t c_lo = std::max<int64_t>(g * 8, j0), c_hi = std::min<int64_t>((g + 8) * 8, j0 + cols);
      for (int64_t c = c_lo; c < c_hi; ++c) {
        const int64_t blk = (c >> 3) - g, t = c & 7;
        const uint32_t u = (out[t >> 1][blk] >> (16 * (t & 1))) & 0xffffu;
        float& x = row[c - j0];
        x = u >= drop_threshold ? x * drop_scale : 0.f;
      }
    }
  }
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

struct FwdScratch {
  std::vector<float> s, acc, m, l, kt, vt;
  explicit FwdScratch(const Tiles& t, int64_t D)
      : s(t.bq * t.bk), acc(t.bq * D), m(t.bq), l(t.bq), kt(t.bk * D), vt(t.bk * D) {}
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
                        online_softmax(w.s.data(), p.bk, rows, cols, w.m.data(), w.l.data(), w.acc.data(), D);
                        if (p.dropout) p.drop(w.s.data(), b, h, i0, rows, j0, cols);  // after l: lse is undropped
                        // acc += P V
                        gemm(p.blas, false, false, D, rows, cols, 1.f, vt, vld, w.s.data(), p.bk, 1.f, w.acc.data(), D);
                      });
  store_block(w.acc.data(), w.m.data(), w.l.data(), rows, D, out, lse, b, h, i0);
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
  std::vector<float> s, dp, dq, delta, lse, dk, dv, kt, vt, pd;  // pd: the dropped P (dropout only)
  BwdScratch(const Tiles& t, int64_t Lk, int64_t D, bool dropout)
      : s(t.bq * t.bk), dp(t.bq * t.bk), dq(t.bq * D), delta(t.bq), lse(t.bq),
        dk(Lk * D), dv(Lk * D), kt(t.bk * D), vt(t.bk * D), pd(dropout ? t.bq * t.bk : 0) {}
};

struct BwdIO {
  Rows out, dout, dq, dk, dv;
  LseRows lse;
};

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
                        if (p.dropout) p.drop(w.s.data(), b, h, i0, rows, j0, cols);  // O holds the dropout
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
    // dV += P^T dO (with dropout: the dropped P, the forward's mask redrawn)
    const float* pv = s;
    if (p.dropout) {
      std::copy(s, s + rows * p.bk, w.pd.data());
      p.drop(w.pd.data(), b, h, i0, rows, j0, cols);
      pv = w.pd.data();
    }
    gemm(p.blas, false, true, D, cols, rows, 1.f, dout, io.dout.sl, pv, p.bk, 1.f, w.dv.data() + j0 * D, D);
    // dP = dO V^T (with dropout: times keep / (1 - p)), then dS = P * (dP - Delta), 0 at hidden keys
    gemm(p.blas, true, false, cols, rows, D, 1.f, vt, vld, dout, io.dout.sl, 0.f, dp, p.bk);
    if (p.dropout) {
      // the mask once per tile: where P > 0 the dropped P is nonzero iff kept; where P = 0, dS = P (...) = 0
      // whatever dP is
      for (int64_t r = 0; r < rows; ++r) {
        const float* pd = w.pd.data() + r * p.bk;
        float* d = dp + r * p.bk;
        for (int64_t c = 0; c < cols; ++c) d[c] = pd[c] != 0.f ? d[c] * p.drop_scale : 0.f;
      }
    }
    for (int64_t r = 0; r < rows; ++r) softmax_grad_row(s + r * p.bk, dp + r * p.bk, cols, w.delta[r]);
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
      p.B * p.Hkv, [&] { return BwdScratch(tiles, p.Lk, p.D, p.dropout); },
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
