"""Line-by-line Python transcription of kernels/decode/decode_kernel.cuh (split + merge kernels): blocks,
warps and threads emulated phase by phase with the kernel's own index formulas (row/warp mapping, chunking,
paging, partial and merge indexing), outputs and workspace poisoned with NaN, checked against the fp64
reference. A check of the index math without a GPU (not of cp.async, barriers or shuffles); keep it in step
with the .cuh when that changes. Also kernels/decode/kv_append.cu's append kernel, and block tables with an
entry outside the pool: every cache access goes through a checked accessor, so a dereference of such a page
fails the run instead of reading a neighbour. Run: python scripts/emulate_decode_kernel.py (about a minute)."""
import math, sys
import numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "python"))
from forkattn import reference

kThreads, kWarps, kTileN = 128, 4, 32

def pool_row(pool, page, head, slot):
    """The one way the emulated kernels touch k_cache / v_cache: an index outside the pool is an error
    (NumPy would wrap a negative one silently)."""
    assert 0 <= page < pool.shape[0] and 0 <= slot < pool.shape[2], f"out-of-pool access: page {page} slot {slot}"
    return pool[page, head, slot]

def split_kernel(p, ROWS, D, blockIdx):
    bh, rb, split = blockIdx
    kChunks = D // 8; kRowsPerWarp = ROWS // kWarps; kThreadsPerRow = kThreads // ROWS; kDims = D // kThreadsPerRow
    b, hk = bh // p["kv_heads"], bh % p["kv_heads"]
    L = min(max(int(p["seqlens"][b]), 0), p["max_seqlen"])
    per_split = (L + p["num_splits"] - 1) // p["num_splits"]
    chunk = (per_split + kTileN - 1) // kTileN * kTileN
    start = split * chunk; end = min(L, start + chunk)
    n_tiles = (end - start + kTileN - 1) // kTileN if end > start else 0
    def page_of(pos):
        if p["block_table"] is None: return b
        lp = pos // p["page_size"]
        page = int(p["block_table"][b, lp]) if lp < p["pages_per_seq"] else -1
        return page if page < p["num_pages"] else -1
    smk = np.zeros((2, kTileN, D), np.float32); smv = np.zeros((2, kTileN, D), np.float32); valid = np.zeros((2, kTileN), bool)
    def load_tile(tile, stage):
        n0 = start + tile * kTileN
        for idx in range(kTileN * kChunks):
            jj, c = idx // kChunks, idx % kChunks
            pos = n0 + jj
            page = page_of(pos) if pos < end else -1
            ok = page >= 0
            if ok:
                smk[stage, jj, c*8:c*8+8] = pool_row(p["k"], page, hk, pos % p["page_size"])[c*8:c*8+8]
                smv[stage, jj, c*8:c*8+8] = pool_row(p["v"], page, hk, pos % p["page_size"])[c*8:c*8+8]
            else:
                smk[stage, jj, c*8:c*8+8] = 0; smv[stage, jj, c*8:c*8+8] = 0
            if c == 0: valid[stage, jj] = ok
    if n_tiles > 0: load_tile(0, 0)
    smq = np.zeros((ROWS, D), np.float32)
    for idx in range(ROWS * D):
        r, d = idx // D, idx % D; rg = rb * ROWS + r
        x = 0.0
        if rg < p["rows"]:
            h = hk * p["group"] + rg // p["T"]; t = rg % p["T"]
            x = p["q"][b, h, t, d] * p["scale_log2"]
        smq[r, d] = x
    m = np.full((kWarps, kRowsPerWarp), -np.inf, np.float32); l = np.zeros((kWarps, kRowsPerWarp), np.float32)
    limit = np.zeros((kWarps, kRowsPerWarp), int)
    for warp in range(kWarps):
        for i in range(kRowsPerWarp):
            rg = rb * ROWS + warp + kWarps * i
            limit[warp, i] = L - p["T"] + rg % p["T"] if rg < p["rows"] else -1
    acc = np.zeros((kThreads, kDims), np.float32)
    smp = np.zeros((ROWS, kTileN), np.float32); corr_s = np.zeros(ROWS, np.float32)
    for it in range(n_tiles):
        stage = it & 1
        if it + 1 < n_tiles: load_tile(it + 1, stage ^ 1)
        for warp in range(kWarps):
            warp_active = rb * ROWS + warp < p["rows"]
            if warp_active:
                s = np.zeros((32, kRowsPerWarp), np.float32)
                for lane in range(32):
                    for c in range(kChunks):
                        kf = smk[stage, lane, c*8:c*8+8]
                        for i in range(kRowsPerWarp):
                            s[lane, i] += float(np.dot(smq[warp + kWarps*i, c*8:c*8+8], kf))
                for i in range(kRowsPerWarp):
                    si = np.array([s[lane, i] if (valid[stage, lane] and start + it*kTileN + lane <= limit[warp, i]) else -np.inf for lane in range(32)], np.float32)
                    m_new = max(m[warp, i], si.max())
                    m_use = 0.0 if m_new == -np.inf else m_new
                    pr = np.exp2(si - m_use); corr = np.exp2(m[warp, i] - m_use)
                    l[warp, i] = l[warp, i] * corr + pr.sum(); m[warp, i] = m_new
                    r = warp + kWarps * i
                    smp[r, :] = pr; corr_s[r] = corr
            else:
                for i in range(kRowsPerWarp):
                    smp[warp + kWarps*i, :] = 0; corr_s[warp + kWarps*i] = 1
        for tid in range(kThreads):
            my_row, d0 = tid // kThreadsPerRow, (tid % kThreadsPerRow) * kDims
            if rb * ROWS + my_row < p["rows"]:
                acc[tid] *= corr_s[my_row]
                for jj in range(kTileN):
                    acc[tid] += smp[my_row, jj] * smv[stage, jj, d0:d0+kDims]
    sm_m = np.zeros(ROWS, np.float32); sm_l = np.zeros(ROWS, np.float32)
    for warp in range(kWarps):
        for i in range(kRowsPerWarp):
            sm_m[warp + kWarps*i] = m[warp, i]; sm_l[warp + kWarps*i] = l[warp, i]
    for tid in range(kThreads):
        my_row, d0 = tid // kThreadsPerRow, (tid % kThreadsPerRow) * kDims
        rg = rb * ROWS + my_row
        if rg >= p["rows"]: continue
        h = hk * p["group"] + rg // p["T"]; t = rg % p["T"]
        lr = sm_l[my_row]; inv = 1.0 / lr if lr > 0 else 0.0
        if p["num_splits"] == 1:
            p["out"][b, h, t, d0:d0+kDims] = acc[tid] * inv
        else:
            row = ((split * p["batch"] + b) * p["heads"] + h) * p["T"] + t
            p["o_partial"][row * D + d0: row * D + d0 + kDims] = acc[tid] * inv
            if d0 == 0: p["lse_partial"][row] = sm_m[my_row] + math.log2(lr) if lr > 0 else -np.inf

def merge_kernel(p, D, blockIdx):
    total = p["batch"] * p["heads"] * p["T"]
    for w in range(kWarps):
        row = blockIdx * kWarps + w
        if row >= total: continue
        lse = np.array([p["lse_partial"][s * total + row] for s in range(p["num_splits"])])
        mx = lse.max(); m_use = 0.0 if mx == -np.inf else mx
        wts = np.exp2(lse - m_use); den = wts.sum()
        acc = sum(wts[s] * p["o_partial"][(s*total + row)*D:(s*total + row)*D + D] for s in range(p["num_splits"]))
        inv = 1.0 / den if den > 0 else 0.0
        b = row // (p["heads"] * p["T"]); h = (row // p["T"]) % p["heads"]; t = row % p["T"]
        p["out"][b, h, t, :] = acc * inv

def run(B, Hkv, G, T, D, S, lens, splits, page_size=None, bad=None):
    """bad = (b, j, value): block_table[b, j] = value, a page outside the pool (paged only)."""
    H = Hkv * G
    torch.manual_seed(0)
    if page_size is None:
        k = torch.randn(B, Hkv, S, D); v = torch.randn(B, Hkv, S, D); bt = None; P = S
    else:
        P = page_size; pps = -(-S // P); n = B * pps
        k = torch.randn(n, Hkv, P, D); v = torch.randn(n, Hkv, P, D)
        bt = torch.randperm(n)[:B * pps].view(B, pps).int()
        orig_bt = bt.clone()
        if bad is not None:
            bt[bad[0], bad[1]] = bad[2]
    q = torch.randn(B, H, T, D)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    p = dict(q=q.numpy(), k=k.numpy(), v=v.numpy(), block_table=None if bt is None else bt.numpy(), seqlens=seqlens.numpy(),
             out=np.full((B, H, T, D), np.nan, np.float32), batch=B, heads=H, kv_heads=Hkv, group=G, T=T, rows=G*T,
             page_size=P, pages_per_seq=-(-S // P), max_seqlen=S, num_pages=k.shape[0], num_splits=splits,
             scale_log2=D**-0.5 * 1.4426950408889634,
             o_partial=np.full(splits * B * H * T * D, np.nan, np.float32), lse_partial=np.full(splits * B * H * T, np.nan, np.float32))
    ROWS = 4 if p["rows"] <= 4 else 16
    for bh in range(B * Hkv):
        for rb in range((p["rows"] + ROWS - 1) // ROWS):
            for sp in range(splits):
                split_kernel(p, ROWS, D, (bh, rb, sp))
    if splits > 1:
        for blk in range((B * H * T + kWarps - 1) // kWarps):
            merge_kernel(p, D, blk)
    ref = reference.decode_attention(q.double(), k.double(), v.double(), seqlens, bt, S).float()
    err = np.abs(p["out"] - ref.numpy()).max()
    print(f"B{B} Hkv{Hkv} G{G} T{T} D{D} S{S} lens{lens} splits{splits} paged={page_size} bad={bad}: max err {err:.2e}")
    assert err < 1e-4, err
    if bad is not None:  # the page was in use: with the table's original entry the answer differs
        full = reference.decode_attention(q.double(), k.double(), v.double(), seqlens, orig_bt, S).float().numpy()
        assert np.abs(full[bad[0]] - p["out"][bad[0]]).max() > 1e-3, "the bad entry changed nothing: a vacuous case"

def append_kernel(p, b, T):
    """kernels/decode/kv_append.cu, one block: thread 0 counts the tokens that fit, the block copies them
    (the copy unit does not change the index math), thread 0 advances seqlens."""
    L = int(p["seqlens"][b]); n = 0
    if L >= 0:
        while n < T:
            pos = L + n
            if pos >= p["max_seqlen"]: break
            if p["block_table"] is not None:
                lp = pos // p["page_size"]
                if lp >= p["pages_per_seq"]: break
                page = int(p["block_table"][b, lp])
                if page < 0 or page >= p["num_pages"]: break
            n += 1
    for t in range(n):
        pos = L + t
        page = int(p["block_table"][b, pos // p["page_size"]]) if p["block_table"] is not None else b
        for h in range(p["kv_heads"]):
            pool_row(p["k_cache"], page, h, pos % p["page_size"])[:] = p["k"][b, h, t]
            pool_row(p["v_cache"], page, h, pos % p["page_size"])[:] = p["v"][b, h, t]
    p["seqlens"][b] = L + n

def run_append(B, Hkv, T, D, S, lens, page_size=None, bad=None):
    """The emulated append against the eager one (reference.kv_append), from the same poisoned cache."""
    torch.manual_seed(1)
    P = page_size or S
    n_pages = B * -(-S // P) if page_size else B
    kc = torch.full((n_pages, Hkv, P, D), float("nan")); vc = kc.clone()
    bt = None
    if page_size:
        bt = torch.randperm(n_pages).view(B, -1).int()
        if bad is not None:
            bt[bad[0], bad[1]] = bad[2]
    k = torch.randn(B, Hkv, T, D); v = torch.randn(B, Hkv, T, D)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    p = dict(k_cache=kc.numpy().copy(), v_cache=vc.numpy().copy(), k=k.numpy(), v=v.numpy(), seqlens=seqlens.numpy().copy(),
             block_table=None if bt is None else bt.numpy(), kv_heads=Hkv, page_size=P, pages_per_seq=-(-S // P),
             max_seqlen=S, num_pages=n_pages)
    for b in range(B):
        append_kernel(p, b, T)
    reference.kv_append(kc, vc, seqlens, bt, k, v, S)
    same = np.array_equal(np.isnan(p["k_cache"]), kc.isnan().numpy()) and np.array_equal(np.nan_to_num(p["k_cache"]), kc.nan_to_num().numpy())
    print(f"append B{B} Hkv{Hkv} T{T} D{D} S{S} lens{lens} paged={page_size} bad={bad}: seqlens {p['seqlens'].tolist()}")
    assert same and p["seqlens"].tolist() == seqlens.tolist(), "emulated append != eager append"
    return p["seqlens"].tolist()

run(2, 1, 1, 1, 32, 70, [70, 1], 1)
run(2, 2, 2, 3, 32, 70, [70, 3], 3)
run(2, 1, 8, 3, 32, 100, [100, 37], 4, page_size=16)
run(1, 1, 1, 16, 64, 40, [16], 2)
run(2, 1, 3, 1, 32, 130, [129, 2], 5, page_size=8)
# a block-table entry outside the pool (== num_pages, far past it, int32 max): its page gets no weight
run(2, 1, 2, 1, 32, 40, [40, 30], 1, page_size=8, bad=(0, 1, 10))
run(2, 2, 2, 3, 32, 70, [70, 50], 3, page_size=16, bad=(1, 0, 10**6))
run(2, 1, 3, 1, 32, 130, [129, 2], 5, page_size=8, bad=(0, 15, 2**31 - 1))
run_append(3, 2, 3, 16, 20, [0, 18, 5], page_size=4)
run_append(3, 2, 3, 16, 20, [0, 18, 5])
assert run_append(3, 2, 5, 16, 20, [2, 6, 5], page_size=4, bad=(1, 2, 15)) == [7, 8, 10]  # stops before page 2
assert run_append(2, 1, 4, 16, 20, [1, -3], page_size=4, bad=(0, 0, 2**31 - 1)) == [1, -3]  # nothing fits
