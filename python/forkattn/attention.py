"""forkattn.attention: fused softmax attention for both sides of the BERT/GPT fork.

The backends (forkattn/backends/: eager, cpu, cuda, triton) implement the contract of
backends.families.AttentionBackend; the kernel backends are called through the custom ops
forkattn::attention_fwd / forkattn::attention_bwd, so autograd, torch.compile and opcheck see one op
whatever the backend, while "eager" (forkattn.reference.attention, plain PyTorch) is called as it is.
attention_varlen (packed sequences) is a second op family at the end of this file.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._checks import _values_checkable, check_dropout, key_padding_mask_as_bool, resolve_scale
from ._layout import FLOAT_DTYPES, empty_bhld, stride1

BACKENDS = backends.get("attention")
VARLEN_BACKENDS = backends.get("attention_varlen")


_FEATURES = backends.registry.feature_table("causal", "key_padding", "gqa", "dropout")
_VARLEN_FEATURES = backends.registry.feature_table("causal", "gqa", "dropout")


# --- argument checks: one place, messages that name the argument --------------------------------

def _check_qkv(q, k, v, ndim: int, layout: str) -> None:
    """Each of q, k, v is a floating tensor of rank `ndim`; k and v share q's dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def check_inputs(q, k, v, key_padding_mask=None, causal=False, scale=None) -> Tuple[Optional[Tensor], float]:
    """Raises on bad arguments; returns (key_padding_mask as bool or None, scale as a float)."""
    _check_qkv(q, k, v, 4, "[batch, heads, seq, head_dim]")
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
    mask = key_padding_mask_as_bool(key_padding_mask, B, k.shape[2], q.device)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return mask, resolve_scale(scale, D)


# --- the custom ops -------------------------------------------------------------------------------

@torch.library.custom_op("forkattn::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool, scale: float, backend: str,
    dropout_p: float = 0.0, seed: int = 0,
) -> Tuple[Tensor, Tensor]:
    """(out, lse): out in the layout of empty_bhld, lse float32 [B, H, Lq] (+inf on empty rows; dropout
    does not change it). dropout_p > 0: the probabilities are dropped with the Philox mask of `seed`
    (a signed int64; kernels/common/philox.h), and only then are dropout_p and seed passed on."""
    if dropout_p:
        return BACKENDS.impl(backend).fwd(q, k, v, key_padding_mask, causal, scale, dropout_p, seed)
    return BACKENDS.impl(backend).fwd(q, k, v, key_padding_mask, causal, scale)


@attention_fwd.register_fake
def _(q, k, v, key_padding_mask, causal, scale, backend, dropout_p=0.0, seed=0):
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
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the layout of empty_bhld; with dropout, of the forward's mask (regenerated from seed)."""
    if dropout_p:
        return BACKENDS.impl(backend).bwd(stride1(dout), q, k, v, out, lse, key_padding_mask, causal, scale,
                                          dropout_p, seed)
    return BACKENDS.impl(backend).bwd(stride1(dout), q, k, v, out, lse, key_padding_mask, causal, scale)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, causal, scale, backend, dropout_p=0.0, seed=0):
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    return empty_bhld(q, B, H, Lq, D), empty_bhld(k, B, Hkv, Lk, D), empty_bhld(v, B, Hkv, Lk, D)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, backend, *dropout = inputs  # (dropout_p, seed) when given
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.args = (causal, scale, backend, *dropout)  # the seed, never the mask: the backward redraws it
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, key_padding_mask, *ctx.args)
    return (dq, dk, dv) + (None,) * (len(ctx.args) + 1)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- public API ------------------------------------------------------------------------------------

def select_backend(q: Tensor, backend: Optional[str] = None) -> str:
    """The backend `attention(q, ..., backend=backend)` would use for these inputs."""
    return BACKENDS.resolve(backend, q.device.type, q.dtype, q.shape[-1]).NAME


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Softmax attention, SDPA layout: q [B, H, Lq, D], k and v [B, Hkv, Lk, D] -> [B, H, Lq, D].

    causal: query i attends to keys j <= i + (Lk - Lq) (bottom-right aligned, so with a KV
        cache the newest query sees every key). key_padding_mask: bool [B, Lk], True = attend
        (BERT's attention_mask); an integer 0/1 mask (transformers' int64 attention_mask) is
        accepted too, other values raise ValueError. A query row that sees no key returns zeros and gets zero
        gradients. Hkv may divide H (GQA/MQA). scale: a real number (int, float, NumPy scalar or
        0-d tensor; not bool), default head_dim ** -0.5. Keys hidden from every query (padding)
        may hold anything, inf and NaN included: they never reach an output or a gradient. A NaN
        in a query or a visible key makes NaN exactly the rows (and gradients) it reaches in
        eager PyTorch.
    dropout_p: attention dropout as SDPA's dropout_p: each probability is zeroed with probability
        dropout_p and the survivors scaled by 1 / (1 - dropout_p), after the softmax, before P @ V.
        The mask element of (b, h, i, j) is a pure function of the seed and those indices
        (kernels/common/philox.h), so every backend draws the same mask for a seed; the backward
        regenerates it from the seed. seed: an int (a signed int64 is its bit pattern); None draws
        a fresh one per call from `generator` (default: torch's default CPU generator, so
        torch.manual_seed reproduces a run). dropout_p=0 (the default) runs the kernels without
        dropout code. Backends with dropout: eager, cpu, triton, cuda.
    backend: None picks the fastest backend for the device, dtype and head_dim; or one of
        "eager", "cpu", "triton", "cuda" (an error names why a named backend cannot run).
        "cuda" (hand-written tensor-core kernels: CUDA builds, sm_80+, float16/bfloat16,
        head_dim 32/64/128; deterministic backward, no atomics) is opt-in for now: name it, or
        make backend=None prefer it on CUDA tensors with forkattn.backends.prefer_cuda_attention()
        or FORKATTN_PREFER_CUDA_ATTENTION=1 (read at call time).
    The output is [B, H, Lq, D] with [B, Lq, H, D] memory, so out.transpose(1, 2).reshape(B, Lq, H*D)
    is free. Strided inputs are read in place (only a non-unit stride in head_dim copies).
    """
    key_padding_mask, scale = check_inputs(q, k, v, key_padding_mask, causal, scale)
    dropout_p, seed = check_dropout(dropout_p, seed, generator)
    features = _FEATURES[causal, key_padding_mask is not None, k.shape[1] != q.shape[1], dropout_p > 0]
    b = BACKENDS.resolve(backend, q.device.type, q.dtype, q.shape[-1], features)
    if not b.CUSTOM_OP:
        return b.impl(q, k, v, key_padding_mask, causal, scale, dropout_p, seed)
    if key_padding_mask is not None:
        key_padding_mask = stride1(key_padding_mask)
    drop = (dropout_p, seed) if dropout_p else ()
    out, _ = attention_fwd(stride1(q), stride1(k), stride1(v), key_padding_mask, causal, scale, b.NAME, *drop)
    return out


# --- variable-length (packed) attention: the "attention_varlen" op family -------------------------
#
# FlashAttention's varlen convention: the sequences of a batch are packed along the first axis,
# q [total_q, H, D], k and v [total_k, Hkv, D]; sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
# of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v. Causal is bottom-right aligned per sequence.
# The backends' contract: backends.families.AttentionVarlenBackend.

def _check_cu_seqlens(name, cu, device) -> None:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D [batch + 1] with at least 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")


def _check_cu_values(name, c, total, max_name, max_seqlen) -> None:
    if c[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {c[0]}")
    lengths = [b - a for a, b in zip(c[:-1], c[1:])]
    bad = next((i for i, n in enumerate(lengths) if n < 0), None)
    if bad is not None:
        raise ValueError(f"{name} must be non-decreasing, got {name}[{bad}] = {c[bad]} > {name}[{bad + 1}] = {c[bad + 1]}")
    if c[-1] != total:
        raise ValueError(f"{name}[-1] must equal the packed length {total}, got {c[-1]}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is smaller than the longest sequence in {name} ({max(lengths)})")


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, scale=None,
                        values: bool = True) -> float:
    """Raises on bad arguments; returns scale as a float."""
    _check_qkv(q, k, v, 3, "[total, heads, head_dim] (packed varlen)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != q.shape[2] or q.shape[2] == 0:
        raise ValueError(f"head_dim must be equal and at least 1: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q's {q.shape[1]} heads must be a multiple of k's and v's {k.shape[1]} heads (GQA/MQA)")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{name} must be a non-negative int, got {m!r}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same batch + 1 entries, got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = resolve_scale(scale, q.shape[2])
    if values and _values_checkable(cu_seqlens_q):
        both = torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist()  # one host read for both
        _check_cu_values("cu_seqlens_q", both[0], q.shape[0], "max_seqlen_q", max_seqlen_q)
        _check_cu_values("cu_seqlens_k", both[1], k.shape[0], "max_seqlen_k", max_seqlen_k)
    return scale


@torch.library.custom_op("forkattn::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, causal: bool, scale: float, backend: str, dropout_p: float = 0.0, seed: int = 0
) -> Tuple[Tensor, Tensor]:
    """(out [total_q, H, D] contiguous, lse float32 [H, total_q], +inf on empty rows); dropout as attention_fwd."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    if dropout_p:
        return VARLEN_BACKENDS.impl(backend).fwd(*args, dropout_p, seed)
    return VARLEN_BACKENDS.impl(backend).fwd(*args)


@attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend, dropout_p=0.0, seed=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("forkattn::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, backend: str,
    dropout_p: float = 0.0, seed: int = 0
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous, shaped like q, k, v."""
    args = (stride1(dout), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    if dropout_p:
        return VARLEN_BACKENDS.impl(backend).bwd(*args, dropout_p, seed)
    return VARLEN_BACKENDS.impl(backend).bwd(*args)


@attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend,
      dropout_p=0.0, seed=0):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend, *dropout = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale, backend, *dropout)
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return (dq, dk, dv) + (None,) * (len(ctx.args) + 2)


attention_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
    validate_seqlens: bool = True,
) -> Tensor:
    """Attention over packed variable-length sequences (FlashAttention's varlen convention).

    q [total_q, H, D], k and v [total_k, Hkv, D] (Hkv divides H); cu_seqlens_q and cu_seqlens_k int32
    [batch + 1] on q's device, starting at 0, non-decreasing, ending at total_q / total_k; sequence b
    is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] against k, v[cu_seqlens_k[b]:cu_seqlens_k[b+1]].
    max_seqlen_q / max_seqlen_k: at least the longest sequence (they size the launch grid).
    causal is bottom-right aligned per sequence; a query with no visible key returns zeros.
    Returns [total_q, H, D], contiguous.

    Validation reads cu_seqlens' values on the host: free for CPU tensors, one device-to-host sync
    for CUDA tensors. It is skipped (the kernels then trust the caller) while torch.compile traces
    and during CUDA-graph capture, where a sync is not allowed. validate_seqlens=False skips it
    always: for callers that built cu_seqlens themselves on the host (the unpadded BERT encoder
    calls this once per layer with the same cu_seqlens; a sync per layer would stall the GPU).
    The CPU backend checks the values regardless (free on the host, and it indexes rows by them).
    backend: as for attention(); "cuda" (float16/bfloat16, head_dim 32/64/128) is opt-in like
    there: name it, or prefer it with forkattn.backends.prefer_cuda_attention() or
    FORKATTN_PREFER_CUDA_ATTENTION=1.
    dropout_p, seed, generator: as for attention(); sequence b's mask is that of batch row b, its
    query and key positions counted inside the sequence.
    """
    scale = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                values=validate_seqlens)
    dropout_p, seed = check_dropout(dropout_p, seed, generator)
    features = _VARLEN_FEATURES[causal, k.shape[1] != q.shape[1], dropout_p > 0]
    b = VARLEN_BACKENDS.resolve(backend, q.device.type, q.dtype, q.shape[-1], features)
    if not b.CUSTOM_OP:
        return b.impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, seed)
    drop = (dropout_p, seed) if dropout_p else ()
    out, _ = attention_varlen_fwd(
        stride1(q), stride1(k), stride1(v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
        b.NAME, *drop
    )
    return out
