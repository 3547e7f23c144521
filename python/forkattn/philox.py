"""Philox4x32-10 in plain PyTorch, and the counter layout of attention dropout.

kernels/common/philox.h is the one source of the layout; this module is its eager mirror (the
"eager" backend and the tests build the same masks from it, bit for bit). It imports nothing else
from forkattn.

Attention dropout (forkattn.attention(..., dropout_p=p, seed=s)): the probability of batch row b
(varlen: sequence b), query head h, query row i and key column j (i and j counted inside the
sequence) is kept iff its 16-bit uniform u16(b, h, i, j) >= dropout_threshold(p), and the kept
ones are scaled by 1 / (1 - p). u16 comes from one Philox4x32-10 block per 8 key columns:

    counter = (j >> 3, i, b * heads + h, DROPOUT_STREAM), key = (seed & 0xffffffff, seed >> 32)
    word    = block[(j & 7) >> 1]
    u16     = (word >> 16 * (j & 1)) & 0xffff        (even j: the low half, odd j: the high half)

so a mask element depends on the seed and its four indices only, never on tiling, threads or
backend. DROPOUT_STREAM keeps these counters apart from the MLM sampler's (whose fourth counter
word is 0) when a caller reuses a seed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_U32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers (applied to counter words 0 and 2)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key increments
DROPOUT_STREAM = 1  # the fourth counter word of attention dropout


def _mulhilo32(a: int, b: Tensor):
    """(high, low) 32-bit halves of the 64-bit product a * b, a a uint32 constant, b int64 tensors
    holding uint32 values; computed on 16-bit pieces so that nothing overflows int64."""
    al, ah = a & 0xFFFF, a >> 16
    bl, bh = b & 0xFFFF, b >> 16
    ll, lh, hl, hh = bl * al, bh * al, bl * ah, bh * ah
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = (ll & 0xFFFF) | ((mid & 0xFFFF) << 16)
    hi = (hh + (lh >> 16) + (hl >> 16) + (mid >> 16)) & _U32
    return hi, lo


def philox4x32_10(seed: int, c0, c1, c2, c3):
    """Philox4x32-10 of counters (c0, c1, c2, c3) (int64 tensors or ints holding uint32 values,
    broadcast together) under the 64-bit seed (a signed int64 is taken as its bit pattern): the
    four output words as int64 tensors, the same numbers as kernels/common/philox.h and Triton's
    tl.philox(seed, c0, c1, c2, c3)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _U32, seed >> 32
    ref = next((c for c in (c0, c1, c2, c3) if isinstance(c, Tensor)), None)
    device = ref.device if ref is not None else None
    c0, c1, c2, c3 = torch.broadcast_tensors(
        *[torch.as_tensor(c, dtype=torch.int64, device=device) & _U32 for c in (c0, c1, c2, c3)])
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_M0, c0)
        hi2, lo2 = _mulhilo32(_M1, c2)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """The 16-bit threshold of dropout probability p in [0, 1): a probability is kept iff its u16
    >= threshold, so the keep rate is (65536 - threshold) / 65536, within 2^-17 of 1 - p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return min(math.floor(p * 65536.0 + 0.5), 65535)  # as dropout_threshold16 in philox.h


def dropout_u16(seed: int, batch: int, heads: int, len_q: int, len_k: int, *, batch_index: Optional[int] = None,
                device=None) -> Tensor:
    """u16 of every (b, h, i, j) as an int64 tensor [batch, heads, len_q, len_k] (batch_index: the
    single sequence b = batch_index, shape [1, heads, len_q, len_k], for varlen)."""
    blocks = (len_k + 7) // 8
    b0 = 0 if batch_index is None else batch_index
    nb = batch if batch_index is None else 1
    bh = (torch.arange(nb, device=device)[:, None] + b0) * heads + torch.arange(heads, device=device)[None, :]
    c0 = torch.arange(blocks, device=device).view(1, 1, 1, blocks)
    c1 = torch.arange(len_q, device=device).view(1, 1, len_q, 1)
    words = philox4x32_10(seed, c0, c1, bh.view(nb, heads, 1, 1), DROPOUT_STREAM)
    halves = [w for word in words for w in (word & 0xFFFF, word >> 16)]  # columns 8*blk + 0..7
    return torch.stack(halves, dim=-1).reshape(nb, heads, len_q, blocks * 8)[..., :len_k]


def dropout_keep(seed: int, p: float, batch: int, heads: int, len_q: int, len_k: int, *,
                 batch_index: Optional[int] = None, device=None) -> Tensor:
    """The keep mask of attention dropout, bool [batch, heads, len_q, len_k] (see the module doc)."""
    return dropout_u16(seed, batch, heads, len_q, len_k, batch_index=batch_index, device=device) >= dropout_threshold(p)
