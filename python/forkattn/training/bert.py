"""BERT training commands: `python -m forkattn.train bert-mlm ...` and `... bert-finetune ...`.

bert-mlm: masked-language-model pre-training on a text file (one sentence per line, documents
    separated by blank lines) with a WordPiece tokenizer trained on it (or --tokenizer / --init's),
    fresh 80/10/10 masks every step (forkattn.mlm_mask), optionally next-sentence (--objective nsp)
    or sentence-order prediction (--objective sop, ALBERT); AdamW with warm-up; checkpoints in
    from_pretrained format.
bert-finetune: loads a checkpoint, swaps the head and fine-tunes for sequence classification
    (CSV/JSONL with text[, text_pair], label), token classification (JSONL tokens + tags) or
    extractive question answering (JSONL question, context, answer[, answer_start]); reports
    accuracy (exact match for QA) and saves the model.
Both run under torchrun (DDP; gloo on CPU, nccl on GPU): each rank draws its own batches, DDP
averages the gradients, so the replicas stay identical.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

import forkattn
from forkattn.models import bert as fb
from forkattn.models.bert_tokenizer import BertTokenizer
from forkattn.training.common import (Distributed, HelpFormatter, UsageError, adamw, add_dtype_arg, autocast_dtype,
                                      default_device, input_file, model_dir, quiet_logger, warmup_schedule)


# --- shared pieces -------------------------------------------------------------------------------

def _common_args(p: argparse.ArgumentParser) -> None:
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


def _autocast(device: torch.device, dtype: Optional[str]):
    torch_dtype = autocast_dtype(dtype, device)
    if torch_dtype is None:
        return nullcontext(), None
    scaler = torch.amp.GradScaler(device.type) if torch_dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=torch_dtype), scaler


def _pad(rows: List[Dict[str, List[int]]], pad_id: int, device) -> Dict[str, torch.Tensor]:
    """Right-pad lists of ids to the longest row: input_ids, token_type_ids, attention_mask (+ extra keys)."""
    L = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.full((len(rows), L), pad_id, dtype=torch.long),
           "token_type_ids": torch.zeros(len(rows), L, dtype=torch.long),
           "attention_mask": torch.zeros(len(rows), L, dtype=torch.long)}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
        out["token_type_ids"][i, :n] = torch.tensor(r.get("token_type_ids") or [0] * n)
        out["attention_mask"][i, :n] = 1
    return {k: v.to(device) for k, v in out.items()}


def _eager_mlm_mask(input_ids, *, vocab_size, mask_token_id, mask_prob, special_token_ids, attention_mask,
                    generator=None):
    """Used only when this build has no forkattn.mlm_mask: the 80/10/10 recipe in plain PyTorch."""
    dev = input_ids.device
    specials = torch.tensor(sorted(special_token_ids), device=dev)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, specials)
    r = torch.rand(input_ids.shape, generator=generator).to(dev)
    selected = (r < mask_prob) & eligible
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    fate = torch.rand(input_ids.shape, generator=generator).to(dev)
    out = input_ids.clone()
    out[selected & (fate < 0.8)] = mask_token_id
    rnd = selected & (fate >= 0.8) & (fate < 0.9)
    ids = torch.randint(0, vocab_size - len(specials), input_ids.shape, generator=generator).to(dev)
    for s in specials.tolist():  # skip over the special ids, ascending
        ids = ids + (ids >= s).long()
    out[rnd] = ids[rnd]
    return out, labels


def mask_tokens(batch: Dict[str, torch.Tensor], tok: BertTokenizer, mask_prob: float, generator: torch.Generator):
    """Fresh masks for this step: (masked input_ids, labels with -100 where not predicted)."""
    kw = dict(vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id, mask_prob=mask_prob,
              special_token_ids=tok.all_special_ids, attention_mask=batch["attention_mask"], generator=generator)
    mlm_mask = getattr(forkattn, "mlm_mask", None)
    if mlm_mask is None:
        return _eager_mlm_mask(batch["input_ids"], **kw)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # reproducible per rank, fresh per step
    kw.pop("generator")
    return mlm_mask(batch["input_ids"], min_masked=1, seed=seed, **kw)


def _save(model, tok: BertTokenizer, path: str) -> None:
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _progress(total: int, disable: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=disable, desc=desc, dynamic_ncols=True)


def _batch_hash(batch: Dict[str, torch.Tensor]) -> str:
    return hashlib.sha1(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:12]


# --- bert-mlm ----------------------------------------------------------------------------------

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


def _mlm_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--dropout", type=float, default=0.1)
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
    _common_args(p)
    return p


def main_mlm(argv=None) -> int:
    args = _mlm_parser().parse_args(argv)
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
    else:  # every rank trains the same vocabulary from the same file (deterministic)
        tok = BertTokenizer.train([args.data], vocab_size=args.vocab_size, min_frequency=1,
                                  model_max_length=args.max_len)
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
                hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=0.0,
                max_position_embeddings=max(512, args.max_len), pad_token_id=tok.pad_token_id,
                embedding_size=args.embedding_size, num_hidden_groups=1 if args.share_layers else None,
                attention_backend=args.backend)
        model = head(config)
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    model.config.sparse_prediction = True  # only the loss is used: project only the masked tokens
    model.to(device).train()
    if args.save_replicas and ddp.is_main:
        os.makedirs(args.out, exist_ok=True)
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(args.out, "replica_init.safetensors"))
    net = ddp.wrap(model)

    data = PretrainingData(read_documents(args.data), tok, args.max_len, args.objective, seed=args.seed + 1000 * ddp.rank)
    gen = torch.Generator().manual_seed(args.seed * 7919 + ddp.rank)
    opt = adamw(model, args.lr, args.weight_decay)
    warmup = args.warmup if args.warmup is not None else int(0.06 * args.steps)
    sched = warmup_schedule(opt, warmup, args.steps, decay=args.decay)
    autocast, scaler = _autocast(device, args.dtype)

    log, t0 = [], time.time()
    bar = _progress(args.steps, args.no_progress or not ddp.is_main, f"bert-mlm ({args.objective})")
    for step in range(args.steps):
        rows = data.sample(args.batch_size)
        batch = _pad(rows, tok.pad_token_id, device)
        batch["input_ids"], labels = mask_tokens(batch, tok, args.mask_prob, gen)
        kw = {}
        if args.objective != "mlm":
            pl = torch.tensor([r["pair_label"] for r in rows], device=device)
            kw["next_sentence_label" if args.objective == "nsp" else "sentence_order_label"] = pl
        with autocast:
            loss = net(**batch, labels=labels, **kw)["loss"]
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        entry = {"step": step + 1, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                 "masked": int((labels != -100).sum()), "seconds": round(time.time() - t0, 3)}
        if step == 0:
            entry["world_size"] = ddp.world_size
            hashes = [_batch_hash(batch)]
            if ddp.enabled:
                hashes = [None] * ddp.world_size
                dist.all_gather_object(hashes, _batch_hash(batch))
            entry.update({f"rank{r}_batch_hash": h for r, h in enumerate(hashes)})
        log.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{entry['lr']:.2e}")
        if ddp.is_main and args.log_every and (step + 1) % args.log_every == 0 and args.no_progress:
            print(f"step {step + 1}/{args.steps} loss {entry['loss']:.4f} lr {entry['lr']:.2e}", flush=True)
        if ddp.is_main and args.save_every and (step + 1) % args.save_every == 0:
            _save(model, tok, os.path.join(args.out, f"checkpoint-{step + 1}"))
    bar.close()
    if ddp.is_main:
        _save(model, tok, args.out)
        with open(os.path.join(args.out, "train_log.json"), "w") as f:
            json.dump(log, f, indent=1)
        print(f"bert-mlm: {args.steps} steps, final loss {log[-1]['loss']:.4f}, saved to {args.out}", flush=True)
    if args.save_replicas:
        from safetensors.torch import save_file

        if ddp.enabled:
            dist.barrier()
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(args.out, f"replica_rank{ddp.rank}.safetensors"))
    ddp.close()
    return 0


# --- bert-finetune -----------------------------------------------------------------------------

def read_records(path: str) -> List[dict]:
    """Rows of a CSV (header line) or JSONL / JSON-list file."""
    if path.endswith(".csv") or path.endswith(".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _checked_records(path: str, flag: str, args) -> List[dict]:
    """read_records, after which every row must hold the columns the task reads: a UsageError
    lists the columns found and the flag that picks another one."""
    try:
        records = read_records(path)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{flag} {path}: not a readable CSV/TSV/JSONL file ({e})") from None
    if not records:
        raise UsageError(f"{flag} {path}: no examples (an empty file, or a header line only)")
    if not all(isinstance(r, dict) for r in records):
        raise UsageError(f"{flag} {path}: every example must be an object/row with named columns")
    needed = {"sequence-classification": [("--text-column", args.text_column), ("--label-column", args.label_column)]
              + ([("--pair-column", args.pair_column)] if args.pair_column else []),
              "token-classification": [("--tokens-column", args.tokens_column), ("--tags-column", args.tags_column)],
              "question-answering": [(None, "question"), (None, "context")]}[args.task]
    for i, r in enumerate(records):
        for opt, col in needed:
            if r.get(col) is None:
                found = ", ".join(repr(c) for c in r) or "none"
                how = f"; choose another with {opt}" if opt else ""
                raise UsageError(f"{flag} {path}: example {i + 1} has no {col!r} column (columns found: {found}){how}")
    return records


TASKS = {"sequence-classification": fb.BertForSequenceClassification,
         "token-classification": fb.BertForTokenClassification,
         "question-answering": fb.BertForQuestionAnswering}


def _finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m forkattn.train bert-finetune", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--task", default="sequence-classification", choices=list(TASKS))
    p.add_argument("--model", required=True, help="from_pretrained directory (pre-trained or fine-tuned)")
    p.add_argument("--tokenizer", default=None, help="default: --model's")
    p.add_argument("--train", required=True, help="CSV or JSONL")
    p.add_argument("--eval", default=None, help="CSV or JSONL (default: --eval-split of --train, else --train itself)")
    p.add_argument("--eval-split", type=float, default=0.0, help="hold out this fraction of --train for evaluation")
    p.add_argument("--text-column", default="text")
    p.add_argument("--pair-column", default=None, help="second segment column, e.g. a hypothesis")
    p.add_argument("--label-column", default="label")
    p.add_argument("--labeler-column", default="labeler",
                   help="--eval column with a labeler's labels (forkattn.train label): also report agreement with it")
    p.add_argument("--tokens-column", default="tokens")
    p.add_argument("--tags-column", default="tags")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--ignore-mismatched-sizes", action="store_true",
                   help="re-initialize checkpoint tensors whose shape differs (e.g. a classifier with other labels)")
    _common_args(p)
    return p


def _labels_of(records, args) -> List[str]:
    if args.task == "sequence-classification":
        return sorted({str(r[args.label_column]) for r in records})
    if args.task == "token-classification":
        return sorted({str(t) for r in records for t in r[args.tags_column]})
    return []


def _encode(records, tok: BertTokenizer, args, label2id) -> List[dict]:
    rows = []
    if args.task == "sequence-classification":
        texts = [str(r[args.text_column]) for r in records]
        pairs = [str(r[args.pair_column]) for r in records] if args.pair_column else None
        for r, e in zip(records, tok.encode_batch(texts, pairs, truncation=True, max_length=args.max_len)):
            rows.append({"input_ids": e.ids, "token_type_ids": e.type_ids, "label": label2id[str(r[args.label_column])]})
    elif args.task == "token-classification":
        words = [list(r[args.tokens_column]) for r in records]
        encs = tok.encode_batch(words, truncation=True, max_length=args.max_len, is_split_into_words=True)
        for r, e in zip(records, encs):
            tags, labels, prev = r[args.tags_column], [], None
            for w in e.word_ids:  # the first piece of each word carries its tag
                labels.append(-100 if w is None or w == prev else label2id[str(tags[w])])
                prev = w
            rows.append({"input_ids": e.ids, "token_type_ids": e.type_ids, "labels": labels})
    else:
        qs = [r["question"] for r in records]
        ctx = [r["context"] for r in records]
        for r, e in zip(records, tok.encode_batch(qs, ctx, truncation=True, max_length=args.max_len)):
            ans = r.get("answer")
            if ans is None:  # SQuAD style
                ans, start = r["answers"]["text"][0], r["answers"]["answer_start"][0]
            else:
                start = r.get("answer_start", r["context"].find(ans))
            end = start + len(ans)
            s = t = 0  # [CLS] when the answer is not in the (truncated) context
            for i, (seq, (a, b)) in enumerate(zip(e.sequence_ids, e.offsets)):
                if seq == 1 and a <= start < b:
                    s = i
                if seq == 1 and a < end <= b:
                    t = i
            if t < s:
                s = t = 0
            rows.append({"input_ids": e.ids, "token_type_ids": e.type_ids, "start": s, "end": t,
                         "context_mask": [int(x == 1) for x in e.sequence_ids], "offsets": e.offsets,
                         "context": r["context"], "answer": ans})
    return rows


def _collate(rows, tok, task, device):
    batch = _pad(rows, tok.pad_token_id, device)
    L = batch["input_ids"].shape[1]
    if task == "sequence-classification":
        batch["labels"] = torch.tensor([r["label"] for r in rows], device=device)
    elif task == "token-classification":
        batch["labels"] = torch.tensor([r["labels"] + [-100] * (L - len(r["labels"])) for r in rows], device=device)
    else:
        batch["start_positions"] = torch.tensor([r["start"] for r in rows], device=device)
        batch["end_positions"] = torch.tensor([r["end"] for r in rows], device=device)
    return batch


def best_spans(start_logits, end_logits, context_mask, max_answer_len: int = 30):
    """(start, end) per row maximizing start+end logits over context tokens with start <= end < start+max."""
    neg = torch.finfo(start_logits.dtype).min / 4
    s = start_logits.masked_fill(context_mask == 0, neg)
    e = end_logits.masked_fill(context_mask == 0, neg)
    scores = s[:, :, None] + e[:, None, :]
    L = scores.shape[1]
    i = torch.arange(L, device=scores.device)
    ok = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_answer_len)
    flat = scores.masked_fill(~ok, neg * 4).flatten(1).argmax(1)
    return flat // L, flat % L


@torch.no_grad()
def evaluate(model, rows, tok, args, device, autocast) -> dict:
    model.eval()
    correct = total = 0
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i:i + args.batch_size]
        batch = _collate(chunk, tok, args.task, device)
        inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
        with autocast:
            out = model(**inputs)
        if args.task == "sequence-classification":
            correct += int((out["logits"].argmax(-1) == batch["labels"]).sum())
            total += len(chunk)
        elif args.task == "token-classification":
            keep = batch["labels"] != -100
            correct += int(((out["logits"].argmax(-1) == batch["labels"]) & keep).sum())
            total += int(keep.sum())
        else:
            cm = _pad([{"input_ids": r["context_mask"]} for r in chunk], 0, device)["input_ids"]
            s, e = best_spans(out["start_logits"].float(), out["end_logits"].float(), cm)
            for r, a, b in zip(chunk, s.tolist(), e.tolist()):
                pred = r["context"][r["offsets"][a][0]:r["offsets"][b][1]]
                correct += int(pred.strip().lower() == r["answer"].strip().lower())
                total += 1
    model.train()
    key = "exact_match" if args.task == "question-answering" else "accuracy"
    return {key: correct / max(1, total), "examples": total}


def main_finetune(argv=None) -> int:
    args = _finetune_parser().parse_args(argv)
    model_dir(args.model, "--model")
    for flag, path in (("--train", args.train), ("--eval", args.eval)):
        if path:
            input_file(path, flag)
    ddp = Distributed()
    device = ddp.device(args.device)
    torch.manual_seed(args.seed)
    tok = BertTokenizer.from_pretrained(args.tokenizer or args.model)
    train_records = _checked_records(args.train, "--train", args)
    if args.eval:
        eval_records = _checked_records(args.eval, "--eval", args)
    elif args.eval_split > 0:
        random.Random(args.seed).shuffle(train_records)
        n = max(1, int(len(train_records) * args.eval_split))
        eval_records, train_records = train_records[:n], train_records[n:]
    else:
        eval_records = train_records
    labels = _labels_of(train_records + eval_records, args)
    overrides = {"attention_backend": args.backend}
    if labels:
        overrides["id2label"] = dict(enumerate(labels))
    with quiet_logger("forkattn.models"):  # reported once, by the line below
        try:
            model, info = TASKS[args.task].from_pretrained(args.model, output_loading_info=True,
                                                           ignore_mismatched_sizes=args.ignore_mismatched_sizes,
                                                           **overrides)
        except ValueError as e:
            if "ignore_mismatched_sizes" not in str(e):
                raise
            raise UsageError(f"--model {args.model}: {e} (on the command line: --ignore-mismatched-sizes)") from None
    if ddp.is_main:
        print(f"bert-finetune: {args.task} from {args.model}; new head {info['missing_keys']}, "
              f"dropped {info['unexpected_keys']}" +
              (f", re-initialized (other shape) {info['mismatched_keys']}" if info["mismatched_keys"] else ""), flush=True)
    label2id = {v: k for k, v in (model.config.id2label or {}).items()}
    train_rows = _encode(train_records, tok, args, label2id)
    eval_rows = _encode(eval_records, tok, args, label2id)
    model.to(device).train()
    net = ddp.wrap(model)
    shard = ddp.shard(range(len(train_rows)))
    steps_per_epoch = max(1, math.ceil(len(shard) / args.batch_size))
    total = max(1, int(round(args.epochs * steps_per_epoch)))
    opt = adamw(model, args.lr, args.weight_decay)
    sched = warmup_schedule(opt, int(args.warmup_ratio * total), total, decay="linear")
    autocast, scaler = _autocast(device, args.dtype)
    rng = random.Random(args.seed + ddp.rank)
    bar = _progress(total, args.no_progress or not ddp.is_main, f"bert-finetune ({args.task})")
    step, order, results = 0, [], []
    while step < total:
        if not order:
            order = list(shard)
            rng.shuffle(order)
        idx, order = order[:args.batch_size], order[args.batch_size:]
        batch = _collate([train_rows[i] for i in idx], tok, args.task, device)
        with autocast:
            loss = net(**batch)["loss"]
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if ddp.is_main and (step % steps_per_epoch == 0 or step == total):
            res = {"step": step, "epoch": round(step / steps_per_epoch, 2), "loss": float(loss.detach()),
                   **evaluate(model, eval_rows, tok, args, device, autocast)}
            results.append(res)
            bar.write(f"epoch {res['epoch']}: loss {res['loss']:.4f} " +
                      " ".join(f"{k} {v:.4f}" for k, v in res.items() if k in ("accuracy", "exact_match")))
    bar.close()
    if ddp.is_main and args.task == "sequence-classification" and eval_records and args.labeler_column in eval_records[0]:
        # agreement with the labeler: the same evaluation, against its labels instead of the hand labels
        teacher = [dict(r, label=label2id.get(str(rec[args.labeler_column]), -1)) for r, rec in zip(eval_rows, eval_records)]
        results[-1]["labeler_agreement"] = evaluate(model, teacher, tok, args, device, autocast)["accuracy"]
        print(f"accuracy {results[-1]['accuracy']:.4f} on {args.eval or 'the eval rows'}, agreement with the labeler "
              f"({args.labeler_column!r}) {results[-1]['labeler_agreement']:.4f}", flush=True)
    if ddp.is_main:
        _save(model, tok, args.out)
        with open(os.path.join(args.out, "eval_results.json"), "w") as f:
            json.dump({**results[-1], "history": results, "eval_on_train": not args.eval and args.eval_split <= 0}, f,
                      indent=1)
        print(f"bert-finetune: saved to {args.out}", flush=True)
    ddp.close()
    return 0
