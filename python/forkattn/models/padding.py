"""Unpadding: a padded [B, L] batch's real tokens packed into [T, ...] and back (`Packing`).

BERT's encoder reads the attention mask once, packs the real tokens right after the embedding
lookup, runs every layer on them alone (forkattn.attention_varlen for attention) and scatters the
result back to [B, L, ...]; BertGraphRunner fills static buffers through the same bookkeeping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Packing:
    """Where the real tokens of a padded [B, L] batch go when packed: the unpadded encoder's bookkeeping.

    indices [T] int64: flat positions b * L + i of the real tokens, row-major (so each sequence's
    tokens are contiguous and in order, whatever the mask's pattern: right or left padding);
    cu_seqlens [B + 1] int32 and max_seqlen: forkattn.attention_varlen's arguments; lengths: the
    real tokens of each row, on the host.
    """

    indices: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    batch: int
    seqlen: int
    lengths: Optional[list] = None

    @classmethod
    def from_mask(cls, attention_mask: Tensor) -> "Packing":
        """One device-to-host copy of the [B, L] mask (bytes), bookkeeping on the host, two small copies back."""
        B, L = attention_mask.shape
        m = attention_mask.detach().to("cpu", torch.bool)
        lengths = m.sum(1, dtype=torch.int32)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        torch.cumsum(lengths, 0, out=cu[1:])
        indices = m.flatten().nonzero().squeeze(1)
        dev = attention_mask.device
        return cls(indices.to(dev, non_blocking=True), cu.to(dev, non_blocking=True),
                   int(lengths.max()) if B else 0, B, L, lengths.tolist())

    @property
    def dense(self) -> bool:
        """No padding at all: the padded layout without a mask is then cheaper than packing."""
        return self.indices.numel() == self.batch * self.seqlen

    def pack(self, t: Tensor) -> Tensor:
        """[B, L, ...] -> [T, ...] (differentiable)."""
        return t.flatten(0, 1).index_select(0, self.indices)

    def unpack(self, t: Tensor) -> Tensor:
        """[T, ...] -> [B, L, ...] with zeros at the padded positions (differentiable)."""
        out = t.new_zeros((self.batch * self.seqlen, *t.shape[1:]))
        return out.index_copy(0, self.indices, t).unflatten(0, (self.batch, self.seqlen))
