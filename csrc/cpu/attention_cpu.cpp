// CPU attention kernels: a simple row-at-a-time online-softmax version (correct, not fast).
// TEMPORARY: to be replaced by the blocked, vectorized kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"

namespace forkattn {
namespace cpu {
namespace {

struct View4 {
  int64_t s0, s1, s2;  // strides of batch, head, seq (head_dim stride is 1)
};
View4 view(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
              int64_t mask_s0, bool causal, float scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), group = H / Hkv;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const View4 qs = view(q), ks = view(k), vs = view(v), os = view(out), ls = view(lse.unsqueeze(-1));
  at::parallel_for(0, B * H * Lq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D), qrow(D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (H * Lq), h = (idx / Lq) % H, i = idx % Lq, hk = h / group;
      const T* qi = qp + b * qs.s0 + h * qs.s1 + i * qs.s2;
      for (int64_t d = 0; d < D; ++d) qrow[d] = static_cast<float>(qi[d]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      float m = -std::numeric_limits<float>::infinity(), l = 0.f;
      const int64_t jend = causal ? std::min(Lk, i + (Lk - Lq) + 1) : Lk;
      for (int64_t j = 0; j < jend; ++j) {
        if (mask && !mask[b * mask_s0 + j]) continue;
        const T* kj = kp + b * ks.s0 + hk * ks.s1 + j * ks.s2;
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qrow[d] * static_cast<float>(kj[d]);
        const float m_new = std::max(m, s);
        const float corr = std::exp(m - m_new), p = std::exp(s - m_new);
        l = l * corr + p;
        const T* vj = vp + b * vs.s0 + hk * vs.s1 + j * vs.s2;
        for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * corr + p * static_cast<float>(vj[d]);
        m = m_new;
      }
      T* oi = op + b * os.s0 + h * os.s1 + i * os.s2;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<T>(acc[d] * inv);
      lp[b * ls.s0 + h * ls.s1 + i * ls.s2] = l > 0.f ? m + std::log(l) : std::numeric_limits<float>::infinity();
    }
  });
}

template <typename T>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const bool* mask, int64_t mask_s0, bool causal,
              float scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), group = H / Hkv;
  const at::Tensor lse_c = lse.contiguous();
  const float* lp = lse_c.data_ptr<float>();
  const View4 qs = view(q), ks = view(k), vs = view(v), os = view(out), dos = view(dout), dqs = view(dq),
              dks = view(dk), dvs = view(dv);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dkacc(Lk * D), dvacc(Lk * D), dqacc(D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / Hkv, hk = idx % Hkv;
      std::fill(dkacc.begin(), dkacc.end(), 0.f);
      std::fill(dvacc.begin(), dvacc.end(), 0.f);
      const T* kb = k.data_ptr<T>() + b * ks.s0 + hk * ks.s1;
      const T* vb = v.data_ptr<T>() + b * vs.s0 + hk * vs.s1;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i = 0; i < Lq; ++i) {
          const T* qi = q.data_ptr<T>() + b * qs.s0 + h * qs.s1 + i * qs.s2;
          const T* oi = out.data_ptr<T>() + b * os.s0 + h * os.s1 + i * os.s2;
          const T* doi = dout.data_ptr<T>() + b * dos.s0 + h * dos.s1 + i * dos.s2;
          const float L = lp[(b * H + h) * Lq + i];
          float delta = 0.f;
          for (int64_t d = 0; d < D; ++d) delta += static_cast<float>(doi[d]) * static_cast<float>(oi[d]);
          std::fill(dqacc.begin(), dqacc.end(), 0.f);
          const int64_t jend = std::isinf(L) ? 0 : (causal ? std::min(Lk, i + (Lk - Lq) + 1) : Lk);
          for (int64_t j = 0; j < jend; ++j) {
            if (mask && !mask[b * mask_s0 + j]) continue;
            const T* kj = kb + j * ks.s2;
            const T* vj = vb + j * vs.s2;
            float s = 0.f, dp = 0.f;
            for (int64_t d = 0; d < D; ++d) {
              s += static_cast<float>(qi[d]) * static_cast<float>(kj[d]);
              dp += static_cast<float>(doi[d]) * static_cast<float>(vj[d]);
            }
            const float p = std::exp(s * scale - L);
            const float ds = p * (dp - delta) * scale;
            for (int64_t d = 0; d < D; ++d) {
              dqacc[d] += ds * static_cast<float>(kj[d]);
              dkacc[j * D + d] += ds * static_cast<float>(qi[d]);
              dvacc[j * D + d] += p * static_cast<float>(doi[d]);
            }
          }
          T* dqi = dq.data_ptr<T>() + b * dqs.s0 + h * dqs.s1 + i * dqs.s2;
          for (int64_t d = 0; d < D; ++d) dqi[d] = static_cast<T>(dqacc[d]);
        }
      }
      for (int64_t j = 0; j < Lk; ++j) {
        T* dkj = dk.data_ptr<T>() + b * dks.s0 + hk * dks.s1 + j * dks.s2;
        T* dvj = dv.data_ptr<T>() + b * dvs.s0 + hk * dvs.s1 + j * dvs.s2;
        for (int64_t d = 0; d < D; ++d) {
          dkj[d] = static_cast<T>(dkacc[j * D + d]);
          dvj[d] = static_cast<T>(dvacc[j * D + d]);
        }
      }
    }
  });
}

}  // namespace

void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_padding_mask, bool causal, float scale,
                          at::Tensor& out, at::Tensor& lse) {
  const bool* mask = key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr;
  const int64_t mask_s0 = key_padding_mask ? key_padding_mask->stride(0) : 0;
  TORCH_CHECK(!key_padding_mask || key_padding_mask->stride(1) == 1 || key_padding_mask->size(1) <= 1,
              "key_padding_mask must be contiguous in its last dimension");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    fwd_impl<scalar_t>(q, k, v, mask, mask_s0, causal, scale, out, lse);
  });
}

void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          const std::optional<at::Tensor>& key_padding_mask, bool causal, float scale,
                          at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const bool* mask = key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr;
  const int64_t mask_s0 = key_padding_mask ? key_padding_mask->stride(0) : 0;
  TORCH_CHECK(!key_padding_mask || key_padding_mask->stride(1) == 1 || key_padding_mask->size(1) <= 1,
              "key_padding_mask must be contiguous in its last dimension");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    bwd_impl<scalar_t>(dout, q, k, v, out, lse, mask, mask_s0, causal, scale, dq, dk, dv);
  });
}

}  // namespace cpu
}  // namespace forkattn
