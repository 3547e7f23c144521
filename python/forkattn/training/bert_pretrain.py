"""`python -m forkattn.train bert-mlm ...`: BERT pre-training.

Masked-language-model pre-training on a text file (one sentence per line, documents separated by
blank lines) with a WordPiece tokenizer trained on it (or --tokenizer / --init's), fresh 80/10/10
masks every step (forkattn.data.MLMCollator on forkattn.mlm_mask: special tokens and padding never
masked, at least one predicted token per sequence), optionally next-sentence (--objective nsp) or
sentence-order prediction (--objective sop, ALBERT); AdamW with warm-up; checkpoints in
from_pretrained format. Runs under torchrun (DDP; gloo on CPU, nccl on GPU): each rank draws its
own batches and masks, DDP averages the gradients, so the replicas stay identical.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from forkattn.data import MLMCollator
from forkattn.models import bert as fb
from forkattn.models.bert_tokenizer import BertTokenizer
from forkattn.training.common import (Distributed, HelpFormatter, adamw, add_bert_run_args, autocast_and_scaler,
                                      input_file, model_dir, optimizer_step, progress, save_pretrained,
                                      warmup_schedule)


def read_documents(path: str) -> List[List[str]]:
    """Sentences (lines) grouped into documents (separated by blank lines)."""
    docs, cur = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                cur.append(line)
            elif cur:
                docs.append(cur)
                cur = []
    if cur:
        docs.append(cur)
    if not docs:
        raise ValueError(f"--data {path} has no text")
    return docs


class PretrainingData:
    """Examples for MLM ([CLS] chunk [SEP], docs packed into max_len) or sentence pairs for NSP/SOP."""

    def __init__(self, docs: List[List[str]], tok: BertTokenizer, max_len: int, objective: str, seed: int):
        self.tok, self.max_len, self.objective = tok, max_len, objective
        flat = [s for d in docs for s in d]
        ids = [e.ids for e in tok.encode_batch(flat, add_special_tokens=False)]
        self.docs, k = [], 0
        for d in docs:
            self.docs.append([x for x in ids[k:k + len(d)] if x])
            k += len(d)
        self.docs = [d for d in self.docs if d]
        self.rng = random.Random(seed)
        if objective == "mlm":
            self.chunks = []
            for d in self.docs:
                stream = [t for s in d for t in s]
                for i in range(0, len(stream), max_len - 2):
                    self.chunks.append(stream[i:i + max_len - 2])
        else:
            self.pairs = [(di, si) for di, d in enumerate(self.docs) for si in range(len(d) - 1)]
            if not self.pairs:
                raise ValueError(f"--objective {objective} needs documents with at least two sentences (lines)")

    def _truncate(self, a: List[int], b: List[int]):
        a, b = list(a), list(b)
        while len(a) + len(b) > self.max_len - 3:
            (a if len(a) >= len(b) else b).pop()
        return a, b

    def sample(self, n: int) -> List[dict]:
        cls, sep = self.tok.cls_token_id, self.tok.sep_token_id
        rows = []
        for _ in range(n):
            if self.objective == "mlm":
                c = self.chunks[self.rng.randrange(len(self.chunks))]
                rows.append({"input_ids": [cls, *c, sep]})
                continue
            di, si = self.pairs[self.rng.randrange(len(self.pairs))]
            a, b = self.docs[di][si], self.docs[di][si + 1]
            label = int(self.rng.random() < 0.5)
            if label and self.objective == "nsp":  # 1 = B is a random sentence from elsewhere
                dj = self.rng.randrange(len(self.docs))
                if len(self.docs) == 1 or dj == di:
                    choices = [j for j in range(len(self.docs[di])) if j != si + 1]
                    b = self.docs[di][self.rng.choice(choices)]
                else:
                    b = self.docs[dj][self.rng.randrange(len(self.docs[dj]))]
            elif label:  # sop: 1 = the two sentences swapped
                a, b = b, a
            a, b = self._truncate(a, b)
            rows.append({"input_ids": [cls, *a, sep, *b, sep], "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
                         "pair_label": label})
        return rows


def mlm_collator(tok: BertTokenizer, mask_prob: float, device=None) -> MLMCollator:
    """Pads rows of ids and masks them BERT's way: each non-special, non-padding token is selected
    with mask_prob, then 80% [MASK], 10% a random non-special id, 10% kept; every sequence gets at
    least one selected token (min_masked=1), so every row has something to predict."""
    return MLMCollator(tok, mlm_probability=mask_prob, min_masked=1, device=device)


def mask_batch(collate: MLMCollator, rows: List[dict], generator: torch.Generator
               ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """(padded batch with masked input_ids, labels: -100 where nothing is predicted) for this step:
    a fresh mask every call, reproducible per rank (the mask seed is drawn from generator)."""
    batch = collate(rows, seed=int(torch.randint(0, 2**62, (1,), generator=generator)))
    return batch, batch.pop("labels")


def _batch_hash(batch: Dict[str, torch.Tensor]) -> str:
    return hashlib.sha1(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:12]


def _vocab_hash(tok: BertTokenizer) -> str:
    return hashlib.sha1(json.dumps(sorted(tok.tokenizer.get_vocab().items())).encode()).hexdigest()[:12]


def _save_weights(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m forkattn.train bert-mlm", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="text file: one sentence per line, blank line between documents")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir/file (default: --init's, else train one on --data)")
    p.add_argument("--vocab-size", type=int, default=8000, help="for a tokenizer trained on --data")
    p.add_argument("--init-from", "--init", dest="init", default=None, help="continue from a from_pretrained checkpoint")
    p.add_argument("--config", default=None, help="config.json for a fresh model (else the size flags)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="default 4 x hidden")
    p.add_argument("--embedding-size", type=int, default=None, help="ALBERT factorized embeddings")
    p.add_argument("--share-layers", action="store_true", help="ALBERT cross-layer sharing (one layer group)")
    p.add_argument("--dropout", type=float, default=0.1, help="hidden-state dropout of a fresh model")
    p.add_argument("--attention-dropout", type=float, default=None,
                   help="dropout on the attention probabilities of a fresh model (default: --dropout)")
    p.add_argument("--objective", default="mlm", choices=["mlm", "nsp", "sop"])
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 6%% of --steps)")
    p.add_argument("--decay", default="linear", choices=["linear", "cosine", "constant"])
    p.add_argument("--save-every", type=int, default=0, help="also save out/checkpoint-<step> every N steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-replicas", action="store_true",
                   help="(tests) every rank writes its final weights to out/replica_rank<r>.safetensors")
    add_bert_run_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    input_file(args.data, "--data")
    if args.init:
        model_dir(args.init, "--init-from")
    if args.config:
        input_file(args.config, "--config")
    ddp = Distributed()
    device = ddp.device(args.device)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    head = {"mlm": fb.BertForMaskedLM, "nsp": fb.BertForPreTraining, "sop": fb.BertForPreTrainingSOP}[args.objective]

    if args.tokenizer or args.init:
        tok = BertTokenizer.from_pretrained(args.tokenizer or args.init)
    else:  # WordPiece training differs from process to process: rank 0 trains, every rank takes its vocabulary
        trained = BertTokenizer.train([args.data], vocab_size=args.vocab_size, min_frequency=1,
                                      model_max_length=args.max_len).to_str() if ddp.is_main else None
        tok = BertTokenizer.from_str(ddp.broadcast_object(trained), model_max_length=args.max_len)
    if args.init:
        model = head.from_pretrained(args.init, attention_backend=args.backend)
    else:
        if args.config:
            with open(args.config) as f:
                config = fb.BertConfig.from_dict(json.load(f), vocab_size=tok.vocab_size, attention_backend=args.backend)
        else:
            config = fb.BertConfig(
                vocab_size=tok.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, intermediate_size=args.intermediate or 4 * args.hidden,
                hidden_dropout_prob=args.dropout,
                attention_probs_dropout_prob=args.dropout if args.attention_dropout is None else args.attention_dropout,
                max_position_embeddings=max(512, args.max_len), pad_token_id=tok.pad_token_id,
                embedding_size=args.embedding_size, num_hidden_groups=1 if args.share_layers else None,
                attention_backend=args.backend)
        model = head(config)
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    model.config.sparse_prediction = True  # only the loss is used: project only the masked tokens
    model.to(device).train()
    if args.save_replicas and ddp.is_main:
        _save_weights(model, os.path.join(args.out, "replica_init.safetensors"))
    net = ddp.wrap(model)

    data = PretrainingData(read_documents(args.data), tok, args.max_len, args.objective, seed=args.seed + 1000 * ddp.rank)
    collate = mlm_collator(tok, args.mask_prob, device)
    gen = torch.Generator().manual_seed(args.seed * 7919 + ddp.rank)
    opt = adamw(model, args.lr, args.weight_decay)
    warmup = args.warmup if args.warmup is not None else int(0.06 * args.steps)
    sched = warmup_schedule(opt, warmup, args.steps, decay=args.decay)
    autocast, scaler = autocast_and_scaler(device, args.dtype)

    log, t0 = [], time.time()
    bar = progress(args.steps, args.no_progress or not ddp.is_main, f"bert-mlm ({args.objective})")
    for step in range(args.steps):
        rows = data.sample(args.batch_size)
        batch, labels = mask_batch(collate, rows, gen)
        kw = {}
        if args.objective != "mlm":
            pl = torch.tensor([r["pair_label"] for r in rows], device=device)
            kw["next_sentence_label" if args.objective == "nsp" else "sentence_order_label"] = pl
        with autocast:
            loss = net(**batch, labels=labels, **kw)["loss"]
        optimizer_step(loss, model, opt, sched, scaler, args.grad_clip)
        entry = {"step": step + 1, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                 "masked": int((labels != -100).sum()), "seconds": round(time.time() - t0, 3)}
        if step == 0:
            entry["world_size"] = ddp.world_size
            for name, value in (("batch_hash", _batch_hash(batch)), ("vocab_hash", _vocab_hash(tok))):
                entry.update({f"rank{r}_{name}": h for r, h in enumerate(ddp.gather_object(value))})
        log.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{entry['lr']:.2e}")
        if ddp.is_main and args.log_every and (step + 1) % args.log_every == 0 and args.no_progress:
            print(f"step {step + 1}/{args.steps} loss {entry['loss']:.4f} lr {entry['lr']:.2e}", flush=True)
        if ddp.is_main and args.save_every and (step + 1) % args.save_every == 0:
            save_pretrained(os.path.join(args.out, f"checkpoint-{step + 1}"), model, tok)
    bar.close()
    if ddp.is_main:
        save_pretrained(args.out, model, tok)
        with open(os.path.join(args.out, "train_log.json"), "w") as f:
            json.dump(log, f, indent=1)
        print(f"bert-mlm: {args.steps} steps, final loss {log[-1]['loss']:.4f}, saved to {args.out}", flush=True)
    if args.save_replicas:
        if ddp.enabled:
            dist.barrier()
        _save_weights(model, os.path.join(args.out, f"replica_rank{ddp.rank}.safetensors"))
    ddp.close()
    return 0
