"""One native call per BERT encoder layer (issue #18, batch 1: csrc/encoder_layer.cpp via
models/cpu_inference.native_layer): which forwards take it, parity with transformers (2x rule in
fp64) and with the per-op fast path at every thread and row-block count, odd lengths, errors raised
inside a row block, bad arguments, concurrent callers, and the weight cache still followed."""
import copy
import threading

import pytest
import torch

from attn_utils import assert_within_budget
from forkattn import _native
from forkattn.models import bert as fb
from forkattn.models import cpu_inference

pytestmark = pytest.mark.skipif(_native._C is None or not hasattr(_native._C, "encoder_layer_cpu"),
                                reason=f"no native extension with encoder_layer_cpu: {_native.ERROR}")

PACKINGS = [False] + ([True] if cpu_inference.PACKED else [])


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class _Counting:
    """Stands in for forkattn._C, counting native layer calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if name == "encoder_layer_cpu":
            def counted(*a, **k):
                self.calls += 1
                return fn(*a, **k)
            return counted
        return fn


def _pair(act="gelu", layers=2, hidden=48, heads=3, inter=37):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.BertConfig(vocab_size=101, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=160,
                                 hidden_act=act)
    hc._attn_implementation = "eager"
    hf = transformers.BertModel(hc).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so every fused term matters
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    m = fb.BertModel(fb.BertConfig.from_dict(hc.to_dict()))
    m.load_hf_state_dict({f"bert.{k}": v for k, v in hf.state_dict().items()}, strict=True)
    return m.eval(), hf


def _ids(L, B=1, seed=1):
    return torch.randint(1, 101, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("packed", PACKINGS)
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("L", [1, 7, 97, 129])
def test_native_layer_within_budget_of_transformers(monkeypatch, threads, packed, nthreads, L):
    """Batch 1, no padding: every layer is one native call, and last_hidden_state keeps the 2x rule
    against transformers in fp64 (also with an all-ones mask, which the model drops)."""
    m, hf = _pair()
    monkeypatch.setattr(cpu_inference, "PACKED", packed)
    torch.set_num_threads(nthreads)
    ids = _ids(L)
    counting = _Counting(_native._C)
    monkeypatch.setattr(_native, "_C", counting)
    ref = copy.deepcopy(hf).double()
    with torch.inference_mode():
        ours = m(ids).last_hidden_state
        ours_mask = m(ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        base = hf(input_ids=ids).last_hidden_state
        r = ref(input_ids=ids).last_hidden_state
    assert counting.calls == 2 * 2
    assert_within_budget(f"native layer L{L}", ours, base, r)
    torch.testing.assert_close(ours_mask, ours, rtol=0, atol=0)


@pytest.mark.parametrize("chunks_per_thread", [1, 3, 200])
def test_native_layer_matches_op_path_at_any_row_blocking(monkeypatch, threads, chunks_per_thread):
    """Row blocks change which rows a GEMM call sees, not the result beyond rounding: the native
    layer at 2 threads and 1..L blocks agrees with the per-op fast path (NATIVE_LAYER off)."""
    m, _ = _pair()
    torch.set_num_threads(2)
    ids = _ids(97)
    with torch.no_grad():
        monkeypatch.setattr(cpu_inference, "NATIVE_LAYER", False)
        ops = m(ids).last_hidden_state
        monkeypatch.setattr(cpu_inference, "NATIVE_LAYER", True)
        monkeypatch.setattr(cpu_inference, "CHUNKS_PER_THREAD", chunks_per_thread)
        native = m(ids).last_hidden_state
    torch.testing.assert_close(native, ops, rtol=1e-5, atol=1e-5)


def test_what_takes_the_native_layer(monkeypatch):
    """Only eval + no autograd + batch 1 + no padding + exact GELU + the cpu attention backend."""
    counting = _Counting(_native._C)
    monkeypatch.setattr(_native, "_C", counting)
    m, _ = _pair()
    ids = _ids(13)
    with torch.no_grad():
        m(_ids(13, B=2))  # batch 2: the per-op path
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0
        m(ids, attention_mask=mask)  # padding
        m.train()
        m(ids)  # dropout active
        m.eval()
    m(ids)  # autograd recording
    assert counting.calls == 0
    tanh, _ = _pair(act="gelu_new")
    with torch.no_grad():
        tanh(ids)
    assert counting.calls == 0
    m.config.attention_backend = "eager"
    with torch.no_grad():
        m(ids)
    assert counting.calls == 0
    m.config.attention_backend = "cpu"
    with torch.no_grad():
        m(ids)
    assert counting.calls == 2


def test_native_layer_follows_weight_changes(monkeypatch):
    """The packed weights it reads are the fast path's cache: an in-place update shows at once."""
    m, _ = _pair()
    ids = _ids(11)
    with torch.no_grad():
        before = m(ids).last_hidden_state
        m.encoder.layer[1].intermediate.dense.weight.mul_(0.5)
        after = m(ids).last_hidden_state
        clean = fb.BertModel(m.config).eval()
        clean.load_state_dict(m.state_dict())
        monkeypatch.setattr(cpu_inference, "NATIVE_LAYER", False)
        expected = clean(ids).last_hidden_state
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def _layer_args(H=48, heads=3, I=37, L=9):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(1, L, H), qkv_w=r(3 * H, H), qkv_b=r(3 * H), attn_out_w=r(H, H), attn_out_b=r(H),
                ln1_w=r(H), ln1_b=r(H), ln1_eps=1e-12, inter_w=r(I, H), inter_b=r(I), out_w=r(H, I), out_b=r(H),
                ln2_w=r(H), ln2_b=r(H), ln2_eps=1e-12, heads=heads, packed=False, chunks=2, threads=2)


@pytest.mark.parametrize("change, words", [
    (dict(x=torch.randn(9, 48)), "x must be [batch, seq_len, hidden]"),
    (dict(x=torch.randn(1, 9, 48, dtype=torch.float64)), "x"),
    (dict(x=torch.randn(1, 48, 9).transpose(1, 2)), "x must be contiguous"),
    (dict(heads=5), "heads must be > 0 and divide"),
    (dict(heads=0), "heads must be > 0"),
    (dict(chunks=0), "chunks must be >= 1"),
    (dict(threads=0), "threads must be >= 1"),
    (dict(qkv_b=torch.randn(48)), "qkv_b must be [3 * hidden]"),
    (dict(ln2_w=torch.randn(48, dtype=torch.float64)), "ln2_w"),
])
def test_encoder_layer_bad_arguments(change, words):
    args = _layer_args()
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=words.replace("[", r"\[").replace("*", r"\*")):
        _native._C.encoder_layer_cpu(**args)


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_error_inside_a_row_block_raises_and_pool_recovers(nthreads):
    """A GEMM that fails inside a row block (a weight of the wrong width) raises in the caller on
    every thread count, and the next call works: no crash, no hang, no helper left busy."""
    args = _layer_args()
    args.update(inter_w=torch.randn(37, 40), threads=nthreads, chunks=4)
    with pytest.raises(RuntimeError):
        _native._C.encoder_layer_cpu(**args)
    good = _layer_args()
    good.update(threads=nthreads, chunks=4)
    one = dict(good, threads=1, chunks=1)
    torch.testing.assert_close(_native._C.encoder_layer_cpu(**good), _native._C.encoder_layer_cpu(**one),
                               rtol=1e-5, atol=1e-5)


def test_concurrent_callers_get_their_own_results(threads):
    """The call releases the GIL; callers from several Python threads share the helper threads."""
    torch.set_num_threads(2)
    m, _ = _pair()
    inputs = [_ids(L, seed=L) for L in (5, 17, 33, 64)]
    with torch.no_grad():
        expected = [m(i).last_hidden_state for i in inputs]
    results, errors = {}, []

    def work(k):
        try:
            with torch.no_grad():
                for _ in range(5):
                    results[k] = m(inputs[k]).last_hidden_state
        except Exception as e:  # reported below
            errors.append(e)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in ts)
    for k, e in enumerate(expected):
        torch.testing.assert_close(results[k], e, rtol=1e-5, atol=1e-5)
