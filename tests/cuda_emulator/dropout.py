"""Transcription of kernels/attention/dropout.cuh and of kernels/common/philox.h's device Philox, per
thread (vectors over the 128 threads of core.py). Written from the C++ and kept independent of
python/forkattn/philox.py, so that the checks comparing the emulated kernels' mask with
philox.dropout_keep compare two transcriptions of the one layout.

Shuffles read the source lane's value before the shuffle (x[warp * 32 + src]), as core.py does.
"""
import numpy as np

from .core import LANE, NT, WARP

U32 = np.uint32
U64 = np.uint64
kDropoutStream = 1


def philox4x32_10(seed, c0, c1, c2, c3):
    """philox.h's philox4x32_10 on per-thread uint32 vectors (or scalars broadcast to them)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    c0, c1, c2, c3 = (np.broadcast_to(np.asarray(c, dtype=np.int64) & 0xFFFFFFFF, (NT,)).astype(U32)
                      for c in (c0, c1, c2, c3))
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0 = U64(0xD2511F53) * c0.astype(U64)  # mul.wide.u32
            p2 = U64(0xCD9E8D57) * c2.astype(U64)
            n0 = (p2 >> U64(32)).astype(U32) ^ c1 ^ U32(k0)
            n2 = (p0 >> U64(32)).astype(U32) ^ c3 ^ U32(k1)
            c1 = (p2 & U64(0xFFFFFFFF)).astype(U32)
            c3 = (p0 & U64(0xFFFFFFFF)).astype(U32)
            c0, c2 = n0, n2
            k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
            k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def keep_bits8(m, row, block):
    r = philox4x32_10(m.seed, block, row, m.bh, kDropoutStream)
    bits = np.zeros(NT, np.int64)
    for w in range(4):
        bits |= ((r[w] & U32(0xFFFF)) >= m.threshold).astype(np.int64) << (2 * w)
        bits |= ((r[w] >> U32(16)) >= m.threshold).astype(np.int64) << (2 * w + 1)
    return bits


def shfl(x, src_lane):
    """__shfl_sync(0xffffffff, x, src_lane): every lane reads lane src_lane of its own warp."""
    return x[WARP * 32 + src_lane]


def dropout_keep_rows(m, row0, col0, NJ):
    assert NJ % 2 == 0 and NJ <= 8
    NB = NJ // 2
    t = LANE & 3
    mine = np.zeros(NT, np.int64)
    for i in range(NB):
        f = t * NB + i
        mine |= keep_bits8(m, row0 + 8 * (f & 1), (col0 >> 3) + (f >> 1)) << (8 * i)
    keep = np.zeros(NT, np.int64)
    for src in range(4):
        w = shfl(mine, (LANE & ~3) | src)
        for i in range(NB):
            f = src * NB + i
            j, r = f >> 1, f & 1
            keep |= ((w >> (8 * i + 2 * t)) & 3) << (4 * j + 2 * r)
    return keep


def dropout_keep_cols(m, kb0, m0, NJ):
    assert NJ % 2 == 0 and NJ <= 8
    NB = NJ // 2
    g, t = LANE >> 2, LANE & 3
    mine = np.zeros(NT, np.int64)
    for i in range(NB):
        f = g * NB + i
        mine |= keep_bits8(m, m0 + 8 * (f >> 2) + 2 * t + (f & 1), kb0 + ((f >> 1) & 1)) << (8 * i)
    keep = np.zeros(NT, np.int64)
    for src in range(8):
        w = shfl(mine, 4 * src + t)
        for i in range(NB):
            keep |= ((w >> (8 * i + g)) & 1) << (src * NB + i)
    return keep


class DropoutMask:
    def __init__(self, seed, bh, threshold):
        self.seed, self.bh, self.threshold = seed, bh, U32(threshold)


def dropout_mask(p, b, h):
    return DropoutMask(p.dropout_seed, (b * p.heads + h) & 0xFFFFFFFF, p.dropout_threshold)


def kept(keep, j, e):
    """(keep >> (4 j + e)) & 1 as a per-thread bool."""
    return ((keep >> (4 * j + e)) & 1).astype(bool)


def dropout_threshold16(p):
    """philox.h's dropout_threshold16 (host)."""
    return min(int(p * 65536.0 + 0.5), 65535)

