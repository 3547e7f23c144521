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

void disentangled_attention_fwd_launch(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                       const at::Tensor& pos_key_in, const at::Tensor& pos_query_in,
                                       const at::Tensor& rel_index, const std::optional<at::Tensor>& key_padding_mask,
                                       double scale, at::Tensor& out, at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  const at::Tensor pk = pos_key_in.defined() ? rows_aligned(pos_key_in) : at::Tensor();
  const at::Tensor pq = pos_query_in.defined() ? rows_aligned(pos_query_in) : at::Tensor();
  kernels::disentangled::DisentangledFwdParams p{};
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
  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0), p.out_head_stride = out.stride(1), p.out_row_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);  // lse [B, H, Lq], stride 1 in Lq
  p.batch = static_cast<int>(q.size(0)), p.heads = static_cast<int>(q.size(1));
  p.len_q = static_cast<int>(q.size(2)), p.len_k = static_cast<int>(k.size(2)), p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  const cudaError_t err = kernels::disentangled::disentangled_fwd(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "forkattn disentangled attention forward (cuda backend): ", cudaGetErrorString(err));
}

}  // namespace forkattn::cuda
