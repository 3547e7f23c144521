"""Attention shapes: BERT (key padding) and GPT (causal), forward and forward+backward.

Per shape: eager (forkattn.reference), SDPA, and every fused forkattn backend that runs here.
Padded BERT batches draw lengths uniformly in [L/2, L].
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

import forkattn
from forkattn import reference

from .core import Case, attention_flops, fused_backends


# (label, B, H, L, D, dtype, causal, padded); a chart per (dtype, causal/padded) across L
GPU_SHAPES = {
    "quick": [("BERT-base", 128, 12, 128, 64, torch.float16, False, True),
              ("BERT-base", 32, 12, 512, 64, torch.float16, False, True),
              ("GPT-2", 8, 12, 1024, 64, torch.float16, True, False)],
    "default": [("BERT-base", 32, 12, L, 64, torch.float16, False, True) for L in (128, 256, 512)]
    + [("GPT-2", 8, 12, L, 64, torch.float16, True, False) for L in (512, 1024, 2048)]
    + [("D128", 4, 16, L, 128, torch.bfloat16, c, False) for c in (True, False) for L in (1024, 2048, 4096)],
}
GPU_SHAPES["full"] = GPU_SHAPES["default"] + [("D128", 2, 16, 8192, 128, torch.bfloat16, c, False) for c in (True, False)]
CPU_SHAPES = {
    "quick": [("BERT-base", 2, 12, 128, 64, torch.float32, False, True),
              ("GPT-2", 1, 12, 256, 64, torch.float32, True, False)],
    "default": [("BERT-base", 4, 12, L, 64, torch.float32, False, True) for L in (128, 256, 512)]
    + [("GPT-2", 1, 12, L, 64, torch.float32, True, False) for L in (256, 512, 1024)],
    "full": [("BERT-base", 8, 12, L, 64, torch.float32, False, True) for L in (128, 256, 512, 1024)]
    + [("GPT-2", 2, 12, L, 64, torch.float32, True, False) for L in (256, 512, 1024, 2048)]
    + [("BERT-base", 8, 12, L, 64, torch.bfloat16, False, True) for L in (128, 512)],
}

IMPLS = {
    "eager": "forkattn.reference.attention: plain PyTorch matmul + masked softmax + matmul",
    "sdpa": "torch.nn.functional.scaled_dot_product_attention (a boolean mask for padding, is_causal for GPT)",
    "forkattn-*": "forkattn.attention(..., backend=<name>): forkattn's fused kernel (cpu: C++, cuda, triton)",
}


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


def _setup(B, H, L, D, dtype, causal, padded, device, seed, pass_):
    def build():
        gen = torch.Generator().manual_seed(seed)
        mask = None
        if padded:
            lengths = torch.randint(L // 2, L + 1, (B,), generator=gen)
            mask = (torch.arange(L)[None, :] < lengths[:, None]).to(device)
        q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        fwd, fwd_bwd = _bind(_impls(mask, causal, fused_backends("attention", device, dtype, D)), q, k, v)
        return fwd if pass_ == "fwd" else fwd_bwd
    return build


def cases(device: torch.device, size: str = "default") -> List[Case]:
    out = []
    for seed, (label, B, H, L, D, dtype, causal, padded) in enumerate((GPU_SHAPES if device.type == "cuda"
                                                                        else CPU_SHAPES)[size]):
        kind = "causal" if causal else ("padded L/2..L" if padded else "full")
        dt = str(dtype).split(".")[-1]
        name = f"{label} B{B} H{H} L{L} D{D} {dt} {kind}"
        params = dict(B=B, H=H, L=L, D=D, dtype=str(dtype), causal=causal, padded=padded)
        chart = f"{dt} {kind}, {label} B{B} H{H} D{D}"
        for pass_ in ("fwd", "fwd+bwd"):
            out.append(Case("attention", f"{name} {pass_}", flops=attention_flops(B, H, L, L, D, causal=causal,
                                                                                  backward=pass_ != "fwd"),
                            params={**params, "pass": pass_}, setup=_setup(B, H, L, D, dtype, causal, padded,
                                                                           device, seed, pass_),
                            chart=chart, panel=pass_, x=f"L{L}", xlabel="sequence length"))
    return out
