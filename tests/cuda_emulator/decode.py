"""Thread-level transcription of the CUDA decode kernels (kernels/decode/: the split-KV decode header,
its split and merge kernels and launch; the KV-cache append kernel and its launch) and of their host
glue (the CUDA decode host file in csrc/cuda/), line by line, on the SM80 model of core.py. Keep it
in step with the kernels: every kernel change costs the same change here until scripts/gpu_check.sh
has passed on hardware (docs/EMULATION.md).

What is emulated
- Every block of the split kernel (grid B x Hkv, row blocks, splits; ROWS = 4 or 16 as the launch
  picks), of the merge kernel and of the append kernel, with the kernels' own index math: chunking,
  paging (page_of), row/warp mapping, causal limits of the T new tokens, partial and merge indexing.
- All 128 threads as vectors: lane = key in the score phase, warp shuffles (warp_max / warp_sum),
  the online softmax in base 2, P @ V with 128 / ROWS threads per row, load_row's access widths.
- Shared memory as struct Smem<T, D, ROWS> lays it out (k, v double-buffered tiles with kPad, q, p,
  corr, m, l, valid), with core.py's bounds, alignment and race checks; K/V tiles arrive by cp.async
  with the zero-fill predicate, commit / wait_group as the kernel issues them.
- The cache as a pool of pages (Pool): every access is checked against the pool's pages, so a
  block-table entry outside the pool that reaches a dereference fails as an out-of-pool access.
  Block tables, seqlens, q, partials: bounds-checked buffers; out and partials NaN-poisoned and
  write-once; append's copy unit (uint4 / uint32 / uint16) chosen as run_kv_append chooses it.
- Numerics: T = fp16 for q and the cache, fp32 arithmetic as in the kernel (fmaf as one rounding).
  out is kept in fp32: the kernel's single rounding of out to T at the store is not emulated, so
  that the 1e-4 check sees the kernel's arithmetic rather than fp16's ulp. bf16 is not emulated.

Tests patch module-level functions here (page_of, append_count, warp_sum) to inject bugs: keep them
module-level.
"""
import itertools
from types import SimpleNamespace

import numpy as np
import torch

from .core import (F32, INF, LANE, NT, TID, WARP, EmulationError, GBuf, HostTensor, Smem, cp_async16_from,
                   shfl_xor)

kThreads, kWarps, kTileN, kPad = NT, NT // 32, 32, 8
kAppendThreads = 256


class Pool(GBuf):
    """k_cache / v_cache storage: num_pages pages of c_page elements. An access outside the pages
    raises before GBuf's own bounds check (a negative page too, which NumPy would wrap)."""

    def __init__(self, name, arr, c_page, num_pages, write_once=False):
        super().__init__(name, arr, write_once)
        self.c_page, self.num_pages = c_page, num_pages

    def _check(self, off, n, align):
        page = np.asarray(off, np.int64) // self.c_page
        if page.size and (page.min() < 0 or page.max() >= self.num_pages):
            bad = page[(page < 0) | (page >= self.num_pages)].reshape(-1)[0]
            raise EmulationError(f"out-of-pool access to {self.name}: page {bad} of {self.num_pages}")
        return super()._check(off, n, align)


def warp_max(x):
    for o in (16, 8, 4, 2, 1):
        x = np.fmax(x, shfl_xor(x, o))
    return x


def warp_sum(x):
    for o in (16, 8, 4, 2, 1):
        x = (x + shfl_xor(x, o)).astype(F32)
    return x


def fmaf(a, b, c):
    return (np.float64(1) * a * b + c).astype(F32)  # the exact product, one rounding


def page_of(p, b, pos):
    """Page of positions pos (an array) of sequence b; -1: none, past the table, or an entry outside
    the pool, which is never dereferenced."""
    if p.block_table is None:
        return np.full(pos.shape, b, np.int64)
    lp = pos // p.page_size
    page = np.full(pos.shape, -1, np.int64)
    inside = lp < p.pages_per_seq
    if inside.any():  # the ternary reads the table only for lp < pages_per_seq
        page[inside] = p.block_table.read(b * p.bt_b + lp[inside])
    return np.where(page < p.num_pages, page, -1)


def smem_layout(D, ROWS):
    """Byte offsets of struct Smem<T, D, ROWS> for a 2-byte T."""
    s = SimpleNamespace(row=D + kPad)
    s.k = 0
    s.v = s.k + 2 * 2 * kTileN * s.row
    s.q = s.v + 2 * 2 * kTileN * s.row
    s.p = s.q + 4 * ROWS * D
    s.corr = s.p + 4 * ROWS * kTileN
    s.m = s.corr + 4 * ROWS
    s.l = s.m + 4 * ROWS
    s.valid = s.l + 4 * ROWS
    s.size = s.valid + 4 * 2 * kTileN
    return s


def load_row_align(N):
    """load_row<T, N>'s access: uint4 for N % 8 == 0, uint2 for N == 4, else one element at a time."""
    return 16 if N % 8 == 0 else 8 if N == 4 else 2


def decode_split_kernel(p, D, ROWS, blockIdx):
    kChunks, kRowsPerWarp = D // 8, ROWS // kWarps
    kThreadsPerRow = kThreads // ROWS
    kDims = D // kThreadsPerRow
    assert D % 8 == 0 and ROWS % kWarps == 0 and kThreads % ROWS == 0 and kDims >= 1 and D % kThreadsPerRow == 0
    lay = smem_layout(D, ROWS)
    sm = Smem(lay.size)
    tid, warp, lane = TID, WARP, LANE
    bh, rb, split = blockIdx
    b, hk = bh // p.kv_heads, bh % p.kv_heads
    L = min(max(int(p.seqlens.read(b)), 0), p.max_seqlen)
    per_split = (L + p.num_splits - 1) // p.num_splits
    chunk = (per_split + kTileN - 1) // kTileN * kTileN
    start = split * chunk  # split * chunk may exceed L: then nothing to do
    end = min(L, start + chunk)
    n_tiles = (end - start + kTileN - 1) // kTileN if end > start else 0

    def load_tile(tile, stage):
        n0 = start + tile * kTileN
        for i0 in range(0, kTileN * kChunks, kThreads):
            idx = i0 + tid
            on = idx < kTileN * kChunks
            jj, c = idx // kChunks, idx % kChunks
            pos = n0 + jj
            page = np.full(NT, -1, np.int64)
            near = on & (pos < end)
            if near.any():
                page[near] = page_of(p, b, pos[near])
            ok = page >= 0
            off = np.where(ok, page * p.c_page + hk * p.c_head + (pos % p.page_size) * p.c_slot + c * 8, 0)
            at = 2 * ((stage * kTileN + jj) * lay.row + c * 8)
            cp_async16_from(sm, (lay.k + at)[on], p.k_cache, off[on], ok[on], tid[on])
            cp_async16_from(sm, (lay.v + at)[on], p.v_cache, off[on], ok[on], tid[on])
            w = on & (c == 0)
            sm.write_i(lay.valid + 4 * (stage * kTileN + jj[w]), ok[w].astype(np.int32), tid[w])

    if n_tiles > 0:
        load_tile(0, 0)
    sm.commit()

    # q rows, pre-scaled by scale * log2(e); rows past the group's are zeros and see no key
    for i0 in range(0, ROWS * D, kThreads):
        idx = i0 + tid
        on = idx < ROWS * D
        r, d = idx // D, idx % D
        rg = rb * ROWS + r
        x = np.zeros(NT, F32)
        live = on & (rg < p.rows)
        if live.any():
            h, t = hk * p.group + rg // p.new_tokens, rg % p.new_tokens
            x[live] = p.q.buf.read(p.q.off + (b * p.q_b + h * p.q_h + t * p.q_t + d)[live]) * F32(p.scale_log2)
        sm.write_f(lay.q + 4 * (r * D + d)[on], x[on], tid[on])

    rows_i = warp[:, None] + kWarps * np.arange(kRowsPerWarp)  # [thread, i]: the warp's rows
    rg_i = rb * ROWS + rows_i
    m = np.full((NT, kRowsPerWarp), -INF, F32)
    l = np.zeros((NT, kRowsPerWarp), F32)
    limit = np.where(rg_i < p.rows, L - p.new_tokens + rg_i % p.new_tokens, -1)  # last key a row sees
    my_row, d0 = tid // kThreadsPerRow, (tid % kThreadsPerRow) * kDims
    row_active = rb * ROWS + my_row < p.rows
    warp_active = rb * ROWS + warp < p.rows  # the warp's first (smallest) row
    acc = np.zeros((NT, kDims), F32)

    for it in range(n_tiles):
        stage = it & 1
        if it + 1 < n_tiles:
            load_tile(it + 1, stage ^ 1)
            sm.commit()
            sm.wait(1)
        else:
            sm.wait(0)
        sm.barrier()

        wa = warp_active
        if wa.any():  # scores of key `lane` for the warp's rows, then each row's online-softmax update
            pos = start + it * kTileN + lane
            key_ok = np.zeros(NT, bool)
            key_ok[wa] = sm.read_i(lay.valid + 4 * (stage * kTileN + lane[wa]), tid[wa]) != 0
            s = np.zeros((NT, kRowsPerWarp), F32)
            for c in range(kChunks):
                kf = sm.read_h(lay.k + 2 * ((stage * kTileN + lane[wa]) * lay.row + c * 8), tid[wa], n=8, align=16)
                for i in range(kRowsPerWarp):
                    qa = lay.q + 4 * (rows_i[wa, i] * D + c * 8)
                    qv = np.concatenate([sm.read_f(qa, tid[wa], n=4, align=16),
                                         sm.read_f(qa + 16, tid[wa], n=4, align=16)], -1)
                    prod = (qv * kf).astype(F32)
                    dot = prod[:, 0]
                    for e in range(1, 8):
                        dot = (dot + prod[:, e]).astype(F32)
                    s[wa, i] = (s[wa, i] + dot).astype(F32)
            for i in range(kRowsPerWarp):
                si = np.where(key_ok & (pos <= limit[:, i]), s[:, i], -INF).astype(F32)
                m_new = np.fmax(m[:, i], warp_max(si))
                m_use = np.where(m_new == -INF, F32(0), m_new).astype(F32)
                pr = np.exp2(si - m_use).astype(F32)
                corr = np.exp2(m[:, i] - m_use).astype(F32)
                l[wa, i] = (l[:, i] * corr + warp_sum(pr))[wa]
                m[wa, i] = m_new[wa]
                sm.write_f(lay.p + 4 * (rows_i[wa, i] * kTileN + lane[wa]), pr[wa], tid[wa])
                z = wa & (lane == 0)
                sm.write_f(lay.corr + 4 * rows_i[z, i], corr[z], tid[z])
        ia = ~warp_active  # a warp whose rows are all past the group's only clears its p rows
        if ia.any():
            for i in range(kRowsPerWarp):
                sm.write_f(lay.p + 4 * (rows_i[ia, i] * kTileN + lane[ia]), np.zeros(int(ia.sum()), F32), tid[ia])
                z = ia & (lane == 0)
                sm.write_f(lay.corr + 4 * rows_i[z, i], np.ones(int(z.sum()), F32), tid[z])
        sm.barrier()

        ra = row_active  # acc = acc * corr + P @ V over the thread's dims of its row
        if ra.any():
            acc[ra] *= sm.read_f(lay.corr + 4 * my_row[ra], tid[ra])[:, None]
            for jj in range(kTileN):
                pj = sm.read_f(lay.p + 4 * (my_row[ra] * kTileN + jj), tid[ra])
                vf = sm.read_h(lay.v + 2 * ((stage * kTileN + jj) * lay.row + d0[ra]), tid[ra], n=kDims,
                               align=load_row_align(kDims))
                acc[ra] = fmaf(pj[:, None], vf, acc[ra])
        sm.barrier()  # the next iteration refills this stage and p

    z = lane == 0
    for i in range(kRowsPerWarp):
        sm.write_f(lay.m + 4 * rows_i[z, i], m[z, i], tid[z])
        sm.write_f(lay.l + 4 * rows_i[z, i], l[z, i], tid[z])
    sm.barrier()

    rg = rb * ROWS + my_row
    live = rg < p.rows
    if not live.any():
        return
    h, t = hk * p.group + rg // p.new_tokens, rg % p.new_tokens
    lr = sm.read_f(lay.l + 4 * my_row[live], tid[live])
    inv = np.where(lr > 0, F32(1) / np.where(lr > 0, lr, F32(1)), F32(0)).astype(F32)
    vals = (acc[live] * inv[:, None]).astype(F32)
    if p.num_splits == 1:
        p.out.buf.write(p.out.off + (b * p.o_b + h * p.o_h + t * p.o_t + d0)[live], vals, n=kDims)
    else:
        row = ((split * p.batch + b) * p.heads + h) * p.new_tokens + t
        p.o_partial.write((row * D + d0)[live], vals, n=kDims)
        w = d0[live] == 0
        if w.any():
            mr = sm.read_f(lay.m + 4 * my_row[live][w], tid[live][w])
            lw = lr[w]
            lse = np.where(lw > 0, mr + np.log2(np.where(lw > 0, lw, F32(1))), -INF).astype(F32)
            p.lse_partial.write(row[live][w], lse)


def decode_merge_kernel(p, D, blockIdx):
    """One warp per output row (b, h, t): out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max)."""
    kPer = (D + 31) // 32
    total = p.batch * p.heads * p.new_tokens
    row = blockIdx * kWarps + WARP
    act = row < total  # warp-uniform early return
    if not act.any():
        return
    mx = np.full(NT, -INF, F32)
    for s0 in range(0, p.num_splits, 32):
        s = s0 + LANE
        on = act & (s < p.num_splits)
        if on.any():
            mx[on] = np.fmax(mx[on], p.lse_partial.read((s * total + row)[on]))
    mx = warp_max(mx)
    m_use = np.where(mx == -INF, F32(0), mx).astype(F32)
    acc = np.zeros((NT, kPer), F32)
    den = np.zeros(NT, F32)
    for s in range(p.num_splits):
        w = np.zeros(NT, F32)
        w[act] = np.exp2(p.lse_partial.read((s * total + row)[act]) - m_use[act])
        den = (den + w).astype(F32)
        o = (s * total + row) * D
        for e in range(kPer):
            d = LANE + 32 * e
            on = act & (d < D)
            acc[on, e] = fmaf(w[on], p.o_partial.read((o + d)[on]), acc[on, e])
    inv = np.where(den > 0, F32(1) / np.where(den > 0, den, F32(1)), F32(0)).astype(F32)
    b, h, t = row // (p.heads * p.new_tokens), (row // p.new_tokens) % p.heads, row % p.new_tokens
    op = p.out.off + b * p.o_b + h * p.o_h + t * p.o_t
    for e in range(kPer):
        d = LANE + 32 * e
        on = act & (d < D)
        p.out.buf.write((op + d)[on], (acc[on, e] * inv[on]).astype(F32))


def launch(p, D, ROWS):
    row_blocks = (p.rows + ROWS - 1) // ROWS
    for blk in itertools.product(range(p.batch * p.kv_heads), range(row_blocks), range(p.num_splits)):
        decode_split_kernel(p, D, ROWS, blk)
    if p.num_splits == 1:
        return
    total = p.batch * p.heads * p.new_tokens
    for blk in range((total + kWarps - 1) // kWarps):
        decode_merge_kernel(p, D, blk)


def run_decode(p, D):
    """run_decode / run_decode_<T, D>: rows per block 4 when a kv-head has at most 4 query rows, else 16."""
    if p.batch == 0:
        return
    launch(p, D, 4 if p.rows <= 4 else 16)


# --- kv_append.cu ------------------------------------------------------------------------------------

def append_count(p, b, L):
    """Thread 0: how many of the T new tokens fit (the first position >= max_seqlen or on a missing
    page stops it: nothing is ever written out of bounds)."""
    n = 0
    if L >= 0:
        while n < p.new_tokens:
            pos = L + n
            if pos >= p.max_seqlen:
                break
            if p.block_table is not None:
                lp = pos // p.page_size
                if lp >= p.pages_per_seq:
                    break
                page = int(p.block_table.read(b * p.bt_b + lp))
                if page < 0 or page >= p.num_pages:
                    break
            n += 1
    return n


def kv_append_kernel(p, unit_bytes, b):
    tid = np.arange(kAppendThreads)
    sm = Smem(8)  # __shared__ int s_len, s_n
    L = int(p.seqlens.read(b))
    sm.write_i(np.array([0, 4]), np.array([L, append_count(p, b, L)], np.int32), np.array([0, 0]))
    sm.barrier()
    seen = sm.read_i(np.tile(np.array([0, 4]), (kAppendThreads, 1)), tid[:, None])  # every thread reads them
    L, n = int(seen[0, 0]), int(seen[0, 1])
    per_elem = max(unit_bytes // p.elem_bytes, 1)  # V is the copy unit
    units = p.head_dim // per_elem
    total = n * p.kv_heads * units
    for i0 in range(0, total, kAppendThreads):
        idx = (i0 + tid)[i0 + tid < total]
        t, h, u = idx // (p.kv_heads * units), (idx // units) % p.kv_heads, idx % units
        pos = L + t
        page = (p.block_table.read(b * p.bt_b + pos // p.page_size).astype(np.int64)
                if p.block_table is not None else np.full(idx.shape, b, np.int64))
        dst = page * p.c_page + h * p.c_head + (pos % p.page_size) * p.c_slot + u * per_elem
        ks = b * p.k_b + h * p.k_h + t * p.k_t + u * per_elem
        vs = b * p.v_b + h * p.v_h + t * p.v_t + u * per_elem
        p.k_cache.write(dst, p.k.read(ks, n=per_elem, align=per_elem), n=per_elem, align=per_elem)
        p.v_cache.write(dst, p.v.read(vs, n=per_elem, align=per_elem), n=per_elem, align=per_elem)
    sm.barrier()
    p.seqlens.write(b, L + n)


def run_kv_append(p):
    if p.batch == 0:
        return
    per16 = 16 // p.elem_bytes  # the tensors' pointers are 16-byte aligned here (fresh allocations)
    vec = p.head_dim % per16 == 0 and all(x % per16 == 0 for x in (p.c_page, p.c_head, p.c_slot, p.k_b, p.k_h,
                                                                     p.k_t, p.v_b, p.v_h, p.v_t))
    unit = 16 if vec else 4 if p.elem_bytes == 4 else 2 if p.elem_bytes == 2 else None
    if unit is None:
        raise ValueError("cudaErrorInvalidValue: elem_bytes must be 2 or 4")
    for b in range(p.batch):
        kv_append_kernel(p, unit, b)


# --- host glue: the CUDA decode host file --------------------------------------------------------------

def _cache_params(p, k_cache, v_cache, seqlens, block_table, max_seqlen, write_once=False):
    num_pages, page_size = k_cache.shape[0], k_cache.shape[2]
    p.c_page, p.c_head, p.c_slot = k_cache.stride()[:3]
    p.k_cache = Pool("k_cache", k_cache.numpy(), p.c_page, num_pages, write_once)
    p.v_cache = Pool("v_cache", v_cache.numpy(), p.c_page, num_pages, write_once)
    p.block_table = GBuf("block_table", block_table.numpy()) if block_table is not None else None
    p.bt_b = block_table.stride(0) if block_table is not None else 0
    p.seqlens = GBuf("seqlens", seqlens.numpy())
    p.batch, p.kv_heads = seqlens.shape[0], k_cache.shape[1]
    p.page_size, p.pages_per_seq = page_size, (max_seqlen + page_size - 1) // page_size
    p.max_seqlen, p.num_pages = max_seqlen, num_pages


def decode_attention_cuda(q, k_cache, v_cache, seqlens, block_table, max_seqlen, num_splits, scale=None):
    """q [B, H, T, D] and the pools [num_pages, Hkv, page_size, D] fp16 (contiguous), seqlens and
    block_table int32 -> out [B, H, T, D] fp32 with [B, T, H, D] memory, as the kernel's empty_bhld."""
    B, H, T, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    p = SimpleNamespace()
    _cache_params(p, k_cache, v_cache, seqlens, block_table, max_seqlen)
    out = HostTensor("out", torch.empty(B, T, H, D).transpose(1, 2), poison=True, write_once=True)
    qh = HostTensor("q", q)
    p.q, p.out = qh.ptr(), out.ptr()
    p.q_b, p.q_h, p.q_t = qh.stride[:3]
    p.o_b, p.o_h, p.o_t = out.stride[:3]
    p.o_partial = GBuf("o_partial", np.full(num_splits * B * H * T * D, np.nan, np.float32), write_once=True)
    p.lse_partial = GBuf("lse_partial", np.full(num_splits * B * H * T, np.nan, np.float32), write_once=True)
    p.heads, p.group, p.new_tokens = H, H // p.kv_heads, T
    p.rows = p.group * T
    p.num_splits = num_splits
    p.scale_log2 = float(np.float32(scale * 1.4426950408889634))
    run_decode(p, D)
    return out.tensor()


def kv_append_cuda(k_cache, v_cache, seqlens, block_table, k, v, max_seqlen):
    """Appends k, v [B, Hkv, T, D] into copies of the pools; returns (k_cache, v_cache, seqlens) after it."""
    p = SimpleNamespace()
    _cache_params(p, k_cache, v_cache, seqlens, block_table, max_seqlen, write_once=True)
    p.k, p.v = GBuf("k", k.numpy()), GBuf("v", v.numpy())
    p.k_b, p.k_h, p.k_t = k.stride()[:3]
    p.v_b, p.v_h, p.v_t = v.stride()[:3]
    p.new_tokens, p.head_dim, p.elem_bytes = k.shape[2], k.shape[3], k_cache.element_size()
    run_kv_append(p)
    shape = k_cache.shape
    return (torch.from_numpy(p.k_cache.a.reshape(shape)), torch.from_numpy(p.v_cache.a.reshape(shape)),
            torch.from_numpy(p.seqlens.a))

