"""The cpu backend's training pair (csrc/cpu/disentangled_cpu.cpp with kept products): the forward
keeps its position products q . pos_key^T and k . pos_query^T ([B, H, L, 2 * span] fp32) and the
backward reads them instead of recomputing them. Against a float64 reference with the 2x rule for
the output and all five gradients: odd sizes (1, 7, 97, 129) with Lq != Lk, several key tiles with
v3 buckets, padded keys holding NaN, a batch row with no visible key, each term subset, dropout on
and off, 1 and 2 threads; the public API takes the pair exactly when a gradient is wanted; the
backward really reads the kept products; bad kept tensors raise naming them."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import forkattn
from forkattn.disentangled import relative_position_index
from attn_utils import assert_within_budget
from test_disentangled_cpu_dropout import FAMILY, V3, _C, _case, _data, _reference

pytestmark = pytest.mark.skipif(FAMILY.why_not("cpu", "cpu", torch.float32, 64) is not None,
                                reason=f"cpu backend: {FAMILY.why_not('cpu', 'cpu', torch.float32, 64)}")
NAMES = ["dq", "dk", "dv", "dpos_key", "dpos_query"]


def _kept(q, k, v, pk, pq, table, kpm, scale, c2p, p2c, p, seed, dout):
    pk, pq = (pk if c2p else None), (pq if p2c else None)
    out, lse, qp, kp = _C().disentangled_attention_fwd_cpu_kept(q, k, v, pk, pq, table, kpm, scale, c2p, p2c, p, seed)
    grads = _C().disentangled_attention_bwd_cpu_kept(dout, q, k, v, pk, pq, out, lse, qp, kp, table, kpm, scale, c2p,
                                                     p2c, p, seed)
    return out, lse, qp, kp, grads


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "drop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,Lq,Lk,D,terms,padded", [
    (2, 300, 129, 64, (True, True), True),     # v3 buckets, 2 key tiles, mixed / skipped blocks, NaN, empty row
    (1, 97, 129, 32, (True, False), False),    # Lq < Lk, c2p only
    (2, 129, 97, 64, (False, True), True),     # Lq > Lk, p2c only
    (1, 7, 1, 64, (True, True), False),        # one key
    (1, 1, 7, 16, (True, True), False),        # one query
], ids=["v3-Lq300-Lk129", "Lq97-Lk129-c2p", "Lq129-Lk97-p2c", "Lq7-Lk1", "Lq1-Lk7"])
def test_kept_products_against_float64(threads, p, dtype, B, Lq, Lk, D, terms, padded):
    c2p, p2c = terms
    H, seed = 2, 99
    q, k, v, pk, pq, table, kpm, scale, dout = _case(B, H, Lq, Lk, D, dtype, c2p, p2c, padded, Lq + 3 * Lk, 7)
    out, lse, qp, kp, grads = _kept(q, k, v, pk, pq, table, kpm, scale, c2p, p2c, p, seed, dout)
    assert qp.numel() == (B * H * Lq * 512 + 8 if c2p else 0) and kp.numel() == (B * H * Lk * 512 + 8 if p2c else 0)

    def run(dt):
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v, pk, pq)]
        o = _reference(*leaves, table, kpm, scale, c2p, p2c, p, seed)
        return o, torch.autograd.grad(o, leaves, dout.to(o.dtype), allow_unused=True)

    eager, geager = run(dtype)
    ref, gref = run(torch.float64)
    assert_within_budget("out", out, eager, ref)
    for name, ours, e, r, on in zip(NAMES, grads, geager, gref, [True, True, True, c2p, p2c]):
        if not on:
            assert ours.numel() == 0, name
            continue
        if kpm is not None and name in ("dk", "dv"):  # padded keys: exactly zero, never NaN
            assert (ours.masked_select(~kpm[:, None, :, None]) == 0).all(), name
        if kpm is not None and name == "dq":  # the empty row: zero gradients
            assert not ours[1].any()
        assert_within_budget(name, ours, e, r)
    if kpm is not None:
        assert torch.equal(out[1], torch.zeros_like(out[1]))
    # the plain pair (products recomputed) gives the same lse and, within fp32 rounding, the same results
    pk_, pq_ = (pk if c2p else None), (pq if p2c else None)
    out0, lse0 = _C().disentangled_attention_fwd_cpu(q, k, v, pk_, pq_, table, kpm, scale, c2p, p2c, p, seed)
    grads0 = _C().disentangled_attention_bwd_cpu(dout, q, k, v, pk_, pq_, out0, lse0, table, kpm, scale, c2p, p2c, p,
                                                 seed)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, lse0, **tol)
    for a, b in zip((out, *grads), (out0, *grads0)):
        torch.testing.assert_close(a, b, **tol)


def test_backward_reads_the_kept_products():
    """Adding 1 to every kept product adds 1 to every score the backward recomputes (its P, from the
    forward's lse, becomes e times the forward's): the gradients change exactly when it reads them."""
    q, k, v, pk, pq = _data(1, 2, 40, 50, 32, 512, torch.float32, seed=1)
    table = relative_position_index(40, 50, **V3)
    dout = torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(2))
    out, lse, qp, kp, grads = _kept(q, k, v, pk, pq, table, None, 0.1, True, True, 0.0, 0, dout)
    for bad in (qp.clone().add_(1.0), qp):
        again = _C().disentangled_attention_bwd_cpu_kept(dout, q, k, v, pk, pq, out, lse, bad, kp, table, None, 0.1,
                                                         True, True)
        assert torch.equal(again[0], grads[0]) == (bad is qp)
    again = _C().disentangled_attention_bwd_cpu_kept(dout, q, k, v, pk, pq, out, lse, qp, kp.clone().add_(1.0), table,
                                                     None, 0.1, True, True)
    assert not torch.equal(again[1], grads[1])


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "nograd"])
def test_public_api_keeps_products_only_for_gradients(grad):
    q, k, v, pk, pq = _data(1, 2, 20, 20, 16, 16, torch.float32, seed=4)
    leaves = [t.requires_grad_(grad) for t in (q, k, v, pk, pq)]
    with _Ops() as ops:
        out = forkattn.disentangled_attention(*leaves, max_relative_positions=10, position_buckets=8, backend="cpu")
        if grad:
            out.sum().backward()
    kept = [n for n in ops.names if "disentangled_attention" in n and "kept" in n]
    plain = [n for n in ops.names if "disentangled_attention" in n and "kept" not in n]
    if grad:
        assert kept == ["forkattn.disentangled_attention_fwd_kept.default",
                        "forkattn.disentangled_attention_bwd_kept.default"] and not plain
    else:
        assert plain == ["forkattn.disentangled_attention_fwd.default"] and not kept
    with torch.no_grad(), _Ops() as ops:
        forkattn.disentangled_attention(*leaves, max_relative_positions=10, position_buckets=8, backend="cpu")
    assert "forkattn.disentangled_attention_fwd.default" in ops.names


def test_opcheck_kept_op():
    q, k, v, pk, pq = _data(2, 2, 9, 13, 16, 8, torch.float32, seed=1)
    table = relative_position_index(9, 13, max_relative_positions=4)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 10:] = False
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), pk.requires_grad_(), pq.requires_grad_(),
            table, mask, 0.2, True, True, "cpu")
    op = torch.ops.forkattn.disentangled_attention_fwd_kept.default
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (*args[:3], None, *args[4:8], False, True, "cpu", 0.1, 5))


def test_bad_kept_products_name_themselves():
    q, k, v, pk, pq = _data(1, 2, 9, 13, 16, 8, torch.float32, seed=1)
    table = relative_position_index(9, 13, max_relative_positions=4)
    out, lse, qp, kp = _C().disentangled_attention_fwd_cpu_kept(q, k, v, pk, pq, table, None, 0.2, True, True)
    args = (q, k, v, pk, pq, out, lse)
    for name, bad_qp, bad_kp in [("qp_kept", qp[:-1], kp), ("kp_kept", qp, kp.double()),
                                 ("qp_kept", qp.view(2, -1), kp), ("kp_kept", qp, kp[::2])]:
        with pytest.raises(ValueError, match=name):
            _C().disentangled_attention_bwd_cpu_kept(out, *args, bad_qp, bad_kp, table, None, 0.2, True, True)
    # the products of a term that is off are empty
    o2, l2, qp2, kp2 = _C().disentangled_attention_fwd_cpu_kept(q, k, v, None, pq, table, None, 0.2, False, True)
    assert qp2.numel() == 0
    with pytest.raises(ValueError, match="qp_kept"):
        _C().disentangled_attention_bwd_cpu_kept(o2, q, k, v, None, pq, o2, l2, qp, kp2, table, None, 0.2, False,
                                                 True)
