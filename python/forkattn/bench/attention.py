"""Attention shapes: BERT (key padding) and GPT (causal), forward and forward+backward.

Per shape: eager (forkattn.reference), SDPA, and every fused forkattn backend that runs here.
Padded BERT batches draw lengths uniformly in [L/2, L].

Attention dropout (issue #16): at the shapes in DROPOUT (BERT-base padded L512, GPT-2 causal L1024),
a "fwd+bwd, dropout 0.1" case follows the plain fwd+bwd one. Every row there runs with
dropout_p=0.1: SDPA's dropout path; eager is the reference's computation with a mask from torch's
generator (as F.dropout draws one: forkattn.reference's own Philox mask, built from plain PyTorch
ops, takes ~20x the attention itself, a test oracle rather than a peer); the fused backends with a
fixed seed. One more row, "p=0: forkattn-<backend>", is the fastest fused backend without dropout,
timed in the same rounds, so that its ratio to "forkattn-<backend>" is dropout's overhead.
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

DROPOUT_P = 0.1
DROPOUT_SEED = 1234
DROPOUT = {("BERT-base", 512), ("GPT-2", 1024)}  # (label, L) of the shapes with a dropout case

IMPLS = {
    "eager": "forkattn.reference.attention: plain PyTorch matmul + masked softmax (+ dropout: torch's RNG) + matmul",
    "sdpa": "torch.nn.functional.scaled_dot_product_attention (a boolean mask for padding, is_causal for GPT)",
    "forkattn-*": "forkattn.attention(..., backend=<name>): forkattn's fused kernel (cpu: C++, cuda, triton)",
    "p=0: forkattn-*": f"dropout cases only: forkattn-<name> without dropout, the base of the dropout_p={DROPOUT_P} overhead",
}


def _eager_dropout(q, k, v, mask, causal, p):
    """The reference's eager attention, its dropout mask drawn by torch's generator."""
    allowed = reference.visible_keys(q.shape[0], q.shape[2], k.shape[2], causal=causal, key_padding_mask=mask,
                                     device=q.device)
    keep = torch.rand(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device) >= p
    return reference._attend(q, k, v, allowed, None, keep=keep, dropout_p=p)


def _impls(mask, causal, backends, dropout_p=0.0):
    """With dropout_p, every row drops with that p (a fixed seed for forkattn's rows, so each call
    does the same work) plus the first backend's row without dropout."""
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    drop = dict(dropout_p=dropout_p, seed=DROPOUT_SEED) if dropout_p else {}
    impls = {
        "eager": (lambda q, k, v: _eager_dropout(q, k, v, mask, causal, dropout_p)) if dropout_p else
        (lambda q, k, v: reference.attention(q, k, v, causal=causal, key_padding_mask=mask)),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal,
                                                               dropout_p=dropout_p),
    }
    for b in backends:
        impls[f"forkattn-{b}"] = (
            lambda q, k, v, b=b: forkattn.attention(q, k, v, causal=causal, key_padding_mask=mask, backend=b, **drop)
        )
    if dropout_p and backends:
        impls[f"p=0: forkattn-{backends[0]}"] = (
            lambda q, k, v: forkattn.attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backends[0])
        )
    return impls


def _bind(impls, q, k, v):
    """Zero-argument callables over these very tensors: forward, and forward+backward."""
    dout = torch.randn_like(q)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    fwd = {n: (lambda f=f: f(q, k, v)) for n, f in impls.items()}
    fwd_bwd = {n: (lambda f=f: torch.autograd.grad(f(qg, kg, vg), (qg, kg, vg), dout)) for n, f in impls.items()}
    return fwd, fwd_bwd


def _setup(B, H, L, D, dtype, causal, padded, device, seed, pass_, dropout_p=0.0):
    def build():
        gen = torch.Generator().manual_seed(seed)
        mask = None
        if padded:
            lengths = torch.randint(L // 2, L + 1, (B,), generator=gen)
            mask = (torch.arange(L)[None, :] < lengths[:, None]).to(device)
        q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        backends = fused_backends("attention", device, dtype, D, ("dropout",) if dropout_p else ())
        fwd, fwd_bwd = _bind(_impls(mask, causal, backends, dropout_p), q, k, v)
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
        passes = [("fwd", 0.0), ("fwd+bwd", 0.0)]
        if (label, L) in DROPOUT and size != "quick":
            passes.append(("fwd+bwd", DROPOUT_P))
        for pass_, p in passes:
            suffix = f", dropout {p}" if p else ""
            out.append(Case("attention", f"{name} {pass_}{suffix}",
                            flops=attention_flops(B, H, L, L, D, causal=causal, backward=pass_ != "fwd"),
                            params={**params, "pass": pass_, "dropout_p": p},
                            setup=_setup(B, H, L, D, dtype, causal, padded, device, seed, pass_, p),
                            chart=chart, panel=pass_ + suffix, x=f"L{L}", xlabel="sequence length"))
    return out
