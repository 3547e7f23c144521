// CPU attention kernels: blocked online softmax (flash-style), forward and backward.
//
// All arithmetic is fp32: fp16/bf16 inputs are widened once up front and the results rounded
// once at the end. Work is cut into [query block x key block] tiles; a tile's scores live in a
// per-thread scratch buffer, never an Lq x Lk matrix. The tile matmuls (tiles.h's gemm) run on
// forkattn's register-blocked kernels in the AVX2 / AVX512 variants (cpu/tile_gemm.h), on BLAS
// sgemm (the MKL that libtorch_cpu exports) in DEFAULT, with a plain loop as fallback; the softmax
// passes use cpu/vec.h.
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
#include <memory>
#include <vector>

#include "attention.h"
#include "common/philox.h"
#include "cpu/dropout_cpu.h"  // the Philox mask of a tile row (shared with disentangled_cpu.cpp)

#include "cpu/tiles.h"  // gemm, rows, key plan, online softmax, scheduler (shared with disentangled_cpu.cpp)

namespace forkattn {
namespace cpu::CPU_CAPABILITY {  // one copy per ISA variant: cpu/isa.h
namespace {

using vec::kInf;
using vec::Vec;

// Shapes and operands shared by the forward and backward passes. Varlen: Lq and Lk are the
// longest sequences and len_q/len_k (with q.start/k.start) give each one.
struct Problem {
  int64_t B, H, Hkv, Lq, Lk, D;
  bool causal;
  TileGemm gemm_path;
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
  return key_tile(src, *plan, b, hk, j0, cols, bk, Lk, D, scratch, ld);
}

void Problem::mask(float* s, int64_t b, int64_t i0, int64_t rows, int64_t j0, int64_t cols, float fill) const {
  const bool mixed = plan->at(b, j0 / bk) == kMixed;
  const bool diagonal = causal && j0 + cols - 1 > i0 + off(b);
  if (mixed || diagonal) {
    mask_tile(s, bk, rows, cols, mixed ? plan->keep.data() + b * Lk + j0 : nullptr, diagonal, i0, j0, off(b), fill);
  }
}

int64_t Problem::drop_cols(int64_t b, int64_t i, int64_t j0, int64_t cols) const {
  const int64_t n = plan->end(b, j0 / bk, cols);
  return causal ? std::min(n, std::clamp<int64_t>(i + off(b) + 1 - j0, 0, cols)) : n;
}

void Problem::drop_u16(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, uint16_t* u) const {
  dropout_u16(seed, static_cast<uint32_t>(b * H + h), static_cast<uint32_t>(i), j0, n, u);
}

void Problem::drop_row(float* x, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols, uint16_t* u) const {
  const int64_t n = drop_cols(b, i, j0, cols);
  drop_u16(b, h, i, j0, n, u);
  dropout_apply_row(DropoutParams{true, seed, drop_threshold, drop_scale}, x, n, cols, u);
}

// dS = P * (dP' - Delta) where dP' = dP * keep / (1 - p) is the gradient of the dropped P; taken as 0
// where the dropped P is 0 (dropped, or P underflowed to 0), so a NaN dP there cannot reach dS.
void Problem::drop_grad_row(float* s, float* dp, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols,
                            float delta, uint16_t* u) const {
  const int64_t n = drop_cols(b, i, j0, cols);
  drop_u16(b, h, i, j0, n, u);
  // hidden keys n .. cols get 0 (mixed or diagonal tiles, which mask() covers too)
  dropout_grad_row(DropoutParams{true, seed, drop_threshold, drop_scale}, s, dp, n, cols, delta, u);
}

bool Problem::scores(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols, const float* kt,
                     int64_t kld, float* s) const {
  if (plan->at(b, j0 / bk) == kSkip) return false;
  gemm(gemm_path, true, false, cols, rows, D, scale, kt, kld, q.at(b, h, i0), q.sl, 0.f, s, bk);
  mask(s, b, i0, rows, j0, cols, -kInf);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Dropout's u16 of one tile row: whole calls of 64 keys (drop_u16).
int64_t drop_u16_size(const Tiles& t) { return dropout_u16_size(t.bk); }

struct FwdScratch {
  std::vector<float> s, acc, m, l, kt, vt;
  std::vector<uint16_t> u;  // dropout
  explicit FwdScratch(const Tiles& t, int64_t D)
      : s(t.bq * t.bk), acc(t.bq * D), m(t.bq), l(t.bq), kt(t.bk * D), vt(t.bk * D), u(drop_u16_size(t)) {}
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
                        gemm(p.gemm_path, false, false, D, rows, cols, 1.f, vt, vld, w.s.data(), p.bk, 1.f,
                             w.acc.data(), D);
                      });
  store_block(w.acc.data(), w.m.data(), w.l.data(), rows, D, out, lse, b, h, i0);
}

// ---------------------------------------------------------------------------------------------
// Backward: one task per (batch, kv head) owns dK/dV of those keys and dQ of the query heads
// that share them (GQA), so no two threads write the same rows. With fewer kv heads than about
// 2 x threads (B = 1), the query blocks of each kv head are split across tasks with per-task dK/dV
// partials (run_bwd). Per tile, P is recomputed from
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
  float* dk_acc = nullptr;  // where the task sums dK and dV ([Lk, D]): dk / dv, or a split's partial
  float* dv_acc = nullptr;
  // own_kv: the task owns all of a kv head's keys (dk/dv [Lk, D] here); else it sums into partials.
  BwdScratch(const Tiles& t, int64_t Lk, int64_t D, bool own_kv = true)
      : s(t.bq * t.bk), dp(t.bq * t.bk), dq(t.bq * D), delta(t.bq), lse(t.bq),
        dk(own_kv ? Lk * D : 0), dv(own_kv ? Lk * D : 0), kt(t.bk * D), vt(t.bk * D), u(drop_u16_size(t)) {}
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
                        if (p.dropout) {  // O holds the dropout
                          for (int64_t r = 0; r < rows; ++r) {
                            p.drop_row(w.s.data() + r * p.bk, b, h, i0 + r, j0, cols, w.u.data());
                          }
                        }
                        gemm(p.gemm_path, false, false, D, rows, cols, 1.f, vt, vld, w.s.data(), p.bk, 1.f,
                             o, D);
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
    gemm(p.gemm_path, true, false, cols, rows, D, 1.f, vt, vld, dout, io.dout.sl, 0.f, dp, p.bk);
    for (int64_t r = 0; r < rows; ++r) {
      if (p.dropout) {
        p.drop_grad_row(s + r * p.bk, dp + r * p.bk, b, h, i0 + r, j0, cols, w.delta[r], w.u.data());
      } else {
        softmax_grad_row(s + r * p.bk, dp + r * p.bk, cols, w.delta[r]);
      }
    }
    // dV += P^T dO (the dropped P with dropout)
    gemm(p.gemm_path, false, true, D, cols, rows, 1.f, dout, io.dout.sl, s, p.bk, 1.f, w.dv_acc + j0 * D, D);
    p.mask(dp, b, i0, rows, j0, cols, 0.f);
    // dK += scale * dS^T Q ; dQ += scale * dS K
    gemm(p.gemm_path, false, true, D, cols, rows, p.scale, q, p.q.sl, dp, p.bk, 1.f, w.dk_acc + j0 * D, D);
    gemm(p.gemm_path, false, false, D, rows, cols, p.scale, kt, kld, dp, p.bk, 1.f, w.dq.data(), D);
  });
  for (int64_t r = 0; r < rows; ++r) std::copy(w.dq.begin() + r * D, w.dq.begin() + (r + 1) * D, io.dq.at(b, h, i0 + r));
}

// Writes key j of (b, hk): dk/dv rows from the sum of the n [Lk, D] buffers at dk_parts / dv_parts
// (stride Lk * D), in a fixed order; with ends, buffer c only when j < ends[c] (the rows it wrote).
// A padded key's gradients are exactly zero (a NaN query row would give it 0 * NaN).
void store_kv_row(const Problem& p, const BwdIO& io, int64_t b, int64_t hk, int64_t j, const float* dk_parts,
                  const float* dv_parts, int64_t n, const int64_t* ends = nullptr) {
  const uint8_t* keep = p.plan->keep.empty() ? nullptr : p.plan->keep.data() + b * p.Lk;
  float* dk = io.dk.at(b, hk, j);
  float* dv = io.dv.at(b, hk, j);
  std::fill(dk, dk + p.D, 0.f);
  std::fill(dv, dv + p.D, 0.f);
  if (keep && !keep[j]) return;
  for (int64_t c = 0; c < n; ++c) {
    if (ends && j >= ends[c]) continue;
    vec::axpy(dk, 1.f, dk_parts + c * p.Lk * p.D + j * p.D, p.D);
    vec::axpy(dv, 1.f, dv_parts + c * p.Lk * p.D + j * p.D, p.D);
  }
}

void bwd_kv_head(const Problem& p, const BwdIO& io, int64_t b, int64_t hk, BwdScratch& w) {
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);
  w.dk_acc = w.dk.data();
  w.dv_acc = w.dv.data();
  const int64_t group = p.H / p.Hkv;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t qb = 0; qb < p.nqb(b); ++qb) bwd_query_block(p, io, b, h, qb, w);
  }
  for (int64_t j = 0; j < p.lk(b); ++j) store_kv_row(p, io, b, hk, j, w.dk.data(), w.dv.data(), 1);
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
  p.gemm_path = tile_gemm_path();
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

// Query-block splits of each kv head in the backward: 1 (one task per kv head) when B x Hkv
// tasks keep every thread busy, else about two per thread (one query block per split measured
// slower: each split adds a partial to zero and sum; B1 H1 L512 causal 0.71x at 2 threads).
// The partials are capped at 64 MB (dK and dV) when that still leaves a task per thread.
int64_t bwd_splits(const Problem& p, int64_t base) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || base >= 2 * threads) return 1;
  const int64_t fit = (int64_t{64} << 20) / std::max<int64_t>(1, base * p.Lk * p.D * 2 * int64_t{sizeof(float)});
  const int64_t want = std::min((2 * threads + base - 1) / base, std::max((threads + base - 1) / base, fit));
  return std::max<int64_t>(1, std::min(want, p.nqb()));
}

// The backward's tiles: as choose_tiles, but query blocks are shrunk only until every thread has
// two (choose_tiles shrinks until four, for the forward's one task per block). The backward's
// tasks are kv heads or splits of them, and a smaller block costs it more than the forward: one
// more pass over the kv head's K, V and its dK/dV accumulators per block. At B1 H1 L1024, 2
// threads, choose_tiles gave 128-row blocks and the split backward ran 1.11x faster than on one
// thread (without causal), where 256-row blocks scale like torch's own sgemm here (1.5-1.6x).
// On one thread choose_tiles' blocks: shorter blocks waste less of the causal diagonal (256-row
// blocks measured 0.85x at B1 H1 L512 causal).
Tiles bwd_tiles(int64_t batch_heads, int64_t Lq) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1) return choose_tiles(batch_heads, Lq);
  Tiles t{256, 128};
  const int64_t want = 2 * threads;
  while (t.bq > 32 && batch_heads * ((Lq + t.bq - 1) / t.bq) < want) t.bq /= 2;
  t.bq = std::max<int64_t>(1, std::min(t.bq, Lq));
  return t;
}

// Keys [0, end) that split c of sequence b touches: those its last (largest) query block sees.
int64_t split_key_end(const Problem& p, int64_t b, int64_t c, int64_t splits) {
  const int64_t nqb = p.nqb(b);
  if (c >= nqb) return 0;
  const int64_t last = c + (nqb - 1 - c) / splits * splits;
  return p.key_end(b, std::min(p.lq(b), (last + 1) * p.bq));
}

void run_bwd(const Problem& p, const Tiles& tiles, const at::Tensor& of, const at::Tensor& dof, const at::Tensor& lse,
             at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  at::Tensor dq_f = f32_output(dq), dk_f = f32_output(dk), dv_f = f32_output(dv);
  BwdIO io{io_rows(of, p, true), io_rows(dof, p, true), io_rows(dq_f, p, true), io_rows(dk_f, p, false),
           io_rows(dv_f, p, false), lse_rows(lse, p)};
  const int64_t base = p.B * p.Hkv, splits = bwd_splits(p, base);
  if (splits == 1) {
    run_tasks(
        base, [&] { return BwdScratch(tiles, p.Lk, p.D); },
        [&](int64_t t, BwdScratch& w) { bwd_kv_head(p, io, t / p.Hkv, t % p.Hkv, w); });
  } else {
    // Too few kv heads for the threads (B = 1): task (b, hk, c) takes query blocks c, c + splits, ...
    // (interleaved, so causal work is balanced) of every head of the group. It owns the dQ rows of
    // its blocks and sums dK/dV into its own [Lk, D] partial; the partials are summed afterwards in
    // a fixed order (no atomics, results independent of scheduling; memory splits x Lk x D per kv
    // head, splits <= 2 x threads). Tasks are handed out largest first (under causal the later
    // splits see more keys). Each task zeroes only the rows of its partial that it touches, on its
    // own thread: the buffers are left uninitialised here, since a serial zero fill (and the page
    // faults of a fresh allocation) on the calling thread was a serial part of every call while
    // the other threads spun.
    const int64_t part = p.Lk * p.D, group = p.H / p.Hkv;
    std::unique_ptr<float[]> dk_parts(new float[base * splits * part]), dv_parts(new float[base * splits * part]);
    std::vector<int64_t> ends(p.B * splits);  // split c of sequence b wrote (and zeroed) keys [0, ends[b, c])
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t c = 0; c < splits; ++c) ends[b * splits + c] = split_key_end(p, b, c, splits);
    }
    run_tasks(
        base * splits, [&] { return BwdScratch(tiles, p.Lk, p.D, false); },
        [&](int64_t t0, BwdScratch& w) {
          const int64_t c = splits - 1 - t0 % splits, bh = t0 / splits, b = bh / p.Hkv, hk = bh % p.Hkv;
          const int64_t t = bh * splits + c;
          w.dk_acc = dk_parts.get() + t * part;
          w.dv_acc = dv_parts.get() + t * part;
          const int64_t n = ends[b * splits + c] * p.D;
          std::fill(w.dk_acc, w.dk_acc + n, 0.f);
          std::fill(w.dv_acc, w.dv_acc + n, 0.f);
          for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            for (int64_t qb = c; qb < p.nqb(b); qb += splits) bwd_query_block(p, io, b, h, qb, w);
          }
        });
    at::parallel_for(0, base * p.Lk, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / p.Lk, j = i % p.Lk, b = bh / p.Hkv;
        if (j >= p.lk(b)) continue;
        store_kv_row(p, io, b, bh % p.Hkv, j, dk_parts.get() + bh * splits * part, dv_parts.get() + bh * splits * part,
                     splits, ends.data() + b * splits);
      }
    });
  }
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
  const Tiles tiles = bwd_tiles(q.size(0) * q.size(1), q.size(2));
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
  const Tiles tiles = bwd_tiles((cu_seqlens_q.numel() - 1) * q.size(1), max_seqlen_q);
  const KeyPlan plan = plan_keys(std::nullopt, 1, max_seqlen_k, tiles.bk);
  Problem p = make_problem(qf, kf, vf, plan, tiles, causal, scale);
  set_varlen(p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  p.fp32_delta = fp32_delta_enabled(q);
  set_dropout(p, dropout_p, seed);
  at::Tensor dq4 = packed_as_bhld(dq), dk4 = packed_as_bhld(dk), dv4 = packed_as_bhld(dv);
  run_bwd(p, tiles, of, dof, lse, dq4, dk4, dv4);
}

void tile_gemm_kernel(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm(tile_gemm_path(), ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace cpu
}  // namespace forkattn
