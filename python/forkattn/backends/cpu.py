"""The "cpu" backend: forkattn._C's fused C++ kernels (csrc/), for CPU tensors."""
from __future__ import annotations

import torch

from .. import _native
from .families import (AttentionBackend, AttentionVarlenBackend, DecodeBackend, DisentangledAttentionBackend,
                       KVAppendBackend, MLMBackend)
from .registry import FwdBwd, register

MAX_HEAD_DIM = 256  # csrc's attention and decode kernels keep a row of head_dim in registers


class _Cpu:
    NAME = "cpu"
    SUPPORTED_DEVICES = ("cpu",)
    PRIORITY = {"cpu": 100}

    def available(self):
        return _native.ERROR  # None once _C is loaded: the CPU kernels are always compiled in


@register
class CpuAttention(_Cpu, AttentionBackend):
    MAX_HEAD_DIM = MAX_HEAD_DIM

    def make_impl(self):
        return FwdBwd(_native._C.attention_fwd_cpu, _native._C.attention_bwd_cpu)


@register
class CpuAttentionVarlen(_Cpu, AttentionVarlenBackend):
    MAX_HEAD_DIM = MAX_HEAD_DIM

    def make_impl(self):
        # one call for all sequences: the C++ kernel schedules (sequence, head, query block) tasks
        return FwdBwd(_native._C.attention_varlen_fwd_cpu, _native._C.attention_varlen_bwd_cpu)


@register
class CpuDecode(_Cpu, DecodeBackend):
    MAX_HEAD_DIM = MAX_HEAD_DIM
    CHECKS_CACHE = True  # csrc/decode.cpp validates seqlens and block_table on every call

    def make_impl(self):
        return _native._C.decode_attention_cpu


@register
class CpuKVAppend(_Cpu, KVAppendBackend):
    MAX_HEAD_DIM = MAX_HEAD_DIM

    def make_impl(self):
        return _native._C.kv_append_cpu


@register
class CpuMLM(_Cpu, MLMBackend):
    def make_impl(self):
        return _native._C.mlm_mask_cpu


@register
class CpuDisentangledAttention(_Cpu, DisentangledAttentionBackend):
    """csrc/cpu/disentangled_cpu.cpp: tiled online softmax with the relative terms gathered per tile."""

    SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    MAX_HEAD_DIM = MAX_HEAD_DIM
    # dropout: fwd / bwd take dropout_p and seed last and draw the plain attention's Philox mask
    FEATURES = DisentangledAttentionBackend.FEATURES | {"dropout"}

    def make_impl(self):
        return FwdBwd(_native._C.disentangled_attention_fwd_cpu, _native._C.disentangled_attention_bwd_cpu)
