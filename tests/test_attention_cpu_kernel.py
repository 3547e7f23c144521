"""Kernel-specific cases for the fused CPU attention (csrc/cpu/attention_cpu.cpp).

The kernel tiles queries x keys (up to 256 x 128), classifies key tiles per batch row as
skipped / full / mixed from the padding mask, and skips causal tiles past the diagonal. These
cases sit on those boundaries; the general API matrix lives in tests/test_attention.py.
Pass rule: max error against float64 <= 2 x eager PyTorch's error in the same dtype + 1e-5,
for out, dq, dk, dv.
"""
import math

import pytest
import torch

import forkattn
from forkattn import reference
from forkattn._native import _C


def _qkv(B, H, Hkv, Lq, Lk, D, dtype, strided):
    def one(heads, L):
        if strided:  # the transpose of a [B, L, H, D] projection, read in place
            return torch.randn(B, L, heads, D).to(dtype).transpose(1, 2)
        return torch.randn(B, heads, L, D).to(dtype)

    return one(H, Lq), one(Hkv, Lk), one(Hkv, Lk)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check(q, k, v, *, causal=False, mask=None):
    """2x rule for out, dq, dk, dv; returns our output and grads."""
    go = torch.randn(q.shape[0], q.shape[1], q.shape[2], q.shape[3])
    runs = {}
    for name, dtype in (("ref", torch.float64), ("eager", q.dtype), ("ours", q.dtype)):
        qq, kk, vv = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
        if name == "ours":
            out = forkattn.attention(qq, kk, vv, causal=causal, key_padding_mask=mask, backend="cpu")
        else:
            out = reference.attention(qq, kk, vv, causal=causal, key_padding_mask=mask)
        out.backward(go.to(dtype))
        runs[name] = (out, qq.grad, kk.grad, vv.grad)
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        ours, eager, ref = runs["ours"][i], runs["eager"][i], runs["ref"][i]
        assert not torch.isnan(ours).any(), f"{what}: NaN"
        err, base = _err(ours, ref), _err(eager, ref)
        assert err <= 2 * base + 1e-5, f"{what}: err {err:.3e} > 2 * eager {base:.3e} + 1e-5"
    return runs["ours"]


@pytest.mark.parametrize("Lq,Lk", [(127, 129), (128, 128), (257, 256), (256, 383), (300, 129), (1, 257)])
@pytest.mark.parametrize("causal", [False, True])
def test_tile_boundaries(Lq, Lk, causal):
    # B * H = 8: the query tile is 256 rows when Lq > 256 (else shrunk to keep threads busy).
    q, k, v = _qkv(2, 4, 2, Lq, Lk, 64, torch.float32, strided=True)
    lengths = torch.tensor([Lk - 1, Lk // 2])
    mask = torch.arange(Lk)[None] < lengths[:, None]
    _check(q, k, v, causal=causal, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_with_fully_padded_rows(dtype, Hkv):
    B, H, L = 3, 6, 97
    q, k, v = _qkv(B, H, Hkv, L, L + 40, 40, dtype, strided=False)
    mask = torch.rand(B, L + 40) < 0.7  # scattered padding: mixed tiles everywhere
    mask[1] = False  # a sequence with no key at all
    out, dq, dk, dv = _check(q, k, v, causal=True, mask=mask)
    for t in (out[1], dq[1], dk[1], dv[1]):
        assert torch.count_nonzero(t) == 0


def test_skipped_middle_key_tiles():
    # Keys attend only in [0, 5) and [300, 310): the tile [128, 256) is skipped entirely,
    # the others are mixed.
    Lk = 400
    mask = torch.zeros(2, Lk, dtype=torch.bool)
    mask[:, :5] = True
    mask[:, 300:310] = True
    mask[1, :5] = False
    q, k, v = _qkv(2, 2, 1, 150, Lk, 64, torch.float32, strided=True)
    _check(q, k, v, mask=mask)
    _check(q, k, v, mask=mask, causal=True)


@pytest.mark.parametrize("D", [32, 40, 128, 256])
def test_head_dims(D):
    q, k, v = _qkv(2, 2, 2, 70, 140, D, torch.float32, strided=False)
    _check(q, k, v, causal=True, mask=torch.arange(140)[None].expand(2, -1) < torch.tensor([[140], [33]]))


def test_lse_and_rows_without_keys():
    # Lq > Lk with causal: the first Lq - Lk queries see no key -> out 0, lse +inf, zero dq.
    Lq, Lk, D = 200, 130, 64
    q, k, v = _qkv(1, 2, 2, Lq, Lk, D, torch.float32, strided=False)
    scale = D ** -0.5
    out, lse = _C.attention_fwd_cpu(q, k, v, None, True, scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    visible = reference.visible_keys(1, Lq, Lk, causal=True, key_padding_mask=None, device=q.device)
    want = torch.logsumexp(s.masked_fill(~visible, -math.inf), dim=-1)
    hidden = torch.isinf(want)
    assert hidden[0, 0, : Lq - Lk].all() and not hidden[0, 0, Lq - Lk :].any()
    assert torch.equal(torch.isinf(lse), hidden) and (lse[hidden] > 0).all()
    assert _err(lse[~hidden], want[~hidden]) < 1e-5
    assert torch.count_nonzero(out[:, :, : Lq - Lk]) == 0
    _, dq, _, _ = _check(q, k, v, causal=True)
    assert torch.count_nonzero(dq[:, :, : Lq - Lk]) == 0


def test_fallback_gemm(monkeypatch):
    # FORKATTN_CPU_NAIVE_GEMM=1 replaces BLAS sgemm by the kernel's own loop (used when torch
    # exports no sgemm); same answers.
    monkeypatch.setenv("FORKATTN_CPU_NAIVE_GEMM", "1")
    q, k, v = _qkv(2, 2, 1, 33, 150, 40, torch.float32, strided=True)
    _check(q, k, v, causal=True, mask=torch.arange(150)[None].expand(2, -1) < torch.tensor([[150], [60]]))


# --- varlen: packed sequences in one call -------------------------------------------------------

def _packed(lens, H, D, dtype, fused=False):
    """[total, H, D] rows; fused=True: the q slice of a [total, 3, H, D] projection (row stride 3HD)."""
    T = sum(lens)
    t = torch.randn(T, 3, H, D).to(dtype)[:, 0] if fused else torch.randn(T, H, D).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    return t, cu


def _varlen_runs(q, k, v, cu_q, cu_k, causal, backends=("ref", "eager", "ours")):
    from forkattn.reference import attention_varlen

    go = torch.randn(q.shape, dtype=torch.float64)
    mq, mk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
    runs = {}
    for name in backends:
        dtype = torch.float64 if name == "ref" else q.dtype
        qq, kk, vv = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
        if name == "ours":
            out = forkattn.attention_varlen(qq, kk, vv, cu_q, cu_k, mq, mk, causal=causal, backend="cpu")
        else:
            out = attention_varlen(qq, kk, vv, cu_q, cu_k, causal=causal, scale=q.shape[-1] ** -0.5)
        out.backward(go.to(dtype))
        runs[name] = (out, qq.grad, kk.grad, vv.grad)
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_fp64(dtype, causal):
    """Uneven sequences (odd sizes, Lq != Lk per sequence, empty on either side), GQA, and q read
    in place from a fused QKV projection: out and every gradient within the 2x rule."""
    lq, lk = [97, 0, 1, 129, 7, 300], [129, 5, 1, 97, 0, 257]
    q, cu_q = _packed(lq, 4, 64, dtype, fused=True)
    k, cu_k = _packed(lk, 2, 64, dtype)
    v = torch.randn_like(k)
    runs = _varlen_runs(q, k, v, cu_q, cu_k, causal)
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        ours, eager, ref = runs["ours"][i], runs["eager"][i], runs["ref"][i]
        assert torch.isfinite(ours).all(), f"{what}: not finite"
        err, base = _err(ours, ref), _err(eager, ref)
        assert err <= 2 * base + 1e-5, f"{what}: err {err:.3e} > 2 * eager {base:.3e} + 1e-5"
    out, dq, dk, dv = runs["ours"]
    assert (out[cu_q[4]:cu_q[5]] == 0).all() and (dq[cu_q[4]:cu_q[5]] == 0).all()  # sequence 4 has no key
    assert (dk[cu_k[1]:cu_k[2]] == 0).all() and (dv[cu_k[1]:cu_k[2]] == 0).all()  # sequence 1 has no query


def test_varlen_equals_padded_kernel_exactly():
    """The packed call and the padded call (key-padding mask) run the same tiles: same bits."""
    lens = [40, 128, 3]
    q, cu = _packed(lens, 2, 32, torch.float32, fused=True)
    k, _ = _packed(lens, 2, 32, torch.float32)
    v = torch.randn_like(k)
    out, lse = _C.attention_varlen_fwd_cpu(q, k, v, cu, cu, 128, 128, False, 0.2)
    for b, n in enumerate(lens):
        r = slice(int(cu[b]), int(cu[b + 1]))
        one, one_lse = _C.attention_fwd_cpu(*(t[r].transpose(0, 1)[None] for t in (q, k, v)), None, False, 0.2)
        assert torch.equal(out[r], one[0].transpose(0, 1)) and torch.equal(lse[:, r], one_lse[0])


BAD_CU = [
    (lambda cu: torch.tensor([1, 40, 171], dtype=torch.int32), "cu_seqlens_q must start at 0"),
    (lambda cu: torch.tensor([0, 140, 130, 171], dtype=torch.int32), "same length"),
    (lambda cu: torch.tensor([0, 131, 130], dtype=torch.int32), "non-decreasing"),
    (lambda cu: torch.tensor([0, 40, 170], dtype=torch.int32), r"cu_seqlens_q\[-1\] must equal the packed length 171"),
    (lambda cu: torch.tensor([0, 171, 171], dtype=torch.int32), "max_seqlen_q = 131 is smaller than sequence 0"),
    (lambda cu: cu.long(), "cu_seqlens_q must have dtype Int"),
]


@pytest.mark.parametrize("make,msg", BAD_CU)
def test_varlen_native_entry_validates_cu_seqlens(make, msg):
    """The _C entry reads cu_seqlens to index rows: bad values raise, never index out of bounds."""
    q, cu = _packed([40, 131], 2, 32, torch.float32)
    with pytest.raises((ValueError, TypeError), match=msg):
        _C.attention_varlen_fwd_cpu(q, q, q, make(cu), cu, 131, 131, False, 1.0)
    out, lse = _C.attention_varlen_fwd_cpu(q, q, q, cu, cu, 131, 131, False, 1.0)
    with pytest.raises(ValueError, match="lse must have shape"):
        _C.attention_varlen_bwd_cpu(out, q, q, q, out, lse[:, 1:], cu, cu, 131, 131, False, 1.0)


def test_varlen_validate_seqlens_false_skips_python_check_but_cpu_kernel_still_checks():
    q, cu = _packed([40, 131], 2, 32, torch.float32)
    with pytest.raises(ValueError, match="smaller than the longest sequence"):  # the Python check
        forkattn.attention_varlen(q, q, q, cu, cu, 100, 131, backend="cpu")
    with pytest.raises(ValueError, match="max_seqlen_q = 100 is smaller than sequence 1"):  # the C++ entry's
        forkattn.attention_varlen(q, q, q, cu, cu, 100, 131, backend="cpu", validate_seqlens=False)
    a = forkattn.attention_varlen(q, q, q, cu, cu, 131, 131, backend="cpu", validate_seqlens=False)
    torch.testing.assert_close(a, forkattn.attention_varlen(q, q, q, cu, cu, 131, 131, backend="cpu"), rtol=0, atol=0)
