"""Thread-level transcription of the CUDA attention kernels (kernels/attention/: fwd_kernel.cuh,
bwd_kernel.cuh, common.cuh), line by line, on the SM80 model of core.py (their host glue is
attention_host.py). Keep it in step with the kernels: every kernel change
costs the same change here until scripts/gpu_check.sh has passed on hardware (docs/EMULATION.md).

What is emulated
- Every block of every launch (forward; backward delta, dq, dk/dv; padded and varlen), with the
  kernels' own index math: grid, early exits, tile loops, causal tile limits, key-tile skipping
  (next_key_tile), query-tile ranges of dk/dv, GQA head mapping, cu_seqlens offsets.
- Every per-thread formula (g = lane >> 2, t = lane & 3, row_base, key_base, col, ...) for every
  lane; load_a / load_b_nk / load_b_kn + mma as the kernel issues them (tests check them against
  a plain matmul).
- Shared memory with the kernel's kSmem bytes and carve-up (sQ, sK, sV, sBias, ... and the padded
  row kRow = D + 8); fp16 tiles and fp32 vectors alias it exactly as in the kernel.
- Shuffle reductions (quad_max/quad_sum: xor 1, 2; delta: xor 16..1); __syncthreads_or as an OR
  over all 128 threads.
- Numerics: fp16 inputs, fp32 accumulators and softmax, P and staged outputs rounded to fp16.
- Dropout (the DROPOUT instantiations, p.dropout): dropout.cuh's mask, transcribed in dropout.py
  (Philox per thread, the keep-bit exchange by shuffles), applied where the kernels apply it.
- Outputs and workspaces poisoned with NaN and write-once.

Not emulated beyond core.py's limits: bf16 (only fp16; bf16 differs in pack2/unpack2 and the mma
type only).

Tests call attention_host.py's entry points (attention_fwd_cuda / attention_bwd_cuda /
attention_varlen_*_cuda) and patch module-level functions here (load_b_kn, quad_max, sequence, load_tile_async,
store_tile, mma_tile_smem_a, attention_bwd_dq_kernel) to inject bugs: keep them module-level.
"""
import itertools
from types import SimpleNamespace

import numpy as np

from .core import (F32, G, INF, LANE, NT, Smem, TID, TQ, WARP, cp_async16_from,
                   ldsm_x4, mma16816, pack2, pack_a, syncthreads_or)
from .dropout import dropout_keep_cols, dropout_keep_rows, dropout_mask, kept

kLog2e = np.float32(1.4426950408889634)
kLn2 = np.float32(0.6931471805599453)


# --- common.cuh, transcribed -------------------------------------------------------------------------

def cdiv(a, b):
    return (a + b - 1) // b if a >= 0 else -((-(a + b - 1)) // b)  # C truncation


def load_a(sm, tile, ROW, r0, c0):
    return ldsm_x4(sm, tile + 2 * ((r0 + (LANE & 15)) * ROW + c0 + (LANE >> 4) * 8))


def load_b_nk(sm, tile, ROW, n0, k0):
    return ldsm_x4(sm, tile + 2 * ((n0 + (LANE & 7) + (LANE >> 4) * 8) * ROW + k0 + ((LANE >> 3) & 1) * 8))


def load_b_kn(sm, tile, ROW, n0, k0):
    return ldsm_x4(sm, tile + 2 * ((k0 + (LANE & 7) + ((LANE >> 3) & 1) * 8) * ROW + n0 + (LANE >> 4) * 8), trans=True)


def mma_tile_smem_a(sm, c, a_tile, ROW, r0, b_tile, K, N, B_NK):
    for kk in range(K // 16):
        a = load_a(sm, a_tile, ROW, r0, kk * 16)
        for j in range(N // 16):
            b = (load_b_nk if B_NK else load_b_kn)(sm, b_tile, ROW, j * 16, kk * 16)
            c[:, 2 * j] = mma16816(c[:, 2 * j], a, b[:, 0], b[:, 1])
            c[:, 2 * j + 1] = mma16816(c[:, 2 * j + 1], a, b[:, 2], b[:, 3])


def mma_tile_reg_a(sm, c, p, b_tile, ROW, K, N):
    for kk in range(K // 16):
        a = pack_a(p[:, 2 * kk], p[:, 2 * kk + 1])
        for j in range(N // 16):
            b = load_b_kn(sm, b_tile, ROW, j * 16, kk * 16)
            c[:, 2 * j] = mma16816(c[:, 2 * j], a, b[:, 0], b[:, 1])
            c[:, 2 * j + 1] = mma16816(c[:, 2 * j + 1], a, b[:, 2], b[:, 3])


def load_tile_async(sm, tile, ROW, g, row_stride, row0, n_rows, ROWS, D, keep=None):
    kChunks = D // 8
    assert (ROWS * kChunks) % NT == 0
    for i in range(ROWS * kChunks // NT):
        idx = TID + i * NT
        r, c = idx // kChunks, idx % kChunks
        valid = row0 + r < n_rows
        if keep is not None and valid.any():  # && short-circuits: keep[row] only for rows < n_rows
            valid[valid] = keep.buf.read(keep.off + (row0 + r)[valid]).astype(bool)
        src = np.where(valid, g.off + (row0 + r).astype(np.int64) * row_stride + c * 8, g.off)
        cp_async16_from(sm, tile + 2 * (r * ROW + c * 8), g.buf, src, valid, TID)  # src-size 0 reads nothing


def stage_rows(sm, tile, ROW, r0, c, D, mul0, mul1):
    for j in range(D // 8):
        sm.write_h(tile + 2 * ((r0 + G) * ROW + j * 8 + 2 * TQ), pack2(c[:, j, 0] * mul0, c[:, j, 1] * mul0), TID, n=2, align=4)
        sm.write_h(tile + 2 * ((r0 + G + 8) * ROW + j * 8 + 2 * TQ), pack2(c[:, j, 2] * mul1, c[:, j, 3] * mul1), TID, n=2, align=4)


def store_tile(sm, g, row_stride, row0, n_rows, tile, ROW, ROWS, D):
    kChunks = D // 8
    for i in range(ROWS * kChunks // NT):
        idx = TID + i * NT
        r, c = idx // kChunks, idx % kChunks
        ok = row0 + r < n_rows
        if ok.any():
            vals = sm.read_h((tile + 2 * (r * ROW + c * 8))[ok], TID[ok], n=8, align=16)
            g.buf.write(g.off + (row0 + r[ok]).astype(np.int64) * row_stride + c[ok] * 8, vals.astype(np.float16), n=8, align=8)


def store_zeros(g, row_stride, row0, n_rows, ROWS, D):
    kChunks = D // 8
    for i in range(ROWS * kChunks // NT):
        idx = TID + i * NT
        r, c = idx // kChunks, idx % kChunks
        ok = row0 + r < n_rows
        if ok.any():
            g.buf.write(g.off + (row0 + r[ok]).astype(np.int64) * row_stride + c[ok] * 8, np.zeros((int(ok.sum()), 8), np.float16), n=8, align=8)


def next_key_tile(sm, n, n_tiles, mask, len_k, bias, BN):
    assert BN <= NT
    while n < n_tiles:
        key = n * BN + TID
        visible = (TID < BN) & (key < len_k)
        if mask is not None and visible.any():  # && short-circuits: mask[key] only where key < len_k
            visible[visible] = mask.buf.read(mask.off + key[visible])
        if mask is None or syncthreads_or(sm, visible):
            sel = TID < BN
            sm.write_f(bias + 4 * TID[sel], np.where(visible[sel], F32(0), -INF).astype(F32), TID[sel])
            return n
        n += 1
    return n


def quad_max(x):
    x = np.fmax(x, x[TID ^ 1])
    return np.fmax(x, x[TID ^ 2])


def quad_sum(x):
    x = (x + x[TID ^ 1]).astype(F32)
    return (x + x[TID ^ 2]).astype(F32)


def online_softmax_step(s, acc, row_max, row_sum):
    """common.cuh's online_softmax_step: one key tile of base-2 scores s [NT, N, 4] (-inf where not
    visible) becomes exp2(s - new max) in place; row_max, row_sum [NT, 2] and acc move to it."""
    for r in range(2):
        mx = row_max[:, r].copy()
        for j in range(s.shape[1]):
            mx = np.fmax(mx, np.fmax(s[:, j, 2 * r], s[:, j, 2 * r + 1]))
        mx = quad_max(mx)
        base = np.where(mx == -INF, F32(0), mx).astype(F32)
        alpha = np.exp2(row_max[:, r] - base).astype(F32)
        row_max[:, r] = mx
        ssum = np.zeros(NT, F32)
        for j in range(s.shape[1]):
            s[:, j, 2 * r] = np.exp2(s[:, j, 2 * r] - base)
            s[:, j, 2 * r + 1] = np.exp2(s[:, j, 2 * r + 1] - base)
            ssum = (ssum + s[:, j, 2 * r] + s[:, j, 2 * r + 1]).astype(F32)
        row_sum[:, r] = row_sum[:, r] * alpha + ssum
        acc[:, :, 2 * r] *= alpha[:, None]
        acc[:, :, 2 * r + 1] *= alpha[:, None]


def finish_rows(sm, sQ, ROW, acc, D, row_max, row_sum, out_mul, lse, lse_off, row_base, len_q):
    """common.cuh's finish_rows: the output rows times out_mul / l staged into the warp's rows of sQ
    (zeros where l == 0: the row sees no key; NaN l: a NaN score, the row is NaN), lse at lse_off + row."""
    mul = np.zeros((NT, 2), F32)
    for r in range(2):
        l = quad_sum(row_sum[:, r])
        row = row_base + r * 8
        live = l != 0
        mul[:, r] = np.where(live, out_mul / np.where(live, l, F32(1)), F32(0))
        w = (TQ == 0) & (row < len_q)
        lse_val = np.where(live, (row_max[:, r] + np.log2(np.where(live, l, F32(1)))) * kLn2, INF).astype(F32)
        lse.write(lse_off + row[w], lse_val[w])
    stage_rows(sm, sQ, ROW, WARP * 16, acc, D, mul[:, 0], mul[:, 1])


def sequence(p, b):
    if p.cu_seqlens_q is None:
        return 0, 0, p.len_q, p.len_k
    qs, ks = int(p.cu_seqlens_q.read(b)), int(p.cu_seqlens_k.read(b))
    return qs, ks, int(p.cu_seqlens_q.read(b + 1)) - qs, int(p.cu_seqlens_k.read(b + 1)) - ks


# --- fwd_kernel.cuh ----------------------------------------------------------------------------------

def attention_fwd_kernel(p, D, CAUSAL, blockIdx, DROPOUT=False):
    BM, BN, ROW = 64, 64, D + 8
    kSmem = (BM + 4 * BN) * ROW * 2 + 2 * BN * 4
    sm = Smem(kSmem)
    sQ = 0
    sK = sQ + 2 * BM * ROW
    sV = sK + 2 * 2 * BN * ROW
    sBias = sV + 2 * 2 * BN * ROW

    bx, by, bz = blockIdx
    m0, h, b = bx * BM, by, bz
    hk = h // (p.heads // p.kv_heads)
    q_start, k_start, len_q, len_k = sequence(p, b)
    if m0 >= len_q:
        return
    q = p.q + b * p.q_batch_stride + h * p.q_head_stride + q_start * p.q_row_stride
    k = p.k + b * p.k_batch_stride + hk * p.k_head_stride + k_start * p.k_row_stride
    v = p.v + b * p.v_batch_stride + hk * p.v_head_stride + k_start * p.v_row_stride
    mask = p.key_padding_mask + b * p.mask_batch_stride if p.key_padding_mask is not None else None
    offset = len_k - len_q

    n_tiles = cdiv(len_k, BN)
    if CAUSAL:
        last_key = min(m0 + BM, len_q) - 1 + offset
        n_tiles = min(n_tiles, 0 if last_key < 0 else last_key // BN + 1)

    load_tile_async(sm, sQ, ROW, q, p.q_row_stride, m0, len_q, BM, D)
    sm.commit()
    n = next_key_tile(sm, 0, n_tiles, mask, len_k, sBias, BN)
    if n < n_tiles:
        load_tile_async(sm, sK, ROW, k, p.k_row_stride, n * BN, len_k, BN, D, mask)
        load_tile_async(sm, sV, ROW, v, p.v_row_stride, n * BN, len_k, BN, D, mask)
    sm.commit()

    acc = np.zeros((NT, D // 8, 4), F32)
    row_max = np.full((NT, 2), -INF, F32)
    row_sum = np.zeros((NT, 2), F32)
    row_base = m0 + WARP * 16 + G
    drop = dropout_mask(p, b, h) if DROPOUT else None

    stage = 0
    while n < n_tiles:
        nxt = next_key_tile(sm, n + 1, n_tiles, mask, len_k, sBias + 4 * (stage ^ 1) * BN, BN)
        if nxt < n_tiles:
            load_tile_async(sm, sK + 2 * (stage ^ 1) * BN * ROW, ROW, k, p.k_row_stride, nxt * BN, len_k, BN, D, mask)
            load_tile_async(sm, sV + 2 * (stage ^ 1) * BN * ROW, ROW, v, p.v_row_stride, nxt * BN, len_k, BN, D, mask)
        sm.commit()
        sm.wait(1)
        sm.barrier()

        sKs = sK + 2 * stage * BN * ROW
        sVs = sV + 2 * stage * BN * ROW
        bias = sBias + 4 * stage * BN
        s = np.zeros((NT, BN // 8, 4), F32)
        mma_tile_smem_a(sm, s, sQ, ROW, WARP * 16, sKs, D, BN, True)

        n0 = n * BN
        diagonal = CAUSAL and n0 + BN - 1 > m0 + offset
        for j in range(BN // 8):
            for e in range(4):
                col = j * 8 + 2 * TQ + (e & 1)
                x = np.where(sm.read_f(bias + 4 * col, TID) == 0, s[:, j, e] * F32(p.scale_log2), -INF).astype(F32)
                if diagonal:
                    x = np.where(n0 + col > row_base + (e >> 1) * 8 + offset, -INF, x)
                s[:, j, e] = x
        online_softmax_step(s, acc, row_max, row_sum)
        if DROPOUT:
            keep = dropout_keep_rows(drop, row_base, n0, BN // 8)
            for j in range(BN // 8):
                for e in range(4):
                    s[~kept(keep, j, e), j, e] = 0
        mma_tile_reg_a(sm, acc, s, sVs, ROW, BN, D)

        sm.barrier()
        n = nxt
        stage ^= 1
    sm.wait(0)
    sm.barrier()

    finish_rows(sm, sQ, ROW, acc, D, row_max, row_sum, F32(p.dropout_scale if DROPOUT else 1), p.lse,
                b * p.lse_batch_stride + h * p.lse_head_stride + q_start, row_base, len_q)
    sm.barrier()
    out = p.out + b * p.out_batch_stride + h * p.out_head_stride + q_start * p.out_row_stride
    store_tile(sm, out, p.out_row_stride, m0, len_q, sQ, ROW, BM, D)


def run_attention_fwd(p):
    if p.len_q == 0 or p.batch == 0 or p.heads == 0:
        return
    for blk in itertools.product(range(cdiv(p.len_q, 64)), range(p.heads), range(p.batch)):
        attention_fwd_kernel(p, p.head_dim, p.causal, blk, p.dropout)


# --- bwd_kernel.cuh ----------------------------------------------------------------------------------

def attention_bwd_delta_kernel(p, D, blockIdx):
    bx, h, b = blockIdx
    q_start, _, len_q, _ = sequence(p, b)
    row = bx * 4 + WARP
    act = row < len_q  # warp-uniform early return (no barrier in this kernel)
    qrow = q_start + row
    dout = p.dout.off + b * p.dout_batch_stride + h * p.dout_head_stride + qrow * p.dout_row_stride
    out = p.out.off + b * p.out_batch_stride + h * p.out_head_stride + qrow * p.out_row_stride
    ssum = np.zeros(NT, F32)
    for it in range(cdiv(D, 64)):
        d = LANE * 2 + it * 64
        on = act & (d < D)
        if on.any():
            x = p.dout.buf.read((dout + d)[on], n=2, align=2)
            y = p.out.buf.read((out + d)[on], n=2, align=2)
            ssum[on] = (ssum[on] + x[:, 0] * y[:, 0] + x[:, 1] * y[:, 1]).astype(F32)
    for o in (16, 8, 4, 2, 1):
        ssum = (ssum + ssum[TID ^ o]).astype(F32)
    w = act & (LANE == 0)
    p.delta.write(b * p.lse_batch_stride + h * p.lse_head_stride + qrow[w], ssum[w])


def attention_bwd_dq_kernel(p, D, CAUSAL, blockIdx, DROPOUT=False):
    BM, BN, ROW = 64, (32 if D == 128 else 64), D + 8
    kSmem = (2 * BM + 4 * BN) * ROW * 2 + 2 * BN * 4
    sm = Smem(kSmem)
    sQ = 0
    sdO = sQ + 2 * BM * ROW
    sK = sdO + 2 * BM * ROW
    sV = sK + 2 * 2 * BN * ROW
    sBias = sV + 2 * 2 * BN * ROW

    bx, h, b = blockIdx
    m0 = bx * BM
    hk = h // (p.heads // p.kv_heads)
    q_row0, k_row0, len_q, len_k = sequence(p, b)
    if m0 >= len_q:
        return
    q = p.q + b * p.q_batch_stride + h * p.q_head_stride + q_row0 * p.q_row_stride
    dout = p.dout + b * p.dout_batch_stride + h * p.dout_head_stride + q_row0 * p.dout_row_stride
    k = p.k + b * p.k_batch_stride + hk * p.k_head_stride + k_row0 * p.k_row_stride
    v = p.v + b * p.v_batch_stride + hk * p.v_head_stride + k_row0 * p.v_row_stride
    mask = p.key_padding_mask + b * p.mask_batch_stride if p.key_padding_mask is not None else None
    offset = len_k - len_q

    n_tiles = cdiv(len_k, BN)
    if CAUSAL:
        last_key = min(m0 + BM, len_q) - 1 + offset
        n_tiles = min(n_tiles, 0 if last_key < 0 else last_key // BN + 1)

    load_tile_async(sm, sQ, ROW, q, p.q_row_stride, m0, len_q, BM, D)
    load_tile_async(sm, sdO, ROW, dout, p.dout_row_stride, m0, len_q, BM, D)
    sm.commit()
    n = next_key_tile(sm, 0, n_tiles, mask, len_k, sBias, BN)
    if n < n_tiles:
        load_tile_async(sm, sK, ROW, k, p.k_row_stride, n * BN, len_k, BN, D, mask)
        load_tile_async(sm, sV, ROW, v, p.v_row_stride, n * BN, len_k, BN, D, mask)
    sm.commit()

    row_base = m0 + WARP * 16 + G
    lse2 = np.zeros((NT, 2), F32)
    delta = np.zeros((NT, 2), F32)
    for r in range(2):
        row = row_base + r * 8
        i = b * p.lse_batch_stride + h * p.lse_head_stride + q_row0 + row
        ok = row < len_q
        lse2[:, r] = INF
        lse2[ok, r] = p.lse.read(i[ok]) * kLog2e
        delta[ok, r] = p.delta.read(i[ok])
    dq = np.zeros((NT, D // 8, 4), F32)
    drop = dropout_mask(p, b, h) if DROPOUT else None

    stage = 0
    while n < n_tiles:
        nxt = next_key_tile(sm, n + 1, n_tiles, mask, len_k, sBias + 4 * (stage ^ 1) * BN, BN)
        if nxt < n_tiles:
            load_tile_async(sm, sK + 2 * (stage ^ 1) * BN * ROW, ROW, k, p.k_row_stride, nxt * BN, len_k, BN, D, mask)
            load_tile_async(sm, sV + 2 * (stage ^ 1) * BN * ROW, ROW, v, p.v_row_stride, nxt * BN, len_k, BN, D, mask)
        sm.commit()
        sm.wait(1)
        sm.barrier()

        sKs = sK + 2 * stage * BN * ROW
        sVs = sV + 2 * stage * BN * ROW
        bias = sBias + 4 * stage * BN
        s = np.zeros((NT, BN // 8, 4), F32)
        dp = np.zeros((NT, BN // 8, 4), F32)
        mma_tile_smem_a(sm, s, sQ, ROW, WARP * 16, sKs, D, BN, True)
        mma_tile_smem_a(sm, dp, sdO, ROW, WARP * 16, sVs, D, BN, True)

        n0 = n * BN
        diagonal = CAUSAL and n0 + BN - 1 > m0 + offset
        keep = dropout_keep_rows(drop, row_base, n0, BN // 8) if DROPOUT else None
        for j in range(BN // 8):
            for e in range(4):
                col = j * 8 + 2 * TQ + (e & 1)
                hidden = sm.read_f(bias + 4 * col, TID) != 0
                if diagonal:
                    hidden = hidden | (n0 + col > row_base + (e >> 1) * 8 + offset)
                prob = np.exp2(s[:, j, e] * F32(p.scale_log2) - lse2[:, e >> 1]).astype(F32)
                dpv = dp[:, j, e]
                if DROPOUT:
                    dpv = np.where(kept(keep, j, e), dpv * F32(p.dropout_scale), F32(0)).astype(F32)
                s[:, j, e] = np.where(hidden, F32(0), prob * (dpv - delta[:, e >> 1]))
        mma_tile_reg_a(sm, dq, s, sKs, ROW, BN, D)

        sm.barrier()
        n = nxt
        stage ^= 1
    sm.wait(0)
    sm.barrier()

    stage_rows(sm, sQ, ROW, WARP * 16, dq, D, F32(p.scale), F32(p.scale))
    sm.barrier()
    dq_out = p.dq + b * p.dq_batch_stride + h * p.dq_head_stride + q_row0 * p.dq_row_stride
    store_tile(sm, dq_out, p.dq_row_stride, m0, len_q, sQ, ROW, BM, D)


def attention_bwd_dkdv_kernel(p, D, CAUSAL, blockIdx, DROPOUT=False):
    BN, BM, ROW = 64, ((16 if DROPOUT else 32) if D == 128 else 64), D + 8
    kSmem = (2 * BN + 4 * BM) * ROW * 2 + 4 * BM * 4 + (4 if DROPOUT else 2) * 4
    sm = Smem(kSmem)
    sK = 0
    sV = sK + 2 * BN * ROW
    sQ = sV + 2 * BN * ROW
    sdO = sQ + 2 * 2 * BM * ROW
    sLse = sdO + 2 * 2 * BM * ROW
    sDelta = sLse + 4 * 2 * BM
    sTileRow = sDelta + 4 * 2 * BM
    sTileHead = sTileRow + 4 * 2

    bx, hk, b = blockIdx
    n0 = bx * BN
    group = p.heads // p.kv_heads
    q_row0, k_row0, len_q, len_k = sequence(p, b)
    if n0 >= len_k:
        return
    mask = p.key_padding_mask + b * p.mask_batch_stride if p.key_padding_mask is not None else None
    offset = len_k - len_q
    dk_out = p.dk + b * p.dk_batch_stride + hk * p.dk_head_stride + k_row0 * p.dk_row_stride
    dv_out = p.dv + b * p.dv_batch_stride + hk * p.dv_head_stride + k_row0 * p.dv_row_stride

    m_tiles = cdiv(len_q, BM)
    m_begin = max(0, n0 - offset) // BM if CAUSAL else 0
    per_head = max(0, m_tiles - m_begin)
    total = group * per_head
    if mask is None:
        tile_visible = True
    else:
        pred = (TID < BN) & (n0 + TID < len_k)
        if pred.any():
            pred[pred] = mask.buf.read(mask.off + n0 + TID[pred])
        tile_visible = syncthreads_or(sm, pred)
    if not tile_visible or total == 0:
        store_zeros(dk_out, p.dk_row_stride, n0, len_k, BN, D)
        store_zeros(dv_out, p.dv_row_stride, n0, len_k, BN, D)
        return

    k = p.k + b * p.k_batch_stride + hk * p.k_head_stride + k_row0 * p.k_row_stride
    v = p.v + b * p.v_batch_stride + hk * p.v_head_stride + k_row0 * p.v_row_stride
    load_tile_async(sm, sK, ROW, k, p.k_row_stride, n0, len_k, BN, D, mask)
    load_tile_async(sm, sV, ROW, v, p.v_row_stride, n0, len_k, BN, D, mask)
    sm.commit()

    st8 = SimpleNamespace(next_head=hk * group, next_mt=m_begin)

    def load_q_tile(st):
        m0 = st8.next_mt * BM
        q = p.q + b * p.q_batch_stride + st8.next_head * p.q_head_stride + q_row0 * p.q_row_stride
        dout = p.dout + b * p.dout_batch_stride + st8.next_head * p.dout_head_stride + q_row0 * p.dout_row_stride
        load_tile_async(sm, sQ + 2 * st * BM * ROW, ROW, q, p.q_row_stride, m0, len_q, BM, D)
        load_tile_async(sm, sdO + 2 * st * BM * ROW, ROW, dout, p.dout_row_stride, m0, len_q, BM, D)
        sel = TID < BM
        row = m0 + TID[sel]
        i = b * p.lse_batch_stride + st8.next_head * p.lse_head_stride + q_row0 + row
        ok = row < len_q
        lse_v = np.full(row.size, INF, F32)
        del_v = np.zeros(row.size, F32)
        lse_v[ok] = p.lse.read(i[ok]) * kLog2e
        del_v[ok] = p.delta.read(i[ok])
        sm.write_f(sLse + 4 * (st * BM + TID[sel]), lse_v, TID[sel])
        sm.write_f(sDelta + 4 * (st * BM + TID[sel]), del_v, TID[sel])
        sm.write_i(sTileRow + 4 * np.array([st]), np.array([m0], np.int32), np.array([0]))
        if DROPOUT:
            sm.write_i(sTileHead + 4 * np.array([st]), np.array([st8.next_head], np.int32), np.array([0]))
        st8.next_mt += 1
        if st8.next_mt == m_tiles:
            st8.next_mt = m_begin
            st8.next_head += 1

    load_q_tile(0)
    sm.commit()

    key_base = n0 + WARP * 16 + G
    key_bias = np.zeros((NT, 2), F32)
    for r in range(2):
        key = key_base + r * 8
        vis = key < len_k
        if mask is not None and vis.any():
            vis[vis] = mask.buf.read(mask.off + key[vis])
        key_bias[:, r] = np.where(vis, F32(0), -INF)
    dk = np.zeros((NT, D // 8, 4), F32)
    dv = np.zeros((NT, D // 8, 4), F32)

    for it in range(total):
        stage = it & 1
        if it + 1 < total:
            load_q_tile(stage ^ 1)
        sm.commit()
        sm.wait(1)
        sm.barrier()

        sQs = sQ + 2 * stage * BM * ROW
        sdOs = sdO + 2 * stage * BM * ROW
        lse2 = sLse + 4 * stage * BM
        delta = sDelta + 4 * stage * BM
        m0 = sm.read_i(np.full(NT, sTileRow + 4 * stage), TID)
        st = np.zeros((NT, BM // 8, 4), F32)
        dpt = np.zeros((NT, BM // 8, 4), F32)
        mma_tile_smem_a(sm, st, sK, ROW, WARP * 16, sQs, D, BM, True)
        mma_tile_smem_a(sm, dpt, sV, ROW, WARP * 16, sdOs, D, BM, True)

        assert np.all(m0 == m0[0])
        diagonal = CAUSAL and n0 + BN - 1 > int(m0[0]) + offset
        keep = None
        if DROPOUT:
            head = sm.read_i(np.full(NT, sTileHead + 4 * stage), TID)
            assert np.all(head == head[0])
            drop = dropout_mask(p, b, int(head[0]))
            keep = dropout_keep_cols(drop, (n0 + WARP * 16) >> 3, m0, BM // 8)
        for j in range(BM // 8):
            for e in range(4):
                col = j * 8 + 2 * TQ + (e & 1)
                x = (st[:, j, e] * F32(p.scale_log2) + key_bias[:, e >> 1]).astype(F32)
                if diagonal:
                    x = np.where(key_base + (e >> 1) * 8 > m0 + col + offset, -INF, x)
                prob = np.exp2(x - sm.read_f(lse2 + 4 * col, TID)).astype(F32)
                if DROPOUT:
                    kp = kept(keep, j, e)
                    st[:, j, e] = np.where(kp, prob, F32(0))
                    dpv = np.where(kp, dpt[:, j, e] * F32(p.dropout_scale), F32(0)).astype(F32)
                    dpt[:, j, e] = prob * (dpv - sm.read_f(delta + 4 * col, TID))
                else:
                    st[:, j, e] = prob
                    dpt[:, j, e] = prob * (dpt[:, j, e] - sm.read_f(delta + 4 * col, TID))
        mma_tile_reg_a(sm, dv, st, sdOs, ROW, BM, D)
        mma_tile_reg_a(sm, dk, dpt, sQs, ROW, BM, D)

        sm.barrier()
    sm.wait(0)
    sm.barrier()

    for r in range(2):  # a padded key's gradients are exactly zero
        pad = key_bias[:, r] != 0
        dk[pad, :, 2 * r] = dk[pad, :, 2 * r + 1] = 0
        dv[pad, :, 2 * r] = dv[pad, :, 2 * r + 1] = 0
    stage_rows(sm, sK, ROW, WARP * 16, dk, D, F32(p.scale), F32(p.scale))
    dv_mul = F32(p.dropout_scale if DROPOUT else 1)
    stage_rows(sm, sV, ROW, WARP * 16, dv, D, dv_mul, dv_mul)
    sm.barrier()
    store_tile(sm, dk_out, p.dk_row_stride, n0, len_k, sK, ROW, BN, D)
    store_tile(sm, dv_out, p.dv_row_stride, n0, len_k, sV, ROW, BN, D)


def run_attention_bwd(p):
    if p.len_q == 0 or p.len_k == 0 or p.batch == 0 or p.heads == 0:
        return
    D = p.head_dim
    for blk in itertools.product(range(cdiv(p.len_q, 4)), range(p.heads), range(p.batch)):
        attention_bwd_delta_kernel(p, D, blk)
    for blk in itertools.product(range(cdiv(p.len_q, 64)), range(p.heads), range(p.batch)):
        attention_bwd_dq_kernel(p, D, p.causal, blk, p.dropout)
    for blk in itertools.product(range(cdiv(p.len_k, 64)), range(p.kv_heads), range(p.batch)):
        attention_bwd_dkdv_kernel(p, D, p.causal, blk, p.dropout)
