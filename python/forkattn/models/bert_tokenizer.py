"""BERT's WordPiece tokenizer: the `tokenizers` library's BertWordPieceTokenizer behind the call
API of transformers' BertTokenizerFast (so the training commands need no transformers).

    tok = BertTokenizer.from_pretrained(checkpoint_dir)     # tokenizer.json, else vocab.txt
    tok = BertTokenizer.train(["corpus.txt"], vocab_size=8000)  # a fresh WordPiece vocabulary
    batch = tok(texts, pairs, padding=True, truncation=True, max_length=128, return_tensors="pt")
    # -> input_ids ([CLS] A [SEP] (B [SEP])), token_type_ids (0 for A, 1 for B), attention_mask

The library does the tokenizing (normalizer, pre-tokenizer, WordPiece, [CLS]/[SEP] post-processor,
training); this class adds truncation/padding per call, tensors, and save_pretrained in
transformers' layout. Same ids as transformers' BertTokenizerFast on the same files (tested).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer
from tokenizers.implementations import BaseTokenizer, BertWordPieceTokenizer
from tokenizers.processors import BertProcessing

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# WordPieceTrainer keeps every character of the corpus by default (limit_alphabet None), which
# BertWordPieceTokenizer.train cannot pass on; a bound above any alphabet keeps that behaviour.
_EVERY_CHARACTER = 1 << 31
TextInput = Union[str, Sequence[str]]


class BertTokenizer:
    """tokenizer: a tokenizers BaseTokenizer (e.g. BertWordPieceTokenizer) holding BERT's pipeline."""

    def __init__(self, tokenizer: BaseTokenizer, model_max_length: int = 512):
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        tokenizer.no_truncation()  # per call instead (a tokenizer.json may carry its own settings)
        tokenizer.no_padding()
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the vocabulary has no {missing} token(s); a BERT vocabulary needs {SPECIAL_TOKENS}")
        self.pad_token_id, self.unk_token_id = ids["[PAD]"], ids["[UNK]"]
        self.cls_token_id, self.sep_token_id, self.mask_token_id = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"]
        self.all_special_ids = sorted(ids.values())

    # -- construction ---
    @classmethod
    def from_pretrained(cls, path: str) -> "BertTokenizer":
        """A directory with tokenizer.json (preferred) or vocab.txt (+ tokenizer_config.json), or one of those files."""
        cfg = {}
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        if os.path.exists(os.path.join(directory, "tokenizer_config.json")):
            with open(os.path.join(directory, "tokenizer_config.json")) as f:
                cfg = json.load(f)
        max_len = int(cfg.get("model_max_length", 512)) if cfg.get("model_max_length", 512) < 1e9 else 512
        tj = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        if os.path.exists(tj):
            return cls(BaseTokenizer(Tokenizer.from_file(tj)), model_max_length=max_len)
        vocab = path if path.endswith(".txt") else os.path.join(path, "vocab.txt")
        if os.path.exists(vocab):
            return cls.from_vocab_file(vocab, lowercase=cfg.get("do_lower_case", True), model_max_length=max_len)
        raise FileNotFoundError(f"{path}: neither tokenizer.json nor vocab.txt found")

    @classmethod
    def from_str(cls, text: str, model_max_length: int = 512) -> "BertTokenizer":
        """The tokenizer to_str() gave (a tokenizer.json's text)."""
        return cls(BaseTokenizer(Tokenizer.from_str(text)), model_max_length)

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def from_vocab_file(cls, vocab_file: str, lowercase: bool = True, model_max_length: int = 512) -> "BertTokenizer":
        return cls(BertWordPieceTokenizer.from_file(vocab_file, lowercase=lowercase), model_max_length)

    @classmethod
    def train(cls, files: Union[str, Iterable[str]], vocab_size: int = 30522, lowercase: bool = True,
              min_frequency: int = 2, model_max_length: int = 512) -> "BertTokenizer":
        """Train a WordPiece vocabulary (special tokens first: [PAD]=0, [UNK], [CLS], [SEP], [MASK])."""
        tok = BertWordPieceTokenizer(lowercase=lowercase)
        tok.train([files] if isinstance(files, str) else list(files), vocab_size=vocab_size,
                  min_frequency=min_frequency, limit_alphabet=_EVERY_CHARACTER, special_tokens=SPECIAL_TOKENS,
                  show_progress=False)
        # BertWordPieceTokenizer adds [CLS] A [SEP] (B [SEP]) only when built from a vocabulary
        tok.post_processor = BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
        return cls(tok, model_max_length)

    def save_pretrained(self, path: str) -> None:
        """tokenizer.json, vocab.txt and tokenizer_config.json, readable by transformers too."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        self.tokenizer.save_model(path)  # WordPiece's vocab.txt
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "BertTokenizer",
                       "do_lower_case": bool(getattr(self.tokenizer.normalizer, "lowercase", True)),
                       "model_max_length": self.model_max_length, "unk_token": "[UNK]", "sep_token": "[SEP]",
                       "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}, f, indent=2)

    # -- use ---
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    def encode_batch(self, text: TextInput, text_pair: Optional[TextInput] = None, *, add_special_tokens: bool = True,
                     truncation: bool = False, max_length: Optional[int] = None, padding: Union[bool, str] = False,
                     is_split_into_words: bool = False):
        """tokenizers Encodings (with offsets, word_ids, sequence_ids) after truncation and padding.
        is_split_into_words: each text is a list of words (token classification)."""
        single = isinstance(text, str) or (is_split_into_words and text and isinstance(text[0], str))
        texts = [text] if single else list(text)
        pairs = None if text_pair is None else ([text_pair] if isinstance(text_pair, str) else list(text_pair))
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"text_pair has {len(pairs)} entries, text has {len(texts)}")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        tok = self.tokenizer  # truncation and padding are off between calls (see __init__)
        if truncation:
            tok.enable_truncation(max_length or self.model_max_length, strategy="longest_first")
        if padding in (True, "longest", "max_length"):
            tok.enable_padding(pad_id=self.pad_token_id, pad_token="[PAD]",
                               length=max_length if padding == "max_length" else None)
        inputs = texts if pairs is None else list(zip(texts, pairs))
        try:
            return tok.encode_batch(inputs, add_special_tokens=add_special_tokens, is_pretokenized=is_split_into_words)
        finally:
            tok.no_truncation()
            tok.no_padding()

    def __call__(self, text: TextInput, text_pair: Optional[TextInput] = None, *, add_special_tokens: bool = True,
                 truncation: bool = False, max_length: Optional[int] = None, padding: Union[bool, str] = False,
                 return_tensors: Optional[str] = None) -> dict:
        """{"input_ids", "token_type_ids", "attention_mask"}: lists (of lists for a batch) or [B, L] int64 tensors."""
        enc = self.encode_batch(text, text_pair, add_special_tokens=add_special_tokens, truncation=truncation,
                                max_length=max_length, padding=padding)
        out = {"input_ids": [e.ids for e in enc], "token_type_ids": [e.type_ids for e in enc],
               "attention_mask": [e.attention_mask for e in enc]}
        if return_tensors == "pt":
            if len({len(x) for x in out["input_ids"]}) > 1:
                raise ValueError("sequences have different lengths: pass padding=True to return tensors")
            return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if isinstance(text, str):
            out = {k: v[0] for k, v in out.items()}
        return out

    def tokenize(self, text: str) -> List[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> List[int]:
        ids = [self.tokenizer.token_to_id(t) for t in tokens]
        return [self.unk_token_id if i is None else i for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
