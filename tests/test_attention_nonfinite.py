"""Non-finite values in attention (issue 12, sections 2 and 3), on every CPU-runnable backend.

- Garbage (+inf, -inf, NaN) in a padded key or value, or in the keys of another packed sequence,
  has no effect on any output or gradient, and padded keys get exactly zero gradients.
- NaN in a query or a visible key reaches exactly the outputs and gradients it reaches in eager
  PyTorch and in float64; only rows that see no key at all return zeros.
"""
import pytest
import torch

import forkattn
from forkattn import reference
from attn_utils import backend_skip_reason

BACKENDS = ["eager", "cpu", "triton"]
GARBAGE = [float("inf"), float("-inf"), float("nan")]


def _skip(backend):
    why = backend_skip_reason(backend)
    if why:
        pytest.skip(why)


def _run(fn, inputs, g):
    """(out, dq, dk, dv) of fn(*inputs) with upstream gradient g."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, g))


def _same(name, a, b):
    """Equal values and equal NaN positions."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), (
        f"{name}: NaN at {int(nan_a.sum())} places, expected {int(nan_b.sum())}; first difference at "
        f"{(nan_a != nan_b).nonzero()[0].tolist()}")
    diff = (a.double() - b.double()).abs().nan_to_num(0.0)
    assert diff.max().item() <= 1e-5, f"{name}: differs by {diff.max().item():.3e}"


def _padding(B, Lk):
    """Right padding, left padding (a hole before the first valid key) and a fully padded row."""
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[0, Lk - 5:] = False
    mask[1, :3] = False
    mask[1, Lk // 2] = False
    mask[2] = False
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("garbage", GARBAGE, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["k", "v", "kv"])
def test_garbage_in_padded_keys_has_no_effect(backend, causal, garbage, where):
    _skip(backend)
    torch.manual_seed(1)
    B, H, Hkv, Lq, Lk, D = 3, 2, 1, 7, 37, 16
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    mask = _padding(B, Lk)
    g = torch.randn(B, H, Lq, D)
    fn = lambda q, k, v: forkattn.attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)  # noqa: E731
    clean = _run(fn, (q, k, v), g)
    k2, v2 = k.clone(), v.clone()
    pad = ~mask[:, None, :, None].expand_as(k)
    if "k" in where:
        k2[pad] = garbage
    if "v" in where:
        v2[pad] = garbage
    dirty = _run(fn, (q, k2, v2), g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), dirty, clean):
        assert not torch.isnan(a).any(), f"{name}: NaN from garbage in padded keys"
        _same(name, a, b)
    for name, grad in (("dk", dirty[2]), ("dv", dirty[3])):
        assert torch.equal(grad[pad], torch.zeros_like(grad[pad])), f"{name} of padded keys must be zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("garbage", GARBAGE, ids=["inf", "-inf", "nan"])
def test_garbage_in_other_packed_sequence_has_no_effect(backend, causal, garbage):
    """Varlen: sequence 1's keys hold garbage; sequences 0 and 2 (and empty sequence 3) are untouched."""
    _skip(backend)
    torch.manual_seed(2)
    lq, lk, H, Hkv, D = [5, 9, 70, 0], [6, 11, 65, 0], 2, 2, 16
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = torch.randn(sum(lq), H, D), torch.randn(sum(lk), Hkv, D), torch.randn(sum(lk), Hkv, D)
    g = torch.randn(sum(lq), H, D)
    fn = lambda q, k, v: forkattn.attention_varlen(  # noqa: E731
        q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal, backend=backend)
    clean = _run(fn, (q, k, v), g)
    k2, v2 = k.clone(), v.clone()
    k2[cu_k[1]:cu_k[2]] = garbage
    v2[cu_k[1]:cu_k[2]] = garbage
    dirty = _run(fn, (q, k2, v2), g)
    rows_q = torch.ones(sum(lq), dtype=torch.bool)
    rows_q[cu_q[1]:cu_q[2]] = False
    rows_k = torch.ones(sum(lk), dtype=torch.bool)
    rows_k[cu_k[1]:cu_k[2]] = False
    for name, a, b, rows in zip(("out", "dq", "dk", "dv"), dirty, clean, (rows_q, rows_q, rows_k, rows_k)):
        assert not torch.isnan(a[rows]).any(), f"{name}: NaN leaked out of sequence 1"
        _same(name, a[rows], b[rows])


def _nan_case(backend, causal, plant, mask=None, Lq=7, Lk=37):
    torch.manual_seed(3)
    B, H, Hkv, D = 3, 2, 1, 16
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    plant(q, k, v)
    g = torch.randn(B, H, Lq, D)
    kw = dict(causal=causal, key_padding_mask=mask)
    ours = _run(lambda q, k, v: forkattn.attention(q, k, v, backend=backend, **kw), (q, k, v), g)
    ref = _run(lambda q, k, v: reference.attention(q, k, v, **kw), (q.double(), k.double(), v.double()), g.double())
    return ours, ref


def _nan_q(q, k, v):
    q[0, 1, 5, 3] = float("nan")


def _nan_k(q, k, v):
    k[1, 0, 20, 0] = float("nan")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plant", [_nan_q, _nan_k], ids=["nan_q", "nan_visible_k"])
@pytest.mark.parametrize("padded,Lk", [(False, 37), (True, 37), (False, 64)], ids=["dense", "padded", "dense64"])
def test_nan_propagates_like_eager(backend, plant, padded, Lk):
    """The NaN reaches the same outputs and gradients as in float64 eager; the rest agrees.
    (Lk 64: whole rows in the cpu kernel's vector loops, whose fast exp drops NaN.)"""
    _skip(backend)
    mask = _padding(3, Lk) if padded else None
    ours, ref = _nan_case(backend, False, plant, mask, Lk=Lk)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert torch.isnan(r).any(), f"{name}: the reference should show the NaN"
        _same(name, a, r.to(a.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plant", [_nan_q, _nan_k], ids=["nan_q", "nan_visible_k"])
def test_nan_propagates_like_eager_causal(backend, plant):
    """Causal: a NaN query row is NaN in out and dq; a NaN key makes exactly the rows that see it
    NaN. (dk/dv of keys a NaN row cannot see, and dq of rows before a NaN key, may also turn NaN,
    as they do in eager: 0 * NaN in the gradient matmuls.)"""
    _skip(backend)
    ours, ref = _nan_case(backend, True, plant, Lq=37)
    _same("out", ours[0], ref[0].float())
    if plant is _nan_q:
        _same("dq", ours[1], ref[1].float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_on_row_that_sees_nothing_gives_zeros(backend):
    """Only rows that see no key return zeros, NaN query or not."""
    _skip(backend)
    mask = _padding(3, 37)
    ours, _ = _nan_case(backend, False, lambda q, k, v: q[2].fill_(float("nan")), mask)
    out, dq = ours[0], ours[1]
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.equal(dq[2], torch.zeros_like(dq[2]))
    assert not torch.isnan(out).any() and not torch.isnan(ours[2]).any()
