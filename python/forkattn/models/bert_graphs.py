"""Padded-batch BERT inference through CUDA graphs of the unpadded encoder (BertGraphRunner).

The encoder of forkattn.models.bert.BertModel, captured once per token-count bucket and replayed:
what removes the ~150 kernel launches per BERT-base forward that dominate small-batch GPU
inference. The model itself stays in bert.py; this is the runtime around it.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
from torch import Tensor

from .bert import BertModel, check_length
from .outputs import BaseModelOutputWithPooling
from .padding import Packing


class _Bucket:
    """Static buffers (and the graph, once captured) for one packed token count."""

    def __init__(self, tokens: int, slots: int, device, pad_id: int):
        self.tokens = tokens
        self.ids = torch.full((tokens,), pad_id, dtype=torch.long, device=device)
        self.types = torch.zeros(tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=device)
        self.cu_seqlens = torch.zeros(slots + 1, dtype=torch.int32, device=device)
        self.graph = None
        self.out: Optional[Tensor] = None


class BertGraphRunner:
    """Padded-batch inference of a BertModel through CUDA graphs of its unpadded encoder.

        runner = BertGraphRunner(model.eval(), max_batch=32, max_seqlen=128)
        out = runner(input_ids, attention_mask)   # like model(...): last_hidden_state, pooler_output

    A call reads the mask on the host (one small copy), packs the real tokens, rounds their count up
    to a multiple of `token_bucket` and replays the graph captured for that count (captured on first
    use; all graphs share one memory pool, so the buckets cost one activation set, not one each).
    The tokens added to fill the bucket are pad tokens in filler sequences of at most max_seqlen,
    whose outputs are dropped; sequence slots past the batch are empty. The graph holds the whole
    encoder (embeddings, every layer); outside it run the host bookkeeping, three small copies in,
    the scatter back to [B, L, hidden] and the pooler. At BERT-base B32 L128 the encoder is ~150
    kernel launches, which without a graph cost about as much as its arithmetic.

    graphs=None captures on CUDA and runs the same static-shape path eagerly elsewhere (that is what
    the CPU tests exercise); a capture that fails warns and leaves that bucket eager. For a model
    with a head, pass its `.bert` and apply the head to the outputs. Weights are read by reference:
    in-place updates (load_state_dict) are seen; swapping parameter tensors needs a new runner.
    """

    def __init__(self, model: BertModel, max_batch: int, max_seqlen: int, token_bucket: int = 256,
                 graphs: Optional[bool] = None):
        if not isinstance(model, BertModel):
            raise TypeError(f"model must be a BertModel (for a head model pass its .bert), got {type(model).__name__}")
        for name, v in (("max_batch", max_batch), ("max_seqlen", max_seqlen), ("token_bucket", token_bucket)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_seqlen > model.config.max_position_embeddings:
            raise ValueError(f"max_seqlen {max_seqlen} exceeds max_position_embeddings {model.config.max_position_embeddings}")
        self.model, self.max_batch, self.max_seqlen, self.token_bucket = model, max_batch, max_seqlen, token_bucket
        self.device = model.device
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"graphs=True needs the model on a CUDA device, it is on {self.device}")
        self._buckets: Dict[int, _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    @property
    def captured(self) -> list:
        """Token counts whose graph has been captured."""
        return sorted(n for n, b in self._buckets.items() if b.graph is not None)

    def _slots(self, tokens: int) -> int:
        return self.max_batch + -(-tokens // self.max_seqlen)

    def _bucket(self, tokens: int) -> _Bucket:
        b = self._buckets.get(tokens)
        if b is None:
            b = self._buckets[tokens] = _Bucket(tokens, self._slots(tokens), self.device, self.model.config.pad_token_id)
            if self.graphs:
                self._capture(b)
        return b

    def _encode(self, b: _Bucket) -> Tensor:
        packing = Packing(b.ids[:0], b.cu_seqlens, self.max_seqlen, 0, 0)
        return self.model.encode_packed(packing, b.ids, b.types, b.positions)

    def _capture(self, b: _Bucket) -> None:
        self._fill_cu(b, [])  # all filler: valid sequences for the warm-up runs
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # compile / autotune every kernel before capture
                    self._encode(b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(g, pool=self._pool):
                b.out = self._encode(b)
            b.graph = g
        except Exception as e:  # noqa: BLE001 - any capture failure leaves the bucket eager
            b.graph, b.out = None, None
            warnings.warn(f"BertGraphRunner: capturing the {b.tokens}-token graph failed ({type(e).__name__}: {e}); "
                          "that bucket runs without a graph")

    def _fill_cu(self, b: _Bucket, lengths: list) -> None:
        """Real sequences, then filler sequences of at most max_seqlen up to the bucket, then empty slots."""
        cu, total = [0], 0
        for n in lengths:
            total += n
            cu.append(total)
        while total < b.tokens:
            total = min(total + self.max_seqlen, b.tokens)
            cu.append(total)
        cu += [total] * (b.cu_seqlens.numel() - len(cu))
        b.cu_seqlens.copy_(torch.tensor(cu, dtype=torch.int32))

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                 token_type_ids: Optional[Tensor] = None) -> BaseModelOutputWithPooling:
        if self.model.training:
            raise RuntimeError("BertGraphRunner is for inference: call model.eval() first (dropout would be frozen into the graph)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if B > self.max_batch:
            raise ValueError(f"input_ids has batch {B}, more than this runner's max_batch {self.max_batch}")
        check_length(L, self.model.config)
        if input_ids.device != self.device:
            raise ValueError(f"input_ids must be on the model's device {self.device}, got {input_ids.device}")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
        packing = Packing.from_mask(torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                                    else attention_mask)
        if packing.max_seqlen > self.max_seqlen:
            raise ValueError(f"a sequence has {packing.max_seqlen} real tokens, more than this runner's "
                             f"max_seqlen {self.max_seqlen}")
        T = packing.indices.numel()
        b = self._bucket(max(1, -(-T // self.token_bucket)) * self.token_bucket)
        with torch.inference_mode():
            b.ids[:T].copy_(packing.pack(input_ids))
            b.ids[T:].fill_(self.model.config.pad_token_id)
            torch.remainder(packing.indices, L, out=b.positions[:T])
            b.positions[T:].zero_()
            if token_type_ids is None:
                b.types.zero_()
            else:
                b.types[:T].copy_(packing.pack(token_type_ids))
                b.types[T:].zero_()
            self._fill_cu(b, packing.lengths)
            if b.graph is not None:
                b.graph.replay()
                y = b.out[:T]
            else:
                y = self._encode(b)[:T]
            x = packing.unpack(y)
            pooler = self.model.pooler
            pooled = torch.tanh(pooler.dense(x[:, 0])) if pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


__all__ = ["BertGraphRunner"]
