"""BERT's checkpoint keys in transformers' spelling, for BERT and ALBERT checkpoints.

Our parameter names are transformers' BertModel / BertFor* names, so a BERT checkpoint maps key for
key (with or without the "bert." prefix, legacy LayerNorm gamma/beta, the MLM decoder tied to the
word embeddings). ALBERT spells the same weights differently: ALBERT_NAMES is the explicit two-way
table. from_pretrained reads through key_map_from_hf, save_pretrained writes through hf_key.
"""
from __future__ import annotations

import re
from typing import Dict

from torch import Tensor

from .checkpoint import MapKey

# Our name -> ALBERT's, as key prefixes; {i} is the layer index (ALBERT's layer group). Keys under
# neither name (embeddings, embedding_hidden_mapping_in) are spelled alike.
ALBERT_NAMES = {
    "encoder.layer.{i}.attention.self.query.": "encoder.albert_layer_groups.{i}.albert_layers.0.attention.query.",
    "encoder.layer.{i}.attention.self.key.": "encoder.albert_layer_groups.{i}.albert_layers.0.attention.key.",
    "encoder.layer.{i}.attention.self.value.": "encoder.albert_layer_groups.{i}.albert_layers.0.attention.value.",
    "encoder.layer.{i}.attention.output.dense.": "encoder.albert_layer_groups.{i}.albert_layers.0.attention.dense.",
    "encoder.layer.{i}.attention.output.LayerNorm.": "encoder.albert_layer_groups.{i}.albert_layers.0.attention.LayerNorm.",
    "encoder.layer.{i}.intermediate.dense.": "encoder.albert_layer_groups.{i}.albert_layers.0.ffn.",
    "encoder.layer.{i}.output.dense.": "encoder.albert_layer_groups.{i}.albert_layers.0.ffn_output.",
    "encoder.layer.{i}.output.LayerNorm.": "encoder.albert_layer_groups.{i}.albert_layers.0.full_layer_layer_norm.",
    "pooler.dense.": "pooler.",
    "cls.predictions.transform.dense.": "predictions.dense.",
    "cls.predictions.transform.LayerNorm.": "predictions.LayerNorm.",
    "cls.predictions.bias": "predictions.bias",
    "cls.predictions.decoder.": "predictions.decoder.",
    "cls.seq_relationship.": "sop_classifier.classifier.",
}
_FROM_ALBERT = {theirs: ours for ours, theirs in ALBERT_NAMES.items()}
_INDEX = re.compile(r"\.(\d+)\.")  # a name's first index: the layer (group)


def _rename(key: str, table: Dict[str, str]) -> str:
    """key with the first matching table prefix swapped, its layer index carried over; else key."""
    m = _INDEX.search(key)
    template = key if m is None else f"{key[:m.start()]}.{{i}}.{key[m.end():]}"
    for src, dst in table.items():
        if template.startswith(src):
            new = dst + template[len(src):]
            return new if m is None else new.replace("{i}", m.group(1))
    return key


def to_albert_name(key: str) -> str:
    """Our base-model or head key -> ALBERT's (without the albert. prefix)."""
    return _rename(key, ALBERT_NAMES)


def from_albert_name(key: str) -> str:
    """ALBERT's base-model or head key (without the albert. prefix) -> ours."""
    return _rename(key, _FROM_ALBERT)


def key_map_from_hf(state: Dict[str, Tensor], model_type: str, base_model_prefix: str) -> MapKey:
    """checkpoint.load_state's map_key for a transformers BERT/ALBERT state dict loaded into one of
    our models (base_model_prefix "bert" for a model with a head, "" for BertModel)."""
    albert = model_type == "albert"
    has_prefix = any(k.startswith(("bert.", "albert.")) for k in state)
    prefix = base_model_prefix + "." if base_model_prefix else ""
    has_bias = any(k.endswith("predictions.bias") for k in state)

    def map_key(key: str, value: Tensor):
        k = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if k.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
            return None  # buffers some checkpoints carry
        if has_prefix and k.startswith(("bert.", "albert.")):
            base = k.split(".", 1)[1]
        elif not has_prefix:
            base = k  # a base-model checkpoint: every key is a base-model key
        else:
            return (from_albert_name(k) if albert else k), value
        return prefix + (from_albert_name(base) if albert else base), value

    def map_head(key: str, value: Tensor):
        mapped = map_key(key, value)
        if mapped is None or mapped[0].endswith("predictions.decoder.weight"):
            return None  # the decoder weight is tied to the word embeddings
        name = mapped[0]
        if name.endswith("predictions.decoder.bias"):
            if has_bias:
                return None  # the same tensor as predictions.bias, which the checkpoint holds too
            name = name[: -len("decoder.bias")] + "bias"
        return name, value

    return map_head


def hf_key(key: str, model_type: str, base_model_prefix: str) -> str:
    """Our state-dict key -> transformers' (ALBERT's when model_type == "albert")."""
    if model_type != "albert":
        return key
    if base_model_prefix and key.startswith("bert."):
        return "albert." + to_albert_name(key[5:])
    return to_albert_name(key)
