"""The hand-written CUDA kernels (backend "cuda", kernels/attention/).

GPU tests (@pytest.mark.gpu, run by scripts/gpu_check.sh) hold the kernels to the 2x rule
against an fp64 reference for out, dq, dk and dv; the others run anywhere and test the host
side: availability and dispatch, argument limits, the generated instantiation files."""
import os
import subprocess
import sys

import pytest
import torch

import forkattn
from attn_utils import (assert_within_budget, check_against_reference, delta_rounding_allowance, make_padding,
                        make_qkv)
from forkattn import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HALF = [torch.float16, torch.bfloat16]


def _needs_cuda_backend():
    why = forkattn.backends.get("attention").why_not("cuda", "cuda", dtype=torch.float16, head_dim=64)
    if why:
        pytest.skip(why)


# --- GPU: numerics ---------------------------------------------------------------------------------

# (Lq, Lk): odd sizes, Lq != Lk both ways, tile boundaries (64), one long case
LENGTHS = [(1, 1), (7, 7), (1, 97), (97, 129), (129, 97), (64, 64), (65, 63), (1025, 1025), (7, 1025), (1025, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Lq,Lk", LENGTHS)
def test_lengths(dtype, causal, Lq, Lk):
    _needs_cuda_backend()
    q, k, v = make_qkv(2, 3, 3, Lq, Lk, 64, dtype, device="cuda")
    check_against_reference(q, k, v, backend="cuda", causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dims(dtype, D, causal):
    _needs_cuda_backend()
    q, k, v = make_qkv(2, 2, 2, 129, 97, D, dtype, device="cuda")
    check_against_reference(q, k, v, backend="cuda", causal=causal, key_padding_mask=make_padding(2, 97, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Lq,Lk", [(97, 97), (33, 129), (129, 1), (200, 300)])
def test_key_padding(dtype, causal, Lq, Lk):
    """Random padding lengths, one sequence fully padded: its rows are zeros, its grads zero."""
    _needs_cuda_backend()
    B = 4
    q, k, v = make_qkv(B, 2, 2, Lq, Lk, 64, dtype, device="cuda")
    mask = make_padding(B, Lk, "cuda", fully_padded=(2,))
    out = check_against_reference(q, k, v, backend="cuda", causal=causal, key_padding_mask=mask)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    forkattn.attention(q, k, v, backend="cuda", causal=causal, key_padding_mask=mask).float().sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.equal(g[2], torch.zeros_like(g[2]))


@pytest.mark.gpu
def test_long_padding_runs_skip_whole_tiles():
    """Masks with long padded stretches (whole 64-key tiles skipped) and holes inside tiles."""
    _needs_cuda_backend()
    B, L = 3, 400
    q, k, v = make_qkv(B, 2, 2, L, L, 64, torch.float16, device="cuda")
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 70:330] = False  # tiles 2-4 fully padded
    mask[1, ::3] = False     # holes everywhere
    mask[2, :200] = False    # leading padding
    check_against_reference(q, k, v, backend="cuda", key_padding_mask=mask.cuda())
    check_against_reference(q, k, v, backend="cuda", causal=True, key_padding_mask=mask.cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 1), (8, 8)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa(H, Hkv, causal):
    _needs_cuda_backend()
    q, k, v = make_qkv(2, H, Hkv, 97, 130, 64, torch.bfloat16, device="cuda")
    check_against_reference(q, k, v, backend="cuda", causal=causal, key_padding_mask=make_padding(2, 130, "cuda"))


@pytest.mark.gpu
def test_fully_masked_rows_zero_output_and_grads():
    """Padding-only sequences and, with causal Lq > Lk, the first Lq - Lk queries."""
    _needs_cuda_backend()
    q, k, v = make_qkv(2, 2, 2, 90, 20, 64, torch.float16, device="cuda")
    mask = torch.ones(2, 20, dtype=torch.bool, device="cuda")
    mask[1] = False
    out, lse = torch.ops.forkattn.attention_fwd(q, k, v, mask, True, 0.125, "cuda")
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isinf(lse[1]).all()
    assert torch.equal(out[0, :, :70], torch.zeros_like(out[0, :, :70]))  # query i sees j <= i - 70
    assert torch.isinf(lse[0, :, :70]).all() and torch.isfinite(lse[0, :, 70:]).all()
    out.float().sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(q.grad[0, :, :70], torch.zeros_like(q.grad[0, :, :70]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))
    assert torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))


@pytest.mark.gpu
def test_lse_matches_fp64():
    _needs_cuda_backend()
    q, k, v = make_qkv(2, 3, 3, 77, 150, 64, torch.float16, device="cuda", requires_grad=False)
    mask = make_padding(2, 150, "cuda")
    _, lse = torch.ops.forkattn.attention_fwd(q, k, v, mask, True, 0.125, "cuda")
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.125
    i = torch.arange(77, device="cuda")[:, None]
    j = torch.arange(150, device="cuda")[None, :]
    s = s.masked_fill(~(mask[:, None, None, :] & (j <= i + 150 - 77)), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=0, atol=2e-3)


@pytest.mark.gpu
def test_strided_and_misaligned_inputs():
    """Transposed projections are read in place; a slice whose rows are not 16-byte aligned is
    copied once by the host glue and gives the same numbers."""
    _needs_cuda_backend()
    q, k, v = make_qkv(2, 4, 4, 33, 45, 64, torch.float16, device="cuda", strided=True)
    assert not q.is_contiguous()
    mask = make_padding(2, 45, "cuda")
    out = check_against_reference(q, k, v, backend="cuda", causal=True, key_padding_mask=mask)
    dense = forkattn.attention(*(t.detach().contiguous() for t in (q, k, v)), causal=True,
                               key_padding_mask=mask, backend="cuda")
    assert torch.equal(out, dense)
    wide = torch.randn(2, 4, 33, 72, device="cuda", dtype=torch.float16)
    q_odd = wide[..., 3:67]  # base pointer 6 bytes off, row stride 72
    assert q_odd.data_ptr() % 16 != 0
    ours = forkattn.attention(q_odd, k.detach(), v.detach(), backend="cuda")
    assert torch.equal(ours, forkattn.attention(q_odd.contiguous(), k.detach(), v.detach(), backend="cuda"))


@pytest.mark.gpu
def test_outputs_never_read_stale_memory():
    """Poison the caching allocator's free blocks with NaN first: every output element must be
    written by the kernels (rows past the end, empty rows, skipped tiles included)."""
    _needs_cuda_backend()
    for _ in range(3):
        torch.full((1 << 22,), float("nan"), device="cuda")
    q, k, v = make_qkv(3, 2, 2, 70, 130, 64, torch.float16, device="cuda")
    mask = make_padding(3, 130, "cuda", fully_padded=(1,))
    out = forkattn.attention(q, k, v, causal=True, key_padding_mask=mask, backend="cuda")
    out.float().sum().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert not torch.isnan(t).any()


@pytest.mark.gpu
def test_backward_is_deterministic():
    _needs_cuda_backend()
    q, k, v = make_qkv(2, 8, 2, 300, 257, 128, torch.bfloat16, device="cuda")
    mask = make_padding(2, 257, "cuda")
    out = forkattn.attention(q, k, v, causal=True, key_padding_mask=mask, backend="cuda")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    """No host syncs and no data-dependent allocation: forward and backward capture into one
    CUDA graph whose replay equals eager bit for bit, also after the inputs change in place."""
    _needs_cuda_backend()
    q, k, v = make_qkv(2, 4, 2, 100, 150, 64, torch.float16, device="cuda", requires_grad=False)
    mask = make_padding(2, 150, "cuda")
    dout = torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.float16)

    def step():
        out, lse = torch.ops.forkattn.attention_fwd(q, k, v, mask, True, 0.125, "cuda")
        grads = torch.ops.forkattn.attention_bwd(dout, q, k, v, out, lse, mask, True, 0.125, "cuda")
        return (out, lse) + tuple(grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        for t in (q, k, v, dout):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, step()):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_opcheck_and_compile():
    _needs_cuda_backend()
    q, k, v = make_qkv(2, 2, 2, 17, 23, 64, torch.float16, device="cuda")
    mask = make_padding(2, 23, "cuda")
    torch.library.opcheck(torch.ops.forkattn.attention_fwd.default, (q, k, v, mask, True, 0.125, "cuda"))
    f = torch.compile(lambda a, b, c: forkattn.attention(a, b, c, key_padding_mask=mask, backend="cuda"),
                      fullgraph=True)
    torch.testing.assert_close(f(q, k, v), forkattn.attention(q, k, v, key_padding_mask=mask, backend="cuda"),
                               rtol=0, atol=0)


@pytest.mark.gpu
def test_bert_and_gpt_shapes_agree_with_sdpa():
    """The benchmark shapes, checked once against SDPA in the same precision (forward)."""
    _needs_cuda_backend()
    for B, H, L, D, causal in [(8, 12, 128, 64, False), (2, 12, 1024, 64, True), (1, 16, 2048, 128, True)]:
        q, k, v = make_qkv(B, H, H, L, L, D, torch.float16, device="cuda", requires_grad=False)
        ours = forkattn.attention(q, k, v, causal=causal, backend="cuda")
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
        assert_within_budget("out", ours, sdpa, ref)


@pytest.mark.gpu
def test_native_limits_raise_clear_errors():
    _needs_cuda_backend()
    from forkattn._native import _C

    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, torch.float16, device="cuda", requires_grad=False)
    with pytest.raises(TypeError, match="float16 or bfloat16 for the cuda backend"):
        _C.attention_fwd_cuda(q.float(), k.float(), v.float(), None, False, 1.0)
    q2, k2, v2 = make_qkv(1, 2, 2, 8, 8, 48, torch.float16, device="cuda", requires_grad=False)
    with pytest.raises(ValueError, match="head_dim must be 32, 64 or 128"):
        _C.attention_fwd_cuda(q2, k2, v2, None, False, 1.0)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        _C.attention_fwd_cuda(q.cpu(), k.cpu(), v.cpu(), None, False, 1.0)


# --- GPU: varlen ----------------------------------------------------------------------------------

def _pack(lens, H, D, dtype):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return torch.randn(sum(lens), H, D, dtype=dtype, device="cuda"), cu


def _grads(fn, inputs, dout):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*ins)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, ins, dout.to(out.dtype))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_matches_fp64(dtype, causal):
    _needs_cuda_backend()
    from forkattn.reference import attention_varlen

    lq, lk = [1, 129, 0, 300, 7, 64], [1, 97, 5, 300, 0, 130]
    q, cu_q = _pack(lq, 4, 64, dtype)
    k, cu_k = _pack(lk, 2, 64, dtype)
    v = torch.randn_like(k)
    dout = torch.randn(q.shape, dtype=torch.float64, device="cuda")

    def fn(backend):
        return lambda q, k, v: forkattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                         backend=backend)

    ours = _grads(fn("cuda"), (q, k, v), dout)
    eager = _grads(fn("eager"), (q, k, v), dout)
    exact = _grads(lambda q, k, v: attention_varlen(q, k, v, cu_q, cu_k, causal=causal, scale=64 ** -0.5),
                   (q.double(), k.double(), v.double()), dout)
    for name, a, e, x in zip(("out", "dq", "dk", "dv"), ours, eager, exact):
        assert_within_budget(name, a, e, x)
    no_keys = ours[0][int(cu_q[4]):int(cu_q[5])]  # sequence 4 has queries but no key: zeros
    assert no_keys.numel() and torch.equal(no_keys, torch.zeros_like(no_keys))


@pytest.mark.gpu
def test_varlen_equals_padded_per_sequence():
    """Each packed sequence gives what the padded cuda path gives for it alone."""
    _needs_cuda_backend()
    lq, lk = [70, 1, 200], [90, 64, 33]
    q, cu_q = _pack(lq, 4, 128, torch.float16)
    k, cu_k = _pack(lk, 1, 128, torch.float16)
    v = torch.randn_like(k)
    dout = torch.randn(q.shape, dtype=torch.float16, device="cuda")
    ours = _grads(lambda q, k, v: forkattn.attention_varlen(q, k, v, cu_q, cu_k, 200, 90, causal=True,
                                                            backend="cuda"), (q, k, v), dout)
    for b in range(3):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        one = _grads(lambda q, k, v: forkattn.attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=True,
            backend="cuda")[0].transpose(0, 1), (q[rq], k[rk], v[rk]), dout[rq])
        for name, a, e, r in zip(("out", "dq", "dk", "dv"), ours, one, (rq, rq, rk, rk)):
            torch.testing.assert_close(a[r], e, msg=lambda m: f"sequence {b}, {name}: {m}")


@pytest.mark.gpu
def test_varlen_cuda_graph_capture():
    _needs_cuda_backend()
    lens = [5, 130, 64]
    q, cu = _pack(lens, 2, 64, torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)

    def step():
        out, lse = torch.ops.forkattn.attention_varlen_fwd(q, k, v, cu, cu, 130, 130, True, 0.125, "cuda")
        return (out, lse) + tuple(torch.ops.forkattn.attention_varlen_bwd(
            out, q, k, v, out, lse, cu, cu, 130, 130, True, 0.125, "cuda"))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, step()):
        assert torch.equal(a, b)


# --- GPU: dropout (issue 16) ------------------------------------------------------------------------

def _dropout_check(run, inputs, p, seed, allowance):
    """run(q, k, v, backend, p, seed): cuda, eager in the same dtype and eager in float64 fed the
    same Philox mask; the 2x rule for out, dq, dk, dv (plus Delta's rounding for dq, dk)."""
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    ins64 = [t.detach().double().requires_grad_() for t in inputs]
    out, eager, ref = run(*ins, "cuda", p, seed), run(*ins, "eager", p, seed), run(*ins64, None, p, seed)
    assert_within_budget("out", out, eager, ref)
    g = torch.randn_like(out)
    extra = allowance(ins, ref, g)
    grads = zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(eager, ins, g),
                torch.autograd.grad(ref, ins64, g.double()))
    for name, (a, b, r) in zip(("dq", "dk", "dv"), grads):
        assert_within_budget(name, a, b, r, extra=1e-5 + extra.get(name, 0.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,D,causal,padded", [
    (2, 4, 2, 97, 129, 64, False, True), (1, 2, 1, 129, 97, 128, True, False), (2, 2, 2, 1, 7, 32, True, True),
    (1, 2, 2, 1025, 1025, 64, True, False)])
def test_dropout_against_reference_with_the_same_mask(dtype, B, H, Hkv, Lq, Lk, D, causal, padded):
    _needs_cuda_backend()
    torch.manual_seed(Lq + Lk)
    q, k, v = make_qkv(B, H, Hkv, Lq, Lk, D, dtype, device="cuda", requires_grad=False)
    kpm = make_padding(B, Lk, "cuda") if padded else None

    def run(q, k, v, backend, p, seed):
        if backend is None:
            return reference.attention(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=p, seed=seed)
        return forkattn.attention(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=p, seed=seed, backend=backend)

    def allowance(ins, ref, g):
        allowed = reference.visible_keys(B, Lq, Lk, causal=causal, key_padding_mask=kpm, device="cuda")
        return delta_rounding_allowance(ins[0], ins[1], ref, g, D ** -0.5, allowed)
    _dropout_check(run, (q, k, v), 0.17, 0x5EED + Lq, allowance)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_dropout_varlen_against_reference(dtype):
    _needs_cuda_backend()
    lq, lk = [65, 1, 0, 130], [70, 9, 3, 129]
    q, cu_q = _pack(lq, 4, 64, dtype)
    k, cu_k = _pack(lk, 2, 64, dtype)
    v = torch.randn_like(k)

    def run(q, k, v, backend, p, seed):
        if backend is None:
            return reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, dropout_p=p, seed=seed)
        return forkattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, dropout_p=p, seed=seed,
                                         backend=backend)

    def allowance(ins, ref, g):  # per sequence, the largest
        worst = {"dq": 0.0, "dk": 0.0}
        for b in range(len(lq)):
            rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
            if lq[b] == 0:
                continue
            bhld = lambda t, r: t[r].transpose(0, 1).unsqueeze(0)  # noqa: E731
            allowed = reference.visible_keys(1, lq[b], lk[b], causal=True, key_padding_mask=None, device="cuda")
            a = delta_rounding_allowance(bhld(ins[0], rq), bhld(ins[1], rk), bhld(ref, rq), bhld(g, rq), 0.125, allowed)
            worst = {n: max(worst[n], a[n]) for n in worst}
        return worst
    _dropout_check(run, (q, k, v), 0.3, -42, allowance)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_dropout_mask_bit_identical_to_eager(D):
    """q = 0 (P uniform over the visible keys), V = I, dO = I: out[i, j] and dV[j, i] are nonzero
    exactly where the mask keeps (i, j); cuda's zeros are eager's and philox.py's, forward and
    backward (the dk/dv kernel draws the mask transposed), padded + causal + GQA, and varlen."""
    _needs_cuda_backend()
    from forkattn import philox

    B, H, Hkv, Lq, Lk, p, seed = 2, 4, 2, D - 3, D, 0.4, 2 ** 63 + 12345
    q = torch.zeros(B, H, Lq, D, dtype=torch.float16, device="cuda", requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, dtype=torch.float16, device="cuda")
    v = torch.eye(Lk, D, dtype=torch.float16, device="cuda").expand(B, Hkv, Lk, D).contiguous().requires_grad_()
    kpm = make_padding(B, Lk, "cuda")
    want = philox.dropout_keep(seed, p, B, H, Lq, Lk, device="cuda")
    for causal in (False, True):
        allowed = reference.visible_keys(B, Lq, Lk, causal=causal, key_padding_mask=kpm, device="cuda").expand_as(want)
        kw = dict(causal=causal, key_padding_mask=kpm, dropout_p=p, seed=seed)
        ours = forkattn.attention(q, k, v, backend="cuda", **kw)
        eager = forkattn.attention(q.float(), k.float(), v.float(), backend="eager", **kw)
        dv, = torch.autograd.grad(ours, v, torch.eye(Lq, D, dtype=torch.float16, device="cuda").expand_as(ours))
        assert torch.equal((ours[..., :Lk] != 0) & allowed, want & allowed), f"out, causal={causal}"
        assert torch.equal((eager[..., :Lk] != 0) & allowed, want & allowed), f"eager, causal={causal}"
        dvs = dv[..., :Lq].transpose(-2, -1)  # [B, Hkv, Lq, Lk]: sum over the group of P keep
        grp = (want & allowed).view(B, Hkv, H // Hkv, Lq, Lk).any(2)
        assert torch.equal(dvs != 0, grp), f"dv, causal={causal}"
    lens = [D - 1, 5, D]  # varlen: (b, i, j) counted inside each sequence
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    zeros = torch.zeros(sum(lens), 2, D, dtype=torch.float16, device="cuda")
    pos = torch.cat([torch.arange(n) for n in lens])  # V row = e_(position inside its sequence)
    vv = torch.eye(D, dtype=torch.float16, device="cuda")[pos][:, None].expand(-1, 2, -1).contiguous()
    out = forkattn.attention_varlen(zeros, zeros, vv, cu, cu, D, D, dropout_p=p, seed=seed, backend="cuda")
    for b, n in enumerate(lens):
        keep = philox.dropout_keep(seed, p, 1, 2, n, n, batch_index=b, device="cuda")[0]
        got = out[int(cu[b]):int(cu[b + 1]), :, :n].transpose(0, 1) != 0
        assert torch.equal(got, keep), f"varlen sequence {b}"


@pytest.mark.gpu
def test_dropout_zero_is_plain_and_a_seed_is_reproducible():
    """dropout_p = 0 runs the plain kernels (bit-identical to no dropout, any seed); p > 0 with one
    seed gives bit-identical outputs and gradients twice, and another seed a different result."""
    _needs_cuda_backend()
    q, k, v = make_qkv(2, 4, 2, 97, 130, 64, torch.bfloat16, device="cuda", requires_grad=False)
    g = torch.randn(2, 4, 97, 64, dtype=torch.bfloat16, device="cuda")

    def run(**kw):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = forkattn.attention(*ins, causal=True, backend="cuda", **kw)
        return [out, *torch.autograd.grad(out, ins, g)]
    for a, b in zip(run(), run(dropout_p=0.0, seed=7)):
        assert torch.equal(a, b)
    first, again, other = run(dropout_p=0.1, seed=7), run(dropout_p=0.1, seed=7), run(dropout_p=0.1, seed=8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    with pytest.raises(ValueError, match="dropout_p must be in"):
        from forkattn._native import _C
        _C.attention_fwd_cuda(q, k, v, None, False, 1.0, 1.0, 0)


# --- anywhere: host side ---------------------------------------------------------------------------

def test_cuda_backend_unavailable_says_why():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, torch.float16, requires_grad=False)
    with pytest.raises(forkattn.BackendUnavailableError, match="backend 'cuda' cannot run this call"):
        forkattn.attention(q, k, v, backend="cuda")
    why = forkattn.backends.get("attention").why_not("cuda", "cpu", dtype=torch.float16, head_dim=64)
    if not forkattn._native.WITH_CUDA:
        assert "built without CUDA kernels" in why
    elif torch.cuda.is_available():
        assert "runs CUDA tensors only" in why


def test_cuda_supports_names_the_limit():
    _cuda_supports = forkattn.backends.get("attention").backends["cuda"].supports

    assert _cuda_supports(device_type="cuda", dtype=torch.float16, head_dim=64) is None
    assert _cuda_supports(device_type="cuda", dtype=torch.bfloat16, head_dim=128) is None
    assert "CUDA tensors only" in _cuda_supports(device_type="cpu", dtype=torch.float16, head_dim=64)
    assert "float16 and bfloat16" in _cuda_supports(device_type="cuda", dtype=torch.float32, head_dim=64)
    assert "head_dim must be 32, 64 or 128" in _cuda_supports(device_type="cuda", dtype=torch.float16, head_dim=80)


def test_native_entry_points_follow_the_build():
    from forkattn._native import _C

    assert hasattr(_C, "attention_fwd_cuda") == forkattn._native.WITH_CUDA
    assert hasattr(_C, "attention_bwd_cuda") == forkattn._native.WITH_CUDA
    assert hasattr(_C, "attention_varlen_fwd_cuda") == forkattn._native.WITH_CUDA
    assert hasattr(_C, "attention_varlen_bwd_cuda") == forkattn._native.WITH_CUDA


def test_cuda_varlen_backend_unavailable_says_why():
    q = torch.randn(8, 2, 64, dtype=torch.float16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(forkattn.BackendUnavailableError, match="backend 'cuda' cannot run this call"):
        forkattn.attention_varlen(q, q, q, cu, cu, 5, 5, backend="cuda")


def _preference_in_subprocess(env_value):
    env = dict(os.environ)
    env.pop("FORKATTN_PREFER_CUDA_ATTENTION", None)
    if env_value is not None:
        env["FORKATTN_PREFER_CUDA_ATTENTION"] = env_value
    code = ("import sys; sys.path.insert(0, 'python'); import forkattn; r = forkattn.backends.get; "
            "print([r('attention').preference['cuda'], r('attention_varlen').preference['cuda']])")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return eval(res.stdout.strip().splitlines()[-1])


def test_cuda_backend_is_opt_in_until_verified():
    """Not in the default preference; FORKATTN_PREFER_CUDA_ATTENTION=1 puts it first (both families)."""
    assert all("cuda" not in pref for pref in _preference_in_subprocess(None))
    assert all(pref[0] == "cuda" for pref in _preference_in_subprocess("1"))


def test_generated_kernels_are_up_to_date(tmp_path):
    script = os.path.join(ROOT, "kernels", "attention", "generate_kernels.py")
    res = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    subprocess.run([sys.executable, script, "--out", str(tmp_path)], check=True)
    gen_dir = os.path.join(ROOT, "kernels", "attention", "generated")
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(f for f in os.listdir(gen_dir) if f.endswith(".cu"))
    assert len(names) == 2 * 2 * 2 * 3  # (fwd, bwd) x (plain, dropout) x (fp16, bf16) x (32, 64, 128)
    for n in names:
        with open(os.path.join(gen_dir, n)) as a, open(tmp_path / n) as b:
            assert a.read() == b.read(), n
    # a stale file is reported
    (tmp_path / names[0]).write_text("// edited\n")
    res = subprocess.run([sys.executable, script, "--check", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 1 and names[0] in res.stderr


def test_instantiations_cover_the_switches():
    """Every (direction, dropout, dtype, head_dim) the switch header dispatches to has its generated file."""
    with open(os.path.join(ROOT, "kernels", "common", "static_switch.h")) as f:
        switch = f.read()
    dims = [d for d in (32, 64, 128) if f"(HEAD_DIM) == {d}" in switch]
    assert dims == [32, 64, 128]
    from forkattn.backends.cuda import HEAD_DIMS as CUDA_HEAD_DIMS

    assert tuple(dims) == CUDA_HEAD_DIMS
    gen = os.listdir(os.path.join(ROOT, "kernels", "attention", "generated"))
    for direction in ("fwd", "bwd", "fwd_dropout", "bwd_dropout"):
        for dtype in ("fp16", "bf16"):
            for d in dims:
                assert f"attention_{direction}_{dtype}_hdim{d}.cu" in gen
