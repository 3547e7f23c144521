// Host side of fused attention: argument checks, output allocation, kernel call.
#include "attention.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "checks.h"

namespace forkattn {

AttnSizes check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& key_padding_mask) {
  FA_CHECK_DIM(q, 4);
  FA_CHECK_DIM(k, 4);
  FA_CHECK_DIM(v, 4);
  FA_CHECK_FLOATING(q);
  FA_CHECK_DTYPE(k, q.scalar_type());
  FA_CHECK_DTYPE(v, q.scalar_type());
  FA_CHECK_DEVICE(k, q.device());
  FA_CHECK_DEVICE(v, q.device());
  FA_CHECK_LAST_DIM_CONTIGUOUS(q);
  FA_CHECK_LAST_DIM_CONTIGUOUS(k);
  FA_CHECK_LAST_DIM_CONTIGUOUS(v);
  const AttnSizes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  FA_CHECK_SIZE(k, 0, s.batch);
  FA_CHECK_SIZE(v, 0, s.batch);
  FA_CHECK_SIZE(v, 1, s.kv_heads);
  FA_CHECK_SIZE(v, 2, s.len_k);
  FA_CHECK_SIZE(k, 3, s.head_dim);
  FA_CHECK_SIZE(v, 3, s.head_dim);
  TORCH_CHECK_VALUE(s.kv_heads > 0 && s.heads % s.kv_heads == 0, "q has ", s.heads,
                    " heads, which must be a multiple of k's and v's ", s.kv_heads, " heads");
  TORCH_CHECK_VALUE(s.head_dim > 0 && s.head_dim <= 256, "head_dim must be in [1, 256], got ", s.head_dim);
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    FA_CHECK_DIM_NAMED(m, "key_padding_mask", 2);
    FA_CHECK_DTYPE_NAMED(m, "key_padding_mask", at::kBool);
    FA_CHECK_DEVICE_NAMED(m, "key_padding_mask", q.device());
    FA_CHECK_SIZE_NAMED(m, "key_padding_mask", 0, s.batch);
    FA_CHECK_SIZE_NAMED(m, "key_padding_mask", 1, s.len_k);
    FA_CHECK_LAST_DIM_CONTIGUOUS_NAMED(m, "key_padding_mask");
  }
  return s;
}

AttnSizes check_attention_bwd_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& key_padding_mask) {
  const AttnSizes s = check_attention_inputs(q, k, v, key_padding_mask);
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), name, " must have q's shape ", q.sizes(), ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(),
                     ", got ", t->scalar_type());
    FA_CHECK_DEVICE_NAMED((*t), name, q.device());
    FA_CHECK_LAST_DIM_CONTIGUOUS_NAMED((*t), name);
  }
  FA_CHECK_DTYPE(lse, at::kFloat);
  FA_CHECK_DEVICE(lse, q.device());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.heads && lse.size(2) == s.len_q,
                    "lse must have shape [", s.batch, ", ", s.heads, ", ", s.len_q, "], got ", lse.sizes());
  return s;
}

void check_dropout_p(double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
}

bool zero_grads_if_empty(const AttnSizes& s, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  if (s.batch > 0 && s.len_q > 0 && s.len_k > 0 && s.heads > 0) return false;
  dq.zero_();  // no-ops on empty tensors
  dk.zero_();
  dv.zero_();
  return true;
}

at::Tensor empty_bhld(const at::Tensor& like, int64_t B, int64_t H, int64_t L, int64_t D) {
  return at::empty({B, L, H, D}, like.options()).transpose(1, 2);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& key_padding_mask,
                                                     bool causal, double scale, double dropout_p, int64_t seed) {
  const AttnSizes s = check_attention_inputs(q, k, v, key_padding_mask);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor for the cpu backend, got ", q.device());
  check_dropout_p(dropout_p);
  at::Tensor out = empty_bhld(q, s.batch, s.heads, s.len_q, s.head_dim);
  at::Tensor lse = at::empty({s.batch, s.heads, s.len_q}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    FORKATTN_CPU_DISPATCH(attention_fwd_kernel)(q, k, v, key_padding_mask, causal, static_cast<float>(scale), dropout_p, seed, out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale, double dropout_p, int64_t seed) {
  const AttnSizes s = check_attention_bwd_inputs(dout, q, k, v, out, lse, key_padding_mask);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor for the cpu backend, got ", q.device());
  check_dropout_p(dropout_p);
  at::Tensor dq = empty_bhld(q, s.batch, s.heads, s.len_q, s.head_dim);
  at::Tensor dk = empty_bhld(k, s.batch, s.kv_heads, s.len_k, s.head_dim);
  at::Tensor dv = empty_bhld(v, s.batch, s.kv_heads, s.len_k, s.head_dim);
  if (zero_grads_if_empty(s, dq, dk, dv)) return {dq, dk, dv};
  FORKATTN_CPU_DISPATCH(attention_bwd_kernel)(dout, q, k, v, out, lse, key_padding_mask, causal, static_cast<float>(scale), dropout_p,
                            seed, dq, dk, dv);
  return {dq, dk, dv};
}

// --- varlen ---------------------------------------------------------------------------------------

at::Tensor packed_as_bhld(const at::Tensor& t) { return t.unsqueeze(0).transpose(1, 2); }

void check_cu_seqlens(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const at::Tensor& q) {
  for (const auto& [cu, name] : {std::pair{&cu_seqlens_q, "cu_seqlens_q"}, std::pair{&cu_seqlens_k, "cu_seqlens_k"}}) {
    FA_CHECK_DTYPE_NAMED((*cu), name, at::kInt);
    FA_CHECK_DIM_NAMED((*cu), name, 1);
    FA_CHECK_DEVICE_NAMED((*cu), name, q.device());
    TORCH_CHECK_VALUE(cu->numel() >= 2, name, " must have batch + 1 >= 2 entries, got ", cu->numel());
  }
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() == cu_seqlens_k.numel(),
                    "cu_seqlens_q and cu_seqlens_k must have the same length, got ", cu_seqlens_q.numel(), " and ",
                    cu_seqlens_k.numel());
}

void check_varlen_bwd_shapes(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), name, " must have q's shape [total_q, heads, head_dim] = ", q.sizes(),
                      ", got ", t->sizes());
  }
  FA_CHECK_DTYPE(lse, at::kFloat);
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0),
                    "lse must have shape [heads, total_q] = [", q.size(1), ", ", q.size(0), "], got ", lse.sizes());
}

namespace {

// Host values of one cu_seqlens (CPU tensors only): 0, non-decreasing, ends at total, every
// sequence at most max_seqlen long. The kernels index rows with these: checked, never trusted.
void check_cu_values(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen,
                     const char* max_name) {
  const at::Tensor c = cu.contiguous();
  const int* v = c.data_ptr<int>();
  const int64_t n = c.numel();
  TORCH_CHECK_VALUE(v[0] == 0, name, " must start at 0, got ", v[0]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    TORCH_CHECK_VALUE(v[i + 1] >= v[i], name, " must be non-decreasing, got ", name, "[", i, "] = ", v[i], " > ",
                      name, "[", i + 1, "] = ", v[i + 1]);
    TORCH_CHECK_VALUE(v[i + 1] - v[i] <= max_seqlen, max_name, " = ", max_seqlen,
                      " is smaller than sequence ", i, " of ", name, " (", v[i + 1] - v[i], ")");
  }
  TORCH_CHECK_VALUE(v[n - 1] == total, name, "[-1] must equal the packed length ", total, ", got ", v[n - 1]);
}

AttnSizes check_varlen_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                           int64_t max_seqlen_k) {
  FA_CHECK_DIM(q, 3);
  FA_CHECK_DIM(k, 3);
  FA_CHECK_DIM(v, 3);
  check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q);
  const AttnSizes s = check_attention_inputs(packed_as_bhld(q), packed_as_bhld(k), packed_as_bhld(v), std::nullopt);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor for the cpu backend, got ", q.device());
  check_cu_values(cu_seqlens_q, "cu_seqlens_q", s.len_q, max_seqlen_q, "max_seqlen_q");
  check_cu_values(cu_seqlens_k, "cu_seqlens_k", s.len_k, max_seqlen_k, "max_seqlen_k");
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, bool causal, double scale,
                                                            double dropout_p, int64_t seed) {
  const AttnSizes s = check_varlen_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_dropout_p(dropout_p);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({s.heads, s.len_q}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    FORKATTN_CPU_DISPATCH(attention_varlen_fwd_kernel)(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                     static_cast<float>(scale), dropout_p, seed, out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale, double dropout_p, int64_t seed) {
  check_dropout_p(dropout_p);
  FA_CHECK_DIM(dout, 3);
  FA_CHECK_DIM(out, 3);
  FA_CHECK_DIM(lse, 2);
  const AttnSizes s = check_varlen_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_varlen_bwd_shapes(dout, q, out, lse);
  check_attention_bwd_inputs(packed_as_bhld(dout), packed_as_bhld(q), packed_as_bhld(k), packed_as_bhld(v),
                             packed_as_bhld(out), lse.unsqueeze(0), std::nullopt);
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (zero_grads_if_empty(s, dq, dk, dv)) return {dq, dk, dv};
  FORKATTN_CPU_DISPATCH(attention_varlen_bwd_kernel)(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   causal, static_cast<float>(scale), dropout_p, seed, dq, dk, dv);
  return {dq, dk, dv};
}

// Extent of a column-major [rows, cols] operand with leading dimension ld, checked against its buffer.
static void check_operand(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, int64_t ld) {
  FA_CHECK_DTYPE_NAMED(t, name, at::kFloat);
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous(), name,
                    " must be a contiguous 1-D CPU tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0 && ld >= std::max<int64_t>(1, rows), name, ": need ld >= max(1, ",
                    rows, "), got ", ld);
  const int64_t extent = rows == 0 || cols == 0 ? 0 : ld * (cols - 1) + rows;
  TORCH_CHECK_VALUE(t.numel() >= extent, name, " holds ", t.numel(), " floats, the ", rows, " x ", cols,
                    " operand with ld ", ld, " needs ", extent);
}

at::Tensor tile_gemm_cpu(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const at::Tensor& a,
                         int64_t lda, const at::Tensor& b, int64_t ldb, double beta, at::Tensor c, int64_t ldc) {
  check_operand(a, "a", ta ? k : m, ta ? m : k, lda);
  check_operand(b, "b", tb ? n : k, tb ? k : n, ldb);
  check_operand(c, "c", m, n, ldc);
  FORKATTN_CPU_DISPATCH(tile_gemm_kernel)(ta, tb, m, n, k, static_cast<float>(alpha), a.data_ptr<float>(), lda,
                                          b.data_ptr<float>(), ldb, static_cast<float>(beta), c.data_ptr<float>(), ldc);
  return c;
}

}  // namespace forkattn
