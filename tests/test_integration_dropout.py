"""attn_implementation="forkattn" training with attention dropout (issue #16): the `dropout` that
transformers' attention modules pass in training becomes forkattn.attention's dropout_p.

Tiny random transformers BertModel and GPT2LMHeadModel, padded batches: in train mode outputs
differ from eval, reproduce bit for bit under torch.manual_seed and with no warning (no sdpa
fallback); each call gets the module's rate and returns the float64 reference fed the same seed;
the spread of train outputs around eval matches sdpa's with the same rate (and a wrong rate is
told apart); gradients are finite and agree between the eager and cpu backends under one seed;
eval is what it was (the module's dropout is not applied, outputs as sdpa's).
"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("forkattn.integrations.transformers")

import forkattn  # noqa: E402
from forkattn import reference  # noqa: E402
from forkattn._checks import check_dropout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 99


def _model(name, p, impl="forkattn", backend=None):
    from transformers import BertConfig, GPT2Config

    if name == "bert":
        cfg = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                         max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=p)
        cls = transformers.BertModel
    else:
        cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=p, pad_token_id=0)
        cls = transformers.GPT2LMHeadModel
    torch.manual_seed(0)
    m = cls(cfg)
    with torch.no_grad():  # sharper attention than the 0.02-std init, so dropout shows in the outputs
        for n, w in m.named_parameters():
            if n.endswith(("query.weight", "key.weight")):
                w.normal_(0, 0.3)
            elif n.endswith("attn.c_attn.weight"):
                w[:, :64].normal_(0, 0.3)  # Conv1D [in, out]: the q and k columns
    m.set_attn_implementation(impl)
    m.config.attention_backend = backend
    return m


def _twin(m, impl):
    t = copy.deepcopy(m)
    t.set_attn_implementation(impl)
    return t


def _batch(B=3, L=13):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    return ids, mask


def _out(m, ids, mask, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    o = m(ids, attention_mask=mask)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_train_mode_applies_dropout_reproducibly_without_fallback(name):
    m = _model(name, 0.3)
    ids, mask = _batch()
    real = mask.bool()
    hf._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falls back to sdpa"
        m.train()
        a, b, c = _out(m, ids, mask, 1), _out(m, ids, mask, 1), _out(m, ids, mask)
        m.eval()
        with torch.no_grad():
            e = _out(m, ids, mask)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c)[real].abs().max() > 1e-2 and (a - e)[real].abs().max() > 1e-2
    with torch.no_grad():  # eval as before: the sdpa model's outputs; the rate does not matter
        want = _out(_twin(m, "sdpa"), ids, mask)
        torch.testing.assert_close(e[real], want[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_out(_model(name, 0.0).eval(), ids, mask), e, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_each_call_gets_the_module_rate_in_training_only(name, monkeypatch):
    """Every forkattn.attention call of a training forward gets dropout_p = the config's rate and
    returns forkattn.reference (float64) fed the same seed; eval calls get 0."""
    seen = []
    orig = forkattn.attention

    def rec(q, k, v, *, dropout_p=0.0, seed=None, generator=None, **kw):
        p, s = check_dropout(dropout_p, seed, generator)
        out = orig(q, k, v, dropout_p=p, seed=s, **kw)
        seen.append((q, k, v, kw, p, s, out))
        return out

    monkeypatch.setattr(forkattn, "attention", rec)
    m = _model(name, 0.25, backend="cpu")
    ids, mask = _batch()
    _out(m.train(), ids, mask, 2)
    assert [c[4] for c in seen] == [0.25, 0.25] and seen[0][5] != seen[1][5]
    for q, k, v, kw, p, s, out in seen:
        d = lambda t: t.detach().double()  # noqa: E731
        ref = reference.attention(d(q), d(k), d(v), causal=kw["causal"], key_padding_mask=kw["key_padding_mask"],
                                  scale=kw["scale"], dropout_p=p, seed=s)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    seen.clear()
    with torch.no_grad():
        _out(m.eval(), ids, mask)
    assert [c[4] for c in seen] == [0.0, 0.0]


def _spread(m, ids, mask, n, seed0):
    """Per seed: mean squared deviation of the train output from the eval output at real tokens."""
    real = mask.bool()
    with torch.no_grad():
        e = _out(m.eval(), ids, mask)
        m.train()
        return torch.tensor([(_out(m, ids, mask, seed0 + i) - e)[real].pow(2).mean().item() for i in range(n)])


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_dropout_statistics_match_sdpa(name):
    """Same rate, same statistics: the mean squared train-vs-eval deviation over 24 seeds agrees
    with sdpa's (its own torch masks) within 4 standard errors; at half the rate it does not."""
    ids, mask = _batch(B=4, L=24)
    n = 24
    ours = _spread(_model(name, 0.3), ids, mask, n, 100)
    theirs = _spread(_model(name, 0.3, "sdpa"), ids, mask, n, 200)
    half = _spread(_model(name, 0.15), ids, mask, n, 300)

    def agree(a, b):
        return (a.mean() - b.mean()).abs() <= 4 * (a.var() / n + b.var() / n).sqrt()

    assert agree(ours, theirs), (ours.mean(), theirs.mean())
    assert not agree(half, theirs), (half.mean(), theirs.mean())


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_gradients_flow_and_backends_agree(name):
    """A training step with dropout: finite gradients on every parameter, non-zero on the query and
    key weights; the eager and cpu backends give the same gradients under one seed (one mask, the
    backward regenerating it) and another seed gives others."""
    ids, mask = _batch()

    def step(backend, seed):
        m = _model(name, 0.3, backend=backend).train()
        o = _out(m, ids, mask, seed)
        w = torch.randn(o.shape[-1], generator=torch.Generator().manual_seed(5))
        (o[mask.bool()] @ w).sin().sum().backward()  # not o.pow(2): BERT's LayerNorm output has unit mean square
        return {n: w.grad for n, w in m.named_parameters() if w.grad is not None}

    eager, cpu, other = step("eager", 3), step("cpu", 3), step("cpu", 4)
    assert eager.keys() == cpu.keys() and len(cpu) > 10
    for n in cpu:
        assert torch.isfinite(cpu[n]).all(), n
        torch.testing.assert_close(cpu[n], eager[n], rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")
    qk = [n for n in cpu if n.endswith(("query.weight", "key.weight", "c_attn.weight"))]
    assert qk and all(cpu[n].abs().sum() > 0 for n in qk)
    assert any(not torch.allclose(cpu[n], other[n]) for n in qk)
