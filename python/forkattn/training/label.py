"""`python -m forkattn.train label ...`: a GPT labels a text set by prompting, for a small BERT to learn.

The hybrid workflow (prototype a classifier by prompting a GPT, label a large unlabeled set with it,
fine-tune a small BERT on those labels, deploy the BERT):

    python -m forkattn.train label --model gpt2 --labels positive,negative,mixed \\
        --prompt "Classify each review as positive, negative or mixed." --shots shots.csv \\
        --data unlabeled.txt --out labeled.csv --min-confidence 0.5
    python -m forkattn.train label ... --data gold.csv --out gold.labeled.csv
    python -m forkattn.train bert-finetune --model BERT_DIR --train labeled.csv --eval gold.labeled.csv --out clf

The prompt is forkattn.models.icl's: the --prompt instruction line, one "text -> label" line per
--shots row, then "text -> "; each label is scored by the log-likelihood the GPT gives its tokens
and the line end (--normalize: per token). confidence is the winning label's softmax share over
the labels' scores. The instruction and shot lines are the same for every text: they run through
the model once, and their KV cache is repeated for each batch of --batch-size texts x labels.

--model: a transformers causal LM directory (GPT-2, Llama, Qwen, ...; run through
attn_implementation="forkattn") or a forkattn GPT checkpoint (its save_pretrained is a GPT-2
directory); without transformers installed, a forkattn GPT scored one text at a time.
--data: a text file (one text per line) or a CSV / JSONL with a --text-column. The output CSV has
text, label, confidence (and the input's other columns); when the input already has a `label`
column (hand labels), that stays `label`, the GPT's goes to `labeler` / `labeler_confidence`, and
the labeler's accuracy against the hand labels is printed: bert-finetune --eval reads such a file
and reports accuracy and agreement with the labeler.
"""
from __future__ import annotations

import argparse
import copy
import csv
import inspect
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from forkattn.models.icl import ICLClassifier
from forkattn.training.common import default_device, read_records


# --- loading -------------------------------------------------------------------------------------

def load_tokenizer(path: str):
    """tokenizers.Tokenizer from tokenizer.json if the directory has one, else transformers' AutoTokenizer."""
    file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(file)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_causal_lm(path: str, device, dtype=None):
    """(model, kind): kind "transformers" (attn_implementation="forkattn") or "forkattn" (models.gpt.GPT,
    when transformers is not installed)."""
    try:
        import forkattn.integrations.transformers  # noqa: F401  registers "forkattn"
        from transformers import AutoModelForCausalLM
    except ImportError:
        from forkattn.models.gpt import GPT

        return GPT.from_pretrained(path).to(device=device, dtype=dtype).eval(), "forkattn"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="forkattn", dtype=dtype)
    return model.to(device).eval(), "transformers"


# --- scoring -------------------------------------------------------------------------------------

class CachedLabeler:
    """ICLClassifier's scores for many texts at once: the shared prefix (instruction + shots) is
    prefilled once; each batch of texts x labels runs as one forward on top of its repeated cache."""

    def __init__(self, clf: ICLClassifier, *, use_cache: bool = True):
        self.clf = clf
        marker = "\x00"
        prompt = clf.prompt(marker)
        prefix = prompt[: prompt.index(marker)]
        self.prefix_ids = clf.encode(prefix) if prefix else []
        self.use_cache = use_cache and bool(self.prefix_ids)
        self._cache = None

    def _prefix_cache(self, device):
        if self._cache is None:
            ids = torch.tensor([self.prefix_ids], device=device)
            self._cache = self.clf.model(ids, use_cache=True).past_key_values
        return self._cache

    def _rows(self, text: str) -> Optional[List[Tuple[List[int], int, int]]]:
        """Per label (tokens after the prefix, label start, label end), or None when the prefix's
        tokens are not a prefix of this prompt's (a BPE merge across the boundary)."""
        prompt, n = self.clf.prompt(text), len(self.prefix_ids)
        rows = []
        for label in self.clf.labels:
            p, lab = self.clf._pieces(prompt, label)
            if p[:n] != self.prefix_ids or len(p) <= n:
                return None
            rows.append((p[n:] + lab, len(p) - n, len(p) - n + len(lab)))
        return rows

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> List[Dict[str, float]]:
        if not self.use_cache:
            return [self.clf.score(t) for t in texts]
        per_text = [self._rows(t) for t in texts]
        out: List[Optional[Dict[str, float]]] = [None] * len(texts)
        todo = [i for i, r in enumerate(per_text) if r is not None]
        for i, r in enumerate(per_text):
            if r is None:
                out[i] = self.clf.score(texts[i])
        if todo:
            rows = [row for i in todo for row in per_text[i]]
            scores = self._score_rows(rows)
            K = len(self.clf.labels)
            for j, i in enumerate(todo):
                out[i] = dict(zip(self.clf.labels, scores[j * K:(j + 1) * K]))
        return out

    def _score_rows(self, rows) -> List[float]:
        model = self.clf.model
        device = next(model.parameters()).device
        P, R, T = len(self.prefix_ids), len(rows), max(len(r[0]) for r in rows)
        n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
        if n_pos is not None and P + T > n_pos:
            raise ValueError(f"prompt + label is {P + T} tokens, more than the model's {n_pos} positions: "
                             "use fewer or shorter shots or texts")
        ids = torch.zeros(R, T, dtype=torch.long, device=device)
        mask = torch.zeros(R, P + T, dtype=torch.long, device=device)
        mask[:, :P] = 1
        for i, (toks, _, _) in enumerate(rows):  # right padding: positions P.. for every row
            ids[i, : len(toks)] = torch.tensor(toks, device=device)
            mask[i, P: P + len(toks)] = 1
        cache = copy.deepcopy(self._prefix_cache(device))
        for layer in cache.layers:
            layer.batch_repeat_interleave(R)
        pos = torch.arange(P, P + T, device=device).expand(R, T)
        kw = {_cache_kwarg(model): cache}
        logp = model(ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw).logits.float().log_softmax(-1)
        out = []
        for i, (toks, a, b) in enumerate(rows):
            lp = logp[i, a - 1: b - 1].gather(-1, ids[i, a:b, None])[:, 0]  # token t predicted at t - 1
            out.append((lp.mean() if self.clf.normalize else lp.sum()).item())
        return out


def _cache_kwarg(model) -> str:
    """transformers 5.24 renamed forward's past_key_values to cache (the old name warns until 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def confidence(scores: Dict[str, float]) -> Tuple[str, float]:
    """(best label, its softmax share over the labels' log-likelihoods)."""
    best = max(scores, key=scores.get)
    z = sum(math.exp(s - scores[best]) for s in scores.values())
    return best, 1.0 / z


# --- the command ---------------------------------------------------------------------------------

def read_texts(path: str, text_column: str) -> List[dict]:
    if path.endswith((".csv", ".tsv", ".jsonl", ".json")):
        recs = read_records(path)
        if recs and text_column not in recs[0]:
            raise ValueError(f"--data {path}: no column {text_column!r} (columns: {sorted(recs[0])})")
        return [dict(r) for r in recs]
    with open(path, encoding="utf-8") as f:
        return [{text_column: line.strip()} for line in f if line.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m forkattn.train label", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="GPT directory: transformers causal LM or forkattn GPT checkpoint")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or directory (default: --model's)")
    p.add_argument("--labels", required=True, help="comma-separated labels, e.g. positive,negative,mixed")
    p.add_argument("--prompt", default=None, help="instruction line before the shots (the TEMPLATE's head)")
    p.add_argument("--sep", default=" -> ", help="between text and label in each prompt line")
    p.add_argument("--shots", default=None, help="CSV/JSONL of text,label examples for the prompt (few-shot)")
    p.add_argument("--data", required=True, help="texts to label: one per line, or CSV/JSONL with --text-column")
    p.add_argument("--text-column", default="text")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--min-confidence", type=float, default=0.0, help="drop rows whose confidence is below this")
    p.add_argument("--normalize", action="store_true", help="score labels by mean log-probability per token")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward (each with every label)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if not 0.0 <= args.min_confidence <= 1.0:
        raise SystemExit(f"label: --min-confidence must be in [0, 1], got {args.min_confidence}")
    if args.batch_size < 1:
        raise SystemExit(f"label: --batch-size must be at least 1, got {args.batch_size}")
    shots = []
    if args.shots:
        shots = [(str(r["text"]), str(r["label"])) for r in read_records(args.shots)]
    records = read_texts(args.data, args.text_column)
    dtype = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, kind = load_causal_lm(args.model, args.device, dtype)
    tok = load_tokenizer(args.tokenizer or args.model)
    clf = ICLClassifier(model, tok, labels, shots, instruction=args.prompt, sep=args.sep, normalize=args.normalize)
    labeler = CachedLabeler(clf, use_cache=kind == "transformers")
    gold = bool(records) and "label" in records[0]
    out_label, out_conf = ("labeler", "labeler_confidence") if gold else ("label", "confidence")
    kept, right = [], 0
    for i in range(0, len(records), args.batch_size):
        chunk = records[i:i + args.batch_size]
        for r, s in zip(chunk, labeler.score([str(r[args.text_column]) for r in chunk])):
            best, conf = confidence(s)
            right += int(gold and str(r["label"]) == best)
            if conf >= args.min_confidence:
                kept.append({**r, out_label: best, out_conf: f"{conf:.6f}"})
    cols = [args.text_column] + [c for c in (records[0] if records else {}) if c != args.text_column]
    cols += [c for c in (out_label, out_conf) if c not in cols]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(kept)
    counts = {lab: sum(r[out_label] == lab for r in kept) for lab in labels}
    msg = (f"label: {len(kept)} of {len(records)} texts labeled (confidence >= {args.min_confidence}) "
           f"-> {args.out}; {json.dumps(counts)}; {kind} model, prefix cache {'on' if labeler.use_cache else 'off'}")
    if gold:
        msg += f"; labeler accuracy vs the hand labels {right / max(1, len(records)):.4f}"
    print(msg, file=sys.stderr if args.out == "-" else sys.stdout, flush=True)
    return 0
