"""Triton fused attention, forward and backward: the "triton" backend of forkattn.attention and
forkattn.attention_varlen.

The kernels are in attention_fwd.py and attention_bwd.py; this module holds their configurations
(autotune sets, the keep() filter), the launchers and the entry points. One set of kernels serves
both entry points. A tensor is described by a base pointer and three
strides (batch, head, row) with stride 1 in head_dim; the padded layout [B, H, L, D] has a batch
stride, the packed varlen layout [total, H, D] has batch stride 0 and per-sequence row offsets read
from cu_seqlens on the device (no host sync, CUDA-graph friendly).

Math (FlashAttention-2): online softmax in base 2 (scores scaled by scale*log2 e) with fp32
accumulators; the forward stores lse in natural log (float32, +inf for a row with no visible key,
whose output is zeros). Dropout (HAS_DROPOUT, a constexpr: dropout_p = 0 compiles the kernels
without it) drops the probabilities after the normalizer l is summed (so lse is that of the plain
softmax) with kernels/common/philox.h's mask, drawn by tl.philox from the seed and (b, h, i, j); the
backward redraws it, and Delta = rowsum(dO * O) stays right because O already holds the dropout. The backward is Delta = rowsum(dO * O), then one kernel per key block for
dK/dV (looping over the q heads of its GQA group, so no atomics) and one per query block for dQ.

Masking: causal is bottom-right aligned (query i sees key j iff j <= i + Lk - Lq). Key blocks that no
row of a query block can see are never visited: the causal bound cuts the loop, and with a
key_padding_mask the loop runs only over [first valid key, last valid key] of that batch (computed
on the device by two reductions), so the right-padding of a BERT batch costs nothing. Key blocks that
every row sees fully run without the causal test; only the diagonal blocks run the masked stage.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from .._layout import empty_bhld
from ..philox import dropout_threshold
from . import interpreting
from .attention_bwd import _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
from .attention_fwd import _attn_fwd_kernel

LOG2E = 1.4426950408889634


# --- configurations ---------------------------------------------------------------------------------

def _configs(*specs):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> triton.Config."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in specs]


# A curated set rather than the full product: every config costs a compile and a timing per
# autotune key on first use (a full 2x3x2x3 product took ~36 compiles per kernel and shape bucket).
_FWD_CONFIGS = _configs(
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (128, 64, 8, 2),
    (64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 4, 2), (128, 128, 8, 2))
_DKDV_CONFIGS = _configs(
    (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (64, 64, 8, 3),
    (128, 128, 8, 2), (32, 32, 4, 2))
_DQ_CONFIGS = _configs(
    (64, 32, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2), (128, 32, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2),
    (32, 32, 4, 2))

# interpreter / FORKATTN_TRITON_AUTOTUNE=0: one config each. Under the interpreter BLOCK_M != BLOCK_N
# so that the odd test sizes cross several blocks and several diagonal blocks (smaller blocks only
# cost interpreter time: 32x16 is ~2.5x slower than 64x32 there).
_INTERP = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}
_FIXED = {"fwd": [(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 1), (32, 32, 4, 1)],
          "dkdv": [(64, 128, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1), (16, 32, 4, 1)],
          "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (32, 32, 4, 1), (32, 16, 4, 1)]}


def autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("FORKATTN_TRITON_AUTOTUNE", "1") != "0"


def _smem_limit() -> int:
    try:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)
    except Exception:
        return 99 * 1024


def keep(kind: str, block_m: int, block_n: int, num_warps: int, num_stages: int, block_d: int, elem: int) -> bool:
    """Whether a config fits: shared memory of the pipelined tiles within the device's limit, and the
    fp32 tiles held in registers at most ~160 values per thread (past that ptxas spills heavily;
    mild spills are left for the autotuner to reject by timing). Rough by design: it removes what
    cannot compile or run well, the autotuner picks among the rest."""
    threads = 32 * num_warps
    if kind == "fwd":
        smem = block_m * block_d * elem + max(num_stages - 1, 1) * 2 * block_n * block_d * elem
        regs = (block_m * block_d + block_m * block_n) / threads
    elif kind == "dkdv":
        smem = 2 * block_n * block_d * elem + max(num_stages - 1, 1) * 2 * block_m * block_d * elem
        regs = (2 * block_n * block_d + 2 * block_m * block_n) / threads
    else:
        smem = 2 * block_m * block_d * elem + max(num_stages - 1, 1) * 2 * block_n * block_d * elem
        regs = (block_m * block_d + 2 * block_m * block_n) / threads
    return smem <= _smem_limit() and regs <= 160


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d = args["BLOCK_D"]
        elem = args["Q"].element_size()
        kept = [c for c in configs
                if keep(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, block_d, elem)]
        if kept:
            return kept
        return [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
    return prune


_KEYS = ["SEQ_Q_KEY", "SEQ_K_KEY", "GROUP", "IS_CAUSAL", "HAS_MASK", "IS_VARLEN", "D", "HAS_DROPOUT"]
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEYS, prune_configs_by={"early_config_prune": _prune("fwd")})(
    _attn_fwd_kernel)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_KEYS, prune_configs_by={"early_config_prune": _prune("dkdv")})(
    _attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEYS, prune_configs_by={"early_config_prune": _prune("dq")})(
    _attn_bwd_dq_kernel)
_TUNED = {"fwd": _fwd_tuned, "dkdv": _dkdv_tuned, "dq": _dq_tuned}
_PLAIN = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


def _launch(kind, grid_len, grid_h, batch, args: dict):
    """Launch `kind` autotuned, or with its fixed config (interpreter, FORKATTN_TRITON_AUTOTUNE=0)."""
    if autotune_enabled():
        grid = lambda meta: (triton.cdiv(grid_len, meta["BLOCK_M" if kind != "dkdv" else "BLOCK_N"]), grid_h, batch)  # noqa: E731
        _TUNED[kind][grid](**args)
        return
    if interpreting():
        bm, bn, w, s = _INTERP[kind]
    else:
        elem = args["Q"].element_size()
        fits = [c for c in _FIXED[kind] if keep(kind, *c, args["BLOCK_D"], elem)]
        bm, bn, w, s = (fits or _FIXED[kind][-1:])[0]
    grid = (triton.cdiv(grid_len, bm if kind != "dkdv" else bn), grid_h, batch)
    _PLAIN[kind][grid](**args, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


# --- launchers ----------------------------------------------------------------------------------------

class _Seq:
    """Where the kernels find the sequences: padded [B, H, L, D] or packed varlen [total, H, D]."""

    def __init__(self, batch, len_q, len_k, max_q, max_k, cu_q=None, cu_k=None):
        self.batch, self.len_q, self.len_k = batch, len_q, len_k
        self.max_q, self.max_k = max_q, max_k
        self.cu_q, self.cu_k = cu_q, cu_k
        self.varlen = cu_q is not None

    def strides(self, t):
        """(batch, head, row) strides of a q/k/v-like tensor."""
        if self.varlen:
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def lse_strides(self, t):
        if self.varlen:  # [H, total]
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 16))


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _dot_prec(dtype):
    # fp32 inputs get true fp32 dots (TF32 would miss the fp32 error budget); 16-bit types ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(q, key_padding_mask):
    """(KPM, KLO, KHI, strides): the mask as bytes, and per batch the range of keys that may be
    valid, computed on the device (no sync): k_lo = first True, k_hi = last True + 1 (0, 0 if none)."""
    if key_padding_mask is None:
        return q, q, q, 0, 0
    m = key_padding_mask
    Lk = m.shape[1]  # > 0: callers return early without keys
    idx = torch.arange(Lk, device=m.device, dtype=torch.int32)
    k_hi = torch.where(m, idx + 1, torch.zeros_like(idx)).amax(dim=1).to(torch.int32)
    k_lo = torch.minimum(torch.where(m, idx, torch.full_like(idx, Lk)).amin(dim=1).to(torch.int32), k_hi)
    mb = m.view(torch.uint8)
    return mb, k_lo.contiguous(), k_hi.contiguous(), mb.stride(0), mb.stride(1)


def _common(q, k, seq: _Seq, key_padding_mask, causal, scale, dropout_p, seed):
    H, D = q.shape[-2 if seq.varlen else 1], q.shape[-1]
    Hkv = k.shape[-2 if seq.varlen else 1]
    upcast = interpreting() and q.dtype == torch.bfloat16  # the 3.6 interpreter's bf16 dot is wrong
    kpm, klo, khi, smb, smn = _mask_args(q, key_padding_mask)
    meta = dict(
        KPM=kpm, KLO=klo, KHI=khi,
        CU_Q=seq.cu_q if seq.varlen else klo, CU_K=seq.cu_k if seq.varlen else klo,
        stride_mb=smb, stride_mn=smn,
        GROUP=H // Hkv, Lq=seq.len_q, Lk=seq.len_k, D=D, qk_scale=scale * LOG2E,
        SEQ_Q_KEY=_bucket(seq.max_q), SEQ_K_KEY=_bucket(seq.max_k),
        IS_CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None, IS_VARLEN=seq.varlen,
        BLOCK_D=_block_d(D), UPCAST=upcast, DOT_PREC=_dot_prec(q.dtype),
        # dropout: the seed's 64-bit pattern as a non-negative int (tl.philox takes it as uint64)
        seed=int(seed) & 0xFFFFFFFFFFFFFFFF, H_Q=H, drop_thresh=dropout_threshold(dropout_p) if dropout_p else 0,
        drop_scale=1.0 / (1.0 - dropout_p), HAS_DROPOUT=dropout_p > 0,
    )
    return H, Hkv, D, meta


def _fwd(q, k, v, out, lse, seq: _Seq, key_padding_mask, causal, scale, dropout_p=0.0, seed=0):
    H, _, _, meta = _common(q, k, seq, key_padding_mask, causal, scale, dropout_p, seed)
    sq, sk, sv, so, sl = seq.strides(q), seq.strides(k), seq.strides(v), seq.strides(out), seq.lse_strides(lse)
    args = dict(
        Q=q, K=k, V=v, Out=out, Lse=lse,
        stride_qb=sq[0], stride_qh=sq[1], stride_qm=sq[2],
        stride_kb=sk[0], stride_kh=sk[1], stride_kn=sk[2],
        stride_vb=sv[0], stride_vh=sv[1], stride_vn=sv[2],
        stride_ob=so[0], stride_oh=so[1], stride_om=so[2],
        stride_lb=sl[0], stride_lh=sl[1], stride_lm=sl[2],
        **meta,
    )
    _launch("fwd", seq.max_q, H, seq.batch, args)


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, seq: _Seq, key_padding_mask, causal, scale, dropout_p=0.0, seed=0):
    H, Hkv, D, meta = _common(q, k, seq, key_padding_mask, causal, scale, dropout_p, seed)
    delta = torch.empty_like(lse)
    so, sdo, sl = seq.strides(out), seq.strides(dout), seq.lse_strides(lse)
    block_d = meta["BLOCK_D"]
    block_m = max(16, min(128, 8192 // block_d))
    grid = (triton.cdiv(seq.max_q, block_m), H, seq.batch)
    _attn_bwd_delta_kernel[grid](
        out, dout, delta, meta["CU_Q"],
        so[0], so[1], so[2], sdo[0], sdo[1], sdo[2], sl[0], sl[1], sl[2],
        seq.len_q, IS_VARLEN=seq.varlen, BLOCK_M=block_m, BLOCK_D=block_d, D=D,
    )
    sq, sk, sv = seq.strides(q), seq.strides(k), seq.strides(v)
    common = dict(
        Q=q, K=k, V=v, DO=dout, Lse=lse, Delta=delta,
        stride_qb=sq[0], stride_qh=sq[1], stride_qm=sq[2],
        stride_kb=sk[0], stride_kh=sk[1], stride_kn=sk[2],
        stride_vb=sv[0], stride_vh=sv[1], stride_vn=sv[2],
        stride_dob=sdo[0], stride_doh=sdo[1], stride_dom=sdo[2],
        stride_lb=sl[0], stride_lh=sl[1], stride_lm=sl[2],
        sm_scale=scale, **meta,
    )
    sdk, sdv, sdq = seq.strides(dk), seq.strides(dv), seq.strides(dq)
    _launch("dkdv", seq.max_k, Hkv, seq.batch, dict(
        common, DK=dk, DV=dv,
        stride_dkb=sdk[0], stride_dkh=sdk[1], stride_dkn=sdk[2],
        stride_dvb=sdv[0], stride_dvh=sdv[1], stride_dvn=sdv[2]))
    _launch("dq", seq.max_q, H, seq.batch, dict(
        common, DQ=dq, stride_dqb=sdq[0], stride_dqh=sdq[1], stride_dqm=sdq[2]))


# --- the backend's entry points (the op contract of forkattn.attention) ---------------------------------

def attention_fwd(q, k, v, key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float,
                  dropout_p: float = 0.0, seed: int = 0):
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (stride 1 in D) -> (out in empty_bhld layout, lse f32 [B, H, Lq])."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = empty_bhld(q, B, H, Lq, D)
    lse = q.new_empty((B, H, Lq), dtype=torch.float32)
    if B * H * Lq == 0:
        return out, lse
    if Lk == 0:  # no key at all: every row is empty
        return out.zero_(), lse.fill_(float("inf"))
    _fwd(q, k, v, out, lse, _Seq(B, Lq, Lk, Lq, Lk), key_padding_mask, causal, scale, dropout_p, seed)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, key_padding_mask, causal: bool, scale: float, dropout_p: float = 0.0,
                  seed: int = 0):
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq = empty_bhld(q, B, H, Lq, D)
    dk = empty_bhld(k, B, Hkv, Lk, D)
    dv = empty_bhld(v, B, Hkv, Lk, D)
    if B * H * Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _bwd(dout, q, k, v, out, lse, dq, dk, dv, _Seq(B, Lq, Lk, Lq, Lk), key_padding_mask, causal, scale, dropout_p,
         seed)
    return dq, dk, dv


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                         causal: bool, scale: float, dropout_p: float = 0.0, seed: int = 0):
    """q [total_q, H, D], k/v [total_k, Hkv, D] -> (out [total_q, H, D], lse f32 [H, total_q])."""
    Tq, H, D = q.shape
    B = cu_seqlens_q.shape[0] - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((H, Tq), dtype=torch.float32)
    if Tq == 0 or H == 0:
        return out, lse
    if k.shape[0] == 0 or max_seqlen_k == 0:
        return out.zero_(), lse.fill_(float("inf"))
    seq = _Seq(B, 0, 0, max(max_seqlen_q, 1), max(max_seqlen_k, 1), cu_seqlens_q, cu_seqlens_k)
    _fwd(q, k, v, out, lse, seq, None, causal, scale, dropout_p, seed)
    return out, lse


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                         max_seqlen_k: int, causal: bool, scale: float, dropout_p: float = 0.0, seed: int = 0):
    B = cu_seqlens_q.shape[0] - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.shape[0] == 0 or k.shape[0] == 0 or max_seqlen_k == 0 or max_seqlen_q == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    seq = _Seq(B, 0, 0, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)
    _bwd(dout, q, k, v, out, lse, dq, dk, dv, seq, None, causal, scale, dropout_p, seed)
    return dq, dk, dv
