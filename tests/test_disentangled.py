"""forkattn.disentangled_attention (DeBERTa): the relative-position table against transformers, every
runnable backend against float64 under the 2x rule (outputs and the gradients into q, k, v,
pos_key, pos_query), padding with an empty row and NaN in padded keys, transformers'
DisentangledSelfAttention on random weights, the custom-op path, and argument checks."""
import contextlib

import pytest
import torch

import forkattn
from forkattn import reference
from forkattn._layout import empty_bhld
from forkattn.backends import FwdBwd, family
from forkattn.backends.families import DisentangledAttentionBackend
from attn_utils import assert_within_budget, make_padding

FAMILY = family("disentangled_attention")
TERMS = {"c2p+p2c": (True, True), "c2p": (True, False), "p2c": (False, True)}


def _delta(table, Lq, Lk):
    return table[torch.arange(Lq)[:, None] - torch.arange(Lk)[None, :] + (Lk - 1)]


def _scores(q, k, pk, pq, delta, mask, scale, c2p, p2c):
    """float32 masked scores [B, H, Lq, Lk] (-inf at padded keys), from k with padded keys zeroed."""
    s = q @ k.transpose(-2, -1)
    if c2p:
        s = s + (q @ pk.transpose(-2, -1)).gather(-1, delta.expand(*s.shape))
    if p2c:
        s = s + (k @ pq.transpose(-2, -1)).gather(-1, delta.t().expand(*s.shape[:2], *delta.t().shape)).transpose(-2, -1)
    s = s * scale
    return s if mask is None else s.masked_fill(~mask[:, None, None, :], float("-inf"))


class _ReferenceKernel(DisentangledAttentionBackend):
    """A test double of a kernel backend, in float32 behind the custom ops, written as a fused kernel
    will work: the forward stores lse, the backward recomputes P = exp(s - lse) and forms the
    gradients by hand (dS = P (dP - rowsum(dO O)); dq, dk from dS against k, q and the gathered
    pos rows; dpos_key[r] = Σ_{δ(i,j)=r} dS_ij q_i, dpos_query[r] = Σ_{δ(i,j)=r} dS_ij k_j). It
    exercises the custom-op path (fake, autograd, pos gradients) and is the spec for the kernels."""

    NAME = "test_custom_op"

    def make_impl(self):
        def prep(q, k, v, pk, pq, table, mask):
            q, k, v = q.float(), k.float(), v.float()
            if mask is not None:  # padded keys may hold NaN: they must not reach anything
                k, v = (t.masked_fill(~mask[:, None, :, None], 0) for t in (k, v))
            pk, pq = (None if p is None else p.float().expand(q.shape[1], -1, -1) for p in (pk, pq))
            return q, k, v, pk, pq, _delta(table, q.shape[2], k.shape[2])

        def fwd(q, k, v, pk, pq, table, mask, scale, c2p, p2c):
            q32, k32, v32, pk32, pq32, delta = prep(q, k, v, pk, pq, table, mask)
            s = _scores(q32, k32, pk32, pq32, delta, mask, scale, c2p, p2c)
            lse = torch.logsumexp(s, -1)
            lse = torch.where(torch.isneginf(lse), float("inf"), lse)  # empty rows: P = exp(s - inf) = 0
            B, H, Lq, D = q.shape
            return empty_bhld(q, B, H, Lq, D).copy_(torch.exp(s - lse[..., None]) @ v32), lse

        def bwd(dout, q, k, v, pk, pq, out, lse, table, mask, scale, c2p, p2c):
            q32, k32, v32, pk32, pq32, delta = prep(q, k, v, pk, pq, table, mask)
            do = dout.float()
            p = torch.exp(_scores(q32, k32, pk32, pq32, delta, mask, scale, c2p, p2c) - lse[..., None])
            # Delta from O recomputed in float32 (as the cpu attention backend does): the stored
            # bf16/fp16 out would add its rounding (attn_utils.delta_rounding_allowance)
            ds = p * (do @ v32.transpose(-2, -1) - (do * (p @ v32)).sum(-1, keepdim=True)) * scale
            dq, dk, dv = ds @ k32, ds.transpose(-2, -1) @ q32, p.transpose(-2, -1) @ do
            dpk = dpq = q.new_empty(0)
            if c2p:  # dS summed into the rows each (i, j) read: [B, H, Lq, 2 span]
                dc = torch.zeros(*ds.shape[:3], pk.shape[1]).scatter_add_(-1, delta.expand(*ds.shape), ds)
                dq = dq + dc @ pk32
                dpk = torch.einsum("bhir,bhid->hrd", dc, q32)
            if p2c:
                dts = ds.transpose(-2, -1)
                dp = torch.zeros(*dts.shape[:3], pq.shape[1]).scatter_add_(-1, delta.t().expand(*dts.shape), dts)
                dk = dk + dp @ pq32
                dpq = torch.einsum("bhjr,bhjd->hrd", dp, k32)
            B, H, Lq, D = q.shape
            Lk = k.shape[2]
            dq, dk, dv = (empty_bhld(t, B, H, L, D).copy_(x) for t, L, x in ((q, Lq, dq), (k, Lk, dk), (v, Lk, dv)))
            dpk, dpq = (g if p is None else g.to(p.dtype).contiguous() for p, g in ((pk, dpk), (pq, dpq)))
            return dq, dk, dv, dpk, dpq
        return FwdBwd(fwd, bwd)


@contextlib.contextmanager
def registered(backend):
    """backend in the disentangled registry for the block (its NAME is yielded), removed after."""
    FAMILY.add(backend)
    try:
        yield backend.NAME
    finally:
        del FAMILY.backends[backend.NAME]
        FAMILY.clear_cache()


@pytest.fixture(scope="module")
def custom_op_backend():
    with registered(_ReferenceKernel()) as name:
        yield name


D = 32  # the kernels' smallest instantiated head_dim (32, 64, 128): what a fused backend runs


def _backends():
    """Every backend that can run these tests' calls here, and the custom-op test double; not one
    that runs CPU tensors only in an interpreter (Triton: tests/test_disentangled_triton.py has a
    matrix sized for its interpreter)."""
    return [n for n in FAMILY.runnable("cpu", torch.float32, D)
            if "cpu" not in FAMILY.backends[n].INTERPRETED_ON] + ["test_custom_op"]


def _inputs(B, H, Lq, Lk, D, span, dtype, pos_heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos_heads = pos_heads or H
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype) for L in (Lq, Lk, Lk))
    pk, pq = (torch.randn(pos_heads, 2 * span, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v, pk, pq


def _check(backend, q, k, v, pk, pq, **kw):
    """The 2x rule for out and the gradients into every input that takes part."""
    c2p, p2c = kw.get("c2p", True), kw.get("p2c", True)
    pk, pq = (pk if c2p else None), (pq if p2c else None)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, v, pk, pq)]
    base = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, v, pk, pq)]
    ref = [None if t is None else t.detach().double().requires_grad_() for t in (q, k, v, pk, pq)]
    out = forkattn.disentangled_attention(*leaves, backend=backend, **kw)
    eager = reference.disentangled_attention(*base, **kw)
    out64 = reference.disentangled_attention(*ref, **kw)
    assert_within_budget("out", out, eager, out64)
    g = torch.randn_like(out64)
    names = ["dq", "dk", "dv", "dpos_key", "dpos_query"]
    used = [i for i, t in enumerate(leaves) if t is not None]
    ours = torch.autograd.grad(out, [leaves[i] for i in used], g.to(out.dtype))
    theirs = torch.autograd.grad(eager, [base[i] for i in used], g.to(out.dtype))
    truth = torch.autograd.grad(out64, [ref[i] for i in used], g)
    for i, a, b, r in zip(used, ours, theirs, truth):
        assert_within_budget(names[i], a, b, r)
    return out, dict(zip([names[i] for i in used], ours))


# --- the relative-position table ------------------------------------------------------------------------

@pytest.mark.parametrize("Lq,Lk,buckets,max_rel", [(600, 600, 256, 512), (50, 50, 8, 32), (20, 20, -1, 8),
                                                   (9, 9, -1, 512), (300, 300, 64, 128)])
def test_index_table_matches_transformers(Lq, Lk, buckets, max_rel):
    m = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
    span = buckets if buckets > 0 else max_rel
    theirs = m.build_relative_position(torch.empty(Lq, 1), torch.empty(Lk, 1), bucket_size=buckets,
                                       max_position=max_rel)[0]
    theirs = (theirs + span).clamp(0, 2 * span - 1)
    table = forkattn.disentangled.relative_position_index(Lq, Lk, max_relative_positions=max_rel,
                                                          position_buckets=buckets)
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    assert torch.equal(table[i - j + Lk - 1], theirs)


# --- against float64 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L", [1, 7, 97, 129])
@pytest.mark.parametrize("terms", list(TERMS))
def test_against_float64(backend, dtype, L, terms, custom_op_backend):
    c2p, p2c = TERMS[terms]
    buckets = 16 if L > 7 else -1  # log buckets beyond |i - j| >= 8
    q, k, v, pk, pq = _inputs(2, 3, L, L, D, 16 if buckets > 0 else 8, dtype, seed=L)
    _check(backend, q, k, v, pk, pq, max_relative_positions=40 if buckets > 0 else 8, position_buckets=buckets,
           c2p=c2p, p2c=p2c)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padding_empty_row_and_nan_in_padded_keys(backend, dtype, custom_op_backend):
    B, H, L, span = 4, 2, 37, 8
    q, k, v, pk, pq = _inputs(B, H, L, L, D, span, dtype, seed=3)
    mask = make_padding(B, L, fully_padded=(1,), generator=torch.Generator().manual_seed(0))
    mask[0, :3] = False  # a hole before the first valid key
    pad = ~mask[:, None, :, None]
    k, v = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan"))
    clean_k, clean_v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    kw = dict(max_relative_positions=span, key_padding_mask=mask)
    out, grads = _check(backend, q, k, v, pk, pq, **kw)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "the empty row must give zeros"
    assert not grads["dq"][1].any(), "the empty row must get zero gradients"
    assert not grads["dk"].masked_select(pad).any() and not grads["dv"].masked_select(pad).any()
    clean = forkattn.disentangled_attention(q, clean_k, clean_v, pk, pq, backend=backend, **kw)
    assert torch.equal(out, clean), "what a padded key holds must not change any output"


@pytest.mark.parametrize("backend", _backends())
def test_shared_pos_heads_and_cross_lengths(backend, custom_op_backend):
    """pos_key / pos_query with one head shared by all; Lq != Lk (the table covers i - j both ways)."""
    q, k, v, pk, pq = _inputs(2, 3, 5, 11, D, 6, torch.float32, pos_heads=1, seed=5)
    _check(backend, q, k, v, pk, pq, max_relative_positions=6)
    q, k, v, pk, pq = _inputs(1, 2, 13, 4, D, 16, torch.float32, seed=6)
    _check(backend, q, k, v, pk, pq, max_relative_positions=32, position_buckets=16, scale=0.3)


@pytest.mark.parametrize("Lq,Lk,B", [(0, 0, 2), (3, 0, 2), (0, 4, 2), (3, 3, 0)])
def test_empty_shapes(Lq, Lk, B):
    """No key: zeros; nothing to compute: an empty output; the backward runs either way."""
    q, k, v, pk, pq = _inputs(max(B, 1), 2, Lq, Lk, 8, 4, torch.float32)
    q, k, v = (t[:B].requires_grad_() for t in (q, k, v))
    out = forkattn.disentangled_attention(q, k, v, pk.requires_grad_(), pq, max_relative_positions=4)
    assert out.shape == (B, 2, Lq, 8) and not out.any()
    out.sum().backward()
    assert not q.grad.any() and not pk.grad.any()


def test_no_relative_terms_is_plain_attention():
    q, k, v, _, _ = _inputs(2, 2, 9, 9, 8, 4, torch.float32)
    ours = forkattn.disentangled_attention(q, k, v, None, None, max_relative_positions=4, c2p=False, p2c=False)
    torch.testing.assert_close(ours, reference.attention(q, k, v))


def test_torch_compile_fullgraph():
    q, k, v, pk, pq = _inputs(2, 2, 9, 9, 8, 4, torch.float32)
    mask = make_padding(2, 9, fully_padded=(1,), generator=torch.Generator().manual_seed(2))
    kw = dict(max_relative_positions=16, position_buckets=4, key_padding_mask=mask)
    compiled = torch.compile(lambda *a: forkattn.disentangled_attention(*a, **kw), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, pk, pq), forkattn.disentangled_attention(q, k, v, pk, pq, **kw))


def test_custom_op_opcheck(custom_op_backend):
    q, k, v, pk, pq = _inputs(2, 2, 7, 7, 8, 4, torch.float32)
    table = forkattn.disentangled.relative_position_index(7, 7, max_relative_positions=4)
    mask = make_padding(2, 7, generator=torch.Generator().manual_seed(1))
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), pk.requires_grad_(), pq, table, mask,
            0.2, True, False, custom_op_backend)
    torch.library.opcheck(torch.ops.forkattn.disentangled_attention_fwd.default, (*args[:4], None, *args[5:]))


# --- against transformers' DisentangledSelfAttention ------------------------------------------------

CONFIGS = {
    "v3": dict(position_buckets=16, max_relative_positions=64, share_att_key=True, pos_att_type=["p2c", "c2p"]),
    "v2-no-buckets": dict(max_relative_positions=12, share_att_key=False, pos_att_type=["p2c", "c2p"]),
    "c2p-own-proj": dict(position_buckets=8, max_relative_positions=32, share_att_key=False, pos_att_type=["c2p"]),
    "p2c-shared": dict(max_relative_positions=-1, share_att_key=True, pos_att_type=["p2c"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers_attention(name):
    m = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
    from transformers import DebertaV2Config
    cfg = DebertaV2Config(hidden_size=32, num_attention_heads=4, max_position_embeddings=40, relative_attention=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **CONFIGS[name])
    att = m.DisentangledSelfAttention(cfg).eval()
    for p in att.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, L, H, D = 3, 23, 4, 8
    x = torch.randn(B, L, 32)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 17:] = 0
    mask[2, 5:] = 0
    rel = torch.randn(2 * att.pos_ebd_size, 32)
    ext = mask[:, None, None, :] * mask[:, None, :, None]
    rel_pos = m.build_relative_position(x, x, bucket_size=att.position_buckets, max_position=att.max_relative_positions)
    with torch.no_grad():
        theirs = att(x, ext, relative_pos=rel_pos, rel_embeddings=rel)[0]

        def heads(t):
            return t.view(*t.shape[:-1], H, D).transpose(-3, -2)
        q, k, v = heads(att.query_proj(x)), heads(att.key_proj(x)), heads(att.value_proj(x))
        c2p, p2c = "c2p" in att.pos_att_type, "p2c" in att.pos_att_type
        pk = heads(att.key_proj(rel) if att.share_att_key else att.pos_key_proj(rel)) if c2p else None
        pq = heads(att.query_proj(rel) if att.share_att_key else att.pos_query_proj(rel)) if p2c else None
        ours = forkattn.disentangled_attention(q, k, v, pk, pq, max_relative_positions=att.max_relative_positions,
                                               position_buckets=att.position_buckets, key_padding_mask=mask,
                                               c2p=c2p, p2c=p2c)
    ours = ours.transpose(1, 2).reshape(B, L, H * D)
    valid = mask.bool()  # transformers masks padded query rows as well: compare the real tokens
    torch.testing.assert_close(ours[valid], theirs[valid], rtol=1e-5, atol=1e-5)


# --- argument checks ----------------------------------------------------------------------------------

def _bad(**change):
    q, k, v, pk, pq = _inputs(2, 2, 5, 5, 8, 4, torch.float32)
    args = dict(q=q, k=k, v=v, pos_key=pk, pos_query=pq, max_relative_positions=4)
    args.update(change)
    return args


BAD = [
    (dict(q=torch.randn(2, 5, 8)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(2, 2, 5, 8, dtype=torch.float64)), TypeError, "k must be float32"),
    (dict(v=torch.randn(2, 2, 6, 8)), ValueError, "k and v must have the same shape"),
    (dict(k=torch.randn(2, 1, 5, 8), v=torch.randn(2, 1, 5, 8)), ValueError, "k and v must have q's batch, heads"),
    (dict(pos_key=torch.randn(2, 7, 8)), ValueError, "pos_key must have 2 \\* span = 8 rows"),
    (dict(pos_query=torch.randn(3, 8, 8)), ValueError, "pos_query must be \\[heads or 1"),
    (dict(pos_key=torch.randn(2, 8, 8).half()), TypeError, "pos_key must have q's dtype"),
    (dict(pos_key=torch.randn(2, 8, 8), c2p=False), ValueError, "pos_key must be None when c2p=False"),
    (dict(pos_query=None), TypeError, "pos_query must be a torch.Tensor"),
    (dict(pos_key=torch.randn(2, 8, 8, device="meta")), ValueError, "pos_key must be on q's device"),
    (dict(max_relative_positions=0), ValueError, "max_relative_positions must be at least 1"),
    (dict(max_relative_positions=4.0), TypeError, "max_relative_positions must be an int"),
    (dict(position_buckets=1), ValueError, "position_buckets must be <= 0"),
    (dict(position_buckets=True), TypeError, "position_buckets must be an int"),
    (dict(position_buckets=4, max_relative_positions=3), ValueError, "max_relative_positions must exceed"),
    (dict(pos_key=torch.randn(2, 8, 8), position_buckets=8, max_relative_positions=64), ValueError,
     "pos_key must have 2 \\* span = 16 rows"),
    (dict(c2p=1), TypeError, "c2p must be a bool"),
    (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments_name_the_argument(change, exc, match):
    args = _bad(**change)
    with pytest.raises(exc, match=match):
        forkattn.disentangled_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("pos_key"),
                                        args.pop("pos_query"), **args)


def test_default_scale_counts_the_terms():
    q, k, v, pk, pq = _inputs(1, 2, 6, 6, 8, 4, torch.float32)
    for c2p, p2c in TERMS.values():
        kw = dict(max_relative_positions=4, c2p=c2p, p2c=p2c)
        a = forkattn.disentangled_attention(q, k, v, pk if c2p else None, pq if p2c else None, **kw)
        b = forkattn.disentangled_attention(q, k, v, pk if c2p else None, pq if p2c else None,
                                            scale=(8 * (1 + c2p + p2c)) ** -0.5, **kw)
        assert torch.equal(a, b)
