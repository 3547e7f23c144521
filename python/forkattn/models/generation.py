"""Generation for forkattn's decoder models: sampling, KV caches, the CUDA-graph step, generate().

`GenerationMixin.generate` takes the model through a small interface and never imports a model
module (models/gpt.py inherits the mixin; generation.py knows nothing of GPT-2). The model is an
nn.Module that provides:

    config.n_positions, config.n_layer, config.n_head, config.head_dim
        the longest sequence, and the shape of the caches (one [batch, heads, len, head_dim] k/v
        pair per layer, in the dtype of the model's parameters)
    config.attention_backend, config.decode_backend
        read through models/backend.py: the backend of the cache's ops (KVCache.append,
        decode_attention); the model's layers pass their attention backend to cache.attend
    prefill(input_ids [B, T], attention_mask [B, T] bool, cache) -> logits [B, V] float32
        the prompt through the model, each layer calling cache.attend(layer, q, k, v, scale=,
        backend=) (the cache is in its prefill phase), and the logits at each row's last real token
    decode_step(tokens [B], cache) -> logits [B, V] float32
        one new token per sequence: pos = cache.begin_step(), every layer's cache.attend, then
        cache.end_step(); only device work and no host syncs, so it can be captured in a CUDA graph

Prefill runs the whole prompt through causal forkattn.attention (inside cache.attend); each new
token is then one decode step through a KV cache (`KVCacheBase`): forkattn.KVCache +
forkattn.decode_attention ("forkattn", the default) or `StaticKVCache` ("static": preallocated
[B, H, max_len, D] buffers updated in place, gpt-fast style, and forkattn.attention with a key
padding mask). On CUDA the decode step is captured once in a CUDA graph and replayed per token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import forkattn

from .backend import decode_backend

# ------------------------------------------------------------------------------------------------
# sampling


def pick_tokens(logits: Tensor, greedy: bool, temperature: float, top_k, top_p, gen) -> Tensor:
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


def _check_sampling(max_new_tokens, do_sample: bool, temperature: float, top_k, top_p) -> bool:
    """Whether decoding is greedy, after checking generate's length and sampling arguments."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    greedy = (not do_sample) or temperature == 0
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    return greedy


def _prompt_mask(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """The prompt's bool [B, T] mask (all True when None), checked: input_ids' shape, a token per row."""
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have input_ids' shape {(B, T)}, got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if not bool(attention_mask.any(dim=1).all()):
            raise ValueError("attention_mask: every prompt needs at least one token (a row is all padding)")
    if T == 0:
        raise ValueError("input_ids must hold at least one token per prompt")
    return attention_mask


# ------------------------------------------------------------------------------------------------
# generate


class GenerationMixin:
    """generate() for an nn.Module with the interface in the module docstring."""

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
        cache: str = "forkattn",
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

        cache: "forkattn" (forkattn.KVCache + forkattn.decode_attention) or "static" (see the
        module docstring). cuda_graph: capture the decode step in a CUDA graph and replay it (default:
        on for CUDA tensors). stop_check_every: on CUDA, how many steps run between the host
        syncs that check whether every sequence has stopped (output is identical either way).
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an int64 [batch, len] tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
        greedy = _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        input_ids = input_ids.long()
        B, T = input_ids.shape
        device = input_ids.device
        attention_mask = _prompt_mask(input_ids, attention_mask)
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
            kv = make_cache(cache, self.config, B, max_len, dtype=next(self.parameters()).dtype, device=device,
                            static_shapes=cuda_graph)
            kv.decode_backend = decode_backend(self.config)
            # prefill: the whole prompt through forkattn.attention; each layer's k, v go to the cache
            kv.begin_prefill(attention_mask)
            next_logits = self.prefill(input_ids, attention_mask, kv)
            kv.end_prefill()

            step = self._graphed_step(kv, B, device) if cuda_graph else self._eager_step(kv)
            out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
            finished = torch.zeros(B, dtype=torch.bool, device=device)
            n = 0
            for n in range(1, max_new_tokens + 1):
                tok = pick_tokens(next_logits, greedy, temperature, top_k, top_p, gen)
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

    def _eager_step(self, kv: KVCacheBase):
        return lambda tok: self.decode_step(tok, kv)

    def _warm_up(self, kv: KVCacheBase, static_tok: Tensor, n: int = 2) -> None:
        """Run n decode steps (kernels pick their plans, allocators settle) and restore the cache:
        those steps write k/v past each sequence's length (overwritten later) and advance lengths."""
        snapshot = kv.state()
        for _ in range(n):
            self.decode_step(static_tok, kv)
            kv.load_state(snapshot)

    def _graphed_step(self, kv: KVCacheBase, B: int, device):
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


# ------------------------------------------------------------------------------------------------
# KV caches: the interface generate uses, and two implementations


class KVCacheBase:
    """What generate needs from a KV cache, for all layers of one batch.

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

    def __init__(self, config, batch: int, max_len: int, *, dtype, device, static_shapes: bool = False):
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

    def __init__(self, config, batch: int, max_len: int, *, dtype, device, static_shapes: bool = False):
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


def make_cache(kind: str, config, batch: int, max_len: int, *, dtype, device,
               static_shapes: bool = False) -> KVCacheBase:
    """A KV cache of CACHES[kind] for every layer of `config` (n_layer, n_head, head_dim)."""
    if kind not in CACHES:
        raise ValueError(f"cache must be one of {sorted(CACHES)}, got {kind!r}")
    return CACHES[kind](config, batch, max_len, dtype=dtype, device=device, static_shapes=static_shapes)
