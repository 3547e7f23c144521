"""Attention dropout in forkattn's models: `AttentionDropout`, nn.Dropout's twin for the attention
probabilities.

The probabilities never exist as a tensor in forkattn's fused kernels, so the dropout cannot be a
module applied to them: it is forkattn.attention's own dropout_p (Philox masks, regenerated in the
backward from a seed). AttentionDropout holds the rate and, like nn.Dropout, follows the model's
train() / eval(): the layers pass `**module.kwargs()` to forkattn.attention / attention_varlen,
which is dropout_p = p in training and nothing (no dropout code at all) in eval or at p = 0.

Each call draws a fresh 64-bit seed from `generator`, by default torch's default CPU generator, so
`torch.manual_seed(s)` before a training run reproduces its masks (and losses) exactly;
`set_attention_dropout_generator(model, g)` gives every attention layer of a model its own
torch.Generator instead. The module has no parameters or buffers: checkpoints are unaffected.

Inference paths stay dropout-free: generate() switches the model to eval, BertGraphRunner refuses a
model in training mode, and the KV-cache attention (cache.attend) never applies dropout.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn


class AttentionDropout(nn.Module):
    """Dropout rate of one attention layer's probabilities (see the module docstring)."""

    def __init__(self, p: float, field: str = "p"):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
            raise ValueError(f"{field} must be a float in [0, 1) (attention-probability dropout), got {p!r}")
        self.p = float(p)
        self.generator: Optional[torch.Generator] = None

    def kwargs(self) -> dict:
        """forkattn.attention's dropout arguments for this call: {} in eval or at p = 0."""
        if self.training and self.p > 0:
            return {"dropout_p": self.p, "generator": self.generator}
        return {}

    def extra_repr(self) -> str:
        return f"p={self.p}"


def set_attention_dropout_generator(model: nn.Module, generator: Optional[torch.Generator]) -> int:
    """Draw every attention-dropout seed of `model` from `generator` (None: torch's default
    generator again); returns the number of attention layers set."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    n = 0
    for m in model.modules():
        if isinstance(m, AttentionDropout):
            m.generator = generator
            n += 1
    return n


__all__ = ["AttentionDropout", "set_attention_dropout_generator"]
