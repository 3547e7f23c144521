"""BERT's CPU inference fast path (issue #18, models/cpu_inference.py): the fused C++ epilogues
(bias + GELU, bias + residual + LayerNorm) against an fp64 reference with the 2x rule, their bad
input errors, the cached QKV weight's invalidation, and which path a forward takes."""
import copy

import pytest
import torch
import torch.nn.functional as F

from attn_utils import assert_within_budget
from forkattn import _native
from forkattn.models import bert as fb
from forkattn.models import cpu_inference
from forkattn.models.dropout import AttentionDropout

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(_native._C is None, reason=f"no native extension: {_native.ERROR}")]

ROWS = [1, 7, 97, 129]
COLS = [1, 7, 97, 384, 1025]


def _rand(*shape, g, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("cols", COLS)
def test_bias_gelu_matches_fp64(rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    x, b = _rand(rows, cols, g=g, scale=3.0), _rand(cols, g=g)
    ref = F.gelu(x.double() + b.double())
    eager = F.gelu(x + b)
    ours = x.clone()
    _native._C.bias_gelu_cpu(ours, b)
    assert_within_budget("bias_gelu", ours, eager, ref)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("cols", COLS)
def test_bias_residual_layernorm_matches_fp64(rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols + 7)
    x, res = _rand(rows, cols, g=g, scale=2.0) + 5.0, _rand(rows, cols, g=g)  # an offset: the mean matters
    b, w, lb = _rand(cols, g=g), 1.0 + _rand(cols, g=g, scale=0.1), _rand(cols, g=g)
    eps = 1e-12 if cols > 1 else 1e-5  # one column: the variance is 0, eps alone sets the scale
    ref = F.layer_norm(x.double() + b.double() + res.double(), (cols,), w.double(), lb.double(), eps)
    eager = F.layer_norm(x + b + res, (cols,), w, lb, eps)
    ours = x.clone()
    _native._C.bias_residual_layernorm_cpu(ours, res, b, w, lb, eps)
    assert_within_budget("bias_residual_layernorm", ours, eager, ref)


def test_bias_gelu_extremes_follow_fp64():
    """Large, tiny and infinite inputs give the float64 GELU: the same infinities and NaNs (the AVX2 exp's
    clamp, erf's saturation), and finite values within the erf approximation's 1.5e-7 (ATen's vectorized
    erf uses the same one). Not eager fp32 itself: its AVX-512 kernel returns NaN for +inf and inf for
    3.4e38 (torch 2.13 on an AVX-512 CPU). Every lane position and the scalar tail see each value."""
    vals = torch.tensor([-float("inf"), float("inf"), -100.0, 100.0, 1e-30, -1e-30, -13.0, -9.5, 0.0, -5.0, 5.0,
                         -87.5, 3.4e38, -3.4e38])
    x = vals.repeat(19)[: 19 * 14 - 3].reshape(1, -1).contiguous()  # 263 columns: a tail of 7
    b = torch.zeros(x.shape[1])
    ours = x.clone()
    _native._C.bias_gelu_cpu(ours, b)
    ref = F.gelu(x.double())
    finite = ref.isfinite()
    assert torch.equal(ours[~finite].double().nan_to_num(0.0), ref[~finite].nan_to_num(0.0))
    assert torch.equal(ours.isnan(), ref.isnan())
    err = (ours.double() - ref)[finite].abs()
    assert (err <= 1e-6 * ref[finite].abs() + 1.5e-7 * x.double()[finite].abs().clamp(min=1.0)).all(), err.max()


def test_kernels_keep_nan_and_run_on_3d_and_empty():
    x = torch.randn(2, 3, 16)
    x[1, 2, 5] = float("nan")
    b = torch.randn(16)
    y = x.clone()
    _native._C.bias_gelu_cpu(y, b)
    assert torch.isnan(y[1, 2, 5]) and torch.isnan(y).sum() == 1
    torch.testing.assert_close(y[0], F.gelu(x[0] + b))
    z, res = x.clone(), torch.randn(2, 3, 16)
    _native._C.bias_residual_layernorm_cpu(z, res, b, torch.ones(16), torch.zeros(16), 1e-5)
    assert torch.isnan(z[1, 2]).all() and not torch.isnan(z[:1]).any() and not torch.isnan(z[1, :2]).any()
    empty = torch.empty(0, 16)
    _native._C.bias_gelu_cpu(empty, b)
    _native._C.bias_residual_layernorm_cpu(empty, torch.empty(0, 16), b, b, b, 1e-5)


def _ln_args(x=None, residual=None, bias=None, weight=None, ln_bias=None, eps=1e-5):
    C = 8
    return (torch.randn(4, C) if x is None else x, torch.randn(4, C) if residual is None else residual,
            torch.randn(C) if bias is None else bias, torch.randn(C) if weight is None else weight,
            torch.randn(C) if ln_bias is None else ln_bias, eps)


@pytest.mark.parametrize("args, exc, words", [
    (_ln_args(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "x must have dtype Float"),
    (_ln_args(x=torch.randn(8, 4).t()), ValueError, "x must be contiguous"),
    (_ln_args(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dimension"),
    (_ln_args(residual=torch.randn(4, 7)), ValueError, "residual must have x's shape"),
    (_ln_args(residual=torch.randn(8, 4).t()), ValueError, "residual must be contiguous"),
    (_ln_args(residual=torch.randn(4, 8).half()), TypeError, "residual must have dtype Float"),
    (_ln_args(bias=torch.randn(9)), ValueError, "bias.size(0) must be 8"),
    (_ln_args(weight=torch.randn(2, 8)), ValueError, "weight must have 1 dimensions"),
    (_ln_args(ln_bias=torch.randn(16)[::2]), ValueError, "ln_bias must be contiguous"),
    (_ln_args(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
    (_ln_args(eps=float("nan")), ValueError, "eps must be a finite number >= 0"),
])
def test_bias_residual_layernorm_bad_inputs(args, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        _native._C.bias_residual_layernorm_cpu(*args)


def test_bias_residual_layernorm_rejects_residual_aliasing_x():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="residual must not share memory with x"):
        _native._C.bias_residual_layernorm_cpu(x, x, torch.zeros(8), torch.ones(8), torch.zeros(8), 1e-5)


@pytest.mark.parametrize("x, bias, exc, words", [
    (torch.randn(4, 8, dtype=torch.float64), torch.randn(8), TypeError, "x must have dtype Float"),
    (torch.randn(8, 4).t(), torch.randn(8), ValueError, "x must be contiguous"),
    (torch.randn(4, 8), torch.randn(7), ValueError, r"bias.size\(0\) must be 8"),
    (torch.randn(4, 8), torch.randn(8).half(), TypeError, "bias must have dtype Float"),
    (torch.randn(4, 8), torch.randn(1, 8), ValueError, "bias must have 1 dimensions"),
])
def test_bias_gelu_bad_inputs(x, bias, exc, words):
    with pytest.raises(exc, match=words):
        _native._C.bias_gelu_cpu(x, bias)


# --- the model: which path, parity, the cached QKV weight ----------------------------------------------

def _model(act="gelu", **kw):
    torch.manual_seed(0)
    c = fb.BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                      intermediate_size=37, max_position_embeddings=40, hidden_dropout_prob=0.1,
                      hidden_act=act, **kw)
    m = fb.BertModel(c)
    with torch.no_grad():  # non-trivial biases and LayerNorms, so every fused term matters
        for name, p in m.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return m


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 101, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 1:] = 0
    return ids, mask


class _Counting:
    """Stands in for forkattn._C, counting calls of the fused epilogues."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if name in ("bias_gelu_cpu", "bias_residual_layernorm_cpu"):
            def counted(*a, **k):
                self.calls += 1
                return fn(*a, **k)
            return counted
        return fn


PACKINGS = [False] + ([True] if cpu_inference.PACKED else [])  # oneDNN-packed weights where torch has oneDNN


@pytest.mark.parametrize("packed", PACKINGS)
@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_fused_path_within_budget_of_transformers(monkeypatch, packed, act, unpad, masked):
    """eval + inference_mode takes the fast path; last_hidden_state keeps the 2x rule: its error
    against transformers in fp64 <= 2x transformers' fp32 error + 1e-5 (at the real tokens)."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(cpu_inference, "PACKED", packed)
    torch.manual_seed(0)
    hc = transformers.BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                 intermediate_size=37, max_position_embeddings=40, hidden_act=act)
    hc._attn_implementation = "eager"
    hf = transformers.BertModel(hc).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so every fused term matters
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    m = fb.BertModel(fb.BertConfig.from_dict(hc.to_dict(), unpad_inputs=unpad))
    m.load_hf_state_dict({f"bert.{k}": v for k, v in hf.state_dict().items()}, strict=True)
    m.eval()
    ref = copy.deepcopy(hf).double()
    ids, mask = _batch()
    mask = mask if masked else torch.ones_like(ids)
    counting = _Counting(_native._C)
    monkeypatch.setattr(_native, "_C", counting)
    monkeypatch.setattr(cpu_inference, "NATIVE_LAYER", False)  # the per-op fast path (native: its own tests)
    with torch.inference_mode():
        ours = m(ids, attention_mask=mask).last_hidden_state
        base = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        r = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    # per layer: two LayerNorms, + the bias + GELU pass for the exact GELU
    assert counting.calls == (3 if act == "gelu" else 2) * 2
    real = mask.bool()
    assert_within_budget(f"fast path {act}", ours[real], base[real], r[real])


def test_training_and_grad_mode_take_the_module_path(monkeypatch):
    m = _model()
    ids, mask = _batch()
    counting = _Counting(_native._C)
    monkeypatch.setattr(_native, "_C", counting)
    m.train()
    with torch.no_grad():  # dropout active: must not be skipped
        m(ids, attention_mask=mask)
    m(ids, attention_mask=mask).last_hidden_state.sum().backward()
    m.eval()
    m(ids, attention_mask=mask)  # eval but autograd recording (e.g. saliency maps)
    m.bfloat16()
    with torch.no_grad():
        m(ids, attention_mask=mask)  # bf16: not the fp32 kernels
    assert counting.calls == 0
    assert m.encoder.layer[0].attention.self.query.weight.grad is not None
    assert not any(k.startswith("_fast") for k in m.encoder.layer[0].__dict__)


def _cached(m):
    entries = [v for k, v in m.encoder.layer[0].__dict__.items() if k.startswith("_fast_weights")]
    return entries[0] if len(entries) == 1 else None


def _fresh_output(m, ids, mask):
    """Reference: the same weights in a model that never cached anything, module path."""
    clean = fb.BertModel(m.config).eval()
    clean.load_state_dict(m.state_dict())
    return clean(ids, attention_mask=mask).last_hidden_state.detach()


def test_qkv_cache_follows_weight_changes():
    m = _model().eval()
    ids, mask = _batch()
    run = lambda: m(ids, attention_mask=mask).last_hidden_state  # noqa: E731
    with torch.inference_mode():
        first = run()
    cache = _cached(m)
    assert cache is not None and not any("_fast" in k for k in m.state_dict())
    with torch.no_grad():
        run()
    assert _cached(m) is cache  # reused while nothing changed
    torch.testing.assert_close(first, _fresh_output(m, ids, mask), rtol=0, atol=1e-5)

    # load_state_dict (in-place copy_ into the same parameters)
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        out = run()
    torch.testing.assert_close(out, _fresh_output(m, ids, mask), rtol=0, atol=1e-5)
    assert not torch.allclose(out, first, atol=1e-3)

    # a training step (optimizer updates in place), then inference again
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.train()
    m(ids, attention_mask=mask).last_hidden_state.pow(2).mean().backward()
    opt.step()
    m.eval()
    with torch.inference_mode():
        out = run()
    torch.testing.assert_close(out, _fresh_output(m, ids, mask), rtol=0, atol=1e-5)

    # the tensor behind a parameter replaced (.data), and only the value projection's bias
    v = m.encoder.layer[0].attention.self.value
    v.bias.data = torch.randn_like(v.bias) * 3
    with torch.no_grad():
        out = run()
    torch.testing.assert_close(out, _fresh_output(m, ids, mask), rtol=0, atol=1e-5)
    with torch.no_grad():
        v.weight.zero_()
        out = run()
    torch.testing.assert_close(out, _fresh_output(m, ids, mask), rtol=0, atol=1e-5)


def test_qkv_cache_from_inference_mode_serves_frozen_training():
    """A cache built under inference_mode holds normal tensors: a later autograd forward with frozen
    parameters (feature extraction with gradients w.r.t. inputs) can save it for backward."""
    m = _model().eval()
    ids, mask = _batch()
    with torch.inference_mode():
        m(ids, attention_mask=mask)
    for p in m.parameters():
        p.requires_grad_(False)
    x = m.embeddings(ids, None, None).detach().requires_grad_()
    y = m.encoder(x, mask.bool())
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_module_path_qkv_cache_without_autograd():
    """Training mode under no_grad (dropout on, so not the fast path) caches the plain concatenation;
    it follows load_state_dict too."""
    m = _model()
    m.config.hidden_dropout_prob = 0.0
    for mod in m.modules():
        if isinstance(mod, (torch.nn.Dropout, AttentionDropout)):  # hidden and attention dropout
            mod.p = 0.0
    m.train()
    ids, mask = _batch()
    with torch.no_grad():
        out = m(ids, attention_mask=mask).last_hidden_state
    layer = m.encoder.layer[0]
    assert "_qkv" in layer.__dict__ and not any(k.startswith("_fast") for k in layer.__dict__)
    before = out
    m.load_state_dict({k: v * 1.5 for k, v in m.state_dict().items()})
    with torch.no_grad():
        out = m(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, _fresh_output(m, ids, mask), rtol=0, atol=1e-5)
    assert not torch.allclose(out, before, atol=1e-3)
