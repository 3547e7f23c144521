"""Argument checks shared by attention, attention_varlen and decode_attention: one place, and
messages that name the argument."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale as a Python float: head_dim ** -0.5 for None; else any real scalar
    (int, float, NumPy scalar, 0-d real tensor), finite. bool and complex are refused."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, Tensor):
        if scale.dim() != 0:
            raise ValueError(f"scale must be a number or a 0-d tensor, got a tensor of shape {tuple(scale.shape)}")
        if scale.dtype == torch.bool or scale.dtype.is_complex:
            raise TypeError(f"scale must be a real number or None, got a {scale.dtype} tensor")
        value = float(scale.item())  # one device sync for a CUDA tensor
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        # bool is an int in Python (and np.bool_ is no numbers.Real): True as a scale is a bug
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    else:
        value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number or None, got {value!r}")
    return value


def _values_checkable(t: Tensor) -> bool:
    """Reading a tensor's values (cu_seqlens, an integer mask) needs them on the host: free on CPU,
    one sync on CUDA; skipped while torch.compile traces or a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return t.device.type != "meta"


def key_padding_mask_as_bool(mask: Optional[Tensor], batch: int, len_k: int, device) -> Optional[Tensor]:
    """key_padding_mask as bool [batch, len_k], True = attend. Accepts bool, or an integer 0/1 mask
    (transformers' int64 attention_mask); any other value raises. Checking an integer mask's
    values reads it on the host (one sync for a CUDA tensor; pass a bool mask to avoid it)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool or integer 0/1 Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and (mask.dtype.is_floating_point or mask.dtype.is_complex):
        raise TypeError(
            f"key_padding_mask must have dtype torch.bool or an integer dtype with values 0/1 (1 = attend), got {mask.dtype}")
    if tuple(mask.shape) != (batch, len_k):
        raise ValueError(f"key_padding_mask must have shape [batch, len_k] = {(batch, len_k)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on q's device {device}, got {mask.device}")
    if mask.dtype == torch.bool:
        return mask
    if _values_checkable(mask):
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            b, j = bad.nonzero()[0].tolist()
            raise ValueError(
                f"key_padding_mask must hold only 0 and 1 (1 = attend), got {mask[b, j].item()} at [{b}, {j}]")
    return mask != 0


_U64 = 1 << 64


def check_dropout(dropout_p, seed, generator) -> tuple:
    """Attention dropout's arguments -> (dropout_p as a float, seed as a signed int64, or 0 when
    dropout_p is 0). dropout_p: a real number in [0, 1). seed: an int (a signed int64 is taken as
    its bit pattern), or None: one fresh 64-bit seed is drawn per call from `generator` (a
    torch.Generator; None: torch's default CPU generator, so torch.manual_seed reproduces a run)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:  # also refuses NaN
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
        seed = int(seed)
        if not -(1 << 63) <= seed < _U64:
            raise ValueError(f"seed must be a 64-bit int (in [-2^63, 2^64)), got {seed}")
    if p == 0.0:
        return 0.0, 0
    if seed is None:
        device = generator.device if generator is not None else torch.device("cpu")
        lo, hi = torch.randint(0, 1 << 32, (2,), dtype=torch.int64, generator=generator, device=device).tolist()
        seed = lo | (hi << 32)
    seed &= _U64 - 1
    return p, seed - _U64 if seed >= (1 << 63) else seed
