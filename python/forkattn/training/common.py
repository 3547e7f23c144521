"""Pieces shared by the training commands: optimizer, schedule, one optimizer step, autocast, DDP,
checkpoints, the CSV/JSONL reader, command-line helpers (one --dtype vocabulary, help with defaults,
input checks that end in one clean line)."""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import shutil
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, LayerNorm weights and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_schedule(optimizer, warmup_steps: int, total_steps: int, decay: str = "cosine", min_ratio: float = 0.0):
    """Linear warm-up to the base lr, then cosine or linear decay to min_ratio * lr at total_steps."""
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {decay!r}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or total_steps <= warmup_steps:
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1 - t
        return min_ratio + (1 - min_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_and_scaler(device: torch.device, dtype: Optional[str]):
    """(autocast context, GradScaler or None) for --dtype on device: a scaler for float16 only."""
    torch_dtype = autocast_dtype(dtype, device)
    if torch_dtype is None:
        return contextlib.nullcontext(), None
    scaler = torch.amp.GradScaler(device.type) if torch_dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=torch_dtype), scaler


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer, scheduler, scaler=None,
                   grad_clip: float = 0.0) -> None:
    """Backward, gradient clipping at grad_clip (> 0), optimizer and schedule step; through the
    GradScaler when there is one."""
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()


def progress(total: int, disable: bool, desc: str):
    """A tqdm bar (disabled: updates do nothing)."""
    from tqdm import tqdm

    return tqdm(total=total, disable=disable, desc=desc, dynamic_ncols=True)


def read_records(path: str) -> List[dict]:
    """Rows of a CSV / TSV (header line) or JSONL / JSON-list file."""
    if path.endswith(".csv") or path.endswith(".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Distributed:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), a no-op otherwise."""

    def __init__(self, backend: Optional[str] = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        if requested == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return torch.device(requested)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [model_device.index] if (model_device := next(model.parameters()).device).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, items: Iterable, ) -> list:
        items = list(items)
        return items[self.rank :: self.world_size]

    def broadcast_object(self, obj):
        """Rank 0's obj on every rank (picklable; obj itself without torchrun)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj) -> list:
        """Every rank's obj, in rank order, on every rank ([obj] without torchrun)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def save_pretrained(path: str, *objects) -> None:
    """save_pretrained(path) of each (a model and its tokenizer): one from_pretrained folder."""
    for obj in objects:
        obj.save_pretrained(path)


# --- command-line helpers -----------------------------------------------------------------------

class UsageError(Exception):
    """A bad flag or input file: forkattn.train prints it as one line and exits with status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and "(default: X)" after every option that has a default
    and does not already say it."""

    def add_argument(self, action):
        if action.help is None and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"  # an option without help text still shows its default
        super().add_argument(action)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default:" in text or "(default" in text or default is None or default is False or default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)".strip()


# canonical dtype names (torch's) and the short spellings bert commands used to take
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_arg(text: str) -> str:
    """argparse type for --dtype: float32|bfloat16|float16 (fp32|bf16|fp16 accepted as aliases)."""
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"invalid dtype {text!r}: choose float32, bfloat16 or float16 "
                                         "(or fp32, bf16, fp16)") from None


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", type=dtype_arg, default=None, metavar="{float32,bfloat16,float16}",
                   help="autocast dtype; fp32/bf16/fp16 also accepted (default: bfloat16 on CUDA, float32 on CPU)")


def add_bert_run_args(p: argparse.ArgumentParser) -> None:
    """The flags bert-mlm and bert-finetune share: output, device, backend, dtype, batch, optimizer."""
    p.add_argument("--out", required=True, help="output directory (model, tokenizer, logs)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--backend", default=None, help="forkattn.attention backend (default: fastest available)")
    add_dtype_arg(p)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def autocast_dtype(name: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """--dtype (or its default for the device) as the torch dtype to autocast to; None for float32."""
    name = DTYPES[name] if name else ("bfloat16" if device.type == "cuda" else "float32")
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def input_file(path: str, flag: str) -> str:
    """path, after checking it is a readable file (UsageError naming flag and path otherwise)."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, expected a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path}: not readable")
    return path


def model_dir(path: str, flag: str) -> str:
    """path, after checking it is a save_pretrained folder with config.json."""
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: no such model folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{flag} {path}: not a model folder (no config.json)")
    return path


@contextlib.contextmanager
def output_dir(path: str, enabled: bool = True):
    """Creates the --out folder; if the command then fails, removes it again when this call created
    it and nothing was written into it (no empty folders left behind)."""
    existed = os.path.exists(path)
    if enabled:
        os.makedirs(path, exist_ok=True)
    try:
        yield path
    except BaseException:
        if enabled and not existed and os.path.isdir(path) and not os.listdir(path):
            shutil.rmtree(path, ignore_errors=True)
        raise


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR):
    """Raise a logger's level for a block (a command that reports the same thing itself)."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield logger
    finally:
        logger.setLevel(old)
