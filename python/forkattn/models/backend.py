"""Which forkattn backend a model's attention runs on: one config field, read at every call.

Every forkattn model's config has `attention_backend`: None lets forkattn pick the fastest backend
for the inputs (forkattn.select_backend), a name ("eager", "cpu", "cuda", "triton") pins one. The
layers read it through `attention_backend(config)` at each call, so setting it on a built model
(model.set_attention_backend, GPT.set_backend, or the config itself) takes effect at the next
forward, with no per-layer copy to keep in sync. GPT's config adds `decode_backend` for the KV-cache
ops of generate ("same", the default, follows attention_backend).

transformers' models running with attn_implementation="forkattn" honour the same field on their
config (forkattn.integrations.transformers): `model.config.attention_backend = "cpu"`.

Neither field is written to config.json: a backend is a property of the machine, not of the weights.
A name is checked for type here and for meaning by forkattn's ops, whose error lists the known ones.
"""
from __future__ import annotations

from typing import Optional

FIELDS = ("attention_backend", "decode_backend")  # runtime choices, kept out of config.json
SAME = "same"  # decode_backend: follow attention_backend


def check_backend(backend, field: str = "attention_backend", allow_same: bool = False) -> Optional[str]:
    """backend itself when it is None or a str (TypeError naming `field` otherwise)."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"{field} must be None or a forkattn backend name (a str), got {type(backend).__name__}")
    if backend == SAME and not allow_same:
        raise ValueError(f"{field}={SAME!r} is only meaningful for decode_backend")
    return backend


def attention_backend(config) -> Optional[str]:
    """The backend for a model's attention ops: config.attention_backend (None = fastest available;
    a config without the field, such as a transformers one, means None too)."""
    return check_backend(getattr(config, "attention_backend", None))


def decode_backend(config) -> Optional[str]:
    """The backend for a model's KV-cache ops (forkattn.KVCache.append, forkattn.decode_attention):
    config.decode_backend, or attention_backend(config) when it is "same" or absent."""
    backend = check_backend(getattr(config, "decode_backend", SAME), "decode_backend", allow_same=True)
    return attention_backend(config) if backend == SAME else backend


def set_backends(config, attention: Optional[str], decode: Optional[str] = SAME) -> None:
    """Set config.attention_backend (and config.decode_backend where the config has it), checked."""
    config.attention_backend = check_backend(attention)
    if hasattr(config, "decode_backend"):
        config.decode_backend = check_backend(decode, "decode_backend", allow_same=True)
    elif decode != SAME:
        raise ValueError(f"{type(config).__name__} has no decode_backend (the model does not generate)")
