"""forkattn.models.deberta against transformers' DebertaV2 on random tiny models: every head class,
several configs (buckets on/off, share_att_key on/off, c2p/p2c subsets, norm_rel_ebd, ConvLayer,
no relative attention), a padded batch with an empty row; outputs, loss and every parameter
gradient within the 2x rule (fp32 ours and transformers' against transformers in float64);
checkpoints both ways; config checks; the tokenizer loader."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from forkattn.backends import family  # noqa: E402
from forkattn.models import deberta as fd  # noqa: E402
from forkattn.models.deberta_tokenizer import load_deberta_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            pooler_dropout=0.0, num_labels=3)
CONFIGS = {
    "v3": dict(relative_attention=True, position_buckets=8, max_relative_positions=24, share_att_key=True,
               pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", position_biased_input=False, legacy=False),
    "v2-conv": dict(relative_attention=True, max_relative_positions=-1, pos_att_type="p2c|c2p", type_vocab_size=2,
                    conv_kernel_size=3, embedding_size=24, hidden_act="gelu_new"),
    "c2p": dict(relative_attention=True, position_buckets=8, max_relative_positions=24, pos_att_type=["c2p"]),
    "p2c-shared": dict(relative_attention=True, max_relative_positions=6, share_att_key=True, pos_att_type=["p2c"],
                       legacy=False),
    "no-relative": dict(relative_attention=False, pos_att_type=["c2p", "p2c"]),
}
# (kind, class name, output fields)
HEADS = [("base", "DebertaV2Model", ["last_hidden_state"]), ("mlm", "DebertaV2ForMaskedLM", ["logits"]),
         ("seq", "DebertaV2ForSequenceClassification", ["logits"]),
         ("tok", "DebertaV2ForTokenClassification", ["logits"]),
         ("qa", "DebertaV2ForQuestionAnswering", ["start_logits", "end_logits"])]


def _hf(kind, name, config):
    cfg = {**BASE, **CONFIGS[config]}
    if kind == "qa":
        cfg["num_labels"] = 2
    torch.manual_seed(0)
    hf = getattr(transformers, name)(transformers.DebertaV2Config(**cfg)).eval()
    with torch.no_grad():  # make every parameter matter: non-trivial biases and LayerNorms too
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


def _batch(B=4, L=11, vocab=53):
    """Lengths 11, 6, 0 (an empty row), 3; padded ids are garbage tokens, not pad."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate((11, 6, 0, 3)):
        mask[b, :n] = 1
    tt = torch.randint(0, 2, (B, L), generator=g) * mask
    return ids, mask, tt


def _labels(kind, ids, mask):
    """Labels the empty row takes no part in (transformers spreads its attention over padding)."""
    g = torch.Generator().manual_seed(2)
    B, L = ids.shape
    if kind == "mlm":
        return {"labels": ids.masked_fill(mask == 0, -100)}
    if kind == "seq":
        return {"labels": torch.tensor([0, 2, -1, 1])}  # negative: ignored by transformers' loss
    if kind == "tok":
        return {"labels": torch.randint(0, 3, (B, L), generator=g).masked_fill(mask == 0, -100)}
    if kind == "qa":  # its softmax runs over every position, padded ones too, whose values differ
        # from transformers' (see models/deberta.py): only the unpadded row is labelled
        return {"start_positions": torch.tensor([2, L, L, L]), "end_positions": torch.tensor([7, L, L, L])}
    return {}


def _loss(kind, out, mask, g):
    if "loss" in out and out["loss"] is not None:
        return out["loss"]
    h = out["last_hidden_state"]  # base model: a random projection of the real tokens
    return (h * g).masked_fill(mask[..., None] == 0, 0).sum()


def _check_close(ours, base, ref, what):
    """Our fp32 error vs the fp64 reference <= 2x transformers' fp32 error + 1e-5."""
    e = [(t.detach().double() - ref.detach().double()).abs().max().item() for t in (ours, base)]
    assert e[0] <= 2 * e[1] + 1e-5, f"{what}: our error {e[0]:.3g} > 2 x transformers' {e[1]:.3g} + 1e-5"


# every backend that runs these CPU float32 calls (head_dim 8): the fused cpu kernel and eager
BACKENDS = family("disentangled_attention").runnable("cpu", torch.float32, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind,name,fields", HEADS, ids=[h[0] for h in HEADS])
def test_matches_transformers_outputs_and_gradients(kind, name, fields, config, backend):
    hf = _hf(kind, name, config)
    ref = copy.deepcopy(hf).double()
    ours = getattr(fd, name)(fd.DebertaV2Config.from_dict({**hf.config.to_dict(), "attention_backend": backend}))
    info = ours.load_hf_state_dict(hf.state_dict())
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ours.eval()
    ids, mask, tt = _batch()
    real, rows = mask.bool(), mask.any(1)
    labels = _labels(kind, ids, mask)
    g = torch.randn(*ids.shape, 32, dtype=torch.float64)
    outs = []
    for m in (ours, hf, ref):
        out = m(input_ids=ids, attention_mask=mask, token_type_ids=tt, **labels)
        dt = next(m.parameters()).dtype
        _loss(kind, out, mask, g.to(dt)).backward()
        outs.append(out)
    for f in fields:
        o, h, r = (out[f] for out in outs)
        keep = real if o.shape[:2] == real.shape else rows  # real tokens; rows that have some
        _check_close(o[keep], h[keep], r[keep], f)
    if kind != "base":
        _check_close(outs[0]["loss"], outs[1]["loss"], outs[2]["loss"], "loss")
    theirs = [dict(m.named_parameters(remove_duplicate=False)) for m in (hf, ref)]
    params = dict(ours.named_parameters())
    for n, p in params.items():
        assert p.grad is not None and theirs[0][n].grad is not None, n
        _check_close(p.grad, theirs[0][n].grad, theirs[1][n].grad, f"grad {n}")
    assert len(params) == len(dict(hf.named_parameters()))


def test_empty_row_is_finite_and_backends_agree():
    config = fd.DebertaV2Config.from_dict({**BASE, **CONFIGS["v3"]})
    model = fd.DebertaV2Model(config).eval()
    ids, mask, tt = _batch()
    out = model(ids, mask).last_hidden_state
    assert torch.isfinite(out).all()
    model.set_attention_backend("eager")
    torch.testing.assert_close(model(ids, mask).last_hidden_state, out)


@pytest.mark.parametrize("legacy", [True, False])
def test_save_pretrained_loads_in_transformers_and_back(tmp_path, legacy):
    config = fd.DebertaV2Config.from_dict({**BASE, **CONFIGS["v3"], "legacy": legacy})
    ours = fd.DebertaV2ForMaskedLM(config).eval()
    ours.save_pretrained(tmp_path)
    hf, info = transformers.DebertaV2ForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ids, mask, _ = _batch()
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).logits[real], hf.eval()(ids, attention_mask=mask).logits[real],
                                   rtol=1e-5, atol=1e-5)
    hf.save_pretrained(tmp_path / "hf")
    back, info = fd.DebertaV2ForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # a head model's checkpoint into the base model, and the base model's into a head model
    base, info = fd.DebertaV2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"]  # the MLM head's keys
    seq, info = fd.DebertaV2ForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias", "classifier.weight",
                                         "classifier.bias"}


@pytest.mark.parametrize("field,value,exc,match", [
    ("pos_att_type", ["c2p", "p2p"], ValueError, "pos_att_type must hold only"),
    ("hidden_size", 30, ValueError, "hidden_size 30 must be a multiple"),
    ("position_buckets", 8, ValueError, "max_relative_positions must exceed"),  # max_relative 4
    ("hidden_act", "gelu_erf", ValueError, "hidden_act must be one of"),
    ("attention_head_size", 16, NotImplementedError, "attention_head_size"),
    ("attention_backend", 3, TypeError, "attention_backend must be None"),
])
def test_config_checks_name_the_field(field, value, exc, match):
    d = {**BASE, "relative_attention": True, "max_relative_positions": 4, field: value}
    with pytest.raises(exc, match=match):
        fd.DebertaV2Config.from_dict(d)


def test_bad_inputs_name_the_argument():
    model = fd.DebertaV2Model(fd.DebertaV2Config.from_dict({**BASE, **CONFIGS["v2-conv"]}))
    ids = torch.randint(1, 53, (2, 30))
    with pytest.raises(ValueError, match="more than max_position_embeddings 24"):
        model(ids)
    with pytest.raises(ValueError, match="input_ids must be \\[batch, seq\\]"):
        model(ids[0])
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(ids[:, :10], torch.ones(2, 9))
    v3 = fd.DebertaV2Model(fd.DebertaV2Config.from_dict({**BASE, **CONFIGS["v3"]}))
    assert v3(ids).last_hidden_state.shape == (2, 30, 32)  # relative positions only: any length


def test_config_json_round_trip():
    config = fd.DebertaV2Config.from_dict({**BASE, **CONFIGS["v3"], "id2label": {"0": "a", "1": "b"}})
    d = config.to_dict()
    assert d["model_type"] == "deberta-v2" and "attention_backend" not in d and d["label2id"] == {"a": 0, "b": 1}
    hf = transformers.DebertaV2Config(**json.loads(json.dumps(d)))
    assert hf.position_buckets == 8 and hf.share_att_key and hf.num_labels == 2
    assert fd.DebertaV2Config.from_dict(hf.to_dict()) == config


def test_tokenizer_loader(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    trainer = tokenizers.trainers.UnigramTrainer(vocab_size=40, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"],
                                                 unk_token="[UNK]")
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    plain = load_deberta_tokenizer(tmp_path, prefer_transformers=False)
    assert isinstance(plain, tokenizers.Tokenizer)
    ids = plain.encode("the cat ran").ids
    fast = load_deberta_tokenizer(tmp_path)
    assert isinstance(fast, transformers.DebertaV2TokenizerFast)
    assert fast("the cat ran", add_special_tokens=False)["input_ids"] == ids
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_deberta_tokenizer(tmp_path / "nothing.json")


def test_split_bench_times_equivalent_modules():
    """bench/deberta_split.py times transformers' and forkattn's attention modules on the same weights:
    they must compute the same thing (at real tokens: padded query rows differ by design), with and
    without the projections swapped for identities, and the swap must not outlive the call."""
    from forkattn.bench import deberta_split

    b = deberta_split.build(2, 24)
    rows, x, keep = b["rows"], b["x"], b["mask"].bool()
    with torch.no_grad():
        first = rows["fa-module"](x)
        for hf, fa in (("hf-module", "fa-module"), ("hf-core", "fa-core")):
            want, got = rows[hf](x)[keep], rows[fa](x)[keep]
            assert (want - got).abs().max() < 1e-4 * want.abs().max(), (hf, fa)
        assert not torch.equal(rows["fa-core"](x), first)
        assert torch.equal(rows["fa-module"](x), first)  # projections restored after the core rows
