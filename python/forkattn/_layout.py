"""Tensor layout helpers shared by the op modules and the kernels' Python launchers.

The lowest module of the package: it imports torch only, nothing else from forkattn, so the op
modules (attention.py, decode.py), the backends and forkattn/triton/ can all use it without
import cycles.
"""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the attention kernels take


def empty_bhld(like: Tensor, B: int, H: int, L: int, D: int, dtype=None) -> Tensor:
    """[B, H, L, D] with [B, L, H, D] memory: out.transpose(1, 2).reshape(B, L, H*D) is a view.
    Every attention backend returns its outputs and gradients in this layout."""
    return like.new_empty((B, L, H, D), dtype=dtype).transpose(1, 2)


def stride1(t: Tensor) -> Tensor:
    """Kernels read any strides except in the last dimension (head_dim): only a non-unit stride
    there costs a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
