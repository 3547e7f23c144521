"""KVCache append and decode_attention: every backend against forkattn.attention and an fp64
reference (pass when our error <= 2x PyTorch eager's in the same dtype + 1e-5), over every step of
a multi-step generation with ragged lengths (including 1 and max_seqlen), T in {1, 3, 16}, GQA;
paged == contiguous; append writes exactly its slots; overflow refused with nothing written."""
import math

import pytest
import torch

import forkattn
from forkattn import KVCache, KVCacheOverflowError, decode_attention, reference
from forkattn.backends import BackendUnavailableError
from forkattn.decode import num_splits_heuristic


def _triton_reason():
    from forkattn.triton import unavailable_reason

    return unavailable_reason()


def backend_param(name):
    if name == "triton":
        return pytest.param("triton", marks=pytest.mark.skipif(
            _triton_reason() is not None, reason=f"triton backend unavailable: {_triton_reason()}"))
    return name


CPU_BACKENDS = [backend_param("cpu"), backend_param("triton"), backend_param("eager")]
# bf16 tl.dot returns garbage in Triton 3.6's interpreter (errors ~1e10; bf16 loads, stores and casts
# are fine): fp32/fp16 there
DTYPES = {"cpu": [torch.float32, torch.float16, torch.bfloat16], "eager": [torch.float16],
          "triton": [torch.float32, torch.float16]}


def _cases(backends, dtypes=DTYPES):
    out = []
    for b in backends:
        name = b if isinstance(b, str) else b.values[0]
        for dt in dtypes[name]:
            marks = () if isinstance(b, str) else b.marks
            out.append(pytest.param(name, dt, marks=marks, id=f"{name}-{str(dt)[6:]}"))
    return out


def rand(*shape, dtype, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_2x_rule(ours, ref64, eager, what=""):
    e_ours, e_eager = max_err(ours, ref64), max_err(eager, ref64)
    assert not torch.isnan(ours).any(), f"{what}: NaN in output"
    assert e_ours <= 2 * e_eager + 1e-5, f"{what}: error {e_ours:.3g} > 2 x eager's {e_eager:.3g} + 1e-5"


class History:
    """The tokens appended so far, per sequence, kept outside the cache (the truth)."""

    def __init__(self, B, Hkv, D, dtype, device):
        self.k = [torch.empty(Hkv, 0, D, dtype=dtype, device=device) for _ in range(B)]
        self.v = [torch.empty(Hkv, 0, D, dtype=dtype, device=device) for _ in range(B)]

    def add(self, b, k, v):  # k, v [Hkv, T, D]
        self.k[b] = torch.cat([self.k[b], k], dim=1)
        self.v[b] = torch.cat([self.v[b], v], dim=1)


def prefill_ragged(cache: KVCache, hist: History, lens, backend="eager"):
    """Give sequence b lens[b] tokens through the public API, in rounds of equal appends (a sequence
    that is done gets its seqlens restored after a round). The eager append by default: the prefill
    is setup here (Triton's interpreter is slow); the steps after it use the backend under test."""
    B, Hkv, D, dt, dev = cache.batch_size, cache.num_kv_heads, cache.head_dim, cache.dtype, cache.device
    cache.reset()
    lens = list(lens)
    remaining = lens[:]
    while any(r > 0 for r in remaining):
        # append T = the smallest positive remaining count to every sequence that still needs tokens;
        # sequences that are done get their appended tokens undone by resetting them to their length
        T = min(r for r in remaining if r > 0)
        k, v = rand(B, Hkv, T, D, dtype=dt, device=dev), rand(B, Hkv, T, D, dtype=dt, device=dev)
        before = cache.seqlens.clone()
        cache.append(k, v, backend=backend, check=False)
        for b in range(B):
            if remaining[b] > 0:
                hist.add(b, k[b], v[b])
                remaining[b] -= T
        done = [b for b in range(B) if remaining[b] <= 0 and int(cache.seqlens[b]) != lens[b]]
        if done:  # undo: seqlens back (data beyond the length is never read)
            cache.seqlens[done] = before[done]
    assert cache.seqlens.tolist() == lens
    cache.seqlen_bound = max(lens)


def check_step(q, out, hist: History, scale=None):
    """out vs forkattn.attention (cpu backend) and an fp64 reference, per sequence."""
    B, H, T, D = q.shape
    for b in range(B):
        k, v = hist.k[b][None], hist.v[b][None]
        qb = q[b:b + 1]
        ref64 = reference.attention(qb.double(), k.double(), v.double(), causal=True, scale=scale)
        eager = reference.attention(qb, k, v, causal=True, scale=scale)
        assert_2x_rule(out[b:b + 1], ref64, eager, f"sequence {b} (length {k.shape[2]}, T={T})")
        fa = forkattn.attention(qb, k, v, causal=True, scale=scale)
        assert_2x_rule(fa, ref64, eager, "forkattn.attention itself")
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[q.dtype]
        torch.testing.assert_close(out[b:b + 1].float(), fa.float(), atol=tol, rtol=tol)


def run_generation(backend, dtype, *, B, Hkv, G, D, max_seqlen, steps, lens0, page_size=None, num_splits=None,
                   device="cpu"):
    cache = KVCache(B, Hkv, max_seqlen, D, dtype=dtype, device=device, page_size=page_size)
    if page_size is not None:  # a scrambled page assignment, not the default one
        perm = torch.randperm(cache.num_pages, device=device).to(torch.int32)
        cache.block_table.copy_(perm[cache.block_table.long()])
    hist = History(B, Hkv, D, dtype, device)
    prefill_ragged(cache, hist, lens0)
    H = Hkv * G
    for T in steps:
        if num_splits is not None:
            cache.plan(H, T, backend, num_splits=num_splits)
        k, v = rand(B, Hkv, T, D, dtype=dtype, device=device), rand(B, Hkv, T, D, dtype=dtype, device=device)
        cache.append(k, v, backend=backend)
        for b in range(B):
            hist.add(b, k[b], v[b])
        q = rand(B, H, T, D, dtype=dtype, device=device)
        out = decode_attention(q, cache, backend=backend)
        assert out.shape == (B, H, T, D) and out.dtype == dtype
        assert out.transpose(1, 2).is_contiguous()
        check_step(q, out, hist)
    return cache


# --- correctness over a multi-step generation ----------------------------------------------------------

# Triton's interpreter runs a few ms per program op: it gets fewer (and smaller) cases than the cpu
# backend, chosen so that each kernel path (paged, split + merge, GQA, every head_dim) runs once.
TRITON_SMALL = backend_param("triton")


@pytest.mark.parametrize("backend,dtype", _cases(CPU_BACKENDS))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_generation_ragged(backend, dtype, paged):
    # lengths after the steps: sequence 0 grows from empty (length 1 after the first step), the last
    # one ends exactly at max_seqlen; T in {1, 3, 16}; GQA group 2
    if backend == "triton" and dtype == torch.float32 and paged:
        pytest.skip("interpreter time: paged runs in fp16, fp32 runs contiguous")
    steps = [1, 3, 16] if backend == "triton" else [1, 3, 16, 1]
    max_seqlen = 61
    lens0 = [0, 7, max_seqlen - sum(steps)] if backend == "triton" else [0, 7, 29, max_seqlen - sum(steps)]
    run_generation(backend, dtype, B=len(lens0), Hkv=2, G=2, D=32, max_seqlen=max_seqlen, steps=steps,
                   lens0=lens0, page_size=8 if paged else None)


@pytest.mark.parametrize("G,Hkv", [(1, 3), (4, 2), (6, 1)], ids=["mha", "gqa4", "mqa6"])
def test_gqa_mqa_cpu(G, Hkv):
    run_generation("cpu", torch.float16, B=3, Hkv=Hkv, G=G, D=64, max_seqlen=40, steps=[3, 1],
                   lens0=[1, 36, 13])


@pytest.mark.parametrize("backend", [TRITON_SMALL])
def test_mqa_triton(backend):
    # 8 heads on one kv head x 3 tokens = 24 rows: two row blocks of 16 for the one kv head
    run_generation(backend, torch.float16, B=2, Hkv=1, G=8, D=64, max_seqlen=40, steps=[3], lens0=[1, 37])


@pytest.mark.parametrize("backend", ["cpu", TRITON_SMALL])
@pytest.mark.parametrize("D", [64, 128])
def test_head_dims(backend, D):
    run_generation(backend, torch.float32, B=2, Hkv=1, G=2, D=D, max_seqlen=33, steps=[16], lens0=[17, 0])


@pytest.mark.parametrize("backend", [TRITON_SMALL])
@pytest.mark.parametrize("num_splits,paged", [(5, False), (3, True)], ids=["5-contiguous", "3-paged"])
def test_split_kv_merge(backend, num_splits, paged):
    # more splits than some sequences have tiles (length 1, 3): empty partials must merge to the right answer
    run_generation(backend, torch.float16, B=3, Hkv=1, G=2, D=32, max_seqlen=130, steps=[3],
                   lens0=[0, 97, 127], page_size=16 if paged else None, num_splits=num_splits)


def test_split_heuristic_fills_the_gpu():
    # H200: 132 SMs. B=1, 32 kv heads, 32k context -> enough programs for ~4 per SM
    s = num_splits_heuristic(132, 1, 32, 1, 32768)
    assert s * 32 >= 4 * 132
    assert num_splits_heuristic(132, 64, 12, 1, 1024) == 1  # batch x heads already fills it
    assert num_splits_heuristic(132, 1, 32, 1, 100) == 1  # too short to split


@pytest.mark.parametrize("backend", ["cpu", backend_param("triton"), "eager"])
def test_scale_and_strided_q(backend):
    B, Hkv, G, D, T = 2, 2, 2, 32, 3
    cache = KVCache(B, Hkv, 20, D, dtype=torch.float32, device="cpu")
    hist = History(B, Hkv, D, torch.float32, "cpu")
    prefill_ragged(cache, hist, [4, 9])
    k, v = rand(B, Hkv, T, D, dtype=torch.float32), rand(B, Hkv, T, D, dtype=torch.float32)
    cache.append(k.transpose(0, 1).contiguous().transpose(0, 1), v, backend=backend)  # strided k
    for b in range(B):
        hist.add(b, k[b], v[b])
    q = rand(B, T, Hkv * G, D, dtype=torch.float32).transpose(1, 2)  # [B, H, T, D] view of [B, T, H, D]
    out = decode_attention(q, cache, scale=0.3, backend=backend)
    check_step(q, out, hist, scale=0.3)


# --- paged == contiguous ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", backend_param("triton"), "eager"])
def test_paged_equals_contiguous(backend):
    B, Hkv, G, D, S = 3, 2, 2, 32, 50
    dt = torch.float16
    caches = [KVCache(B, Hkv, S, D, dtype=dt, device="cpu"), KVCache(B, Hkv, S, D, dtype=dt, device="cpu", page_size=8)]
    perm = torch.randperm(caches[1].num_pages).to(torch.int32)
    caches[1].block_table.copy_(perm[caches[1].block_table.long()])
    for T in ([5, 16] if backend == "triton" else [5, 1, 16, 3]):
        k, v, q = rand(B, Hkv, T, D, dtype=dt), rand(B, Hkv, T, D, dtype=dt), rand(B, Hkv * G, T, D, dtype=dt)
        outs = []
        for c in caches:
            c.append(k, v, backend=backend)
            outs.append(decode_attention(q, c, backend=backend))
        assert torch.equal(caches[0].seqlens, caches[1].seqlens)
        assert torch.equal(outs[0], outs[1]), "paged and contiguous caches must give identical results"


# --- append writes exactly its slots -------------------------------------------------------------------

def _slots(cache, b, positions):
    """(page, slot) of each position of sequence b, computed independently of the kernels."""
    if not cache.paged:
        return [(b, p) for p in positions]
    P = cache.page_size
    return [(int(cache.block_table[b, p // P]), p % P) for p in positions]


@pytest.mark.parametrize("backend,dtype", _cases(CPU_BACKENDS, {**DTYPES, "triton": [torch.float16]}))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_append_writes_exactly_its_slots(backend, dtype, paged):
    B, Hkv, D, S = 3, 2, 32, 23
    cache = KVCache(B, Hkv, S, D, dtype=dtype, device="cpu", page_size=4 if paged else None)
    if paged:
        perm = torch.randperm(cache.num_pages).to(torch.int32)
        cache.block_table.copy_(perm[cache.block_table.long()])
    poison = float("nan") if dtype != torch.float32 else 1234.5
    cache.k_cache.fill_(poison)
    cache.v_cache.fill_(poison)
    cache.seqlens.copy_(torch.tensor([0, 5, 19], dtype=torch.int32))
    T = 3
    k, v = rand(B, Hkv, T, D, dtype=dtype), rand(B, Hkv, T, D, dtype=dtype)
    cache.append(k, v, backend=backend)
    assert cache.seqlens.tolist() == [3, 8, 22]
    written = torch.zeros(cache.k_cache.shape[:3], dtype=torch.bool)
    for b, L0 in enumerate([0, 5, 19]):
        for t, (page, slot) in enumerate(_slots(cache, b, range(L0, L0 + T))):
            assert torch.equal(cache.k_cache[page, :, slot], k[b, :, t]), f"k of sequence {b} token {t}"
            assert torch.equal(cache.v_cache[page, :, slot], v[b, :, t]), f"v of sequence {b} token {t}"
            written[page, :, slot] = True
    for t in (cache.k_cache, cache.v_cache):
        rest = t[~written]
        assert (rest.isnan().all() if dtype != torch.float32 else (rest == poison).all()), "a slot outside the append changed"


@pytest.mark.parametrize("backend", ["cpu", backend_param("triton"), "eager"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_overflow_refused_nothing_written(backend, paged):
    B, Hkv, D, S = 3, 2, 32, 20
    cache = KVCache(B, Hkv, S, D, dtype=torch.float32, device="cpu", page_size=4 if paged else None)
    cache.k_cache.uniform_()
    cache.v_cache.uniform_()
    cache.seqlens.copy_(torch.tensor([2, 18, 5], dtype=torch.int32))
    before = [t.clone() for t in (cache.k_cache, cache.v_cache, cache.seqlens)]
    k, v = rand(B, Hkv, 3, D, dtype=torch.float32), rand(B, Hkv, 3, D, dtype=torch.float32)
    with pytest.raises(KVCacheOverflowError, match=r"overflow sequences \[1\].*nothing was written"):
        cache.append(k, v, backend=backend)
    for a, b_ in zip((cache.k_cache, cache.v_cache, cache.seqlens), before):
        assert torch.equal(a, b_)
    # an append that fits still works afterwards
    cache.append(k[:, :, :2], v[:, :, :2], backend=backend)
    assert cache.seqlens.tolist() == [4, 20, 7]


@pytest.mark.parametrize("backend", ["cpu", backend_param("triton"), "eager"])
def test_out_of_pages_refused(backend):
    # 3 sequences, max_seqlen 16, pages of 4, but only 7 pages: page i of sequence b is i * 3 + b,
    # so sequence 0 has pages 0, 3, 6 (12 tokens), sequences 1 and 2 have 2 pages (8 tokens)
    cache = KVCache(3, 1, 16, 32, dtype=torch.float32, device="cpu", page_size=4, num_pages=7)
    assert cache.capacity().tolist() == [12, 8, 8]
    k = rand(3, 1, 8, 32, dtype=torch.float32)
    cache.append(k, k, backend=backend)
    before = cache.k_cache.clone()
    with pytest.raises(KVCacheOverflowError, match=r"sequences \[1, 2\].*block_table"):
        cache.append(k[:, :, :1], k[:, :, :1], backend=backend)
    assert torch.equal(cache.k_cache, before) and cache.seqlens.tolist() == [8, 8, 8]


@pytest.mark.parametrize("backend", ["cpu", backend_param("triton"), "eager"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_no_check_mode_clamps(backend, paged):
    B, Hkv, D, S = 2, 2, 32, 10
    cache = KVCache(B, Hkv, S, D, dtype=torch.float32, device="cpu", page_size=4 if paged else None, check=False)
    cache.k_cache.fill_(7.0)
    cache.v_cache.fill_(7.0)
    cache.seqlens.copy_(torch.tensor([1, 8], dtype=torch.int32))
    k, v = rand(B, Hkv, 4, D, dtype=torch.float32), rand(B, Hkv, 4, D, dtype=torch.float32)
    cache.append(k, v, backend=backend)  # sequence 1 has room for 2 of the 4 tokens
    assert cache.seqlens.tolist() == [5, 10]
    for t, (page, slot) in enumerate(_slots(cache, 1, [8, 9])):
        assert torch.equal(cache.k_cache[page, :, slot], k[1, :, t])
    # every other storage slot of sequence 1's last page (paged) / row (contiguous) is untouched
    n_written = 4 * Hkv + 2 * Hkv
    assert int((cache.k_cache != 7.0).all(dim=-1).sum()) == n_written
    cache.append(k, v, backend=backend)  # full: nothing fits, nothing written
    assert cache.seqlens.tolist() == [9, 10]


def test_reset():
    cache = KVCache(4, 1, 10, 32, dtype=torch.float32, device="cpu")
    k = rand(4, 1, 3, 32, dtype=torch.float32)
    cache.append(k, k)
    cache.reset(1)
    assert cache.seqlens.tolist() == [3, 0, 3, 3]
    cache.reset([0, -1])
    assert cache.seqlens.tolist() == [0, 0, 3, 0]
    cache.reset(torch.tensor([2]))
    assert cache.seqlens.tolist() == [0, 0, 0, 0]
    cache.append(k, k)
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0, 0, 0] and cache.seqlen_bound == 0


# --- the custom ops -------------------------------------------------------------------------------------

def test_opcheck_and_compile():
    cache = KVCache(2, 2, 24, 32, dtype=torch.float32, device="cpu")
    k = rand(2, 2, 5, 32, dtype=torch.float32)
    cache.append(k, k)
    q = rand(2, 4, 2, 32, dtype=torch.float32)
    splits, o_ws, lse_ws = cache.plan(4, 2, "cpu")
    torch.library.opcheck(torch.ops.forkattn.decode_attention.default,
                          (q, cache.k_cache, cache.v_cache, cache.seqlens, None, o_ws, lse_ws, 24, splits, 0.2, "cpu"))
    torch.library.opcheck(torch.ops.forkattn.kv_append.default,
                          (cache.k_cache.clone(), cache.v_cache.clone(), cache.seqlens.clone(), None,
                           k[:, :, :1].contiguous(), k[:, :, :1].contiguous(), 24, "cpu"),
                          test_utils=("test_schema", "test_faketensor"))

    def step(q, k, v):
        cache.append(k, v, check=False)
        return decode_attention(q, cache, backend="cpu")

    expected_cache = KVCache(2, 2, 24, 32, dtype=torch.float32, device="cpu")
    expected_cache.append(k, k)
    k1 = rand(2, 2, 2, 32, dtype=torch.float32)
    expected_cache.append(k1, k1)
    expected = decode_attention(q, expected_cache, backend="cpu")
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(q, k1, k1)
    torch.testing.assert_close(got, expected)
    assert cache.seqlens.tolist() == [7, 7]


# --- bad inputs: a clear error naming the argument -------------------------------------------------------

@pytest.fixture
def small_cache():
    cache = KVCache(2, 2, 16, 32, dtype=torch.float32, device="cpu")
    k = rand(2, 2, 3, 32, dtype=torch.float32)
    cache.append(k, k)
    return cache


@pytest.mark.parametrize("make_q,exc,match", [
    (lambda: rand(2, 4, 32, dtype=torch.float32), ValueError, r"q must be 4-D"),
    (lambda: rand(2, 4, 1, 32, dtype=torch.float16), TypeError, r"q must have the cache's dtype"),
    (lambda: rand(3, 4, 1, 32, dtype=torch.float32), ValueError, r"q.shape\[0\] \(batch\)"),
    (lambda: rand(2, 4, 1, 64, dtype=torch.float32), ValueError, r"q.shape\[3\] \(head_dim\)"),
    (lambda: rand(2, 3, 1, 32, dtype=torch.float32), ValueError, r"q.shape\[1\] \(heads\).*multiple"),
    (lambda: rand(2, 4, 0, 32, dtype=torch.float32), ValueError, r"q.shape\[2\] \(new tokens\).*\[1, 16\]"),
    (lambda: rand(2, 4, 17, 32, dtype=torch.float32), ValueError, r"q.shape\[2\] \(new tokens\).*got 17"),
    (lambda: [1.0], TypeError, r"q must be a torch.Tensor"),
])
def test_bad_q(small_cache, make_q, exc, match):
    with pytest.raises(exc, match=match):
        decode_attention(make_q(), small_cache)


def test_bad_scale(small_cache):
    with pytest.raises(ValueError, match=r"scale must be a finite number"):
        decode_attention(rand(2, 4, 1, 32, dtype=torch.float32), small_cache, scale=float("nan"))


def test_bad_cache():
    with pytest.raises(TypeError, match=r"cache must be a forkattn.KVCache"):
        decode_attention(rand(2, 4, 1, 32, dtype=torch.float32), (torch.zeros(1), torch.zeros(1)))


def test_bad_backend(small_cache):
    q = rand(2, 4, 1, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"unknown backend 'nope'"):
        decode_attention(q, small_cache, backend="nope")
    with pytest.raises(BackendUnavailableError, match=r"decode_attention: backend 'cuda'"):
        decode_attention(q, small_cache, backend="cuda")
    with pytest.raises(BackendUnavailableError, match=r"kv_append: backend 'cuda'"):
        small_cache.append(q[:, :2], q[:, :2], backend="cuda")


@pytest.mark.parametrize("kv,exc,match", [
    (lambda: (rand(2, 2, 32, dtype=torch.float32),) * 2, ValueError, r"k must be 4-D"),
    (lambda: (rand(2, 2, 1, 32, dtype=torch.float16),) * 2, TypeError, r"k must have the cache's dtype"),
    (lambda: (rand(2, 3, 1, 32, dtype=torch.float32),) * 2, ValueError, r"k must have shape \[batch, kv_heads"),
    (lambda: (rand(2, 2, 1, 32, dtype=torch.float32), rand(2, 2, 2, 32, dtype=torch.float32)), ValueError,
     r"k and v must have the same shape"),
    (lambda: (rand(2, 2, 1, 32, dtype=torch.float32), rand(2, 2, 1, 16, dtype=torch.float32)), ValueError,
     r"v must have shape"),
    (lambda: (rand(2, 2, 0, 32, dtype=torch.float32),) * 2, ValueError, r"at least one new token"),
    (lambda: (rand(2, 2, 1, 32, dtype=torch.float32), "v"), TypeError, r"v must be a torch.Tensor"),
])
def test_bad_append(small_cache, kv, exc, match):
    before = small_cache.seqlens.clone()
    with pytest.raises(exc, match=match):
        small_cache.append(*kv())
    assert torch.equal(small_cache.seqlens, before)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((0, 2, 16, 32), {}, ValueError, r"batch_size must be at least 1"),
    ((2, 2.0, 16, 32), {}, TypeError, r"num_kv_heads must be an int"),
    ((2, 2, 0, 32), {}, ValueError, r"max_seqlen must be at least 1"),
    ((2, 2, 16, 512), {}, ValueError, r"head_dim must be at most 256"),
    ((2, 2, 16, 32), {"dtype": torch.int32}, TypeError, r"dtype must be"),
    ((2, 2, 16, 32), {"page_size": 0}, ValueError, r"page_size must be at least 1"),
    ((2, 2, 16, 32), {"num_pages": 4}, ValueError, r"num_pages needs page_size"),
    ((2, 2, 16, 32), {"check": 1}, TypeError, r"check must be a bool"),
])
def test_bad_kvcache_args(args, kwargs, exc, match):
    kw = {"dtype": torch.float32, "device": "cpu", **kwargs}
    with pytest.raises(exc, match=match):
        KVCache(*args, **kw)


@pytest.mark.parametrize("idx,exc,match", [
    (5, IndexError, r"batch_index 5 is out of range"),
    ("0", TypeError, r"batch_index must be None, an int"),
    ([0.5], TypeError, r"batch_index must hold ints"),
    (torch.tensor([0.0]), TypeError, r"batch_index tensor must be"),
])
def test_bad_reset(small_cache, idx, exc, match):
    with pytest.raises(exc, match=match):
        small_cache.reset(idx)


def test_bad_plan(small_cache):
    with pytest.raises(ValueError, match=r"num_splits must be at most"):
        small_cache.plan(4, 1, num_splits=1000)
    with pytest.raises(ValueError, match=r"num_new_tokens must be at least 1"):
        small_cache.plan(4, 0)


def test_native_checks_name_the_argument():
    # the C++ entry points check their arguments too (a direct call cannot reach a kernel unchecked)
    from forkattn._native import _C

    cache = KVCache(2, 2, 16, 32, dtype=torch.float32, device="cpu")
    k = rand(2, 2, 1, 32, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"seqlens must have dtype Int"):
        _C.kv_append_cpu(cache.k_cache, cache.v_cache, cache.seqlens.long(), None, k, k, 16)
    with pytest.raises(ValueError, match=r"k.size\(1\) must be 2"):
        _C.kv_append_cpu(cache.k_cache, cache.v_cache, cache.seqlens, None, k[:, :1], k[:, :1], 16)
    with pytest.raises(ValueError, match=r"max_seqlen"):
        _C.decode_attention_cpu(k.expand(2, 2, 1, 32), cache.k_cache, cache.v_cache, cache.seqlens, None,
                                torch.empty(0), torch.empty(0), 17, 1, 1.0)


# --- GPU (scripts/gpu_check.sh) ----------------------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [32, 64, 128], ids=["d32", "d64", "d128"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_gpu_generation(backend, dtype, D, paged):
    steps = [1, 3, 16, 1]
    max_seqlen = 1029
    run_generation(backend, dtype, B=5, Hkv=2, G=4, D=D, max_seqlen=max_seqlen, steps=steps,
                   lens0=[0, 1, 97, 700, max_seqlen - sum(steps)], page_size=16 if paged else None, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 3, 17, 64], ids=["s1", "s3", "s17", "s64"])
def test_gpu_splits(backend, num_splits):
    run_generation(backend, torch.float16, B=2, Hkv=4, G=1, D=128, max_seqlen=4099, steps=[1, 5],
                   lens0=[1, 4093], num_splits=num_splits, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_gpu_cuda_graph_replay_equals_eager(backend, paged):
    B, Hkv, G, D, S, T = 4, 2, 4, 64, 300, 1
    dt = torch.float16
    dev = "cuda"

    def make():
        c = KVCache(B, Hkv, S, D, dtype=dt, device=dev, page_size=16 if paged else None, check=False)
        k0 = rand(B, Hkv, 50, D, dtype=dt, device=dev)
        c.append(k0, k0 * 0.5, backend=backend)
        c.plan(Hkv * G, T, backend)
        return c

    torch.manual_seed(1)
    eager_cache, graph_cache = make(), make()
    graph_cache.k_cache.copy_(eager_cache.k_cache)
    graph_cache.v_cache.copy_(eager_cache.v_cache)
    graph_cache.seqlens.copy_(eager_cache.seqlens)
    steps = [(rand(B, Hkv, T, D, dtype=dt, device=dev), rand(B, Hkv, T, D, dtype=dt, device=dev),
              rand(B, Hkv * G, T, D, dtype=dt, device=dev)) for _ in range(5)]
    k_in, v_in, q_in = (torch.empty_like(x) for x in steps[0])

    def step():
        graph_cache.append(k_in, v_in, backend=backend)
        return decode_attention(q_in, graph_cache, backend=backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compiles Triton kernels) on copies, then undo
        snapshot = graph_cache.seqlens.clone()
        step()
        graph_cache.seqlens.copy_(snapshot)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_static = step()
    graph_cache.seqlens.copy_(snapshot)  # capture does not run the kernels, but be explicit
    for k, v, q in steps:
        eager_cache.append(k, v, backend=backend)
        ref = decode_attention(q, eager_cache, backend=backend)
        k_in.copy_(k), v_in.copy_(v), q_in.copy_(q)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(graph_cache.seqlens, eager_cache.seqlens)
        assert torch.equal(out_static, ref)


@pytest.mark.gpu
def test_gpu_append_backends_agree():
    B, Hkv, D, S = 3, 4, 128, 70
    for paged in (False, True):
        caches = {}
        for backend in ("cuda", "triton", "eager"):
            torch.manual_seed(3)
            c = KVCache(B, Hkv, S, D, dtype=torch.bfloat16, device="cuda", page_size=16 if paged else None, check=False)
            c.k_cache.fill_(float("nan"))
            c.seqlens.copy_(torch.tensor([0, 31, 60], dtype=torch.int32))
            k = rand(B, Hkv, 17, D, dtype=torch.bfloat16, device="cuda")
            c.append(k, k, backend=backend)  # sequence 2 clamps at 70
            caches[backend] = c
        for backend in ("cuda", "triton"):
            assert torch.equal(caches[backend].seqlens, caches["eager"].seqlens)
            assert torch.equal(caches[backend].k_cache.nan_to_num(123.0), caches["eager"].k_cache.nan_to_num(123.0))
