"""Checks of the emulated disentangled-attention forward (disentangled.py) against the fp64
reference (forkattn.reference.disentangled_attention_indexed) with the project's 2x rule
(attention_checks.within_budget: max error <= 2 x eager-fp16's + 1e-5, or + half an fp16 ulp where
only the final rounding breaks it), lse against fp64 (1e-4 relative, +inf exactly on rows that see
no key), exact zeros on such rows; and the case matrix __main__ runs.

dropout=(p, mask seed): the emulated kernels draw attention/dropout.cuh's mask; the fp64 reference
and eager fp16 get python/forkattn/philox.py's mask for the same seed (the mask every backend
draws), and every mask element the forward, dq and dk/dv kernels draw is compared bit for bit
with philox.py's and must cover every visible (query, key) pair."""
import torch

from forkattn import philox, reference

from . import disentangled as emu
from .attention_checks import check_masks, recorded_masks, within_budget
from .disentangled import disentangled_attention_fwd_cuda

FWD_KERNEL = ("disentangled_fwd_kernel",)
KERNELS = FWD_KERNEL + ("disentangled_bwd_dq_kernel", "disentangled_bwd_dkdv_kernel")

# (B, H, Lq, Lk, D, c2p, p2c, position_buckets, max_relative_positions, padded, shared_pos)
QUICK = [
    (2, 1, 7, 97, 32, True, True, 8, 20, True, False),     # buckets, padding with an empty row, NaN keys
    (1, 2, 97, 7, 64, True, False, -1, 5, False, True),    # plain positions clamped at +-5, shared pos rows
    (1, 1, 1, 70, 32, False, True, -1, 64, True, False),   # one query, p2c only, two key tiles
]
# The backward at head_dim 32 and 128 (the dk/dv kernel's query split differs per head_dim: 1 piece
# at 32, 4 at 128): odd lengths 1 / 7 / 97 / 129, Lq != Lk, padding with NaN keys and an empty batch
# entry, each term subset, buckets on and off.
BWD_QUICK = [
    (2, 1, 7, 97, 32, True, True, 8, 20, True, False),      # both terms, buckets, empty entry, NaN keys
    (1, 1, 1, 70, 128, False, True, -1, 64, True, False),   # one query, p2c only, two key tiles
    (2, 1, 129, 7, 128, True, False, 16, 64, True, False),  # c2p only, buckets, empty entry
]
BWD_FULL = BWD_QUICK + [
    (1, 2, 97, 129, 32, False, True, -1, 5, False, True),   # p2c, plain positions clamped, shared pos rows
    (1, 1, 129, 97, 128, True, True, -1, 8, True, False),   # both terms, clamped, padded
    (1, 1, 7, 1, 32, True, True, 4, 6, False, False),       # one key
]
FULL = QUICK + [
    (1, 1, 129, 65, 32, True, True, 16, 64, True, False),
    (2, 2, 65, 130, 64, True, True, 256, 512, True, False),  # DeBERTa-v3's buckets
    (1, 1, 33, 33, 128, True, True, -1, 8, False, False),
    (1, 1, 33, 40, 32, False, False, -1, 8, True, False),  # plain attention through this kernel
]


def make_case(B, H, Lq, Lk, D, c2p, p2c, buckets, max_rel, padded, shared_pos, seed=0):
    g = torch.Generator().manual_seed(seed)
    span = reference.relative_span(buckets, max_rel)
    q, k, v = (torch.randn(B, H, L, D, generator=g).half() for L in (Lq, Lk, Lk))
    npos = 1 if shared_pos else H
    pk = torch.randn(npos, 2 * span, D, generator=g).half() if c2p else None
    pq = torch.randn(npos, 2 * span, D, generator=g).half() if p2c else None
    table = reference.relative_position_index(Lq, Lk, max_relative_positions=max_rel, position_buckets=buckets)
    mask = None
    if padded:
        mask = torch.rand(B, Lk, generator=g) > 0.3
        mask[-1] = False  # an empty row: the last batch entry sees no key
        if B == 1:
            mask[0, :2] = True
        k[~mask[:, None, :, None].expand_as(k)] = float("nan")  # garbage in padded keys
        v[~mask[:, None, :, None].expand_as(v)] = float("nan")
    scale = (D * (1 + int(c2p) + int(p2c))) ** -0.5
    return q, k, v, pk, pq, table, mask, scale


def _dropout(case, dropout):
    """(dropout_p, seed, keep or None, reference keyword arguments) of dropout=(p, mask seed)."""
    B, H, Lq, Lk = case[0], case[1], case[2], case[3]
    drop_p, drop_seed = dropout or (0.0, 0)
    keep = philox.dropout_keep(drop_seed, drop_p, B, H, Lq, Lk) if drop_p else None
    return drop_p, drop_seed, keep, dict(dropout_p=drop_p, dropout_mask=keep)


def _check_drawn(rec, case, mask, drop_p, drop_seed, kernels):
    """The masks the kernels drew: philox.py's bit for bit, every visible (b, h, i, j) covered; none
    at all with dropout_p = 0. Returns the number of elements compared."""
    if not drop_p:
        assert not rec, "the kernels drew a dropout mask with dropout_p = 0"
        return 0
    B, H, Lq, Lk = case[0], case[1], case[2], case[3]
    vis = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if mask is not None:
        vis &= mask[:, None, None, :]
    return check_masks(rec, drop_seed, drop_p, vis.reshape(B * H, Lq, Lk), kernels)


def run_case(case, seed=0, dropout=None):
    B, H, Lq, Lk, D, c2p, p2c, buckets, max_rel, padded, shared_pos = case
    q, k, v, pk, pq, table, mask, scale = make_case(*case, seed=seed)
    drop_p, drop_seed, keep, dkw = _dropout(case, dropout)
    with recorded_masks(emu) as rec:
        out, lse = disentangled_attention_fwd_cuda(q, k, v, pk, pq, table, mask, scale, c2p, p2c, drop_p, drop_seed)
    _check_drawn(rec, case, mask, drop_p, drop_seed, FWD_KERNEL)
    assert not out.isnan().any(), "NaN in the output"
    eager = reference.disentangled_attention_indexed(q, k, v, pk, pq, table, mask, scale, c2p, p2c, **dkw)
    d = [None if t is None else t.double() for t in (q, k, v, pk, pq)]
    ref = reference.disentangled_attention_indexed(*d, table, mask, scale, c2p, p2c, **dkw)
    empty = torch.zeros(B, Lq, dtype=torch.bool) if mask is None else ~mask.any(1)[:, None].expand(B, Lq)
    empty = empty[:, None, :].expand(B, H, Lq)
    assert (out[empty] == 0).all(), "a row that sees no key must give zeros"
    assert torch.isinf(lse[empty]).all() and (lse[empty] > 0).all(), "lse must be +inf on empty rows"
    live = ~empty
    ref_e, eager_e = ref.clone(), eager.clone()  # the eager path gives empty rows the mean of v (NaN here)
    ref_e[empty], eager_e[empty] = 0, 0
    err, bound = within_budget(f"out {case}", out, eager_e, ref_e)
    # lse from fp64 scores
    s = _scores64(d, table, mask, scale, c2p, p2c)
    lse64 = torch.logsumexp(s, -1)
    assert torch.allclose(lse[live].double(), lse64[live], rtol=1e-4, atol=1e-4), "lse off"
    return err, bound


def _scores64(d, table, mask, scale, c2p, p2c):
    q, k, v, pk, pq = d
    Lq, Lk = q.shape[2], k.shape[2]
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    delta = table[i - j + Lk - 1]
    kz = torch.nan_to_num(k, nan=0.0)
    s = q @ kz.transpose(-1, -2)
    if c2p:
        s = s + (q[..., None, :] * pk.expand(q.shape[1], -1, -1)[None, :, delta]).sum(-1)
    if p2c:
        s = s + (kz[:, :, None, :, :] * pq.expand(q.shape[1], -1, -1)[None, :, delta]).sum(-1)
    s = s * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return s


def run_all(cases, dropout=None):
    for case in cases:
        err, bound = run_case(case, dropout=dropout)
        print(f"ok  disentangled fwd {case}{_tag(dropout)}: max err {err:.2e} <= {bound:.2e}")


def _tag(dropout):
    return f" dropout={dropout}" if dropout else ""


def run_bwd_case(case, seed=0, dropout=None):
    """The emulated backward: dq, dk, dv and the position gradients against fp64 autograd (2x rule
    against eager fp16's autograd); zeros for rows that see no key and for padded keys. With
    dropout, the forward's and both backward kernels' masks are checked against philox.py's."""
    from .disentangled import disentangled_attention_bwd_cuda

    B, H, Lq, Lk, D, c2p, p2c, buckets, max_rel, padded, shared_pos = case
    q, k, v, pk, pq, table, mask, scale = make_case(*case, seed=seed)
    drop_p, drop_seed, keep, dkw = _dropout(case, dropout)
    if mask is not None:  # NaN-free padded keys for the autograd references (their gradients are 0 anyway)
        pad = ~mask[:, None, :, None]
        k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    if shared_pos:
        pk, pq = (None if t is None else t.expand(H, -1, -1).contiguous() for t in (pk, pq))
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(seed + 1)).half()
    with recorded_masks(emu) as rec:
        out, lse = disentangled_attention_fwd_cuda(q, k, v, pk, pq, table, mask, scale, c2p, p2c, drop_p, drop_seed)
        got = disentangled_attention_bwd_cuda(dout, q, k, v, pk, pq, out, lse, table, mask, scale, c2p, p2c, drop_p,
                                              drop_seed)
    n_mask = _check_drawn(rec, case, mask, drop_p, drop_seed, KERNELS)
    assert not any(t.isnan().any() for t in (out, *got) if t is not None), "NaN in the output or a gradient"
    empty = torch.zeros(B, dtype=torch.bool) if mask is None else ~mask.any(1)
    ins = [q, k, v, pk, pq]
    names = ["dq", "dk", "dv", "dpos_key", "dpos_query"]

    def grads(dtype):
        leaves = [None if t is None else t.to(dtype).requires_grad_() for t in ins]
        o = reference.disentangled_attention_indexed(*leaves, table, mask, scale, c2p, p2c, **dkw)
        o = o.masked_fill(empty[:, None, None, None], 0)  # forkattn's contract: empty rows give zeros
        used = [t for t in leaves if t is not None]
        gs = iter(torch.autograd.grad(o, used, dout.to(dtype)))
        return [None if t is None else next(gs) for t in leaves]

    eager, ref = grads(torch.float16), grads(torch.float64)
    allow = _dpos_delta_allowance(ins, table, mask, scale, c2p, p2c, dout, out, keep, drop_p)
    worst = {}
    for name, ours, e, r in zip(names, got, eager, ref):
        if r is None:
            continue
        worst[name] = within_budget(f"{name} {case}", ours, e, r, extra=1e-5 + allow.get(name, 0.0))
    if mask is not None:
        assert not got[0][empty].any(), "a row that sees no key must get zero dq"
        pad = ~mask[:, None, :, None].expand_as(got[1])
        assert not got[1][pad].any() and not got[2][pad].any(), "padded keys get exactly zero gradients"
    if drop_p:
        worst["mask"] = (n_mask, n_mask)  # elements compared bit for bit
    return worst


def _dpos_delta_allowance(ins, table, mask, scale, c2p, p2c, dout, out, keep=None, drop_p=0.0):
    """{"dpos_key": a, "dpos_query": b}: 2x what Delta = rowsum(dO * O) computed from the float16
    output `out` (FlashAttention's choice, as kernels/attention and the Triton backward make it)
    moves the position gradients, evaluated exactly in float64 (not bounded): the kernel's dS_ij is
    P_ij (dP_ij - Delta_i), so Delta's error e_i moves row r of dpos_key by scale * sum over the
    (i, j) reading r of P_ij e_i q_i (k_j for dpos_query). A table that clamps or buckets many
    diagonals onto one row adds up many such terms; dq, dk and dv stay under the plain 2x rule.
    With dropout (keep), the exact output is (P keep / (1 - p)) V; dS still multiplies the
    undropped P."""
    q, k, v, pk, pq = (None if t is None else t.double() for t in ins)
    s = _scores64([q, k, v, pk, pq], table, mask, scale, c2p, p2c)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    vz, kz = torch.nan_to_num(v, nan=0.0), torch.nan_to_num(k, nan=0.0)
    pd = p if keep is None else p * keep / (1.0 - drop_p)
    e = (dout.double() * (pd @ vz)).sum(-1) - (dout.double() * out.double()).sum(-1)  # exact - rounded Delta
    w = p * e[..., None]  # [B, H, Lq, Lk]
    Lq, Lk = q.shape[2], k.shape[2]
    delta = table[torch.arange(Lq)[:, None] - torch.arange(Lk)[None, :] + Lk - 1]
    onehot = torch.nn.functional.one_hot(delta, int(table.max()) + 1).double()  # [Lq, Lk, rows]
    res = {}
    if c2p:
        res["dpos_key"] = 2 * scale * torch.einsum("bhij,ijr,bhid->hrd", w, onehot, q).abs().max().item()
    if p2c:
        res["dpos_query"] = 2 * scale * torch.einsum("bhij,ijr,bhjd->hrd", w, onehot, kz).abs().max().item()
    return res


def run_all_bwd(cases, dropout=None):
    for case in cases:
        w = run_bwd_case(case, dropout=dropout)
        print(f"ok  disentangled bwd {case}{_tag(dropout)}: "
              + " ".join(f"{n} {e:.2e} ({b:.2e})" if n != "mask" else f"mask {e} elements bit-identical"
                         for n, (e, b) in w.items()))


# --- dropout --------------------------------------------------------------------------------------
# (case, (p, mask seed)): each head dim (D128's dk/dv kernel sweeps four column blocks with
# dropout), odd lengths 1 / 7 / 97 / 129 with Lq != Lk, NaN in padded keys and an empty batch entry
# (rows that see no key), each term subset, buckets on and off, a negative seed and a large p.
DROPOUT_QUICK = [
    ((2, 1, 7, 97, 32, True, True, 8, 20, True, False), (0.3, 11)),
    ((1, 1, 1, 70, 128, False, True, -1, 64, True, False), (0.5, -3)),
]
DROPOUT_FULL = DROPOUT_QUICK + [
    ((2, 1, 97, 7, 64, True, False, -1, 5, True, True), (0.1, 2024)),
    ((2, 1, 129, 97, 128, True, True, 16, 64, True, False), (0.2, 2 ** 63 - 25)),
    ((1, 2, 97, 129, 32, False, True, -1, 5, False, True), (0.9, 5)),
    ((1, 1, 33, 40, 64, False, False, -1, 8, True, False), (0.3, 7)),  # no position term
]


def run_dropout_p0_identity(case, seed=0):
    """dropout_p = 0 with a seed gives bit for bit what the call without dropout gives (the host
    picks the instantiations without it, which draw no mask: _check_drawn)."""
    from .disentangled import disentangled_attention_bwd_cuda

    B, H, Lq, Lk, D, c2p, p2c = case[:7]
    q, k, v, pk, pq, table, mask, scale = make_case(*case, seed=seed)
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(seed + 1)).half()
    res = []
    for extra in ((), (0.0, 1234)):
        with recorded_masks(emu) as rec:
            out, lse = disentangled_attention_fwd_cuda(q, k, v, pk, pq, table, mask, scale, c2p, p2c, *extra)
            grads = disentangled_attention_bwd_cuda(dout, q, k, v, pk, pq, out, lse, table, mask, scale, c2p, p2c,
                                                    *extra)
        assert not rec, "a mask was drawn with dropout_p = 0"
        res.append([out, lse, *grads])
    for a, b in zip(*res):
        assert (a is None and b is None) or torch.equal(a, b), "dropout_p = 0 changed a result"


def run_mask_probe_vs_cpu(B, H, Lq, Lk, D, dropout_p, mask_seed):
    """The mask end to end against the CPU kernel (forkattn._C, csrc/cpu/disentangled_cpu.cpp) and
    philox.py: q = 0 and pos_query = 0 make P uniform over the visible keys (both terms on: c2p
    reads pos_key with q = 0), V = I (Lk <= D) makes out[i, j] = P_ij keep_ij / (1 - p), and dO = I
    (Lq <= D) makes dV[j, i] the same: a visible element is nonzero iff kept. Returns the number of
    visible elements compared."""
    from forkattn import _native

    from .disentangled import disentangled_attention_bwd_cuda

    assert Lk <= D and Lq <= D
    g = torch.Generator().manual_seed(1)
    q = torch.zeros(B, H, Lq, D).half()
    k = torch.randn(B, H, Lk, D, generator=g).half()
    eye = lambda n: torch.eye(n, D).half().expand(B, H, n, D).contiguous()  # noqa: E731
    v, dout = eye(Lk), eye(Lq)
    span = reference.relative_span(8, 20)
    pk, pq = torch.randn(H, 2 * span, D, generator=g).half(), torch.zeros(H, 2 * span, D).half()
    table = reference.relative_position_index(Lq, Lk, max_relative_positions=20, position_buckets=8)
    mask = torch.arange(Lk)[None, :] < torch.randint(1, Lk + 1, (B,), generator=g)[:, None]
    out, lse = disentangled_attention_fwd_cuda(q, k, v, pk, pq, table, mask, 1.0, True, True, dropout_p, mask_seed)
    dv = disentangled_attention_bwd_cuda(dout, q, k, v, pk, pq, out, lse, table, mask, 1.0, True, True, dropout_p,
                                         mask_seed)[2]
    f = [t.float() for t in (q, k, v, pk, pq)]
    cpu_out, cpu_lse = _native._C.disentangled_attention_fwd_cpu(*f, table, mask, 1.0, True, True, dropout_p, mask_seed)
    cpu_dv = _native._C.disentangled_attention_bwd_cpu(dout.float(), *f, cpu_out, cpu_lse, table, mask, 1.0, True, True,
                                                       dropout_p, mask_seed)[2]
    vis = mask[:, None, None, :].expand(B, H, Lq, Lk)
    want = philox.dropout_keep(mask_seed, dropout_p, B, H, Lq, Lk)
    for name, got in (("out", out[..., :Lk]), ("cpu out", cpu_out[..., :Lk]),
                      ("dv", dv[..., :Lq].transpose(-2, -1)), ("cpu dv", cpu_dv[..., :Lq].transpose(-2, -1))):
        bad = vis & ((got != 0) != want)
        assert not bad.any(), f"{name}: the dropout mask differs from philox.py at {bad.nonzero()[0].tolist()}"
    return int(vis.sum())


def run_dropout(cases):
    for case, dropout in cases:
        err, bound = run_case(case, dropout=dropout)
        print(f"ok  disentangled fwd {case}{_tag(dropout)}: max err {err:.2e} <= {bound:.2e}")
        run_all_bwd([case], dropout)
    run_dropout_p0_identity(cases[0][0])
    print("ok  disentangled dropout_p = 0: bit-identical to the call without dropout, no mask drawn")
    n = run_mask_probe_vs_cpu(2, 2, 61, 64, 64, 0.3, -5)
    print(f"ok  disentangled mask probe: {n} visible elements of out and dV kept exactly where the CPU kernel "
          "and philox.py keep them")
