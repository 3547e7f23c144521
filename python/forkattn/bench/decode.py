"""Decode attention over a KV cache: eager (matmul over the cache slice), SDPA over the padded cache,
and forkattn's backends, side by side. TB/s = (K and V bytes read + q + out) / time, 1e12.

GPU shapes are the issue's H200 anchors; one extra case has ragged lengths,
where SDPA must pad to the longest sequence and mask while ours reads each sequence's own length.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from ..decode import KVCache, decode_attention
from .core import Case, fused_backends

# name, B, H, Hkv, D, context (or (lo, hi) for ragged), dtype; a chart per (dtype, B H D) across context
GPU_SHAPES = [
    ("B64 H12 D64 ctx1024", 64, 12, 12, 64, 1024, torch.float16),
    ("B16 H32 D128 ctx4096", 16, 32, 32, 128, 4096, torch.float16),
    ("B8 H32 D128 ctx32768", 8, 32, 32, 128, 32768, torch.float16),
    ("B1 H32 D128 ctx32768", 1, 32, 32, 128, 32768, torch.float16),
    ("B16 H32 D128 ragged 512..8192", 16, 32, 32, 128, (512, 8192), torch.float16),
    ("B16 H32/Hkv8 D128 ctx4096 GQA", 16, 32, 8, 128, 4096, torch.float16),
]
GPU_QUICK = [
    ("B8 H12 D64 ctx1024", 8, 12, 12, 64, 1024, torch.float16),
    ("B4 H12 D64 ragged 64..1024", 4, 12, 12, 64, (64, 1024), torch.float16),
]
CPU_SHAPES = [(f"B4 H12 D64 ctx{c} fp32", 4, 12, 12, 64, c, torch.float32) for c in (256, 1024, 4096)] + [
    ("B1 H16 D128 ctx4096 fp32", 1, 16, 16, 128, 4096, torch.float32),
    ("B8 H8 D64 ragged 128..2048 fp32", 8, 8, 8, 64, (128, 2048), torch.float32),
    ("B4 H16/Hkv4 D64 ctx1024 GQA fp32", 4, 16, 4, 64, 1024, torch.float32),
    ("B4 H12 D64 ctx1024 bf16", 4, 12, 12, 64, 1024, torch.bfloat16),
]
CPU_FULL = CPU_SHAPES + [
    ("B4 H12 D64 ctx16384 fp32", 4, 12, 12, 64, 16384, torch.float32),
    ("B4 H12 D64 ctx4096 bf16", 4, 12, 12, 64, 4096, torch.bfloat16),
]
CPU_QUICK = [
    ("B2 H4 D64 ctx256 fp32", 2, 4, 4, 64, 256, torch.float32),
    ("B4 H4 D64 ragged 32..256 fp32", 4, 4, 4, 64, (32, 256), torch.float32),
]

IMPLS = {
    "eager": "forkattn.decode_attention(backend='eager'): PyTorch matmul + softmax over each cache slice",
    "sdpa": "scaled_dot_product_attention over the cache padded to the longest context (a mask when ragged)",
    "forkattn-*": "forkattn.decode_attention(..., backend=<name>): fused decode kernel reading each sequence's own length",
}


def _lengths(B, ctx):
    if not isinstance(ctx, tuple):
        return torch.full((B,), ctx)
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = torch.randint(ctx[0], ctx[1] + 1, (B,), generator=g)
    lens[0] = ctx[1]
    return lens


def _make_case(device, name, B, H, Hkv, D, ctx, dtype, T=1) -> Case:
    esize = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * int(_lengths(B, ctx).sum()) * Hkv * D * esize
    dt = str(dtype)[6:]
    uniform = not isinstance(ctx, tuple) and Hkv == H
    x = name.removesuffix(" fp32").removesuffix(" bf16").replace(" ctx", "\nctx").replace(" ragged", "\nragged")
    return Case("decode", name, bytes=kv_bytes + 2 * B * H * T * D * esize,
                params={"B": B, "H": H, "Hkv": Hkv, "D": D, "context": str(ctx), "dtype": dt, "T": T},
                setup=lambda: _fns(device, B, H, Hkv, D, ctx, dtype, T),
                chart=f"{dt}, {'one context per batch' if uniform else 'ragged contexts and GQA'}", x=x,
                xlabel="batch, heads, head dim, context")


def _fns(device, B, H, Hkv, D, ctx, dtype, T):
    lens = _lengths(B, ctx)
    max_len = int(lens.max())
    # check=False: a decode step in a generation loop does not re-validate the cache (no host sync)
    cache = KVCache(B, Hkv, max_len, D, dtype=dtype, device=device, check=False)
    cache.k_cache.normal_()
    cache.v_cache.normal_()
    cache.seqlens.copy_(lens.to(torch.int32))
    cache.seqlen_bound = max_len
    q = torch.randn(B, H, T, D, device=device, dtype=dtype)

    fns = {"eager": lambda: decode_attention(q, cache, backend="eager")}
    # SDPA over the padded cache: a user keeps the key-padding mask across layers, so it is built once
    k_pad, v_pad = cache.k_cache[:, :, :max_len], cache.v_cache[:, :, :max_len]
    mask = None
    if int(lens.min()) != max_len:
        mask = (torch.arange(max_len)[None, :] < lens[:, None]).to(device)[:, None, None, :]
    gqa = {"enable_gqa": True} if Hkv != H else {}
    fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k_pad, v_pad, attn_mask=mask, **gqa)
    for backend in fused_backends("decode_attention", device, dtype, D, ("gqa",) if Hkv != H else ()):
        fns[f"forkattn-{backend}"] = (lambda be: lambda: decode_attention(q, cache, backend=be))(backend)
    return fns


def cases(device: torch.device, size: str = "default") -> List[Case]:
    if device.type == "cuda":
        shapes = GPU_QUICK if size == "quick" else GPU_SHAPES
    else:
        shapes = {"quick": CPU_QUICK, "default": CPU_SHAPES, "full": CPU_FULL}[size]
    return [_make_case(device, *s) for s in shapes]
