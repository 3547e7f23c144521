"""Triton MLM masking: the rules and the Philox counter layout of kernels/mlm/params.h, so the outputs
are bit-identical to the CPU and CUDA kernels for the same seed.

Plain bernoulli masking runs one program per (sequence, tile of BLOCK tokens). Ranked masking
(mode="exact" or min_masked > 0) runs one program per sequence holding the whole row, and finds the
k-th smallest composite key by a 64-step bitwise search (64 block reductions).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

_TILE = 1024  # tokens per program for plain bernoulli masking


@triton.jit
def _lane(r0, r1, r2, r3, lane):
    return tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))


@triton.jit
def _load_token(b, l, inb, in_ptr, in_sb, in_sl, sm_ptr, sm_sb, sm_sl, am_ptr, am_sb, am_sl,
                li_ptr, li_sb, li_sl, wi_ptr, wi_sb, wi_sl, special_ptr, N_SPECIAL: tl.constexpr,
                HAS_SM: tl.constexpr, HAS_AM: tl.constexpr, HAS_LI: tl.constexpr, HAS_WI: tl.constexpr):
    """(id, eligible, word id) of tokens l of row b; eligible is False outside the row."""
    l64 = l.to(tl.int64)
    ids = tl.load(in_ptr + b * in_sb + l64 * in_sl, mask=inb, other=0).to(tl.int64)
    ok = inb
    if HAS_AM:
        ok = ok & (tl.load(am_ptr + b * am_sb + l64 * am_sl, mask=inb, other=0) != 0)
    if HAS_SM:
        ok = ok & (tl.load(sm_ptr + b * sm_sb + l64 * sm_sl, mask=inb, other=0) == 0)
    if HAS_LI:
        ok = ok & (tl.load(li_ptr + b * li_sb + l64 * li_sl, mask=inb, other=0) != -100)
    for i in tl.static_range(N_SPECIAL):
        ok = ok & (ids != tl.load(special_ptr + i))
    wid = ids * 0 - 1
    if HAS_WI:
        wid = tl.load(wi_ptr + b * wi_sb + l64 * wi_sl, mask=inb, other=-1).to(tl.int64)
        ok = ok & (wid >= 0)  # with word_ids only word pieces are selectable
    return ids, ok, wid


@triton.jit(do_not_specialize=["L", "mask_token_id", "seed", "t_select", "t_mask", "t_random", "n_random",
                               "min_masked"])
def _mlm_mask_kernel(
    in_ptr, in_sb, in_sl, out_ptr, out_sb, out_sl, lab_ptr, lab_sb, lab_sl,
    sm_ptr, sm_sb, sm_sl, am_ptr, am_sb, am_sl, li_ptr, li_sb, li_sl, wi_ptr, wi_sb, wi_sl,
    special_ptr, excl_ptr,
    L, mask_token_id, seed, t_select, t_mask, t_random, n_random, min_masked,
    HAS_SM: tl.constexpr, HAS_AM: tl.constexpr, HAS_LI: tl.constexpr, HAS_WI: tl.constexpr,
    N_SPECIAL: tl.constexpr, N_EXCL: tl.constexpr,  # lengths of the id lists (a handful; unrolled loops)
    RANKED: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    if RANKED:
        l = tl.arange(0, BLOCK)
    else:
        l = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = l < L
    # scalars (not specialized) as int64 whatever int type Triton gave them (i32, u32, i64)
    t_sel = t_select.to(tl.int64)
    t_msk = t_mask.to(tl.int64)
    t_rnd = t_random.to(tl.int64)
    n_rnd = n_random.to(tl.uint64)
    ids, ok, wid = _load_token(b, l, inb, in_ptr, in_sb, in_sl, sm_ptr, sm_sb, sm_sl, am_ptr, am_sb, am_sl,
                               li_ptr, li_sb, li_sl, wi_ptr, wi_sb, wi_sl, special_ptr, N_SPECIAL,
                               HAS_SM, HAS_AM, HAS_LI, HAS_WI)
    zero = l * 0
    bc = zero + b.to(tl.int32)  # counter c1 = b
    if HAS_WI:
        w32 = wid.to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, (w32 >> 2).to(tl.int32, bitcast=True), bc, zero + 2, zero)
        key = _lane(r0, r1, r2, r3, (w32 & 3).to(tl.int32))
        tie = w32
    else:
        r0, r1, r2, r3 = tl.philox(seed, l >> 2, bc, zero, zero)
        key = _lane(r0, r1, r2, r3, l & 3)
        tie = l.to(tl.uint32)
    key64 = key.to(tl.int64)
    below_t = key64 < t_sel
    sel = ok & below_t
    if RANKED:
        comp = (key.to(tl.uint64) << 32) | tie.to(tl.uint64)
        if HAS_WI:
            _pid, pok, pwid = _load_token(b, l - 1, inb & (l > 0), in_ptr, in_sb, in_sl, sm_ptr, sm_sb, sm_sl,
                                          am_ptr, am_sb, am_sl, li_ptr, li_sb, li_sl, wi_ptr, wi_sb, wi_sl,
                                          special_ptr, N_SPECIAL, HAS_SM, HAS_AM, HAS_LI, HAS_WI)
            unit = ok & ((l == 0) | ~pok | (pwid != wid))
        else:
            unit = ok
        n = tl.sum(unit.to(tl.int64), axis=0)
        below = tl.sum((unit & below_t).to(tl.int64), axis=0)
        if EXACT:
            k = (n * t_sel + 2147483648) >> 32
        else:
            k = below
        k = tl.maximum(k, min_masked.to(tl.int64))
        k = tl.minimum(k, n)
        if k != below:
            # k-th smallest composite: the largest x with #(comp < x) < k, built bit by bit
            kth = tl.sum(comp * 0, axis=0)
            bit = tl.full((), 1 << 63, tl.uint64)
            for _ in range(64):
                trial = kth | bit
                cnt = tl.sum((unit & (comp < trial)).to(tl.int64), axis=0)
                kth = tl.where(cnt < k, trial, kth)
                bit = bit >> 1
            sel = ok & (k > 0) & (comp <= kth)
    # fates: counter (l, b, 1, 0)
    f0, f1, _f2, _f3 = tl.philox(seed, l, bc, zero + 1, zero)
    fate = f0.to(tl.int64)
    j = ((f1.to(tl.uint64) * n_rnd) >> 32).to(tl.int64)
    for i in tl.static_range(N_EXCL):
        j += (j >= tl.load(excl_ptr + i)).to(tl.int64)
    repl = tl.where(fate < t_msk, mask_token_id.to(tl.int64), tl.where(fate >= t_rnd, ids, j))
    new = tl.where(sel, repl, ids)
    lab = tl.where(sel, ids, -100)
    l64 = l.to(tl.int64)
    tl.store(out_ptr + b * out_sb + l64 * out_sl, new.to(out_ptr.dtype.element_ty), mask=inb)
    tl.store(lab_ptr + b * lab_sb + l64 * lab_sl, lab.to(lab_ptr.dtype.element_ty), mask=inb)


_ID_TABLES: Dict[Tuple[Tuple[int, ...], torch.device], Tensor] = {}


def _id_table(ids: List[int], device: torch.device) -> Tensor:
    """The ids as an int64 device tensor (cached: special ids are the same call after call)."""
    key = (tuple(ids), device)
    t = _ID_TABLES.get(key)
    if t is None:
        t = torch.tensor(list(ids) or [0], dtype=torch.int64, device=device)
        if len(_ID_TABLES) > 64:
            _ID_TABLES.clear()
        _ID_TABLES[key] = t
    return t


def _aux(t: Optional[Tensor], dummy: Tensor):
    if t is None:
        return dummy, 0, 0
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)  # same bytes; Triton loads uint8 fine everywhere
    return t, t.stride(0), t.stride(1)


def mlm_mask_triton(input_ids, out, out_labels, special_tokens_mask, attention_mask, labels, word_ids,
                    special_ids, excluded_ids, vocab_size, mask_token_id, seed, t_select, t_mask, t_random,
                    n_random, exact, min_masked) -> None:
    """Writes out and out_labels; same arguments as forkattn._C.mlm_mask_cpu (seed as signed int64)."""
    B, L = input_ids.shape
    if B == 0 or L == 0:
        return
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF  # Triton then keys Philox with (seed & 0xffffffff, seed >> 32)
    ranked = bool(exact) or min_masked > 0
    block = max(16, triton.next_power_of_2(L)) if ranked else min(_TILE, max(16, triton.next_power_of_2(L)))
    grid = (B,) if ranked else (B, triton.cdiv(L, block))
    sm, sm_sb, sm_sl = _aux(special_tokens_mask, input_ids)
    am, am_sb, am_sl = _aux(attention_mask, input_ids)
    li, li_sb, li_sl = _aux(labels, input_ids)
    wi, wi_sb, wi_sl = _aux(word_ids, input_ids)
    _mlm_mask_kernel[grid](
        input_ids, input_ids.stride(0), input_ids.stride(1), out, out.stride(0), out.stride(1),
        out_labels, out_labels.stride(0), out_labels.stride(1),
        sm, sm_sb, sm_sl, am, am_sb, am_sl, li, li_sb, li_sl, wi, wi_sb, wi_sl,
        _id_table(special_ids, input_ids.device), _id_table(excluded_ids, input_ids.device),
        L, mask_token_id, seed, t_select, t_mask, t_random, n_random, min_masked,
        HAS_SM=special_tokens_mask is not None, HAS_AM=attention_mask is not None, HAS_LI=labels is not None,
        HAS_WI=word_ids is not None, N_SPECIAL=len(special_ids), N_EXCL=len(excluded_ids), RANKED=ranked, EXACT=bool(exact), BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
