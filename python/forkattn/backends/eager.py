"""The "eager" backend: forkattn.reference in plain PyTorch, on every device, for every op family.
The fallback of backend=None, and the baseline the benchmarks and tests compare with."""
from __future__ import annotations

import torch

from .. import reference
from .families import (AttentionBackend, AttentionVarlenBackend, DecodeBackend, KVAppendBackend,
                       MLMBackend)
from .families import DisentangledAttentionBackend
from .registry import register


class _Eager:
    NAME = "eager"
    FALLBACK = True


@register
class EagerAttention(_Eager, AttentionBackend):
    CUSTOM_OP = False  # autograd runs through the reference's own ops

    def make_impl(self):
        def attention(q, k, v, key_padding_mask, causal, scale, dropout_p, seed):
            return reference.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                       dropout_p=dropout_p, seed=seed)
        return attention


@register
class EagerAttentionVarlen(_Eager, AttentionVarlenBackend):
    CUSTOM_OP = False

    def make_impl(self):
        def attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed):
            return reference.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, scale=scale, dropout_p=dropout_p,
                                              seed=seed)
        return attention_varlen


@register
class EagerDecode(_Eager, DecodeBackend):
    HOST_LENGTH_BOUND = True  # one matmul over a padded slice: as long as the longest sequence, not the cache

    def make_impl(self):
        def decode_attention(q, k_cache, v_cache, seqlens, block_table, o_partial, lse_partial, max_seqlen,
                             num_splits, scale):
            return reference.decode_attention(q, k_cache, v_cache, seqlens, block_table, max_seqlen, scale=scale)
        return decode_attention


@register
class EagerKVAppend(_Eager, KVAppendBackend):
    def make_impl(self):
        return reference.kv_append


@register
class EagerMLM(_Eager, MLMBackend):
    """transformers' recipe (reference.mlm_mask): same statistics as the kernels, its own random stream."""

    CUSTOM_OP = False
    FEATURES = frozenset()
    MISSING_FEATURE = "{feature} is not in the eager baseline (use cpu, cuda or triton)"

    def make_impl(self):
        def mlm_mask(input_ids, *, seed, generator, inplace, **kw):
            if seed is not None:
                generator = torch.Generator(device=input_ids.device)
                generator.manual_seed(seed)
            masked, lab = reference.mlm_mask(input_ids, generator=generator, **kw)
            if inplace:
                input_ids.copy_(masked)
                return input_ids, lab
            return masked, lab
        return mlm_mask


@register
class EagerDisentangledAttention(_Eager, DisentangledAttentionBackend):
    """reference.disentangled_attention_indexed: materialises the scores (the kernels' baseline);
    dropout from philox.dropout_keep, the kernels' mask."""

    CUSTOM_OP = False
    FEATURES = DisentangledAttentionBackend.FEATURES | {"dropout"}

    def make_impl(self):
        return reference.disentangled_attention_indexed
