"""Out-of-range block-table entries, run in a child process by tests/test_decode_bounds.py so that a
segfault or heap corruption is a failed test rather than a dead test run.

python tests/decode_bounds_cases.py BACKEND...   (cpu, eager, triton, or "direct" for the _C entry points)

Each case prints "ok <name>"; a wrong result raises (exit 1), a crash kills the process (exit < 0).
A page index in [num_pages, 2**31) must never be dereferenced: on the cpu backend (and the _C entry
points) it raises a ValueError naming block_table, the row and the value, whatever check says; with
check=True every backend raises that error before anything runs; with check=False the eager and
triton (and cuda) kernels skip the page: an append stops before it, a decode gives it no weight."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
import forkattn  # noqa: E402
from forkattn import KVCache, decode_attention, reference  # noqa: E402

# FORKATTN_BOUNDS_DEVICE=cuda runs the same cases on a GPU (fp16: the cuda decode kernel's dtypes)
DEVICE = os.environ.get("FORKATTN_BOUNDS_DEVICE", "cpu")
DTYPE, TOL = (torch.float32, 1e-4) if DEVICE == "cpu" else (torch.float16, 2e-2)
B, HKV, G, S, D, P = 3, 2, 2, 16, 32, 4
NUM_PAGES = B * (S // P)  # 12
BAD_VALUES = [NUM_PAGES, 1000, 10**6, 2**31 - 1]
LEN0 = 5  # every sequence holds 5 tokens: pages 0 and 1 of each are in use


def make_cache(check):
    torch.manual_seed(0)
    cache = KVCache(B, HKV, S, D, dtype=DTYPE, device=DEVICE, page_size=P, check=check)
    cache.block_table.copy_(torch.randperm(NUM_PAGES).to(torch.int32).view(B, S // P))
    k, v = randn(B, HKV, LEN0, D), randn(B, HKV, LEN0, D)
    cache.append(k, v, backend="eager")
    # poison every slot that is not part of a sequence: a read of it would show as NaN
    pos = torch.arange(S)
    for b in range(B):
        for j in range(S // P):
            page = int(cache.block_table[b, j])
            unused = pos[j * P:(j + 1) * P] >= LEN0
            cache.k_cache[page, :, unused[: P]] = float("nan")
            cache.v_cache[page, :, unused[: P]] = float("nan")
    return cache


def randn(*shape):
    return torch.randn(*shape).to(device=DEVICE, dtype=DTYPE)


def snapshot(cache):
    return [t.clone() for t in (cache.k_cache, cache.v_cache, cache.seqlens, cache.block_table)]


def unchanged(cache, snap):
    return all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
               for a, b in zip((cache.k_cache, cache.v_cache, cache.seqlens, cache.block_table), snap))


def expect_value_error(fn, row, value):
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        assert "block_table" in msg and f"row {row}" in msg and str(value) in msg, msg
        return msg
    raise AssertionError("no ValueError")


def decode_truth(cache, q, skip_page_of=None):
    """fp64 attention of each sequence over its cached tokens, without the tokens of the page
    block_table[b, j] for (b, j) = skip_page_of."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(B):
        L = int(cache.seqlens[b])
        ks, vs = [], []
        for pos in range(L):
            j = pos // P
            if skip_page_of == (b, j):
                continue
            page = int(cache.block_table[b, j])
            ks.append(cache.k_cache[page, :, pos % P])
            vs.append(cache.v_cache[page, :, pos % P])
        k = torch.stack(ks, 1)[None].double()
        v = torch.stack(vs, 1)[None].double()
        # the query is the last token; every kept key is visible to it
        out[b] = reference.attention(q[b:b + 1].double(), k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))[0]
    return out


def run(backend):
    n = 0
    for value in BAD_VALUES:
        for check in (True, False):
            raises = check or backend == "cpu"
            # decode: sequence 1's second page (holding its token 4) points outside the pool
            cache = make_cache(check)
            good = decode_truth(cache, q := randn(B, HKV * G, 1, D), None)
            cache.block_table[1, 1] = value
            snap = snapshot(cache)
            if raises:
                expect_value_error(lambda: decode_attention(q, cache, backend=backend), 1, value)
                assert unchanged(cache, snap), "decode changed the cache"
            else:
                out = decode_attention(q, cache, backend=backend)
                want = decode_truth(cache, q, skip_page_of=(1, 1))
                assert not out.isnan().any(), "NaN: a poisoned or out-of-pool slot was read"
                assert (out.double() - want).abs().max() < TOL, "the bad page was not skipped"
                assert (out[[0, 2]].double() - good[[0, 2]]).abs().max() < TOL, "a good sequence changed"
            print(f"ok decode value={value} check={check}", flush=True)
            n += 1

            # append of 3 tokens to positions 5..7: sequence 1's page 1 points outside the pool
            cache = make_cache(check)
            cache.block_table[1, 1] = value
            snap = snapshot(cache)
            k, v = randn(B, HKV, 3, D), randn(B, HKV, 3, D)
            if raises:
                expect_value_error(lambda: cache.append(k, v, backend=backend), 1, value)
                assert unchanged(cache, snap), "a refused append wrote something"
            else:
                cache.append(k, v, backend=backend)
                assert cache.seqlens.tolist() == [LEN0 + 3, LEN0, LEN0 + 3], cache.seqlens.tolist()
                want_k, want_v = snap[0].clone(), snap[1].clone()
                for b in (0, 2):
                    for t in range(3):
                        page = int(cache.block_table[b, (LEN0 + t) // P])
                        want_k[page, :, (LEN0 + t) % P] = k[b, :, t]
                        want_v[page, :, (LEN0 + t) % P] = v[b, :, t]
                for got, want in ((cache.k_cache, want_k), (cache.v_cache, want_v)):
                    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan()), \
                        "append wrote something other than the good sequences' tokens"
            print(f"ok append value={value} check={check}", flush=True)
            n += 1
    # the issue's own repro: entry 10**6 in row 0, page 0, two tokens per page
    c = KVCache(2, 1, 8, 32, dtype=DTYPE, device=DEVICE, page_size=2)
    k = randn(2, 1, 1, 32)
    c.append(k, k, backend=backend)
    c.block_table[0, 0] = 10**6
    expect_value_error(lambda: decode_attention(randn(2, 1, 1, 32), c, backend=backend), 0, 10**6)
    expect_value_error(lambda: c.append(k, k, backend=backend), 0, 10**6)
    print("ok issue repro", flush=True)
    return n + 1


def run_direct():
    """The C++ entry points validate the table on their own."""
    from forkattn._native import _C

    n = 0
    for value in BAD_VALUES:
        cache = make_cache(False)
        cache.block_table[2, 0] = value
        snap = snapshot(cache)
        q = torch.randn(B, HKV * G, 1, D)
        empty = torch.empty(0)
        expect_value_error(lambda: _C.decode_attention_cpu(q, cache.k_cache, cache.v_cache, cache.seqlens,
                                                           cache.block_table, empty, empty, S, 1, 0.2), 2, value)
        k = torch.randn(B, HKV, 2, D)
        expect_value_error(lambda: _C.kv_append_cpu(cache.k_cache, cache.v_cache, cache.seqlens, cache.block_table,
                                                    k, k, S), 2, value)
        assert unchanged(cache, snap), "a refused _C call wrote something"
        print(f"ok _C value={value}", flush=True)
        n += 1
    return n


if __name__ == "__main__":
    for which in sys.argv[1:]:
        count = run_direct() if which == "direct" else run(which)
        print(f"done {which} {count}", flush=True)
