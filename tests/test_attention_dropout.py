"""Attention dropout (issue #16): forkattn.attention(..., dropout_p=p, seed=s) on every backend that
declares the "dropout" feature, against the eager reference fed the same Philox mask.

The mask layout itself (counters, threshold, keep rate, independence, Triton's tl.philox) is tested in
test_philox.py; here: the backends draw exactly that mask (recovered from outputs with v = identity,
where out = P * keep / (1 - p) is zero exactly where a probability was dropped), forward and every
gradient under the 2x rule, seeds and generators, hidden positions, p = 0, bad arguments and the
registry's answer. Triton runs in its interpreter on CPU (TRITON_INTERPRET=1; fp32 and fp16 only:
the interpreter's bf16 tl.dot is wrong).
"""
import os

import pytest
import torch

import forkattn
import forkattn.triton as ftriton
from forkattn import philox, reference
from forkattn.attention import attention_fwd, attention_varlen_fwd

from attn_utils import assert_seed_semantics, assert_within_budget, delta_rounding_allowance, make_padding, make_qkv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = forkattn.backends.get("attention")
VARLEN = forkattn.backends.get("attention_varlen")

needs_triton = pytest.mark.skipif(
    ftriton.unavailable_reason() is not None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason=f"triton backend unavailable here: {ftriton.unavailable_reason()}",
)


def _identity_v(B, Hkv, Lk, dtype=torch.float32, device=DEV):
    """v with v[b, h, j] = e_j (head_dim = Lk): the output row i is row i of P * keep / (1 - p)."""
    return torch.eye(Lk, dtype=dtype, device=device).expand(B, Hkv, Lk, Lk).contiguous()


# --- the eager reference ------------------------------------------------------------------------------

def test_eager_draws_the_philox_mask():
    """reference.attention(dropout_p, seed) zeroes exactly the probabilities philox.dropout_keep drops
    and scales the rest by 1 / (1 - p)."""
    B, H, Lq, Lk, p, seed = 2, 3, 5, 19, 0.3, 1234
    q = torch.randn(B, H, Lq, Lk, dtype=torch.float64)
    k = torch.randn(B, H, Lk, Lk, dtype=torch.float64)
    v = _identity_v(B, H, Lk, torch.float64, "cpu")
    out = reference.attention(q, k, v, dropout_p=p, seed=seed)
    plain = reference.attention(q, k, v)  # = P
    keep = philox.dropout_u16(seed, B, H, Lq, Lk) >= philox.dropout_threshold(p)
    torch.testing.assert_close(out, torch.where(keep, plain / (1 - p), 0.0), rtol=1e-14, atol=0)
    assert 0 < (~keep).sum() < keep.numel()


def test_keep_rate_within_three_sigma():
    """The keep rate of the mask the eager backend applies, over ~1M probabilities."""
    B, H, Lq, Lk, p = 2, 8, 512, 128, 0.1
    q = torch.randn(B, H, Lq, Lk) * 0.1
    k = torch.randn(B, H, Lk, Lk) * 0.1
    out = forkattn.attention(q, k, _identity_v(B, H, Lk, device="cpu"), dropout_p=p, seed=99, backend="eager")
    n = out.numel()
    rate = (out != 0).double().mean().item()
    assert abs(rate - (1 - p)) <= 3 * ((p * (1 - p) / n) ** 0.5) + 2 ** -17, rate


def test_gradcheck_float64_fixed_seed():
    """The eager backend's implementation (reference.attention) with a fixed seed, in float64."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.randn(1, 1, 5, 4, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(1, 1, 5, 4, dtype=torch.float64, generator=g).requires_grad_()
    kpm = torch.tensor([[True, True, False, True, True]])
    fn = lambda q, k, v: reference.attention(q, k, v, causal=True, key_padding_mask=kpm, dropout_p=0.4, seed=7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    fv = lambda q, k, v: reference.attention_varlen(q, k, v, cu, torch.tensor([0, 2, 5], dtype=torch.int32),  # noqa: E731
                                                    dropout_p=0.4, seed=-7)
    assert torch.autograd.gradcheck(fv, (q[0, :, :3].transpose(0, 1).detach().requires_grad_(),
                                         k[0].transpose(0, 1).detach().requires_grad_(),
                                         v[0].transpose(0, 1).detach().requires_grad_()))


def test_seeds_and_generators():
    q, k, v = make_qkv(2, 2, 2, 9, 11, 8, torch.float32, device="cpu", requires_grad=False)
    run = lambda **kw: forkattn.attention(q, k, v, dropout_p=0.5, backend="eager", **kw)  # noqa: E731
    assert_seed_semantics(run)


def test_hidden_keys_get_no_weight():
    """Keys hidden by padding or the causal bound get no weight whatever their values (NaN
    included), with dropout as without."""
    B, H, Lq, Lk = 2, 2, 6, 10
    q = torch.randn(B, H, Lq, Lk)
    k = torch.randn(B, H, Lk, Lk)
    v = _identity_v(B, H, Lk, device="cpu")
    kpm = make_padding(B, Lk, generator=torch.Generator().manual_seed(1))
    k = k.masked_fill(~kpm[:, None, :, None], float("nan"))
    for causal in (False, True):
        out = forkattn.attention(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=0.3, seed=11, backend="eager")
        allowed = reference.visible_keys(B, Lq, Lk, causal=causal, key_padding_mask=kpm, device="cpu")
        assert not out.isnan().any()
        assert (out.masked_fill(allowed, 0) == 0).all()


def test_dropout_p_zero_is_the_plain_path():
    q, k, v = make_qkv(2, 2, 1, 7, 9, 8, torch.float32, device="cpu")
    for backend in BACKENDS.runnable("cpu", torch.float32, 8, ("gqa",)):
        plain = forkattn.attention(q, k, v, causal=True, backend=backend)
        assert torch.equal(forkattn.attention(q, k, v, causal=True, dropout_p=0.0, seed=5, backend=backend), plain)
        assert torch.equal(forkattn.attention(q, k, v, causal=True, dropout_p=0, backend=backend), plain)


@pytest.mark.parametrize("kw, err, text", [
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(dropout_p=float("nan")), ValueError, "dropout_p"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p"),
    (dict(dropout_p=True), TypeError, "dropout_p"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, "seed"),
    (dict(dropout_p=0.1, seed=2 ** 64), ValueError, "seed"),
    (dict(dropout_p=0.1, seed=-(2 ** 63) - 1), ValueError, "seed"),
    (dict(dropout_p=0.1, generator=0), TypeError, "generator"),
])
def test_bad_arguments(kw, err, text):
    q, k, v = make_qkv(1, 1, 1, 3, 3, 4, torch.float32, device="cpu", requires_grad=False)
    with pytest.raises(err, match=text):
        forkattn.attention(q, k, v, **kw)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(err, match=text):
        forkattn.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 3, 3, **kw)


def test_registry_feature():
    """Every attention backend declares dropout (the cuda kernels' mask is checked in
    tests/test_attention_cuda_emulation.py and, on a GPU, tests/test_attention_cuda.py)."""
    for fam in (BACKENDS, VARLEN):
        for name in ("eager", "cpu", "triton", "cuda"):
            assert "dropout" in fam.backends[name].FEATURES, (fam.op, name)
        assert fam.backends["cuda"].supports(device_type="cuda", features=("dropout", "causal")) is None
    expected = "cpu" if BACKENDS.why_not("cpu", "cpu", torch.float32, 8) is None else "eager"
    assert BACKENDS.resolve(None, "cpu", torch.float32, 8, ("dropout",)).NAME == expected


# --- kernel backends against the eager reference ---------------------------------------------------------

needs_cpu = pytest.mark.skipif(BACKENDS.why_not("cpu", "cpu", torch.float32, 16) is not None,
                               reason=f"cpu backend unavailable: {BACKENDS.why_not('cpu', 'cpu', torch.float32, 16)}")
KERNELS = [pytest.param("cpu", marks=needs_cpu), pytest.param("triton", marks=needs_triton)]


def _device(backend):
    return "cpu" if backend == "cpu" else DEV


def _check(run, backend, inputs, dtype, p, seed, allowance=None):
    """run(q, k, v, backend, dropout_p, seed) on the kernel backend, eager in `dtype` and eager in
    float64 with the same seed: the 2x rule for out, dq, dk and dv."""
    ins = [t.detach().to(dtype).requires_grad_() for t in inputs]
    ins64 = [t.detach().double().requires_grad_() for t in inputs]
    out = run(*ins, backend, p, seed)
    eager = run(*ins, "eager", p, seed)
    ref = run(*ins64, None, p, seed)
    assert_within_budget("out", out, eager, ref)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, ins, g)
    base = torch.autograd.grad(eager, ins, g)
    refg = torch.autograd.grad(ref, ins64, g.double())
    extra = allowance(ins, ref, g) if allowance else {}
    for name, a, b, r in zip(("dq", "dk", "dv"), ours, base, refg):
        assert_within_budget(name, a, b, r, extra=1e-5 + extra.get(name, 0.0))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("B, H, Hkv, Lq, Lk, D, causal, padded, dtype", [
    (1, 4, 2, 97, 129, 16, False, True, torch.float32),
    (1, 2, 1, 129, 97, 16, True, False, torch.float16),
    (2, 2, 2, 7, 1, 8, False, True, torch.float32),
    (1, 3, 3, 1, 7, 8, True, False, torch.float16),
    (2, 2, 1, 33, 20, 16, True, True, torch.bfloat16),  # triton upcasts bf16 in the interpreter
])
def test_padded_against_eager(backend, B, H, Hkv, Lq, Lk, D, causal, padded, dtype):
    dev = _device(backend)
    torch.manual_seed(Lq * 1000 + Lk)
    q, k, v = make_qkv(B, H, Hkv, Lq, Lk, D, torch.float32, device=dev, requires_grad=False)
    kpm = make_padding(B, Lk, dev) if padded else None

    def run(q, k, v, backend, p, seed):
        if backend is None:  # the float64 reference
            return reference.attention(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=p, seed=seed)
        return forkattn.attention(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=p, seed=seed, backend=backend)

    def allowance(ins, ref, g):
        allowed = reference.visible_keys(B, Lq, Lk, causal=causal, key_padding_mask=kpm, device=dev)
        return delta_rounding_allowance(ins[0], ins[1], ref, g, D ** -0.5, allowed)
    _check(run, backend, (q, k, v), dtype, 0.2, 0x5EED_0000_0000_0001 + Lq, allowance)


@pytest.mark.parametrize("backend, dtype", [
    pytest.param(b, d, marks=m) for b, m in (("cpu", needs_cpu), ("triton", needs_triton))
    for d in (torch.float32, torch.float16)] + [pytest.param("cpu", torch.bfloat16, marks=needs_cpu)])
def test_varlen_against_eager(backend, dtype):
    dev = _device(backend)
    lq, lk = [7, 1, 40], [9, 7, 33]
    H, Hkv, D = 2, 1, 16
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    torch.manual_seed(3)
    q = torch.randn(sum(lq), H, D, device=dev)
    k, v = (torch.randn(sum(lk), Hkv, D, device=dev) for _ in range(2))

    def run(q, k, v, backend, p, seed):
        if backend is None:
            return reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, dropout_p=p, seed=seed)
        return forkattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, dropout_p=p, seed=seed,
                                         backend=backend)
    # fp16 dq/dk: the kernels' Delta is rounded from the stored output (attn_utils explains); bounded
    # here by the same formula per sequence, the largest of them
    _check(run, backend, (q, k, v), dtype, 0.3, -42, _varlen_allowance(cu_q, cu_k, lq, lk, D, dev) if dtype != torch.float32 else None)


def _varlen_allowance(cu_q, cu_k, lq, lk, D, dev):
    def allowance(ins, ref, g):
        worst = {"dq": 0.0, "dk": 0.0}
        for b in range(len(lq)):
            rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
            bhld = lambda t, r: t[r].transpose(0, 1).unsqueeze(0)  # noqa: E731
            allowed = reference.visible_keys(1, lq[b], lk[b], causal=True, key_padding_mask=None, device=dev)
            a = delta_rounding_allowance(bhld(ins[0], rq), bhld(ins[1], rk), bhld(ref, rq), bhld(g, rq), D ** -0.5,
                                         allowed)
            worst = {n: max(worst[n], a[n]) for n in worst}
        return worst
    return allowance


@pytest.mark.parametrize("backend", KERNELS)
def test_same_mask_as_eager_bit_for_bit(backend):
    """v = identity: out is P * keep / (1 - p), zero exactly where a probability was dropped; the
    kernel's zeros are eager's zeros, element for element (padded and varlen, causal, GQA)."""
    dev = _device(backend)
    B, H, Hkv, Lq, Lk, p, seed = 2, 4, 2, 13, 32, 0.4, 2 ** 63 + 12345
    q = torch.randn(B, H, Lq, Lk, device=dev)
    k = torch.randn(B, Hkv, Lk, Lk, device=dev)
    v = _identity_v(B, Hkv, Lk, device=dev)
    for causal in (False, True):
        ours = forkattn.attention(q, k, v, causal=causal, dropout_p=p, seed=seed, backend=backend)
        eager = forkattn.attention(q, k, v, causal=causal, dropout_p=p, seed=seed, backend="eager")
        allowed = reference.visible_keys(B, Lq, Lk, causal=causal, key_padding_mask=None, device=dev)
        keep = philox.dropout_keep(seed, p, B, H, Lq, Lk, device=dev)
        if allowed is not None:
            keep = keep & allowed
        assert torch.equal(ours != 0, keep) and torch.equal(eager != 0, keep)
    # varlen: sequence b is batch row b, i and j counted inside the sequence
    cu_q = torch.tensor([0, Lq, 2 * Lq - 5], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, Lk, 2 * Lk], dtype=torch.int32, device=dev)
    qv = torch.cat([q[0], q[1, :, :Lq - 5]], dim=1).transpose(0, 1).contiguous()
    kv, vv = (t.transpose(1, 2).reshape(B * Lk, Hkv, Lk) for t in (k, v))
    out = forkattn.attention_varlen(qv, kv, vv, cu_q, cu_k, Lq, Lk, dropout_p=p, seed=seed, backend=backend)
    keep = philox.dropout_keep(seed, p, B, H, Lq, Lk, device=dev)
    assert torch.equal(out[:Lq] != 0, keep[0].transpose(0, 1))
    assert torch.equal(out[Lq:] != 0, keep[1, :, :Lq - 5].transpose(0, 1))


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_seeds_and_p_zero(backend):
    dev = _device(backend)
    q, k, v = make_qkv(1, 2, 2, 9, 11, 16, torch.float32, device=dev, requires_grad=False)
    run = lambda **kw: forkattn.attention(q, k, v, causal=True, backend=backend, **kw)  # noqa: E731
    assert torch.equal(run(dropout_p=0.3, seed=1), run(dropout_p=0.3, seed=1))
    assert not torch.equal(run(dropout_p=0.3, seed=1), run(dropout_p=0.3, seed=2))
    assert torch.equal(run(dropout_p=0.0, seed=1), run())


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck_with_dropout(backend):
    dev = _device(backend)
    q, k, v = (torch.randn(1, 2, 7, 16, device=dev) for _ in range(3))
    torch.library.opcheck(attention_fwd, (q, k, v, None, True, 0.25, backend, 0.2, -5))
    vq = torch.randn(7, 2, 16, device=dev)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=dev)
    torch.library.opcheck(attention_varlen_fwd, (vq, vq, vq, cu, cu, 4, 4, False, 0.25, backend, 0.2, 2 ** 40))


@needs_cpu
def test_cpu_long_rows_same_mask_as_eager_bit_for_bit():
    """The cpu kernel draws a row's u16 128 or 64 keys per Philox call and none past a row's last
    visible key: rows of 250 keys (two key tiles of 128) cut by padding at a tile's start, middle
    and end, and causal rows with Lq != Lk; forward masks bit for bit, gradients against eager."""
    B, H, Lq, Lk, p, seed = 5, 2, 40, 250, 0.3, 77
    q = torch.randn(B, H, Lq, Lk)
    k = torch.randn(B, H, Lk, Lk)
    v = _identity_v(B, H, Lk, device="cpu")
    lengths = torch.tensor([250, 131, 60, 128, 193])
    kpm = torch.arange(Lk)[None, :] < lengths[:, None]
    keep = philox.dropout_keep(seed, p, B, H, Lq, Lk)
    for causal, mask in ((False, kpm), (True, None), (True, kpm)):
        kw = dict(causal=causal, key_padding_mask=mask, dropout_p=p, seed=seed)
        ours = forkattn.attention(q, k, v, backend="cpu", **kw)
        allowed = reference.visible_keys(B, Lq, Lk, causal=causal, key_padding_mask=mask, device="cpu")
        assert torch.equal(ours != 0, keep & allowed)
        vr = torch.randn(B, H, Lk, 32)
        args = [t.clone().requires_grad_() for t in (q[..., :32], k[..., :32], vr)]
        ref_args = [t.detach().clone().requires_grad_() for t in args]
        out = forkattn.attention(*args, backend="cpu", **kw)
        ref = forkattn.attention(*ref_args, backend="eager", **kw)
        dout = torch.randn_like(out)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(out, args, dout), torch.autograd.grad(ref, ref_args, dout)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
