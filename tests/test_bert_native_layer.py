"""One native call per BERT encoder layer (issue #18: csrc/encoder_layer.cpp via
models/cpu_inference.native_layer; batch 1, unmasked batches and a padded batch's packed tokens;
GEMMs split over row blocks, or over output columns with few rows per thread):
which forwards take it, parity with transformers (2x rule in fp64) and with the per-op fast path at
every thread and row-block count, odd lengths, empty rows, errors raised inside a row block, bad
arguments, concurrent callers, and the weight cache still followed."""
import copy
import re
import threading

import pytest
import torch

from attn_utils import assert_within_budget
from forkattn import _native
from forkattn.models import bert as fb
from forkattn.models import cpu_inference
from test_cpu_isa import compiled, runs_here

pytestmark = pytest.mark.skipif(_native._C is None or not hasattr(_native._C, "encoder_layer_varlen_cpu"),
                                reason=f"no native extension with encoder_layer_varlen_cpu: {_native.ERROR}")

PACKINGS = [False] + ([True] if cpu_inference.PACKED else [])  # oneDNN-packed weights (native calls' `packed`)
# the fast path's weight kinds (cpu_inference.Weights.kind): forkattn's panel GEMM, oneDNN, plain
KINDS = (["panel"] if hasattr(_native._C, "gemm_pack_cpu") and _native._C.cpu_isa() != "default" else []) + \
    (["onednn"] if cpu_inference.PACKED else []) + ["plain"]


# the CPU kernel variants with a panel GEMM tile (AVX-512: 48-column panels, AVX2: 24) that run here
PANEL_ISAS = [i for i in ("avx2", "avx512") if i in compiled() and runs_here(i)] if "panel" in KINDS else []


@pytest.fixture(params=PANEL_ISAS)
def panel_isa(request):
    before = _native._C.cpu_isa()
    assert _native._C._choose_cpu_isa(request.param) == request.param
    yield request.param
    _native._C._choose_cpu_isa(before)


def _use_kind(monkeypatch, kind):
    monkeypatch.setattr(cpu_inference, "PANEL_GEMM", kind == "panel")
    monkeypatch.setattr(cpu_inference, "PACKED", kind == "onednn")
    assert cpu_inference.weight_kind() == kind


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
        if name in ("encoder_layer_cpu", "encoder_layer_varlen_cpu", "encoder_layer_cols_cpu"):
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("L", [1, 7, 97, 129])
def test_native_layer_within_budget_of_transformers(monkeypatch, threads, kind, nthreads, L):
    """Batch 1, no padding: every layer is one native call, and last_hidden_state keeps the 2x rule
    against transformers in fp64 (also with an all-ones mask, which the model drops)."""
    m, hf = _pair()
    _use_kind(monkeypatch, kind)
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunks_per_thread", [1, 3, 200])
def test_native_layer_matches_op_path_at_any_row_blocking(monkeypatch, threads, kind, chunks_per_thread):
    """Row blocks change which rows a GEMM call sees, not the result beyond rounding: the native
    layer at 2 threads and 1..L blocks agrees with the per-op fast path (NATIVE_LAYER off)."""
    _use_kind(monkeypatch, kind)
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
    """eval + no autograd + exact GELU + the cpu attention backend, with no mask (any batch) or a
    padded batch run unpadded; a key-padding mask on the padded layout takes the per-op path."""
    counting = _Counting(_native._C)
    monkeypatch.setattr(_native, "_C", counting)
    m, _ = _pair()
    ids = _ids(13)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    with torch.no_grad():
        m.config.unpad_inputs = False
        m(ids, attention_mask=mask)  # padded layout with a key-padding mask
        m.config.unpad_inputs = True
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
        m(_ids(13, B=2))  # batch 2, no mask
        assert counting.calls == 4
        m(ids, attention_mask=mask)  # padding, unpadded (config.unpad_inputs)
        assert counting.calls == 6


def _padded(L, B=4, seed=5):
    """ids [B, L] with row 0 full, then lengths 7, 0 (an empty row) and 1 (clipped to L)."""
    ids = _ids(L, B=B, seed=seed)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate([L, 7, 0, 1][:B]):
        mask[b, :min(n, L)] = 1
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("L", [1, 7, 97, 129])
def test_native_layer_padded_batch_within_budget_of_transformers(monkeypatch, threads, kind, nthreads, L):
    """A padded batch (with an empty row) runs unpadded through encoder_layer_varlen_cpu, one call
    per layer; at the real tokens last_hidden_state keeps the 2x rule against transformers in fp64,
    and the padded positions are zeros."""
    m, hf = _pair()
    _use_kind(monkeypatch, kind)
    torch.set_num_threads(nthreads)
    ids, mask = _padded(L)
    counting = _Counting(_native._C)
    monkeypatch.setattr(_native, "_C", counting)
    ref = copy.deepcopy(hf).double()
    with torch.inference_mode():
        ours = m(ids, attention_mask=mask).last_hidden_state
        base = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        r = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert counting.calls == 2
    real = mask.bool()
    assert_within_budget(f"native layer padded L{L}", ours[real], base[real], r[real])
    assert (ours[~real] == 0).all()


@pytest.mark.parametrize("block_rows", [1, 5, 64, 256])
def test_native_layer_padded_matches_op_path_at_any_row_blocking(monkeypatch, threads, block_rows):
    """Row blocks that cut through sequences (and hold several) give the per-op fast path's result."""
    m, _ = _pair()
    torch.set_num_threads(2)
    ids, mask = _padded(97, B=5)
    mask[4, :50] = 1
    with torch.no_grad():
        monkeypatch.setattr(cpu_inference, "NATIVE_LAYER", False)
        ops = m(ids, attention_mask=mask).last_hidden_state
        monkeypatch.setattr(cpu_inference, "NATIVE_LAYER", True)
        monkeypatch.setattr(cpu_inference, "BLOCK_ROWS", block_rows)
        native = m(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(native, ops, rtol=1e-5, atol=1e-5)


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
    (dict(qkv_b=torch.randn(288)[::2]), "qkv_b must be [3 * hidden] = [144], contiguous"),
    (dict(ln2_w=torch.randn(48, dtype=torch.float64)), "ln2_w"),
])
def test_encoder_layer_bad_arguments(change, words):
    args = _layer_args()
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=words.replace("[", r"\[").replace("*", r"\*")):
        _native._C.encoder_layer_cpu(**args)


def _varlen_args(lengths=(9, 0, 4)):
    args = _layer_args()
    T = sum(lengths)
    args["x"] = torch.randn(T, 48, generator=torch.Generator().manual_seed(4))
    args["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return args


@pytest.mark.parametrize("change, words", [
    (dict(x=torch.randn(1, 13, 48)), "x must be [tokens, hidden]"),
    (dict(x=torch.randn(13, 48, dtype=torch.float64)), "x"),
    (dict(cu_seqlens=torch.tensor([0, 9, 12])), "cu_seqlens must start at 0 and end at x.size(0) = 13"),
    (dict(cu_seqlens=torch.tensor([1, 9, 13])), "cu_seqlens must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 9, 4, 13])), "cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0.0, 13.0])), "cu_seqlens must be int32 or int64"),
    (dict(cu_seqlens=torch.tensor([[0, 13]])), "cu_seqlens must be [batch + 1]"),
    (dict(heads=5), "heads must be > 0 and divide"),
    (dict(chunks=0), "chunks must be >= 1"),
    (dict(qkv_b=torch.randn(48)), "qkv_b must be [3 * hidden]"),
    (dict(qkv_b=torch.randn(288)[::2]), "qkv_b must be [3 * hidden] = [144], contiguous"),
])
def test_encoder_layer_varlen_bad_arguments(change, words):
    args = _varlen_args()
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=re.escape(words)):
        _native._C.encoder_layer_varlen_cpu(**args)


def test_encoder_layer_varlen_equals_per_sequence_calls():
    """Packed sequences (an empty one among them, blocks across sequence borders) give what each
    sequence gives alone through encoder_layer_cpu."""
    args = _varlen_args((9, 0, 4, 1))
    cu = args["cu_seqlens"].tolist()
    for chunks in (1, 3, 14):
        got = _native._C.encoder_layer_varlen_cpu(**dict(args, chunks=chunks))
        for b in range(len(cu) - 1):
            if cu[b + 1] == cu[b]:
                continue
            one = {k: v for k, v in args.items() if k != "cu_seqlens"}
            one["x"] = args["x"][cu[b]:cu[b + 1]].unsqueeze(0).contiguous()
            want = _native._C.encoder_layer_cpu(**one)[0]
            torch.testing.assert_close(got[cu[b]:cu[b + 1]], want, rtol=1e-5, atol=1e-5)
    empty = _native._C.encoder_layer_varlen_cpu(**dict(args, x=torch.randn(0, 48),
                                                       cu_seqlens=torch.tensor([0, 0], dtype=torch.int32)))
    assert empty.shape == (0, 48)


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


def _cols_args(args, parts, packed):
    """encoder_layer_varlen_cpu's arguments as encoder_layer_cols_cpu's: each weight in column parts."""
    out = dict(args)
    for k in ("qkv_w", "attn_out_w", "inter_w", "out_w"):
        ws = [t.contiguous() for t in torch.split(args[k], cpu_inference.column_parts(args[k].shape[0], parts))]
        out[k] = [torch.ops.mkldnn._reorder_linear_weight(t, 128) for t in ws] if packed else ws
    out["packed"] = packed
    return out


@pytest.mark.parametrize("packed", PACKINGS)
@pytest.mark.parametrize("parts, nthreads", [(1, 1), (2, 1), (2, 2), (3, 2), (2, 3), (3, 3), (5, 2)])
@pytest.mark.parametrize("lengths", [(1,), (7,), (97,), (129,), (9, 0, 4, 1)])
def test_cols_layer_equals_row_layer(threads, packed, parts, nthreads, lengths):
    """The column split (any part count, uneven parts, any thread count, odd lengths, packed
    sequences with an empty one) gives the row-block layer's result."""
    args = _varlen_args(lengths)
    args.update(threads=nthreads, packed=packed)
    if packed:
        for k in ("qkv_w", "attn_out_w", "inter_w", "out_w"):
            args[k] = args[k] * 0.2  # keep the 9-row LayerNorm outputs moderate: the comparison is absolute
    want = _native._C.encoder_layer_varlen_cpu(**dict(args, packed=False, chunks=1, threads=1))
    for chunks in (1, 2, 5):
        got = _native._C.encoder_layer_cols_cpu(**_cols_args(dict(args, chunks=chunks), parts, packed))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def _panel_args(args):
    """The same arguments with each GEMM weight packed into panels (_C.gemm_pack_cpu, in the CPU kernel
    variant in use): [panels, K, width]."""
    return dict(args, **{k: _native._C.gemm_pack_cpu(args[k]) for k in GEMM_WEIGHTS})


GEMM_WEIGHTS = ("qkv_w", "attn_out_w", "inter_w", "out_w")


@pytest.mark.skipif("panel" not in KINDS, reason="no panel GEMM in this build / CPU variant")
@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("lengths", [(1,), (7,), (97,), (129,), (9, 0, 4, 1)])
def test_panel_weights_give_the_plain_layer(threads, panel_isa, nthreads, lengths):
    """Panel weights (one per GEMM; the column split cuts it at panel borders, one range per thread,
    storing straight into the layer's buffers with the bias / bias + GELU in the GEMM) give the plain
    weights' result in the row-block layer and in the column split, at any thread count."""
    args = _varlen_args(lengths)
    args.update(threads=nthreads, packed=False)
    want = _native._C.encoder_layer_varlen_cpu(**dict(args, chunks=1, threads=1))
    panel = _panel_args(args)
    for chunks in (1, 2, 5):
        rows = _native._C.encoder_layer_varlen_cpu(**dict(panel, chunks=chunks))
        torch.testing.assert_close(rows, want, rtol=1e-5, atol=2e-5)
        cols = dict(panel, chunks=chunks, **{k: [panel[k]] for k in GEMM_WEIGHTS})
        torch.testing.assert_close(_native._C.encoder_layer_cols_cpu(**cols), want, rtol=1e-5, atol=2e-5)


@pytest.mark.skipif("panel" not in KINDS, reason="no panel GEMM in this build / CPU variant")
@pytest.mark.parametrize("name, N, K", [("qkv_w", 144, 48), ("attn_out_w", 48, 48), ("inter_w", 37, 48),
                                        ("out_w", 48, 37)])
def test_panel_weight_of_the_wrong_size_raises(name, N, K):
    """A panel weight's shape [panels, K, width] is checked against the [N, K] the layer needs, in all
    three layer functions (one packed for another width names the argument)."""
    args = _panel_args(_varlen_args())
    wrong = _native._C.gemm_pack_cpu(torch.randn(N + 16, K))
    words = f"{name} must be a weight packed by gemm_pack_cpu for [N, K] = [{N}, {K}]"
    with pytest.raises(ValueError, match=re.escape(words)):
        _native._C.encoder_layer_varlen_cpu(**dict(args, **{name: wrong}))
    cols = dict(args, **{k: [args[k]] for k in GEMM_WEIGHTS})
    cols[name] = [wrong]
    with pytest.raises(ValueError, match=re.escape(words)):
        _native._C.encoder_layer_cols_cpu(**cols)
    one = {k: v for k, v in args.items() if k != "cu_seqlens"}
    one["x"] = torch.randn(1, 13, 48)
    one[name] = wrong
    with pytest.raises(ValueError, match=re.escape(words)):
        _native._C.encoder_layer_cpu(**one)


@pytest.mark.skipif(len(PANEL_ISAS) < 2, reason="needs the AVX2 and AVX-512 variants, compiled in and runnable here")
def test_panel_weights_of_another_variant_raise_and_the_model_repacks(monkeypatch, threads):
    """Weights packed under AVX2 (24-column panels) are refused under AVX-512 (48) by all three layer
    functions, naming the argument, and back; the model's fast path keeps one cache slot per panel
    width, so switching variants between forwards repacks and gives the same result."""
    C, before = _native._C, _native._C.cpu_isa()
    args = _varlen_args()
    try:
        for packer, user in (("avx2", "avx512"), ("avx512", "avx2")):
            C._choose_cpu_isa(packer)
            panel = _panel_args(args)
            C._choose_cpu_isa(user)
            words = "qkv_w was packed into panels of"
            with pytest.raises(ValueError, match=words):
                C.encoder_layer_varlen_cpu(**panel)
            with pytest.raises(ValueError, match=words):
                C.encoder_layer_cols_cpu(**dict(panel, **{k: [panel[k]] for k in GEMM_WEIGHTS}))
            one = {k: v for k, v in panel.items() if k != "cu_seqlens"}
            with pytest.raises(ValueError, match=words):
                C.encoder_layer_cpu(**dict(one, x=torch.randn(1, 13, 48)))
        _use_kind(monkeypatch, "panel")
        m, _ = _pair()
        ids = _ids(29)
        outs = []
        for isa in ("avx512", "avx2", "avx512"):
            C._choose_cpu_isa(isa)
            for nthreads in (1, 2):
                torch.set_num_threads(nthreads)
                with torch.inference_mode():
                    outs.append(m(ids).last_hidden_state)
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)
        slots = sorted(k for k in m.encoder.layer[0].__dict__ if k.startswith("_fast_weights_panel"))
        assert slots == ["_fast_weights_panel24", "_fast_weights_panel48"]
    finally:
        C._choose_cpu_isa(before)


def test_weight_kind_follows_the_cpu_variant(monkeypatch):
    """PANEL_GEMM=True: the panel GEMM where the CPU kernel variant in use has a tile; under "default"
    the fast path builds oneDNN (or plain) weights instead, in their own cache slot. PANEL_GEMM=None
    (the default): the AVX-512 tile, and the AVX2 tile only where oneDNN has no AVX-512 kernels."""
    C = _native._C
    before = C.cpu_isa()
    monkeypatch.setattr(cpu_inference, "PANEL_GEMM", None)
    for isa, avx512_cpu, packed, want in [("avx512", True, True, "panel"), ("avx2", False, True, "panel"),
                                          ("avx2", True, True, "onednn"), ("avx2", True, False, "panel"),
                                          ("default", False, True, "onednn")]:
        if isa in compiled() and runs_here(isa) and "panel" in KINDS:
            monkeypatch.setattr(cpu_inference, "_AVX512", avx512_cpu)
            monkeypatch.setattr(cpu_inference, "PACKED", packed)
            try:
                C._choose_cpu_isa(isa)
                assert cpu_inference.weight_kind() == want, (isa, avx512_cpu, packed)
            finally:
                C._choose_cpu_isa(before)
    monkeypatch.setattr(cpu_inference, "_AVX512", None)
    assert cpu_inference._cpu_has_avx512() == runs_here("avx512")
    monkeypatch.undo()
    monkeypatch.setattr(cpu_inference, "PANEL_GEMM", True)
    try:
        C._choose_cpu_isa("default")
        assert cpu_inference.weight_kind() == ("onednn" if cpu_inference.PACKED else "plain")
        if "panel" in KINDS:
            C._choose_cpu_isa(before)
            assert cpu_inference.weight_kind() == "panel"
            monkeypatch.setattr(cpu_inference, "PANEL_GEMM", False)
            assert cpu_inference.weight_kind() != "panel"
    finally:
        C._choose_cpu_isa(before)


def _spy_native_layers(monkeypatch, record):
    """Every `_C.encoder_layer*` call the fast path makes is passed on, after record(name, args)."""
    inner = _native._C

    class Spy:
        def __getattr__(self, name):
            fn = getattr(inner, name)
            if not name.startswith("encoder_layer"):
                return fn

            def called(*a, **k):
                record(name, a)
                return fn(*a, **k)
            return called
    monkeypatch.setattr(_native, "_C", Spy())


@pytest.mark.parametrize("nthreads", [2, 3])
def test_what_takes_the_column_split(monkeypatch, threads, nthreads):
    """Fewer than COL_SPLIT_ROWS rows per thread: the column split; more, or one thread: row blocks."""
    torch.set_num_threads(nthreads)
    m, _ = _pair()
    calls = []
    _spy_native_layers(monkeypatch, lambda name, args: calls.append(name))
    monkeypatch.setattr(cpu_inference, "COL_SPLIT_ROWS", 8)
    with torch.no_grad():
        m(_ids(8 * nthreads - 1))
        assert calls == ["encoder_layer_cols_cpu"] * 2
        calls.clear()
        m(_ids(8 * nthreads))
        assert calls == ["encoder_layer_varlen_cpu"] * 2
        calls.clear()
        torch.set_num_threads(1)
        m(_ids(5))
        assert calls == ["encoder_layer_varlen_cpu"] * 2


def test_column_parts():
    assert cpu_inference.column_parts(1152, 2) == [576, 576]
    assert cpu_inference.column_parts(3072, 3) == [1024] * 3
    assert cpu_inference.column_parts(37, 2, 16) == [16, 21]
    assert cpu_inference.column_parts(2, 3) == [1, 1]
    for n in range(1, 70):
        for p in range(1, 5):
            w = cpu_inference.column_parts(n, p)
            assert sum(w) == n and min(w) >= 1 and len(w) == min(n, p)


def _bad_cols(**change):
    args = _cols_args(_varlen_args(), 2, False)
    args.update(change)
    return args


@pytest.mark.parametrize("change, words", [
    (dict(qkv_w=[]), "qkv_w must be a non-empty list"),
    (dict(out_w=[]), "out_w must be a non-empty list"),
    (dict(qkv_w=[torch.randn(100, 48), torch.randn(44, 48)][:1]), "qkv_w's parts must have 144 output rows in all, got 100"),
    (dict(attn_out_w=[torch.randn(48, 47)]), "attn_out_w[0] must be [out >= 1, 48]"),
    (dict(inter_w=[torch.randn(37, 48), torch.randn(0, 48)]), "inter_w[1] must be [out >= 1, 48]"),
    (dict(inter_w=[torch.randn(30, 48)]), "inter_b must be [30]"),
    (dict(out_w=[torch.randn(48, 36)]), "out_w[0] must be [out >= 1, 37]"),
    (dict(out_w=[torch.randn(48, 37, dtype=torch.float64)]), "out_w"),
    (dict(x=torch.randn(1, 13, 48)), "x must be [tokens, hidden]"),
    (dict(cu_seqlens=torch.tensor([0, 9, 12])), "cu_seqlens must start at 0 and end at x.size(0) = 13"),
    (dict(heads=5), "heads must be > 0 and divide"),
    (dict(chunks=0), "chunks must be >= 1"),
    (dict(threads=0), "threads must be >= 1"),
])
def test_encoder_layer_cols_bad_arguments(change, words):
    with pytest.raises((ValueError, TypeError), match=re.escape(words)):
        _native._C.encoder_layer_cols_cpu(**_bad_cols(**change))


def test_serial_torch_ops_runs_embeddings_and_pooler_on_one_thread(monkeypatch, threads):
    """Batch 1 at 2 threads: the embeddings and the pooler see one torch thread, the native layers
    get 2, and the count is restored after the forward, also when the embeddings raise; with
    autograd, a large batch or SERIAL_TORCH_OPS off, the embeddings and the pooler keep 2 threads."""
    torch.set_num_threads(2)
    m, _ = _pair()
    seen, pooler, layer_threads = [], [], []
    m.embeddings.register_forward_pre_hook(lambda mod, args: seen.append(torch.get_num_threads()))
    m.pooler["dense"].register_forward_pre_hook(lambda mod, args: pooler.append(torch.get_num_threads()))
    _spy_native_layers(monkeypatch, lambda name, args: layer_threads.append(args[-1]))
    with torch.no_grad():
        m(_ids(100))
        assert seen == [1] and pooler == [1] and layer_threads == [2, 2] and torch.get_num_threads() == 2
        with pytest.raises(IndexError):
            m(torch.full((1, 5), 10_000))  # an id past the vocabulary, inside the embeddings
        assert seen[-1] == 1 and torch.get_num_threads() == 2
        m(_ids(128, B=2))  # 256 rows: row blocks, the embeddings and the pooler on 2 threads
        monkeypatch.setattr(cpu_inference, "SERIAL_TORCH_OPS", False)
        m(_ids(100))
    assert seen[-2:] == [2, 2] and pooler[-2:] == [2, 2]
    m(_ids(100))  # autograd
    assert seen[-1] == 2 and pooler[-1] == 2 and torch.get_num_threads() == 2


def test_panel_layer_refuses_a_strided_qkv_bias():
    """The packed-panel GEMM reads qkv_b with unit stride in its store: a strided bias must raise,
    not give a layer computed with every other bias value (it did, silently, before the check)."""
    args = _layer_args()
    for k in ("qkv_w", "attn_out_w", "inter_w", "out_w"):
        args[k] = _native._C.gemm_pack_cpu(args[k])
    want = _native._C.encoder_layer_cpu(**args)
    strided = torch.zeros(2 * args["qkv_b"].numel())
    strided[::2] = args["qkv_b"]
    with pytest.raises(ValueError, match=re.escape("qkv_b must be [3 * hidden] = [144], contiguous")):
        _native._C.encoder_layer_cpu(**dict(args, qkv_b=strided[::2]))
    torch.testing.assert_close(_native._C.encoder_layer_cpu(**dict(args, qkv_b=strided[::2].contiguous())), want)


@pytest.mark.parametrize("rows, threads, want", [
    (128, 2, 2), (860, 2, 4), (1568, 2, 8), (1568, 1, 7), (3000, 2, 12), (300, 3, 3), (1, 4, 4), (0, 2, 2)])
def test_row_chunks_are_a_multiple_of_the_threads(rows, threads, want):
    """At most BLOCK_ROWS (256) rows per block, at least one block per thread, and a multiple of the
    thread count (1568 rows on 2 threads: 8 blocks, not 7 with one thread doing 4 of them)."""
    assert cpu_inference.row_chunks(rows, threads) == want
