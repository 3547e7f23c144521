"""What the encoder families (BERT, DeBERTa) share around their layers: transformers' config.json
label fields, weight init, the attention-dropout warning, from_pretrained / save_pretrained
through models/checkpoint.py, and the question-answering loss.

A family's base class subclasses PreTrainedModel and sets `config_class` (a dataclass config with
from_json_file / to_dict), `load_hf_state_dict(state, ...)`, `hf_state_dict()` and, when its
architecture name differs from the class name, `_hf_architecture()`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import FIELDS as BACKEND_FIELDS
from .backend import set_backends
from .checkpoint import model_folder, read_state_dict, write_folder

# --- config.json ------------------------------------------------------------------------------------

def merge_overrides(d: dict, overrides: dict) -> dict:
    """config.json's fields with the caller's overrides; a num_labels override drops the file's labels."""
    if "num_labels" in overrides and "id2label" not in overrides:
        d = {k: v for k, v in d.items() if k not in ("id2label", "label2id")}
    return {**d, **overrides}


def build_config(cls, d: dict):
    """cls from the fields of d it has (other transformers keys ignored), id2label from label2id."""
    if "id2label" not in d and "num_labels" not in d and "label2id" in d:
        d = {**d, "id2label": {v: k for k, v in d["label2id"].items()}}
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def normalize_labels(config) -> None:
    """id2label with int keys (JSON has strings), and num_labels its length; in __post_init__."""
    if config.id2label is not None:
        config.id2label = {int(k): v for k, v in config.id2label.items()}
        config.num_labels = len(config.id2label)


def config_json(config, drop=()) -> dict:
    """The dataclass config as transformers' config.json: runtime fields (attention backend) and
    `drop` left out, id2label / label2id written as transformers writes them."""
    d = dataclasses.asdict(config)
    for name in (*BACKEND_FIELDS, *drop):
        d.pop(name, None)
    if config.id2label is None:
        d.pop("id2label")
    else:
        d["id2label"] = {str(k): v for k, v in config.id2label.items()}
        d["label2id"] = {v: k for k, v in config.id2label.items()}
    return d


class JsonConfig:
    """from_json_file for a config dataclass with from_dict."""

    @classmethod
    def from_json_file(cls, path: str, **overrides):
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)


# --- models -----------------------------------------------------------------------------------------

_warned_attention_dropout = False


class PreTrainedModel(nn.Module):
    """Weights init, the backend setter, from_pretrained / save_pretrained (see the module docstring)."""

    config_class: type = None
    applies_attention_dropout = False  # True where attention_probs_dropout_prob reaches the kernels (BERT)

    def __init__(self, config):
        super().__init__()
        self.config = config

    def init_weights(self) -> None:
        """transformers' init: N(0, initializer_range) weights, zero biases, unit LayerNorms, zero pad
        row, zero masked-LM output biases."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("predictions.bias"):
                nn.init.zeros_(p)

    def train(self, mode: bool = True):
        global _warned_attention_dropout
        if (mode and not self.applies_attention_dropout and self.config.attention_probs_dropout_prob > 0
                and not _warned_attention_dropout):
            _warned_attention_dropout = True
            warnings.warn(f"attention_probs_dropout_prob={self.config.attention_probs_dropout_prob} is not applied: "
                          "forkattn's fused attention has no dropout on the probabilities (hidden dropout is applied)")
        return super().train(mode)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_attention_backend(self, backend: Optional[str]) -> None:
        """forkattn backend of every attention call ("eager", "cpu", "cuda", "triton", None = fastest)."""
        set_backends(self.config, backend)

    @classmethod
    def from_pretrained(cls, path: str, *, output_loading_info: bool = False, map_location="cpu",
                        ignore_mismatched_sizes: bool = False, strict: bool = False, **config_overrides):
        """Load a transformers-format directory (config.json + model.safetensors or pytorch_model.bin).

        Keys the model has but the checkpoint lacks (e.g. a new head) are initialized randomly and
        reported as missing; checkpoint keys the model does not use (e.g. a pre-training head when
        fine-tuning) are reported as unexpected (a warning on the "forkattn.models" logger; strict=True
        raises instead). A checkpoint tensor whose shape disagrees with the config raises a ValueError
        naming it and both shapes, unless ignore_mismatched_sizes=True (then it stays initialized, as
        for a classifier with another num_labels). output_loading_info=True also returns
        {"missing_keys", "unexpected_keys", "mismatched_keys", "ignored_keys"}. See models/checkpoint.py.
        """
        path = model_folder(path)
        config = cls.config_class.from_json_file(os.path.join(path, "config.json"), **config_overrides)
        model = cls(config)
        state = read_state_dict(path, map_location=map_location)
        info = model.load_hf_state_dict(state, ignore_mismatched_sizes=ignore_mismatched_sizes, strict=strict, log=True)
        model.eval()
        return (model, info) if output_loading_info else model

    def load_hf_state_dict(self, state: Dict[str, Tensor], *, ignore_mismatched_sizes: bool = False,
                           strict: bool = False, log: bool = False) -> dict:
        raise NotImplementedError

    def hf_state_dict(self) -> Dict[str, Tensor]:
        raise NotImplementedError

    def save_pretrained(self, path: str, safe_serialization: bool = True) -> None:
        """config.json + model.safetensors (or pytorch_model.bin), readable by from_pretrained and transformers."""
        config = self.config.to_dict()
        config["architectures"] = [self._hf_architecture()]
        write_folder(path, config, self.hf_state_dict(), safe_serialization=safe_serialization)

    def _hf_architecture(self) -> str:
        return type(self).__name__


def qa_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor) -> Tensor:
    """transformers' extractive-QA loss: positions outside the input (clamped to L) are ignored."""
    L = start_logits.shape[1]
    s, e = start_positions.view(-1).clamp(0, L), end_positions.view(-1).clamp(0, L)
    return (F.cross_entropy(start_logits.float(), s, ignore_index=L) +
            F.cross_entropy(end_logits.float(), e, ignore_index=L)) / 2
