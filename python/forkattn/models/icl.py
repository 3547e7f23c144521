"""In-context classification with a causal LM: the prompt is the program.

A prompt is an optional instruction line, then one "text -> label" line per example (zero of
them: zero-shot; some: few-shot), then the query "text -> ". Each candidate label is scored by the
log-likelihood the model gives to its tokens (and the line end after it, so that a label that
is a prefix of another cannot win by stopping early) after the prompt; the best label wins.

    >>> from forkattn.models import GPT, GPTConfig, ICLClassifier
    >>> model = GPT(GPTConfig(vocab_size=256, n_positions=128, n_embd=32, n_layer=1, n_head=2))
    >>> tokenizer = lambda s: list(s.encode())  # bytes as ids here; a trained GPT's tokenizer in practice
    >>> clf = ICLClassifier(model, tokenizer, labels=["positive", "negative", "mixed"],
    ...                     examples=[("a joy from start to end", "positive"), ("dull and far too long", "negative")])
    >>> label, scores = clf.predict("the plot drags but the cast shines")  # or pred.label, pred.scores
    >>> label in clf.labels, sorted(scores) == sorted(clf.labels)
    (True, True)

`tokenizer` is a tokenizers.Tokenizer, a transformers tokenizer, or any callable str -> list[int].
All labels of one query are scored in one padded batch through the model's forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

Example = Tuple[str, str]


def encoder(tokenizer) -> Callable[[str], List[int]]:
    """str -> token ids for the tokenizers we accept."""
    if hasattr(tokenizer, "encode"):
        def enc(s: str) -> List[int]:
            out = tokenizer.encode(s)
            return list(out.ids) if hasattr(out, "ids") else list(out)  # tokenizers.Encoding or a list
        return enc
    if callable(tokenizer):
        return lambda s: list(tokenizer(s))
    raise TypeError(f"tokenizer must have .encode or be callable str -> list[int], got {type(tokenizer).__name__}")


def format_prompt(text: str, examples: Sequence[Example] = (), *, instruction: Optional[str] = None,
                  sep: str = " -> ", line_end: str = "\n") -> str:
    """instruction line (if any), one `text{sep}label{line_end}` line per example, then `text{sep}`."""
    for name, s in [("text", text)] + [(f"examples[{i}]", e[0]) for i, e in enumerate(examples)]:
        if line_end in s:
            raise ValueError(f"{name} must not contain the line end {line_end!r}: it would break the format")
    lines = [] if instruction is None else [instruction + line_end]
    lines += [f"{t}{sep}{label}{line_end}" for t, label in examples]
    return "".join(lines) + f"{text}{sep}"


@dataclass
class Prediction:
    label: str
    scores: Dict[str, float]  # label -> log-likelihood (sum over its tokens, or mean if normalized)

    def __iter__(self):
        """`label, scores = clf.predict(text)` unpacks it."""
        return iter((self.label, self.scores))


class ICLClassifier:
    def __init__(self, model, tokenizer, labels: Sequence[str], examples: Sequence[Example] = (), *,
                 instruction: Optional[str] = None, sep: str = " -> ", line_end: str = "\n",
                 normalize: bool = False):
        """normalize=True scores by the mean log-probability per token instead of the sum."""
        if len(labels) < 1 or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be a non-empty list of distinct strings, got {list(labels)!r}")
        unknown = sorted({lab for _, lab in examples} - set(labels))
        if unknown:
            raise ValueError(f"examples use labels {unknown} that are not in labels {list(labels)}")
        self.model, self.encode = model, encoder(tokenizer)
        self.labels, self.examples = list(labels), list(examples)
        self.instruction, self.sep, self.line_end, self.normalize = instruction, sep, line_end, normalize

    def prompt(self, text: str) -> str:
        return format_prompt(text, self.examples, instruction=self.instruction, sep=self.sep, line_end=self.line_end)

    def _pieces(self, prompt: str, label: str) -> Tuple[List[int], List[int]]:
        """(prompt ids, label ids) such that their concatenation is how the model reads the whole line.
        The prompt's trailing spaces go with the label (" -> " + "positive" is read "->", " positive"
        by a GPT-2 style BPE, never "-> ", "positive")."""
        head = prompt.rstrip(" ")
        answer = prompt[len(head):] + label + self.line_end
        p = self.encode(head)
        full = self.encode(head + answer)
        if full[: len(p)] == p and len(full) > len(p):
            return p, full[len(p):]
        return p, self.encode(answer)  # BPE merged across the boundary: score the answer on its own

    @torch.no_grad()
    def score(self, text: str) -> Dict[str, float]:
        prompt = self.prompt(text)
        seqs, spans = [], []
        for label in self.labels:
            p, lab = self._pieces(prompt, label)
            if not p:
                raise ValueError("the prompt encodes to no tokens")
            seqs.append(p + lab)
            spans.append((len(p), len(p) + len(lab)))
        n_pos = getattr(getattr(self.model, "config", None), "n_positions", None)
        L = max(len(s) for s in seqs)
        if n_pos is not None and L > n_pos:
            raise ValueError(f"prompt + label is {L} tokens, more than the model's n_positions={n_pos}: "
                             f"use fewer or shorter examples")
        device = next(self.model.parameters()).device
        ids = torch.zeros(len(seqs), L, dtype=torch.long, device=device)
        mask = torch.zeros(len(seqs), L, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):  # right padding: positions stay 0..n-1 for every row
            ids[i, : len(s)] = torch.tensor(s, device=device)
            mask[i, : len(s)] = 1
        was_training = self.model.training
        self.model.eval()
        try:
            logp = self.model(ids, attention_mask=mask).logits.float().log_softmax(-1)
        finally:
            self.model.train(was_training)
        scores = {}
        for i, (label, (a, b)) in enumerate(zip(self.labels, spans)):
            # token t is predicted at position t - 1
            tok_lp = logp[i, a - 1: b - 1].gather(-1, ids[i, a:b, None])[:, 0]
            scores[label] = (tok_lp.mean() if self.normalize else tok_lp.sum()).item()
        return scores

    def predict(self, text: str) -> Prediction:
        scores = self.score(text)
        return Prediction(max(scores, key=scores.get), scores)

    def __call__(self, texts: Union[str, Sequence[str]]):
        return self.predict(texts) if isinstance(texts, str) else [self.predict(t) for t in texts]
