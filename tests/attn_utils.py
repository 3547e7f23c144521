"""Shared helpers for attention tests: inputs, the fp64 reference and the 2x error rule."""
import torch

import forkattn
from forkattn import reference


def backend_skip_reason(backend: str, device: str = "cpu"):
    """None when `backend` can run on `device` tensors in this process, else why not."""
    return forkattn.backends.get("attention").why_not(backend, device, dtype=torch.float32, head_dim=64)


def make_qkv(B, H, Hkv, Lq, Lk, D, dtype, device="cpu", strided=False, requires_grad=True):
    """Random q, k, v. strided=True gives the transposes of [B, L, H, D] projections."""
    def one(heads, L):
        if strided:
            t = torch.randn(B, L, heads, D, device=device, dtype=torch.float32).to(dtype).transpose(1, 2)
        else:
            t = torch.randn(B, heads, L, D, device=device, dtype=torch.float32).to(dtype)
        return t.requires_grad_(requires_grad)
    return one(H, Lq), one(Hkv, Lk), one(Hkv, Lk)


def make_padding(B, Lk, device="cpu", fully_padded=(), generator=None):
    """Bool [B, Lk], True = attend: each row keeps a random prefix of length in [1, Lk];
    rows listed in fully_padded attend to nothing."""
    lengths = torch.randint(1, Lk + 1, (B,), generator=generator)
    mask = torch.arange(Lk)[None, :] < lengths[:, None]
    for b in fully_padded:
        mask[b] = False
    return mask.to(device)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_within_budget(name, ours, eager, ref64, extra=1e-5):
    """FlashAttention's rule: our max error against fp64 <= 2x eager's in the same dtype + extra."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    nan = torch.isnan(ours)
    assert not nan.any(), f"{name}: {int(nan.sum())} NaN values, first at {nan.nonzero()[0].tolist()}"
    err, base = max_err(ours, ref64), max_err(eager, ref64)
    if not err <= 2 * base + extra:
        diff = (ours.double() - ref64.double()).abs()
        idx = (diff == diff.max()).nonzero()[0].tolist()
        raise AssertionError(f"{name}: max err {err:.3e} > 2 * eager err {base:.3e} + {extra:g} (worst at {idx})")


def check_against_reference(q, k, v, *, backend, causal=False, key_padding_mask=None, scale=None, grads=True):
    """Runs `backend`, eager in the same dtype and eager in float64; applies the 2x rule to the
    output and to dq, dk, dv. Returns the backend's output."""
    kw = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    out = forkattn.attention(q, k, v, backend=backend, **kw)
    eager = reference.attention(q, k, v, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, **kw)
    assert_within_budget("out", out, eager, ref)
    if grads:
        g = torch.randn_like(out)
        ours = torch.autograd.grad(out, (q, k, v), g)
        base = torch.autograd.grad(eager, (q, k, v), g)
        refg = torch.autograd.grad(ref, (q64, k64, v64), g.double())
        for name, a, b, r in zip(("dq", "dk", "dv"), ours, base, refg):
            assert_within_budget(name, a, b, r)
    return out


# The GPU backends (triton, cuda) form the backward's Delta = rowsum(dO * O) from the stored
# fp16/bf16 output, as FlashAttention does; the cpu backend recomputes O in fp32 for it. Delta's
# rounding error |dO_i| . |O_i| * u (u = 2^-11 fp16, 2^-8 bf16) enters dS_ij = P_ij (dP_ij - Delta_i)
# whole, so on a peaked row, where dP_ij - Delta_i nearly cancels, it can dwarf eager's error
# (which forms its Delta from the same P and dP). README's rule for those backends' fp16/bf16 dq and
# dk adds this term to the 2x rule; dv and out do not use Delta.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def delta_rounding_allowance(q, k, out64, dout, scale, allowed=None):
    """{"dq": a, "dk": b}: 2x the largest error the rounded Delta can put into dq and dk.
    q [B, H, Lq, D], k [B, Hkv, Lk, D] (GQA expanded here), out64 the float64 output, dout the
    upstream gradient, allowed as reference.visible_keys. 0 for float32."""
    u = UNIT_ROUNDOFF.get(q.dtype, 0.0)
    if u == 0.0:
        return {"dq": 0.0, "dk": 0.0}
    q64, k64 = q.detach().double(), k.detach().double()
    group = q64.shape[1] // k64.shape[1]  # a key's gradient sums over its group's query heads
    if group != 1:
        k64 = k64.repeat_interleave(group, dim=1)
    s = q64 @ k64.transpose(-2, -1) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows that see nothing: no P
    d_delta = u * (dout.double().abs() * out64.detach().abs()).sum(-1)  # [B, H, Lq]
    dq = scale * d_delta.max().item() * k64.abs().max().item() if k64.numel() else 0.0
    dk = group * scale * (p * d_delta[..., None]).sum(-2).max().item() * q64.abs().max().item() if p.numel() else 0.0
    return {"dq": 2 * dq, "dk": 2 * dk}


def assert_seed_semantics(run):
    """run(**kw) -> a tensor of a dropout call (dropout_p > 0): the seed / generator contract every
    dropout op keeps: an explicit seed fixes the mask, a signed int64 is its bit pattern, no seed
    draws a fresh one per call from torch's default generator, a generator is used and advanced."""
    assert torch.equal(run(seed=3), run(seed=3))
    assert not torch.equal(run(seed=3), run(seed=4))
    assert torch.equal(run(seed=-1), run(seed=2 ** 64 - 1))  # a signed int64 is its bit pattern
    assert not torch.equal(run(), run())  # a fresh seed per call
    torch.manual_seed(5)
    a = run()
    torch.manual_seed(5)
    assert torch.equal(run(), a)  # drawn from torch's default generator
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    first = run(generator=g1)
    assert torch.equal(first, run(generator=g2))
    assert not torch.equal(run(generator=g1), first)  # the generator advances
