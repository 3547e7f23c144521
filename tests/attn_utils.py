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
