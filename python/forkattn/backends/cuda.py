"""The "cuda" backend: forkattn._C's hand-written CUDA kernels (kernels/), in CUDA builds.

The attention kernels (and the disentangled-attention kernels) are opt-in until verified on a GPU: backend="cuda" names them, and
backend=None prefers them over Triton on CUDA tensors only when prefer_cuda_attention(True) was
called or, while it was not, FORKATTN_PREFER_CUDA_ATTENTION=1 is set (read at call time).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .. import _native
from .families import (AttentionBackend, AttentionVarlenBackend, DecodeBackend, DisentangledAttentionBackend,
                       KVAppendBackend, MLMBackend)
from .registry import FwdBwd, clear_caches, register

HEAD_DIMS = (32, 64, 128)  # what kernels/attention, kernels/decode and kernels/disentangled (fwd and bwd) are instantiated for
PREFER_ENV = "FORKATTN_PREFER_CUDA_ATTENTION"
_prefer: Optional[bool] = None  # None: follow PREFER_ENV


def prefer_cuda_attention(enabled: Optional[bool] = True) -> None:
    """Make backend=None pick the "cuda" attention kernels before "triton" on CUDA tensors (True),
    never (False), or follow the FORKATTN_PREFER_CUDA_ATTENTION environment variable (None, the
    default: "1" prefers them)."""
    global _prefer
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _prefer = enabled
    clear_caches()


def cuda_attention_preferred() -> bool:
    return _prefer if _prefer is not None else os.environ.get(PREFER_ENV, "0") == "1"


@functools.lru_cache(maxsize=None)
def _available() -> Optional[str]:  # process-constant: the build, and whether a GPU is visible
    if _native.ERROR is not None:
        return _native.ERROR
    if not _native.WITH_CUDA:
        return ("forkattn was built without CUDA kernels (build_info()['cuda'] is None); rebuild on a machine "
                "with nvcc and a CUDA torch, or with FORCE_CUDA=1")
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


class _Cuda:
    NAME = "cuda"
    SUPPORTED_DEVICES = ("cuda",)
    PRIORITY = {"cuda": 200}

    def available(self):
        return _available()


class _CudaKernels(_Cuda):
    SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
    HEAD_DIMS = HEAD_DIMS


class _OptIn:
    ENV_VARS = (PREFER_ENV,)

    def priority(self, device_type):
        return self.PRIORITY.get(device_type) if cuda_attention_preferred() else None


@register
class CudaAttention(_OptIn, _CudaKernels, AttentionBackend):
    def make_impl(self):  # dropout: the kernels draw kernels/common/philox.h's mask themselves
        return FwdBwd(_native._C.attention_fwd_cuda, _native._C.attention_bwd_cuda)


@register
class CudaAttentionVarlen(_OptIn, _CudaKernels, AttentionVarlenBackend):
    def make_impl(self):
        # cu_seqlens stay on the device: the kernels read them, the host never does
        return FwdBwd(_native._C.attention_varlen_fwd_cuda, _native._C.attention_varlen_bwd_cuda)


@register
class CudaDecode(_CudaKernels, DecodeBackend):
    SPLITS_KV = True

    def rows_per_program(self):
        return 16  # decode_kernel.cuh launches 16 rows per block (4 when there are at most 4)

    def make_impl(self):
        return _native._C.decode_attention_cuda


@register
class CudaKVAppend(_Cuda, KVAppendBackend):
    """Any dtype and head_dim: 16-byte copies when rows are aligned, element copies otherwise."""

    def make_impl(self):
        return _native._C.kv_append_cuda


@register
class CudaMLM(_Cuda, MLMBackend):
    def make_impl(self):
        return _native._C.mlm_mask_cuda


@register
class CudaDisentangledAttention(_OptIn, _CudaKernels, DisentangledAttentionBackend):
    """kernels/disentangled: tensor-core tiles with the c2p / p2c terms gathered per tile, no
    [Lq, Lk] matrix; the backward's position gradients are fp32 atomics (last bits may vary).
    Forward and backward at head_dim 32, 64 and 128 (HEAD_DIMS), fp16 and bf16. Dropout: the
    kernels' DROPOUT instantiations draw the plain attention's Philox mask themselves (fwd / bwd
    take dropout_p and seed last); checked by the emulator and compile checks only so far, not yet
    on a GPU."""

    FEATURES = DisentangledAttentionBackend.FEATURES | {"dropout"}

    def make_impl(self):
        return FwdBwd(_native._C.disentangled_attention_fwd_cuda, _native._C.disentangled_attention_bwd_cuda)
