"""The host side of the CUDA attention (the CUDA attention host file in csrc/cuda/: params filling,
the aligned-rows check, the varlen and dropout fields, the fwd/bwd entry points), transcribed; the
kernels it launches are attention.py's. Tests call these entry points and patch attention.py's
module-level kernel helpers to inject bugs; the launches go through attention.py's run_* functions,
so a patch there reaches them."""
from types import SimpleNamespace

import numpy as np
import torch

from . import attention as at
from .core import GBuf, HostTensor
from .dropout import dropout_threshold16

# --- csrc/cuda/attention_cuda.cpp, transcribed --------------------------------------------------------

def packed_as_bhld(t: HostTensor) -> HostTensor:  # [total, H, D] -> unsqueeze(0).transpose(1, 2)
    (L, H, D), (sl, sh, sd) = t.shape, t.stride
    return t.view((1, H, L, D), (L * sl, sh, sl, sd))


def rows_aligned(t: torch.Tensor) -> torch.Tensor:
    ok = t.data_ptr() % 16 == 0
    for d in range(t.dim() - 1):
        ok = ok and (t.size(d) <= 1 or t.stride(d) % 8 == 0)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def empty_bhld(like, B, H, L, D):
    return torch.empty(B, L, H, D, dtype=like.dtype).transpose(1, 2)


def fill_fwd(q, k, v, mask, out, lse, causal, scale):
    B, H, Lq, D = q.shape
    p = SimpleNamespace()
    p.q, p.k, p.v, p.out, p.lse_t = q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse
    p.lse = lse.buf
    p.lse_off = lse.offset
    p.q_batch_stride, p.q_head_stride, p.q_row_stride = q.stride[:3]
    p.k_batch_stride, p.k_head_stride, p.k_row_stride = k.stride[:3]
    p.v_batch_stride, p.v_head_stride, p.v_row_stride = v.stride[:3]
    p.out_batch_stride, p.out_head_stride, p.out_row_stride = out.stride[:3]
    if mask is not None:
        p.key_padding_mask, p.mask_batch_stride = mask.ptr(), mask.stride[0]
        assert mask.stride[1] == 1  # FA_CHECK_LAST_DIM_CONTIGUOUS_NAMED
    else:
        p.key_padding_mask, p.mask_batch_stride = None, 0
    p.lse_batch_stride, p.lse_head_stride = lse.stride[0], lse.stride[1]
    assert lse.offset == 0
    p.cu_seqlens_q = p.cu_seqlens_k = None
    p.batch, p.heads, p.kv_heads = B, H, k.shape[1]
    p.len_q, p.len_k, p.head_dim = Lq, k.shape[2], D
    p.scale = float(np.float32(scale))
    p.scale_log2 = float(np.float32(scale * 1.4426950408889634))
    p.causal = causal
    return p


def fill_bwd(p, dout, dq, dk, dv, delta):
    p.dout, p.dq, p.dk, p.dv, p.delta = dout.ptr(), dq.ptr(), dk.ptr(), dv.ptr(), delta.buf
    p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride = dout.stride[:3]
    p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride = dq.stride[:3]
    p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride = dk.stride[:3]
    p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride = dv.stride[:3]


def set_dropout(p, dropout_p, seed):
    assert 0 <= dropout_p < 1  # check_dropout_p
    p.dropout = dropout_p > 0
    p.dropout_threshold = dropout_threshold16(dropout_p) if p.dropout else 0
    p.dropout_scale = float(np.float32(1.0 / (1.0 - dropout_p)))
    p.dropout_seed = int(seed) & 0xFFFFFFFFFFFFFFFF


def make_varlen(p, cu_q, cu_k, max_q, max_k):
    assert cu_q.numel() == cu_k.numel() and max_q >= 0 and max_k >= 0
    p.cu_seqlens_q = GBuf("cu_seqlens_q", cu_q.to(torch.int32).numpy())
    p.cu_seqlens_k = GBuf("cu_seqlens_k", cu_k.to(torch.int32).numpy())
    p.batch = cu_q.numel() - 1
    p.len_q, p.len_k = max_q, max_k
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.out_batch_stride = 0
    p.lse_batch_stride = 0


def _h(name, t, **kw):
    return HostTensor(name, t, **kw)


def attention_fwd_cuda(q, k, v, key_padding_mask=None, causal=False, scale=None, dropout_p=0.0, seed=0):
    """attention_fwd_cuda: q [B, H, Lq, D], k/v [B, Hkv, Lk, D] fp16 -> (out, lse)."""
    B, H, Lq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = _h("out", empty_bhld(q, B, H, Lq, D), poison=True, write_once=True)
    lse = _h("lse", torch.empty(B, H, Lq), poison=True, write_once=True)
    if out.tensor().numel() == 0:
        return out.tensor(), lse.tensor()
    qh, kh, vh = (_h(n, rows_aligned(t)) for n, t in (("q", q), ("k", k), ("v", v)))
    mh = _h("key_padding_mask", key_padding_mask) if key_padding_mask is not None else None
    p = fill_fwd(qh, kh, vh, mh, out, lse, causal, scale)
    set_dropout(p, dropout_p, seed)
    at.run_attention_fwd(p)
    return out.tensor(), lse.tensor()


def attention_bwd_cuda(dout, q, k, v, out, lse, key_padding_mask=None, causal=False, scale=None, dropout_p=0.0,
                       seed=0):
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    dq = _h("dq", empty_bhld(q, B, H, Lq, D), poison=True, write_once=True)
    dk = _h("dk", empty_bhld(k, B, Hkv, Lk, D), poison=True, write_once=True)
    dv = _h("dv", empty_bhld(v, B, Hkv, Lk, D), poison=True, write_once=True)
    if dq.tensor().numel() == 0 and dk.tensor().numel() == 0:
        return dq.tensor(), dk.tensor(), dv.tensor()
    if Lq == 0 or Lk == 0:
        return dq.tensor().zero_(), dk.tensor().zero_(), dv.tensor().zero_()
    qh, kh, vh, oh, doh = (_h(n, rows_aligned(t)) for n, t in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)))
    lseh = _h("lse", lse.contiguous())
    delta = _h("delta", torch.empty(B, H, Lq), poison=True, write_once=True)
    mh = _h("key_padding_mask", key_padding_mask) if key_padding_mask is not None else None
    p = fill_fwd(qh, kh, vh, mh, oh, lseh, causal, scale)
    fill_bwd(p, doh, dq, dk, dv, delta)
    set_dropout(p, dropout_p, seed)
    at.run_attention_bwd(p)
    return dq.tensor(), dk.tensor(), dv.tensor()


def attention_varlen_fwd_cuda(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, scale=None, dropout_p=0.0, seed=0):
    """q [total_q, H, D], k/v [total_k, Hkv, D] -> (out [total_q, H, D], lse [H, total_q])."""
    total_q, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = _h("out", torch.empty(total_q, H, D, dtype=q.dtype), poison=True, write_once=True)
    lse = _h("lse", torch.empty(H, total_q), poison=True, write_once=True)
    if out.tensor().numel() == 0:
        return out.tensor(), lse.tensor()
    qh, kh, vh = (packed_as_bhld(_h(n, rows_aligned(t))) for n, t in (("q", q), ("k", k), ("v", v)))
    lse4 = lse.view((1, H, total_q), (H * total_q, total_q, 1))  # lse.unsqueeze(0)
    p = fill_fwd(qh, kh, vh, None, packed_as_bhld(out), lse4, causal, scale)
    make_varlen(p, cu_q, cu_k, max_q, max_k)
    set_dropout(p, dropout_p, seed)
    at.run_attention_fwd(p)
    return out.tensor(), lse.tensor()


def attention_varlen_bwd_cuda(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=False, scale=None,
                              dropout_p=0.0, seed=0):
    total_q, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    dq = _h("dq", torch.empty(q.shape, dtype=q.dtype), poison=True, write_once=True)
    dk = _h("dk", torch.empty(k.shape, dtype=k.dtype), poison=True, write_once=True)
    dv = _h("dv", torch.empty(v.shape, dtype=v.dtype), poison=True, write_once=True)
    if dq.tensor().numel() == 0 and dk.tensor().numel() == 0:
        return dq.tensor(), dk.tensor(), dv.tensor()
    if total_q == 0 or k.shape[0] == 0:
        return dq.tensor().zero_(), dk.tensor().zero_(), dv.tensor().zero_()
    qh, kh, vh, oh, doh = (packed_as_bhld(_h(n, rows_aligned(t))) for n, t in
                           (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)))
    lse4 = _h("lse", lse.contiguous()).view((1, H, total_q), (H * total_q, total_q, 1))
    delta = _h("delta", torch.empty(1, H, total_q), poison=True, write_once=True)
    p = fill_fwd(qh, kh, vh, None, oh, lse4, causal, scale)
    fill_bwd(p, doh, packed_as_bhld(dq), packed_as_bhld(dk), packed_as_bhld(dv), delta)
    make_varlen(p, cu_q, cu_k, max_q, max_k)
    p.dout_batch_stride = p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = 0
    set_dropout(p, dropout_p, seed)
    at.run_attention_bwd(p)
    return dq.tensor(), dk.tensor(), dv.tensor()
