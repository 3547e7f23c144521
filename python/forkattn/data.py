"""forkattn.data: a masked-language-model collator built on forkattn.mlm_mask.

MLMCollator is a drop-in for transformers' DataCollatorForLanguageModeling(tokenizer, mlm=True):
it pads a list of tokenized examples and masks them with one fused kernel call, returning
input_ids, attention_mask, token_type_ids and labels (-100 where nothing is predicted).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .mlm import mlm_mask

__all__ = ["MLMCollator"]


def _row(x, field: str, i: int, length: Optional[int] = None) -> List:
    """Example i's `field` as a flat list, after checking it is one row (a 1-D tensor or a flat
    sequence) of `length` entries: ValueError naming the field and example otherwise."""
    where = f"example {i}: {field!r}"
    if isinstance(x, Tensor) or hasattr(x, "ndim"):
        if x.ndim != 1:
            raise ValueError(f"{where} must be 1-D (one sequence), got shape {tuple(x.shape)}; "
                             "pass one dict per sequence")
        x = x.tolist()
    elif isinstance(x, (str, bytes)) or not hasattr(x, "__len__") or not hasattr(x, "__iter__"):
        raise ValueError(f"{where} must be a list or 1-D tensor of ints, got {type(x).__name__}")
    x = list(x)
    if any(isinstance(v, (list, tuple)) or hasattr(v, "__len__") for v in x):
        raise ValueError(f"{where} must be a flat list of ints (one sequence), got nested lists; "
                         "pass one example per sequence")
    if length is not None and len(x) != length:
        raise ValueError(f"{where} has {len(x)} entries but 'input_ids' has {length}; they must be equally long")
    return x


class MLMCollator:
    """Pads examples and applies BERT's 80/10/10 masking (forkattn.mlm_mask).

    tokenizer_or_special_ids: a Hugging Face tokenizer (vocab_size, mask, pad and special ids are
        read from it: len(tokenizer), mask_token_id, pad_token_id, all_special_ids), or a list of
        special token ids, in which case vocab_size, mask_token_id and pad_token_id must be given.
    Examples: dicts with "input_ids" (list or 1-D tensor) and optionally "token_type_ids",
        "attention_mask", "special_tokens_mask" and, with whole_word=True, "word_ids" (None or -1
        outside words); or bare lists of ids.
    Padding goes on the tokenizer's padding_side (default right), to the longest example (rounded up
    to pad_to_multiple_of). mlm_probability, mask_replace_prob, random_replace_prob, mode, min_masked,
    random_excludes_special, generator and backend are passed to mlm_mask; seed=None gives fresh
    masks per call (dynamic masking), drawn from `generator` or torch's default generator.
    """

    def __init__(
        self,
        tokenizer_or_special_ids: Union[Any, Iterable[int]],
        *,
        vocab_size: Optional[int] = None,
        mask_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        pad_to_multiple_of: Optional[int] = None,
        whole_word: bool = False,
        mode: str = "bernoulli",
        min_masked: int = 0,
        random_excludes_special: bool = True,
        generator: Optional[torch.Generator] = None,
        device: Optional[Union[str, torch.device]] = None,
        backend: Optional[str] = None,
    ):
        tok = tokenizer_or_special_ids
        if hasattr(tok, "all_special_ids") and hasattr(tok, "mask_token_id"):
            if tok.mask_token_id is None:
                raise ValueError("the tokenizer has no mask token, which masked language modeling needs")
            self.special_ids = sorted(set(int(i) for i in tok.all_special_ids))
            vocab_size = len(tok) if vocab_size is None else vocab_size
            mask_token_id = tok.mask_token_id if mask_token_id is None else mask_token_id
            pad_token_id = tok.pad_token_id if pad_token_id is None else pad_token_id
            self.padding_side = getattr(tok, "padding_side", "right")
        else:
            try:
                self.special_ids = sorted(set(int(i) for i in tok))
            except TypeError:
                raise TypeError(
                    "tokenizer_or_special_ids must be a Hugging Face tokenizer or a list of special token ids, "
                    f"got {type(tok).__name__}"
                ) from None
            self.padding_side = "right"
            missing = [n for n, v in (("vocab_size", vocab_size), ("mask_token_id", mask_token_id),
                                      ("pad_token_id", pad_token_id)) if v is None]
            if missing:
                raise ValueError(f"with a list of special ids, pass {', '.join(missing)} too")
        if pad_token_id is None:
            raise ValueError("pad_token_id is needed to pad examples (the tokenizer has none)")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        self.vocab_size = int(vocab_size)
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = int(pad_token_id)
        self.mask_kwargs = dict(
            vocab_size=self.vocab_size, mask_token_id=self.mask_token_id, mask_prob=mlm_probability,
            mask_replace_prob=mask_replace_prob, random_replace_prob=random_replace_prob, mode=mode,
            min_masked=min_masked, random_excludes_special=random_excludes_special, backend=backend,
        )
        self.pad_to_multiple_of = pad_to_multiple_of
        self.whole_word = whole_word
        self.generator = generator
        self.device = None if device is None else torch.device(device)

    def _pad(self, rows: Sequence[Sequence[int]], length: int, value: int) -> Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.int64)
        for i, r in enumerate(rows):
            r = torch.as_tensor(r, dtype=torch.int64)
            if self.padding_side == "left":
                out[i, length - len(r):] = r
            else:
                out[i, : len(r)] = r
        return out

    def __call__(self, examples: Sequence[Union[Mapping[str, Any], Sequence[int]]], *, seed: Optional[int] = None
                 ) -> Dict[str, Tensor]:
        if len(examples) == 0:
            raise ValueError("examples must not be empty")
        exs = [e if isinstance(e, Mapping) else {"input_ids": e} for e in examples]
        missing = [i for i, e in enumerate(exs) if "input_ids" not in e]
        if missing:
            raise ValueError(f"every example must have 'input_ids'; example {missing[0]} has {sorted(exs[missing[0]])}")
        ids = [_row(e["input_ids"], "input_ids", i) for i, e in enumerate(exs)]
        length = max(len(r) for r in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        input_ids = self._pad(ids, length, self.pad_token_id)
        def field(name: str, default: int) -> List[List]:
            return [_row(e[name], name, i, len(r)) if e.get(name) is not None else [default] * len(r)
                    for i, (e, r) in enumerate(zip(exs, ids))]

        att = field("attention_mask", 1)
        attention_mask = self._pad(att, length, 0)
        tti = field("token_type_ids", 0)
        token_type_ids = self._pad(tti, length, 0)
        special_tokens_mask = None
        stm = field("special_tokens_mask", 0)  # checked wherever given; used when every example has one
        if all(e.get("special_tokens_mask") is not None for e in exs):
            special_tokens_mask = self._pad(stm, length, 1).bool()
        word_ids = None
        if self.whole_word:
            if not all("word_ids" in e for e in exs):
                raise ValueError("whole_word=True needs 'word_ids' in every example (tokenizer(...).word_ids())")
            words = [_row(e["word_ids"], "word_ids", i, len(r)) for i, (e, r) in enumerate(zip(exs, ids))]
            word_ids = self._pad([[-1 if w is None else int(w) for w in row] for row in words], length, -1)
        tensors = [input_ids, attention_mask, token_type_ids, special_tokens_mask, word_ids]
        if self.device is not None:
            tensors = [t if t is None else t.to(self.device, non_blocking=True) for t in tensors]
        input_ids, attention_mask, token_type_ids, special_tokens_mask, word_ids = tensors
        masked, labels = mlm_mask(
            input_ids, special_token_ids=self.special_ids, special_tokens_mask=special_tokens_mask,
            attention_mask=attention_mask, word_ids=word_ids, seed=seed, generator=self.generator, inplace=True,
            **self.mask_kwargs,
        )
        return {"input_ids": masked, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                "labels": labels}
