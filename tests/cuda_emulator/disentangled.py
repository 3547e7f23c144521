"""Thread-level transcription of the CUDA disentangled-attention forward (kernels/disentangled/
fwd_kernel.cuh) and of its host glue (csrc/cuda/disentangled_cuda.cpp, with the checks of
csrc/disentangled.cpp it relies on), line by line, on the SM80 model of core.py, reusing the
transcribed building blocks of kernels/attention/common.cuh from attention.py. Keep it in step
with the kernel (docs/EMULATION.md).

What is emulated beyond attention.py's forward: the per-tile position rows (load_pos_rows_async:
rel_index read per row, indexed cp.async of pos rows, zero fill off the table), the p2c product in
pieces of 16 diagonals x 16 keys scattered into the fp32 tile sB, the c2p product in pieces of
16 diagonals added into the warp's own rows of sB, and the read of sB at each score fragment.
Dropout (the DROPOUT instantiations, p.dropout): attention/dropout.cuh's mask, transcribed in
dropout.py, applied where the kernels apply it (the forward and dq kernel by rows, the dk/dv kernel
by columns of each query piece).
__syncwarp is modelled as a block barrier (core.py's race detector has no warp-level epochs): the
data it orders is warp-private (each warp's own rows of sB), so this hides no race inside those
rows, but a cross-warp race across it would go unseen.

Tests patch module-level functions here (load_pos_rows_async, scatter_p2c, scatter_c2p) to inject
bugs: keep them module-level.
"""
import itertools
from types import SimpleNamespace

import numpy as np
import torch

from . import attention as at
from . import attention_host as ah
from .dropout import dropout_keep_cols, dropout_keep_rows, dropout_mask, kept
from .core import (F32, G, INF, NT, TID, TQ, WARP, HostTensor, Smem, cp_async16_from, mma16816, pack2, round_h,
                   syncthreads_or)

BM, BN = 64, 64
POS_ROWS, WARP_DIAG, DIAG = 128, 80, BM + BN - 1


def load_pos_rows_async(sm, tile, ROW, pos, row_stride, rel, t0, n_diag, n_rel, ROWS, D):
    kChunks = D // 8
    assert (ROWS * kChunks) % NT == 0
    for i in range(ROWS * kChunks // NT):
        idx = TID + i * NT
        r, c = idx // kChunks, idx % kChunks
        t = t0 + r
        valid = (r < n_diag) & (t >= 0) & (t < n_rel)
        src = np.full(NT, pos.off, np.int64)
        if valid.any():  # && short-circuits: rel[t] only where t is on the table
            rows = rel.buf.read(rel.off + t[valid]).astype(np.int64)
            src[valid] = pos.off + rows * row_stride + c[valid] * 8
        cp_async16_from(sm, tile + 2 * (r * ROW + c * 8), pos.buf, src, valid, TID)


def scatter_p2c(sm, sB, BROW, c, u_base, c_base, add=False):
    """P[u, j'] -> sB[u + j' - BN + 1][j'] (one u per (i', j'))."""
    for j in range(2):
        for e in range(4):
            u = u_base + G + (e >> 1) * 8
            col = c_base + j * 8 + 2 * TQ + (e & 1)
            row = u + col - (BN - 1)
            ok = (row >= 0) & (row < BM)
            addr = sB + 4 * (row[ok] * BROW + col[ok])
            val = c[ok, j, e]
            if add:
                val = (sm.read_f(addr, TID[ok]) + val).astype(F32)
            sm.write_f(addr, val, TID[ok])


def scatter_c2p(sm, sB, BROW, c, u0, add):
    """C[i', u] -> sB[i'][i' - u + BN - 1] of the warp's own rows (added to p2c when that is on)."""
    for j in range(2):
        for e in range(4):
            row = WARP * 16 + G + (e >> 1) * 8
            u = u0 + j * 8 + 2 * TQ + (e & 1)
            col = row - u + (BN - 1)
            ok = (col >= 0) & (col < BN)
            addr = sB + 4 * (row[ok] * BROW + col[ok])
            val = c[ok, j, e]
            if add:
                val = (sm.read_f(addr, TID[ok]) + val).astype(F32)
            sm.write_f(addr, val, TID[ok])


def p2c_into(sm, sB, BROW, sP, ROW, sKs, D, add):
    for piece in range(2 * BN // 16):
        u_base, c_base = (2 * WARP + piece // (BN // 16)) * 16, (piece % (BN // 16)) * 16
        c = np.zeros((NT, 2, 4), F32)
        at.mma_tile_smem_a(sm, c, sP, ROW, u_base, sKs + 2 * c_base * ROW, D, 16, True)
        scatter_p2c(sm, sB, BROW, c, u_base, c_base, add)


def c2p_into(sm, sB, BROW, sP, ROW, sQ, D, add):
    for piece in range(WARP_DIAG // 16):
        u0 = WARP * 16 + piece * 16
        c = np.zeros((NT, 2, 4), F32)
        at.mma_tile_smem_a(sm, c, sQ, ROW, WARP * 16, sP + 2 * u0 * ROW, D, 16, True)
        scatter_c2p(sm, sB, BROW, c, u0, add)


def syncwarp(sm):
    sm.barrier()  # see the module docstring


def head_operands(p, b, h, C2P, P2C):
    """fwd_kernel.cuh's HeadOperands: q, k, v, pos_key, pos_query (None when the term is off), mask."""
    return (p.q + b * p.q_batch_stride + h * p.q_head_stride, p.k + b * p.k_batch_stride + h * p.k_head_stride,
            p.v + b * p.v_batch_stride + h * p.v_head_stride,
            p.pos_key + h * p.pk_head_stride if C2P else None, p.pos_query + h * p.pq_head_stride if P2C else None,
            p.key_padding_mask + b * p.mask_batch_stride if p.key_padding_mask is not None else None)


def disentangled_fwd_kernel(p, D, C2P, P2C, blockIdx, DROPOUT=False):
    ROW, BROW = D + 8, BN + 8
    kSmem = (BM + 4 * BN + POS_ROWS) * ROW * 2 + (BM * BROW + 2 * BN) * 4
    sm = Smem(kSmem)
    sQ = 0
    sK = sQ + 2 * BM * ROW
    sV = sK + 2 * 2 * BN * ROW
    sP = sV + 2 * 2 * BN * ROW
    sB = sP + 2 * POS_ROWS * ROW
    sBias = sB + 4 * BM * BROW
    assert sBias + 4 * 2 * BN == kSmem
    kPos = C2P or P2C

    m0, h, b = blockIdx[0] * BM, blockIdx[1], blockIdx[2]
    len_q, len_k = p.len_q, p.len_k
    n_rel = len_q + len_k - 1
    q, k, v, pk, pq, mask = head_operands(p, b, h, C2P, P2C)
    n_tiles = at.cdiv(len_k, BN)

    at.load_tile_async(sm, sQ, ROW, q, p.q_row_stride, m0, len_q, BM, D)
    sm.commit()
    n = at.next_key_tile(sm, 0, n_tiles, mask, len_k, sBias, BN)
    if n < n_tiles:
        at.load_tile_async(sm, sK, ROW, k, p.k_row_stride, n * BN, len_k, BN, D, mask)
        at.load_tile_async(sm, sV, ROW, v, p.v_row_stride, n * BN, len_k, BN, D, mask)
    sm.commit()

    acc = np.zeros((NT, D // 8, 4), F32)
    row_max = np.full((NT, 2), -INF, F32)
    row_sum = np.zeros((NT, 2), F32)
    row_base = m0 + WARP * 16 + G
    drop = dropout_mask(p, b, h) if DROPOUT else None

    stage = 0
    while n < n_tiles:
        n0 = n * BN
        t0 = m0 - n0 + len_k - BN
        sKs = sK + 2 * stage * BN * ROW
        sVs = sV + 2 * stage * BN * ROW
        bias = sBias + 4 * stage * BN
        if P2C:
            load_pos_rows_async(sm, sP, ROW, pq, p.pq_row_stride, p.rel_index, t0, DIAG, n_rel, POS_ROWS, D)
        sm.commit()
        nxt = at.next_key_tile(sm, n + 1, n_tiles, mask, len_k, sBias + 4 * (stage ^ 1) * BN, BN)
        if nxt < n_tiles:
            at.load_tile_async(sm, sK + 2 * (stage ^ 1) * BN * ROW, ROW, k, p.k_row_stride, nxt * BN, len_k, BN, D, mask)
            at.load_tile_async(sm, sV + 2 * (stage ^ 1) * BN * ROW, ROW, v, p.v_row_stride, nxt * BN, len_k, BN, D, mask)
        sm.commit()
        sm.wait(1)
        sm.barrier()

        if P2C:
            p2c_into(sm, sB, BROW, sP, ROW, sKs, D, False)
            sm.barrier()
        if C2P:
            load_pos_rows_async(sm, sP, ROW, pk, p.pk_row_stride, p.rel_index, t0, DIAG, n_rel, POS_ROWS, D)
            sm.commit()
            sm.wait(0)
            sm.barrier()
            c2p_into(sm, sB, BROW, sP, ROW, sQ, D, P2C)
            syncwarp(sm)

        s = np.zeros((NT, BN // 8, 4), F32)
        at.mma_tile_smem_a(sm, s, sQ, ROW, WARP * 16, sKs, D, BN, True)
        for j in range(BN // 8):
            for e in range(4):
                col = j * 8 + 2 * TQ + (e & 1)
                x = s[:, j, e]
                if kPos:
                    x = (x + sm.read_f(sB + 4 * ((WARP * 16 + G + (e >> 1) * 8) * BROW + col), TID)).astype(F32)
                s[:, j, e] = np.where(sm.read_f(bias + 4 * col, TID) == 0, (x * F32(p.scale_log2)).astype(F32), -INF)
        at.online_softmax_step(s, acc, row_max, row_sum)
        if DROPOUT:
            keep = dropout_keep_rows(drop, row_base, n0, BN // 8)
            for j in range(BN // 8):
                for e in range(4):
                    s[~kept(keep, j, e), j, e] = 0
        at.mma_tile_reg_a(sm, acc, s, sVs, ROW, BN, D)

        sm.barrier()
        n = nxt
        stage ^= 1
    sm.wait(0)
    sm.barrier()

    at.finish_rows(sm, sQ, ROW, acc, D, row_max, row_sum, F32(p.dropout_scale if DROPOUT else 1), p.lse, b * p.lse_batch_stride + h * p.lse_head_stride,
                   row_base, len_q)
    sm.barrier()
    out = p.out + b * p.out_batch_stride + h * p.out_head_stride
    at.store_tile(sm, out, p.out_row_stride, m0, len_q, sQ, ROW, BM, D)


def run_disentangled_fwd(p):
    if p.len_q == 0 or p.batch == 0 or p.heads == 0:
        return
    for blk in itertools.product(range(at.cdiv(p.len_q, BM)), range(p.heads), range(p.batch)):
        disentangled_fwd_kernel(p, p.head_dim, p.c2p, p.p2c, blk, p.dropout)


# --- host: csrc/disentangled.cpp (checks, allocation) + csrc/cuda/disentangled_cuda.cpp ------------

def fill_terms(p, H, pos_key, pos_query, rel_index, key_padding_mask, c2p, p2c):
    """fill_fwd's position and mask fields (disentangled_cuda.cpp), shared by forward and backward."""
    p.c2p, p.p2c = c2p, p2c
    for name, pos, used, attr in (("pos_key", pos_key, c2p, "pk"), ("pos_query", pos_query, p2c, "pq")):
        if used:
            ph = ah._h(name, ah.rows_aligned(pos.expand(H, -1, -1)))
            setattr(p, name, ph.ptr())
            setattr(p, attr + "_head_stride", ph.stride[0])
            setattr(p, attr + "_row_stride", ph.stride[1])
    p.rel_index = HostTensor("rel_index", rel_index.contiguous()).ptr()
    if key_padding_mask is not None:
        mh = ah._h("key_padding_mask", key_padding_mask)
        assert mh.stride[1] == 1
        p.key_padding_mask, p.mask_batch_stride = mh.ptr(), mh.stride[0]
    else:
        p.key_padding_mask, p.mask_batch_stride = None, 0


def disentangled_attention_fwd_cuda(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, scale, c2p, p2c,
                                    dropout_p=0.0, seed=0):
    """q [B, H, Lq, D], k/v [B, H, Lk, D] fp16; pos_* [H or 1, rows, D] or None -> (out, lse)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    assert D in (32, 64, 128) and q.dtype == torch.float16  # check_cuda_limits (fp16 only here)
    assert (pos_key is not None) == c2p and (pos_query is not None) == p2c  # check_pos
    rows = pos_key.shape[1] if c2p else pos_query.shape[1] if p2c else -1
    assert rel_index.dtype == torch.int64 and rel_index.numel() == max(Lq + Lk - 1, 0)  # check_rel_index
    if rows >= 0 and rel_index.numel():
        assert 0 <= int(rel_index.min()) and int(rel_index.max()) < rows
    out = ah._h("out", ah.empty_bhld(q, B, H, Lq, D), poison=True, write_once=True)
    lse = ah._h("lse", torch.empty(B, H, Lq), poison=True, write_once=True)
    if out.tensor().numel() == 0:
        return out.tensor(), lse.tensor()
    qh, kh, vh = (ah._h(n, ah.rows_aligned(t)) for n, t in (("q", q), ("k", k), ("v", v)))
    p = SimpleNamespace()
    p.q, p.k, p.v = qh.ptr(), kh.ptr(), vh.ptr()
    p.q_batch_stride, p.q_head_stride, p.q_row_stride = qh.stride[:3]
    p.k_batch_stride, p.k_head_stride, p.k_row_stride = kh.stride[:3]
    p.v_batch_stride, p.v_head_stride, p.v_row_stride = vh.stride[:3]
    fill_terms(p, H, pos_key, pos_query, rel_index, key_padding_mask, c2p, p2c)
    p.out = out.ptr()
    p.out_batch_stride, p.out_head_stride, p.out_row_stride = out.stride[:3]
    p.lse = lse.buf
    p.lse_batch_stride, p.lse_head_stride = lse.stride[0], lse.stride[1]
    p.batch, p.heads, p.len_q, p.len_k, p.head_dim = B, H, Lq, Lk, D
    p.scale = float(np.float32(scale))
    p.scale_log2 = float(np.float32(scale * 1.4426950408889634))
    ah.set_dropout(p, dropout_p, seed)
    run_disentangled_fwd(p)
    return out.tensor(), lse.tensor()


# --- bwd_kernel.cuh --------------------------------------------------------------------------------

def position_tile(sm, sB, BROW, sP, ROW, sQ, sKs, pk, pq, p, t0, n_rel, D, C2P, P2C, C2P_LAST):
    def load(pos, row_stride):
        load_pos_rows_async(sm, sP, ROW, pos, row_stride, p.rel_index, t0, DIAG, n_rel, POS_ROWS, D)
        sm.commit()
        sm.wait(0)
        sm.barrier()

    def p2c(add):
        load(pq, p.pq_row_stride)
        p2c_into(sm, sB, BROW, sP, ROW, sKs, D, add)
        sm.barrier()

    def c2p(add):
        load(pk, p.pk_row_stride)
        c2p_into(sm, sB, BROW, sP, ROW, sQ, D, add)
        sm.barrier()

    if C2P_LAST:
        if P2C:
            p2c(False)
        if C2P:
            c2p(P2C)
    else:
        if C2P:
            c2p(False)
        if P2C:
            p2c(C2P)
    if not C2P and not P2C:
        sm.wait(0)
        sm.barrier()


def a_fragment(value):
    """[NT, 4, 2] A fragment whose element (row, col) is value(row, col) (per-thread arrays), as fp16."""
    regs = []
    for r in range(4):
        row, col = G + 8 * (r & 1), 2 * TQ + 8 * (r >> 1)
        regs.append(pack2(value(row, col), value(row, col + 1)))
    return np.stack(regs, 1)


def a_fragment_split(value):
    """(hi, lo) fragments: hi = fp16(x), lo = fp16(x - hi) (bwd_kernel.cuh a_fragment_split)."""
    his, los = [], []
    for r in range(4):
        row, col = G + 8 * (r & 1), 2 * TQ + 8 * (r >> 1)
        x0, x1 = value(row, col), value(row, col + 1)
        his.append(pack2(x0, x1))
        los.append(pack2(x0 - round_h(x0), x1 - round_h(x1)))
    return np.stack(his, 1), np.stack(los, 1)


def read_ds(sm, base, BROW, r, c, ok):
    """ds[r * BROW + c] where ok (fp32 smem, per-thread byte base), else 0."""
    out = np.zeros(NT, F32)
    if ok.any():
        out[ok] = sm.read_f((base + 4 * (r * BROW + c))[ok], TID[ok])
    return out


def mma_a_kn(sm, acc, a, b_tile, ROW, k0, D):
    for j in range(D // 16):
        b = at.load_b_kn(sm, b_tile, ROW, j * 16, k0)
        acc[:, 2 * j] = mma16816(acc[:, 2 * j], a, b[:, 0], b[:, 1])
        acc[:, 2 * j + 1] = mma16816(acc[:, 2 * j + 1], a, b[:, 2], b[:, 3])


def add_dpos(sm, dpos, row_stride, rel, t0, u0, n_rel, a, a_lo, b_tile, ROW, D):
    rows, oks = [], []
    for h in range(2):
        u = u0 + G + 8 * h
        tt = t0 + u
        ok = (u < DIAG) & (tt >= 0) & (tt < n_rel)
        r = np.zeros(NT, np.int64)
        if ok.any():
            r[ok] = rel.buf.read(rel.off + tt[ok]).astype(np.int64)
        rows.append(r)
        oks.append(ok)
    for j in range(D // 16):
        b = at.load_b_kn(sm, b_tile, ROW, j * 16, 0)
        c = np.zeros((NT, 2, 4), F32)
        c[:, 0] = mma16816(c[:, 0], a, b[:, 0], b[:, 1])
        c[:, 1] = mma16816(c[:, 1], a, b[:, 2], b[:, 3])
        c[:, 0] = mma16816(c[:, 0], a_lo, b[:, 0], b[:, 1])
        c[:, 1] = mma16816(c[:, 1], a_lo, b[:, 2], b[:, 3])
        for x in range(2):
            for e in range(4):
                h = e >> 1
                col = j * 16 + 8 * x + 2 * TQ + (e & 1)
                ok = oks[h]
                if ok.any():
                    off = dpos.buf._check(dpos.off + rows[h][ok] * row_stride + col[ok], 1, 0)
                    np.add.at(dpos.buf.a, off, c[ok, x, e])  # atomicAdd


def query_split(D):
    """BwdConfig<D>::kQuerySplit: the dk/dv kernel's query pieces per tile."""
    return {32: 1, 64: 2, 128: 2}[D]


def d_split(D, dropout=False):
    """BwdConfig<D>::kDSplitFor<DROPOUT>: the dk/dv kernel's sweeps, one per column block of dk and
    dv (four at head_dim 128 with dropout)."""
    return (4 if dropout else 2) if D == 128 else 1


def query_pieces(HM):
    """The first query column of each piece (tests patch this to drop one)."""
    return range(0, BM, HM)


def _bwd_smem(D):
    ROW, BROW = D + 8, BN + 8
    kSmem = (2 * BM + 2 * BN + POS_ROWS) * ROW * 2 + (2 * BM * BROW + BN + 2 * BM) * 4
    sQ = 0
    sdO = sQ + 2 * BM * ROW
    sK = sdO + 2 * BM * ROW
    sV = sK + 2 * BN * ROW
    sP = sV + 2 * BN * ROW
    sB = sP + 2 * POS_ROWS * ROW
    sDS = sB + 4 * BM * BROW
    sBias = sDS + 4 * BM * BROW
    sL = sBias + 4 * BN
    sDelta = sL + 4 * BM
    assert sDelta + 4 * BM == kSmem
    return Smem(kSmem), ROW, BROW, sQ, sdO, sK, sV, sP, sB, sDS, sBias, sL, sDelta


def disentangled_bwd_dq_kernel(p, D, C2P, P2C, blockIdx, DROPOUT=False):
    sm, ROW, BROW, sQ, sdO, sK, sV, sP, sB, sDS, sBias, _, _ = _bwd_smem(D)
    m0, h, b = blockIdx[0] * BM, blockIdx[1], blockIdx[2]
    len_q, len_k = p.len_q, p.len_k
    n_rel = len_q + len_k - 1
    q, k, v, pk, pq, mask = head_operands(p, b, h, C2P, P2C)
    dout = p.dout + b * p.dout_batch_stride + h * p.dout_head_stride
    dpk = p.dpos_key + h * p.dpos_head_stride if C2P else None
    n_tiles = at.cdiv(len_k, BN)

    at.load_tile_async(sm, sQ, ROW, q, p.q_row_stride, m0, len_q, BM, D)
    at.load_tile_async(sm, sdO, ROW, dout, p.dout_row_stride, m0, len_q, BM, D)
    sm.commit()
    row_base = m0 + WARP * 16 + G
    lse2, delta = np.zeros((NT, 2), F32), np.zeros((NT, 2), F32)
    for r in range(2):
        row = row_base + 8 * r
        ok = row < len_q
        a = b * p.lse_batch_stride + h * p.lse_head_stride + row
        lse2[:, r] = INF
        lse2[ok, r] = (p.lse.read(a[ok]) * at.kLog2e).astype(F32)
        delta[ok, r] = p.delta.read(a[ok])
    dq = np.zeros((NT, D // 8, 4), F32)
    drop = dropout_mask(p, b, h) if DROPOUT else None

    n = at.next_key_tile(sm, 0, n_tiles, mask, len_k, sBias, BN)
    while n < n_tiles:
        n0 = n * BN
        t0 = m0 - n0 + len_k - BN
        at.load_tile_async(sm, sK, ROW, k, p.k_row_stride, n0, len_k, BN, D, mask)
        at.load_tile_async(sm, sV, ROW, v, p.v_row_stride, n0, len_k, BN, D, mask)
        sm.commit()
        position_tile(sm, sB, BROW, sP, ROW, sQ, sK, pk, pq, p, t0, n_rel, D, C2P, P2C, True)
        keep = dropout_keep_rows(drop, row_base, n0, BN // 8) if DROPOUT else None
        s = np.zeros((NT, BN // 8, 4), F32)
        at.mma_tile_smem_a(sm, s, sQ, ROW, WARP * 16, sK, D, BN, True)
        dp = np.zeros((NT, BN // 8, 4), F32)
        at.mma_tile_smem_a(sm, dp, sdO, ROW, WARP * 16, sV, D, BN, True)
        for j in range(BN // 8):
            for e in range(4):
                col = j * 8 + 2 * TQ + (e & 1)
                r = e >> 1
                x = s[:, j, e]
                if C2P or P2C:
                    x = (x + sm.read_f(sB + 4 * ((WARP * 16 + G + 8 * r) * BROW + col), TID)).astype(F32)
                vis = sm.read_f(sBias + 4 * col, TID) == 0
                pr = np.where(vis, np.exp2((x * F32(p.scale_log2)).astype(F32) - lse2[:, r]), F32(0)).astype(F32)
                dpv = dp[:, j, e]
                if DROPOUT:
                    dpv = np.where(kept(keep, j, e), dpv * F32(p.dropout_scale), F32(0)).astype(F32)
                s[:, j, e] = (pr * (dpv - delta[:, r])).astype(F32)
        at.mma_tile_reg_a(sm, dq, s, sK, ROW, BN, D)
        if C2P:
            for j in range(BN // 8):
                for e in range(4):
                    sm.write_f(sDS + 4 * ((WARP * 16 + G + 8 * (e >> 1)) * BROW + j * 8 + 2 * TQ + (e & 1)), s[:, j, e], TID)
            syncwarp(sm)
            ds = sDS + 4 * WARP * 16 * BROW
            for piece in range(WARP_DIAG // 16):
                u0 = WARP * 16 + piece * 16

                def z(i, uu):
                    col = WARP * 16 + i - (u0 + uu) + (BN - 1)
                    return read_ds(sm, ds, BROW, i, col, (col >= 0) & (col < BN))

                a = a_fragment(z)
                mma_a_kn(sm, dq, a, sP, ROW, u0, D)
                a, a_lo = a_fragment_split(lambda uu, i: z(i, uu))
                add_dpos(sm, dpk, p.dpos_row_stride, p.rel_index, t0, u0, n_rel, a, a_lo, sQ + 2 * WARP * 16 * ROW, ROW, D)
        sm.barrier()
        n = at.next_key_tile(sm, n + 1, n_tiles, mask, len_k, sBias, BN)
    sm.wait(0)
    sm.barrier()
    at.stage_rows(sm, sQ, ROW, WARP * 16, dq, D, F32(p.scale), F32(p.scale))
    sm.barrier()
    at.store_tile(sm, p.dq + b * p.dq_batch_stride + h * p.dq_head_stride, p.dq_row_stride, m0, len_q, sQ, ROW, BM, D)


def disentangled_bwd_dkdv_kernel(p, D, C2P, P2C, blockIdx, DROPOUT=False):
    sm, ROW, BROW, sQ, sdO, sK, sV, sP, sB, sDS, sBias, sL, sDelta = _bwd_smem(D)
    n0, h, b = blockIdx[0] * BN, blockIdx[1], blockIdx[2]
    len_q, len_k = p.len_q, p.len_k
    n_rel = len_q + len_k - 1
    q, k, v, pk, pq, mask = head_operands(p, b, h, C2P, P2C)
    dout = p.dout + b * p.dout_batch_stride + h * p.dout_head_stride
    dpq = p.dpos_query + h * p.dpos_head_stride if P2C else None

    key = n0 + TID
    visible = (TID < BN) & (key < len_k)
    if mask is not None and visible.any():
        visible[visible] = mask.buf.read(mask.off + key[visible]).astype(bool)
    sel = TID < BN
    sm.write_f(sBias + 4 * TID[sel], np.where(visible[sel], F32(0), -INF).astype(F32), TID[sel])
    live = syncthreads_or(sm, visible)
    at.load_tile_async(sm, sK, ROW, k, p.k_row_stride, n0, len_k, BN, D, mask)
    at.load_tile_async(sm, sV, ROW, v, p.v_row_stride, n0, len_k, BN, D, mask)
    sm.commit()

    DH = D // d_split(D, DROPOUT)
    key_row = WARP * 16 + G
    keep0 = np.where(sm.read_f(sBias + 4 * key_row, TID) == 0, F32(1), F32(0))
    keep1 = np.where(sm.read_f(sBias + 4 * (key_row + 8), TID) == 0, F32(1), F32(0))
    for d0 in range(0, D, DH):  # one sweep over the query tiles per column block of dk, dv
        dk = np.zeros((NT, DH // 8, 4), F32)
        dv = np.zeros((NT, DH // 8, 4), F32)
        m0 = 0
        while live and m0 < len_q:
            t0 = m0 - n0 + len_k - BN
            at.load_tile_async(sm, sQ, ROW, q, p.q_row_stride, m0, len_q, BM, D)
            at.load_tile_async(sm, sdO, ROW, dout, p.dout_row_stride, m0, len_q, BM, D)
            sm.commit()
            w = TID < BM
            row = m0 + TID[w]
            ok = row < len_q
            a_ = b * p.lse_batch_stride + h * p.lse_head_stride + row
            lv, dv_ = np.full(row.size, INF, F32), np.zeros(row.size, F32)
            lv[ok] = (p.lse.read(a_[ok]) * at.kLog2e).astype(F32)
            dv_[ok] = p.delta.read(a_[ok])
            sm.write_f(sL + 4 * TID[w], lv, TID[w])
            sm.write_f(sDelta + 4 * TID[w], dv_, TID[w])
            position_tile(sm, sB, BROW, sP, ROW, sQ, sK, pk, pq, p, t0, n_rel, D, C2P, P2C, False)
            HM = BM // query_split(D)
            for c0 in query_pieces(HM):
                keep = None
                if DROPOUT:
                    keep = dropout_keep_cols(dropout_mask(p, b, h), (n0 + WARP * 16) >> 3, m0 + c0, HM // 8)
                s = np.zeros((NT, HM // 8, 4), F32)
                at.mma_tile_smem_a(sm, s, sK, ROW, WARP * 16, sQ + 2 * c0 * ROW, D, HM, True)
                dp = np.zeros((NT, HM // 8, 4), F32)
                at.mma_tile_smem_a(sm, dp, sV, ROW, WARP * 16, sdO + 2 * c0 * ROW, D, HM, True)
                for j in range(HM // 8):
                    for e in range(4):
                        col = c0 + j * 8 + 2 * TQ + (e & 1)
                        kr = key_row + 8 * (e >> 1)
                        x = s[:, j, e]
                        if C2P or P2C:
                            x = (x + sm.read_f(sB + 4 * (col * BROW + kr), TID)).astype(F32)
                        vis = sm.read_f(sBias + 4 * kr, TID) == 0
                        pr = np.where(vis, np.exp2((x * F32(p.scale_log2)).astype(F32) - sm.read_f(sL + 4 * col, TID)),
                                      F32(0)).astype(F32)
                        dpv = dp[:, j, e]
                        if DROPOUT:
                            kp = kept(keep, j, e)
                            pr_kept = np.where(kp, pr, F32(0)).astype(F32)
                            dpv = np.where(kp, dpv * F32(p.dropout_scale), F32(0)).astype(F32)
                        s[:, j, e] = pr_kept if DROPOUT else pr
                        dp[:, j, e] = (pr * (dpv - sm.read_f(sDelta + 4 * col, TID))).astype(F32)
                at.mma_tile_reg_a(sm, dv, s, sdO + 2 * (c0 * ROW + d0), ROW, HM, DH)
                at.mma_tile_reg_a(sm, dk, dp, sQ + 2 * (c0 * ROW + d0), ROW, HM, DH)
                if P2C:
                    for j in range(HM // 8):
                        for e in range(4):
                            sm.write_f(sDS + 4 * ((key_row + 8 * (e >> 1)) * BROW + c0 + j * 8 + 2 * TQ + (e & 1)),
                                       dp[:, j, e], TID)
            if P2C:
                syncwarp(sm)
                ds = sDS + 4 * WARP * 16 * BROW
                u_first = BM - 16 * (WARP + 1)
                for piece in range(WARP_DIAG // 16):
                    u0 = u_first + piece * 16

                    def y_t(jl, uu):
                        i = u0 + uu + WARP * 16 + jl - (BN - 1)
                        return read_ds(sm, ds, BROW, jl, i, (i >= 0) & (i < BM))

                    a = a_fragment(y_t)
                    mma_a_kn(sm, dk, a, sP + 2 * d0, ROW, u0, DH)
                    if d0 != 0:
                        continue  # dpos_query once, in the first sweep
                    a, a_lo = a_fragment_split(lambda uu, jl: y_t(jl, uu))
                    add_dpos(sm, dpq, p.dpos_row_stride, p.rel_index, t0, u0, n_rel, a, a_lo, sK + 2 * WARP * 16 * ROW,
                             ROW, D)
            sm.barrier()
            m0 += BM
        sm.wait(0)
        sm.barrier()
        at.stage_rows(sm, sQ + 2 * d0, ROW, WARP * 16, dk, DH, F32(p.scale) * keep0, F32(p.scale) * keep1)
        dv_mul = F32(p.dropout_scale if DROPOUT else 1)
        at.stage_rows(sm, sdO + 2 * d0, ROW, WARP * 16, dv, DH, keep0 * dv_mul, keep1 * dv_mul)
        sm.barrier()
        at.store_tile(sm, p.dk + b * p.dk_batch_stride + h * p.dk_head_stride + d0, p.dk_row_stride, n0, len_k,
                      sQ + 2 * d0, ROW, BN, DH)
        at.store_tile(sm, p.dv + b * p.dv_batch_stride + h * p.dv_head_stride + d0, p.dv_row_stride, n0, len_k,
                      sdO + 2 * d0, ROW, BN, DH)
        if d0 + DH < D:
            sm.barrier()


def run_disentangled_bwd(p):
    if p.batch == 0 or p.heads == 0 or (p.len_q == 0 and p.len_k == 0):
        return
    for blk in itertools.product(range(at.cdiv(p.len_q, BM)), range(p.heads), range(p.batch)):
        disentangled_bwd_dq_kernel(p, p.head_dim, p.c2p, p.p2c, blk, p.dropout)
    for blk in itertools.product(range(at.cdiv(p.len_k, BN)), range(p.heads), range(p.batch)):
        disentangled_bwd_dkdv_kernel(p, p.head_dim, p.c2p, p.p2c, blk, p.dropout)


def disentangled_attention_bwd_cuda(dout, q, k, v, pos_key, pos_query, out, lse, rel_index, key_padding_mask, scale,
                                    c2p, p2c, dropout_p=0.0, seed=0):
    """The CUDA backward's host: delta = rowsum(dout * out) (torch, fp32), fp32 dpos accumulators
    zeroed, the two kernels, then dpos * scale in q's dtype. -> (dq, dk, dv, dpos_key, dpos_query)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    assert D in (32, 64, 128)  # check_cuda_limits
    dq = ah._h("dq", ah.empty_bhld(q, B, H, Lq, D), poison=True, write_once=True)
    dk = ah._h("dk", ah.empty_bhld(k, B, H, Lk, D), poison=True, write_once=True)
    dv = ah._h("dv", ah.empty_bhld(v, B, H, Lk, D), poison=True, write_once=True)
    rows = pos_key.shape[1] if c2p else pos_query.shape[1] if p2c else 0
    dpk = HostTensor("dpos_key", torch.zeros(H, rows, D))
    dpq = HostTensor("dpos_query", torch.zeros(H, rows, D))
    delta = HostTensor("delta", (dout.float() * out.float()).sum(-1).contiguous())
    qh, kh, vh, oh = (ah._h(n, ah.rows_aligned(t)) for n, t in (("q", q), ("k", k), ("v", v), ("dout", dout)))
    p = SimpleNamespace()
    p.q, p.k, p.v, p.dout = qh.ptr(), kh.ptr(), vh.ptr(), oh.ptr()
    p.q_batch_stride, p.q_head_stride, p.q_row_stride = qh.stride[:3]
    p.k_batch_stride, p.k_head_stride, p.k_row_stride = kh.stride[:3]
    p.v_batch_stride, p.v_head_stride, p.v_row_stride = vh.stride[:3]
    p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride = oh.stride[:3]
    fill_terms(p, H, pos_key, pos_query, rel_index, key_padding_mask, c2p, p2c)
    lse_c = HostTensor("lse", lse.contiguous())
    p.lse, p.delta = lse_c.buf, delta.buf
    p.lse_batch_stride, p.lse_head_stride = lse_c.stride[0], lse_c.stride[1]
    p.dq, p.dk, p.dv = dq.ptr(), dk.ptr(), dv.ptr()
    p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride = dq.stride[:3]
    p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride = dk.stride[:3]
    p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride = dv.stride[:3]
    p.dpos_key, p.dpos_query = dpk.ptr(), dpq.ptr()
    p.dpos_head_stride, p.dpos_row_stride = rows * D, D
    p.batch, p.heads, p.len_q, p.len_k, p.head_dim = B, H, Lq, Lk, D
    p.scale = float(np.float32(scale))
    p.scale_log2 = float(np.float32(scale * 1.4426950408889634))
    ah.set_dropout(p, dropout_p, seed)  # the forward's mask, redrawn
    run_disentangled_bwd(p)
    fin = [(t.tensor() * p.scale).half() if used else None for t, used in ((dpk, c2p), (dpq, p2c))]
    return dq.tensor(), dk.tensor(), dv.tensor(), fin[0], fin[1]
