"""`python -m forkattn.train bert-finetune ...`: BERT fine-tuning.

Loads a checkpoint, swaps the head and fine-tunes for sequence classification (CSV/JSONL with
text[, text_pair], label), token classification (JSONL tokens + tags) or extractive question
answering (JSONL question, context, answer[, answer_start]); reports accuracy (exact match for QA)
and saves the model. Runs under torchrun (DDP; gloo on CPU, nccl on GPU): each rank trains on its
shard, DDP averages the gradients, so the replicas stay identical.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
from typing import Dict, List

import torch

from forkattn.models import bert as fb
from forkattn.models.bert_tokenizer import BertTokenizer
from forkattn.training.common import (Distributed, HelpFormatter, UsageError, adamw, add_bert_run_args,
                                      autocast_and_scaler, input_file, model_dir, optimizer_step, progress,
                                      quiet_logger, read_records, save_pretrained, warmup_schedule)


def pad_rows(rows: List[Dict[str, List[int]]], pad_id: int, device) -> Dict[str, torch.Tensor]:
    """Right-pad lists of ids to the longest row: input_ids, token_type_ids (0 where a row has none), attention_mask."""
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


def build_parser() -> argparse.ArgumentParser:
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
    add_bert_run_args(p)
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
    batch = pad_rows(rows, tok.pad_token_id, device)
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
            cm = pad_rows([{"input_ids": r["context_mask"]} for r in chunk], 0, device)["input_ids"]
            s, e = best_spans(out["start_logits"].float(), out["end_logits"].float(), cm)
            for r, a, b in zip(chunk, s.tolist(), e.tolist()):
                pred = r["context"][r["offsets"][a][0]:r["offsets"][b][1]]
                correct += int(pred.strip().lower() == r["answer"].strip().lower())
                total += 1
    model.train()
    key = "exact_match" if args.task == "question-answering" else "accuracy"
    return {key: correct / max(1, total), "examples": total}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
    autocast, scaler = autocast_and_scaler(device, args.dtype)
    rng = random.Random(args.seed + ddp.rank)
    bar = progress(total, args.no_progress or not ddp.is_main, f"bert-finetune ({args.task})")
    step, order, results = 0, [], []
    while step < total:
        if not order:
            order = list(shard)
            rng.shuffle(order)
        idx, order = order[:args.batch_size], order[args.batch_size:]
        batch = _collate([train_rows[i] for i in idx], tok, args.task, device)
        with autocast:
            loss = net(**batch)["loss"]
        optimizer_step(loss, model, opt, sched, scaler, args.grad_clip)
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
        save_pretrained(args.out, model, tok)
        with open(os.path.join(args.out, "eval_results.json"), "w") as f:
            json.dump({**results[-1], "history": results, "eval_on_train": not args.eval and args.eval_split <= 0}, f,
                      indent=1)
        print(f"bert-finetune: saved to {args.out}", flush=True)
    ddp.close()
    return 0
