"""Seeded fuzz test of attention and attention_varlen against float64, on every CPU-runnable
backend ("eager", "cpu", and "triton" under TRITON_INTERPRET=1 on a smaller set: the interpreter
is slow). Random shapes (odd lengths 1, 7, 97, 129, Lq != Lk, GQA), strided and non-contiguous
inputs, causal or not, random padding with holes and fully padded rows, and garbage (inf, -inf,
NaN) in every padded key and value. Output and gradients obey the 2x rule (tests/attn_utils.py)
against float64 computed on the same inputs with the garbage zeroed; rows that see no key are
exactly zero. A failure names its seed: FORKATTN_FUZZ_SEED=<seed> reruns that one case.
About a minute in all on 2 cores; FORKATTN_FUZZ_CASES scales the number of cases."""
import os
import random

import pytest
import torch

import forkattn
from forkattn import reference
from attn_utils import assert_within_budget, backend_skip_reason, delta_rounding_allowance

N_CASES = int(os.environ.get("FORKATTN_FUZZ_CASES", "40"))
ONLY_SEED = os.environ.get("FORKATTN_FUZZ_SEED")
LENGTHS = [1, 2, 7, 16, 33, 64, 97, 129]
GARBAGE = [float("inf"), float("-inf"), float("nan")]
DTYPES = [torch.float32, torch.float32, torch.float16, torch.bfloat16]


def _seeds(backend):
    if ONLY_SEED is not None:
        return [int(ONLY_SEED)]
    n = N_CASES if backend != "triton" else max(2, N_CASES // 5)
    base = {"eager": 1000, "cpu": 2000, "triton": 3000}[backend]
    return list(range(base, base + n))


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as [B, H, L, D] t, laid out contiguous, as a transpose of [B, L, H, D], or as
    a slice of a wider tensor (non-unit head and row strides)."""
    if how == "contiguous":
        return t.contiguous()
    if how == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    B, H, L, D = t.shape
    wide = torch.full((B, 2 * H, L + 3, D + 5), float("nan"), dtype=t.dtype)
    wide[:, ::2, 1:L + 1, 2:D + 2] = t
    return wide[:, ::2, 1:L + 1, 2:D + 2]


def _case(seed, backend):
    rng = random.Random(seed)
    triton = backend == "triton"
    Hkv = rng.choice([1, 2])
    H = Hkv * rng.choice([1, 2, 3] if not triton else [1, 2])
    D = rng.choice([16, 32, 64] if triton else [8, 16, 24, 32, 64])
    lengths = LENGTHS if not triton else [1, 7, 33, 97]
    return dict(
        B=rng.choice([1, 2, 3]), H=H, Hkv=Hkv, D=D, Lq=rng.choice(lengths), Lk=rng.choice(lengths),
        dtype=rng.choice(DTYPES if not triton else [torch.float32, torch.float16]),
        causal=rng.random() < 0.5, padding=rng.choice(["none", "prefix", "holes"]),
        layout=rng.choice(["contiguous", "transposed", "sliced"]), garbage=rng.choice(GARBAGE),
        varlen=rng.random() < 0.3)


def _mask(rng, B, Lk, kind):
    if kind == "none":
        return None
    if kind == "prefix":
        lengths = torch.tensor([rng.randint(0, Lk) for _ in range(B)])  # 0: a fully padded row
        return torch.arange(Lk)[None, :] < lengths[:, None]
    mask = torch.tensor([[rng.random() < 0.6 for _ in range(Lk)] for _ in range(B)])
    mask[rng.randrange(B)] = False
    return mask


def _layout_packed(t: torch.Tensor, how: str) -> torch.Tensor:
    """_layout for packed [total, H, D] tensors."""
    if how == "contiguous":
        return t.contiguous()
    return _layout(t.unsqueeze(0), how)[0]


def _grads(out, leaves, g):
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return [out.detach(), *(torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads))]


def _check_padded(seed, backend, c):
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, Lq, Lk, D, dtype = c["B"], c["H"], c["Hkv"], c["Lq"], c["Lk"], c["D"], c["dtype"]
    q, k, v = (torch.randn(B, h, L, D, generator=gen) for h, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    g = torch.randn(B, H, Lq, D, generator=gen)
    mask = _mask(random.Random(seed), B, Lk, c["padding"])
    kw = dict(causal=c["causal"], key_padding_mask=mask)
    k_dirty, v_dirty = k.clone(), v.clone()
    if mask is not None:  # the reference sees zeros there, the backend the garbage
        pad = ~mask[:, None, :, None].expand_as(k)
        k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
        k_dirty, v_dirty = k.masked_fill(pad, c["garbage"]), v.masked_fill(pad, c["garbage"])
    leaves = [_layout(t.to(dtype), c["layout"]).requires_grad_() for t in (q, k_dirty, v_dirty)]
    ours = _grads(forkattn.attention(*leaves, backend=backend, **kw), leaves, g.to(dtype))
    base_leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    base = _grads(reference.attention(*base_leaves, **kw), base_leaves, g.to(dtype))
    ref_leaves = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    ref = _grads(reference.attention(*ref_leaves, **kw), ref_leaves, g.to(dtype).double())
    allowed = reference.visible_keys(B, Lq, Lk, causal=c["causal"], key_padding_mask=mask, device="cpu")
    extra = {"dq": 0.0, "dk": 0.0}
    if backend == "triton":  # Delta from the 16-bit output (README: the GPU backends' rule)
        extra = delta_rounding_allowance(base_leaves[0], base_leaves[1], ref[0], g.to(dtype), q.shape[-1] ** -0.5, allowed)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, base, ref):
        assert_within_budget(name, a, b, r, extra=1e-5 + extra.get(name, 0.0))
    if mask is not None:
        empty = ~allowed.expand(B, 1, Lq, Lk).any(-1)[:, 0]  # [B, Lq]
        for name, t in (("out", ours[0]), ("dq", ours[1])):
            rows = t.transpose(1, 2)[empty]
            assert torch.equal(rows, torch.zeros_like(rows)), f"{name}: rows that see no key must be zeros"
        for name, t in (("dk", ours[2]), ("dv", ours[3])):
            rows = t.transpose(1, 2)[~mask]
            assert torch.equal(rows, torch.zeros_like(rows)), f"{name}: padded keys must get zero gradients"


def _varlen_eager(q, k, v, cu_q, cu_k, causal):
    outs = []
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        o = reference.attention(*(t.unsqueeze(0).transpose(1, 2) for t in (q[qs:qe], k[ks:ke], v[ks:ke])),
                                causal=causal)
        outs.append(o[0].transpose(0, 1) if ke > ks else torch.zeros_like(q[qs:qe]))
    return torch.cat(outs)


def _check_varlen(seed, backend, c):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n = rng.randint(1, 4)
    lengths = LENGTHS if backend != "triton" else [1, 7, 33]
    lq = [rng.choice(lengths)] + [rng.choice([0, *lengths]) for _ in range(n - 1)]
    lk = [rng.choice(lengths)] + [rng.choice([0, *lengths]) for _ in range(n - 1)]
    cu_q = [0]
    cu_k = [0]
    for a, b in zip(lq, lk):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    H, Hkv, D, dtype = c["H"], c["Hkv"], c["D"], c["dtype"]
    if backend == "triton":  # no Delta allowance per packed sequence here: fp16 is fuzzed padded
        dtype = torch.float32
    q, k, v = (torch.randn(T, h, D, generator=gen) for T, h in ((cu_q[-1], H), (cu_k[-1], Hkv), (cu_k[-1], Hkv)))
    g = torch.randn(cu_q[-1], H, D, generator=gen)
    tq, tk = (torch.tensor(x, dtype=torch.int32) for x in (cu_q, cu_k))
    leaves = [_layout_packed(t.to(dtype), c["layout"]).requires_grad_() for t in (q, k, v)]
    out = forkattn.attention_varlen(*leaves, tq, tk, max(lq + [1]), max(lk + [1]), causal=c["causal"], backend=backend)
    ours = _grads(out, leaves, g.to(dtype))
    base_leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    base = _grads(_varlen_eager(*base_leaves, cu_q, cu_k, c["causal"]), base_leaves, g.to(dtype))
    ref_leaves = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    ref = _grads(_varlen_eager(*ref_leaves, cu_q, cu_k, c["causal"]), ref_leaves, g.to(dtype).double())
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, base, ref):
        assert_within_budget(name, a, b, r)


@pytest.mark.parametrize("backend", ["eager", "cpu", "triton"])
def test_fuzz_attention(backend):
    why = backend_skip_reason(backend)
    if why:
        pytest.skip(why)
    for seed in _seeds(backend):
        c = _case(seed, backend)
        try:
            (_check_varlen if c["varlen"] else _check_padded)(seed, backend, c)
        except AssertionError as e:
            shown = {key: (str(val) if key == "dtype" else val) for key, val in c.items()}
            raise AssertionError(f"fuzz seed {seed} ({backend}, {shown}); rerun with FORKATTN_FUZZ_SEED={seed}: {e}") from e
