"""Attention shapes: BERT (key padding) and GPT (causal), forward and forward+backward.

Per shape: eager (forkattn.reference), SDPA, and every fused forkattn backend that runs here.
Padded BERT batches draw lengths uniformly in [L/2, L], as the anchors in shared/ANCHORS.md.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

import forkattn
from forkattn import reference

from .core import Case, attention_flops


def _shapes(device: torch.device, quick: bool):
    # (label, B, H, L, D, dtype, causal, padded)
    if device.type == "cuda":
        shapes = [
            ("BERT-base", 128, 12, 128, 64, torch.float16, False, True),
            ("BERT-base", 32, 12, 512, 64, torch.float16, False, True),
            ("GPT-2", 8, 12, 1024, 64, torch.float16, True, False),
            ("L4096 D128", 4, 16, 4096, 128, torch.bfloat16, True, False),
            ("L4096 D128", 4, 16, 4096, 128, torch.bfloat16, False, False),
        ]
        if quick:
            shapes = [s for s in shapes if s[3] <= 1024]
        return shapes
    if quick:
        return [
            ("BERT-base", 2, 12, 128, 64, torch.float32, False, True),
            ("GPT-2", 1, 12, 256, 64, torch.float32, True, False),
        ]
    return [
        ("BERT-base", 8, 12, 128, 64, torch.float32, False, True),
        ("BERT-base", 8, 12, 512, 64, torch.float32, False, True),
        ("GPT-2", 2, 12, 1024, 64, torch.float32, True, False),
    ]


def fused_backends(device: torch.device, dtype: torch.dtype, head_dim: int) -> List[str]:
    reg = forkattn.backends.get("attention")
    return [n for n in reg.backends if n != "eager" and reg.why_not(n, device.type, dtype=dtype, head_dim=head_dim) is None]


def _impls(mask, causal, backends):
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    impls = {
        "eager": lambda q, k, v: reference.attention(q, k, v, causal=causal, key_padding_mask=mask),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal),
    }
    for b in backends:
        impls[f"forkattn-{b}"] = (
            lambda q, k, v, b=b: forkattn.attention(q, k, v, causal=causal, key_padding_mask=mask, backend=b)
        )
    return impls


def _bind(impls, q, k, v):
    """Zero-argument callables over these very tensors: forward, and forward+backward."""
    dout = torch.randn_like(q)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    fwd = {n: (lambda f=f: f(q, k, v)) for n, f in impls.items()}
    fwd_bwd = {n: (lambda f=f: torch.autograd.grad(f(qg, kg, vg), (qg, kg, vg), dout)) for n, f in impls.items()}
    return fwd, fwd_bwd


def cases(device: torch.device, quick: bool) -> List[Case]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for label, B, H, L, D, dtype, causal, padded in _shapes(device, quick):
        mask = None
        if padded:
            lengths = torch.randint(L // 2, L + 1, (B,), generator=gen)
            mask = (torch.arange(L)[None, :] < lengths[:, None]).to(device)
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=None) for _ in range(3))
        impls = _impls(mask, causal, fused_backends(device, dtype, D))
        kind = "causal" if causal else ("padded" if padded else "full")
        name = f"{label} B{B} H{H} L{L} D{D} {str(dtype).split('.')[-1]} {kind}"
        params = dict(B=B, H=H, L=L, D=D, dtype=str(dtype), causal=causal, padded=padded)
        fwd, fwd_bwd = _bind(impls, q, k, v)
        out.append(Case("attention", f"{name} fwd", fwd, flops=attention_flops(B, H, L, L, D, causal=causal),
                        params={**params, "pass": "fwd"}))
        out.append(Case("attention", f"{name} fwd+bwd", fwd_bwd,
                        flops=attention_flops(B, H, L, L, D, causal=causal, backward=True),
                        params={**params, "pass": "fwd+bwd"}))
    return out
