"""The "triton" backend of forkattn.disentangled_attention (forkattn/triton/disentangled.py).

On CPU these run the kernels in Triton's interpreter (TRITON_INTERPRET=1) on a curated matrix of
small odd sizes (the interpreter costs seconds per call): float32 and float16, and bfloat16 once,
through the kernels' interpreter upcast (the 3.6 interpreter's bf16 tl.dot is wrong, and its
float32 -> bf16 cast truncates; the launcher stages bf16 results in float32 there). The gpu-marked
test runs DeBERTa-v3-base shapes in float16/bfloat16 on a CUDA device (scripts/gpu_check.sh).

Rule: against float64, our max error <= 2 x (PyTorch eager's in the same dtype) + 1e-5, for the
output and the gradients into q, k, v, pos_key and pos_query (test_disentangled._check).
"""
import os
import subprocess
import sys

import pytest
import torch

import forkattn
import forkattn.triton as ftriton
from attn_utils import make_padding
from test_disentangled import TERMS, _check, _inputs

pytestmark = pytest.mark.skipif(
    ftriton.unavailable_reason() is not None, reason=f"triton backend unavailable: {ftriton.unavailable_reason()}")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _padding(B, L, nan, inputs, device=DEV):
    """A key padding mask with batch 1 fully padded (an empty row) when B > 1 and a hole before the
    first valid key of batch 0; with nan, NaN written into k and v at every padded key."""
    mask = make_padding(B, L, fully_padded=(1,) if B > 1 else (), generator=torch.Generator().manual_seed(L))
    mask[0, : min(3, L - 1)] = False
    mask = mask.to(device)
    q, k, v, pk, pq = inputs
    if nan:
        pad = ~mask[:, None, :, None]
        k, v = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan"))
    return mask, (q, k, v, pk, pq)


def compare(B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, mask=None, pos_heads=None, scale=None, device=DEV):
    c2p, p2c = TERMS[terms]
    span = buckets if buckets > 0 else max_rel
    inputs = [t.to(device) for t in _inputs(B, H, Lq, Lk, D, span, dtype, pos_heads=pos_heads, seed=Lq + 7 * Lk)]
    kpm = None
    if mask is not None:
        kpm, inputs = _padding(B, Lk, mask == "nan", inputs, device)
    out, grads = _check("triton", *inputs, max_relative_positions=max_rel, position_buckets=buckets,
                        key_padding_mask=kpm, scale=scale, c2p=c2p, p2c=p2c)
    if kpm is not None:
        empty = ~kpm.any(1)
        assert not out[empty].any(), "a row with no visible key must give zeros"
        assert not grads["dq"][empty].any(), "a row with no visible key must get zero gradients"
        pad = ~kpm[:, None, :, None].expand_as(grads["dk"])
        assert not grads["dk"][pad].any() and not grads["dv"][pad].any(), "padded keys get exactly zero gradients"
    return out, grads


# (B, H, Lq, Lk, D, dtype, terms, position_buckets, max_relative_positions, mask, pos heads). The
# interpreter runs 64x32 forward / dQ and 32x64 dK/dV tiles, so 97 and 129 cross several blocks
# both ways. Position tables covered: plain and clamped at ±span (several diagonals of a tile on one
# row: the atomics must add them all), DeBERTa-v3's 256 buckets of 512 positions, log buckets past
# |i - j| = 8, and a table that skips rows (max_relative_positions just above position_buckets // 2).
CASES = [
    (1, 2, 1, 1, 32, F32, "c2p+p2c", -1, 8, None, None),
    (2, 2, 7, 7, 64, F16, "c2p", -1, 4, None, None),
    (2, 2, 97, 97, 32, F32, "c2p+p2c", 256, 512, "nan", None),
    (1, 2, 129, 129, 32, F16, "p2c", -1, 8, None, None),
    (1, 1, 129, 97, 128, F32, "c2p+p2c", 16, 40, "pad", 1),
    (2, 2, 7, 129, 64, F16, "c2p", 256, 512, "nan", None),
    (1, 2, 97, 33, 48, F32, "c2p+p2c", 16, 10, None, None),  # head_dim 48: a masked 64-wide block
    (1, 2, 33, 97, 64, F16, "c2p+p2c", 16, 40, "pad", 1),
]


@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,terms,buckets,max_rel,mask,pos_heads", CASES)
def test_matches_fp64_reference(B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, mask, pos_heads):
    compare(B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, mask, pos_heads)


@pytest.mark.parametrize("Lq,Lk,B", [(0, 0, 2), (3, 0, 2), (0, 4, 2), (3, 3, 0)])
def test_empty_shapes(Lq, Lk, B):
    """No key: zeros and zero gradients; nothing to compute: empty outputs; the backward runs."""
    q, k, v, pk, pq = _inputs(max(B, 1), 2, Lq, Lk, 32, 4, F32)
    q, k, v = (t[:B].to(DEV).requires_grad_() for t in (q, k, v))
    pk, pq = pk.to(DEV).requires_grad_(), pq.to(DEV).requires_grad_()
    out = forkattn.disentangled_attention(q, k, v, pk, pq, max_relative_positions=4, backend="triton")
    assert out.shape == (B, 2, Lq, 32) and not out.any()
    out.sum().backward()
    assert not q.grad.any() and not pk.grad.any() and not pq.grad.any()


def test_bf16_upcast_path_in_interpreter():
    """bf16 loads, stores and casts, and the interpreter's upcast (GPU bf16 dots: the gpu test)."""
    compare(2, 2, 37, 37, 32, BF16, "c2p+p2c", -1, 8, "nan")


def test_padded_keys_content_never_matters():
    """NaN, inf or anything in padded k / v changes no output and no gradient, bit for bit."""
    B, H, L, D, span = 2, 2, 40, 32, 8
    q, k, v, pk, pq = _inputs(B, H, L, L, D, span, F32, seed=11)
    kpm, (_, k_nan, v_nan, _, _) = _padding(B, L, True, (q, k, v, pk, pq), "cpu")
    pad = ~kpm[:, None, :, None]
    kw = dict(max_relative_positions=span, key_padding_mask=kpm.to(DEV), backend="triton")
    results = []
    for kk, vv in ((k_nan, v_nan), (k.masked_fill(pad, float("inf")), v.masked_fill(pad, -1e30)),
                   (k.masked_fill(pad, 0), v.masked_fill(pad, 0))):
        leaves = [t.to(DEV).requires_grad_() for t in (q, kk, vv, pk, pq)]
        out = forkattn.disentangled_attention(*leaves, **kw)
        results.append([out] + list(torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_lse_and_empty_rows():
    """The forward's lse (natural log, float32) matches float64 scores; a row with no key: +inf.
    pos_key / pos_query as the models make them: [2 span, H, D] projections seen as [H, 2 span, D]."""
    from forkattn.triton.disentangled import disentangled_fwd

    B, H, L, D, span = 2, 2, 33, 32, 8
    q, k, v, _, _ = (t.to(DEV) for t in _inputs(B, H, L, L, D, span, F32, seed=4))
    pk, pq = (torch.randn(2 * span, H, D, device=DEV).transpose(0, 1) for _ in range(2))
    kpm, _ = _padding(B, L, False, (q, k, v, pk, pq))
    table = forkattn.disentangled.relative_position_index(L, L, max_relative_positions=span, device=DEV)
    out, lse = disentangled_fwd(q, k, v, pk, pq, table, kpm, 0.2, True, True)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    delta = table.cpu()[i - j + L - 1]
    q64, k64, pk64, pq64 = (t.double().cpu() for t in (q, k, pk, pq))
    s = q64 @ k64.transpose(-1, -2) + torch.einsum("bhid,hijd->bhij", q64, pk64[:, delta])
    s = (s + torch.einsum("bhjd,hijd->bhij", k64, pq64[:, delta])) * 0.2
    ref = torch.logsumexp(s.masked_fill(~kpm.cpu()[:, None, None, :], float("-inf")), -1)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert (lse.cpu().double()[finite] - ref[finite]).abs().max() < 1e-5
    assert not out[1].any()


def test_custom_op_opcheck():
    """forkattn::disentangled_attention_fwd with backend "triton": schema, fake, autograd registration."""
    q, k, v, pk, pq = (t.to(DEV) for t in _inputs(2, 2, 7, 7, 32, 4, F32, seed=9))
    table = forkattn.disentangled.relative_position_index(7, 7, max_relative_positions=4, device=DEV)
    mask = make_padding(2, 7, generator=torch.Generator().manual_seed(1)).to(DEV)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, pq.requires_grad_(), table, mask,
            0.2, False, True, "triton")
    torch.library.opcheck(torch.ops.forkattn.disentangled_attention_fwd.default, args)


def test_import_does_not_load_triton():
    code = ("import sys, forkattn; print('triton' in sys.modules, "
            "'forkattn.triton.disentangled' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.dirname(__file__)), "python"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


# --- GPU: DeBERTa-v3-base shapes, fp16/bf16 --------------------------------------------------------
# Fixed configs (FORKATTN_TRITON_AUTOTUNE=0): one compile per kernel and case, so the cases fit
# gpu_check.sh's time; the autotuned configs run in its DeBERTa benchmark step.

GPU_CASES = [
    (4, 12, 512, 512, 64, F16, "c2p+p2c", 256, 512, "nan"),
    (4, 12, 512, 512, 64, BF16, "c2p+p2c", 256, 512, "nan"),
    (2, 8, 129, 300, 128, F16, "p2c", 64, 128, "pad"),
    (2, 4, 300, 97, 32, BF16, "c2p", -1, 64, "pad"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,terms,buckets,max_rel,mask", GPU_CASES)
def test_gpu_full_sizes(B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, mask, monkeypatch):
    monkeypatch.setenv("FORKATTN_TRITON_AUTOTUNE", "0")
    compare(B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, mask, device="cuda")
