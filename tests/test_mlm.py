"""forkattn.mlm_mask: statistics over >= 1M tokens, the documented Philox layout, bit-identical
backends (cpu vs triton here, cuda on a GPU), exact / whole-word / min_masked, dtypes, strides,
inplace, bad inputs, opcheck, fake and meta tensors. The collator on top: test_mlm_collator.py."""
import math
import os

import numpy as np
import pytest
import torch

import forkattn
from forkattn import mlm as fmlm
from forkattn.triton import unavailable_reason as triton_unavailable

V = 30522
CLS, SEP, PAD, MASK, UNK = 101, 102, 0, 103, 100
SPECIALS = [PAD, UNK, CLS, SEP, MASK]
KW = dict(vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIALS)

needs_triton = pytest.mark.skipif(
    triton_unavailable() is not None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason=f"triton backend unavailable here: {triton_unavailable()}",
)


def make_batch(B, L, *, dtype=torch.int64, seed=0, min_len=1, device="cpu"):
    """[CLS] words [SEP] then padding; lengths in [min_len, L]; word ids >= 200 (never special)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(200, V, (B, L), generator=g)
    lens = torch.randint(min(min_len, L), L + 1, (B,), generator=g)
    pos = torch.arange(L)[None, :]
    att = pos < lens[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(B), (lens - 1).clamp(min=0)] = SEP
    ids[~att] = PAD
    return ids.to(dtype).to(device), att.to(torch.int64).to(device)


# --- a plain reference of the documented counter layout (kernels/mlm/mlm.h) -------------------------

def philox4x32_10(seed, c0, c1, c2, c3):
    """numpy Philox4x32-10, Triton's layout: key = (seed lo, seed hi)."""
    M = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) & M for x in (c0, c1, c2, c3)]
    c = list(np.broadcast_arrays(*c))
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p2 = np.uint64(0xCD9E8D57) * c[2]
        c = [((p2 >> np.uint64(32)) ^ c[1] ^ k0) & M, p2 & M, ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & M, p0 & M]
        k0 = (k0 + np.uint64(0x9E3779B9)) & M
        k1 = (k1 + np.uint64(0xBB67AE85)) & M
    return c


def reference_bernoulli(ids, att, seed, p=0.15, pm=0.8, pr=0.1, specials=SPECIALS, excluded=None):
    """mlm_mask(mode="bernoulli") straight from the rules in kernels/mlm/mlm.h."""
    excluded = sorted(set(specials) | {MASK}) if excluded is None else excluded
    ids_np = ids.cpu().numpy().astype(np.int64)
    B, L = ids_np.shape
    b = np.arange(B, dtype=np.uint64)[:, None]
    l = np.arange(L, dtype=np.uint64)[None, :]
    r = philox4x32_10(seed, l >> np.uint64(2), b, 0, 0)
    lane = (l & np.uint64(3)).astype(np.int64)
    key = np.choose(np.broadcast_to(lane, (B, L)), [np.broadcast_to(x, (B, L)) for x in r])
    T = fmlm.threshold
    elig = (att.cpu().numpy() != 0) & ~np.isin(ids_np, specials)
    sel = elig & (key < T(p))
    f = philox4x32_10(seed, l, b, 1, 0)
    fate, rnd = np.broadcast_to(f[0], (B, L)), np.broadcast_to(f[1], (B, L))
    j = ((rnd * np.uint64(V - len(excluded))) >> np.uint64(32)).astype(np.int64)
    for s in excluded:
        j = j + (j >= s)
    repl = np.where(fate < T(pm), MASK, np.where(fate >= T(pm + pr), ids_np, j))
    out = np.where(sel, repl, ids_np)
    lab = np.where(sel, ids_np, -100)
    return torch.from_numpy(out).to(ids.dtype), torch.from_numpy(lab).to(ids.dtype)


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10
    assert [int(x) for x in philox4x32_10(0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    full = philox4x32_10(0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    assert [int(x) for x in full] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@needs_triton
def test_python_philox_is_tritons():
    import triton
    import triton.language as tl

    @triton.jit
    def k(out_ptr, seed, N: tl.constexpr):
        o = tl.arange(0, N)
        r0, r1, r2, r3 = tl.philox(seed, o, o * 3 + 1, o * 0 + 2, o * 0 + 7)
        tl.store(out_ptr + o * 4 + 0, r0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + o * 4 + 1, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + o * 4 + 2, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + o * 4 + 3, r3.to(tl.int64) & 0xFFFFFFFF)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in (5, 0xDEADBEEF12345678):
        out = torch.empty(64 * 4, dtype=torch.int64, device=dev)
        k[(1,)](out, seed, N=64)
        o = np.arange(64)
        ref = philox4x32_10(seed, o, o * 3 + 1, 2, 7)
        np.testing.assert_array_equal(out.view(64, 4).cpu().numpy(), np.stack(ref, 1).astype(np.int64))


@pytest.mark.parametrize("seed", [0, 12345, 2**63 + 977])
def test_cpu_matches_documented_layout(seed):
    ids, att = make_batch(9, 97, seed=1)
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, seed=seed, backend="cpu", **KW)
    rout, rlab = reference_bernoulli(ids, att, seed)
    assert torch.equal(out, rout) and torch.equal(lab, rlab)


# --- statistics ------------------------------------------------------------------------------------------

def _check_outputs(ids, att, out, lab, *, specials=SPECIALS, excludes_special=True):
    sel = lab != -100
    assert torch.equal(lab[sel], ids[sel]), "labels must hold the original id where selected"
    assert torch.equal(out[~sel], ids[~sel]), "unselected tokens must be unchanged"
    special = torch.isin(ids, torch.tensor(specials, dtype=ids.dtype))
    assert not (sel & special).any(), "a special token was selected"
    assert not (sel & (att == 0)).any(), "a padding token was selected"
    assert ((out >= 0) & (out < V)).all()
    rnd = sel & (out != ids) & (out != MASK)
    if excludes_special:
        assert not torch.isin(out[rnd], torch.tensor(specials + [MASK], dtype=ids.dtype)).any()
    return sel, rnd


def test_statistics_1m_cpu():
    ids, att = make_batch(2400, 512, seed=3, min_len=400)
    elig = (att != 0) & ~torch.isin(ids, torch.tensor(SPECIALS))
    n = int(elig.sum())
    assert n >= 1_000_000
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, seed=7, **KW)
    sel, rnd = _check_outputs(ids, att, out, lab)
    ns = int(sel.sum())
    assert abs(ns / n - 0.15) < 0.002, ns / n
    fr_mask = int((sel & (out == MASK)).sum()) / ns
    fr_rand = int(rnd.sum()) / ns
    fr_keep = int((sel & (out == ids)).sum()) / ns
    assert abs(fr_mask - 0.8) < 0.005 and abs(fr_rand - 0.1) < 0.005 and abs(fr_keep - 0.1) < 0.005, (
        fr_mask, fr_rand, fr_keep)
    # random ids spread over the vocabulary (uniform: mean ~ V/2, every tenth of the vocab hit)
    r = out[rnd].double()
    assert abs(r.mean().item() / V - 0.5) < 0.01
    assert torch.histc(r, bins=10, min=0, max=V).min() > 0.08 * len(r)


def test_eager_statistics_and_labels():
    ids, att = make_batch(512, 512, seed=4, min_len=400)
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, backend="eager", **KW)
    sel, rnd = _check_outputs(ids, att, out, lab)
    n = int(((att != 0) & ~torch.isin(ids, torch.tensor(SPECIALS))).sum())
    assert abs(int(sel.sum()) / n - 0.15) < 0.004
    assert abs(int((sel & (out == MASK)).sum()) / int(sel.sum()) - 0.8) < 0.01


def test_probability_edges():
    ids, att = make_batch(8, 64, seed=5)
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, mask_prob=0.0, seed=1, **KW)
    assert torch.equal(out, ids) and (lab == -100).all()
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, mask_prob=1.0, mask_replace_prob=1.0,
                                 random_replace_prob=0.0, seed=1, **KW)
    elig = (att != 0) & ~torch.isin(ids, torch.tensor(SPECIALS))
    assert torch.equal(lab != -100, elig) and (out[elig] == MASK).all()


# --- reproducibility ----------------------------------------------------------------------------------------

def test_same_seed_same_output_and_different_seeds_differ():
    ids, att = make_batch(16, 128, seed=6)
    a = forkattn.mlm_mask(ids, attention_mask=att, seed=42, **KW)
    b = forkattn.mlm_mask(ids, attention_mask=att, seed=42, **KW)
    c = forkattn.mlm_mask(ids, attention_mask=att, seed=43, **KW)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_seed_none_draws_from_torch_generator():
    ids, att = make_batch(16, 128, seed=6)
    torch.manual_seed(11)
    a = forkattn.mlm_mask(ids, attention_mask=att, **KW)
    b = forkattn.mlm_mask(ids, attention_mask=att, **KW)
    torch.manual_seed(11)
    c = forkattn.mlm_mask(ids, attention_mask=att, **KW)
    assert torch.equal(a[1], c[1]) and torch.equal(a[0], c[0])
    assert not torch.equal(a[1], b[1]), "calls without a seed must give fresh masks"
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(forkattn.mlm_mask(ids, generator=g1, **KW)[1], forkattn.mlm_mask(ids, generator=g2, **KW)[1])


# --- modes -------------------------------------------------------------------------------------------------

def _expected_k(n, p=0.15):
    """mode="exact"'s documented count: n * p rounded half up, p as the decimal it prints as."""
    from fractions import Fraction

    q = Fraction(str(p))
    return math.floor(n * q + Fraction(1, 2))


def test_exact_mode_counts():
    ids, att = make_batch(300, 160, seed=8)
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, mode="exact", seed=3, **KW)
    _check_outputs(ids, att, out, lab)
    elig = (att != 0) & ~torch.isin(ids, torch.tensor(SPECIALS))
    n = elig.sum(1).tolist()
    k = (lab != -100).sum(1).tolist()
    assert k == [_expected_k(x) for x in n]
    assert all(abs(kk - 0.15 * nn) <= 0.5 + 1e-6 for kk, nn in zip(k, n))


EXACT_BACKENDS = ["cpu", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_exact_mode_rounds_ties_half_up(backend):
    """Issue 12: at p=0.15, 10 eligible tokens gave 1 and 50 gave 7 (1.5 and 7.5 rounded down by the
    binary 0.15 and the 2^-32 threshold). Every n from 1 to 400 (128 on triton) now gives round half up."""
    L = 402 if backend == "cpu" else 130  # the triton interpreter is slow
    for p in (0.15, 0.25, 0.35, 0.05, 0.5) if backend == "cpu" else (0.15, 0.35):
        n = torch.arange(1, L - 1)
        ids = torch.randint(200, V, (len(n), L), generator=torch.Generator().manual_seed(1))
        att = (torch.arange(L)[None, :] < n[:, None]).to(torch.int64)
        out, lab = forkattn.mlm_mask(ids, attention_mask=att, mode="exact", mask_prob=p, seed=11, backend=backend,
                                     **KW)
        k = (lab != -100).sum(1).tolist()
        want = [_expected_k(x, p) for x in n.tolist()]
        bad = [(x, kk, w) for x, kk, w in zip(n.tolist(), k, want) if kk != w]
        assert not bad, f"p={p}: (n, got, want) {bad[:5]}"
    assert _expected_k(10) == 2 and _expected_k(50) == 8 and fmlm.exact_count(10, 0.15) == 2


def test_exact_count_matches_the_kernel_formula():
    """The kernels count floor((n * T + 2^31) / 2^32); exact_threshold's T makes that exact_count."""
    for p in (0.15, 0.1, 0.2, 0.3, 0.45, 0.55, 0.85, 0.125, 0.001, 1.0, 0.0):
        t = fmlm.exact_threshold(p)
        assert all((n * t + 2**31) >> 32 == fmlm.exact_count(n, p) for n in range(0, 70000)), p


def make_words(ids, att, seed=0):
    """word_ids: pieces of 1..4 tokens, -1 on specials and padding."""
    g = torch.Generator().manual_seed(seed)
    B, L = ids.shape
    w = torch.full((B, L), -1, dtype=torch.int64)
    for bi in range(B):
        l, word = 1, 0
        n = int(att[bi].sum())
        while l < n - 1:
            size = int(torch.randint(1, 5, (1,), generator=g))
            w[bi, l:min(l + size, n - 1)] = word
            word, l = word + 1, l + size
    return w


def test_whole_word_bernoulli_never_splits():
    ids, att = make_batch(400, 128, seed=9, min_len=64)
    w = make_words(ids, att, seed=1)
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, word_ids=w, seed=5, **KW)
    sel, _ = _check_outputs(ids, att, out, lab)
    assert not (sel & (w < 0)).any()
    nw = ns = 0
    for bi in range(ids.shape[0]):
        wb, sb = w[bi], sel[bi]
        words = wb[wb >= 0]
        if len(words) == 0:
            continue
        m = int(words.max()) + 1
        cnt = torch.bincount(words, minlength=m)
        scnt = torch.bincount(wb[sb], minlength=m)
        assert ((scnt == 0) | (scnt == cnt)).all(), f"row {bi}: a word was split"
        nw += m
        ns += int((scnt > 0).sum())
    assert abs(ns / nw - 0.15) < 0.01  # ~ 13k words


def test_whole_word_exact_counts_words():
    ids, att = make_batch(200, 128, seed=10)
    w = make_words(ids, att, seed=2)
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, word_ids=w, mode="exact", seed=6, **KW)
    sel, _ = _check_outputs(ids, att, out, lab)
    for bi in range(ids.shape[0]):
        wb = w[bi]
        nwords = len(torch.unique(wb[wb >= 0]))
        selected_words = torch.unique(wb[sel[bi]])
        assert len(selected_words) == _expected_k(nwords)
        for x in selected_words.tolist():
            assert sel[bi][wb == x].all()


def test_min_masked():
    ids, att = make_batch(500, 24, seed=11, min_len=1)
    plain = forkattn.mlm_mask(ids, attention_mask=att, mask_prob=0.02, seed=9, **KW)
    for m in (1, 3):
        out, lab = forkattn.mlm_mask(ids, attention_mask=att, mask_prob=0.02, min_masked=m, seed=9, **KW)
        _check_outputs(ids, att, out, lab)
        elig = ((att != 0) & ~torch.isin(ids, torch.tensor(SPECIALS))).sum(1)
        k = (lab != -100).sum(1)
        k_plain = (plain[1] != -100).sum(1)
        assert torch.equal(k, torch.maximum(k_plain, torch.minimum(elig, torch.tensor(m))))
        # min_masked only adds: plain's selections are kept with the same fates
        keep = plain[1] != -100
        assert torch.equal(lab[keep], plain[1][keep]) and torch.equal(out[keep], plain[0][keep])


def test_min_masked_rows_without_eligible_tokens():
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [CLS, 500, 600, SEP]])
    out, lab = forkattn.mlm_mask(ids, mask_prob=0.0, min_masked=1, seed=0, **KW)
    assert (lab[0] == -100).all() and int((lab[1] != -100).sum()) == 1


def test_labels_input_marks_ineligible():
    ids, att = make_batch(64, 64, seed=12)
    lab_in = ids.clone()
    lab_in[:, :32] = -100
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, labels=lab_in, mask_prob=0.5, seed=2, **KW)
    assert (lab[:, :32] == -100).all() and (out[:, :32] == ids[:, :32]).all()
    assert (lab[:, 32:] != -100).any()


def test_special_tokens_mask_and_random_excludes_special_false():
    ids, att = make_batch(64, 256, seed=13)
    stm = torch.zeros_like(ids, dtype=torch.bool)
    stm[:, 1::7] = True
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, special_tokens_mask=stm, mask_prob=0.5,
                                 random_excludes_special=False, seed=2, **KW)
    assert (lab[stm] == -100).all()
    rout, rlab = reference_bernoulli(ids, att, 2, p=0.5, excluded=[])
    rsel = (rlab != -100) & ~stm
    assert torch.equal(lab != -100, rsel)


# --- dtypes, strides, inplace ---------------------------------------------------------------------------------

def test_int32_matches_int64():
    ids, att = make_batch(32, 100, seed=14)
    a = forkattn.mlm_mask(ids, attention_mask=att, seed=8, mode="exact", **KW)
    b = forkattn.mlm_mask(ids.int(), attention_mask=att.int(), seed=8, mode="exact", **KW)
    assert b[0].dtype == torch.int32 and b[1].dtype == torch.int32
    assert torch.equal(a[0], b[0].long()) and torch.equal(a[1], b[1].long())


def test_strided_rows():
    ids, att = make_batch(20, 90, seed=15)
    big = torch.zeros(40, 200, dtype=ids.dtype)
    view = big[::2, 10:190:2]
    view.copy_(ids)
    assert not view.is_contiguous()
    a = forkattn.mlm_mask(ids, attention_mask=att, seed=4, **KW)
    b = forkattn.mlm_mask(view, attention_mask=att.t().contiguous().t(), seed=4, **KW)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_inplace(mode):
    ids, att = make_batch(24, 77, seed=16)
    w = make_words(ids, att)
    a = forkattn.mlm_mask(ids, attention_mask=att, word_ids=w, seed=4, mode=mode, **KW)
    x = ids.clone()
    out, lab = forkattn.mlm_mask(x, attention_mask=att, word_ids=w, seed=4, mode=mode, inplace=True, **KW)
    assert out is x
    assert torch.equal(x, a[0]) and torch.equal(lab, a[1])


# --- backends agree bit for bit ---------------------------------------------------------------------------------

CONFIGS = {
    "plain": dict(),
    "int32": dict(dtype=torch.int32),
    "exact": dict(mode="exact"),
    "words": dict(words=True),
    "words_exact": dict(words=True, mode="exact"),
    "min_masked": dict(min_masked=2, mask_prob=0.03),
    "labels_stm": dict(labels=True, stm=True, mask_prob=0.4),
    "no_exclude": dict(random_excludes_special=False, mask_prob=0.5),
    "strided": dict(strided=True, mode="exact"),
    "inplace": dict(inplace=True, words=True),
}


def _run_config(cfg, backend, device="cpu", B=37, L=129, seed=2**40 + 3):
    cfg = dict(cfg)
    dtype = cfg.pop("dtype", torch.int64)
    ids, att = make_batch(B, L, dtype=dtype, seed=21)
    kw = dict(KW, attention_mask=att.to(device), seed=seed, backend=backend)
    if cfg.pop("words", False):
        kw["word_ids"] = make_words(ids, att, seed=3).to(device)
    if cfg.pop("labels", False):
        lab_in = ids.clone().long()
        lab_in[:, ::5] = -100
        kw["labels"] = lab_in.to(device)
    if cfg.pop("stm", False):
        stm = torch.zeros(B, L, dtype=torch.bool)
        stm[:, 3::11] = True
        kw["special_tokens_mask"] = stm.to(device)
    x = ids.to(device)
    if cfg.pop("strided", False):
        big = torch.zeros(B, 2 * L, dtype=dtype, device=device)
        big[:, ::2] = x
        x = big[:, ::2]
    kw.update(cfg)
    out, lab = forkattn.mlm_mask(x, **kw)
    return out.cpu(), lab.cpu()


@needs_triton
@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_bit_identical_to_cpu(name):
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu test on CUDA tensors")
    # small batch: the interpreter runs each program in numpy (the GPU test runs B=300, L=517)
    a = _run_config(CONFIGS[name], "cpu", B=7)
    b = _run_config(CONFIGS[name], "triton", B=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gpu_bit_identical_to_cpu(backend, name):
    if backend not in fmlm.BACKENDS.available_names():
        pytest.skip(f"{backend} unavailable")
    a = _run_config(CONFIGS[name], "cpu", B=300, L=517)
    b = _run_config(CONFIGS[name], backend, device="cuda", B=300, L=517)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "eager"])
def test_gpu_statistics(backend):
    ids, att = make_batch(2400, 512, seed=3, min_len=400, device="cuda")
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, seed=7, backend=backend, **KW)
    ids, att, out, lab = ids.cpu(), att.cpu(), out.cpu(), lab.cpu()
    sel, rnd = _check_outputs(ids, att, out, lab)
    n = int(((att != 0) & ~torch.isin(ids, torch.tensor(SPECIALS))).sum())
    assert abs(int(sel.sum()) / n - 0.15) < 0.002
    assert abs(int((sel & (out == MASK)).sum()) / int(sel.sum()) - 0.8) < 0.005


# --- the custom ops ------------------------------------------------------------------------------------------

def _op_args(ids, att, backend="cpu", exact=False, min_masked=0):
    ex = sorted(set(SPECIALS))
    return (ids, None, att, None, None, SPECIALS and sorted(SPECIALS), ex, V, MASK, 12345,
            fmlm.threshold(0.15), fmlm.threshold(0.8), fmlm.threshold(0.9), V - len(ex), exact, min_masked, backend)


@pytest.mark.parametrize("exact", [False, True])
def test_opcheck(exact):
    ids, att = make_batch(8, 40, seed=17)
    torch.library.opcheck(fmlm.mlm_mask_op, _op_args(ids, att, exact=exact))
    torch.library.opcheck(fmlm.mlm_mask_inplace_op, _op_args(ids.clone(), att, exact=exact))


def test_torch_compile_fullgraph():
    ids, att = make_batch(8, 40, seed=18)
    args = _op_args(ids, att)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, a):
        return fmlm.mlm_mask_op(x, *args[1:2], a, *args[3:])

    out = f(ids, att)
    ref = fmlm.mlm_mask_op(*args)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


# --- bad inputs -------------------------------------------------------------------------------------------------

def _bad(**kw):
    ids = torch.tensor([[CLS, 500, 600, SEP]])
    base = dict(KW)
    base.update(kw)
    x = base.pop("input_ids", ids)
    return forkattn.mlm_mask(x, **base)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(mask_prob=1.5), ValueError, "mask_prob must be a probability in"),
        (dict(mask_prob=-0.1), ValueError, "mask_prob"),
        (dict(mask_replace_prob=float("nan")), ValueError, "mask_replace_prob"),
        (dict(random_replace_prob=2.0), ValueError, "random_replace_prob"),
        (dict(mask_replace_prob=0.8, random_replace_prob=0.3), ValueError, r"mask_replace_prob \+ random_replace_prob"),
        (dict(vocab_size=1000, mask_token_id=5, special_token_ids=[0, 5000]), ValueError,
         "vocab_size .* must be greater than every special token id"),
        (dict(vocab_size=0), ValueError, "vocab_size must be >= 1"),
        (dict(mask_token_id=V), ValueError, "mask_token_id must be in"),
        (dict(mask_token_id=-1), ValueError, "mask_token_id must be in"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, "input_ids must be int32 or int64"),
        (dict(input_ids=torch.tensor([1, 2, 3])), ValueError, "input_ids must be 2-D"),
        (dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
        (dict(attention_mask=torch.ones(1, 5, dtype=torch.long)), ValueError, "attention_mask must have input_ids' shape"),
        (dict(attention_mask=torch.ones(1, 4)), TypeError, "attention_mask must be bool or an integer dtype"),
        (dict(special_tokens_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "special_tokens_mask must have"),
        (dict(labels=torch.ones(1, 3, dtype=torch.long)), ValueError, "labels must have input_ids' shape"),
        (dict(labels=torch.ones(1, 4)), TypeError, "labels must be int32 or int64"),
        (dict(word_ids=torch.zeros(4, 1, dtype=torch.long)), ValueError, "word_ids must have input_ids' shape"),
        (dict(input_ids=torch.tensor([[CLS, V, 600, SEP]])), ValueError, "outside \\[0, vocab_size"),
        (dict(input_ids=torch.tensor([[CLS, -5, 600, SEP]])), ValueError, "holds id -5"),
        (dict(mode="whole"), ValueError, "mode must be"),
        (dict(min_masked=-1), ValueError, "min_masked must be >= 0"),
        (dict(seed=-1), ValueError, "seed must be in"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(special_token_ids=[1, "a"]), TypeError, "special_token_ids must hold ints"),
        (dict(special_token_ids=list(range(70))), ValueError, "at most 64"),
        (dict(generator=3), TypeError, "generator must be"),
        (dict(input_ids=torch.tensor([[CLS, 500, SEP]]).expand(3, 3), inplace=True), ValueError, "do not share memory"),
        (dict(backend="nope"), ValueError, "unknown backend"),
        (dict(backend="eager", mode="exact"), forkattn.BackendUnavailableError, "exact"),
        (dict(vocab_size=6, special_token_ids=[0, 1, 2, 3, 4, 5], mask_token_id=5, input_ids=torch.tensor([[1]])),
         ValueError, "every id in"),
    ],
)
def test_bad_inputs(kw, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**kw)


def test_padding_ids_are_not_range_checked():
    ids = torch.tensor([[CLS, 500, SEP, -7]])
    out, lab = forkattn.mlm_mask(ids, attention_mask=torch.tensor([[1, 1, 1, 0]]), seed=0, **KW)
    assert out[0, 3] == -7 and lab[0, 3] == -100


def test_public_api_under_fake_tensor_mode_uses_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ids, att = make_batch(4, 16, seed=19)
    with FakeTensorMode() as mode:
        x, a = mode.from_tensor(ids), mode.from_tensor(att)
        out, lab = forkattn.mlm_mask(x, attention_mask=a, seed=3, **KW)
        assert out.shape == ids.shape and lab.dtype == ids.dtype
        assert type(out) is not torch.Tensor  # fake outputs from register_fake, the kernel never ran


# --- meta tensors (issue 12 section 6) ---------------------------------

@pytest.mark.parametrize("inplace", [False, True])
def test_meta_input_gives_meta_outputs(inplace):
    """Eager mlm_mask on meta failed deep inside ("META device type not an accelerator" / nonzero)."""
    ids = torch.empty(3, 7, dtype=torch.int32, device="meta")
    att = torch.empty(3, 7, dtype=torch.int64, device="meta")
    out, lab = forkattn.mlm_mask(ids, attention_mask=att, inplace=inplace, **KW)
    assert out.device.type == lab.device.type == "meta"
    assert out.shape == lab.shape == (3, 7) and out.dtype == lab.dtype == torch.int32
    assert (out is ids) == inplace
    with pytest.raises(ValueError, match="input_ids must be 2-D"):
        forkattn.mlm_mask(torch.empty(7, dtype=torch.int64, device="meta"), **KW)
    with pytest.raises(forkattn.BackendUnavailableError, match="cpu"):
        forkattn.mlm_mask(ids, backend="cpu", **KW)
