"""Checks of the emulated attention kernels (attention.py) against the fp64 reference, and the
case matrix that __main__ runs.

run_case / run_varlen_case check every output and gradient against fp64 with the project's rule
(tests/attn_utils.assert_within_budget: max error <= 2 x eager-fp16's + 1e-5; where only the
final fp16 rounding of a value breaks it, + half an fp16 ulp of the largest value instead,
reported), lse against fp64 (1e-4, +inf exactly on rows that see no key), exact zeros on such
rows and on keys nobody sees, and an elementwise bound against a same-rounding model
(model_close), which catches small errors the 2x rule would hide.

dropout=(p, mask seed): the reference and the model are fed python/forkattn/philox.py's mask, and
every mask element the emulated kernels draw (forward, dq and dk/dv kernels) is recorded and
compared bit for bit with philox.py's, and must cover every visible (query, key) pair.
"""
import contextlib
import itertools
import math
import sys

import numpy as np
import torch
from attn_utils import assert_within_budget, max_err  # tests/: on sys.path under pytest and __main__
from forkattn import philox, reference

from . import attention as emu
from .attention_host import attention_bwd_cuda, attention_fwd_cuda, attention_varlen_bwd_cuda, attention_varlen_fwd_cuda
from .core import NT, TQ
from .dropout import kept

RULE2 = []  # names of checks that needed the half-ulp allowance (reported by __main__)


def within_budget(name, ours, eager, ref64, extra=1e-5):
    """The project's rule (assert_within_budget): max |ours - fp64| <= 2 * max |eager fp16 - fp64|
    + 1e-5; no NaN. The final rounding of a float16 result to float16 is unavoidable and eager may
    be lucky on it at its worst element, so where that rule alone fails the bound is 2 * eager +
    half an fp16 ulp of max |fp64| (that rounding, not doubled), and the check's name goes to
    RULE2. Returns (err, bound)."""
    same_shape = ours.shape == ref64.shape  # else assert_within_budget names the shapes
    err, base = (max_err(ours, ref64) if same_shape else 0.0), max_err(eager, ref64)
    if same_shape and err > 2 * base + extra and ref64.numel():
        top = ref64.abs().max().item()
        extra = max(extra, 2.0 ** (math.floor(math.log2(top)) - 11) if top > 0 else 0.0)
        RULE2.append(name)
    assert_within_budget(name, ours, eager, ref64, extra)
    return err, 2 * base + extra


def same_rounding_model(q, k, v, g, out, lse, allowed, scale, keep=None, dropout_p=0.0):
    """The kernels' arithmetic written as plain tensor algebra in float64, rounding to float16
    where the kernels do (P before P V and P^T dO, dS before dS K and dS^T Q, every output), and
    using the kernel's own lse and out as the backward does. Independent of the kernels' index
    math. q [B, H, Lq, D], k/v [B, Hkv, Lk, D] fp16. Returns [(value, spread)] for out, dq, dk,
    dv: value in fp16 steps (as float64), spread = the sum of the absolute contributions of the
    rounded operand (|P| |V| / l, scale |dS| |K|, scale |dS^T| |Q|, |P^T| |dO|), which bounds how
    far a different rounding of that operand can move the result (see model_close).
    keep (bool [B, H, Lq, Lk]): dropout as the kernels do it: P * keep rounded, 1 / (1 - p) applied
    with 1 / l (out) and to the summed dV; dP * keep / (1 - p) in dS."""
    H, Hkv = q.shape[1], k.shape[1]
    kd = keep.double() if keep is not None else 1.0
    rp = 1.0 / (1.0 - dropout_p)
    r16 = lambda x: x.half().double()
    q, k, v, g, out = (t.double() for t in (q, k, v, g, out))
    ke, ve = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    s = q @ ke.transpose(-2, -1) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    inv = torch.where(l > 0, 1 / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(l))
    o = (r16(r16(e * kd) @ ve * (inv * rp)), ((e * kd) @ ve.abs()) * inv * rp)
    P = torch.exp(s - lse.double()[..., None])  # lse = +inf -> 0
    delta = (g * out).sum(-1, keepdim=True)
    dS = P * ((g @ ve.transpose(-2, -1)) * kd * rp - delta)
    B, Lk, D = k.shape[0], k.shape[2], k.shape[3]
    grp = lambda x: x.view(B, Hkv, H // Hkv, Lk, D).sum(2)
    dq = (r16(scale * (r16(dS) @ ke)), scale * (dS.abs() @ ke.abs()))
    dk = (r16(scale * grp(r16(dS).transpose(-2, -1) @ q)), scale * grp(dS.abs().transpose(-2, -1) @ q.abs()))
    dv = (r16(grp(r16(P * kd).transpose(-2, -1) @ g) * rp), grp((P * kd).transpose(-2, -1) @ g.abs()) * rp)
    return o, dq, dk, dv


def model_close(name, ours, model):
    """Emulation vs the same-rounding model, elementwise:
        |ours - value| <= 2 ulp16(value) + 2^-10 * spread + 1e-5.
    The rounded operand (P, dS) is rounded on both sides from values that differ slightly (fp32 vs
    fp64; the forward rounds P relative to a running tile maximum, not the final one), so each
    contribution may differ by up to one fp16 step, 2^-10 relative: at most 2^-10 * spread in
    all. The results then round to fp16 (2 ulps: one step each side), and 1e-5 is the project
    rule's absolute term (fp32 cancellation in dP - delta where the exact result is 0). An
    indexing or masking error moves a contribution by far more than one fp16 step."""
    value, spread = model
    if ours.numel() == 0:
        return 0.0
    diff = (ours.double() - value).abs()
    ulp = torch.exp2(torch.floor(torch.log2(value.abs().clamp_min(2.0 ** -14)))) * 2.0 ** -10
    tol = 2 * ulp + 2.0 ** -10 * spread + 1e-5
    bad = diff > tol
    assert not bad.any(), (f"{name}: emulation differs from the same-rounding model by {diff[bad].max().item():.3e} "
                           f"at {bad.nonzero()[0].tolist()} (allowed {tol[bad][0].item():.3e}: an indexing or "
                           "masking error)")
    return (diff / tol).max().item()


def _lse64(q, k, allowed, scale):
    """fp64 log-sum-exp (natural log) of the visible scaled scores; +inf on rows that see nothing."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q.double(), k.double().transpose(-2, -1)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.where(torch.isinf(lse) & (lse < 0), torch.full_like(lse, float("inf")), lse)


def _check_lse(lse, ref, tol=1e-4):
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isinf(lse) & (lse > 0), ~fin), "lse must be +inf exactly on rows that see no key"
    return max_err(lse[fin], ref[fin]) if fin.any() else 0.0


def _grads(fn, inputs, g):
    outs = fn(*inputs)
    return outs, torch.autograd.grad(outs, inputs, g)


# --- dropout: the mask the emulated kernels draw ----------------------------------------------------------

KERNELS = ("attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel")


@contextlib.contextmanager
def recorded_masks(module=emu):
    """Wraps the transcription's dropout_keep_rows / dropout_keep_cols (as `module` calls them:
    attention.py's, or disentangled.py's) for the duration; yields {kernel name: [(bh, i, j, kept)
    per fragment element, each a per-thread vector]} of every mask element the kernels drew (the
    fragment coordinates as dropout.cuh lays them out)."""
    rec = {}
    real_rows, real_cols = module.dropout_keep_rows, module.dropout_keep_cols
    g = np.arange(NT) % 32 >> 2

    def note(keep, m, NJ, coords):
        kernel = sys._getframe(2).f_code.co_name
        for j in range(NJ):
            for e in range(4):
                i, c = coords(j, e)
                rec.setdefault(kernel, []).append((np.full(NT, m.bh), i, c, kept(keep, j, e)))

    def rows(m, row0, col0, NJ):
        keep = real_rows(m, row0, col0, NJ)
        note(keep, m, NJ, lambda j, e: (row0 + 8 * (e >> 1), col0 + 8 * j + 2 * TQ + (e & 1)))
        return keep

    def cols(m, kb0, m0, NJ):
        keep = real_cols(m, kb0, m0, NJ)
        note(keep, m, NJ, lambda j, e: (m0 + 8 * j + 2 * TQ + (e & 1), 8 * kb0 + g + 8 * (e >> 1)))
        return keep
    module.dropout_keep_rows, module.dropout_keep_cols = rows, cols
    try:
        yield rec
    finally:
        module.dropout_keep_rows, module.dropout_keep_cols = real_rows, real_cols


def check_masks(rec, mask_seed, dropout_p, visible, kernels=KERNELS):
    """Every recorded element equals philox.py's keep of its (bh, i, j), bit for bit, and each
    of `kernels` drew every visible (bh, i, j): visible bool [B * H, Lq, Lk] (varlen:
    sequence-major, max lengths). Returns the number of elements compared."""
    th = philox.dropout_threshold(dropout_p)
    n = 0
    for kernel in kernels:
        assert kernel in rec, f"{kernel} drew no dropout mask"
        bh, i, j, kp = (torch.from_numpy(np.concatenate([np.asarray(r[x]) for r in rec[kernel]]).astype(np.int64))
                        for x in range(4))
        words = philox.philox4x32_10(mask_seed, j >> 3, i, bh, philox.DROPOUT_STREAM)
        word = torch.stack(words)[(j & 7) >> 1, torch.arange(j.numel())]
        want = ((word >> (16 * (j & 1))) & 0xFFFF) >= th
        bad = want != kp.bool()
        assert not bad.any(), (f"{kernel}: dropout mask differs from philox.py at {int(bad.sum())} elements, "
                               f"first (bh, i, j) = {(int(bh[bad][0]), int(i[bad][0]), int(j[bad][0]))}")
        seen = torch.zeros_like(visible)
        inside = (bh < visible.shape[0]) & (i < visible.shape[1]) & (j < visible.shape[2])
        seen[bh[inside], i[inside], j[inside]] = True
        missed = visible & ~seen
        assert not missed.any(), f"{kernel} never drew the mask of visible (bh, i, j) {missed.nonzero()[0].tolist()}"
        n += bh.numel()
    return n


def run_case(B, H, Hkv, Lq, Lk, D, causal, padding=None, seed=0, verbose=True, strided=False, scale=None,
             garbage=None, dropout=None):
    """One padded-batch case through the emulated forward + backward. padding: None, "partial"
    (random prefix lengths), "full" (partial, and batch entry 0 fully padded) or "holes" (random
    keys, keys 64..127 all padded: a skipped key tile between visible ones; the mask a column
    slice of a wider one, so its batch stride is not Lk). strided: q, k, v, dout as transposes
    of [B, L, H, D] tensors (row stride H * D). garbage: a float (inf, -inf, NaN) written into
    every padded key and value, which must change nothing. dropout: (p, mask seed), see the module
    doc. Returns {name: (error, bound)}."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(heads, L):
        if strided:
            return torch.randn(B, L, heads, D, generator=gen).half().transpose(1, 2)
        return torch.randn(B, heads, L, D, generator=gen).half()
    q, k, v, g = rnd(H, Lq), rnd(Hkv, Lk), rnd(Hkv, Lk), rnd(H, Lq)
    mask = None
    if padding in ("partial", "full"):
        lengths = torch.randint(1, Lk + 1, (B,), generator=gen)
        mask = torch.arange(Lk)[None, :] < lengths[:, None]
        if padding == "full":
            mask[0] = False
    elif padding == "holes":
        wide = torch.rand(B, Lk + 8, generator=gen) < 0.7
        wide[:, 64:128] = False
        mask = wide[:, :Lk]
    scale = D ** -0.5 if scale is None else scale
    drop_p, drop_seed = dropout or (0.0, 0)
    kw = dict(causal=causal, key_padding_mask=mask, scale=scale, dropout_p=drop_p, seed=drop_seed)
    k_model, v_model = k, v  # what the kernels compute with: padded keys read as zeros
    if garbage is not None and mask is not None:
        pad = ~mask[:, None, :, None].expand_as(k)
        k_model, v_model = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
        k, v = k.masked_fill(pad, garbage), v.masked_fill(pad, garbage)

    with recorded_masks() as rec:
        out, lse = attention_fwd_cuda(q, k, v, mask, causal, scale, drop_p, drop_seed)
        dq, dk, dv = attention_bwd_cuda(g, q, k, v, out, lse, mask, causal, scale, drop_p, drop_seed)

    q16, k16, v16 = (t.clone().requires_grad_() for t in (q, k, v))
    eager, eg = _grads(lambda a, b, c: reference.attention(a, b, c, **kw), (q16, k16, v16), g)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, rg = _grads(lambda a, b, c: reference.attention(a, b, c, **kw), (q64, k64, v64), g.double())

    errs = {"out": within_budget("out", out, eager, ref)}
    for name, a, e, r in zip(("dq", "dk", "dv"), (dq, dk, dv), eg, rg):
        errs[name] = within_budget(name, a, e, r)
    allowed = reference.visible_keys(B, Lq, Lk, causal=causal, key_padding_mask=mask, device="cpu")
    errs["lse"] = (_check_lse(lse, _lse64(q, k_model, allowed, scale)), 1e-4)
    assert errs["lse"][0] <= 1e-4, f"lse: max err {errs['lse'][0]:.3e}"
    keep = philox.dropout_keep(drop_seed, drop_p, B, H, Lq, Lk) if drop_p else None
    model = same_rounding_model(q, k_model, v_model, g, out, lse, allowed, scale, keep, drop_p)
    n_mask = 0
    if drop_p:
        vis = torch.ones(B, H, Lq, Lk, dtype=torch.bool) if allowed is None else allowed.expand(B, H, Lq, Lk)
        n_mask = check_masks(rec, drop_seed, drop_p, vis.reshape(B * H, Lq, Lk))
    else:
        assert not rec, "the kernels drew a dropout mask with dropout_p = 0"
    errs["model"] = (max(model_close(n, a, m) for n, a, m in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), model)), 1.0)
    if allowed is not None:  # rows that see no key: exact zeros in out and dq
        empty = ~allowed.expand(B, 1, Lq, Lk).any(-1)[:, 0]  # [B, Lq]
        assert (out.transpose(1, 2)[empty] == 0).all() and (dq.transpose(1, 2)[empty] == 0).all()
        dead = ~allowed.expand(B, 1, Lq, Lk).any(-2)[:, 0]  # keys nobody sees: zero dk, dv
        assert (dk.transpose(1, 2)[dead] == 0).all() and (dv.transpose(1, 2)[dead] == 0).all()
    if verbose:
        print(f"B{B} H{H}/{Hkv} Lq{Lq} Lk{Lk} D{D} causal={int(causal)} pad={padding} strided={int(strided)} "
              f"dropout={drop_p}: " + " ".join(f"{n} {e:.1e}/{b:.1e}" for n, (e, b) in errs.items())
              + (f" mask: {n_mask} elements bit-identical" if drop_p else ""), flush=True)
    return errs


def run_varlen_case(seqlens_q, seqlens_k, H, Hkv, D, causal, seed=0, verbose=True, max_pad=0, dropout=None):
    """Packed sequences (one may be empty) through the emulated varlen forward + backward.
    max_pad > 0 passes max_seqlen larger than the longest sequence (grid bigger than needed).
    dropout: (p, mask seed) as in run_case; (b, i, j) counted inside each sequence."""
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(seqlens_q), sum(seqlens_k)
    q = torch.randn(tq, H, D, generator=gen).half()
    k = torch.randn(tk, Hkv, D, generator=gen).half()
    v = torch.randn(tk, Hkv, D, generator=gen).half()
    g = torch.randn(tq, H, D, generator=gen).half()
    cu_q = torch.tensor([0] + list(itertools.accumulate(seqlens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(seqlens_k)), dtype=torch.int32)
    max_q, max_k = max(seqlens_q) + max_pad, max(seqlens_k) + max_pad
    scale = D ** -0.5
    drop_p, drop_seed = dropout or (0.0, 0)

    with recorded_masks() as rec:
        out, lse = attention_varlen_fwd_cuda(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, drop_p, drop_seed)
        dq, dk, dv = attention_varlen_bwd_cuda(g, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale,
                                               drop_p, drop_seed)

    def packed_ref(a, b, c):
        outs = []
        for i in range(len(seqlens_q)):
            sq, sk = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            qi, ki, vi = (t[s].transpose(0, 1)[None] for t, s in ((a, sq), (b, sk), (c, sk)))
            if qi.shape[2] == 0:
                continue
            if ki.shape[2] == 0:  # no key at all: zeros (what the reference gives for no visible key)
                outs.append(qi[0].transpose(0, 1) * 0)
                continue
            o = reference.attention(qi, ki, vi, causal=causal, scale=scale, dropout_p=drop_p, seed=drop_seed,
                                    _batch_index=i)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs) if outs else a * 0

    q16, k16, v16 = (t.clone().requires_grad_() for t in (q, k, v))
    eager, eg = _grads(packed_ref, (q16, k16, v16), g)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, rg = _grads(packed_ref, (q64, k64, v64), g.double())
    errs = {"out": within_budget("out", out, eager, ref)}
    for name, a, e, r in zip(("dq", "dk", "dv"), (dq, dk, dv), eg, rg):
        errs[name] = within_budget(name, a, e, r)
    lse_ref = torch.full((H, tq), float("inf"), dtype=torch.float64)
    for i in range(len(seqlens_q)):
        a0, a1, b0, b1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if a1 > a0 and b1 > b0:
            allowed = reference.visible_keys(1, a1 - a0, b1 - b0, causal=causal, key_padding_mask=None, device="cpu")
            qi, ki = q[a0:a1].transpose(0, 1)[None], k[b0:b1].transpose(0, 1)[None]
            lse_ref[:, a0:a1] = _lse64(qi, ki, allowed, scale)[0]
    errs["lse"] = (_check_lse(lse, lse_ref), 1e-4)
    assert errs["lse"][0] <= 1e-4, f"lse: max err {errs['lse'][0]:.3e}"
    worst = 0.0
    vis = torch.zeros(len(seqlens_q), H, max(seqlens_q), max(seqlens_k), dtype=torch.bool)
    for i in range(len(seqlens_q)):
        sq, sk = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        bh = lambda t, sl: t[sl].transpose(0, 1)[None]
        if sq.stop == sq.start or sk.stop == sk.start:  # no (query, key) pair: zero gradients / outputs
            for name, t, sl in (("out", out, sq), ("dq", dq, sq), ("dk", dk, sk), ("dv", dv, sk)):
                assert (t[sl] == 0).all(), f"{name} of sequence {i} must be zero"
            continue
        lq, lk = sq.stop - sq.start, sk.stop - sk.start
        allowed = reference.visible_keys(1, lq, lk, causal=causal, key_padding_mask=None, device="cpu")
        vis[i, :, :lq, :lk] = True if allowed is None else allowed[0]
        keep = philox.dropout_keep(drop_seed, drop_p, 1, H, lq, lk, batch_index=i) if drop_p else None
        model = same_rounding_model(bh(q, sq), bh(k, sk), bh(v, sk), bh(g, sq), bh(out, sq), lse[:, sq][None],
                                    allowed, scale, keep, drop_p)
        for name, t, sl, m in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (sq, sq, sk, sk), model):
            worst = max(worst, model_close(f"{name} (sequence {i})", bh(t, sl), m))
    errs["model"] = (worst, 1.0)
    n_mask = check_masks(rec, drop_seed, drop_p, vis.reshape(-1, *vis.shape[2:])) if drop_p else 0
    assert drop_p or not rec, "the kernels drew a dropout mask with dropout_p = 0"
    if verbose:
        print(f"varlen q{list(seqlens_q)} k{list(seqlens_k)} H{H}/{Hkv} D{D} causal={int(causal)} max+{max_pad} "
              f"dropout={drop_p}: " + " ".join(f"{n} {e:.1e}/{b:.1e}" for n, (e, b) in errs.items())
              + (f" mask: {n_mask} elements bit-identical" if drop_p else ""), flush=True)
    return errs


def run_mask_probe(B, H, Lq, Lk, D, causal, dropout_p, mask_seed, padding=False):
    """The mask end to end, through the emulated kernels' outputs, against the eager backend
    (forkattn.attention(..., backend="eager")) and philox.py. q = 0 makes P uniform over the visible
    keys; V = I (Lk <= D) makes out[i, j] = P_ij keep_ij / (1 - p), and dO = I (Lq <= D) makes
    dV[j, i] = the same: a visible element is nonzero iff kept. Returns the number compared."""
    import forkattn
    assert Lk <= D and Lq <= D
    q = torch.zeros(B, H, Lq, D, dtype=torch.float16)
    eye = lambda n: torch.eye(n, D, dtype=torch.float16).expand(B, H, n, D).contiguous()
    v, g = eye(Lk), eye(Lq)
    k = torch.randn(B, H, Lk, D, generator=torch.Generator().manual_seed(1)).half()
    mask = None
    if padding:
        mask = torch.arange(Lk)[None, :] < torch.randint(1, Lk + 1, (B,), generator=torch.Generator().manual_seed(2))[:, None]
    out, lse = attention_fwd_cuda(q, k, v, mask, causal, 1.0, dropout_p, mask_seed)
    _, _, dv = attention_bwd_cuda(g, q, k, v, out, lse, mask, causal, 1.0, dropout_p, mask_seed)
    eager = forkattn.attention(q.float(), k.float(), v.float(), causal=causal, key_padding_mask=mask, scale=1.0,
                               dropout_p=dropout_p, seed=mask_seed, backend="eager")
    allowed = reference.visible_keys(B, Lq, Lk, causal=causal, key_padding_mask=mask, device="cpu")
    vis = torch.ones(B, H, Lq, Lk, dtype=torch.bool) if allowed is None else allowed.expand(B, H, Lq, Lk)
    want = philox.dropout_keep(mask_seed, dropout_p, B, H, Lq, Lk)
    for name, got in (("out", out[..., :Lk]), ("eager out", eager[..., :Lk]), ("dv", dv[..., :Lq].transpose(-2, -1))):
        bad = vis & ((got != 0) != want)
        assert not bad.any(), f"{name}: the dropout mask differs from philox.py at {bad.nonzero()[0].tolist()}"
    return int(vis.sum())


def full_matrix():
    """(name, callable) for every case of the full run."""
    cases = []
    lens = (1, 7, 65, 97, 129)
    for D in (32, 64, 128):
        for Lq, Lk in itertools.product(lens, lens):
            for causal in (False, True):
                cases.append(((1, 2, 2, Lq, Lk, D, causal), {}))
        for causal in (False, True):
            cases.append(((3, 2, 2, 97, 129, D, causal), {"padding": "full"}))
            cases.append(((2, 2, 1, 65, 7, D, causal), {"padding": "partial"}))
            cases.append(((1, 4, 2, 129, 97, D, causal), {}))
            cases.append(((2, 4, 1, 7, 129, D, causal), {"padding": "full"}))
            cases.append(((2, 2, 1, 130, 200, D, causal), {"padding": "holes", "strided": True, "scale": 0.3}))
            cases.append(((1, 2, 2, 128, 64, D, causal), {"strided": True}))
    out = [(lambda a=a, kw=kw: run_case(*a, **kw)) for a, kw in cases]
    for D in (32, 64, 128):
        for causal in (False, True):
            out.append(lambda D=D, c=causal: run_varlen_case([65, 0, 7, 130], [70, 3, 0, 129], 4, 2, D, c))
            out.append(lambda D=D, c=causal: run_varlen_case([1, 97, 33], [129, 5, 33], 2, 1, D, c, max_pad=70))
    out += dropout_matrix()
    return out


def dropout_matrix():
    """Dropout cases of the full run: every head dim (the dq/dk-dv tile widths differ at 128), odd
    sizes, Lq != Lk, padding, GQA, causal, varlen, a negative seed and a large p."""
    out = []
    for D in (32, 64, 128):
        for causal in (False, True):
            out.append(lambda D=D, c=causal: run_case(2, 4, 2, 97, 129, D, c, padding="full", dropout=(0.1, 2024 + D)))
            out.append(lambda D=D, c=causal: run_case(1, 2, 1, 130, 65, D, c, padding="holes", dropout=(0.5, -3)))
            out.append(lambda D=D, c=causal: run_varlen_case([65, 0, 7, 130], [70, 3, 0, 129], 4, 2, D, c,
                                                            dropout=(0.3, 2 ** 63 - 25)))
    out.append(lambda: run_case(1, 2, 2, 1, 70, 32, False, dropout=(0.9, 5)))
    return out
