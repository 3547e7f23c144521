"""The "triton" backend: forkattn/triton/'s kernels, on CUDA tensors, and on CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1: correct, slow; read at call time). Its kernel modules are
imported on the first call, so importing forkattn never loads (or fails on) Triton."""
from __future__ import annotations

from .. import triton as _triton
from .._layout import FLOAT_DTYPES
from .cuda import HEAD_DIMS
from .families import (AttentionBackend, AttentionVarlenBackend, DecodeBackend, KVAppendBackend,
                       MLMBackend)
from .families import DisentangledAttentionBackend
from .registry import FwdBwd, register


class _Triton:
    NAME = "triton"
    SUPPORTED_DEVICES = ("cuda",)
    PRIORITY = {"cuda": 100}
    INTERPRETED_ON = ("cpu",)
    ENV_VARS = ("TRITON_INTERPRET",)

    def available(self):
        return _triton.unavailable_reason()

    def device_reason(self, device_type):
        return _triton.device_ok(device_type)


class _TritonAttentionKernels(_Triton):  # forkattn/triton/attention.py: one set for both families
    SUPPORTED_DTYPES = FLOAT_DTYPES
    MAX_HEAD_DIM = 256


# both declare every feature of their family, dropout included (the family base classes list them)


@register
class TritonAttention(_TritonAttentionKernels, AttentionBackend):
    def make_impl(self):
        from ..triton import attention as kernels

        return FwdBwd(kernels.attention_fwd, kernels.attention_bwd)


@register
class TritonAttentionVarlen(_TritonAttentionKernels, AttentionVarlenBackend):
    def make_impl(self):
        from ..triton import attention as kernels

        return FwdBwd(kernels.attention_varlen_fwd, kernels.attention_varlen_bwd)


@register
class TritonDecode(_Triton, DecodeBackend):
    HEAD_DIMS = HEAD_DIMS  # built for the head dims of the CUDA decode kernels
    SPLITS_KV = True

    def rows_per_program(self):
        from ..triton.decode import ROWS

        return ROWS

    def make_impl(self):
        from ..triton.decode import decode_attention

        return decode_attention


@register
class TritonKVAppend(_Triton, KVAppendBackend):
    HEAD_DIMS = HEAD_DIMS

    def make_impl(self):
        from ..triton.decode import kv_append

        return kv_append


@register
class TritonMLM(_Triton, MLMBackend):
    def make_impl(self):
        from ..triton.mlm import mlm_mask_triton

        return mlm_mask_triton



@register
class TritonDisentangledAttention(_Triton, DisentangledAttentionBackend):
    SUPPORTED_DTYPES = FLOAT_DTYPES
    MAX_HEAD_DIM = 128  # forkattn/triton/disentangled.py's MAX_HEAD_DIM (not imported: no Triton at import)
    FEATURES = DisentangledAttentionBackend.FEATURES | {"dropout"}  # the plain attention's Philox mask

    def make_impl(self):
        from ..triton import disentangled as kernels

        return FwdBwd(kernels.disentangled_fwd, kernels.disentangled_bwd)
