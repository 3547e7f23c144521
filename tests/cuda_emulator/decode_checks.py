"""Checks of the emulated decode kernels (decode.py) against forkattn.reference, and the case lists
that tests/test_decode_cuda_emulation.py (QUICK_*) and __main__ (full_decode_matrix) run.

run(): the emulated split + merge kernels against the fp64 eager decode (max error < 1e-4), on fp16
data; with bad = (b, j, value) the block table's entry (b, j) points outside the pool: that page's
tokens get no weight, and the case is checked not to be vacuous (with the table's original entry the
answer differs). run_append(): the emulated append against the eager one (reference.kv_append) from
the same NaN-poisoned cache, element for element, and the advanced seqlens.
"""
import itertools

import torch
from forkattn import reference

from .decode import decode_attention_cuda, kv_append_cuda


def run(B, Hkv, G, T, D, S, lens, splits, page_size=None, bad=None, verbose=True):
    H = Hkv * G
    torch.manual_seed(0)
    if page_size is None:
        k, v = torch.randn(B, Hkv, S, D).half(), torch.randn(B, Hkv, S, D).half()
        bt = None
    else:
        P = page_size
        pps = -(-S // P)
        n = B * pps
        k, v = torch.randn(n, Hkv, P, D).half(), torch.randn(n, Hkv, P, D).half()
        bt = torch.randperm(n)[:B * pps].view(B, pps).int()
        orig_bt = bt.clone()
        if bad is not None:
            bt[bad[0], bad[1]] = bad[2]
    q = torch.randn(B, H, T, D).half()
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out = decode_attention_cuda(q, k, v, seqlens, bt, S, splits)
    ref = reference.decode_attention(q.double(), k.double(), v.double(), seqlens, bt, S)
    err = (out.double() - ref).abs().max().item()
    if verbose:
        print(f"B{B} Hkv{Hkv} G{G} T{T} D{D} S{S} lens{lens} splits{splits} paged={page_size} bad={bad}: "
              f"max err {err:.2e}", flush=True)
    assert err < 1e-4, err  # NaN (an unwritten or poisoned element) fails too
    if bad is not None:  # the page was in use: with the table's original entry the answer differs
        full = reference.decode_attention(q.double(), k.double(), v.double(), seqlens, orig_bt, S)
        assert (full[bad[0]] - out[bad[0]].double()).abs().max() > 1e-3, "the bad entry changed nothing: a vacuous case"
    return err


def run_append(B, Hkv, T, D, S, lens, page_size=None, bad=None, dtype=torch.float32, verbose=True):
    torch.manual_seed(1)
    P = page_size or S
    n_pages = B * -(-S // P) if page_size else B
    kc = torch.full((n_pages, Hkv, P, D), float("nan"), dtype=dtype)
    vc = kc.clone()
    bt = None
    if page_size:
        bt = torch.randperm(n_pages).view(B, -1).int()
        if bad is not None:
            bt[bad[0], bad[1]] = bad[2]
    k, v = torch.randn(B, Hkv, T, D).to(dtype), torch.randn(B, Hkv, T, D).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    ek, ev, elens = kv_append_cuda(kc, vc, seqlens, bt, k, v, S)
    reference.kv_append(kc, vc, seqlens, bt, k, v, S)
    if verbose:
        print(f"append B{B} Hkv{Hkv} T{T} D{D} S{S} lens{lens} paged={page_size} bad={bad} {dtype}: "
              f"seqlens {elens.tolist()}", flush=True)
    same = all(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
               for a, b in ((ek, kc), (ev, vc)))
    assert same and elens.tolist() == seqlens.tolist(), "emulated append != eager append"
    return elens.tolist()


# (args, kwargs) of run(): one split and several (merge), GQA rows > 4 (16-row blocks), T = 16, paged,
# and block-table entries outside the pool (== num_pages, far past it, int32 max)
QUICK_DECODE = [
    ((2, 1, 1, 1, 32, 70, [70, 1], 1), {}),
    ((2, 2, 2, 3, 32, 70, [70, 3], 3), {}),
    ((2, 1, 8, 3, 32, 100, [100, 37], 4), {"page_size": 16}),
    ((1, 1, 1, 16, 64, 40, [16], 2), {}),
    ((2, 1, 3, 1, 32, 130, [129, 2], 5), {"page_size": 8}),
    ((2, 1, 2, 1, 32, 40, [40, 30], 1), {"page_size": 8, "bad": (0, 1, 10)}),
    ((2, 2, 2, 3, 32, 70, [70, 50], 3), {"page_size": 16, "bad": (1, 0, 10 ** 6)}),
    ((2, 1, 3, 1, 32, 130, [129, 2], 5), {"page_size": 8, "bad": (0, 15, 2 ** 31 - 1)}),
]
# (args, kwargs, expected seqlens or None) of run_append
QUICK_APPEND = [
    ((3, 2, 3, 16, 20, [0, 18, 5]), {"page_size": 4}, None),
    ((3, 2, 3, 16, 20, [0, 18, 5]), {}, None),
    ((3, 2, 5, 16, 20, [2, 6, 5]), {"page_size": 4, "bad": (1, 2, 15)}, [7, 8, 10]),  # stops before page 2
    ((2, 1, 4, 16, 20, [1, -3]), {"page_size": 4, "bad": (0, 0, 2 ** 31 - 1)}, [1, -3]),  # nothing fits
]


def full_decode_matrix():
    """QUICK_* plus head_dim 32/64/128 x (MHA at T = 1, GQA 8 at T = 3, T = 16) x splits 1, 3, 7
    (empty splits on short sequences) x contiguous / paged, and append with each copy unit."""
    dec = list(QUICK_DECODE)
    shapes = ((2, 2, 1, 1, 97, [97, 1]), (1, 1, 8, 3, 129, [129]), (2, 1, 1, 16, 65, [65, 16]))
    for D, (B, Hkv, G, T, S, lens), splits, paged in itertools.product((32, 64, 128), shapes, (1, 3, 7), (None, 16)):
        dec.append(((B, Hkv, G, T, D, S, lens, splits), {"page_size": paged}))
    app = list(QUICK_APPEND)
    app.append(((2, 2, 3, 7, 20, [3, 17]), {"page_size": 4, "dtype": torch.float16}, [6, 20]))  # uint16 copies
    app.append(((2, 2, 3, 6, 20, [3, 17]), {"dtype": torch.float32}, [6, 20]))  # uint32 copies
    app.append(((2, 2, 3, 64, 20, [3, 17]), {"page_size": 8, "dtype": torch.float16}, [6, 20]))  # uint4 copies
    return dec, app


def run_all(dec, app, verbose=True):
    """Runs the cases; returns the largest decode error."""
    worst = 0.0
    for a, kw in dec:
        worst = max(worst, run(*a, verbose=verbose, **kw))
    for a, kw, want in app:
        got = run_append(*a, verbose=verbose, **kw)
        assert want is None or got == want, f"append seqlens {got} != {want}"
    return worst

