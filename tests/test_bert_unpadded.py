"""The fast paths of the BERT model: the unpadded encoder (packed real tokens, attention_varlen),
BertGraphRunner (CUDA graphs of it, and its static-shape path off CUDA) and sparse MLM prediction.
Each is checked against the padded layout / dense path it replaces."""
import warnings

import pytest
import torch

from forkattn.models import bert as fb
from forkattn.models.bert_graphs import BertGraphRunner
from forkattn.models.padding import Packing

BACKENDS = ["eager", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- the unpadded encoder ------------------------------------------------------------------------

def _unpad_model(**kw):
    torch.manual_seed(0)
    c = fb.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, **kw)
    m = fb.BertForMaskedLM(c)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _mixed_batch(B=5, L=33):
    """Right padding, left padding, a full row, a one-token row and a fully padded row."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    mask[0] = 1
    mask[1, :17] = 1
    mask[2, L - 9:] = 1  # left padded
    mask[3, :1] = 1
    # row 4: no real token at all
    tt = torch.randint(0, 2, (B, L), generator=g) * mask
    return ids.masked_fill(mask == 0, 0), mask, tt


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_unpadded_encoder_equals_padded_layout(backend):
    """Outputs and every parameter gradient of the unpadded path equal the padded path's at the
    real tokens, whatever the padding pattern; nothing leaks into or out of padded positions."""
    if backend == "triton":
        tr = pytest.importorskip("forkattn.triton")
        if tr.unavailable_reason() is not None:
            pytest.skip(f"triton backend unavailable: {tr.unavailable_reason()}")
    m = _unpad_model(attention_backend=backend)
    ids, mask, tt = _mixed_batch()
    real = mask.bool()
    labels = torch.where(real & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.5), ids, -100)
    res = {}
    for unpad in (True, False):
        m.config.unpad_inputs = unpad
        m.zero_grad(set_to_none=True)
        out = m(ids, mask, tt, labels=labels)
        out.loss.backward()
        res[unpad] = (out.logits.detach(), {k: p.grad.clone() for k, p in m.named_parameters()})
        h = m.bert(ids, mask, tt).last_hidden_state.detach()
        res[unpad] += (h,)
    (lu, gu, hu), (lp, gp, hp) = res[True], res[False]
    torch.testing.assert_close(hu[real], hp[real], rtol=1e-4, atol=2e-5)
    assert hu[~real].abs().max() == 0 and torch.isfinite(hp).all()
    torch.testing.assert_close(lu[real], lp[real], rtol=1e-4, atol=2e-5)
    for k in gp:
        torch.testing.assert_close(gu[k], gp[k], rtol=1e-3, atol=1e-5, msg=k)
    # a different pad token id / garbage at the padded positions changes nothing at the real ones
    m.config.unpad_inputs = True
    noisy = torch.where(real, ids, torch.randint(1, 97, ids.shape))
    torch.testing.assert_close(m.bert(noisy, mask, tt).last_hidden_state.detach(), hu, rtol=0, atol=0)


def test_packing_bookkeeping_and_dense_batches():
    ids, mask, _ = _mixed_batch()
    p = Packing.from_mask(mask)
    lengths = mask.sum(1)
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert p.max_seqlen == int(lengths.max()) and p.indices.numel() == int(lengths.sum()) and not p.dense
    packed = p.pack(ids)
    assert packed.tolist() == ids[mask.bool()].tolist()  # row-major: each sequence contiguous, in order
    back = p.unpack(packed)
    assert torch.equal(back, ids * mask)
    # no padding at all: the padded layout without a mask (no gather/scatter)
    m = _unpad_model()
    full = torch.ones_like(mask)
    assert Packing.from_mask(full).dense
    m.eval()
    a = m.bert(ids, full).last_hidden_state
    m.config.unpad_inputs = False
    torch.testing.assert_close(a, m.bert(ids, None).last_hidden_state, rtol=0, atol=0)


# --- CUDA-graph inference runner -----------------------------------------------------------------

def _runner_model(device="cpu", dtype=torch.float32, backend=None):
    torch.manual_seed(0)
    # head_dim 32: a size the cuda kernels take too
    c = fb.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                      max_position_embeddings=64, attention_backend=backend)
    return fb.BertModel(c).to(device, dtype).eval()


def _check_runner(m, runner, batches, atol):
    for ids, mask, tt in batches:
        with torch.inference_mode():
            ref = m(ids, mask, tt)
        out = runner(ids, mask, tt)
        real = (mask if mask is not None else torch.ones_like(ids)).bool()
        torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], rtol=0, atol=atol)
        assert out.last_hidden_state[~real].abs().max() == 0 if (~real).any() else True
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_graph_runner_static_path_equals_model(backend):
    """The runner's bucketed static-shape path (what the CUDA graph replays) gives the model's
    outputs: filler sequences and empty slots never reach the real tokens, buckets are reused."""
    if backend == "triton":
        tr = pytest.importorskip("forkattn.triton")
        if tr.unavailable_reason() is not None:
            pytest.skip(f"triton backend unavailable: {tr.unavailable_reason()}")
    m = _runner_model(backend=backend)
    runner = BertGraphRunner(m, max_batch=6, max_seqlen=40, token_bucket=16, graphs=False)
    ids, mask, tt = _mixed_batch()  # 60 real tokens -> the 64-token bucket, 4 filler tokens
    ids2, mask2, tt2 = (t[:3, :20].repeat(1, 2) for t in _mixed_batch())  # 40 + 17 + 9 = 66 -> 80
    mask2.zero_()
    mask2[0], mask2[1, :17], mask2[2, 31:] = 1, 1, 1  # full, right padded, left padded
    one = (ids[:1, :7], None, None)  # no mask, no types: 7 tokens -> 16
    _check_runner(m, runner, [(ids, mask, tt), (ids2, mask2, tt2), one, (ids, mask, tt)], atol=1e-5)
    assert sorted(runner._buckets) == [16, 64, 80] and runner.captured == []
    cu = runner._buckets[64].cu_seqlens.tolist()  # the last call's layout: 5 rows, filler, empty slots
    assert cu == [0, 33, 50, 59, 60, 60, 64] + [64] * (len(cu) - 7)


def test_graph_runner_bad_inputs():
    m = _runner_model()
    with pytest.raises(TypeError, match="BertModel"):
        BertGraphRunner(fb.BertForMaskedLM(m.config), max_batch=2, max_seqlen=8)
    with pytest.raises(ValueError, match="max_batch must be a positive int"):
        BertGraphRunner(m, max_batch=0, max_seqlen=8)
    with pytest.raises(ValueError, match="max_seqlen 65 exceeds max_position_embeddings 64"):
        BertGraphRunner(m, max_batch=2, max_seqlen=65)
    with pytest.raises(ValueError, match="graphs=True needs the model on a CUDA device"):
        BertGraphRunner(m, max_batch=2, max_seqlen=8, graphs=True)
    r = BertGraphRunner(m, max_batch=2, max_seqlen=8)
    assert r.graphs is False
    ids = torch.randint(1, 97, (3, 8))
    with pytest.raises(ValueError, match="batch 3, more than this runner's max_batch 2"):
        r(ids)
    with pytest.raises(ValueError, match="more than this runner's max_seqlen 8"):
        r(torch.randint(1, 97, (1, 9)))
    with pytest.raises(ValueError, match="attention_mask must have"):
        r(ids[:2], torch.ones(2, 7))
    with pytest.raises(ValueError, match="input_ids must be"):
        r(ids[0])
    m.train()
    with pytest.raises(RuntimeError, match="model.eval"):
        r(ids[:2])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_graph_runner_captures_and_replays_on_gpu(backend):
    from forkattn.attention import VARLEN_BACKENDS

    why = VARLEN_BACKENDS.why_not(backend, "cuda", dtype=torch.float16, head_dim=32)
    if why:
        pytest.skip(why)
    m = _runner_model("cuda", torch.float16, backend)
    runner = BertGraphRunner(m, max_batch=6, max_seqlen=40, token_bucket=16)
    ids, mask, tt = (t.cuda() for t in _mixed_batch())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_runner(m, runner, [(ids, mask, tt)], atol=2e-3)
    assert not [w for w in caught if "BertGraphRunner" in str(w.message)], [str(w.message) for w in caught]
    assert runner.captured == [64]
    # replay the same graph with other data of the same bucket: the static buffers are refilled
    ids2 = torch.randint(1, 97, ids.shape, device="cuda").masked_fill(mask == 0, 0)
    _check_runner(m, runner, [(ids2, mask, tt), (ids2, mask, None)], atol=2e-3)
    assert runner.captured == [64]



@pytest.mark.parametrize("cls", [fb.BertForMaskedLM, fb.BertForPreTraining])
def test_sparse_prediction_same_loss_and_gradients(cls):
    """Projecting only the labelled tokens to the vocabulary changes no loss and no gradient;
    the logits are the dense logits' labelled rows."""
    m = _unpad_model()
    m = cls(m.config)
    ids, mask, tt = _mixed_batch()
    labels = torch.where(mask.bool() & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.3), ids, -100)
    extra = {"next_sentence_label": torch.tensor([0, 1, 1, 0, 1])} if cls is fb.BertForPreTraining else {}
    name = "logits" if cls is fb.BertForMaskedLM else "prediction_logits"
    res = {}
    for sparse in (False, True):
        m.config.sparse_prediction = sparse
        m.zero_grad(set_to_none=True)
        out = m(ids, mask, tt, labels=labels, **extra)
        out.loss.backward()
        res[sparse] = (out.loss.detach(), out[name].detach(), {k: p.grad.clone() for k, p in m.named_parameters()})
    picked = labels != -100
    assert res[True][1].shape == (int(picked.sum()), m.config.vocab_size)
    torch.testing.assert_close(res[True][1], res[False][1][picked], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[True][0], res[False][0], rtol=1e-6, atol=1e-6)
    for k in res[False][2]:
        torch.testing.assert_close(res[True][2][k], res[False][2][k], rtol=1e-4, atol=1e-7, msg=k)
    # without labels there is nothing to select: full logits
    with torch.no_grad():
        assert m(ids, mask, tt)[name].shape == (*ids.shape, m.config.vocab_size)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unpadded_equals_padded_on_gpu(backend):
    """fp16 on the GPU: the unpadded encoder (varlen kernels) and the padded layout (key-padding
    kernels) agree at the real tokens, forward and every parameter gradient, within fp16 noise
    measured as the eager attention backend's distance to the same fp32 computation."""
    from forkattn.attention import VARLEN_BACKENDS

    why = VARLEN_BACKENDS.why_not(backend, "cuda", dtype=torch.float16, head_dim=32)
    if why:
        pytest.skip(why)
    ids, mask, tt = (t.cuda() for t in _mixed_batch())
    real = mask.bool()
    res = {}
    for name, dtype, be, unpad in (("ref", torch.float32, "eager", False), ("eager16", torch.float16, "eager", False),
                                   ("unpad", torch.float16, backend, True), ("pad", torch.float16, backend, False)):
        m = _runner_model("cuda", dtype, be)  # eval mode: no dropout; gradients still flow
        m.config.unpad_inputs = unpad
        h = m(ids, mask, tt).last_hidden_state
        (h.float()[real] ** 2).sum().backward()
        res[name] = (h.detach().float()[real],  # (the pooler gets no gradient from this loss)
                     {k: p.grad.float() for k, p in m.named_parameters() if p.grad is not None})
    assert len(res["ref"][1]) > 10 and all(res[n][1].keys() == res["ref"][1].keys() for n in res)
    for name in ("unpad", "pad"):
        for what, ours, eager, ref in [("hidden", res[name][0], res["eager16"][0], res["ref"][0])] + [
                (k, res[name][1][k], res["eager16"][1][k], res["ref"][1][k]) for k in res["ref"][1]]:
            err, base = (ours - ref).abs().max().item(), (eager - ref).abs().max().item()
            assert err <= 2 * base + 1e-5, f"{name} {what}: {err:.3g} > 2 x eager fp16's {base:.3g} + 1e-5"
