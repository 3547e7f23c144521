// Host side of fused attention: argument checks, output allocation, kernel call.
#include "attention.h"

#include <ATen/ATen.h>

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

at::Tensor empty_bhld(const at::Tensor& like, int64_t B, int64_t H, int64_t L, int64_t D) {
  return at::empty({B, L, H, D}, like.options()).transpose(1, 2);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& key_padding_mask,
                                                     bool causal, double scale) {
  const AttnSizes s = check_attention_inputs(q, k, v, key_padding_mask);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor for the cpu backend, got ", q.device());
  at::Tensor out = empty_bhld(q, s.batch, s.heads, s.len_q, s.head_dim);
  at::Tensor lse = at::empty({s.batch, s.heads, s.len_q}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    cpu::attention_fwd_kernel(q, k, v, key_padding_mask, causal, static_cast<float>(scale), out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale) {
  const AttnSizes s = check_attention_bwd_inputs(dout, q, k, v, out, lse, key_padding_mask);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor for the cpu backend, got ", q.device());
  at::Tensor dq = empty_bhld(q, s.batch, s.heads, s.len_q, s.head_dim);
  at::Tensor dk = empty_bhld(k, s.batch, s.kv_heads, s.len_k, s.head_dim);
  at::Tensor dv = empty_bhld(v, s.batch, s.kv_heads, s.len_k, s.head_dim);
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  if (s.len_q == 0 || s.len_k == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  cpu::attention_bwd_kernel(dout, q, k, v, out, lse, key_padding_mask, causal, static_cast<float>(scale), dq,
                            dk, dv);
  return {dq, dk, dv};
}

}  // namespace forkattn
