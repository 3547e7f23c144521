// CUDA host side of fused attention: the shared argument checks, the CUDA-only limits, params
// from tensors, and the launch on the current stream. No host synchronisation and no
// allocation that depends on data (only on shapes), so calls can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cstdint>

#include "attention.h"
#include "attention/api.h"
#include "checks.h"
#include "cuda/cuda_checks.h"
#include "common/philox.h"

namespace forkattn {
namespace {

using kernels::attention::AttentionBwdParams;
using kernels::attention::AttentionFwdParams;

// Varlen operands: the packed-sequence view of rows_aligned(t).
at::Tensor packed_aligned(const at::Tensor& t) { return packed_as_bhld(rows_aligned(t)); }

void fill_fwd(AttentionFwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out, const at::Tensor& lse,
              const AttnSizes& s, bool causal, double scale) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.out_batch_stride = out.stride(0), p.out_head_stride = out.stride(1), p.out_row_stride = out.stride(2);
  if (key_padding_mask.has_value()) {
    p.key_padding_mask = key_padding_mask->data_ptr<bool>();
    p.mask_batch_stride = key_padding_mask->stride(0);
  } else {
    p.key_padding_mask = nullptr;
    p.mask_batch_stride = 0;
  }
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);  // lse [B, H, Lq], stride 1 in Lq
  p.cu_seqlens_q = nullptr, p.cu_seqlens_k = nullptr;
  p.batch = static_cast<int>(s.batch), p.heads = static_cast<int>(s.heads), p.kv_heads = static_cast<int>(s.kv_heads);
  p.len_q = static_cast<int>(s.len_q), p.len_k = static_cast<int>(s.len_k), p.head_dim = static_cast<int>(s.head_dim);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal;
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
}

void fill_bwd(AttentionBwdParams& p, const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk,
              const at::Tensor& dv, const at::Tensor& delta) {
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.dout_batch_stride = dout.stride(0), p.dout_head_stride = dout.stride(1), p.dout_row_stride = dout.stride(2);
  p.dq_batch_stride = dq.stride(0), p.dq_head_stride = dq.stride(1), p.dq_row_stride = dq.stride(2);
  p.dk_batch_stride = dk.stride(0), p.dk_head_stride = dk.stride(1), p.dk_row_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0), p.dv_head_stride = dv.stride(1), p.dv_row_stride = dv.stride(2);
}

// Turns padded-batch params of the [1, H, total, D] views into varlen params.
void make_varlen(AttentionFwdParams& p, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k) {
  TORCH_CHECK_VALUE(cu_q.numel() - 1 <= 65535, "the cuda backend takes at most 65535 sequences, got ", cu_q.numel() - 1);
  TORCH_CHECK_VALUE(max_q >= 0 && max_k >= 0 && max_q <= INT_MAX - 256 && max_k <= INT_MAX - 256,
                    "max_seqlen_q and max_seqlen_k must be in [0, 2^31 - 256], got ", max_q, " and ", max_k);
  TORCH_CHECK_VALUE(p.len_q == 0 || max_q > 0, "max_seqlen_q must be at least 1 when q has rows");
  TORCH_CHECK_VALUE(p.len_k == 0 || max_k > 0, "max_seqlen_k must be at least 1 when k has rows");
  p.cu_seqlens_q = cu_q.data_ptr<int>();
  p.cu_seqlens_k = cu_k.data_ptr<int>();
  p.batch = static_cast<int>(cu_q.numel() - 1);
  p.len_q = static_cast<int>(max_q);
  p.len_k = static_cast<int>(max_k);
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.out_batch_stride = 0;
  p.lse_batch_stride = 0;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "forkattn attention ", what, " (cuda backend): ", cudaGetErrorString(err));
}

}  // namespace

void check_cuda_limits(const at::Tensor& q, const AttnSizes& s) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor for the cuda backend, got ", q.device());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "q must be float16 or bfloat16 for the cuda backend, got ", q.scalar_type());
  TORCH_CHECK_VALUE(s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 128,
                    "head_dim must be 32, 64 or 128 for the cuda backend, got ", s.head_dim);
  TORCH_CHECK_VALUE(s.batch <= 65535 && s.heads <= 65535,
                    "the cuda backend takes at most 65535 batches and heads (grid limit), got batch ", s.batch,
                    ", heads ", s.heads);
  TORCH_CHECK_VALUE(s.len_q <= INT_MAX - 256 && s.len_k <= INT_MAX - 256,
                    "sequence lengths must fit in int32 for the cuda backend, got len_q ", s.len_q, ", len_k ",
                    s.len_k);
  const auto* prop = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK_VALUE(prop->major >= 8, "the cuda backend needs compute capability 8.0 or newer (mma.sync bf16, ",
                    "cp.async), got ", prop->major, ".", prop->minor, " on ", q.device());
}

// The kernels move rows with 16-byte copies: a 16-byte aligned base and strides that are
// multiples of 8 elements. Anything else (an odd slice) is copied once into a fresh tensor.
at::Tensor rows_aligned(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      bool causal, double scale, double dropout_p, int64_t seed) {
  const AttnSizes s = check_attention_inputs(q_in, k_in, v_in, key_padding_mask);
  check_cuda_limits(q_in, s);
  check_dropout_p(dropout_p);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = empty_bhld(q_in, s.batch, s.heads, s.len_q, s.head_dim);
  at::Tensor lse = at::empty({s.batch, s.heads, s.len_q}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  AttentionFwdParams p{};
  fill_fwd(p, q, k, v, key_padding_mask, out, lse, s, causal, scale);
  set_dropout(p, dropout_p, seed);
  check_launch(kernels::attention::attention_fwd(p, at::cuda::getCurrentCUDAStream()), "forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double scale, double dropout_p, int64_t seed) {
  const AttnSizes s = check_attention_bwd_inputs(dout_in, q_in, k_in, v_in, out_in, lse_in, key_padding_mask);
  check_cuda_limits(q_in, s);
  check_dropout_p(dropout_p);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor dq = empty_bhld(q_in, s.batch, s.heads, s.len_q, s.head_dim);
  at::Tensor dk = empty_bhld(k_in, s.batch, s.kv_heads, s.len_k, s.head_dim);
  at::Tensor dv = empty_bhld(v_in, s.batch, s.kv_heads, s.len_k, s.head_dim);
  if (zero_grads_if_empty(s, dq, dk, dv)) return {dq, dk, dv};  // no (query, key) pair
  const at::Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  const at::Tensor out = rows_aligned(out_in), dout = rows_aligned(dout_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({s.batch, s.heads, s.len_q}, q.options().dtype(at::kFloat));
  AttentionBwdParams p{};
  fill_fwd(p, q, k, v, key_padding_mask, out, lse, s, causal, scale);
  fill_bwd(p, dout, dq, dk, dv, delta);
  set_dropout(p, dropout_p, seed);
  check_launch(kernels::attention::attention_bwd(p, at::cuda::getCurrentCUDAStream()), "backward");
  return {dq, dk, dv};
}

// --- varlen: packed sequences, cu_seqlens on the device (never read on the host) ---------------------

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k, bool causal, double scale,
                                                             double dropout_p, int64_t seed) {
  check_dropout_p(dropout_p);
  FA_CHECK_DIM_NAMED(q_in, "q", 3);
  FA_CHECK_DIM_NAMED(k_in, "k", 3);
  FA_CHECK_DIM_NAMED(v_in, "v", 3);
  check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q_in);
  const at::Tensor q4 = packed_as_bhld(q_in), k4 = packed_as_bhld(k_in), v4 = packed_as_bhld(v_in);
  const AttnSizes s = check_attention_inputs(q4, k4, v4, std::nullopt);
  check_cuda_limits(q_in, s);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty_like(q_in, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({s.heads, s.len_q}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q = packed_aligned(q_in), k = packed_aligned(k_in), v = packed_aligned(v_in);
  AttentionFwdParams p{};
  fill_fwd(p, q, k, v, std::nullopt, packed_as_bhld(out), lse.unsqueeze(0), s, causal, scale);
  make_varlen(p, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k);
  set_dropout(p, dropout_p, seed);
  check_launch(kernels::attention::attention_fwd(p, at::cuda::getCurrentCUDAStream()), "varlen forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale,
    double dropout_p, int64_t seed) {
  check_dropout_p(dropout_p);
  for (const auto& [t, name] : {std::pair{&dout_in, "dout"}, std::pair{&q_in, "q"}, std::pair{&k_in, "k"},
                                std::pair{&v_in, "v"}, std::pair{&out_in, "out"}}) {
    FA_CHECK_DIM_NAMED((*t), name, 3);
  }
  FA_CHECK_DIM_NAMED(lse_in, "lse", 2);
  check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q_in);
  check_varlen_bwd_shapes(dout_in, q_in, out_in, lse_in);
  const AttnSizes s = check_attention_bwd_inputs(packed_as_bhld(dout_in), packed_as_bhld(q_in), packed_as_bhld(k_in),
                                                 packed_as_bhld(v_in), packed_as_bhld(out_in), lse_in.unsqueeze(0),
                                                 std::nullopt);
  check_cuda_limits(q_in, s);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor dq = at::empty_like(q_in, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k_in, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v_in, at::MemoryFormat::Contiguous);
  if (zero_grads_if_empty(s, dq, dk, dv)) return {dq, dk, dv};  // no (query, key) pair
  const at::Tensor q = packed_aligned(q_in), k = packed_aligned(k_in), v = packed_aligned(v_in);
  const at::Tensor out = packed_aligned(out_in), dout = packed_aligned(dout_in);
  const at::Tensor lse = lse_in.contiguous().unsqueeze(0);
  at::Tensor delta = at::empty({1, s.heads, s.len_q}, q.options().dtype(at::kFloat));
  AttentionBwdParams p{};
  fill_fwd(p, q, k, v, std::nullopt, out, lse, s, causal, scale);
  fill_bwd(p, dout, packed_as_bhld(dq), packed_as_bhld(dk), packed_as_bhld(dv), delta);
  make_varlen(p, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k);
  p.dout_batch_stride = p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = 0;
  set_dropout(p, dropout_p, seed);
  check_launch(kernels::attention::attention_bwd(p, at::cuda::getCurrentCUDAStream()), "varlen backward");
  return {dq, dk, dv};
}

}  // namespace forkattn
