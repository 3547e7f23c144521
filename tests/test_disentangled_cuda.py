"""The hand-written CUDA disentangled-attention kernels (backend "cuda", kernels/disentangled/).

GPU tests (@pytest.mark.gpu, run by scripts/gpu_check.sh) hold them to the 2x rule against fp64 for
out and every gradient (dq, dk, dv, dpos_key, dpos_query); the others run anywhere: registration
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


# --- anywhere ----------------------------------------------------------------------------------------

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
