"""Public API contract: bad inputs raise clear errors, ops pass opcheck and torch.compile,
build_info and the torch-version guard."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import forkattn
from attn_utils import make_padding, make_qkv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qkv(B=2, H=4, L=8, D=32, dtype=torch.float32):
    return make_qkv(B, H, H, L, L, D, dtype, requires_grad=False)


# --- bad inputs: each raises a Python exception naming the argument --------------------------------

def _bad_cases():
    q, k, v = qkv()
    m = make_padding(2, 8)
    return {
        "q rank": (dict(q=q[0]), ValueError, "q must be 4-D"),
        "k rank": (dict(k=k.flatten(0, 1)), ValueError, "k must be 4-D"),
        "batch mismatch": (dict(k=k[:1], v=v[:1]), ValueError, "batch sizes differ"),
        "heads mismatch": (dict(k=torch.randn(2, 3, 8, 32), v=torch.randn(2, 3, 8, 32)), ValueError, "multiple of k's and v's 3 heads"),
        "k/v heads differ": (dict(v=torch.randn(2, 2, 8, 32)), ValueError, "k and v must have the same heads"),
        "k/v length differ": (dict(v=torch.randn(2, 4, 9, 32)), ValueError, "k and v must have the same heads and length"),
        "head_dim mismatch": (dict(k=torch.randn(2, 4, 8, 64)), ValueError, "head_dim differs"),
        "dtype mismatch": (dict(k=k.half()), TypeError, "k must have q's dtype"),
        "integer q": (dict(q=torch.ones(2, 4, 8, 32, dtype=torch.int64)), TypeError, "q must be float32, float16 or bfloat16"),
        "integer v": (dict(v=torch.ones(2, 4, 8, 32, dtype=torch.int32)), TypeError, "v must be float32"),
        "not a tensor": (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
        "mask dtype": (dict(key_padding_mask=m.float()), TypeError, "key_padding_mask must have dtype torch.bool or an integer"),
        "mask values": (dict(key_padding_mask=m.long() * 2), ValueError, r"key_padding_mask must hold only 0 and 1"),
        "mask shape": (dict(key_padding_mask=m[:, :5]), ValueError, r"key_padding_mask must have shape \[batch, len_k\]"),
        "mask rank": (dict(key_padding_mask=m[:, None, None, :]), ValueError, "key_padding_mask must have shape"),
        "mask type": (dict(key_padding_mask=[True]), TypeError, "key_padding_mask must be a bool or integer 0/1 Tensor"),
        "meta device k": (dict(k=k.to("meta")), ValueError, "k must be on q's device"),
        "zero head_dim": (dict(q=torch.randn(2, 4, 8, 0), k=torch.randn(2, 4, 8, 0), v=torch.randn(2, 4, 8, 0)), ValueError, "head_dim must be at least 1"),
        "causal not bool": (dict(causal=1), TypeError, "causal must be a bool"),
        "scale nan": (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
        "scale bool": (dict(scale=True), TypeError, "scale must be a real number"),
        "scale string": (dict(scale="0.5"), TypeError, "scale must be a real number"),
        "scale complex": (dict(scale=0.5j), TypeError, "scale must be a real number"),
        "scale bool tensor": (dict(scale=torch.tensor(True)), TypeError, "scale must be a real number"),
        "scale 1-d tensor": (dict(scale=torch.tensor([0.5])), ValueError, "scale must be a number or a 0-d tensor"),
        "scale inf tensor": (dict(scale=torch.tensor(float("inf"))), ValueError, "scale must be a finite number"),
        "unknown backend": (dict(backend="flash"), ValueError, "unknown backend 'flash'"),
        "cpu head_dim": (dict(q=torch.randn(2, 4, 8, 512), k=torch.randn(2, 4, 8, 512), v=torch.randn(2, 4, 8, 512), backend="cpu"),
                         forkattn.BackendUnavailableError, "head_dim must be at most 256"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input(case):
    kwargs, exc, msg = _bad_cases()[case]
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        forkattn.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("scale", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64),
                                   torch.tensor(2), 0.5, 2], ids=repr)
@pytest.mark.parametrize("fn", ["attention", "attention_varlen"])
def test_real_scalar_scales_are_accepted(scale, fn):
    """NumPy scalars and 0-d real tensors are real numbers (issue 12, section 6)."""
    q, k, v = qkv()
    want = forkattn.attention(q, k, v, scale=float(scale), backend="eager")
    if fn == "attention":
        got = forkattn.attention(q, k, v, scale=scale, backend="eager")
    else:
        B, H, L, D = q.shape
        cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32)
        packed = [t.transpose(1, 2).reshape(B * L, H, D) for t in (q, k, v)]
        got = forkattn.attention_varlen(*packed, cu, cu, L, L, scale=scale, backend="eager")
        got = got.reshape(B, L, H, D).transpose(1, 2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("scale", [True, np.bool_(True)], ids=repr)
def test_bool_scale_is_refused_by_varlen(scale):
    q = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(TypeError, match="scale must be a real number"):
        forkattn.attention_varlen(q, q, q, cu, cu, 8, 8, scale=scale)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_integer_key_padding_mask(dtype, backend):
    """transformers' int64 attention_mask (1 = attend) works as key_padding_mask."""
    q, k, v = qkv()
    mask = make_padding(2, 8, fully_padded=(1,))
    want = forkattn.attention(q, k, v, key_padding_mask=mask, backend=backend)
    torch.testing.assert_close(forkattn.attention(q, k, v, key_padding_mask=mask.to(dtype), backend=backend), want)


def test_unavailable_backend_says_why():
    q, k, v = qkv()
    reg = forkattn.backends.get("attention")
    if "cuda" in reg.backends:
        with pytest.raises(forkattn.BackendUnavailableError, match="backend 'cuda' cannot run this call"):
            forkattn.attention(q, k, v, backend="cuda")
    else:
        with pytest.raises(ValueError, match="unknown backend 'cuda'"):
            forkattn.attention(q, k, v, backend="cuda")
    if "triton" in reg.backends and reg.why_not("triton", "cpu", dtype=q.dtype, head_dim=32):
        with pytest.raises(forkattn.BackendUnavailableError, match="triton"):
            forkattn.attention(q, k, v, backend="triton")


def test_native_op_checks_arguments_too():
    """The C++ entry points validate on their own (they are reachable without the Python checks)."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        forkattn._native._C.attention_fwd_cpu(q, k[0], v, None, False, 1.0)
    with pytest.raises(ValueError, match="v must have stride 1 in its last dimension"):
        forkattn._native._C.attention_fwd_cpu(q, k, v.transpose(2, 3), None, False, 1.0)
    with pytest.raises(TypeError, match="key_padding_mask must have dtype Bool"):
        forkattn._native._C.attention_fwd_cpu(q, k, v, torch.ones(2, 8), False, 1.0)
    with pytest.raises(ValueError, match=r"key_padding_mask.size\(1\) must be 8"):
        forkattn._native._C.attention_fwd_cpu(q, k, v, torch.ones(2, 9, dtype=torch.bool), False, 1.0)
    out, lse = forkattn._native._C.attention_fwd_cpu(q, k, v, None, False, 1.0)
    with pytest.raises(ValueError, match="lse must have shape"):
        forkattn._native._C.attention_bwd_cpu(out, q, k, v, out, lse[:, :1], None, False, 1.0)
    with pytest.raises(TypeError, match="dout must have q's dtype"):
        forkattn._native._C.attention_bwd_cpu(out.double(), q, k, v, out, lse, None, False, 1.0)


def test_native_varlen_backward_reports_the_callers_shapes():
    """The varlen backward's messages show [heads, total_q] and [total_q, heads, head_dim], not the
    [1, H, total, D] views it checks internally (issue 12, section 6)."""
    q = torch.randn(10, 4, 32)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out, lse = forkattn._native._C.attention_varlen_fwd_cpu(q, q, q, cu, cu, 7, 7, False, 1.0)
    with pytest.raises(ValueError, match=r"lse must have shape \[heads, total_q\] = \[4, 10\], got \[4, 9\]"):
        forkattn._native._C.attention_varlen_bwd_cpu(out, q, q, q, out, lse[:, :9], cu, cu, 7, 7, False, 1.0)
    with pytest.raises(ValueError, match=r"dout must have q's shape \[total_q, heads, head_dim\] = \[10, 4, 32\], got \[10, 4, 16\]"):
        forkattn._native._C.attention_varlen_bwd_cpu(out[..., :16], q, q, q, out, lse, cu, cu, 7, 7, False, 1.0)


# --- custom ops: opcheck and torch.compile -----------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(causal, masked):
    from forkattn.attention import attention_bwd, attention_fwd

    q, k, v = make_qkv(2, 4, 2, 9, 13, 32, torch.float32)
    m = make_padding(2, 13, fully_padded=(1,)) if masked else None
    torch.library.opcheck(attention_fwd, (q, k, v, m, causal, 0.2, "cpu"))
    out, lse = attention_fwd(q, k, v, m, causal, 0.2, "cpu")
    dout = torch.randn_like(out)
    torch.library.opcheck(attention_bwd, (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, m, causal, 0.2, "cpu"))


def test_torch_compile_fullgraph():
    def block(x, wq, wk, wv, mask):
        B, L, _ = x.shape
        q = (x @ wq).view(B, L, 4, 16).transpose(1, 2)
        k = (x @ wk).view(B, L, 2, 16).transpose(1, 2)
        v = (x @ wv).view(B, L, 2, 16).transpose(1, 2)
        o = forkattn.attention(q, k, v, key_padding_mask=mask, causal=True)
        return o.transpose(1, 2).reshape(B, L, 64).sum()

    x = torch.randn(2, 11, 64)
    ws = [torch.randn(64, n, requires_grad=True) for n in (64, 32, 32)]
    mask = make_padding(2, 11)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(x, *ws, mask)
    got.backward()
    grads = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    want = block(x, *ws, mask)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, w in zip(grads, ws):
        torch.testing.assert_close(a, w.grad)


# --- build info and the torch-version guard -----------------------------------------------------------

def test_build_info():
    info = forkattn.build_info()
    assert {"version", "torch", "cuda", "archs", "backends"} <= set(info)
    assert info["version"] == forkattn.__version__
    assert info["torch"] == torch.__version__
    assert {"eager", "cpu"} <= set(info["backends"])
    if info["cuda"] is None:
        assert info["archs"] is None and "cuda" not in info["backends"]
    # compiled vs usable now: a CUDA build on a machine without a GPU compiles cuda, cannot use it
    assert info["compiled"] == (["cpu"] if info["cuda"] is None else ["cpu", "cuda"])
    assert ("cuda" in info["backends"]) == (info["cuda"] is not None and torch.cuda.is_available())


def test_import_against_other_torch_raises_importerror():
    code = (
        "import sys, torch; torch.__version__ = '0.0.1'\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'python')!r})\n"
        "try:\n    import forkattn\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORTERROR forkattn was built against torch" in r.stdout, r.stdout + r.stderr
    assert "pip install --no-build-isolation -e ." in r.stdout
