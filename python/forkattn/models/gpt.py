"""GPT-2 on forkattn: the model, transformers-compatible checkpoints and KV-cache generation.

One file, nanoGPT style: `GPTConfig` (a transformers GPT-2 config.json), `GPT` (token + learned
position embeddings, pre-LN blocks of causal attention and a GELU MLP, final LayerNorm, LM head
tied to the token embedding). Parameter names are transformers' GPT2LMHeadModel names, so
`from_pretrained` / `save_pretrained` are a key mapping plus a transpose of the Conv1D weights
(transformers stores them [in, out]; nn.Linear stores [out, in]).

Attention goes through forkattn.attention (causal, with the attention_mask as key padding mask)
for training and for the prompt of `generate`; each new token then runs one decode step through
a KV cache (see `KVCacheBase`): forkattn.KVCache + forkattn.decode_attention when this build has
them, otherwise `StaticKVCache` (preallocated [B, H, max_len, D] buffers updated in place, gpt-fast
style, and forkattn.attention with a key padding mask). On CUDA the decode step is captured once in
a CUDA graph and replayed for every token.

Not modelled: attention dropout (attn_pdrop; forkattn.attention has no dropout; embedding and
residual dropout are), cross-attention, reorder_and_upcast_attn (attention is computed in fp32
inside the kernels anyway).
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

from .checkpoint import load_state, model_folder, read_state_dict, save_safetensors

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
    attn_pdrop: float = 0.1  # kept for round trips; not applied (see the module docstring)
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    pad_token_id: Optional[int] = None
    extra: Dict = field(default_factory=dict, repr=False)  # other config.json keys, written back

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation_function must be one of {sorted(_ACTIVATIONS)}, got {self.activation_function!r}")
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
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        out = dict(self.extra)
        out.update(d)
        out["model_type"] = "gpt2"
        out.setdefault("architectures", ["GPT2LMHeadModel"])
        return out


_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass
class CausalLMOutput:
    """transformers' names: `logits` [B, T, V] and, when labels were given, `loss`."""

    logits: Tensor
    loss: Optional[Tensor] = None


# ------------------------------------------------------------------------------------------------
# model


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer_idx = config.n_head, config.head_dim, layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale
        self.backend: Optional[str] = None  # forkattn.attention's backend; None = fastest available

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, cache=None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, T, D]
        if cache is None:
            y = forkattn.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=self.scale,
                                   backend=self.backend)
        else:
            y = cache.attend(self.layer_idx, q, k, v, scale=self.scale, backend=self.backend)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.act = _ACTIVATIONS[config.activation_function]
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
        x = x + self.attn(self.ln_1(x), key_padding_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
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
        self.set_backend(backend)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)

    def set_backend(self, backend: Optional[str], decode_backend: Optional[str] = "same") -> "GPT":
        """forkattn.attention backend for every layer ("eager", "cpu", "cuda", "triton", None = auto),
        and the backend of the KV-cache ops during generate (forkattn.KVCache.append and
        forkattn.decode_attention; "same" = the attention backend)."""
        self.backend = backend
        self.decode_backend = backend if decode_backend == "same" else decode_backend
        for blk in self.transformer.h:
            blk.attn.backend = backend
        return self

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
        cache: Optional["KVCacheBase"] = None,
    ) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (1/True = token, 0 = padding; padded keys are
        never attended); labels [B, T] (the loss predicts labels[:, t+1] from position t; -100 is
        ignored); position_ids default to 0..T-1 as in transformers' forward (pass
        `attention_mask.cumsum(-1) - 1` for left-padded rows, as generate does). `cache`: a
        KVCacheBase in its prefill phase, which keeps each layer's keys and values."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None, cache: Optional["KVCacheBase"] = None) -> Tensor:
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

    def decode_step(self, tokens: Tensor, cache: "KVCacheBase") -> Tensor:
        """One new token per sequence, tokens [B] -> logits [B, V] (float32). Only device ops and
        no host syncs, so generate can capture it in a CUDA graph."""
        pos = cache.begin_step()
        x = self.transformer.wte(tokens[:, None]) + self.transformer.wpe(pos[:, None])
        for blk in self.transformer.h:
            x = blk(x, None, cache)
        cache.end_step()
        return self.lm_head(self.transformer.ln_f(x[:, 0])).float()

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
        os.makedirs(path, exist_ok=True)
        cfg = self.config.to_dict()
        cfg["dtype"] = cfg["torch_dtype"] = str(self.transformer.wte.weight.dtype).replace("torch.", "")  # transformers 5 / 4
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        save_safetensors(self.hf_state_dict(), os.path.join(path, "model.safetensors"))

    # --------------------------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_token_id: Optional[int] = None,
        attention_mask: Optional[Tensor] = None,
        seed: Optional[int] = None,
        do_sample: bool = True,
        pad_token_id: Optional[int] = None,
        cache: str = "auto",
        cuda_graph: Optional[bool] = None,
        stop_check_every: int = 8,
    ) -> Tensor:
        """Autoregressive generation: [B, T] prompt -> [B, T + n] with n <= max_new_tokens.

        The prompt runs once through forkattn.attention (prefill), then each new token is one
        decode step through the KV cache. attention_mask (1 = token) allows left-padded (the
        transformers convention) or ragged prompts in one batch; positions count real tokens
        only, as in transformers. temperature == 0 or do_sample=False is greedy (argmax);
        otherwise tokens are sampled from softmax(logits / temperature), optionally restricted
        to the top_k tokens and to the smallest set with probability >= top_p, with a
        torch.Generator seeded by `seed` (same seed, same batch -> same tokens). A sequence that
        produces eos_token_id stops: later positions hold pad_token_id (default: eos_token_id),
        and generation ends when every sequence has stopped (like transformers' generate).

        cache: "auto" (forkattn.KVCache when this build has it, else "static"), "static" or
        "forkattn". cuda_graph: capture the decode step in a CUDA graph and replay it (default:
        on for CUDA tensors). stop_check_every: on CUDA, how many steps run between the host
        syncs that check whether every sequence has stopped (output is identical either way).
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an int64 [batch, len] tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        greedy = (not do_sample) or temperature == 0
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
        input_ids = input_ids.long()
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must have input_ids' shape {(B, T)}, got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if not bool(attention_mask.any(dim=1).all()):
                raise ValueError("attention_mask: every prompt needs at least one token (a row is all padding)")
        if T == 0:
            raise ValueError("input_ids must hold at least one token per prompt")
        max_len = T + max_new_tokens
        if max_len > self.config.n_positions:
            raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds n_positions="
                             f"{self.config.n_positions}")
        if max_new_tokens == 0:
            return input_ids
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        gen = None
        if not greedy:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=True needs a model and input_ids on a CUDA device")

        was_training = self.training
        self.eval()
        try:
            kv = make_cache(cache, self.config, B, max_len, dtype=self.transformer.wte.weight.dtype, device=device,
                            static_shapes=cuda_graph)
            kv.decode_backend = self.decode_backend
            # prefill: the whole prompt through forkattn.attention; each layer's k, v go to the cache
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
            kv.begin_prefill(attention_mask)
            h = self.hidden_states(input_ids, attention_mask, position_ids, cache=kv)
            kv.end_prefill()
            last = T - 1 - attention_mask.flip(1).long().argmax(1)  # each row's last real token
            next_logits = self.lm_head(h[torch.arange(B, device=device), last]).float()  # LM head on B rows only

            step = self._graphed_step(kv, B, device) if cuda_graph else self._eager_step(kv)
            out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
            finished = torch.zeros(B, dtype=torch.bool, device=device)
            n = 0
            for n in range(1, max_new_tokens + 1):
                tok = _pick(next_logits, greedy, temperature, top_k, top_p, gen)
                tok = torch.where(finished, torch.full_like(tok, pad), tok)
                out[:, n - 1] = tok
                if eos_token_id is not None:
                    finished |= tok == eos_token_id
                    if (device.type != "cuda" or n % stop_check_every == 0) and bool(finished.all()):
                        break
                if n < max_new_tokens:
                    next_logits = step(tok)
            if eos_token_id is not None:  # trim to where every sequence had stopped
                done_at = torch.where(out == eos_token_id, torch.arange(1, max_new_tokens + 1, device=device), max_new_tokens + 1)
                first = done_at.min(1).values.max().item()
                n = min(n, int(first))
            return torch.cat([input_ids, out[:, :n]], dim=1)
        finally:
            self.train(was_training)

    def _eager_step(self, kv: "KVCacheBase"):
        return lambda tok: self.decode_step(tok, kv)

    def _warm_up(self, kv: "KVCacheBase", static_tok: Tensor, n: int = 2) -> None:
        """Run n decode steps (kernels pick their plans, allocators settle) and restore the cache:
        those steps write k/v past each sequence's length (overwritten later) and advance lengths."""
        snapshot = kv.state()
        for _ in range(n):
            self.decode_step(static_tok, kv)
            kv.load_state(snapshot)

    def _graphed_step(self, kv: "KVCacheBase", B: int, device):
        """Capture decode_step on static buffers once; each call copies the token in and replays.
        Warm-up runs on a side stream before capture (as torch.cuda.graphs asks); capture records
        kernels without running them, but Python-side cache state (host length bounds) still
        moves, so it is restored after capture too."""
        static_tok = torch.zeros(B, dtype=torch.long, device=device)
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            self._warm_up(kv, static_tok)
        torch.cuda.current_stream(device).wait_stream(s)
        snapshot = kv.state()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = self.decode_step(static_tok, kv)
        kv.load_state(snapshot)

        def step(tok: Tensor) -> Tensor:
            static_tok.copy_(tok)
            graph.replay()
            return static_logits

        return step


def _pick(logits: Tensor, greedy: bool, temperature: float, top_k, top_p, gen) -> Tensor:
    """logits [B, V] float32 -> next tokens [B]."""
    if greedy:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


# ------------------------------------------------------------------------------------------------
# KV caches: the interface generate uses, and two implementations


class KVCacheBase:
    """What GPT.generate needs from a KV cache, for all layers of one batch.

    Sequences are stored compacted: sequence b's tokens (its real prompt tokens, then the
    generated ones) occupy slots 0..len_b-1 of its row, whatever the prompt's padding was, so
    padding is never stored and positions are simply the lengths.

    Prefill: begin_prefill(mask); the model's forward calls attend(layer, q, k, v, ...) per layer,
    which runs causal forkattn.attention over the (padded) prompt and keeps k, v; end_prefill().
    Decode step: pos = begin_step() (positions [B], a device tensor); attend per layer appends the
    one new k, v per sequence and attends over each sequence's cache; end_step() advances the
    lengths. Steps do only device work (no host syncs), so they can be captured in a CUDA graph;
    state()/load_state() save and restore what a step mutates.
    """

    decode_backend: Optional[str] = None  # backend of the cache's own ops (set by generate)

    def begin_prefill(self, attention_mask: Tensor) -> None:
        self.prefilling = True
        self.prompt_mask = attention_mask
        self.prompt_lens = attention_mask.sum(1).to(torch.int32)
        # gather index that moves each row's real tokens to the front, in order
        self.compact_index = torch.argsort((~attention_mask).to(torch.int8), dim=1, stable=True)
        self._prefill_kpm = None if bool(attention_mask.all()) else attention_mask

    def end_prefill(self) -> None:
        self.prefilling = False
        self.host_max_len = int(self.prompt_mask.shape[1])  # upper bound on every length, no sync

    def _prefill_attend(self, q, k, v, scale, backend):
        return forkattn.attention(q, k, v, causal=True, key_padding_mask=self._prefill_kpm, scale=scale,
                                  backend=backend)

    def _compacted(self, x: Tensor) -> Tensor:
        B, H, T, D = x.shape
        return x.gather(2, self.compact_index[:, None, :, None].expand(B, H, T, D))

    def begin_step(self) -> Tensor: ...
    def end_step(self) -> None: ...
    def attend(self, layer: int, q, k, v, *, scale: float, backend) -> Tensor: ...
    def state(self): ...
    def load_state(self, s) -> None: ...


class StaticKVCache(KVCacheBase):
    """Preallocated k, v buffers [n_layer, B, H, max_len, D] updated in place (gpt-fast), lengths
    as a device tensor; attention of a decode step is forkattn.attention over the cache with a key
    padding mask `slot < length`. With static_shapes=False (eager), it reads only the first
    host_max_len + 1 slots (a bound known on the host without a sync); with static_shapes=True (for
    a CUDA graph) all max_len slots, so every step has the same shapes."""

    name = "static"

    def __init__(self, config: GPTConfig, batch: int, max_len: int, *, dtype, device, static_shapes: bool = False):
        shape = (config.n_layer, batch, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.max_len, self.static_shapes = max_len, static_shapes
        self.slots = torch.arange(max_len, device=device)
        self.prefilling = False

    def end_prefill(self) -> None:
        super().end_prefill()
        self.seqlens.copy_(self.prompt_lens)

    def begin_step(self) -> Tensor:
        pos = self.seqlens.long()
        self._pos = pos
        L = self.max_len if self.static_shapes else self.host_max_len + 1
        self._index = pos.clamp(max=self.max_len - 1)[:, None, None, None]  # clamps, never writes out of bounds
        self._kpm = self.slots[None, :L] <= pos[:, None]
        self._L = L
        return pos

    def end_step(self) -> None:
        self.seqlens.add_(1)
        if not self.static_shapes:
            self.host_max_len += 1

    def attend(self, layer, q, k, v, *, scale, backend):
        if self.prefilling:
            T = k.shape[2]
            self.k[layer, :, :, :T] = self._compacted(k)
            self.v[layer, :, :, :T] = self._compacted(v)
            return self._prefill_attend(q, k, v, scale, backend)
        B, H, _, D = k.shape
        idx = self._index.expand(B, H, 1, D)
        kc, vc = self.k[layer], self.v[layer]
        kc.scatter_(2, idx, k)
        vc.scatter_(2, idx, v)
        L = self._L
        return forkattn.attention(q, kc[:, :, :L], vc[:, :, :L], key_padding_mask=self._kpm, scale=scale,
                                  backend=backend)

    def state(self):
        return self.seqlens.clone(), getattr(self, "host_max_len", 0)

    def load_state(self, s) -> None:
        self.seqlens.copy_(s[0])
        self.host_max_len = s[1]


class ForkattnKVCache(KVCacheBase):
    """One forkattn.KVCache per layer (contiguous) and forkattn.decode_attention for the steps.

    The prompt is appended compacted (all T slots, real tokens first) and seqlens is then set to
    each prompt's length, so the padding slots are overwritten by the first generated tokens.
    The caches run with check=False (no host sync, capturable); generate has already checked that
    prompt + new tokens fit in max_len, so nothing is ever clamped."""

    name = "forkattn"

    def __init__(self, config: GPTConfig, batch: int, max_len: int, *, dtype, device, static_shapes: bool = False):
        self.caches = [forkattn.KVCache(batch, config.n_head, max_len, config.head_dim, dtype=dtype, device=device,
                                        check=False) for _ in range(config.n_layer)]
        self.max_len, self.static_shapes = max_len, static_shapes
        self.prefilling = False

    def end_prefill(self) -> None:
        super().end_prefill()
        for c in self.caches:
            c.seqlens.copy_(self.prompt_lens)
            # an upper bound of the lengths (the eager decode backend slices to it); with static
            # shapes (a CUDA graph) the whole buffer, since a captured slice cannot grow
            c.seqlen_bound = self.max_len if self.static_shapes else self.host_max_len

    def begin_step(self) -> Tensor:
        return self.caches[0].seqlens.long()

    def end_step(self) -> None:
        if self.static_shapes:
            for c in self.caches:
                c.seqlen_bound = self.max_len

    def attend(self, layer, q, k, v, *, scale, backend):
        c, db = self.caches[layer], self.decode_backend
        if self.prefilling:
            c.append(self._compacted(k), self._compacted(v), backend=db)
            return self._prefill_attend(q, k, v, scale, backend)
        c.append(k, v, backend=db)
        return forkattn.decode_attention(q, c, scale=scale, backend=db)

    def state(self):
        return [(c.seqlens.clone(), c.seqlen_bound) for c in self.caches]

    def load_state(self, s) -> None:
        for c, (lens, bound) in zip(self.caches, s):
            c.seqlens.copy_(lens)
            c.seqlen_bound = bound


CACHES = {"static": StaticKVCache, "forkattn": ForkattnKVCache}


def forkattn_cache_available() -> Optional[str]:
    """None when this build has forkattn.KVCache and forkattn.decode_attention, else why not."""
    if hasattr(forkattn, "KVCache") and hasattr(forkattn, "decode_attention"):
        return None
    return "this forkattn build has no KVCache/decode_attention (the decode op family)"


def make_cache(kind: str, config: GPTConfig, batch: int, max_len: int, *, dtype, device,
               static_shapes: bool = False) -> KVCacheBase:
    if kind == "auto":
        kind = "forkattn" if forkattn_cache_available() is None else "static"
    if kind not in CACHES:
        raise ValueError(f"cache must be 'auto' or one of {sorted(CACHES)}, got {kind!r}")
    if kind == "forkattn" and forkattn_cache_available() is not None:
        raise ValueError(f"cache='forkattn' is not available: {forkattn_cache_available()}")
    return CACHES[kind](config, batch, max_len, dtype=dtype, device=device, static_shapes=static_shapes)
