"""The cpu backend of forkattn.disentangled_attention (csrc/cpu/disentangled_cpu.cpp) beyond the matrix of
test_disentangled.py (which runs it too): several query blocks and key tiles, so that each tile reads its
own band of position rows (DeBERTa-v3's span 256 with log buckets, no buckets with clamped far rows),
Lq != Lk both ways, head dims 64 / 128 / odd, padded batches whose key blocks are skipped or mixed with
NaN in the padding and an empty row; deterministic gradients, the BLAS-free fallback, opcheck and
torch.compile on the kernel. Bad inputs to the _C entry points are in test_bad_inputs.py."""
import pytest
import torch

import forkattn
from forkattn.backends import family
from attn_utils import assert_within_budget, make_padding
from test_disentangled import _check, _inputs

FAMILY = family("disentangled_attention")
pytestmark = pytest.mark.skipif(FAMILY.why_not("cpu", "cpu", torch.float32, 64) is not None,
                                reason=f"cpu backend: {FAMILY.why_not('cpu', 'cpu', torch.float32, 64)}")
V3 = dict(max_relative_positions=512, position_buckets=256)  # span 256


def _padded(B, L, seed, empty_row=True):
    mask = make_padding(B, L, fully_padded=(1,) if empty_row else (), generator=torch.Generator().manual_seed(seed))
    mask[0] = True
    mask[0, 130:141] = False  # a hole inside the second key block of row 0 (a mixed block)
    return mask


def _poison(k, v, mask):
    pad = ~mask[:, None, :, None]
    return k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan"))


def test_backend_none_picks_cpu():
    b = FAMILY.resolve(None, "cpu", torch.float32, 64, ("key_padding", "c2p", "p2c"))
    assert b.NAME == "cpu"
    for dtype in (torch.float16, torch.bfloat16):
        assert FAMILY.resolve(None, "cpu", dtype, 128, ("c2p",)).NAME == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Lq,Lk,D,pos", [
    (300, 300, 64, V3),                                                # v3: 3 key tiles, buckets
    (129, 257, 32, dict(max_relative_positions=40, position_buckets=16)),  # Lq < Lk
    (257, 97, 128, dict(max_relative_positions=40, position_buckets=16)),  # Lq > Lk
    (200, 200, 40, dict(max_relative_positions=24)),                   # no buckets: far rows clamped; odd D
], ids=["v3-L300-D64", "Lq129-Lk257-D32", "Lq257-Lk97-D128", "L200-D40-clamped"])
def test_tiles_against_float64(dtype, Lq, Lk, D, pos):
    span = pos.get("position_buckets", -1) if pos.get("position_buckets", -1) > 0 else pos["max_relative_positions"]
    q, k, v, pk, pq = _inputs(2, 2, Lq, Lk, D, span, dtype, seed=Lq + Lk)
    _check("cpu", q, k, v, pk, pq, **pos)


@pytest.mark.parametrize("terms", [(True, True), (True, False), (False, True)], ids=["both", "c2p", "p2c"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padded_blocks_nan_and_empty_row(terms, dtype):
    """Key blocks skipped (row 1: empty; short rows: the tail) and mixed (a hole), NaN in every padded key."""
    c2p, p2c = terms
    B, H, L, D = 3, 2, 300, 64
    q, k, v, pk, pq = _inputs(B, H, L, L, D, 256, dtype, seed=11)
    mask = _padded(B, L, seed=4)
    k, v = _poison(k, v, mask)
    out, grads = _check("cpu", q, k, v, pk, pq, key_padding_mask=mask, c2p=c2p, p2c=p2c, **V3)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and not grads["dq"][1].any()
    pad = ~mask[:, None, :, None]
    assert not grads["dk"].masked_select(pad).any() and not grads["dv"].masked_select(pad).any()


def test_shared_positions_and_scale():
    """One pos head for all heads (head stride 0 in the kernel), a user scale, padding."""
    q, k, v, pk, pq = _inputs(2, 4, 150, 150, 64, 16, torch.float32, pos_heads=1, seed=2)
    mask = make_padding(2, 150, generator=torch.Generator().manual_seed(3))
    _check("cpu", q, k, v, pk, pq, max_relative_positions=40, position_buckets=16, key_padding_mask=mask, scale=0.07)


def test_strided_projections():
    """q, k, v as transposes of [B, L, H, D] projections, pos as a view of [2 span, H, D] (the model's layout)."""
    B, L, H, D, span = 2, 140, 3, 32, 16
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, L, H, D, generator=g).transpose(1, 2) for _ in range(3))
    pk, pq = (torch.randn(2 * span, H, D, generator=g).transpose(0, 1) for _ in range(2))
    _check("cpu", q, k, v, pk, pq, max_relative_positions=40, position_buckets=span)


def _grads(backend, q, k, v, pk, pq, g, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pq)]
    out = forkattn.disentangled_attention(*leaves, backend=backend, **kw)
    return (out, *torch.autograd.grad(out, leaves, g))


def test_gradients_are_deterministic():
    """dpos_key / dpos_query sum per-task partials in a fixed order: the same bits on every run."""
    q, k, v, pk, pq = _inputs(4, 3, 160, 160, 32, 16, torch.float32, seed=9)
    mask = make_padding(4, 160, generator=torch.Generator().manual_seed(5))
    kw = dict(max_relative_positions=40, position_buckets=16, key_padding_mask=mask)
    g = torch.randn(4, 3, 160, 32)
    first = _grads("cpu", q, k, v, pk, pq, g, **kw)
    for _ in range(3):
        again = _grads("cpu", q, k, v, pk, pq, g, **kw)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_blas_free_fallback_matches(monkeypatch):
    """FORKATTN_CPU_NAIVE_GEMM=1 (a torch without MKL's sgemm) gives the same results within fp32 rounding."""
    q, k, v, pk, pq = _inputs(2, 2, 70, 90, 32, 8, torch.float32, seed=4)
    mask = make_padding(2, 90, generator=torch.Generator().manual_seed(6))
    kw = dict(max_relative_positions=8, key_padding_mask=mask)
    g = torch.randn(2, 2, 70, 32)
    blas = _grads("cpu", q, k, v, pk, pq, g, **kw)
    monkeypatch.setenv("FORKATTN_CPU_NAIVE_GEMM", "1")
    naive = _grads("cpu", q, k, v, pk, pq, g, **kw)
    for a, b in zip(blas, naive):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck_cpu_kernel():
    q, k, v, pk, pq = _inputs(2, 2, 9, 13, 16, 4, torch.float32, seed=1)
    table = forkattn.disentangled.relative_position_index(9, 13, max_relative_positions=4)
    mask = make_padding(2, 13, generator=torch.Generator().manual_seed(1))
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), pk.requires_grad_(), pq.requires_grad_(),
            table, mask, 0.2, True, True, "cpu")
    torch.library.opcheck(torch.ops.forkattn.disentangled_attention_fwd.default, args)
    torch.library.opcheck(torch.ops.forkattn.disentangled_attention_fwd.default, (*args[:3], None, *args[4:8], False,
                                                                                 True, "cpu"))


def test_torch_compile_fullgraph_backward():
    q, k, v, pk, pq = _inputs(2, 2, 33, 33, 16, 8, torch.float32, seed=3)
    kw = dict(max_relative_positions=20, position_buckets=8, backend="cpu")
    fn = torch.compile(lambda *a: forkattn.disentangled_attention(*a, **kw), fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pq)]
    out = fn(*leaves)
    out.sum().backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v, pk, pq)]
    forkattn.disentangled_attention(*ref, **kw).sum().backward()
    torch.testing.assert_close(out, forkattn.disentangled_attention(q, k, v, pk, pq, **kw))
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("table_kind", ["random", "steps01", "steps01-descending"])
def test_any_rel_index_table(table_kind):
    """The kernel reads its 8 x 8 blocks of relative terms three ways, chosen per block from the table:
    plain loads on runs of +1 (the buckets' identity zone), a load and a lane permute where every step
    is 0 or +1 (the log buckets and the clamp), AVX2 gathers elsewhere. Tables of the last two kinds,
    which the public API never builds, through the _C entry points against float64."""
    from test_disentangled_cpu_dropout import _ours, _reference
    B, H, L, D, rows = 2, 2, 150, 64, 96
    g = torch.Generator().manual_seed(21)
    n = 2 * L - 1
    if table_kind == "random":
        table = torch.randint(0, rows, (n,), generator=g)
    else:
        table = torch.randint(0, 2, (n,), generator=g).cumsum(0).clamp(max=rows - 1)
        if table_kind == "steps01-descending":
            table = table.flip(0)
    q, k, v, pk, pq = _inputs(B, H, L, L, D, rows // 2, torch.float32, seed=5)
    mask = _padded(B, L, seed=7, empty_row=False)
    k, v = _poison(k, v, mask)
    dout = torch.randn(B, H, L, D, generator=g)
    out, _, grads = _ours(q, k, v, pk, pq, table, mask, 0.1, True, True, 0.0, 0, dout)

    def run(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, pk, pq)]
        o = _reference(*leaves, table, mask, 0.1, True, True, 0.0, 0)
        return o, torch.autograd.grad(o, leaves, dout.to(dtype))

    (eager, geager), (ref, gref) = run(torch.float32), run(torch.float64)
    assert_within_budget("out", out, eager, ref)
    for name, a, e, r in zip(["dq", "dk", "dv", "dpos_key", "dpos_query"], grads, geager, gref):
        assert_within_budget(name, a, e, r)


@pytest.mark.parametrize("B,H,threads", [(1, 2, 2), (3, 2, 1), (2, 12, 2), (2, 4, 1)],
                         ids=["B1-one-chunk", "B3H2-chunks", "H12-one-chunk", "H4-1thread-one-chunk"])
def test_dpos_one_chunk_in_place_and_chunked(B, H, threads):
    """The backward's dpos partials: one batch chunk (ceil(4 * threads / H) clamped to B) accumulates in
    the fp32 output itself, several chunks in private partials summed afterwards; both within the 2x
    rule for every gradient, dpos_key / dpos_query included, and a second call (the output buffer
    zeroed again, not accumulated onto) gives the same bits."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, pk, pq = _inputs(B, H, 97, 97, 32, 16, torch.float32, seed=B * 10 + H)
        mask = make_padding(B, 97, generator=torch.Generator().manual_seed(H))
        kw = dict(max_relative_positions=40, position_buckets=16, key_padding_mask=mask)
        _check("cpu", q, k, v, pk, pq, **kw)
        g = torch.randn(B, H, 97, 32)
        first = _grads("cpu", q, k, v, pk, pq, g, **kw)
        again = _grads("cpu", q, k, v, pk, pq, g, **kw)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("wanted", [(False, False), (True, False), (False, True)], ids=["none", "pos_key", "pos_query"])
@pytest.mark.parametrize("B,H,threads,dtype", [(1, 2, 2, torch.float32), (3, 2, 1, torch.float32),
                                               (2, 3, 2, torch.bfloat16)],
                         ids=["one-chunk", "chunks", "bf16-chunks"])
def test_dpos_skipped_when_not_wanted(wanted, B, H, threads, dtype):
    """pos_key / pos_query without requires_grad: the backward skips their products (the _C call returns
    an empty dpos for them), and every gradient still wanted has the bits of the run that computes all
    of them (dq, dk, dv never read the dpos products; a wanted dpos accumulates as before, in place or in
    chunked partials)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, pk, pq = _inputs(B, H, 97, 97, 32, 16, dtype, seed=B * 10 + H)
        mask = make_padding(B, 97, generator=torch.Generator().manual_seed(H))
        k, v = _poison(k, v, mask)
        kw = dict(max_relative_positions=40, position_buckets=16, key_padding_mask=mask)
        g = torch.randn(B, H, 97, 32).to(dtype)
        full = _grads("cpu", q, k, v, pk, pq, g, **kw)
        leaves = [t.detach().clone().requires_grad_(w) for t, w in zip((q, k, v, pk, pq), (True,) * 3 + wanted)]
        out = forkattn.disentangled_attention(*leaves, backend="cpu", **kw)
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g)
        expect = [full[1 + i] for i, t in enumerate(leaves) if t.requires_grad]
        assert torch.equal(out, full[0])
        assert all(torch.equal(a, b) for a, b in zip(grads, expect))
        assert all(torch.isfinite(a).all() for a in grads)
        # the _C entry point: an unwanted dpos comes back empty, a wanted one as before
        table = forkattn.disentangled.relative_position_index(97, 97, **{k_: kw[k_] for k_ in V3 if k_ in kw})
        s = (3 * 32) ** -0.5
        o, lse = torch.ops.forkattn.disentangled_attention_fwd(q, k, v, pk, pq, table, mask, s, True, True, "cpu")
        res = forkattn._native._C.disentangled_attention_bwd_cpu(
            g, q, k, v, pk, pq, o, lse, table, mask, s, True, True, want_dpos_key=wanted[0],
            want_dpos_query=wanted[1])
        every = forkattn._native._C.disentangled_attention_bwd_cpu(g, q, k, v, pk, pq, o, lse, table, mask, s,
                                                                   True, True)
        for a, b in zip(res[:3], every[:3]):
            assert torch.equal(a, b)
        for w, a, b in zip(wanted, res[3:], every[3:]):
            assert (torch.equal(a, b) if w else a.numel() == 0)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("threads", [1, 2])
def test_kept_scratch_across_shapes(threads):
    """Each thread's forward / backward scratch is kept between calls and rebuilt when the shapes change:
    a call at shape A, then at others with the same query tiles (Lq 64) but more keys, another head dim,
    one term off, padded keys with NaN, then at A again gives A's bits again; every call keeps the 2x rule."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kw = dict(max_relative_positions=40, position_buckets=16)
        a = _inputs(2, 3, 64, 70, 32, 16, torch.float32, seed=21)
        g = torch.randn(2, 3, 64, 32)
        first = _grads("cpu", *a, g, **kw)
        for B, Lk, D, extra in [(1, 300, 32, {}), (2, 129, 48, dict(c2p=False)), (3, 97, 32, None)]:
            x = _inputs(B, 3, 64, Lk, D, 16, torch.float32, seed=Lk)
            if extra is None:
                mask = make_padding(B, Lk, generator=torch.Generator().manual_seed(2))
                k, v = _poison(x[1], x[2], mask)
                x = (x[0], k, v, x[3], x[4])
                extra = dict(key_padding_mask=mask)
            _check("cpu", *x, **kw, **extra)
        again = _grads("cpu", *a, g, **kw)
        assert all(torch.equal(p, q) for p, q in zip(first, again))
        _check("cpu", *a, **kw)
    finally:
        torch.set_num_threads(prev)
