"""One checkpoint loader for forkattn's models (BERT/ALBERT and GPT-2).

`read_state_dict(path)` reads a transformers-format folder: model.safetensors (or a sharded
model.safetensors.index.json), else pytorch_model.bin (weights_only). `load_state(model, state,
map_key)` copies a transformers-named state dict into a model the way transformers'
from_pretrained does:

- map_key(checkpoint_key, tensor) gives (model_key, tensor) -- the family's renaming (ALBERT names,
  the "transformer." prefix, GPT-2's Conv1D transposes) -- or None for a key the model knows it does
  not need (old causal-mask buffers, tied decoder weights); those are reported as ignored_keys.
  A model key the model does not have makes the checkpoint key unexpected.
- A tensor whose shape differs from the model's raises a ValueError naming every such tensor with
  both shapes, unless ignore_mismatched_sizes=True: then those tensors keep their initialisation
  and a warning lists them (a new classifier with a different number of labels is the usual case).
- Model keys the checkpoint lacks stay initialised and are reported as missing (a warning, as in
  transformers; strict=True raises instead), and unused checkpoint keys as unexpected.

Reports go to the "forkattn.models" logger (warning level), once per load, and come back as
{"missing_keys", "unexpected_keys", "mismatched_keys", "ignored_keys"} (sorted model/checkpoint keys).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

logger = logging.getLogger("forkattn.models")

WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
MapKey = Callable[[str, Tensor], Optional[Tuple[str, Tensor]]]


def model_folder(path, what: str = "model") -> str:
    """path as a str after checking it is a folder holding config.json (FileNotFoundError otherwise)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder {path!r} does not exist (expected a save_pretrained folder "
                                "with config.json and model.safetensors)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} folder {path!r} has no config.json (is it a save_pretrained folder?)")
    return path


def read_state_dict(path, map_location="cpu") -> Dict[str, Tensor]:
    """The tensors of a transformers-format folder: model.safetensors, its sharded index, else
    pytorch_model.bin. FileNotFoundError names the folder and the files looked for."""
    path = os.fspath(path)
    st = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(st) or os.path.isfile(index):
        from safetensors.torch import load_file

        if os.path.isfile(st):
            return _read(load_file, st, map_location)
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from None
        state: Dict[str, Tensor] = {}
        for shard in shards:
            state.update(_read(load_file, os.path.join(path, shard), map_location))
        return state
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(pt):
        return _read(lambda f, device: torch.load(f, map_location=device, weights_only=True), pt, map_location)
    raise FileNotFoundError(f"{path} has none of {', '.join(WEIGHTS_FILES)}")


def _read(reader, file: str, map_location) -> Dict[str, Tensor]:
    """reader(file, device=...), with a damaged or foreign file reported as a ValueError naming it
    (safetensors raises its own SafetensorError, torch.load an UnpicklingError or RuntimeError)."""
    try:
        state = reader(file, device=str(map_location))
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file's name
        raise ValueError(f"cannot read the weights file {file}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"the weights file {file} does not hold a dict of tensors")
    return state


def save_safetensors(state: Dict[str, Tensor], file: str) -> None:
    """safetensors' save_file, then the permissions any other file written here gets (0666 less the
    umask, 0644 usually): safetensors creates the file 0600."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, file, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


def write_folder(path, config: dict, state: Dict[str, Tensor], safe_serialization: bool = True) -> None:
    """A folder from_pretrained (ours and transformers') reads: config.json (indented, sorted keys)
    and the tensors as model.safetensors, or pytorch_model.bin with safe_serialization=False."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if safe_serialization:
        save_safetensors(state, os.path.join(path, "model.safetensors"))
    else:
        torch.save(state, os.path.join(path, "pytorch_model.bin"))


def load_state(model: nn.Module, state: Dict[str, Tensor], map_key: MapKey, *,
               tied: Iterable[Tuple[str, str]] = (), ignore_mismatched_sizes: bool = False,
               strict: bool = False, owner: Optional[str] = None, log: bool = True) -> Dict[str, list]:
    """Copy `state` into `model` through map_key; returns the key report (see the module docstring).

    tied: (a, b) pairs of model keys holding one tensor: when only one of them is in the
    checkpoint it fills both. owner names the model in messages (default: its class name).
    log=False returns the report without logging it (from_pretrained logs; a bare state-dict load,
    like torch's load_state_dict, does not). Nothing is copied when this raises."""
    owner = owner or type(model).__name__
    if not isinstance(ignore_mismatched_sizes, bool):
        raise TypeError(f"ignore_mismatched_sizes must be a bool, got {type(ignore_mismatched_sizes).__name__}")
    own = model.state_dict()
    loaded: Dict[str, Tensor] = {}
    unexpected, ignored, mismatched = [], [], []
    for key, value in state.items():
        mapped = map_key(key, value)
        if mapped is None:
            ignored.append(key)
            continue
        name, value = mapped
        if name not in own:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(own[name].shape):
            where = name if name == key else f"{name} (checkpoint key {key})"
            mismatched.append((name, f"{where}: checkpoint {tuple(value.shape)}, model {tuple(own[name].shape)}"))
        else:
            loaded[name] = value
    for a, b in tied:
        if a in own and b in own:
            if a in loaded and b not in loaded:
                loaded[b] = loaded[a]
            elif b in loaded and a not in loaded:
                loaded[a] = loaded[b]
    bad = {name for name, _ in mismatched}
    missing = sorted(k for k in own if k not in loaded and k not in bad)
    unexpected = sorted(unexpected)
    if mismatched and not ignore_mismatched_sizes:
        raise ValueError(f"{owner}: {len(mismatched)} checkpoint tensors do not match the model's shapes (does "
                         "config.json belong to these weights?): " + "; ".join(m for _, m in sorted(mismatched))
                         + ". Pass ignore_mismatched_sizes=True to leave them newly initialized.")
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match {owner} (strict=True): missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    with torch.no_grad():
        for name, value in loaded.items():
            own[name].copy_(value)
    if log and mismatched:
        logger.warning("%s: %d tensors with other shapes in the checkpoint, left newly initialized "
                       "(ignore_mismatched_sizes=True): %s", owner, len(mismatched),
                       "; ".join(m for _, m in sorted(mismatched)))
    if log and missing:
        logger.warning("%s: %d keys missing from the checkpoint, newly initialized: %s", owner, len(missing), missing)
    if log and unexpected:
        logger.warning("%s: %d unexpected keys in the checkpoint, not used: %s", owner, len(unexpected), unexpected)
    return {"missing_keys": missing, "unexpected_keys": unexpected,
            "mismatched_keys": sorted(bad), "ignored_keys": sorted(ignored)}
