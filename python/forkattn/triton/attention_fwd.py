"""Triton fused attention, forward kernel (FlashAttention-2 with the masking described in
forkattn/triton/attention.py), and the device helpers the backward kernels share with it.
Launched by forkattn/triton/attention.py."""
from __future__ import annotations

import triton
import triton.language as tl

from . import interpreter_compat

interpreter_compat()


@triton.jit
def _dropout_keep(seed, bh, rows, cols, threshold):
    """Attention dropout's keep mask, kernels/common/philox.h's layout: rows (query i) and cols (key j,
    both counted inside the sequence) broadcast to the tile; bh = b * heads + h. One Philox block per
    8 key columns, counter (j >> 3, i, bh, 1); u16 = half (j & 1) of word (j & 7) >> 1; keep iff
    u16 >= threshold. (Each element computes its block: simple, and the same on every tiling.)"""
    z = rows * 0 + cols * 0
    r0, r1, r2, r3 = tl.philox(seed, ((cols >> 3) + z).to(tl.uint32), (rows + z).to(tl.uint32),
                               (z + bh).to(tl.uint32), (z + 1).to(tl.uint32))
    w = ((cols & 7) >> 1) + z
    word = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    u = (word >> (16 * ((cols & 1) + z)).to(tl.uint32)) & 0xFFFF
    return u.to(tl.int32) >= threshold


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
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
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax's normalizer (and lse) before dropout
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, offs_m[:, None], cols[None, :], drop_thresh), p * drop_scale, 0.0)
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


@triton.jit(do_not_specialize=["Lq", "Lk", "seed"])
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, KPM, KLO, KHI, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mn,
    GROUP, Lq, Lk, qk_scale,
    seed, H_Q, drop_thresh, drop_scale,  # dropout: Philox seed, q heads, u16 threshold, 1 / (1 - p)
    SEQ_Q_KEY, SEQ_K_KEY,  # length buckets: autotune keys only
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
    if start_m >= seqlen_q:  # query block past this sequence's end (varlen): nothing to do
        return
    hk = h // GROUP
    bh = b * H_Q + h
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
            lo, mid, hi, causal_off, qk_scale, seed, bh, drop_thresh, drop_scale,
            HAS_MASK, False, UPCAST, DOT_PREC, BLOCK_N, HAS_DROPOUT)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K, V, KPM, stride_kn, stride_vn, stride_mn, offs_m, offs_n, offs_d, d_ok,
            mid, hi, hi, causal_off, qk_scale, seed, bh, drop_thresh, drop_scale,
            HAS_MASK, True, UPCAST, DOT_PREC, BLOCK_N, HAS_DROPOUT)
    else:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K, V, KPM, stride_kn, stride_vn, stride_mn, offs_m, offs_n, offs_d, d_ok,
            lo, hi, hi, causal_off, qk_scale, seed, bh, drop_thresh, drop_scale,
            HAS_MASK, False, UPCAST, DOT_PREC, BLOCK_N, HAS_DROPOUT)

    empty = l_i == 0.0  # no visible key: zeros out, lse = +inf
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + offs_m * stride_lm, lse, mask=m_ok)
