"""Triton fused attention, backward kernels: Delta = rowsum(dO * O), then dK/dV per key block (looping
over the q heads of its GQA group, so no atomics) and dQ per query block. Launched by
forkattn/triton/attention.py."""
from __future__ import annotations

import triton
import triton.language as tl

from . import interpreter_compat
from .attention_fwd import _dropout_keep, _key_range, _seq_info

interpreter_compat()


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
    seed, bh, drop_thresh, drop_scale,
    CAUSAL_STAGE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
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
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        if HAS_DROPOUT:  # the forward's mask, redrawn: dV = (P o M)^T dO / (1 - p), dP = (dO V^T) o M / (1 - p)
            keep_t = _dropout_keep(seed, bh, rows[None, :], cols[:, None], drop_thresh)
            dv += tl.dot(tl.where(keep_t, p_t * drop_scale, 0.0).to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        ds_t = tl.where(valid, p_t * (dp_t - delta[None, :]), 0.0)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["Lq", "Lk", "seed"])
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
    seed, H_Q, drop_thresh, drop_scale,
    SEQ_Q_KEY, SEQ_K_KEY,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
        bh = b * H_Q + hk * GROUP + g
        Qh = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
        DOh = DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom
        Lseh = Lse + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        Deltah = Delta + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        if IS_CAUSAL:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, Qh, DOh, Lseh, Deltah, stride_qm, stride_dom, stride_lm,
                cols, valid_k, offs_m, offs_d, d_ok, m_lo, m_mid, seqlen_q, causal_off, qk_scale,
                seed, bh, drop_thresh, drop_scale, True, UPCAST, DOT_PREC, BLOCK_M, HAS_DROPOUT)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, Qh, DOh, Lseh, Deltah, stride_qm, stride_dom, stride_lm,
                cols, valid_k, offs_m, offs_d, d_ok, m_full, q_end, seqlen_q, causal_off, qk_scale,
                seed, bh, drop_thresh, drop_scale, False, UPCAST, DOT_PREC, BLOCK_M, HAS_DROPOUT)
        else:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, Qh, DOh, Lseh, Deltah, stride_qm, stride_dom, stride_lm,
                cols, valid_k, offs_m, offs_d, d_ok, 0, q_end, seqlen_q, causal_off, qk_scale,
                seed, bh, drop_thresh, drop_scale, False, UPCAST, DOT_PREC, BLOCK_M, HAS_DROPOUT)
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
    seed, bh, drop_thresh, drop_scale,
    HAS_MASK: tl.constexpr, CAUSAL_STAGE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
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
        if HAS_DROPOUT:  # dP = (dO V^T) o M / (1 - p); Delta = rowsum(dO o O) already holds the dropout
            dp = tl.where(_dropout_keep(seed, bh, offs_m[:, None], cols[None, :], drop_thresh), dp * drop_scale, 0.0)
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["Lq", "Lk", "seed"])
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
    seed, H_Q, drop_thresh, drop_scale,
    SEQ_Q_KEY, SEQ_K_KEY,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    bh = b * H_Q + h
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
            lo, mid, hi, causal_off, qk_scale, seed, bh, drop_thresh, drop_scale,
            HAS_MASK, False, UPCAST, DOT_PREC, BLOCK_N, HAS_DROPOUT)
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, K, V, KPM, stride_kn, stride_vn, stride_mn, offs_m, offs_n, offs_d, d_ok,
            mid, hi, hi, causal_off, qk_scale, seed, bh, drop_thresh, drop_scale,
            HAS_MASK, True, UPCAST, DOT_PREC, BLOCK_N, HAS_DROPOUT)
    else:
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, K, V, KPM, stride_kn, stride_vn, stride_mn, offs_m, offs_n, offs_d, d_ok,
            lo, hi, hi, causal_off, qk_scale, seed, bh, drop_thresh, drop_scale,
            HAS_MASK, False, UPCAST, DOT_PREC, BLOCK_N, HAS_DROPOUT)
    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask)
