"""The "triton" backend of forkattn.attention / forkattn.attention_varlen.

On CPU these run the kernels in Triton's interpreter (CI exports TRITON_INTERPRET=1) at small
odd sizes, in float32 and float16 (the 3.6 interpreter's bf16 tl.dot is wrong; the kernels upcast
bf16 there, which one test covers). Tests marked gpu run the same checks at full sizes in
float16/bfloat16 on a CUDA device.

Rule: against a float64 reference, our max error <= 2 x (PyTorch eager's error in the same dtype)
+ 1e-5, for the output and every gradient.
"""
import os
import subprocess
import sys

import pytest
import torch

import forkattn
import forkattn.triton as ftriton
from forkattn import reference
from forkattn.attention import attention_fwd, attention_varlen_fwd
from forkattn.reference import attention_varlen

pytestmark = pytest.mark.skipif(
    ftriton.unavailable_reason() is not None, reason=f"triton backend unavailable: {ftriton.unavailable_reason()}"
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _mask(kind, B, Lk, device):
    if kind is None:
        return None
    if kind == "random":
        m = torch.rand(B, Lk, device=device) > 0.3
        m[:, -1] = True
        return m
    # right padding (BERT): batch b keeps its first n_b keys; "full" makes batch 0 all padding
    lens = torch.randint(1, Lk + 1, (B,)).tolist()
    if kind == "pad_full":
        lens[0] = 0
    return torch.arange(Lk, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]


def _run(fn, inputs, dout):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*ins)
    grads = torch.autograd.grad(out, ins, dout.to(out.dtype))
    return [out.detach()] + [g.detach() for g in grads]


def _check(ours, eager, exact, names=("out", "dq", "dk", "dv")):
    for name, a, e, x in zip(names, ours, eager, exact):
        assert a.shape == x.shape, f"{name}: shape {tuple(a.shape)} != {tuple(x.shape)}"
        assert not torch.isnan(a).any(), f"{name}: {int(torch.isnan(a).sum())} NaN"
        err = (a.double() - x).abs().max().item() if a.numel() else 0.0
        budget = 2 * ((e.double() - x).abs().max().item() if e.numel() else 0.0) + 1e-5
        assert err <= budget, f"{name}: max error {err:.3e} > 2 x eager's + 1e-5 = {budget:.3e}"


def compare(B, H, Hkv, Lq, Lk, D, *, causal, mask, dtype, device=DEV, strided=False, scale=None):
    def make(h, L):
        if strided:  # a [B, L, h, 2D] buffer, used through a [B, h, L, D] view: no copy
            return torch.randn(B, L, h, 2 * D, device=device, dtype=dtype)[..., D:].transpose(1, 2)
        return torch.randn(B, h, L, D, device=device, dtype=dtype)

    q, k, v = make(H, Lq), make(Hkv, Lk), make(Hkv, Lk)
    kpm = _mask(mask, B, Lk, device)
    dout = torch.randn(B, H, Lq, D, device=device, dtype=torch.float64)
    ours = _run(lambda q, k, v: forkattn.attention(
        q, k, v, causal=causal, key_padding_mask=kpm, scale=scale, backend="triton"), (q, k, v), dout)
    ref = lambda q, k, v: reference.attention(q, k, v, causal=causal, key_padding_mask=kpm, scale=scale)  # noqa: E731
    eager = _run(ref, (q, k, v), dout)
    exact = _run(ref, (q.double(), k.double(), v.double()), dout)
    _check(ours, eager, exact)
    return ours


# (B, H, Hkv, Lq, Lk, D, causal, mask, dtype): odd sizes crossing the interpreter's 64x32 / 32x64
# blocks, Lq != Lk both ways (causal bottom-right: Lq > Lk leaves rows with no key), GQA/MQA,
# padding incl. a fully padded sequence, head_dim 32/64/128/256 and padded 8 and 48.
CASES = [
    (1, 2, 2, 1, 1, 32, False, None, torch.float32),
    (2, 2, 1, 7, 33, 32, True, None, torch.float32),
    (1, 2, 2, 97, 33, 32, True, "pad", torch.float16),
    (2, 3, 1, 33, 97, 64, False, "pad_full", torch.float32),
    (1, 2, 2, 129, 129, 32, True, None, torch.float16),
    (1, 2, 2, 129, 7, 32, False, "random", torch.float32),
    (1, 1, 1, 33, 7, 128, False, "random", torch.float32),
    (1, 2, 1, 7, 97, 64, True, "random", torch.float16),
    (1, 2, 2, 33, 33, 48, True, "pad", torch.float32),
    (1, 2, 2, 65, 65, 128, True, None, torch.float16),
    (2, 4, 2, 33, 33, 64, True, "pad_full", torch.float16),
    (1, 1, 1, 7, 7, 8, True, None, torch.float32),  # D < 16: the block's 16 columns, masked
    (1, 1, 1, 7, 33, 256, False, "random", torch.float16),
]


@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,D,causal,mask,dtype", CASES)
def test_matches_fp64_reference(B, H, Hkv, Lq, Lk, D, causal, mask, dtype):
    compare(B, H, Hkv, Lq, Lk, D, causal=causal, mask=mask, dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_inputs(causal):
    compare(2, 2, 1, 33, 40, 32, causal=causal, mask="pad", dtype=torch.float32, strided=True, scale=0.3)


def test_bf16_upcast_path_in_interpreter():
    """bf16 loads/stores/casts and the kernels' interpreter upcast (GPU bf16 dots: the gpu tests)."""
    compare(1, 2, 1, 33, 33, 32, causal=True, mask="pad", dtype=torch.bfloat16)


def test_lse_and_empty_rows():
    B, H, Lq, Lk, D = 2, 2, 33, 20, 32
    q, k, v = (torch.randn(B, H, L, D, device=DEV) for L in (Lq, Lk, Lk))
    kpm = torch.ones(B, Lk, dtype=torch.bool, device=DEV)
    kpm[1] = False
    out, lse = attention_fwd(q, k, v, kpm, True, D ** -0.5, "triton")
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    allowed = reference.visible_keys(B, Lq, Lk, causal=True, key_padding_mask=kpm, device=q.device)
    expect = s.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    empty = ~allowed.any(-1).expand(B, H, Lq)
    assert empty[0, :, : Lq - Lk].all() and empty[1].all() and not empty[0, :, Lq - Lk:].any()
    assert torch.isposinf(lse[empty]).all(), "rows with no visible key must have lse = +inf"
    assert (lse[~empty].double() - expect[~empty]).abs().max() < 1e-5
    assert (out[empty] == 0).all(), "rows with no visible key must be zeros"
    # the op contract: out in [B, Lq, H, D] memory
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("causal", [False, True])
def test_every_output_element_written(causal):
    """Poisoned (NaN) buffers through the launchers: every element of out, lse, dq, dk, dv written,
    including fully padded sequences, rows that see no key, and key blocks that are all padding."""
    from forkattn.attention import empty_bhld
    from forkattn.triton import attention as ta

    B, H, Hkv, Lq, Lk, D = 2, 2, 1, 40, 70, 32
    q = torch.randn(B, H, Lq, D, device=DEV)
    k, v = (torch.randn(B, Hkv, Lk, D, device=DEV) for _ in range(2))
    kpm = torch.zeros(B, Lk, dtype=torch.bool, device=DEV)
    kpm[1, 5:9] = True  # batch 0 all padding; batch 1: one live key block, others all padding
    seq = ta._Seq(B, Lq, Lk, Lq, Lk)
    out = empty_bhld(q, B, H, Lq, D).fill_(float("nan"))
    lse = torch.full((B, H, Lq), float("nan"), device=DEV)
    ta._fwd(q, k, v, out, lse, seq, kpm, causal, D ** -0.5)
    assert not out.isnan().any() and not lse.isnan().any()
    grads = [empty_bhld(t, B, t.shape[1], t.shape[2], D).fill_(float("nan")) for t in (q, k, v)]
    ta._bwd(torch.randn_like(out), q, k, v, out, lse, *grads, seq, kpm, causal, D ** -0.5)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert not g.isnan().any(), f"{name}: {int(g.isnan().sum())} elements never written"
    assert (grads[1][0] == 0).all() and (grads[1][1][:, :5] == 0).all() and (grads[1][1][:, 9:] == 0).all()


def test_no_keys_and_no_queries():
    q = torch.randn(1, 2, 5, 32, device=DEV, requires_grad=True)
    k = torch.randn(1, 2, 0, 32, device=DEV, requires_grad=True)
    out = forkattn.attention(q, k, k, backend="triton")
    assert out.shape == (1, 2, 5, 32) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    e = forkattn.attention(q[:, :, :0], q, q, backend="triton")
    assert e.shape == (1, 2, 0, 32)


# --- varlen --------------------------------------------------------------------------------------

def _pack(lens, H, D, dtype, device=DEV):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return torch.randn(sum(lens), H, D, dtype=dtype, device=device), cu


def _rows(cu, b):
    return slice(int(cu[b]), int(cu[b + 1]))


def test_varlen_equals_padded_attention():
    """Non-causal: one padded batch (queries padded, keys masked) gives each sequence's rows."""
    lq, lk = [7, 0, 33, 1], [5, 9, 33, 0]
    H, Hkv, D = 2, 1, 32
    q, cu_q = _pack(lq, H, D, torch.float32)
    k, cu_k = _pack(lk, Hkv, D, torch.float32)
    v = torch.randn_like(k)
    dout = torch.randn(q.shape, dtype=torch.float64, device=DEV)
    ours = _run(lambda q, k, v: forkattn.attention_varlen(
        q, k, v, cu_q, cu_k, max(lq), max(lk), backend="triton"), (q, k, v), dout)

    B, Mq, Mk = len(lq), max(lq), max(lk)
    def pad(t, cu, M):
        p = t.new_zeros(B, M, *t.shape[1:])
        for b in range(B):
            p[b, : cu[b + 1] - cu[b]] = t[_rows(cu, b)]
        return p.transpose(1, 2)
    kpm = torch.arange(Mk, device=DEV)[None, :] < torch.tensor(lk, device=DEV)[:, None]
    padded = _run(lambda q, k, v: forkattn.attention(q, k, v, key_padding_mask=kpm, backend="triton"),
                  (pad(q, cu_q, Mq), pad(k, cu_k, Mk), pad(v, cu_k, Mk)), pad(dout, cu_q, Mq))
    for b in range(B):
        for name, a, e, cu in zip(("out", "dq", "dk", "dv"), ours, padded, (cu_q, cu_q, cu_k, cu_k)):
            n = int(cu[b + 1] - cu[b])
            torch.testing.assert_close(a[_rows(cu, b)], e[b, :, :n].transpose(0, 1), atol=2e-6, rtol=1e-5,
                                       msg=lambda m: f"sequence {b}, {name}: {m}")


def test_varlen_causal_equals_per_sequence_attention():
    """Causal is bottom-right aligned per sequence: each sequence alone through forkattn.attention."""
    lq, lk = [7, 0, 33, 20], [5, 9, 40, 0]
    q, cu_q = _pack(lq, 2, 32, torch.float32)
    k, cu_k = _pack(lk, 1, 32, torch.float32)
    v = torch.randn_like(k)
    dout = torch.randn(q.shape, dtype=torch.float64, device=DEV)
    ours = _run(lambda q, k, v: forkattn.attention_varlen(
        q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, backend="triton"), (q, k, v), dout)
    for b in range(len(lq)):
        rq, rk = _rows(cu_q, b), _rows(cu_k, b)
        if lq[b] == 0:
            assert (ours[2][rk] == 0).all() and (ours[3][rk] == 0).all(), "keys no query sees get zero grads"
            continue
        one = _run(lambda q, k, v: forkattn.attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            causal=True, backend="triton")[0].transpose(0, 1), (q[rq], k[rk], v[rk]), dout[rq])
        for name, a, e, r in zip(("out", "dq", "dk", "dv"), ours, one, (rq, rq, rk, rk)):
            torch.testing.assert_close(a[r], e, atol=2e-6, rtol=1e-5, msg=lambda m: f"sequence {b}, {name}: {m}")


def test_varlen_matches_fp64_and_other_backends():
    lq, lk = [33, 1, 20], [33, 7, 50]
    q, cu_q = _pack(lq, 2, 32, torch.float16)
    k, cu_k = _pack(lk, 1, 32, torch.float16)
    v = torch.randn_like(k)
    dout = torch.randn(q.shape, dtype=torch.float64, device=DEV)

    def fn(backend):
        return lambda q, k, v: forkattn.attention_varlen(q, k, v, cu_q, cu_k, 33, 50, causal=True, backend=backend)

    ours = _run(fn("triton"), (q, k, v), dout)
    eager = _run(fn("eager"), (q, k, v), dout)
    exact = _run(lambda q, k, v: attention_varlen(q, k, v, cu_q, cu_k, causal=True, scale=32 ** -0.5),
                 (q.double(), k.double(), v.double()), dout)
    _check(ours, eager, exact)
    if DEV == "cpu":
        _check(_run(fn("cpu"), (q, k, v), dout), eager, exact)


def _varlen_args():
    q, cu_q = _pack([3, 4], 2, 16, torch.float32)
    k, cu_k = _pack([5, 2], 2, 16, torch.float32)
    return dict(q=q, k=k, v=k.clone(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=5)


BAD_VARLEN = [
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].long(), TypeError, "cu_seqlens_q must have dtype torch.int32"),
    ("cu_seqlens_k", lambda a: a["cu_seqlens_k"][None], ValueError, "cu_seqlens_k must be 1-D"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"][:1], ValueError, "at least 2 entries"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].tolist(), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    ("cu_seqlens_q", lambda a: torch.tensor([1, 3, 7], dtype=torch.int32), ValueError, "cu_seqlens_q must start at 0"),
    ("cu_seqlens_k", lambda a: torch.tensor([0, 6, 5, 7], dtype=torch.int32), ValueError, "cu_seqlens_and"),
    ("cu_seqlens_k", lambda a: torch.tensor([0, 6, 5], dtype=torch.int32), ValueError, "cu_seqlens_k must be non-decreasing"),
    ("cu_seqlens_q", lambda a: torch.tensor([0, 3, 6], dtype=torch.int32), ValueError, r"cu_seqlens_q\[-1\] must equal the packed length 7"),
    ("max_seqlen_q", lambda a: 3, ValueError, "max_seqlen_q = 3 is smaller than the longest sequence"),
    ("max_seqlen_k", lambda a: -1, ValueError, "max_seqlen_k must be a non-negative int"),
    ("max_seqlen_k", lambda a: 5.0, ValueError, "max_seqlen_k must be a non-negative int"),
    ("q", lambda a: a["q"][None], ValueError, "q must be 3-D"),
    ("k", lambda a: torch.randn(7, 3, 16), ValueError, "k and v must have the same shape"),
    ("v", lambda a: a["v"].half(), TypeError, "v must have q's dtype"),
    ("q", lambda a: torch.randn(7, 3, 16), ValueError, "multiple of k's and v's 2 heads"),
]


@pytest.mark.parametrize("arg,bad,exc,msg", BAD_VARLEN, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_VARLEN)])
def test_varlen_bad_inputs(arg, bad, exc, msg):
    args = _varlen_args()
    args[arg] = bad(args)
    if msg == "cu_seqlens_and":  # a different batch count than cu_seqlens_q
        msg = "cu_seqlens_q and cu_seqlens_k must have the same batch"
    with pytest.raises(exc, match=msg):
        forkattn.attention_varlen(**args, backend="triton")


# --- registration, dispatch, autotune configs, import ---------------------------------------------

def test_backend_support_reasons(monkeypatch):
    from forkattn.attention import BACKENDS

    b = BACKENDS.backends["triton"]
    assert b.supports(device_type="cuda", dtype=torch.float16, head_dim=128) is None
    assert "at most 256" in b.supports(device_type="cuda", dtype=torch.float16, head_dim=300)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA tensors" in b.supports(device_type="cpu", dtype=torch.float32, head_dim=64)
    with pytest.raises(forkattn.BackendUnavailableError, match="triton"):
        forkattn.attention(*(torch.randn(1, 1, 4, 16),) * 3, backend="triton")


def test_autotune_keep_filter():
    from forkattn.triton import attention as ta

    assert ta.keep("fwd", 64, 64, 4, 2, 64, 2)
    assert not ta.keep("fwd", 128, 128, 4, 4, 256, 4), "a 128x256 fp32 tile pipelined 4 deep cannot fit"
    for kind, configs in (("fwd", ta._FWD_CONFIGS), ("dkdv", ta._DKDV_CONFIGS), ("dq", ta._DQ_CONFIGS)):
        for block_d, q in ((32, torch.empty(1, dtype=torch.float16)), (256, torch.empty(1))):
            kept = ta._prune(kind)(configs, {"Q": q}, BLOCK_D=block_d)
            assert kept and len(kept) <= len(configs)
        assert len(ta._prune(kind)(configs, {"Q": torch.empty(1, dtype=torch.float16)}, BLOCK_D=64)) > 4
        # FORKATTN_TRITON_AUTOTUNE=0 takes the first fixed config that fits: one always does
        for block_d in (16, 32, 64, 128, 256):
            for elem in (2, 4):
                assert any(ta.keep(kind, *c, block_d, elem) for c in ta._FIXED[kind]), (kind, block_d, elem)


def test_opcheck():
    q, k, v = (torch.randn(1, 2, 7, 16, device=DEV) for _ in range(3))
    torch.library.opcheck(attention_fwd, (q, k, v, None, True, 0.25, "triton"))
    vq, cu = _pack([3, 4], 2, 16, torch.float32)
    torch.library.opcheck(
        attention_varlen_fwd, (vq, vq, vq, cu, cu, 4, 4, False, 0.25, "triton"))


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(1, 2, 7, 16, device=DEV, requires_grad=True) for _ in range(3))
    kpm = torch.tensor([[True, False, True, True, True, False, True]], device=DEV)
    fn = lambda q, k, v: forkattn.attention(q, k, v, causal=True, key_padding_mask=kpm, backend="triton")  # noqa: E731
    out = torch.compile(fn, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), atol=0, rtol=0)
    out.sum().backward()
    assert q.grad is not None and not torch.isnan(q.grad).any()
    x, cu = _pack([3, 4], 2, 16, torch.float32)
    g = lambda x: forkattn.attention_varlen(x, x, x, cu, cu, 4, 4, backend="triton")  # noqa: E731
    torch.testing.assert_close(torch.compile(g, fullgraph=True)(x), g(x), atol=0, rtol=0)


def test_import_does_not_load_triton():
    code = "import sys, forkattn; print('triton' in sys.modules, 'forkattn.triton.attention' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.dirname(__file__)), "python"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


# --- GPU: full sizes, fp16/bf16 ---------------------------------------------------------------------

GPU_CASES = [
    (4, 12, 12, 512, 512, 64, False, "pad_full"),
    (2, 12, 12, 1025, 1025, 64, True, None),
    (2, 16, 4, 1024, 4096, 128, True, None),
    (2, 8, 1, 129, 97, 128, True, "random"),
    (2, 4, 4, 300, 300, 96, False, "pad"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,D,causal,mask", GPU_CASES)
def test_gpu_full_sizes(B, H, Hkv, Lq, Lk, D, causal, mask, dtype):
    compare(B, H, Hkv, Lq, Lk, D, causal=causal, mask=mask, dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_varlen(dtype):
    lens = [1, 129, 512, 0, 1025, 77]
    q, cu = _pack(lens, 8, 64, dtype, device="cuda")
    k, v = torch.randn_like(q)[:, :2], torch.randn_like(q)[:, :2]
    dout = torch.randn(q.shape, dtype=torch.float64, device="cuda")

    def fn(backend):
        return lambda q, k, v: forkattn.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, backend=backend)

    exact = _run(lambda q, k, v: attention_varlen(q, k, v, cu, cu, causal=True, scale=64 ** -0.5),
                 (q.double(), k.double(), v.double()), dout)
    _check(_run(fn("triton"), (q, k, v), dout), _run(fn("eager"), (q, k, v), dout), exact)
