"""GPT-2 on forkattn: the model and its transformers-compatible checkpoints.

One file, nanoGPT style: `GPTConfig` (a transformers GPT-2 config.json), `GPT` (token + learned
position embeddings, pre-LN blocks of causal attention and a GELU MLP, final LayerNorm, LM head
tied to the token embedding). Parameter names are transformers' GPT2LMHeadModel names, so
`from_pretrained` / `save_pretrained` are a key mapping plus a transpose of the Conv1D weights
(transformers stores them [in, out]; nn.Linear stores [out, in]).

Attention goes through forkattn.attention (causal, with the attention_mask as key padding mask) on
the backend config.attention_backend names (models/backend.py). `generate` comes from
models/generation.py's GenerationMixin, which drives the model through `prefill` and
`decode_step` with a KV cache in every layer's attention.

Dropout as transformers': embd_pdrop, resid_pdrop, and attn_pdrop on the attention probabilities in
training mode through forkattn.attention's dropout_p (each layer's attn.attn_dropout, an
AttentionDropout from models/dropout.py: a fresh seed per call from torch's default generator, so
torch.manual_seed reproduces a run). The KV-cache path (prefill / decode_step, generate) is
inference: generate switches to eval, and cache.attend never drops.

Not modelled: cross-attention, reorder_and_upcast_attn (attention is computed in fp32 inside the
kernels anyway).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import forkattn

from .activations import activation, check_activation
from .backend import FIELDS as BACKEND_FIELDS
from .backend import SAME, attention_backend, check_backend, decode_backend, set_backends
from . import cpu_inference_gpt as fast
from .checkpoint import load_state, model_folder, read_state_dict, write_folder
from .dropout import AttentionDropout
from .generation import GenerationMixin, KVCacheBase
from .outputs import CausalLMOutput

# ------------------------------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # MLP width, None = 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1  # on the attention probabilities, in training
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    pad_token_id: Optional[int] = None
    extra: Dict = field(default_factory=dict, repr=False)  # other config.json keys, written back
    # runtime choices, not written to config.json (models/backend.py): None = fastest available
    attention_backend: Optional[str] = None
    decode_backend: Optional[str] = SAME  # the KV-cache ops of generate; "same" = attention_backend

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        check_activation(self.activation_function, "activation_function")
        check_backend(self.attention_backend)
        check_backend(self.decode_backend, "decode_backend", allow_same=True)
        if not self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=False is not supported: the LM head is the token embedding")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        d = dict(d)
        mt = d.get("model_type", "gpt2")
        if mt != "gpt2":
            raise ValueError(f"config model_type must be 'gpt2', got {mt!r}")
        if d.get("add_cross_attention"):
            raise ValueError("add_cross_attention=True (encoder-decoder GPT-2) is not supported")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        return cls(**known, extra=d)

    @classmethod
    def from_json(cls, path: str) -> "GPTConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra" and k not in BACKEND_FIELDS}
        out = dict(self.extra)
        out.update(d)
        out["model_type"] = "gpt2"
        out.setdefault("architectures", ["GPT2LMHeadModel"])
        return out


# ------------------------------------------------------------------------------------------------
# model


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer_idx, self.config = config.n_head, config.head_dim, layer_idx, config
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = AttentionDropout(config.attn_pdrop, "attn_pdrop")
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    @property
    def backend(self) -> Optional[str]:
        """forkattn.attention's backend: config.attention_backend (None = fastest available)."""
        return attention_backend(self.config)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, cache=None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, T, D]
        if cache is None:
            y = forkattn.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=self.scale,
                                   backend=self.backend, **self.attn_dropout.kwargs())
        else:  # inference (generate): no attention dropout
            y = cache.attend(self.layer_idx, q, k, v, scale=self.scale, backend=self.backend)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.act = activation(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, cache=None) -> Tensor:
        if fast.enabled(self, x):  # eval, no autograd, fp32 CPU: models/cpu_inference_gpt.py
            return fast.block_forward(self, x, key_padding_mask, cache)
        x = x + self.attn(self.ln_1(x), key_padding_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(GenerationMixin, nn.Module):
    def __init__(self, config: GPTConfig, *, backend: Optional[str] = None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))
        if backend is not None:
            self.set_backend(backend)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)

    def set_backend(self, backend: Optional[str], decode_backend: Optional[str] = SAME) -> "GPT":
        """forkattn.attention backend for every layer ("eager", "cpu", "cuda", "triton", None = auto),
        and the backend of the KV-cache ops during generate (forkattn.KVCache.append and
        forkattn.decode_attention; "same" = the attention backend): config.attention_backend and
        config.decode_backend (models/backend.py)."""
        set_backends(self.config, backend, decode_backend)
        return self

    def set_attention_backend(self, backend: Optional[str]) -> None:
        """As BertModel's: the attention backend, with the KV-cache ops following it."""
        set_backends(self.config, backend)

    @property
    def backend(self) -> Optional[str]:
        return attention_backend(self.config)

    @property
    def decode_backend(self) -> Optional[str]:
        return decode_backend(self.config)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied head is counted once
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        cache: Optional[KVCacheBase] = None,
    ) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (1/True = token, 0 = padding; padded keys are
        never attended); labels [B, T] (the loss predicts labels[:, t+1] from position t; -100 is
        ignored); position_ids default to 0..T-1 as in transformers' forward (pass
        `attention_mask.cumsum(-1) - 1` for left-padded rows, as generate does). `cache`: a
        KVCacheBase in its prefill phase, which keeps each layer's keys and values."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None, cache: Optional[KVCacheBase] = None) -> Tensor:
        """The final LayerNorm's output [B, T, n_embd] (forward without the LM head)."""
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"input_ids has {T} tokens, more than n_positions={self.config.n_positions}")
        kpm = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must have input_ids' shape {(B, T)}, got {tuple(attention_mask.shape)}")
            kpm = attention_mask.to(torch.bool)
            if bool(kpm.all()):
                kpm = None  # nothing masked: the unmasked kernels are cheaper
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        for blk in self.transformer.h:
            x = blk(x, kpm, cache)
        return self.transformer.ln_f(x)

    def head(self, h: Tensor) -> Tensor:
        """lm_head(h); in eval without autograd on fp32 CPU through a cached copy of the tied weight
        in the GEMM's fastest layout (models/cpu_inference_gpt.py)."""
        return fast.lm_head(self, h) if fast.enabled(self, h, any_layout=True) else self.lm_head(h)

    # --------------------------------------------------------------------------------------------
    # the two steps GenerationMixin.generate drives (models/generation.py)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCacheBase) -> Tensor:
        """The prompt [B, T] (attention_mask bool [B, T], left or right padded) through the model,
        each layer's keys and values going to `cache`; -> logits [B, V] (float32) at each row's last
        real token. Positions count real tokens only, as in transformers' generate."""
        B, T = input_ids.shape
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache=cache)
        last = T - 1 - attention_mask.flip(1).long().argmax(1)  # each row's last real token
        return self.head(h[torch.arange(B, device=input_ids.device), last]).float()  # LM head on B rows only

    def decode_step(self, tokens: Tensor, cache: KVCacheBase) -> Tensor:
        """One new token per sequence, tokens [B] -> logits [B, V] (float32). Only device ops and
        no host syncs, so generate can capture it in a CUDA graph."""
        pos = cache.begin_step()
        x = self.transformer.wte(tokens[:, None]) + self.transformer.wpe(pos[:, None])
        for blk in self.transformer.h:
            x = blk(x, None, cache)
        cache.end_step()
        return self.head(self.transformer.ln_f(x[:, 0])).float()

    # --------------------------------------------------------------------------------------------
    # checkpoints: transformers' GPT2LMHeadModel directories

    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    IGNORED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers checkpoints

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        strict: bool = False,
        ignore_mismatched_sizes: bool = False,
        dtype: Optional[torch.dtype] = None,
        device=None,
        backend: Optional[str] = None,
        output_loading_info: bool = False,
    ):
        """Load a transformers GPT-2 directory (config.json + model.safetensors or pytorch_model.bin).

        Keys with or without the "transformer." prefix are accepted. Missing keys stay randomly
        initialized and are reported with a warning on the "forkattn.models" logger (or a ValueError
        with strict=True); unexpected keys are reported too; the old causal-mask buffers (attn.bias,
        attn.masked_bias) are ignored. A tensor whose shape disagrees with config.json raises a
        ValueError naming it and both shapes, unless ignore_mismatched_sizes=True. output_loading_info=True
        returns (model, {"missing_keys", "unexpected_keys", "ignored_keys", "mismatched_keys"}).
        The loader is shared with BERT: models/checkpoint.py."""
        path = model_folder(path)
        config = GPTConfig.from_json(os.path.join(path, "config.json"))
        model = cls(config, backend=backend)
        info = model.load_hf_state_dict(read_state_dict(path), strict=strict,
                                        ignore_mismatched_sizes=ignore_mismatched_sizes, log=True)
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return (model, info) if output_loading_info else model

    def load_hf_state_dict(self, sd: Dict[str, Tensor], *, strict: bool = False,
                           ignore_mismatched_sizes: bool = False, log: bool = False) -> Dict[str, List[str]]:
        """Copy a transformers GPT2LMHeadModel / GPT2Model state dict in (checkpoint.load_state);
        returns the key report (logged too with log=True, as from_pretrained does)."""
        if sd and not any(k.startswith("transformer.") for k in sd):
            sd = {(k if k == "lm_head.weight" else "transformer." + k): v for k, v in sd.items()}

        def map_key(key: str, value: Tensor):
            if key.endswith(self.IGNORED):
                return None
            return key, (value.t() if key.endswith(self.CONV1D) and value.dim() == 2 else value)

        return load_state(self, sd, map_key, tied=[("transformer.wte.weight", "lm_head.weight")], strict=strict,
                          ignore_mismatched_sizes=ignore_mismatched_sizes, owner="GPT.from_pretrained", log=log)

    def hf_state_dict(self) -> Dict[str, Tensor]:
        """transformers' GPT2LMHeadModel keys and layouts (Conv1D weights [in, out]), without the
        tied lm_head.weight (transformers re-ties it on load)."""
        out = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue
            v = v.detach()
            out[k] = (v.t() if k.endswith(self.CONV1D) else v).contiguous().cpu()
        return out

    def save_pretrained(self, path: str) -> None:
        """config.json + model.safetensors that transformers' GPT2LMHeadModel.from_pretrained loads."""
        cfg = self.config.to_dict()
        cfg["dtype"] = cfg["torch_dtype"] = str(self.transformer.wte.weight.dtype).replace("torch.", "")  # transformers 5 / 4
        write_folder(path, cfg, self.hf_state_dict())
