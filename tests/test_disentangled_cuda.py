"""The hand-written CUDA disentangled-attention kernels (backend "cuda", kernels/disentangled/).

GPU tests (@pytest.mark.gpu, run by scripts/gpu_check.sh) hold them to the 2x rule against fp64 for
out and every gradient (dq, dk, dv, dpos_key, dpos_query), with and without attention dropout (the
reference fed the same Philox mask; the mask bit for bit philox.py's and the CPU kernel's); the
others run anywhere: registration
and dispatch, the generated instantiation files. Without a GPU the kernels are checked by
tests/test_disentangled_cuda_emulation.py."""
import os
import subprocess
import sys

import pytest
import torch

import forkattn
from test_disentangled import TERMS, _check, _inputs
from test_disentangled_triton import _padding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F16, BF16 = torch.float16, torch.bfloat16
FAMILY = forkattn.backends.get("disentangled_attention")


def _needs_cuda_backend():
    why = FAMILY.why_not("cuda", "cuda", dtype=F16, head_dim=64)
    if why:
        pytest.skip(why)


def compare(B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, mask=None, pos_heads=None):
    c2p, p2c = TERMS[terms]
    span = buckets if buckets > 0 else max_rel
    inputs = [t.cuda() for t in _inputs(B, H, Lq, Lk, D, span, dtype, pos_heads=pos_heads, seed=Lq + 7 * Lk)]
    kpm = None
    if mask is not None:
        kpm, inputs = _padding(B, Lk, mask == "nan", inputs, "cuda")
    out, grads = _check("cuda", *inputs, max_relative_positions=max_rel, position_buckets=buckets,
                        key_padding_mask=kpm, c2p=c2p, p2c=p2c)
    if kpm is not None:
        empty = ~kpm.any(1)
        assert not out[empty].any(), "a row with no visible key must give zeros"
    return out, grads


# (B, H, Lq, Lk, D, dtype, terms, position_buckets, max_relative_positions, mask, pos heads): odd
# sizes across the 64-row tiles both ways, every term subset and head_dim, DeBERTa-v3-base's shape.
GPU_CASES = [
    (1, 2, 1, 1, 32, F16, "c2p+p2c", -1, 8, None, None),
    (2, 2, 7, 97, 64, BF16, "c2p", -1, 4, "nan", None),
    (2, 2, 97, 7, 64, F16, "p2c", 8, 20, "pad", 1),
    (1, 2, 129, 1025, 128, F16, "c2p+p2c", 16, 40, "nan", None),
    (1, 2, 1025, 129, 32, BF16, "c2p+p2c", 256, 512, None, None),
    (4, 12, 512, 512, 64, F16, "c2p+p2c", 256, 512, "nan", None),
    (4, 12, 512, 512, 64, BF16, "c2p+p2c", 256, 512, "nan", None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,terms,buckets,max_rel,mask,pos_heads", GPU_CASES)
def test_gpu_matches_fp64(B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, mask, pos_heads):
    _needs_cuda_backend()
    compare(B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, mask, pos_heads)


@pytest.mark.gpu
def test_gpu_padded_keys_content_never_matters():
    _needs_cuda_backend()
    q, k, v, pk, pq = (t.cuda() for t in _inputs(2, 2, 70, 90, 64, 8, F16, seed=3))
    mask = torch.rand(2, 90, device="cuda") > 0.4
    kw = dict(max_relative_positions=8, key_padding_mask=mask, backend="cuda")
    a = forkattn.disentangled_attention(q, k, v, pk, pq, **kw)
    pad = ~mask[:, None, :, None]
    b = forkattn.disentangled_attention(q, k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf")), pk, pq,
                                        **kw)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_bad_rel_index_is_a_clear_error():
    _needs_cuda_backend()
    from forkattn import _native

    q = torch.randn(1, 1, 5, 32, device="cuda", dtype=F16)
    pos = torch.randn(1, 4, 32, device="cuda", dtype=F16)
    table = torch.full((9,), 4, dtype=torch.int64, device="cuda")  # row 4 of 4 rows
    with pytest.raises(ValueError, match="rel_index"):
        _native._C.disentangled_attention_fwd_cuda(q, q, q, pos, pos, table, None, 0.1, True, True)


# --- attention dropout (the kernels' DROPOUT instantiations) ---------------------------------------
# (B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, mask, p): every head_dim (D128's dk/dv kernel
# sweeps four column blocks with dropout), fp16 and bf16, odd sizes with Lq != Lk, NaN in padded
# keys with an empty row, each term subset, DeBERTa-v3-base's shape.
GPU_DROPOUT_CASES = [
    (2, 2, 7, 97, 32, F16, "c2p+p2c", 8, 20, "nan", 0.3),
    (2, 2, 97, 7, 64, BF16, "c2p", -1, 4, "nan", 0.1),
    (1, 2, 129, 1025, 128, F16, "p2c", 16, 40, "nan", 0.5),
    (1, 2, 1025, 129, 128, BF16, "c2p+p2c", 256, 512, None, 0.2),
    (4, 12, 512, 512, 64, F16, "c2p+p2c", 256, 512, "nan", 0.1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,terms,buckets,max_rel,mask,p", GPU_DROPOUT_CASES)
def test_gpu_dropout_matches_fp64_with_the_same_mask(B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, mask, p):
    """out and dq, dk, dv, dpos_key, dpos_query against the float64 reference fed the same Philox
    mask (reference.disentangled_attention with the seed), under the 2x rule against eager's."""
    _needs_cuda_backend()
    c2p, p2c = TERMS[terms]
    span = buckets if buckets > 0 else max_rel
    inputs = [t.cuda() for t in _inputs(B, H, Lq, Lk, D, span, dtype, seed=Lq + 7 * Lk)]
    kpm = None
    if mask is not None:
        kpm, inputs = _padding(B, Lk, mask == "nan", inputs, "cuda")
    out, grads = _check("cuda", *inputs, max_relative_positions=max_rel, position_buckets=buckets, key_padding_mask=kpm,
                        c2p=c2p, p2c=p2c, dropout_p=p, seed=-(2 ** 40) + Lq)
    assert not out.isnan().any() and not any(g.isnan().any() for g in grads.values())
    if kpm is not None:
        empty = ~kpm.any(1)
        assert not out[empty].any() and not grads["dq"][empty].any(), "an empty row: zeros, zero gradients"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_gpu_dropout_mask_is_philox_and_the_cpu_kernels(dtype):
    """q = 0 and pos_query = 0 make P uniform over the visible keys; V = I (Lk = D = 64) makes out[i, j]
    = P_ij keep_ij / (1 - p): nonzero exactly where philox.dropout_keep keeps (and the CPU kernel's
    output for the same seed is); lse is the undropped softmax's."""
    _needs_cuda_backend()
    from forkattn import _native, philox

    B, H, Lq, Lk, p, seed = 2, 3, 45, 64, 0.3, 2 ** 63 - 12345
    g = torch.Generator().manual_seed(5)
    q = torch.zeros(B, H, Lq, Lk)
    k = torch.randn(B, H, Lk, Lk, generator=g)
    v = torch.eye(Lk).expand(B, H, Lk, Lk).contiguous()
    pk, pq = torch.randn(H, 16, Lk, generator=g), torch.zeros(H, 16, Lk)
    kpm = torch.ones(B, Lk, dtype=torch.bool)
    kpm[1, 50:] = False
    table = forkattn.disentangled.relative_position_index(Lq, Lk, max_relative_positions=8)
    keep = philox.dropout_keep(seed, p, B, H, Lq, Lk) & kpm[:, None, None, :]
    cpu, _ = _native._C.disentangled_attention_fwd_cpu(q, k, v, pk, pq, table, kpm, 1.0, True, True, p, seed)
    dev = [t.to("cuda", dtype) for t in (q, k, v, pk, pq)]
    ours, lse = _native._C.disentangled_attention_fwd_cuda(*dev, table.cuda(), kpm.cuda(), 1.0, True, True, p, seed)
    _, plain_lse = _native._C.disentangled_attention_fwd_cuda(*dev, table.cuda(), kpm.cuda(), 1.0, True, True)
    assert torch.equal(ours.cpu() != 0, keep) and torch.equal(cpu != 0, keep)
    assert torch.equal(lse, plain_lse)


@pytest.mark.gpu
def test_gpu_dropout_seeds_and_p_zero():
    """Same seed: the same output and gradients (dpos up to the atomics' order); another seed:
    another mask; p = 0 with a seed: exactly the call without dropout."""
    _needs_cuda_backend()
    inputs = [t.cuda() for t in _inputs(1, 2, 70, 90, 64, 8, F16, seed=4)]

    def run(**drop):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = forkattn.disentangled_attention(*leaves, max_relative_positions=8, backend="cuda", **drop)
        return [out] + list(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    a, b, c = run(dropout_p=0.3, seed=1), run(dropout_p=0.3, seed=1), run(dropout_p=0.3, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4]))
    assert not torch.equal(a[0], c[0])
    assert torch.equal(run(dropout_p=0.0, seed=1)[0], run()[0])


# --- anywhere ----------------------------------------------------------------------------------------

def test_cuda_backend_declares_dropout():
    """The kernels draw the mask themselves: a CUDA dropout call is theirs, not routed to Triton."""
    b = FAMILY.backends["cuda"]
    assert "dropout" in b.FEATURES
    assert b.supports(device_type="cuda", features=("key_padding", "c2p", "p2c", "dropout")) is None


def test_cuda_backend_is_registered_with_the_family():
    b = FAMILY.backends["cuda"]
    assert b.SUPPORTED_DTYPES == (F16, BF16) and tuple(b.HEAD_DIMS) == (32, 64, 128)
    assert {"key_padding", "c2p", "p2c"} <= set(b.FEATURES)


def test_cuda_backend_names_why_it_cannot_run_here():
    why = FAMILY.why_not("cuda", "cuda", dtype=F16, head_dim=64)
    if torch.cuda.is_available() and forkattn.build_info().get("cuda"):
        assert why is None
    else:
        assert why and ("CUDA" in why or "cuda" in why)
    assert FAMILY.why_not("cuda", "cuda", dtype=torch.float32, head_dim=64)  # fp16/bf16 only
    assert FAMILY.why_not("cuda", "cuda", dtype=F16, head_dim=48)  # 32 / 64 / 128 only


def test_generated_instantiations_are_up_to_date():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "disentangled", "generate_kernels.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
