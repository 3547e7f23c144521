"""The hybrid workflow: a GPT labels texts by prompting (python -m forkattn.train label), a BERT is
fine-tuned on its labels and evaluated against hand labels (bert-finetune --eval).

The models here are tiny and random: the labels they give are at chance. These tests check the
plumbing (the three README commands run end to end on the shipped tests/data/reviews files, the
prefix-KV-cache batching gives the same scores as scoring each prompt whole, the outputs are well
formed); the README shows the same commands with a real GPT-2 checkpoint.
"""
import csv
import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from forkattn.models.gpt import GPT, GPTConfig  # noqa: E402
from forkattn.models.icl import ICLClassifier  # noqa: E402
from forkattn.training import bert_finetune, bert_pretrain  # noqa: E402
from forkattn.training import label as tl  # noqa: E402
from forkattn.training.gpt import train_bpe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reviews")
LABELS = "positive,negative,mixed"
PROMPT = "Classify each product review as positive, negative or mixed."


def _files():
    return [os.path.join(DATA, f) for f in ("unlabeled.txt", "shots.csv", "gold.csv")]


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    """A forkattn GPT checkpoint (GPT-2 format) + a byte-level BPE trained on the shipped texts."""
    d = tmp_path_factory.mktemp("gpt")
    tok = train_bpe(_files(), 400)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.get_vocab_size(), n_positions=512, n_embd=32, n_layer=2, n_head=4)).save_pretrained(str(d))
    tok.save(str(d / "tokenizer.json"))
    return d


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _llama(vocab):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.set_attn_implementation("forkattn")
    return m


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_cache_scores_equal_whole_prompt_scores(gpt_dir, arch):
    """Batched through the shared prefix's KV cache (left: texts x labels in one forward) == each
    prompt scored whole by ICLClassifier (right). A wrong position, mask or cache layout breaks it."""
    tok = tl.load_tokenizer(str(gpt_dir))
    model = tl.load_causal_lm(str(gpt_dir), "cpu")[0] if arch == "gpt2" else _llama(tok.get_vocab_size())
    shots = [(r["text"], r["label"]) for r in _read(os.path.join(DATA, "shots.csv"))]
    clf = ICLClassifier(model, tok, LABELS.split(","), shots, instruction=PROMPT)
    assert model.config._attn_implementation == "forkattn"  # through the integration
    lab = tl.CachedLabeler(clf)
    assert lab.use_cache and len(lab.prefix_ids) > 50
    texts = [r["text"] for r in _read(os.path.join(DATA, "gold.csv"))[:5]] + ["ok"]
    got = lab.score(texts)
    for t, g in zip(texts, got):
        want = clf.score(t)
        assert g.keys() == want.keys()
        for k in want:
            assert abs(g[k] - want[k]) < 1e-3 * max(1.0, abs(want[k])), (t, k, g[k], want[k])


def test_confidence_is_the_softmax_share():
    best, c = tl.confidence({"a": -1.0, "b": -1.0 - math.log(3.0)})
    assert best == "a" and abs(c - 0.75) < 1e-12


def test_three_command_workflow(gpt_dir, tmp_path):
    # a tiny BERT checkpoint (one MLM step) with a WordPiece vocabulary of the shipped texts
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for f in ("shots.csv", "gold.csv") for r in _read(os.path.join(DATA, f)))
                      + "\n\n" + open(os.path.join(DATA, "unlabeled.txt")).read())
    bert = tmp_path / "bert"
    assert bert_pretrain.main(["--data", str(corpus), "--out", str(bert), "--vocab-size", "200", "--steps", "1",
                        "--batch-size", "4", "--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64",
                        "--max-len", "32", "--no-progress"]) == 0
    common = ["--model", str(gpt_dir), "--labels", LABELS, "--prompt", PROMPT,
              "--shots", os.path.join(DATA, "shots.csv"), "--batch-size", "8", "--device", "cpu"]
    # 1. the GPT labels the unlabeled texts
    labeled = tmp_path / "labeled.csv"
    assert tl.main(common + ["--data", os.path.join(DATA, "unlabeled.txt"), "--out", str(labeled)]) == 0
    rows = _read(labeled)
    assert len(rows) == 36 and list(rows[0]) == ["text", "label", "confidence"]
    assert {r["label"] for r in rows} <= {"positive", "negative", "mixed"}
    confs = [float(r["confidence"]) for r in rows]
    assert all(1 / 3 - 1e-4 <= c <= 1.0 for c in confs)
    # --min-confidence drops exactly the rows below it
    distinct = sorted(set(confs))
    assert len(distinct) > 2
    cut = (distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2  # between two written values
    kept = tmp_path / "kept.csv"
    assert tl.main(common + ["--data", os.path.join(DATA, "unlabeled.txt"), "--out", str(kept),
                             "--min-confidence", str(cut)]) == 0
    assert len(_read(kept)) == sum(c >= cut for c in confs)
    # 2. the GPT labels the hand-labeled texts too (its labels go to `labeler`)
    gold = tmp_path / "gold.labeled.csv"
    assert tl.main(common + ["--data", os.path.join(DATA, "gold.csv"), "--out", str(gold)]) == 0
    grows = _read(gold)
    assert len(grows) == 12 and list(grows[0]) == ["text", "label", "labeler", "labeler_confidence"]
    assert [r["label"] for r in grows] == [r["label"] for r in _read(os.path.join(DATA, "gold.csv"))]
    # 3. the BERT learns the GPT's labels; --eval reports accuracy and agreement with the labeler
    clf = tmp_path / "clf"
    assert bert_finetune.main(["--model", str(bert), "--train", str(labeled), "--eval", str(gold), "--out", str(clf),
                             "--epochs", "1", "--batch-size", "12", "--max-len", "32", "--no-progress"]) == 0
    res = json.loads((clf / "eval_results.json").read_text())
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["labeler_agreement"] <= 1.0 and res["examples"] == 12


def test_bad_arguments_exit_with_a_message(gpt_dir, tmp_path):
    base = ["--model", str(gpt_dir), "--labels", LABELS, "--data", os.path.join(DATA, "unlabeled.txt"),
            "--out", str(tmp_path / "x.csv")]
    with pytest.raises(SystemExit, match="--min-confidence"):
        tl.main(base + ["--min-confidence", "1.5"])
    with pytest.raises(ValueError, match="no column 'body'"):
        tl.main(base[:-4] + ["--data", os.path.join(DATA, "gold.csv"), "--text-column", "body", "--out", str(tmp_path / "y.csv")])


def test_without_transformers_a_forkattn_gpt_scores_each_prompt(gpt_dir, monkeypatch, tmp_path):
    """No transformers: the forkattn GPT itself, one prompt at a time (no prefix cache), same scores."""
    want = tl.CachedLabeler(ICLClassifier(tl.load_causal_lm(str(gpt_dir), "cpu")[0], tl.load_tokenizer(str(gpt_dir)),
                                          LABELS.split(","), instruction=PROMPT)).score(["fine", "broken again"])
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "forkattn.integrations.transformers", raising=False)
    model, kind = tl.load_causal_lm(str(gpt_dir), "cpu")
    assert kind == "forkattn" and isinstance(model, GPT)
    clf = ICLClassifier(model, tl.load_tokenizer(str(gpt_dir)), LABELS.split(","), instruction=PROMPT)
    got = tl.CachedLabeler(clf, use_cache=False).score(["fine", "broken again"])
    for g, w in zip(got, want):
        for k in w:
            assert abs(g[k] - w[k]) < 1e-3 * max(1.0, abs(w[k])), (k, g, w)
