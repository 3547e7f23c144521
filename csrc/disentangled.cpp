// Host side of disentangled attention: argument checks, output allocation, kernel call.
#include "disentangled.h"

#include <ATen/ATen.h>

#include "attention.h"
#include "checks.h"
#ifdef FORKATTN_WITH_CUDA
#include "cuda/cuda_checks.h"
#endif

namespace forkattn {
namespace {

// pos_key / pos_query: present exactly when its term is on, [H or 1, rows, D] in q's dtype on q's
// device with unit stride in D. Returns it expanded to H heads (undefined when the term is off).
at::Tensor check_pos(const std::optional<at::Tensor>& pos, const char* name, bool used, const char* flag,
                     const at::Tensor& q, const AttnSizes& s) {
  if (!used) {
    TORCH_CHECK_VALUE(!pos.has_value(), name, " must be None when ", flag, "=False (its term is off)");
    return at::Tensor();
  }
  TORCH_CHECK_VALUE(pos.has_value(), name, " must be a tensor [heads or 1, 2 * span, head_dim] when ", flag,
                    "=True, got None");
  const at::Tensor& p = *pos;
  FA_CHECK_DIM_NAMED(p, name, 3);
  TORCH_CHECK_VALUE((p.size(0) == s.heads || p.size(0) == 1) && p.size(2) == s.head_dim, name,
                    " must be [heads or 1, 2 * span, head_dim] = [", s.heads, " or 1, 2 * span, ", s.head_dim,
                    "], got shape ", p.sizes());
  TORCH_CHECK_VALUE(p.size(1) >= 1, name, " must have at least one row (2 * span), got shape ", p.sizes());
  FA_CHECK_DTYPE_NAMED(p, name, q.scalar_type());
  FA_CHECK_DEVICE_NAMED(p, name, q.device());
  FA_CHECK_LAST_DIM_CONTIGUOUS_NAMED(p, name);
  return p.expand({s.heads, p.size(1), p.size(2)});
}

struct DisentangledInputs {
  AttnSizes s;
  at::Tensor pos_key, pos_query;  // [H, rows, D], undefined for a term that is off
};

// rel_index: int64 [Lq + Lk - 1] on q's device, every entry a row of the position embeddings (the
// kernel reads pos rows through it: checked, never trusted).
void check_rel_index(const at::Tensor& rel_index, const AttnSizes& s, int64_t pos_rows, const at::Tensor& q) {
  FA_CHECK_DTYPE(rel_index, at::kLong);
  FA_CHECK_DIM(rel_index, 1);
  TORCH_CHECK_VALUE(rel_index.device() == q.device(), "rel_index must be on q's device ", q.device(), " (the ",
                    q.is_cuda() ? "cuda" : "cpu", " backend), got ", rel_index.device());
  const int64_t n = std::max<int64_t>(s.len_q + s.len_k - 1, 0);
  TORCH_CHECK_VALUE(rel_index.numel() == n, "rel_index must have len_q + len_k - 1 = ", n, " entries, got ",
                    rel_index.numel());
  if (pos_rows < 0 || n == 0) return;  // no relative term: the table is not read
  if (!rel_index.device().is_cpu()) {  // one device reduction and a synchronisation
    const auto [lo, hi] = at::aminmax(rel_index);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < pos_rows, "rel_index's entries must name rows of pos_key / pos_query, ",
                      "which have 2 * span = ", pos_rows, " rows; got entries from ", lo_v, " to ", hi_v);
    return;
  }
  const at::Tensor t = rel_index.contiguous();
  const int64_t* v = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(v[i] >= 0 && v[i] < pos_rows, "rel_index[", i, "] = ", v[i],
                      " names no row of pos_key / pos_query, which have 2 * span = ", pos_rows, " rows");
  }
}

DisentangledInputs check_disentangled_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& pos_key,
                                             const std::optional<at::Tensor>& pos_query,
                                             const at::Tensor& rel_index,
                                             const std::optional<at::Tensor>& key_padding_mask, bool c2p, bool p2c,
                                             bool cuda = false) {
  DisentangledInputs in{check_attention_inputs(q, k, v, key_padding_mask)};
  if (!cuda) {
    TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor for the cpu backend, got ", q.device());
  }
#ifdef FORKATTN_WITH_CUDA
  if (cuda) check_cuda_limits(q, in.s);
#endif
  TORCH_CHECK_VALUE(in.s.kv_heads == in.s.heads, "k and v must have q's ", in.s.heads,
                    " heads (disentangled attention has no grouped keys), got ", in.s.kv_heads);
  in.pos_key = check_pos(pos_key, "pos_key", c2p, "c2p", q, in.s);
  in.pos_query = check_pos(pos_query, "pos_query", p2c, "p2c", q, in.s);
  if (c2p && p2c) {
    TORCH_CHECK_VALUE(in.pos_key.size(1) == in.pos_query.size(1), "pos_key and pos_query must have the same ",
                      "number of rows (2 * span), got ", in.pos_key.size(1), " and ", in.pos_query.size(1));
  }
  const int64_t pos_rows = c2p ? in.pos_key.size(1) : p2c ? in.pos_query.size(1) : -1;
  check_rel_index(rel_index, in.s, pos_rows, q);
  return in;
}

at::Tensor dpos_like(const at::Tensor& pos, const at::Tensor& q) {
  return pos.defined() ? at::empty(pos.sizes(), q.options()) : at::empty({0}, q.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> disentangled_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& pos_key,
    const std::optional<at::Tensor>& pos_query, const at::Tensor& rel_index,
    const std::optional<at::Tensor>& key_padding_mask, double scale, bool c2p, bool p2c, double dropout_p,
    int64_t seed) {
  const DisentangledInputs in =
      check_disentangled_inputs(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, c2p, p2c);
  check_dropout_p(dropout_p);
  const AttnSizes& s = in.s;
  at::Tensor out = empty_bhld(q, s.batch, s.heads, s.len_q, s.head_dim);
  at::Tensor lse = at::empty({s.batch, s.heads, s.len_q}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    FORKATTN_CPU_DISPATCH(disentangled_attention_fwd_kernel)(q, k, v, in.pos_key, in.pos_query, rel_index, key_padding_mask,
                                           static_cast<float>(scale), dropout_p, seed, out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> disentangled_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
    double scale, bool c2p, bool p2c, double dropout_p, int64_t seed, bool want_dpos_key, bool want_dpos_query) {
  const DisentangledInputs in =
      check_disentangled_inputs(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, c2p, p2c);
  check_dropout_p(dropout_p);
  const AttnSizes s = check_attention_bwd_inputs(dout, q, k, v, out, lse, key_padding_mask);
  at::Tensor dq = empty_bhld(q, s.batch, s.heads, s.len_q, s.head_dim);
  at::Tensor dk = empty_bhld(k, s.batch, s.kv_heads, s.len_k, s.head_dim);
  at::Tensor dv = empty_bhld(v, s.batch, s.kv_heads, s.len_k, s.head_dim);
  // A dpos gradient nobody wants is returned empty ({0}) and its products (a sixth of the backward's) skipped.
  at::Tensor dpk = dpos_like(want_dpos_key ? in.pos_key : at::Tensor(), q);
  at::Tensor dpq = dpos_like(want_dpos_query ? in.pos_query : at::Tensor(), q);
  if (zero_grads_if_empty(s, dq, dk, dv)) {
    dpk.zero_();
    dpq.zero_();
    return {dq, dk, dv, dpk, dpq};
  }
  at::Tensor dpk_arg = dpk.numel() > 0 ? dpk : at::Tensor(), dpq_arg = dpq.numel() > 0 ? dpq : at::Tensor();
  FORKATTN_CPU_DISPATCH(disentangled_attention_bwd_kernel)(dout, q, k, v, in.pos_key, in.pos_query, out, lse, rel_index,
                                         key_padding_mask, static_cast<float>(scale), dropout_p, seed, dq, dk, dv,
                                         dpk_arg, dpq_arg);
  return {dq, dk, dv, dpk, dpq};
}

#ifdef FORKATTN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> disentangled_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& pos_key,
    const std::optional<at::Tensor>& pos_query, const at::Tensor& rel_index,
    const std::optional<at::Tensor>& key_padding_mask, double scale, bool c2p, bool p2c, double dropout_p,
    int64_t seed) {
  const DisentangledInputs in =
      check_disentangled_inputs(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, c2p, p2c, /*cuda=*/true);
  check_dropout_p(dropout_p);
  const AttnSizes& s = in.s;
  at::Tensor out = empty_bhld(q, s.batch, s.heads, s.len_q, s.head_dim);
  at::Tensor lse = at::empty({s.batch, s.heads, s.len_q}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    cuda::disentangled_attention_fwd_launch(q, k, v, in.pos_key, in.pos_query, rel_index.contiguous(),
                                            key_padding_mask, scale, dropout_p, seed, out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> disentangled_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
    double scale, bool c2p, bool p2c, double dropout_p, int64_t seed) {
  const DisentangledInputs in =
      check_disentangled_inputs(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, c2p, p2c, /*cuda=*/true);
  check_dropout_p(dropout_p);
  const AttnSizes s = check_attention_bwd_inputs(dout, q, k, v, out, lse, key_padding_mask);
  at::Tensor dq = empty_bhld(q, s.batch, s.heads, s.len_q, s.head_dim);
  at::Tensor dk = empty_bhld(k, s.batch, s.kv_heads, s.len_k, s.head_dim);
  at::Tensor dv = empty_bhld(v, s.batch, s.kv_heads, s.len_k, s.head_dim);
  // fp32 accumulators of the kernels' atomic adds, [H, rows, D] contiguous
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dpk = in.pos_key.defined() ? at::zeros(in.pos_key.sizes(), f32) : at::Tensor();
  at::Tensor dpq = in.pos_query.defined() ? at::zeros(in.pos_query.sizes(), f32) : at::Tensor();
  auto finish = [&](const at::Tensor& acc) {
    return acc.defined() ? acc.mul_(scale).to(q.scalar_type()) : at::empty({0}, q.options());
  };
  if (zero_grads_if_empty(s, dq, dk, dv)) return {dq, dk, dv, finish(dpk), finish(dpq)};
  // Delta = rowsum(dout * out) from the stored output (FlashAttention's choice): [B, H, Lq] fp32
  const at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  cuda::disentangled_attention_bwd_launch(dout, q, k, v, in.pos_key, in.pos_query, lse.contiguous(), delta,
                                          rel_index.contiguous(), key_padding_mask, scale, dropout_p, seed, dq, dk,
                                          dv, dpk, dpq);
  return {dq, dk, dv, finish(dpk), finish(dpq)};
}
#endif  // FORKATTN_WITH_CUDA

}  // namespace forkattn
