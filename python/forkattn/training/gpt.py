"""`python -m forkattn.train gpt --data corpus.txt --out run/`: next-token training of a GPT.

The text file is tokenized with a byte-level BPE trained on it by the tokenizers library (or a
given tokenizer.json), cut into random windows of --block-size tokens, and a GPT (a fresh config,
or --init-from a transformers GPT-2 directory) is trained with AdamW, linear warm-up and cosine
decay (training/common.py), gradient clipping, tqdm progress and periodic checkpoints
(save_pretrained directories + tokenizer.json + optimizer state). Before training it prints
tokens per parameter against the compute-optimal ~20 of Chinchilla (Hoffmann et al. 2022).
Under torchrun each rank draws its own windows and DDP averages gradients.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Optional

import torch

from ..models.gpt import GPT, GPTConfig
from .common import (Distributed, HelpFormatter, UsageError, adamw, add_dtype_arg, autocast_dtype, default_device,
                     input_file, model_dir, optimizer_step, output_dir, warmup_schedule)

CHINCHILLA_TOKENS_PER_PARAM = 20
EOS = "<|endoftext|>"


def train_bpe(files, vocab_size: int):
    """A GPT-2-style byte-level BPE trained on `files`, with <|endoftext|> as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    return tok


def load_tokenizer(path: str):
    """A tokenizers.Tokenizer from tokenizer.json (or a directory that holds one)."""
    from tokenizers import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)


def encode_file(tok, path: str) -> torch.Tensor:
    """The whole file as one int64 token stream; paragraphs (blank-line separated) end with EOS."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    eos = tok.token_to_id(EOS)
    ids = []
    for para in text.split("\n\n"):
        if para.strip():
            ids.extend(tok.encode(para).ids)
            if eos is not None:
                ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def batches(tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """Endless random windows: (input_ids [B, L], labels [B, L]); labels == input_ids, the model shifts."""
    n = tokens.numel() - block_size
    if n < 1:
        raise ValueError(f"the data has {tokens.numel()} tokens; --block-size {block_size} needs at least {block_size + 1}")
    while True:
        start = torch.randint(0, n, (batch_size,), generator=generator)
        x = torch.stack([tokens[s: s + block_size] for s in start.tolist()])
        yield x, x


def tokens_per_param_line(n_params: int, n_tokens: int) -> str:
    r = n_tokens / max(1, n_params)
    verdict = "under-trained" if r < CHINCHILLA_TOKENS_PER_PARAM / 2 else (
        "over-trained" if r > CHINCHILLA_TOKENS_PER_PARAM * 2 else "near compute-optimal")
    return (f"{n_params:,} parameters (without embeddings), {n_tokens:,} training tokens: {r:.2f} tokens/parameter "
            f"vs ~{CHINCHILLA_TOKENS_PER_PARAM} compute-optimal (Chinchilla) -> {verdict}")


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, batch_size: int, block_size: int, device, max_batches: int = 8) -> float:
    """Mean next-token loss over consecutive windows of `tokens`."""
    model.eval()
    windows = tokens[: (tokens.numel() - 1) // block_size * block_size].view(-1, block_size)
    losses = []
    for i in range(0, min(len(windows), batch_size * max_batches), batch_size):
        x = windows[i: i + batch_size].to(device)
        losses.append(model(x, labels=x).loss.item())
    model.train()
    return sum(losses) / max(1, len(losses))


def fit(
    model: GPT,
    tokens: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    block_size: int,
    lr: float = 6e-4,
    warmup: int = 10,
    weight_decay: float = 0.1,
    min_lr_ratio: float = 0.1,
    grad_clip: float = 1.0,
    device="cpu",
    seed: int = 0,
    dist: Optional[Distributed] = None,
    progress: bool = False,
    autocast_dtype: Optional[torch.dtype] = None,
    on_step=None,
) -> list:
    """The training loop (also used by tests and notebooks): returns the loss of every step.
    on_step(step, loss) is called after every step; one that takes a third argument also gets
    the learning rate the step used."""
    dist = dist or Distributed()
    model.to(device).train()
    ddp = dist.wrap(model)
    opt = adamw(model, lr, weight_decay, betas=(0.9, 0.95))
    sched = warmup_schedule(opt, warmup, steps, "cosine", min_lr_ratio)
    gen = torch.Generator().manual_seed(seed + 1000 * dist.rank)  # each rank its own windows
    data = batches(tokens, batch_size, block_size, gen)
    it = range(steps)
    bar = None
    if progress and dist.is_main:
        try:
            from tqdm import tqdm

            it = bar = tqdm(it, desc="train", dynamic_ncols=True)
        except ImportError:
            pass
    import inspect

    pass_lr = on_step is not None and len(inspect.signature(on_step).parameters) >= 3
    losses = []
    for step in it:
        x, y = next(data)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            loss = ddp(x, labels=y).loss
        lr_used = sched.get_last_lr()[0]
        optimizer_step(loss, model, opt, sched, grad_clip=grad_clip)
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if on_step is not None:
            on_step(step, losses[-1], lr_used) if pass_lr else on_step(step, losses[-1])
    return losses


def save_checkpoint(model: GPT, tok, out: str, opt_state=None, step: Optional[int] = None) -> str:
    path = out if step is None else os.path.join(out, f"step-{step:06d}")
    model.save_pretrained(path)
    if tok is not None:
        tok.save(os.path.join(path, "tokenizer.json"))
    if opt_state is not None:
        torch.save(opt_state, os.path.join(path, "training_state.pt"))
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m forkattn.train gpt", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="UTF-8 text file")
    p.add_argument("--out", required=True, help="output directory (checkpoints, tokenizer.json)")
    p.add_argument("--tokenizer", help="tokenizer.json (or a directory with one); default: train a byte-level BPE")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when training one")
    p.add_argument("--init-from", "--init", dest="init_from",
                   help="a transformers GPT-2 directory to start from (its config wins)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128, help="tokens per training window (= n_positions)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step per process")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.0, help="residual and embedding dropout of a fresh model")
    p.add_argument("--attention-dropout", type=float, default=None,
                   help="dropout on the attention probabilities of a fresh model (default: --dropout)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_dtype_arg(p)
    p.add_argument("--backend", default=None, help="forkattn.attention backend (default: fastest available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar: plain log lines every --log-every steps")
    p.add_argument("--log-every", type=int, default=10, help="with --no-progress, print a line every N steps")
    p.add_argument("--sample", type=int, default=0, help="after training, print a sample of this many tokens")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    input_file(args.data, "--data")
    if args.tokenizer:
        input_file(os.path.join(args.tokenizer, "tokenizer.json") if os.path.isdir(args.tokenizer) else args.tokenizer,
                   "--tokenizer")
    if args.init_from:
        model_dir(args.init_from, "--init-from")
    dist = Distributed()
    with output_dir(args.out, enabled=dist.is_main):
        return _train(args, dist)


def _train(args, dist: Distributed) -> int:
    device = dist.device(args.device or default_device())
    torch.manual_seed(args.seed)
    log = (lambda *a: print(*a, flush=True)) if dist.is_main else (lambda *a, **k: None)

    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        tok = train_bpe([args.data], args.vocab_size)  # deterministic, so every rank gets the same one
    tokens = encode_file(tok, args.data)
    if tokens.numel() == 0:
        raise UsageError(f"--data {args.data} has no text")
    n_val = int(tokens.numel() * args.val_fraction) if args.val_fraction > 0 else 0
    train_tokens, val_tokens = (tokens[:-n_val], tokens[-n_val:]) if n_val > args.block_size else (tokens, None)
    log(f"data: {tokens.numel():,} tokens ({train_tokens.numel():,} train), vocabulary {tok.get_vocab_size():,}")

    if args.init_from:
        model = GPT.from_pretrained(args.init_from, backend=args.backend)
        if tok.get_vocab_size() > model.config.vocab_size:
            raise UsageError(f"--tokenizer has {tok.get_vocab_size()} tokens, the --init-from model only "
                             f"{model.config.vocab_size}")
    else:
        eos = tok.token_to_id(EOS)
        config = GPTConfig(vocab_size=tok.get_vocab_size(), n_positions=args.block_size, n_embd=args.n_embd,
                           n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=args.dropout,
                           embd_pdrop=args.dropout,
                           attn_pdrop=args.dropout if args.attention_dropout is None else args.attention_dropout, bos_token_id=eos, eos_token_id=eos)
        model = GPT(config, backend=args.backend)
    if args.block_size > model.config.n_positions:
        raise UsageError(f"--block-size {args.block_size} exceeds the model's n_positions {model.config.n_positions}")
    total = args.steps * args.batch_size * args.block_size * dist.world_size
    log(tokens_per_param_line(model.num_parameters(exclude_embeddings=True), total))
    autocast = autocast_dtype(args.dtype, device)

    t0 = time.time()
    history = []

    def on_step(step, loss, lr):
        done = step + 1
        history.append({"step": done, "loss": loss, "lr": lr, "seconds": round(time.time() - t0, 3)})
        if args.no_progress and args.log_every and (done % args.log_every == 0 or done == args.steps):
            log(f"step {done}/{args.steps} loss {loss:.4f} lr {lr:.2e}")
        if args.save_every and done % args.save_every == 0 and done < args.steps and dist.is_main:
            save_checkpoint(model, tok, args.out, step=done)

    losses = fit(model, train_tokens, steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                 lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, min_lr_ratio=args.min_lr_ratio,
                 grad_clip=args.grad_clip, device=device, seed=args.seed, dist=dist,
                 progress=not args.no_progress, autocast_dtype=autocast, on_step=on_step)
    dt = time.time() - t0
    log(f"trained {args.steps} steps in {dt:.1f}s ({total / max(dt, 1e-9):,.0f} tokens/s); "
        f"loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} (mean of the last 10 steps)")
    if val_tokens is not None and dist.is_main:
        vl = evaluate(model, val_tokens, args.batch_size, args.block_size, device)
        log(f"validation loss {vl:.3f} (perplexity {math.exp(min(vl, 50)):.1f})")
    if dist.is_main:
        path = save_checkpoint(model, tok, args.out)
        with open(os.path.join(args.out, "train_log.json"), "w") as f:
            json.dump(history, f, indent=1)
        log(f"saved {path}")
        if args.sample:
            prompt = torch.tensor([[tok.token_to_id(EOS) or 0]], device=device)
            out = model.generate(prompt, min(args.sample, model.config.n_positions - 1), top_k=50, seed=args.seed)
            log("sample: " + tok.decode(out[0, 1:].tolist()))
    dist.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
