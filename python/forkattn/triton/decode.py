"""Triton KV-cache append and split-KV decode attention (the same algorithm as kernels/decode).

Decode: grid (num_splits, B x Hkv, row_blocks). A program takes up to ROWS query rows of one
kv-head (its GQA heads x new tokens), so the heads of a group share one pass over K/V, and one
chunk of the sequence: chunk = ceil(L / num_splits) rounded up to BLOCK_N, computed from
seqlens on the device, so the grid is fixed by the plan while the lengths grow. With one split
the program writes the output; otherwise it writes (out, lse) partials that the merge kernel
combines. Online softmax in base 2 with fp32 accumulators. Pages: position pos of sequence b
is in page block_table[b, pos // P], slot pos % P (page b, slot pos when not paged). An entry
outside [0, num_pages) is never dereferenced: decode gives its tokens no weight, append stops
before it (KVCache's check=True refuses such a table on the host before either runs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_compat, interpreting

interpreter_compat()

ROWS = 16  # query rows per program; tl.dot needs >= 16
BLOCK_N = 32  # keys per step
LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, bt_ptr, out_ptr, o_part_ptr, lse_part_ptr,
    sq_b, sq_h, sq_t, sc_page, sc_head, sc_slot, s_bt, so_b, so_h, so_t,
    H, Hkv, T, R, page_size, num_pages, max_seqlen, num_splits, scale_log2,
    PAGED: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    rb = tl.program_id(2)
    b = bh // Hkv
    hk = bh % Hkv
    G = H // Hkv
    L = tl.load(seqlens_ptr + b)
    L = tl.minimum(tl.maximum(L, 0), max_seqlen)
    chunk = tl.cdiv(tl.cdiv(L, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(L, start + chunk)

    r = rb * ROWS + tl.arange(0, ROWS)
    row_ok = r < R
    g = r // T
    t = r % T
    h = hk * G + g
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    limit = L - T + t  # last key each row sees

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        inb = pos < end
        if PAGED:
            page = tl.load(bt_ptr + b * s_bt + pos // page_size, mask=inb, other=-1)
        else:
            page = tl.zeros([BLOCK_N], tl.int32) + b
        ok = inb & (page >= 0) & (page < num_pages)  # a page outside the pool is never read
        off = page.to(tl.int64) * sc_page + hk * sc_head + (pos % page_size) * sc_slot
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        vis = ok[None, :] & (pos[None, :] <= limit[:, None]) & row_ok[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        corr = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * corr + tl.sum(p, 1)
        if IEEE:
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        row = ((split * tl.num_programs(1) + bh) * G + g) * T + t  # [split, b, h, t] with h = hk*G + g
        tl.store(lse_part_ptr + row, lse, mask=row_ok)
        tl.store(o_part_ptr + row.to(tl.int64)[:, None] * D + d[None, :], o, mask=row_ok[:, None])
    else:
        tl.store(out_ptr + b * so_b + h[:, None] * so_h + t[:, None] * so_t + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _decode_merge_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, H, T, rows_total, num_splits, so_b, so_h, so_t,
    D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)  # (b, h, t)
    b = row // (H * T)
    h = (row // T) % H
    t = row % T
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    s_ok = s < num_splits
    lse = tl.load(lse_part_ptr + s * rows_total + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_use)
    w = tl.where(s_ok, w, 0.0)
    o = tl.load(o_part_ptr + (s.to(tl.int64) * rows_total + row)[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * so_b + h * so_h + t * so_t + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _kv_append_kernel(
    kc_ptr, vc_ptr, seqlens_ptr, bt_ptr, k_ptr, v_ptr,
    sc_page, sc_head, sc_slot, s_bt, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    Hkv, T, page_size, pages_per_seq, num_pages, max_seqlen,
    PAGED: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    L = tl.load(seqlens_ptr + b)
    # how many of the T tokens fit: up to the first position past max_seqlen or on a missing page
    # (entry < 0) or one outside the pool (>= num_pages): the store loop below never reaches those
    first_bad = L * 0 + T  # a tensor from the start (T == 1 is specialized to a constexpr)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        pos = L + t
        ok = (pos < max_seqlen) & (L >= 0)
        if PAGED:
            lp = pos // page_size
            page = tl.load(bt_ptr + b * s_bt + lp, mask=ok & (t < T) & (lp < pages_per_seq), other=-1)
            ok = ok & (page >= 0) & (page < num_pages)
        first_bad = tl.minimum(first_bad, tl.min(tl.where(ok | (t >= T), T, t), 0))
    n = first_bad
    d = tl.arange(0, D)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        w = t < n
        pos = L + t
        if PAGED:
            page = tl.load(bt_ptr + b * s_bt + pos // page_size, mask=w, other=0)
        else:
            page = tl.zeros([BLOCK_T], tl.int32) + b
        dst = page.to(tl.int64) * sc_page + (pos % page_size) * sc_slot
        for h in range(0, Hkv):
            kv = tl.load(k_ptr + b * sk_b + h * sk_h + t[:, None] * sk_t + d[None, :], mask=w[:, None])
            vv = tl.load(v_ptr + b * sv_b + h * sv_h + t[:, None] * sv_t + d[None, :], mask=w[:, None])
            tl.store(kc_ptr + dst[:, None] + h * sc_head + d[None, :], kv, mask=w[:, None])
            tl.store(vc_ptr + dst[:, None] + h * sc_head + d[None, :], vv, mask=w[:, None])
    tl.store(seqlens_ptr + b, L + n)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_attention(q, k_cache, v_cache, seqlens, block_table, o_partial, lse_partial, max_seqlen, num_splits, scale):
    B, H, T, D = q.shape
    Hkv = k_cache.shape[1]
    R = (H // Hkv) * T
    row_blocks = -(-R // ROWS)
    out = q.new_empty((B, T, H, D)).transpose(1, 2)
    split = num_splits > 1
    paged = block_table is not None
    bt = block_table if paged else seqlens  # a valid pointer, never read when not paged
    o_ws = o_partial if split else out
    lse_ws = lse_partial if split else out
    _decode_split_kernel[(num_splits, B * Hkv, row_blocks)](
        q, k_cache, v_cache, seqlens, bt, out, o_ws, lse_ws,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        bt.stride(0), out.stride(0), out.stride(1), out.stride(2),
        H, Hkv, T, R, k_cache.shape[2], k_cache.shape[0], max_seqlen, num_splits, scale * LOG2E,
        PAGED=paged, SPLIT=split, UPCAST=(interpreting() and q.dtype == torch.bfloat16),
        IEEE=(q.dtype == torch.float32), D=D, ROWS=ROWS, BLOCK_N=64 if interpreting() else BLOCK_N,
    )
    if split:
        _decode_merge_kernel[(B * H * T,)](
            o_partial, lse_partial, out, H, T, B * H * T, num_splits, out.stride(0), out.stride(1), out.stride(2),
            D=D, BLOCK_S=_pow2(num_splits),
        )
    return out


def kv_append(k_cache, v_cache, seqlens, block_table, k, v, max_seqlen):
    B, Hkv, T, D = k.shape
    paged = block_table is not None
    bt = block_table if paged else seqlens
    P = k_cache.shape[2]
    _kv_append_kernel[(B,)](
        k_cache, v_cache, seqlens, bt, k, v,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt.stride(0),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        Hkv, T, P, -(-max_seqlen // P), k_cache.shape[0], max_seqlen,
        PAGED=paged, D=D, BLOCK_T=min(16, _pow2(T)),
    )
