"""attn_implementation="forkattn": forkattn's kernels inside transformers' own models.

    import forkattn.integrations.transformers          # registers "forkattn" (register() again is harmless)
    model = AutoModel.from_pretrained(path, attn_implementation="forkattn")
    model.set_attn_implementation("forkattn")          # or switch a loaded model

transformers (5.x) calls every model's attention through `AttentionInterface`, with the mask built
by the function `AttentionMaskInterface` holds under the same name. This module registers both:

- forkattn_mask hands the attention a 2-D bool padding mask [batch, kv_len] (True = attend) or
  None, never a 4-D mask: encoders (BERT, RoBERTa, DistilBERT) get their padding mask, decoders
  (GPT-2, Llama/Qwen/Mistral-style with grouped-query heads) get the padding mask and run causal.
  Causal is bottom-right aligned (query i sees keys j <= i + Lk - Lq), which is what a KV cache
  needs: DynamicCache just works. StaticCache allocates max_cache_len slots: a decode step gets the
  mask padded to all slots (unwritten ones masked, so the shape stays static for torch.compile);
  a prefill gets the mask of the written length and the attention slices k and v to it. Left
  padding: padded keys are masked; a padded query row sees no key and returns zeros (its output
  is never used; sdpa returns something else there, which is equally unused).
- forkattn_attention_forward calls forkattn.attention (GQA native, no repeat_kv), whose custom ops
  give backward and torch.compile(fullgraph=True) without graph breaks. Its backend is chosen as
  in forkattn's own models (forkattn/models/backend.py): `model.config.attention_backend` ("eager",
  "cpu", "cuda", "triton") pins one, unset or None lets forkattn pick the fastest. A pinned
  backend that cannot run a call raises BackendUnavailableError instead of falling back.

Encoders keep the padded layout (key_padding_mask), not unpacked varlen: measured on CPU (one
thread, lengths uniform in L/2..L, attention alone), unpadding q/k/v, attention_varlen and
re-padding the output in every layer was on par with the key-padding kernel at L128 (B8 H12: 33.4
vs 32.1 ms median; B32: 121.5 vs 118.1 ms) and ~15% faster at B4 L512 (147 vs 175 ms), while its
data-dependent shapes (nonzero, max length) break torch.compile graphs. forkattn's own BertModel
unpads once per forward instead, which is where unpadding pays.

Attention dropout: the `dropout` transformers' attention modules hand over (their
attention_probs_dropout_prob / attn_pdrop / attention_dropout, 0 in eval) becomes forkattn's
dropout_p when the module is in training mode, as transformers' eager attention applies it
(`training=module.training`); a fresh seed per call from torch's default generator, so
torch.manual_seed reproduces a training run. forkattn's masks are Philox ones, not torch's
bernoulli: same statistics, different draws than sdpa's or eager's. Every backend has dropout
(eager, cpu, triton, cuda: the same Philox mask on each).
The seed is drawn on the host per call, so torch.compile graph-breaks there in training with
dropout (fullgraph=True refuses it; the default compile runs and reproduces eager's outputs);
eval and dropout 0 compile in one graph as before.

What forkattn cannot do yet, per case:
- masks forkattn cannot express (sliding windows, chunked attention, packed sequences found from
  position_ids, image-token overlays, a 4-D mask passed by the caller): forkattn_mask asks sdpa's
  mask function for them, and a 4-D mask falls back to sdpa, one warning. sdpa_mask returns None
  only where the pattern is plain causal, which forkattn then runs.
- position_bias (T5-style additive bias), value head_dim != query head_dim, dtypes other than
  float32/float16/bfloat16, or no forkattn backend for the device/head_dim: sdpa, one warning.
- soft-capping (softcap), attention sinks (s_aux): ValueError (sdpa cannot either; use "eager").
- output_attentions=True: ValueError (forkattn never forms the attention matrix; use "eager").
- sliding_window given to a layer whose mask is not a sliding one, with keys beyond the window:
  ValueError (never a silently wrong answer).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

try:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        sdpa_mask,
    )
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # transformers is optional for forkattn, required for this module
    raise ImportError(
        "forkattn.integrations.transformers needs the transformers package (5.x): pip install 'transformers>=5'. "
        f"The rest of forkattn works without it. ({e})"
    ) from e

import forkattn
from forkattn import BackendUnavailableError
from forkattn.models.backend import attention_backend

NAME = "forkattn"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f'attn_implementation="{NAME}": {reason}; this call falls back to sdpa', stacklevel=3)


# --- the mask function ----------------------------------------------------------------------------

def forkattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=causal_mask_function, attention_mask: Optional[Tensor] = None, **kwargs):
    """AttentionMaskInterface entry: a 2-D bool [batch, n] padding mask or None (see the module doc);
    sdpa's 4-D mask (or its None) for patterns other than plain causal / bidirectional."""
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    if not plain or not (isinstance(kv_offset, int) and kv_offset == 0):
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    device = kwargs.get("device", "cpu")
    if attention_mask is None:
        # no padding; a static cache holds more slots (kv_length) than written ones (q_offset + q_length)
        static = isinstance(q_offset, Tensor) or q_offset + q_length < kv_length
        if not static:
            return None
        if q_length == 1:  # decode: mask the unwritten slots, keep kv_length (a static shape)
            return (torch.arange(kv_length, device=device) <= q_offset).expand(batch_size, kv_length)
        return torch.ones(batch_size, int(q_offset) + q_length, dtype=torch.bool, device=device)
    m = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    n = m.shape[-1]
    if n > kv_length:
        m = m[:, -kv_length:]
    elif n < kv_length and q_length == 1:  # static-cache decode: unwritten slots masked
        m = torch.nn.functional.pad(m, (0, kv_length - n))
    # (n < kv_length with q_length > 1: static-cache prefill; the attention slices k and v to n)
    if m.shape[-1] == kv_length and not torch.compiler.is_compiling() and bool(m.all()):
        return None  # no padding: the unmasked kernel path
    return m


# --- the attention function -----------------------------------------------------------------------

def _fallback_reason(query, key, value, attention_mask, kwargs, backend: Optional[str]) -> Optional[str]:
    if attention_mask is not None and attention_mask.dim() != 2:
        return (f"a {attention_mask.dim()}-D attention mask (a pattern forkattn cannot express: sliding window, "
                "chunked or packed sequences, or a caller's own mask)")
    if kwargs.get("position_bias") is not None:
        return "position_bias (an additive attention bias)"
    if value.shape[-1] != query.shape[-1]:
        return f"value head_dim {value.shape[-1]} != query head_dim {query.shape[-1]}"
    if query.dtype not in _FLOAT_DTYPES:
        return f"dtype {query.dtype} (forkattn runs float32, float16, bfloat16)"
    try:
        forkattn.select_backend(query, backend)
    except BackendUnavailableError as e:
        if backend is not None:
            raise  # pinned by config.attention_backend: the caller asked for this backend
        return f"no forkattn backend for these inputs ({e})"
    return None


def _to_4d(mask: Optional[Tensor], causal: bool, Lq: int, Lk: int, device):
    """sdpa's bool [B, 1, Lq, Lk] mask for our 2-D mask + bottom-right causal, and the rows that
    see no key (given one key so sdpa stays finite; their output is zeroed afterwards)."""
    m = None if mask is None else mask[:, None, None, :]
    if causal and Lq > 1:
        tri = torch.arange(Lq, device=device)[:, None] + (Lk - Lq) >= torch.arange(Lk, device=device)[None, :]
        m = tri[None, None] if m is None else m & tri
    if m is None:
        return None, None
    empty = ~m.any(-1, keepdim=True)
    return m | empty, empty


def _sdpa_fallback(module, query, key, value, mask, dropout, scaling, causal, kwargs):
    if mask is not None and mask.dim() == 4:  # a pattern from sdpa_mask or the caller: theirs to apply
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      is_causal=causal, **kwargs)
    if mask is not None and mask.shape[-1] < key.shape[2]:
        key, value = key[:, :, : mask.shape[-1]], value[:, :, : mask.shape[-1]]
    m4, empty = _to_4d(mask, causal, query.shape[2], key.shape[2], query.device)
    out, w = sdpa_attention_forward(module, query, key, value, m4, dropout=dropout, scaling=scaling,
                                    is_causal=False, **kwargs)
    if empty is not None:
        out = out.masked_fill(empty.transpose(1, 2).expand(-1, out.shape[1], -1, -1), 0)  # [B, Lq, 1, 1]
    return out, w


def forkattn_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                               attention_mask: Optional[Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """AttentionInterface entry: query [B, H, Lq, D], key and value [B, Hkv, Lk, D] (Hkv divides H)
    -> (attn_output [B, Lq, H, D], None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f'attn_implementation="{NAME}" does not support attention logit soft-capping '
                         f'(softcap={kwargs["softcap"]}): use attn_implementation="eager"')
    if kwargs.get("s_aux") is not None:
        raise ValueError(f'attn_implementation="{NAME}" does not support attention sinks (s_aux): '
                         'use attn_implementation="eager"')
    if kwargs.get("output_attentions"):
        raise ValueError(f'attn_implementation="{NAME}" never forms the attention weights, so output_attentions=True '
                         'cannot be served: use attn_implementation="eager" for that call')
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    mask = attention_mask
    if mask is not None and mask.dim() == 2 and mask.dtype != torch.bool:
        mask = mask != 0  # transformers' int 0/1 masks; forkattn takes bool
    backend = attention_backend(getattr(module, "config", None))
    why = _fallback_reason(query, key, value, mask, kwargs, backend)
    if why is not None:
        _warn_once(why)
        return _sdpa_fallback(module, query, key, value, mask, dropout, scaling, causal, kwargs)
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise ValueError(f'attn_implementation="{NAME}": this layer has sliding_window={window} and {key.shape[2]} keys, '
                         "but its mask is not a sliding-window one; forkattn has no sliding windows")
    B = query.shape[0]
    if mask is not None:
        n = mask.shape[-1]
        if n < key.shape[2]:  # static-cache prefill: only the first n slots are written
            key, value = key[:, :, :n], value[:, :, :n]
        elif n > key.shape[2]:
            raise ValueError(f"attention_mask covers {n} keys but the layer has {key.shape[2]}")
        if mask.shape[0] != B:
            mask = mask.expand(B, n)
    # dropout in training only, as transformers' eager attention (module.training), whatever the caller passed
    p = float(dropout) if dropout and getattr(module, "training", False) else 0.0
    out = forkattn.attention(query, key, value, causal=causal, key_padding_mask=mask, dropout_p=p,
                             scale=None if scaling is None else float(scaling), backend=backend)
    return out.transpose(1, 2), None  # [B, Lq, H, D] view of the kernel's [B, Lq, H, D] memory


def register(name: str = NAME) -> None:
    """Registers the attention and mask functions under `name` (done once at import)."""
    AttentionInterface.register(name, forkattn_attention_forward)
    AttentionMaskInterface.register(name, forkattn_mask)


register()
