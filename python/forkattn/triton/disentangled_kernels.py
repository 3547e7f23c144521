"""Triton fused disentangled attention (DeBERTa), the kernels: forward, and the backward's dQ and
dK/dV kernels, which also scatter dS into dpos_key / dpos_query. Launched by
forkattn/triton/disentangled.py, whose docstring describes the method.

Notation inside a tile: a query block of BLOCK_M rows starting at start_m, a key block of BLOCK_N
columns starting at start_n; i' and j' count rows and columns inside the tile. The tile's relative
positions i - j cover BLOCK_M + BLOCK_N - 1 consecutive entries of rel_index, numbered by the
diagonal u = i' - j' + BLOCK_N - 1 (0 <= u < U); entry t0 + u with t0 = start_m - start_n + Lk - BLOCK_N.

Dropout (HAS_DROPOUT, a constexpr: dropout_p = 0 compiles it out): the plain attention's Philox mask
of (b, h, i, j) (attention_fwd._dropout_keep, kernels/common/philox.h's layout), applied to P after
the softmax's normalizer is summed (lse stays the undropped softmax's); the backward redraws it:
dV = (P o M)^T dO / (1 - p), dP = (dO V^T) o M / (1 - p), and Delta = rowsum(dO O) already holds
the dropout, so dS = P (dP - Delta) feeds dQ, dK and both position gradients unchanged.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import interpreter_compat
from .attention_fwd import _dropout_keep, _key_range

interpreter_compat()


@triton.jit
def _tile_rows(REL, PK, PQ, stride_pkr, stride_pqr, t0, n_rel, like, offs_u, offs_d, d_ok, U: tl.constexpr,
               C2P: tl.constexpr, P2C: tl.constexpr, UPCAST: tl.constexpr):
    """(G_k, G_q [UP, BLOCK_D], rows, which u are real): the position rows read on each diagonal u of
    the tile, pos_key[rel_index[t0 + u]] and pos_query[...] (indexed row loads from the small
    projections); zeros where u >= U or t0 + u falls off the table (only padded rows or columns of
    the tile sit on those diagonals). A term that is off gets an unused zero tile. Called inside the
    loops, so no tile is carried from one iteration to the next."""
    t = t0 + offs_u
    ok = (offs_u < U) & (t >= 0) & (t < n_rel)
    rows = tl.load(REL + t, mask=ok, other=0)
    m = ok[:, None] & d_ok[None, :]
    gk = (offs_u[:, None] * 0 + offs_d[None, :] * 0).to(like.dtype)
    gq = gk
    if C2P:
        gk = tl.load(PK + rows[:, None] * stride_pkr + offs_d[None, :], mask=m, other=0.0)
        if UPCAST:
            gk = gk.to(tl.float32)
    if P2C:
        gq = tl.load(PQ + rows[:, None] * stride_pqr + offs_d[None, :], mask=m, other=0.0)
        if UPCAST:
            gq = gq.to(tl.float32)
    return gk, gq, rows, ok


@triton.jit
def _tile_scores(q, k, gk, gq, skew, C2P: tl.constexpr, P2C: tl.constexpr, DOT_PREC: tl.constexpr):
    """Unscaled scores of a tile [BLOCK_M, BLOCK_N]: q k^T, plus q_i . pos_key[δ(i, j)] (one dot of q
    against the tile's U rows, then skew[i', j'] = u picks row u for (i', j')), plus
    k_j . pos_query[δ(i, j)] (the same against k)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if C2P:
        s += tl.gather(tl.dot(q, tl.trans(gk), input_precision=DOT_PREC), skew, 1)  # [BM, UP] -> [BM, BN]
    if P2C:
        s += tl.gather(tl.dot(gq, tl.trans(k), input_precision=DOT_PREC), skew, 0)  # [UP, BN] -> [BM, BN]
    return s


@triton.jit
def _by_diagonal_rows(ds, offs_i, offs_u, BLOCK_N: tl.constexpr):
    """Z [BLOCK_M, UP]: Z[i', u] = ds[i', j'] on the diagonal u of row i' (j' = i' + BLOCK_N - 1 - u),
    0 where that j' is outside the tile. Σ_u Z[i', u] g[u] = Σ_j' ds[i', j'] g[u(i', j')]."""
    j = offs_i[:, None] + (BLOCK_N - 1) - offs_u[None, :]
    inside = (j >= 0) & (j < BLOCK_N)
    return tl.where(inside, tl.gather(ds, tl.where(inside, j, 0), 1), 0.0)


@triton.jit
def _by_diagonal_cols(ds, offs_u, offs_j, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y [UP, BLOCK_N]: Y[u, j'] = ds[i', j'] on the diagonal u of column j' (i' = u + j' - BLOCK_N + 1),
    0 where that i' is outside the tile."""
    i = offs_u[:, None] + offs_j[None, :] - (BLOCK_N - 1)
    inside = (i >= 0) & (i < BLOCK_M)
    return tl.where(inside, tl.gather(ds, tl.where(inside, i, 0), 0), 0.0)


@triton.jit
def _key_block(K, V, KPM, stride_kn, stride_vn, stride_mn, cols, k_end, offs_d, d_ok, HAS_MASK: tl.constexpr,
               UPCAST: tl.constexpr):
    """(k, v, visible columns) of a key block; padded keys read as zeros (NaN there reaches nothing)."""
    ok = cols < k_end
    if HAS_MASK:
        ok = ok & (tl.load(KPM + cols * stride_mn, mask=ok, other=0) != 0)
    m = ok[:, None] & d_ok[None, :]
    k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=m, other=0.0)
    v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=m, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v, ok


@triton.jit(do_not_specialize=["Lq", "Lk", "seed"])
def _dis_fwd_kernel(
    Q, K, V, PK, PQ, REL, Out, Lse, KPM, KLO, KHI,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkh, stride_pkr, stride_pqh, stride_pqr,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mn,
    Lq, Lk, qk_scale,
    seed, H_Q, drop_thresh, drop_scale,  # dropout: Philox seed, heads, u16 threshold, 1 / (1 - p)
    SEQ_Q_KEY, SEQ_K_KEY,  # length buckets: autotune keys only
    C2P: tl.constexpr, P2C: tl.constexpr, HAS_MASK: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UP: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    bh = b * H_Q + tl.program_id(1)  # the dropout counter's b * heads + h (int32, as the plain kernels')
    Q += b64 * stride_qb + h * stride_qh
    K += b64 * stride_kb + h * stride_kh
    V += b64 * stride_vb + h * stride_vh
    PK += h * stride_pkh
    PQ += h * stride_pqh
    KPM += b64 * stride_mb

    offs_i = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_u = tl.arange(0, UP)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = start_m + offs_i
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    skew = offs_i[:, None] - offs_j[None, :] + (BLOCK_N - 1)
    n_rel = Lq + Lk - 1
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_lo, k_hi = _key_range(KLO, KHI, b, Lk, HAS_MASK)
    for start_n in range((k_lo // BLOCK_N) * BLOCK_N, k_hi, BLOCK_N):
        k, v, col_ok = _key_block(K, V, KPM, stride_kn, stride_vn, stride_mn, start_n + offs_j, k_hi, offs_d, d_ok,
                                  HAS_MASK, UPCAST)
        t0 = start_m - start_n + Lk - BLOCK_N
        gk, gq, rows, u_ok = _tile_rows(REL, PK, PQ, stride_pkr, stride_pqr, t0, n_rel, q, offs_u, offs_d, d_ok,
                                        BLOCK_M + BLOCK_N - 1, C2P, P2C, UPCAST)
        s = _tile_scores(q, k, gk, gq, skew, C2P, P2C, DOT_PREC) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: no NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax's normalizer (and lse) before dropout
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], (start_n + offs_j)[None, :], drop_thresh)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0  # no visible key: zeros out, lse = +inf
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    Out += b64 * stride_ob + h * stride_oh
    Lse += b64 * stride_lb + h * stride_lh
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :], (acc / l_safe[:, None]).to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + offs_m * stride_lm, lse, mask=m_ok)


@triton.jit
def _tile_ds(q, k, v, do, gk, gq, lse2, delta, skew, valid, qk_scale, seed, bh, rows, cols, drop_thresh, drop_scale,
             C2P: tl.constexpr, P2C: tl.constexpr, DOT_PREC: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """(P as P V used it: dropped and scaled with dropout, dS / scale) of a tile, recomputed from the
    stored lse (base 2) and Delta = rowsum(dO O); rows (i) and cols (j) of the tile for the mask."""
    s = _tile_scores(q, k, gk, gq, skew, C2P, P2C, DOT_PREC) * qk_scale
    p = tl.where(valid, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    p_used = p
    if HAS_DROPOUT:  # the forward's mask, redrawn
        keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], drop_thresh)
        dp = tl.where(keep, dp * drop_scale, 0.0)
        p_used = tl.where(keep, p * drop_scale, 0.0)
    return p_used, tl.where(valid, p * (dp - delta[:, None]), 0.0)


@triton.jit
def _query_block(Q, DO, Lse, Delta, stride_qm, stride_dom, stride_lm, offs_m, Lq, offs_d, d_ok,
                 UPCAST: tl.constexpr):
    """(q, dO, lse in base 2, Delta, rows inside Lq) of a query block, for the backward; rows past
    Lq read as zeros with lse = +inf (P = 0 there)."""
    m_ok = offs_m < Lq
    md = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=md, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=md, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse + offs_m * stride_lm, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + offs_m * stride_lm, mask=m_ok, other=0.0)
    return q, do, lse2, delta, m_ok


@triton.jit(do_not_specialize=["Lq", "Lk", "seed"])
def _dis_bwd_dq_kernel(
    Q, K, V, PK, PQ, REL, DO, Lse, Delta, DQ, DPK, KPM, KLO, KHI,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkh, stride_pkr, stride_pqh, stride_pqr,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_gh, stride_gr,  # of the float32 dpos accumulators
    stride_mb, stride_mn,
    Lq, Lk, qk_scale, sm_scale,
    seed, H_Q, drop_thresh, drop_scale,
    SEQ_Q_KEY, SEQ_K_KEY,
    C2P: tl.constexpr, P2C: tl.constexpr, HAS_MASK: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UP: tl.constexpr,
):
    """Per query block: dQ (q k^T and c2p terms), and the c2p term's dpos_key[r] += Σ dS_ij q_i
    (atomics into the float32 accumulator)."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    bh = b * H_Q + tl.program_id(1)  # the dropout counter's b * heads + h (int32, as the plain kernels')
    Q += b64 * stride_qb + h * stride_qh
    DO += b64 * stride_dob + h * stride_doh
    K += b64 * stride_kb + h * stride_kh
    V += b64 * stride_vb + h * stride_vh
    PK += h * stride_pkh
    PQ += h * stride_pqh
    DPK += h * stride_gh
    Lse += b64 * stride_lb + h * stride_lh
    Delta += b64 * stride_lb + h * stride_lh
    KPM += b64 * stride_mb

    offs_i = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_u = tl.arange(0, UP)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = start_m + offs_i
    d_ok = offs_d < D
    skew = offs_i[:, None] - offs_j[None, :] + (BLOCK_N - 1)
    n_rel = Lq + Lk - 1
    q, do, lse2, delta, m_ok = _query_block(Q, DO, Lse, Delta, stride_qm, stride_dom, stride_lm, offs_m, Lq, offs_d,
                                            d_ok, UPCAST)
    md = m_ok[:, None] & d_ok[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_lo, k_hi = _key_range(KLO, KHI, b, Lk, HAS_MASK)
    for start_n in range((k_lo // BLOCK_N) * BLOCK_N, k_hi, BLOCK_N):
        k, v, col_ok = _key_block(K, V, KPM, stride_kn, stride_vn, stride_mn, start_n + offs_j, k_hi, offs_d, d_ok,
                                  HAS_MASK, UPCAST)
        t0 = start_m - start_n + Lk - BLOCK_N
        gk, gq, rows, u_ok = _tile_rows(REL, PK, PQ, stride_pkr, stride_pqr, t0, n_rel, q, offs_u, offs_d, d_ok,
                                        BLOCK_M + BLOCK_N - 1, C2P, P2C, UPCAST)
        _p, ds = _tile_ds(q, k, v, do, gk, gq, lse2, delta, skew, col_ok[None, :], qk_scale, seed, bh, offs_m,
                          start_n + offs_j, drop_thresh, drop_scale, C2P, P2C, DOT_PREC, HAS_DROPOUT)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        if C2P:
            z = _by_diagonal_rows(ds, offs_i, offs_u, BLOCK_N)  # [BM, UP]
            dq += tl.dot(z.to(gk.dtype), gk, input_precision=DOT_PREC)
            dpk = tl.dot(tl.trans(z).to(q.dtype), q, input_precision=DOT_PREC)  # [UP, BLOCK_D]
            tl.atomic_add(DPK + rows[:, None] * stride_gr + offs_d[None, :], dpk, mask=u_ok[:, None] & d_ok[None, :],
                          sem="relaxed")
    DQ += b64 * stride_dqb + h * stride_dqh
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=md)


@triton.jit(do_not_specialize=["Lq", "Lk", "seed"])
def _dis_bwd_dkdv_kernel(
    Q, K, V, PK, PQ, REL, DO, Lse, Delta, DK, DV, DPQ, KPM, KLO, KHI,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkh, stride_pkr, stride_pqh, stride_pqr,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_gh, stride_gr,
    stride_mb, stride_mn,
    Lq, Lk, qk_scale, sm_scale,
    seed, H_Q, drop_thresh, drop_scale,
    SEQ_Q_KEY, SEQ_K_KEY,
    C2P: tl.constexpr, P2C: tl.constexpr, HAS_MASK: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UP: tl.constexpr,
):
    """Per key block: dK (q k^T and p2c terms), dV, and the p2c term's dpos_query[r] += Σ dS_ij k_j
    (atomics into the float32 accumulator)."""
    start_n = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    bh = b * H_Q + tl.program_id(1)  # the dropout counter's b * heads + h (int32, as the plain kernels')
    Q += b64 * stride_qb + h * stride_qh
    DO += b64 * stride_dob + h * stride_doh
    K += b64 * stride_kb + h * stride_kh
    V += b64 * stride_vb + h * stride_vh
    PK += h * stride_pkh
    PQ += h * stride_pqh
    DPQ += h * stride_gh
    Lse += b64 * stride_lb + h * stride_lh
    Delta += b64 * stride_lb + h * stride_lh
    KPM += b64 * stride_mb

    offs_i = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_u = tl.arange(0, UP)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_j
    d_ok = offs_d < D
    skew = offs_i[:, None] - offs_j[None, :] + (BLOCK_N - 1)
    n_rel = Lq + Lk - 1
    k_lo, k_hi = _key_range(KLO, KHI, b, Lk, HAS_MASK)
    k, v, col_ok = _key_block(K, V, KPM, stride_kn, stride_vn, stride_mn, cols, k_hi, offs_d, d_ok, HAS_MASK, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    live = (start_n < k_hi) & (start_n + BLOCK_N > k_lo)
    q_end = tl.where(live, Lq, 0)  # an all-padding key block: zero gradients, no loop
    for start_m in range(0, q_end, BLOCK_M):
        q, do, lse2, delta, m_ok = _query_block(Q, DO, Lse, Delta, stride_qm, stride_dom, stride_lm,
                                                start_m + offs_i, Lq, offs_d, d_ok, UPCAST)
        t0 = start_m - start_n + Lk - BLOCK_N
        gk, gq, rows, u_ok = _tile_rows(REL, PK, PQ, stride_pkr, stride_pqr, t0, n_rel, k, offs_u, offs_d, d_ok,
                                        BLOCK_M + BLOCK_N - 1, C2P, P2C, UPCAST)
        p, ds = _tile_ds(q, k, v, do, gk, gq, lse2, delta, skew, col_ok[None, :] & m_ok[:, None], qk_scale,
                         seed, bh, start_m + offs_i, cols, drop_thresh, drop_scale, C2P, P2C, DOT_PREC,
                         HAS_DROPOUT)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PREC)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC)
        if P2C:
            y = _by_diagonal_cols(ds, offs_u, offs_j, BLOCK_M, BLOCK_N)  # [UP, BN]
            dk += tl.dot(tl.trans(y).to(gq.dtype), gq, input_precision=DOT_PREC)
            dpq = tl.dot(y.to(k.dtype), k, input_precision=DOT_PREC)  # [UP, BLOCK_D]
            tl.atomic_add(DPQ + rows[:, None] * stride_gr + offs_d[None, :], dpq, mask=u_ok[:, None] & d_ok[None, :],
                          sem="relaxed")
    # a padded key's gradients are exactly zero (0 * NaN from a NaN query row would not be)
    c_in = cols < Lk
    DK += b64 * stride_dkb + h * stride_dkh
    DV += b64 * stride_dvb + h * stride_dvh
    tl.store(DK + cols[:, None] * stride_dkn + offs_d[None, :],
             tl.where(col_ok[:, None], dk * sm_scale, 0.0).to(DK.dtype.element_ty), mask=c_in[:, None] & d_ok[None, :])
    tl.store(DV + cols[:, None] * stride_dvn + offs_d[None, :],
             tl.where(col_ok[:, None], dv, 0.0).to(DV.dtype.element_ty), mask=c_in[:, None] & d_ok[None, :])
