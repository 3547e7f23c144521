"""Attention dropout of forkattn.disentangled_attention (issue #17) and of the DeBERTa models.

The contract (backends/families.py, DisentangledAttentionBackend): dropout_p / seed / generator as
forkattn.attention's; the mask of (b, h, i, j) is philox.dropout_keep's, the one the plain
attention draws; lse stays undropped; a backend gets dropout calls only if its FEATURES list
"dropout" (backend=None skips the others, a named one raises). Here: the eager reference against
the Philox mask, argument checks, the registry with a backend that has no dropout, the Triton
kernels (in its interpreter on CPU: TRITON_INTERPRET=1; float32 and float16, the interpreter's bf16
tl.dot is wrong) against the float64 reference fed the same mask, output and all five gradients
under the 2x rule, the mask bit for bit, keep-rate statistics, seeds; and models/deberta.py in
training against transformers' DebertaV2 with its attention dropout replaced by the same masks.
"""
import copy
import os
import warnings

import pytest
import torch

import forkattn
import forkattn.triton as ftriton
from forkattn import philox, reference
from forkattn._checks import check_dropout
from forkattn.backends import BackendUnavailableError, family
from forkattn.models import deberta as fd
from forkattn.models.dropout import set_attention_dropout_generator
from attn_utils import assert_seed_semantics, make_padding
from test_disentangled import _check, _inputs, _ReferenceKernel, registered

FAMILY = family("disentangled_attention")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16 = torch.float32, torch.float16

needs_triton = pytest.mark.skipif(
    ftriton.unavailable_reason() is not None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason=f"triton backend unavailable here (TRITON_INTERPRET=1 on CPU): {ftriton.unavailable_reason()}",
)


def _identity_v(B, H, Lk, dtype=torch.float32, device="cpu"):
    """v[b, h, j] = e_j (head_dim = Lk): output row i is row i of P * keep / (1 - p)."""
    return torch.eye(Lk, dtype=dtype, device=device).expand(B, H, Lk, Lk).contiguous()


def _sharp_inputs(B, H, Lq, Lk, span, dtype=torch.float32, seed=0, device="cpu"):
    """q, k, v = identity, pos_key, pos_query for mask-recovery tests (head_dim = Lk)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, Lk, generator=g) * 0.5
    k = torch.randn(B, H, Lk, Lk, generator=g) * 0.5
    pk, pq = (torch.randn(H, 2 * span, Lk, generator=g) * 0.5 for _ in range(2))
    return [t.to(dtype=dtype, device=device) for t in (q, k, _identity_v(B, H, Lk), pk, pq)]


# --- the eager reference ---------------------------------------------------------------------------------

def test_reference_draws_the_philox_mask():
    """reference.disentangled_attention(dropout_p, seed) zeroes exactly what philox.dropout_keep drops,
    scales the rest by 1 / (1 - p); dropout_mask= gives the same; the eager backend is the same."""
    B, H, Lq, Lk, p, seed = 2, 3, 5, 19, 0.3, 1234
    q, k, v, pk, pq = (t.double() for t in _sharp_inputs(B, H, Lq, Lk, 4))
    kw = dict(max_relative_positions=4, position_buckets=-1)
    plain = reference.disentangled_attention(q, k, v, pk, pq, **kw)  # = P
    out = reference.disentangled_attention(q, k, v, pk, pq, dropout_p=p, seed=seed, **kw)
    keep = philox.dropout_keep(seed, p, B, H, Lq, Lk)
    torch.testing.assert_close(out, torch.where(keep, plain / (1 - p), 0.0), rtol=1e-14, atol=0)
    assert 0 < (~keep).sum() < keep.numel()
    given = reference.disentangled_attention(q, k, v, pk, pq, dropout_p=p, dropout_mask=keep, **kw)
    assert torch.equal(given, out)
    eager = forkattn.disentangled_attention(*(t.float() for t in (q, k, v, pk, pq)), dropout_p=p, seed=seed,
                                            backend="eager", **kw)
    assert torch.equal(eager != 0, keep)


def test_reference_gradcheck_fixed_seed():
    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()
           for s in ((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4), (2, 8, 4), (1, 8, 4))]
    kpm = torch.tensor([[True, True, False, True, True]])

    def fn(q, k, v, pk, pq):
        return reference.disentangled_attention(q, k, v, pk, pq, max_relative_positions=4, key_padding_mask=kpm,
                                                dropout_p=0.4, seed=-7)
    assert torch.autograd.gradcheck(fn, ins)


def test_seeds_and_generators():
    q, k, v, pk, pq = _inputs(2, 2, 9, 11, 8, 4, F32, seed=1)

    def run(**kw):
        return forkattn.disentangled_attention(q, k, v, pk, pq, max_relative_positions=4, dropout_p=0.5,
                                               backend="eager", **kw)
    assert_seed_semantics(run)
    # the seed is drawn as forkattn.attention draws it: the same mask for the same generator state
    _, s = check_dropout(0.5, None, torch.Generator().manual_seed(8))
    assert torch.equal(run(generator=torch.Generator().manual_seed(8)), run(seed=s))


@pytest.mark.parametrize("kw, err, text", [
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in \\[0, 1\\)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in \\[0, 1\\)"),
    (dict(dropout_p=float("nan")), ValueError, "dropout_p must be in \\[0, 1\\), got nan"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p"),
    (dict(dropout_p=True), TypeError, "dropout_p"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, "seed"),
    (dict(dropout_p=0.1, seed=2 ** 64), ValueError, "seed"),
    (dict(dropout_p=0.1, generator=0), TypeError, "generator"),
])
def test_bad_arguments_name_the_argument(kw, err, text):
    q, k, v, pk, pq = _inputs(1, 2, 3, 3, 8, 4, F32)
    with pytest.raises(err, match=text):
        forkattn.disentangled_attention(q, k, v, pk, pq, max_relative_positions=4, **kw)


def test_p_zero_is_the_plain_path():
    """dropout_p = 0 (any seed) is the call without dropout, bit for bit, on every CPU backend."""
    q, k, v, pk, pq = _inputs(2, 2, 7, 9, 32, 4, F32, seed=2)
    kw = dict(max_relative_positions=4)
    for backend in FAMILY.runnable("cpu", F32, 32):
        if "cpu" in FAMILY.backends[backend].INTERPRETED_ON:
            continue  # triton: test_triton_seeds_and_p_zero
        plain = forkattn.disentangled_attention(q, k, v, pk, pq, backend=backend, **kw)
        assert torch.equal(forkattn.disentangled_attention(q, k, v, pk, pq, dropout_p=0.0, seed=5, backend=backend,
                                                           **kw), plain)
        assert torch.equal(forkattn.disentangled_attention(q, k, v, pk, pq, dropout_p=0, backend=backend, **kw), plain)


# --- the registry --------------------------------------------------------------------------------------

class _NoDropout(_ReferenceKernel):
    """A kernel backend without dropout, preferred on CPU: its fwd / bwd take exactly the ten (thirteen)
    arguments of the contract, so a dropout call reaching it would raise TypeError."""

    NAME = "test_no_dropout"
    PRIORITY = {"cpu": 10_000}


@pytest.fixture
def no_dropout_backend():
    with registered(_NoDropout()) as name:
        yield name


def test_registry_skips_a_backend_without_dropout(no_dropout_backend):
    q, k, v, pk, pq = _inputs(2, 2, 7, 7, 32, 4, F32, seed=3)
    kw = dict(max_relative_positions=4)
    assert FAMILY.resolve(None, "cpu", F32, 32, ("c2p", "p2c")).NAME == no_dropout_backend
    picked = FAMILY.resolve(None, "cpu", F32, 32, ("c2p", "p2c", "dropout"))
    assert picked.NAME != no_dropout_backend and "dropout" in picked.FEATURES
    # runs: the dropout call goes past it (its fwd would refuse the two extra arguments)
    out = forkattn.disentangled_attention(q, k, v, pk, pq, dropout_p=0.2, seed=9, **kw)
    want = forkattn.disentangled_attention(q, k, v, pk, pq, dropout_p=0.2, seed=9, backend=picked.NAME, **kw)
    assert torch.equal(out, want)
    plain = forkattn.disentangled_attention(q, k, v, pk, pq, **kw)  # without dropout: it runs the call
    torch.testing.assert_close(plain, reference.disentangled_attention(q, k, v, pk, pq, **kw))
    with pytest.raises(BackendUnavailableError, match="backend 'test_no_dropout' cannot run this call: "
                                                      "dropout \\(dropout_p > 0\\) is not supported"):
        forkattn.disentangled_attention(q, k, v, pk, pq, dropout_p=0.2, backend=no_dropout_backend, **kw)
    forkattn.disentangled_attention(q, k, v, pk, pq, dropout_p=0.0, backend=no_dropout_backend, **kw)


def test_every_backend_answers_by_its_features():
    """eager and triton have dropout; each other backend (cpu, cuda: their own helpers add it) runs a
    dropout call iff it lists the feature, and a named one without it raises naming itself."""
    assert "dropout" in FAMILY.backends["eager"].FEATURES and "dropout" in FAMILY.backends["triton"].FEATURES
    for name, b in FAMILY.backends.items():
        dev = (b.SUPPORTED_DEVICES or ("cpu",))[0]
        why = b.supports(device_type=dev, features=("dropout",))
        assert (why is None) == ("dropout" in b.FEATURES), (name, why)
        if why is not None:
            assert f"backend {name!r}" in why
    cpu = FAMILY.backends["cpu"]
    q, k, v, pk, pq = _inputs(1, 2, 5, 5, 32, 4, F32)
    if cpu.available() is None and "dropout" not in cpu.FEATURES:
        with pytest.raises(BackendUnavailableError, match="backend 'cpu' cannot run this call: dropout"):
            forkattn.disentangled_attention(q, k, v, pk, pq, max_relative_positions=4, dropout_p=0.1, backend="cpu")
    expected = "cpu" if cpu.available() is None and "dropout" in cpu.FEATURES else "eager"
    assert FAMILY.resolve(None, "cpu", F32, 32, ("key_padding", "c2p", "p2c", "dropout")).NAME == expected


# --- Triton -------------------------------------------------------------------------------------------------

def _padded(B, L, inputs, seed):
    """A key padding mask (row 1 empty when B > 1, a hole before row 0's first key), NaN in padded k, v."""
    mask = make_padding(B, L, fully_padded=(1,) if B > 1 else (), generator=torch.Generator().manual_seed(seed))
    mask[0, : min(3, L - 1)] = False
    q, k, v, pk, pq = inputs
    pad = ~mask[:, None, :, None]
    return mask.to(DEV), (q, k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan")), pk, pq)


# (B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, padded). The interpreter's tiles are 64x32 (fwd,
# dQ) and 32x64 (dK/dV): 97 and 129 cross several blocks both ways.
TRITON_CASES = [
    (2, 2, 37, 37, 32, F32, (True, True), -1, 8, True),
    (1, 2, 97, 129, 32, F32, (True, True), 16, 40, False),
    (2, 2, 129, 33, 64, F16, (True, False), 256, 512, True),
    (1, 3, 7, 97, 32, F16, (False, True), -1, 8, False),
]


@needs_triton
@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,terms,buckets,max_rel,padded", TRITON_CASES)
def test_triton_matches_fp64_with_the_same_mask(B, H, Lq, Lk, D, dtype, terms, buckets, max_rel, padded):
    """Output and the gradients into q, k, v, pos_key, pos_query against the float64 reference under
    the same Philox mask: our error <= 2x eager's (same dtype, same mask) + 1e-5."""
    c2p, p2c = terms
    span = buckets if buckets > 0 else max_rel
    inputs = [t.to(DEV) for t in _inputs(B, H, Lq, Lk, D, span, dtype, seed=Lq + 7 * Lk)]
    kpm = None
    if padded:
        kpm, inputs = _padded(B, Lk, inputs, Lk)
    out, grads = _check("triton", *inputs, max_relative_positions=max_rel, position_buckets=buckets,
                        key_padding_mask=kpm, c2p=c2p, p2c=p2c, dropout_p=0.25, seed=0x5EED_0000_0000_0001 + Lq)
    if kpm is not None:
        assert not out[1].any() and not grads["dq"][1].any(), "the empty row: zeros, zero gradients"
        pad = ~kpm[:, None, :, None].expand_as(grads["dk"])
        assert not grads["dk"][pad].any() and not grads["dv"][pad].any()


@needs_triton
def test_triton_mask_bit_for_bit_and_keep_rate():
    """v = identity: out = P * keep / (1 - p), zero exactly where philox.dropout_keep dropped (and at
    padded keys); the kept fraction of the visible probabilities is 1 - p within 3 sigma; the lse is
    the undropped softmax's."""
    from forkattn.triton.disentangled import disentangled_fwd

    B, H, Lq, Lk, span, p, seed = 2, 3, 45, 64, 8, 0.3, 2 ** 63 + 12345
    q, k, v, pk, pq = _sharp_inputs(B, H, Lq, Lk, span, device=DEV)
    kpm = torch.ones(B, Lk, dtype=torch.bool, device=DEV)
    kpm[1, 50:] = False
    kw = dict(max_relative_positions=span, key_padding_mask=kpm, dropout_p=p, seed=seed)
    ours = forkattn.disentangled_attention(q, k, v, pk, pq, backend="triton", **kw)
    keep = philox.dropout_keep(seed, p, B, H, Lq, Lk, device=DEV) & kpm[:, None, None, :]
    assert torch.equal(ours != 0, keep)
    eager = forkattn.disentangled_attention(q, k, v, pk, pq, backend="eager", **kw)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    visible = int(kpm.sum()) * H * Lq
    rate = int(keep.sum()) / visible
    assert abs(rate - (1 - p)) <= 3 * (p * (1 - p) / visible) ** 0.5 + 2 ** -17, rate
    table = forkattn.disentangled.relative_position_index(Lq, Lk, max_relative_positions=span, device=DEV)
    scale = (Lk * 3) ** -0.5
    _, lse = disentangled_fwd(q, k, v, pk, pq, table, kpm, scale, True, True, p, seed)
    _, plain_lse = disentangled_fwd(q, k, v, pk, pq, table, kpm, scale, True, True)
    assert torch.equal(lse, plain_lse)


@needs_triton
def test_triton_seeds_and_p_zero():
    """Same seed: the same output and gradients, bit for bit; another seed: another mask; p = 0: the
    kernels without dropout code, exactly the plain call."""
    inputs = [t.to(DEV) for t in _inputs(1, 2, 20, 20, 32, 4, F32, seed=4)]
    kw = dict(max_relative_positions=4, backend="triton")

    def run(**drop):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = forkattn.disentangled_attention(*leaves, **kw, **drop)
        return [out] + list(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    a, b, c = run(dropout_p=0.3, seed=1), run(dropout_p=0.3, seed=1), run(dropout_p=0.3, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert all(torch.equal(x, y) for x, y in zip(run(dropout_p=0.0, seed=1), run()))


@needs_triton
def test_triton_custom_op_opcheck_with_dropout():
    q, k, v, pk, pq = (t.to(DEV) for t in _inputs(2, 2, 7, 7, 32, 4, F32, seed=9))
    table = forkattn.disentangled.relative_position_index(7, 7, max_relative_positions=4, device=DEV)
    mask = make_padding(2, 7, generator=torch.Generator().manual_seed(1)).to(DEV)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), pk.requires_grad_(), pq.requires_grad_(),
            table, mask, 0.2, True, True, "triton", 0.2, -5)
    # (test_disentangled_triton.py runs the full opcheck without dropout; the interpreter is slow)
    torch.library.opcheck(torch.ops.forkattn.disentangled_attention_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --- models/deberta.py ---------------------------------------------------------------------------------

try:
    import transformers
except ImportError:  # optional: the model tests compare with it
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

MODEL = dict(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=24, hidden_dropout_prob=0.0, pooler_dropout=0.0, num_labels=3)
MODEL_CONFIGS = {
    "v3": dict(relative_attention=True, position_buckets=8, max_relative_positions=24, share_att_key=True,
               pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", position_biased_input=False, legacy=False),
    "v2-conv-c2p": dict(relative_attention=True, max_relative_positions=-1, pos_att_type=["c2p"],
                        conv_kernel_size=3, hidden_act="gelu_new"),
}


class _PhiloxDropout(torch.nn.Module):
    """transformers' attention.self.dropout replaced: probabilities [B, H, L, L] times the Philox mask
    of the next recorded seed (layers run in order) over 1 - p."""

    def __init__(self, seeds, p):
        super().__init__()
        self.seeds, self.p = seeds, p

    def forward(self, probs):
        if not self.training or self.p == 0:
            return probs
        keep = philox.dropout_keep(self.seeds.pop(0), self.p, *probs.shape)
        return probs * keep / (1 - self.p)


@pytest.fixture
def seeds(monkeypatch):
    """Record every dropout seed forkattn.disentangled_attention draws (as it would draw it)."""
    seen = []
    orig = forkattn.disentangled_attention

    def f(*args, dropout_p=0.0, seed=None, generator=None, **kw):
        p, s = check_dropout(dropout_p, seed, generator)
        seen.append((p, s))
        return orig(*args, dropout_p=p, seed=s, **kw)

    monkeypatch.setattr(forkattn, "disentangled_attention", f)
    return seen


def _models(config, p, backend):
    """(ours, transformers' float32, transformers' float64) DebertaV2ForMaskedLM with the same weights,
    transformers' attention dropout replaced by _PhiloxDropout (sharing one seed queue)."""
    cfg = {**MODEL, **MODEL_CONFIGS[config], "attention_probs_dropout_prob": p}
    torch.manual_seed(0)
    hf = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**cfg))
    with torch.no_grad():  # sharper attention than the 0.02-std init, so dropout changes outputs visibly
        for n, w in hf.named_parameters():
            if n.endswith(("query_proj.weight", "key_proj.weight", "pos_key_proj.weight")):
                w.normal_(0, 0.3)
            elif n.endswith("bias") or "LayerNorm" in n:
                w.add_(torch.randn_like(w) * 0.1)
    ours = fd.DebertaV2ForMaskedLM(fd.DebertaV2Config.from_dict({**hf.config.to_dict(), "attention_backend": backend}))
    info = ours.load_hf_state_dict(hf.state_dict())
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ref = copy.deepcopy(hf).double()
    queue = []
    for m in (hf, ref):
        for layer in m.deberta.encoder.layer:
            layer.attention.self.dropout = _PhiloxDropout(queue, p)
    return ours, hf, ref, queue


def _batch(B=4, L=11):
    """Lengths 11, 6, 0 (an empty row), 3; padded ids are garbage tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 53, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate((11, 6, 0, 3)):
        mask[b, :n] = 1
    return ids, mask


def _close(ours, base, ref, what):
    """Our fp32 error vs the fp64 reference <= 2x transformers' fp32 error + 1e-5."""
    e = [(t.detach().double() - ref.detach().double()).abs().max().item() for t in (ours, base)]
    assert e[0] <= 2 * e[1] + 1e-5, f"{what}: our error {e[0]:.3g} > 2 x transformers' {e[1]:.3g} + 1e-5"


# (p, config, backend): every backend that runs these CPU calls with dropout (eager; cpu once its
# kernel has it), and triton once (its interpreter is slow)
MODEL_CASES = [(p, c, b) for p in (0.0, 0.3) for c in MODEL_CONFIGS for b in FAMILY.runnable("cpu", F32, 8, ("dropout",))
               if "cpu" not in FAMILY.backends[b].INTERPRETED_ON] + [pytest.param(0.3, "v3", "triton", marks=needs_triton)]


@needs_transformers
@pytest.mark.parametrize("p,config,backend", MODEL_CASES)
def test_training_matches_transformers_with_the_same_masks(p, config, backend, seeds):
    """Training mode: our logits, loss and every parameter gradient equal transformers' DebertaV2
    (float32 and float64) whose attention dropout applies the masks of the seeds our layers drew,
    within the 2x rule; p = 0 (no seed drawn) is transformers' train mode as it is."""
    ours, hf, ref, queue = _models(config, p, backend)
    ids, mask = _batch()
    real = mask.bool()
    labels = ids.masked_fill(mask == 0, -100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not applied" warning
        ours.train()
    hf.train(), ref.train()
    out = ours(ids, attention_mask=mask, labels=labels)
    assert len(seeds) == 2 and all(s[0] == p for s in seeds)
    drawn = [s for _, s in seeds] if p else []
    outs = [out]
    for m in (hf, ref):
        queue[:] = drawn
        outs.append(m(input_ids=ids, attention_mask=mask, labels=labels))
        assert not queue
    for o in outs:
        o.loss.backward()
    _close(*(o.logits[real] for o in outs), "logits")
    _close(*(o.loss for o in outs), "loss")
    theirs = [dict(m.named_parameters(remove_duplicate=False)) for m in (hf, ref)]
    for n, w in ours.named_parameters():
        _close(w.grad, theirs[0][n].grad, theirs[1][n].grad, f"grad {n}")
    if p:  # the masks matter: without them (eval) the logits move far beyond the 2x rule's errors
        with torch.no_grad():
            plain = ours.eval()(ids, attention_mask=mask).logits
        assert (plain - out.logits)[real].abs().max() > 1e-3


@needs_transformers
def test_eval_unchanged_and_reproducible_training(seeds):
    """Eval: attention_probs_dropout_prob changes nothing (no dropout call at all). Training: the
    seeds come from torch's default generator (or set_attention_dropout_generator's), one per layer
    and call."""
    ours, _, _, _ = _models("v3", 0.3, None)
    zero, _, _, _ = _models("v3", 0.0, None)
    ids, mask = _batch()
    with torch.no_grad():
        want = zero.eval()(ids, attention_mask=mask).logits
        assert torch.equal(ours.eval()(ids, attention_mask=mask).logits, want)
        assert torch.equal(zero.train()(ids, attention_mask=mask).logits, want)
    assert all(p == 0.0 for p, _ in seeds)
    ours.train()
    torch.manual_seed(3)
    a = ours(ids, attention_mask=mask).logits
    torch.manual_seed(3)
    assert torch.equal(ours(ids, attention_mask=mask).logits, a)
    assert not torch.equal(ours(ids, attention_mask=mask).logits, a)
    assert set_attention_dropout_generator(ours, torch.Generator().manual_seed(7)) == 2
    b = ours(ids, attention_mask=mask).logits
    set_attention_dropout_generator(ours, torch.Generator().manual_seed(7))
    assert torch.equal(ours(ids, attention_mask=mask).logits, b)
    assert "p=0.3" in repr(ours.deberta.encoder.layer[0].attention.self.dropout)


def test_bad_rate_names_the_field():
    with pytest.raises(ValueError, match="attention_probs_dropout_prob must be a float in"):
        fd.DebertaV2Model(fd.DebertaV2Config.from_dict({**MODEL, **MODEL_CONFIGS["v3"],
                                                        "attention_probs_dropout_prob": 1.0}))
