"""forkattn.attention: fused softmax attention for both sides of the BERT/GPT fork.

Each backend provides `fwd(q, k, v, key_padding_mask, causal, scale) -> (out, lse)` and
`bwd(dout, q, k, v, out, lse, key_padding_mask, causal, scale) -> (dq, dk, dv)`, and is called
through the custom ops forkattn::attention_fwd / forkattn::attention_bwd, so autograd,
torch.compile and opcheck see one op whatever the backend. The "eager" backend is
forkattn.reference.attention, plain PyTorch.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import reference
from ._native import _C
from .backends import cuda_available, native_available, op_backends

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AttentionImpl(NamedTuple):
    fwd: object
    bwd: object


# The hand-written CUDA kernels ("cuda") are opt-in until verified on a GPU: backend="cuda"
# names them, FORKATTN_PREFER_CUDA_ATTENTION=1 (read at import) puts them first for backend=None.
PREFER_CUDA = os.environ.get("FORKATTN_PREFER_CUDA_ATTENTION", "0") == "1"
BACKENDS = op_backends("attention", {"cpu": ["cpu"], "cuda": ["cuda", "triton"] if PREFER_CUDA else ["triton"]})


def _cpu_supports(*, device_type, dtype, head_dim, **_):
    if device_type != "cpu":
        return f"runs CPU tensors only, got {device_type} tensors"
    if head_dim > 256:
        return f"head_dim must be at most 256, got {head_dim}"
    return None


BACKENDS.register("eager", available=lambda: None, supports=lambda **_: None)
BACKENDS.register(
    "cpu",
    available=native_available,
    supports=_cpu_supports,
    impl=AttentionImpl(_C.attention_fwd_cpu, _C.attention_bwd_cpu),
)


CUDA_HEAD_DIMS = (32, 64, 128)


def _cuda_supports(*, device_type, dtype, head_dim, **_):
    if device_type != "cuda":
        return f"runs CUDA tensors only, got {device_type} tensors"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"runs float16 and bfloat16 only, got {dtype}"
    if head_dim not in CUDA_HEAD_DIMS:
        return f"head_dim must be 32, 64 or 128, got {head_dim}"
    return None


BACKENDS.register(
    "cuda",
    available=cuda_available,
    supports=_cuda_supports,
    # present only in CUDA builds; cuda_available() says why not otherwise
    impl=AttentionImpl(getattr(_C, "attention_fwd_cuda", None), getattr(_C, "attention_bwd_cuda", None)),
)


def empty_bhld(like: Tensor, B: int, H: int, L: int, D: int, dtype=None) -> Tensor:
    """[B, H, L, D] with [B, L, H, D] memory: out.transpose(1, 2).reshape(B, L, H*D) is a view.
    Every backend returns its outputs and gradients in this layout."""
    return like.new_empty((B, L, H, D), dtype=dtype).transpose(1, 2)


# --- argument checks: one place, messages that name the argument --------------------------------

def _describe(t) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__


def check_inputs(q, k, v, key_padding_mask=None, causal=False, scale=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    B, H, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"head_dim differs: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"q's {H} heads must be a multiple of k's and v's {k.shape[1]} heads (GQA/MQA)")
    if D == 0:
        raise ValueError("head_dim must be at least 1, got 0")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, Tensor):
            raise TypeError(f"key_padding_mask must be a bool Tensor or None, got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool (True = attend), got {m.dtype}")
        if tuple(m.shape) != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape [batch, len_k] = {(B, k.shape[2])}, got {tuple(m.shape)}")
        if m.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {m.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")


def _stride1(t: Tensor) -> Tensor:
    """Kernels read any strides except in head_dim; only a non-unit stride there costs a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# --- the custom ops -------------------------------------------------------------------------------

@torch.library.custom_op("forkattn::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool, scale: float, backend: str
) -> Tuple[Tensor, Tensor]:
    """(out, lse): out in the layout of empty_bhld, lse float32 [B, H, Lq] (+inf on empty rows)."""
    return BACKENDS.impl(backend).fwd(q, k, v, key_padding_mask, causal, scale)


@attention_fwd.register_fake
def _(q, k, v, key_padding_mask, causal, scale, backend):
    B, H, Lq, D = q.shape
    return empty_bhld(q, B, H, Lq, D), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("forkattn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the layout of empty_bhld."""
    return BACKENDS.impl(backend).bwd(_stride1(dout), q, k, v, out, lse, key_padding_mask, causal, scale)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, causal, scale, backend):
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    return empty_bhld(q, B, H, Lq, D), empty_bhld(k, B, Hkv, Lk, D), empty_bhld(v, B, Hkv, Lk, D)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- public API ------------------------------------------------------------------------------------

def select_backend(q: Tensor, backend: Optional[str] = None) -> str:
    """The backend `attention(q, ..., backend=backend)` would use for these inputs."""
    return BACKENDS.resolve(backend, q.device.type, dtype=q.dtype, head_dim=q.shape[-1])


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Softmax attention, SDPA layout: q [B, H, Lq, D], k and v [B, Hkv, Lk, D] -> [B, H, Lq, D].

    causal: query i attends to keys j <= i + (Lk - Lq) (bottom-right aligned, so with a KV
        cache the newest query sees every key). key_padding_mask: bool [B, Lk], True = attend
        (BERT's attention_mask). A query row that sees no key returns zeros and gets zero
        gradients. Hkv may divide H (GQA/MQA). scale defaults to head_dim ** -0.5.
    backend: None picks the fastest backend for the device, dtype and head_dim; or one of
        "eager", "cpu", "triton", "cuda" (an error names why a named backend cannot run).
        "cuda" (hand-written tensor-core kernels: CUDA builds, sm_80+, float16/bfloat16,
        head_dim 32/64/128; deterministic backward, no atomics) is opt-in for now: name it, or
        set FORKATTN_PREFER_CUDA_ATTENTION=1 before importing forkattn to make backend=None
        prefer it on CUDA tensors.
    The output is [B, H, Lq, D] with [B, Lq, H, D] memory, so out.transpose(1, 2).reshape(B, Lq, H*D)
    is free. Strided inputs are read in place (only a non-unit stride in head_dim copies).
    """
    check_inputs(q, k, v, key_padding_mask, causal, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = select_backend(q, backend)
    if name == "eager":
        return reference.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if key_padding_mask is not None:
        key_padding_mask = _stride1(key_padding_mask)
    out, _ = attention_fwd(_stride1(q), _stride1(k), _stride1(v), key_padding_mask, causal, scale, name)
    return out
