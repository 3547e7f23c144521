"""Triton fused attention, forward and backward: the "triton" backend of forkattn.attention and
forkattn.attention_varlen.

One set of kernels serves both entry points. A tensor is described by a base pointer and three
strides (batch, head, row) with stride 1 in head_dim; the padded layout [B, H, L, D] has a batch
stride, the packed varlen layout [total, H, D] has batch stride 0 and per-sequence row offsets read
from cu_seqlens on the device (no host sync, CUDA-graph friendly).

Math (FlashAttention-2): online softmax in base 2 (scores scaled by scale*log2 e) with fp32
accumulators; the forward stores lse in natural log (float32, +inf for a row with no visible key,
whose output is zeros). The backward is Delta = rowsum(dO * O), then one kernel per key block for
dK/dV (looping over the q heads of its GQA group, so no atomics) and one per query block for dQ.

Masking: causal is bottom-right aligned (query i sees key j iff j <= i + Lk - Lq). Key blocks that no
row of a query block can see are never visited: the causal bound cuts the loop, and with a
key_padding_mask the loop runs only over [first valid key, last valid key] of that batch (computed
on the device by two reductions), so the right-padding of a BERT batch costs nothing. Key blocks that
every row sees fully run without the causal test; only the diagonal blocks run the masked stage.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreter_compat, interpreting

interpreter_compat()
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --- kernels --------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    K, V, KPM, stride_kn, stride_vn, stride_mn,
    offs_m, offs_n, offs_d, d_ok,
    start, end, k_end, causal_off, qk_scale,
    HAS_MASK: tl.constexpr, CAUSAL_STAGE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_end
        if HAS_MASK:  # padded keys are read as zeros: garbage there must not reach P V (0 * NaN)
            col_ok = col_ok & (tl.load(KPM + cols * stride_mn, mask=col_ok, other=0) != 0)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        valid = col_ok[None, :]
        if CAUSAL_STAGE:
            valid = valid & (cols[None, :] <= offs_m[:, None] + causal_off)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row so far: no NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _seq_info(CU, b, L, IS_VARLEN: tl.constexpr):
    """(first row of sequence b in the tensor, its length)."""
    if IS_VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        length = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
    else:
        start = (L * 0).to(tl.int64)  # L is never specialized (do_not_specialize), so a tensor
        length = L
    return start, length


@triton.jit
def _key_range(KLO, KHI, b, seqlen_k, HAS_MASK: tl.constexpr):
    """[k_lo, k_hi): the keys of batch b that may be valid (outside it every key is padding)."""
    if HAS_MASK:
        k_lo = tl.load(KLO + b)
        k_hi = tl.load(KHI + b)
    else:
        k_lo = seqlen_k * 0
        k_hi = seqlen_k
    return k_lo, k_hi


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, KPM, KLO, KHI, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mn,
    GROUP, Lq, Lk, qk_scale,
    SEQ_Q_KEY, SEQ_K_KEY,  # length buckets: autotune keys only
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # the last query blocks do the most work: launch them first (shorter tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _seq_info(CU_Q, b, Lq, IS_VARLEN)
    k_start, seqlen_k = _seq_info(CU_K, b, Lk, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:  # query block past this sequence's end (varlen): nothing to do
        return
    hk = h // GROUP
    b64 = b.to(tl.int64)
    Q += b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm
    K += b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kn
    V += b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vn
    Out += b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_om
    Lse += b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start * stride_lm
    KPM += b64 * stride_mb

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < D
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_lo, k_hi = _key_range(KLO, KHI, b, seqlen_k, HAS_MASK)
    lo = (k_lo // BLOCK_N) * BLOCK_N
    hi = k_hi
    causal_off = seqlen_k - seqlen_q
    if IS_CAUSAL:
        # the last real row of this block sees keys < last_row + 1 + off; every row sees keys <= start_m + off
        hi = tl.minimum(hi, tl.minimum(start_m + BLOCK_M, seqlen_q) + causal_off)
        hi = tl.maximum(hi, lo)
        mid = (tl.maximum(start_m + causal_off + 1, lo) // BLOCK_N) * BLOCK_N
        mid = tl.minimum(mid, hi)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K, V, KPM, stride_kn, stride_vn, stride_mn, offs_m, offs_n, offs_d, d_ok,
            lo, mid, hi, causal_off, qk_scale,
            HAS_MASK, False, UPCAST, DOT_PREC, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K, V, KPM, stride_kn, stride_vn, stride_mn, offs_m, offs_n, offs_d, d_ok,
            mid, hi, hi, causal_off, qk_scale,
            HAS_MASK, True, UPCAST, DOT_PREC, BLOCK_N)
    else:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K, V, KPM, stride_kn, stride_vn, stride_mn, offs_m, offs_n, offs_d, d_ok,
            lo, hi, hi, causal_off, qk_scale,
            HAS_MASK, False, UPCAST, DOT_PREC, BLOCK_N)

    empty = l_i == 0.0  # no visible key: zeros out, lse = +inf
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + offs_m * stride_lm, lse, mask=m_ok)


@triton.jit(do_not_specialize=["Lq"])
def _attn_bwd_delta_kernel(
    Out, DO, Delta, CU_Q,
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    stride_lb, stride_lh, stride_lm,
    Lq,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    q_start, seqlen_q = _seq_info(CU_Q, b, Lq, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    rows = q_start + offs_m
    o = tl.load(Out + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_db + h * stride_dh + rows[:, None] * stride_dm + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_lb + h * stride_lh + rows * stride_lm, delta, mask=m_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v,
    Q, DO, Lse, Delta, stride_qm, stride_dom, stride_lm,
    cols, valid_k, offs_m, offs_d, d_ok,
    start, end, seqlen_q, causal_off, qk_scale,
    CAUSAL_STAGE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        r_ok = rows < seqlen_q
        mask = r_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + rows[:, None] * stride_qm + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(Lse + rows * stride_lm, mask=r_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta + rows * stride_lm, mask=r_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        valid = valid_k[:, None] & r_ok[None, :]
        if CAUSAL_STAGE:
            valid = valid & (cols[:, None] <= rows[None, :] + causal_off)
        p_t = tl.where(valid, tl.math.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = tl.where(valid, p_t * (dp_t - delta[None, :]), 0.0)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, KPM, KLO, KHI, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mn,
    GROUP, Lq, Lk, qk_scale, sm_scale,
    SEQ_Q_KEY, SEQ_K_KEY,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _seq_info(CU_Q, b, Lq, IS_VARLEN)
    k_start, seqlen_k = _seq_info(CU_K, b, Lk, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    K += b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
    V += b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn
    DK += b64 * stride_dkb + hk64 * stride_dkh + k_start * stride_dkn
    DV += b64 * stride_dvb + hk64 * stride_dvh + k_start * stride_dvn

    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    c_ok = cols < seqlen_k
    kv_mask = c_ok[:, None] & d_ok[None, :]
    valid_k = c_ok
    if HAS_MASK:  # padded keys are read as zeros: garbage there must not reach dP or dS^T Q
        valid_k = valid_k & (tl.load(KPM + b64 * stride_mb + cols * stride_mn, mask=c_ok, other=0) != 0)
    k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=valid_k[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=valid_k[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_end = seqlen_q
    if HAS_MASK:
        k_lo, k_hi = _key_range(KLO, KHI, b, seqlen_k, HAS_MASK)
        live = (start_n < k_hi) & (start_n + BLOCK_N > k_lo)
        q_end = tl.where(live, seqlen_q, 0)  # an all-padding key block: zero grads, no loop
    causal_off = seqlen_k - seqlen_q
    if IS_CAUSAL:
        # rows < start_n - off see no key of this block; rows >= start_n + BLOCK_N - 1 - off see all
        m_lo = (tl.maximum(start_n - causal_off, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M
        m_full = tl.maximum(m_full, m_lo)
        m_mid = tl.minimum(m_full, q_end)
    for g in range(0, GROUP):
        h64 = (hk * GROUP + g).to(tl.int64)
        Qh = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
        DOh = DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom
        Lseh = Lse + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        Deltah = Delta + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        if IS_CAUSAL:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, Qh, DOh, Lseh, Deltah, stride_qm, stride_dom, stride_lm,
                cols, valid_k, offs_m, offs_d, d_ok, m_lo, m_mid, seqlen_q, causal_off, qk_scale,
                True, UPCAST, DOT_PREC, BLOCK_M)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, Qh, DOh, Lseh, Deltah, stride_qm, stride_dom, stride_lm,
                cols, valid_k, offs_m, offs_d, d_ok, m_full, q_end, seqlen_q, causal_off, qk_scale,
                False, UPCAST, DOT_PREC, BLOCK_M)
        else:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, Qh, DOh, Lseh, Deltah, stride_qm, stride_dom, stride_lm,
                cols, valid_k, offs_m, offs_d, d_ok, 0, q_end, seqlen_q, causal_off, qk_scale,
                False, UPCAST, DOT_PREC, BLOCK_M)
    # a padded key's gradients are exactly zero (0 * NaN from a NaN query row would not be)
    dk = tl.where(valid_k[:, None], dk * sm_scale, 0.0)
    dv = tl.where(valid_k[:, None], dv, 0.0)
    tl.store(DK + cols[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + cols[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta,
    K, V, KPM, stride_kn, stride_vn, stride_mn,
    offs_m, offs_n, offs_d, d_ok,
    start, end, k_end, causal_off, qk_scale,
    HAS_MASK: tl.constexpr, CAUSAL_STAGE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_end
        if HAS_MASK:  # padded keys are read as zeros (garbage there must not reach dS K)
            col_ok = col_ok & (tl.load(KPM + cols * stride_mn, mask=col_ok, other=0) != 0)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        valid = col_ok[None, :]
        if CAUSAL_STAGE:
            valid = valid & (cols[None, :] <= offs_m[:, None] + causal_off)
        p = tl.where(valid, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, KPM, KLO, KHI, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mn,
    GROUP, Lq, Lk, qk_scale, sm_scale,
    SEQ_Q_KEY, SEQ_K_KEY,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # the last query blocks do the most work: launch them first (shorter tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _seq_info(CU_Q, b, Lq, IS_VARLEN)
    k_start, seqlen_k = _seq_info(CU_K, b, Lk, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    hk = h // GROUP
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    Q += b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
    DO += b64 * stride_dob + h64 * stride_doh + q_start * stride_dom
    DQ += b64 * stride_dqb + h64 * stride_dqh + q_start * stride_dqm
    Lse += b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
    Delta += b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
    K += b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kn
    V += b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vn
    KPM += b64 * stride_mb

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < D
    mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse + offs_m * stride_lm, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + offs_m * stride_lm, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_lo, k_hi = _key_range(KLO, KHI, b, seqlen_k, HAS_MASK)
    lo = (k_lo // BLOCK_N) * BLOCK_N
    hi = k_hi
    causal_off = seqlen_k - seqlen_q
    if IS_CAUSAL:
        hi = tl.minimum(hi, tl.minimum(start_m + BLOCK_M, seqlen_q) + causal_off)
        hi = tl.maximum(hi, lo)
        mid = (tl.maximum(start_m + causal_off + 1, lo) // BLOCK_N) * BLOCK_N
        mid = tl.minimum(mid, hi)
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, K, V, KPM, stride_kn, stride_vn, stride_mn, offs_m, offs_n, offs_d, d_ok,
            lo, mid, hi, causal_off, qk_scale, HAS_MASK, False, UPCAST, DOT_PREC, BLOCK_N)
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, K, V, KPM, stride_kn, stride_vn, stride_mn, offs_m, offs_n, offs_d, d_ok,
            mid, hi, hi, causal_off, qk_scale, HAS_MASK, True, UPCAST, DOT_PREC, BLOCK_N)
    else:
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, K, V, KPM, stride_kn, stride_vn, stride_mn, offs_m, offs_n, offs_d, d_ok,
            lo, hi, hi, causal_off, qk_scale, HAS_MASK, False, UPCAST, DOT_PREC, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask)


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


_KEYS = ["SEQ_Q_KEY", "SEQ_K_KEY", "GROUP", "IS_CAUSAL", "HAS_MASK", "IS_VARLEN", "D"]
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


def _common(q, k, seq: _Seq, key_padding_mask, causal, scale):
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
    )
    return H, Hkv, D, meta


def _fwd(q, k, v, out, lse, seq: _Seq, key_padding_mask, causal, scale):
    H, _, _, meta = _common(q, k, seq, key_padding_mask, causal, scale)
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


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, seq: _Seq, key_padding_mask, causal, scale):
    H, Hkv, D, meta = _common(q, k, seq, key_padding_mask, causal, scale)
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


def _empty_bhld(like, B, H, L, D):
    from ..attention import empty_bhld

    return empty_bhld(like, B, H, L, D)


# --- the backend's entry points (the op contract of forkattn.attention) ---------------------------------

def attention_fwd(q, k, v, key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float):
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (stride 1 in D) -> (out in empty_bhld layout, lse f32 [B, H, Lq])."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = _empty_bhld(q, B, H, Lq, D)
    lse = q.new_empty((B, H, Lq), dtype=torch.float32)
    if B * H * Lq == 0:
        return out, lse
    if Lk == 0:  # no key at all: every row is empty
        return out.zero_(), lse.fill_(float("inf"))
    _fwd(q, k, v, out, lse, _Seq(B, Lq, Lk, Lq, Lk), key_padding_mask, causal, scale)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, key_padding_mask, causal: bool, scale: float):
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq = _empty_bhld(q, B, H, Lq, D)
    dk = _empty_bhld(k, B, Hkv, Lk, D)
    dv = _empty_bhld(v, B, Hkv, Lk, D)
    if B * H * Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _bwd(dout, q, k, v, out, lse, dq, dk, dv, _Seq(B, Lq, Lk, Lq, Lk), key_padding_mask, causal, scale)
    return dq, dk, dv


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                         causal: bool, scale: float):
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
    _fwd(q, k, v, out, lse, seq, None, causal, scale)
    return out, lse


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                         max_seqlen_k: int, causal: bool, scale: float):
    B = cu_seqlens_q.shape[0] - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.shape[0] == 0 or k.shape[0] == 0 or max_seqlen_k == 0 or max_seqlen_q == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    seq = _Seq(B, 0, 0, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)
    _bwd(dout, q, k, v, out, lse, dq, dk, dv, seq, None, causal, scale)
    return dq, dk, dv
