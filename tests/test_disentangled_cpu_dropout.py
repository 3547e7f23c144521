"""Dropout in the CPU disentangled kernel (csrc/cpu/disentangled_cpu.cpp), called through its `_C` entry
points with dropout_p and seed last (the contract in backends/families.py): the mask is the plain
attention's Philox mask of (b, h, i, j) (forkattn.philox), survivors scaled by 1 / (1 - p), lse the
undropped softmax's. Checked: output and all five gradients against a float64 reference fed the same
mask (2x rule), the mask itself (recovered with v = identity) and its keep rate, the mask equal to the
plain CPU attention kernel's, p = 0 bit-identical to no dropout, rows that see no key stay zero, bad p.
The public API and registry side (dropout_p / generator on forkattn.disentangled_attention) is
test_disentangled_dropout.py's."""
import pytest
import torch

from forkattn import _native, philox
from forkattn.backends import family
from forkattn.disentangled import relative_position_index

from attn_utils import assert_within_budget, make_padding

FAMILY = family("disentangled_attention")
pytestmark = pytest.mark.skipif(FAMILY.why_not("cpu", "cpu", torch.float32, 64) is not None,
                                reason=f"cpu backend: {FAMILY.why_not('cpu', 'cpu', torch.float32, 64)}")
V3 = dict(max_relative_positions=512, position_buckets=256)  # DeBERTa-v3: span 256, log buckets


def _C():
    return _native._C


def _data(B, H, Lq, Lk, D, rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype) for L in (Lq, Lk, Lk))
    pk, pq = (torch.randn(H, rows, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v, pk, pq


def _reference(q, k, v, pk, pq, table, kpm, scale, c2p, p2c, p, seed):
    """DeBERTa's scores (float64 for float64 inputs, else float32 as eager PyTorch), softmax over the
    visible keys (rows with none: zeros), then the Philox mask of (b, h, i, j): P * keep / (1 - p), @ v.
    Differentiable in all five inputs. (reference._attend would round float64 scores to float32.)"""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    delta = table[torch.arange(Lq)[:, None] - torch.arange(Lk)[None, :] + Lk - 1]  # [Lq, Lk]
    if kpm is not None:  # padded keys may hold NaN: zeroed, as the kernel reads them
        k, v = (t.masked_fill(~kpm[:, None, :, None], 0) for t in (k, v))
    s = (q @ k.transpose(-2, -1)).to(acc)
    if c2p:
        s = s + (q @ pk.transpose(-2, -1)).to(acc).gather(-1, delta.expand(B, H, Lq, Lk))
    if p2c:
        s = s + (k @ pq.transpose(-2, -1)).to(acc).gather(-1, delta.t().expand(B, H, Lk, Lq)).transpose(-2, -1)
    s = s * scale
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    probs = torch.softmax(s.masked_fill(torch.isinf(s).all(-1, keepdim=True), 0.0), dim=-1)
    if kpm is not None:
        probs = probs.masked_fill(~kpm[:, None, None, :], 0.0).masked_fill(~kpm.any(-1)[:, None, None, None], 0.0)
    if p > 0:
        probs = probs * philox.dropout_keep(seed, p, B, H, Lq, Lk) / (1.0 - p)
    return probs.to(v.dtype) @ v


def _ours(q, k, v, pk, pq, table, kpm, scale, c2p, p2c, p, seed, dout):
    pk, pq = (pk if c2p else None), (pq if p2c else None)
    out, lse = _C().disentangled_attention_fwd_cpu(q, k, v, pk, pq, table, kpm, scale, c2p, p2c, p, seed)
    grads = _C().disentangled_attention_bwd_cpu(dout, q, k, v, pk, pq, out, lse, table, kpm, scale, c2p, p2c, p,
                                                seed)
    return out, lse, grads


def _padding_with_nan(k, v, B, Lk, seed):
    kpm = make_padding(B, Lk, fully_padded=(1,) if B > 1 else (), generator=torch.Generator().manual_seed(seed))
    kpm[0] = True
    kpm[0, min(130, Lk - 1):min(141, Lk)] = False  # a hole: a mixed key block
    pad = ~kpm[:, None, :, None]
    return kpm, k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,Lq,Lk,D,terms,padded", [
    (2, 300, 300, 64, (True, True), True),     # v3 buckets, 3 key tiles, mixed / skipped blocks, NaN padding
    (1, 129, 257, 32, (True, False), False),   # Lq < Lk, c2p only
    (2, 257, 97, 64, (False, True), True),     # Lq > Lk, p2c only
    (1, 7, 7, 64, (False, False), False),      # no relative term: plain attention
], ids=["v3-L300", "Lq129-Lk257-c2p", "Lq257-Lk97-p2c", "L7-noterms"])
def test_dropped_output_and_gradients_against_float64(dtype, B, Lq, Lk, D, terms, padded):
    c2p, p2c = terms
    H, p, seed = 2, 0.2, 1234
    q, k, v, pk, pq = _data(B, H, Lq, Lk, D, 512, dtype, seed=Lq + Lk)
    table = relative_position_index(Lq, Lk, **V3)
    kpm = None
    if padded:
        kpm, k, v = _padding_with_nan(k, v, B, Lk, seed=3)
    scale = (D * (1 + c2p + p2c)) ** -0.5
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    out, lse, grads = _ours(q, k, v, pk, pq, table, kpm, scale, c2p, p2c, p, seed, dout)

    # lse is the undropped softmax's: the same as without dropout
    _, lse0 = _C().disentangled_attention_fwd_cpu(q, k, v, pk if c2p else None, pq if p2c else None, table, kpm,
                                                  scale, c2p, p2c)
    torch.testing.assert_close(lse, lse0, rtol=0, atol=0)

    def run(t, dt):
        leaves = [x.detach().to(dt).requires_grad_() for x in t]
        o = _reference(*leaves, table, kpm, scale, c2p, p2c, p, seed)
        gs = torch.autograd.grad(o, leaves, dout.to(o.dtype), allow_unused=True)
        return o, gs

    eager, geager = run((q, k, v, pk, pq), dtype)
    ref, gref = run((q, k, v, pk, pq), torch.float64)
    assert_within_budget("out", out, eager, ref)
    names = ["dq", "dk", "dv", "dpos_key", "dpos_query"]
    used = [True, True, True, c2p, p2c]
    for name, ours, e, r, on in zip(names, grads, geager, gref, used):
        if not on:
            assert ours.numel() == 0, name
            continue
        if kpm is not None and name in ("dk", "dv"):  # padded keys: exactly zero, never NaN
            assert (ours.masked_select(~kpm[:, None, :, None]) == 0).all(), name
        assert_within_budget(name, ours, e, r)


def _identity_v_inputs(B, H, Lq, Lk, size, seed):
    """Small random q, k, pos (size: their scale, so that no probability underflows) and v = identity
    (head_dim = Lk), with DeBERTa-v3's table."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, Lk, generator=g) * size
    k = torch.randn(B, H, Lk, Lk, generator=g) * size
    v = torch.eye(Lk).expand(B, H, Lk, Lk).contiguous()
    pk, pq = (torch.randn(H, 512, Lk, generator=g) * size for _ in range(2))
    return q, k, v, pk, pq, relative_position_index(Lq, Lk, **V3)


def test_mask_is_the_philox_mask_and_the_plain_kernels():
    """v = identity (head_dim = Lk): out row i is row i of P * keep / (1 - p), so it is zero exactly where
    philox.dropout_keep drops; the same seed gives the plain CPU attention kernel's output when the
    relative terms are off."""
    B, H, Lq, Lk, p, seed = 2, 3, 37, 200, 0.3, -987654321
    q, k, v, pk, pq, table = _identity_v_inputs(B, H, Lq, Lk, 0.1, seed=0)
    out, _ = _C().disentangled_attention_fwd_cpu(q, k, v, pk, pq, table, None, 0.1, True, True, p, seed)
    keep = philox.dropout_keep(seed, p, B, H, Lq, Lk)
    assert torch.equal(out != 0, keep)
    assert 0 < (~keep).sum() < keep.numel()

    plain, _ = _C().attention_fwd_cpu(q, k, v, None, False, 0.1, p, seed)
    ours, _ = _C().disentangled_attention_fwd_cpu(q, k, v, None, None, table, None, 0.1, False, False, p, seed)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours != 0, plain != 0)


def test_keep_rate_within_three_sigma():
    B, H, Lq, Lk, p = 1, 4, 512, 256, 0.1
    q, k, v, pk, pq, table = _identity_v_inputs(B, H, Lq, Lk, 0.05, seed=1)
    out, _ = _C().disentangled_attention_fwd_cpu(q, k, v, pk, pq, table, None, 0.05, True, True, p, 42)
    n = out.numel()
    rate = (out != 0).double().mean().item()
    assert abs(rate - (1 - p)) <= 3 * (p * (1 - p) / n) ** 0.5 + 2 ** -17, rate


def test_zero_p_is_bit_identical_to_no_dropout():
    B, H, L, D = 2, 2, 300, 64
    q, k, v, pk, pq = _data(B, H, L, L, D, 512, torch.float32, seed=9)
    table = relative_position_index(L, L, **V3)
    kpm, k, v = _padding_with_nan(k, v, B, L, seed=2)
    dout = torch.randn_like(q)
    a = _ours(q, k, v, pk, pq, table, kpm, 0.07, True, True, 0.0, 77, dout)
    out, lse = _C().disentangled_attention_fwd_cpu(q, k, v, pk, pq, table, kpm, 0.07, True, True)
    grads = _C().disentangled_attention_bwd_cpu(dout, q, k, v, pk, pq, out, lse, table, kpm, 0.07, True, True)
    for x, y in zip((a[0], a[1], *a[2]), (out, lse, *grads)):
        assert torch.equal(x, y)


def test_rows_that_see_no_key_stay_zero():
    B, H, L, D, p = 3, 2, 150, 64, 0.5
    q, k, v, pk, pq = _data(B, H, L, L, D, 512, torch.float32, seed=4)
    table = relative_position_index(L, L, **V3)
    kpm, k, v = _padding_with_nan(k, v, B, L, seed=8)  # batch row 1 sees no key
    assert not kpm[1].any()
    dout = torch.randn_like(q)
    out, lse, (dq, dk, dv, dpk, dpq) = _ours(q, k, v, pk, pq, table, kpm, 0.1, True, True, p, 5, dout)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isinf(lse[1]).all()
    for g in (dq, dk, dv):
        assert torch.equal(g[1], torch.zeros_like(g[1]))
    for g in (out, dq, dk, dv, dpk, dpq):
        assert not torch.isnan(g).any()


def test_seed_changes_the_mask_and_is_reproducible():
    q, k, v, pk, pq = _data(1, 2, 64, 64, 64, 512, torch.float32, seed=6)
    table = relative_position_index(64, 64, **V3)
    run = lambda s: _C().disentangled_attention_fwd_cpu(q, k, v, pk, pq, table, None, 0.1, True, True, 0.3, s)[0]  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_bad_dropout_p_names_it(p):
    q, k, v, pk, pq = _data(1, 1, 8, 8, 16, 512, torch.float32, seed=0)
    table = relative_position_index(8, 8, **V3)
    with pytest.raises(ValueError, match="dropout_p"):
        _C().disentangled_attention_fwd_cpu(q, k, v, pk, pq, table, None, 0.1, True, True, p, 0)
    out, lse = _C().disentangled_attention_fwd_cpu(q, k, v, pk, pq, table, None, 0.1, True, True)
    with pytest.raises(ValueError, match="dropout_p"):
        _C().disentangled_attention_bwd_cpu(out, q, k, v, pk, pq, out, lse, table, None, 0.1, True, True, p, 0)


def test_backend_declares_dropout():
    from forkattn.backends.cpu import CpuDisentangledAttention
    assert "dropout" in CpuDisentangledAttention.FEATURES
    assert {"key_padding", "c2p", "p2c"} <= CpuDisentangledAttention.FEATURES
