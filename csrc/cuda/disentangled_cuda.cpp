// CUDA host side of DeBERTa's disentangled attention (kernels/disentangled): params from tensors
// already checked by csrc/disentangled.cpp, and the launch on the current stream. Inputs that
// are not 16-byte row aligned are copied once (rows_aligned).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/cuda_checks.h"
#include "disentangled.h"
#include "disentangled/api.h"

namespace forkattn::cuda {

namespace {

void fill_fwd(kernels::disentangled::DisentangledFwdParams& p, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pq, const at::Tensor& rel_index,
              const std::optional<at::Tensor>& key_padding_mask, double scale) {
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.c2p = pk.defined(), p.p2c = pq.defined();
  if (p.c2p) p.pos_key = pk.data_ptr(), p.pk_head_stride = pk.stride(0), p.pk_row_stride = pk.stride(1);
  if (p.p2c) p.pos_query = pq.data_ptr(), p.pq_head_stride = pq.stride(0), p.pq_row_stride = pq.stride(1);
  p.rel_index = rel_index.data_ptr<int64_t>();
  if (key_padding_mask.has_value()) {
    p.key_padding_mask = key_padding_mask->data_ptr<bool>();
    p.mask_batch_stride = key_padding_mask->stride(0);
  }
  p.batch = static_cast<int>(q.size(0)), p.heads = static_cast<int>(q.size(1));
  p.len_q = static_cast<int>(q.size(2)), p.len_k = static_cast<int>(k.size(2)), p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
}

at::Tensor aligned_or_none(const at::Tensor& t) { return t.defined() ? rows_aligned(t) : at::Tensor(); }

}  // namespace

void disentangled_attention_fwd_launch(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                       const at::Tensor& pos_key_in, const at::Tensor& pos_query_in,
                                       const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
                                       double scale, double dropout_p, int64_t seed, at::Tensor& out,
                                       at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  kernels::disentangled::DisentangledFwdParams p{};
  fill_fwd(p, q, k, v, aligned_or_none(pos_key_in), aligned_or_none(pos_query_in), rel_index, key_padding_mask,
           scale);
  set_dropout(p, dropout_p, seed);
  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0), p.out_head_stride = out.stride(1), p.out_row_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);  // lse [B, H, Lq], stride 1 in Lq
  const cudaError_t err = kernels::disentangled::disentangled_fwd(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "forkattn disentangled attention forward (cuda backend): ", cudaGetErrorString(err));
}

void disentangled_attention_bwd_launch(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                       const at::Tensor& v_in, const at::Tensor& pos_key_in,
                                       const at::Tensor& pos_query_in, const at::Tensor& lse, const at::Tensor& delta,
                                       const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
                                       double scale, double dropout_p, int64_t seed, at::Tensor& dq,
                                       at::Tensor& dk, at::Tensor& dv, at::Tensor& dpos_key_acc,
                                       at::Tensor& dpos_query_acc) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  const at::Tensor dout = rows_aligned(dout_in);
  kernels::disentangled::DisentangledBwdParams p{};
  fill_fwd(p, q, k, v, aligned_or_none(pos_key_in), aligned_or_none(pos_query_in), rel_index, key_padding_mask,
           scale);
  set_dropout(p, dropout_p, seed);  // the forward's mask, redrawn
  p.lse = const_cast<float*>(lse.data_ptr<float>());  // read only in the backward
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  p.delta = delta.data_ptr<float>();  // laid out like lse (both contiguous [B, H, Lq])
  p.dout = dout.data_ptr();
  p.dout_batch_stride = dout.stride(0), p.dout_head_stride = dout.stride(1), p.dout_row_stride = dout.stride(2);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.dq_batch_stride = dq.stride(0), p.dq_head_stride = dq.stride(1), p.dq_row_stride = dq.stride(2);
  p.dk_batch_stride = dk.stride(0), p.dk_head_stride = dk.stride(1), p.dk_row_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0), p.dv_head_stride = dv.stride(1), p.dv_row_stride = dv.stride(2);
  const at::Tensor& acc = dpos_key_acc.defined() ? dpos_key_acc : dpos_query_acc;
  if (dpos_key_acc.defined()) p.dpos_key = dpos_key_acc.data_ptr<float>();
  if (dpos_query_acc.defined()) p.dpos_query = dpos_query_acc.data_ptr<float>();
  if (acc.defined()) p.dpos_head_stride = acc.stride(0), p.dpos_row_stride = acc.stride(1);
  const cudaError_t err = kernels::disentangled::disentangled_bwd(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "forkattn disentangled attention backward (cuda backend): ",
              cudaGetErrorString(err));
}

}  // namespace forkattn::cuda
