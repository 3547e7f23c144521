"""BERT's WordPiece tokenization on the `tokenizers` library.

    tok = BertTokenizer.from_pretrained(checkpoint_dir)     # tokenizer.json, else vocab.txt
    tok = BertTokenizer.train(["corpus.txt"], vocab_size=8000)  # a fresh WordPiece vocabulary
    batch = tok(texts, pairs, padding=True, truncation=True, max_length=128, return_tensors="pt")
    # -> input_ids ([CLS] A [SEP] (B [SEP])), token_type_ids (0 for A, 1 for B), attention_mask

Same ids as transformers' BertTokenizerFast on the same files (tested).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TextInput = Union[str, Sequence[str]]


class BertTokenizer:
    def __init__(self, tokenizer: Tokenizer, model_max_length: int = 512):
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        tokenizer.no_truncation()
        tokenizer.no_padding()
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the vocabulary has no {missing} token(s); a BERT vocabulary needs {SPECIAL_TOKENS}")
        self.pad_token_id, self.unk_token_id = ids["[PAD]"], ids["[UNK]"]
        self.cls_token_id, self.sep_token_id, self.mask_token_id = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"]
        self.all_special_ids = sorted(ids.values())

    # -- construction ---
    @staticmethod
    def _pipeline(tok: Tokenizer, lowercase: bool) -> Tokenizer:
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                    lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        return tok

    def _set_post_processor(self) -> None:
        self.tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", self.cls_token_id), ("[SEP]", self.sep_token_id)])

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
            return cls(Tokenizer.from_file(tj), model_max_length=max_len)
        vocab = path if path.endswith(".txt") else os.path.join(path, "vocab.txt")
        if os.path.exists(vocab):
            return cls.from_vocab_file(vocab, lowercase=cfg.get("do_lower_case", True), model_max_length=max_len)
        raise FileNotFoundError(f"{path}: neither tokenizer.json nor vocab.txt found")

    @classmethod
    def from_vocab_file(cls, vocab_file: str, lowercase: bool = True, model_max_length: int = 512) -> "BertTokenizer":
        tok = cls._pipeline(Tokenizer(WordPiece.from_file(vocab_file, unk_token="[UNK]")), lowercase)
        self = cls(tok, model_max_length)
        self._set_post_processor()
        return self

    @classmethod
    def train(cls, files: Union[str, Iterable[str]], vocab_size: int = 30522, lowercase: bool = True,
              min_frequency: int = 2, model_max_length: int = 512) -> "BertTokenizer":
        """Train a WordPiece vocabulary (special tokens first: [PAD]=0, [UNK], [CLS], [SEP], [MASK])."""
        from tokenizers.trainers import WordPieceTrainer

        files = [files] if isinstance(files, str) else list(files)
        tok = cls._pipeline(Tokenizer(WordPiece(unk_token="[UNK]")), lowercase)
        trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                   continuing_subword_prefix="##", show_progress=False)
        tok.train(files, trainer)
        self = cls(tok, model_max_length)
        self._set_post_processor()
        return self

    def save_pretrained(self, path: str) -> None:
        """tokenizer.json, vocab.txt and tokenizer_config.json, readable by transformers too."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        vocab = self.tokenizer.get_vocab()
        with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])) + "\n")
        norm = json.loads(self.tokenizer.to_str()).get("normalizer") or {}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": bool(norm.get("lowercase", True)),
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
        tok = self.tokenizer
        if truncation:
            tok.enable_truncation(max_length or self.model_max_length, strategy="longest_first")
        else:
            tok.no_truncation()
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            tok.enable_padding(pad_id=self.pad_token_id, pad_token="[PAD]", length=max_length)
        elif padding in (True, "longest"):
            tok.enable_padding(pad_id=self.pad_token_id, pad_token="[PAD]")
        elif padding is False or padding == "do_not_pad":
            tok.no_padding()
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
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
        return [self.tokenizer.token_to_id(t) if self.tokenizer.token_to_id(t) is not None else self.unk_token_id
                for t in tokens]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
