"""CPU decode kernel (csrc/cpu/decode_cpu.cpp) paths that depend on the thread count and on the
row grouping: the context split with its merge (B x Hkv < 2 x threads, context >= 512), query-row
groups of 1..4 sharing a K/V load (GQA group sizes 1, 3, 4, 5, 8 with T = 1 and 3), and NaN in a
query (propagates to that row's output, as in eager). Pass rule: error against float64 <= 2x
eager's in the same dtype + 1e-5."""
import pytest
import torch

from forkattn import KVCache, decode_attention


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _cache(B, Hkv, S, D, lens, *, page_size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(B, Hkv, S, D, dtype=torch.float32, device="cpu", page_size=page_size)
    ks, vs = [], []
    for b, L in enumerate(lens):
        k, v = torch.randn(1, Hkv, L, D, generator=g), torch.randn(1, Hkv, L, D, generator=g)
        ks.append(k[0])
        vs.append(v[0])
    full_k = torch.zeros(B, Hkv, max(lens), D)
    full_v = torch.zeros(B, Hkv, max(lens), D)
    for b, L in enumerate(lens):
        full_k[b, :, :L] = ks[b]
        full_v[b, :, :L] = vs[b]
    # append max(lens) tokens to all, then cut each sequence back to its own length
    cache.append(full_k, full_v)
    cache.seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
    cache.seqlen_bound = max(lens)
    return cache, ks, vs


def _reference(q, ks, vs, lens, scale, dtype):
    B, H, T, D = q.shape
    out = torch.zeros(B, H, T, D, dtype=dtype)
    for b, L in enumerate(lens):
        G = H // ks[b].shape[0]
        k = ks[b].to(dtype).repeat_interleave(G, 0)
        v = vs[b].to(dtype).repeat_interleave(G, 0)
        s = q[b].to(dtype) @ k.transpose(-1, -2) * scale  # [H, T, L]
        vis = torch.arange(L)[None, :] <= (L - T + torch.arange(T))[:, None]
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # rows without keys: zeros
        out[b] = p @ v
    return out


@pytest.mark.parametrize("B,Hkv,G,T,lens", [
    (1, 1, 4, 1, [1025]), (1, 1, 5, 3, [2049]), (1, 2, 3, 1, [777]), (1, 1, 8, 1, [4096]),
    (2, 1, 1, 3, [600, 1500]), (1, 4, 4, 1, [1024]), (3, 1, 2, 1, [97, 1030, 513]),
])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_split_and_row_groups_match_fp64(two_threads, B, Hkv, G, T, lens, paged):
    D = 64
    cache, ks, vs = _cache(B, Hkv, max(lens) + 3, D, lens, page_size=16 if paged else None)
    q = torch.randn(B, Hkv * G, T, D)
    scale = D ** -0.5
    ours = decode_attention(q, cache, backend="cpu")
    ref = _reference(q, ks, vs, lens, scale, torch.float64)
    eager = _reference(q, ks, vs, lens, scale, torch.float32)
    err, base = (ours.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item()
    assert not ours.isnan().any()
    assert err <= 2 * base + 1e-5, f"err {err:.3g} > 2 x eager {base:.3g} + 1e-5"


def test_decode_split_equals_one_thread_closely():
    # the split path (2 threads) and the single-range path (1 thread) agree to rounding
    cache, _, _ = _cache(1, 1, 3000, 64, [3000])
    q = torch.randn(1, 4, 1, 64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_attention(q, cache, backend="cpu")
        torch.set_num_threads(2)
        two = decode_attention(q, cache, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert (one - two).abs().max().item() < 1e-5


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lens", [[100], [2048]])
def test_decode_nan_query_propagates_like_eager(threads, lens):
    # a NaN in one query row makes that head's output NaN (eager: NaN scores, NaN softmax); the other
    # heads of the same GQA group are untouched. It used to give zeros on cpu.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cache, _, _ = _cache(1, 1, lens[0], 32, lens)
        q = torch.randn(1, 4, 1, 32)
        q[0, 1, 0, 5] = float("nan")
        ours = decode_attention(q, cache, backend="cpu")
        eager = decode_attention(q, cache, backend="eager")
    finally:
        torch.set_num_threads(old)
    assert eager[0, 1].isnan().all()
    assert ours[0, 1].isnan().all()
    keep = [0, 2, 3]
    assert not ours[0, keep].isnan().any()
    assert (ours[0, keep] - eager[0, keep]).abs().max().item() < 1e-5
