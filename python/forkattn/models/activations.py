"""The activation functions forkattn's models accept, under transformers' names (its ACT2FN keys).

BERT's `hidden_act` and GPT-2's `activation_function` are both looked up here, so a config.json
written by transformers means the same function in either model.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# gelu_new, gelu_pytorch_tanh and gelu_fast are three transformers spellings of the tanh approximation
ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,  # DeBERTa's conv_act default
}


def check_activation(name: str, field: str) -> None:
    """ValueError naming the config field (hidden_act, activation_function) and the known names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{field} must be one of {sorted(ACTIVATIONS)}, got {name!r}")


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The function called `name` (check_activation has vetted it in the config)."""
    return ACTIVATIONS[name]
