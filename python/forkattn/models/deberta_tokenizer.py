"""DeBERTa-v2/v3's tokenizer (SentencePiece), loaded, not reimplemented.

load_deberta_tokenizer(path) returns transformers' DebertaV2TokenizerFast (or DebertaV2Tokenizer,
which needs sentencepiece) when transformers is installed, else a `tokenizers.Tokenizer` read from
the folder's tokenizer.json (the tokenizers library is a dependency of forkattn's models; a
spm.model alone needs transformers to convert it).
"""
from __future__ import annotations

import os


def load_deberta_tokenizer(path, prefer_transformers: bool = True):
    """The tokenizer of a DeBERTa-v2/v3 folder (or a tokenizer.json file). FileNotFoundError names
    what is missing."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    tokenizer_json = path if path.endswith(".json") else os.path.join(folder, "tokenizer.json")
    if prefer_transformers and os.path.isdir(path):
        try:
            from transformers import DebertaV2TokenizerFast
        except ImportError:
            pass
        else:
            return DebertaV2TokenizerFast.from_pretrained(path)
    if os.path.isfile(tokenizer_json):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(tokenizer_json)
    raise FileNotFoundError(f"{path}: no tokenizer.json (without transformers, DeBERTa's SentencePiece model "
                            "spm.model cannot be read: install transformers and sentencepiece, or save a "
                            "tokenizer.json with transformers' DebertaV2TokenizerFast.save_pretrained)")
