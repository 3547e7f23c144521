"""The CPU attention backward when B x Hkv < 2 x threads (csrc/cpu/attention_cpu.cpp, run_bwd): the
query blocks of each kv head are split across tasks, each summing dK/dV into its own partial, summed
afterwards in a fixed order. Under 2 threads, at odd sizes, causal / padded / GQA / varlen / bf16:
every gradient against float64 (2x eager's error + 1e-5; a race on a shared row or a lost partial
breaks it), bit-identical results across runs, and dropout's masks identical to the unsplit path."""
import pytest
import torch

import forkattn
from attn_utils import check_against_reference, make_padding, make_qkv


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("H,Hkv,L,causal,padded,dtype", [
    (1, 1, 1025, True, False, torch.float32),
    (1, 1, 1025, False, True, torch.float32),
    (1, 1, 97, False, False, torch.float32),
    (3, 3, 257, True, True, torch.float32),
    (4, 1, 129, True, False, torch.float32),
    (6, 2, 200, False, True, torch.float32),
    (1, 1, 300, True, True, torch.bfloat16),
    (12, 12, 129, True, True, torch.float32),  # 12 kv heads: the unsplit path, same checks
])
def test_backward_b1_matches_fp64(two_threads, H, Hkv, L, causal, padded, dtype):
    torch.manual_seed(L + H)
    q, k, v = make_qkv(1, H, Hkv, L, L, 64, dtype)
    mask = make_padding(1, L, generator=torch.Generator().manual_seed(L)) if padded else None
    if padded:  # a padded key's rows hold garbage, which must not reach any gradient
        with torch.no_grad():
            k[0, :, ~mask[0]] = float("nan")
            v[0, :, ~mask[0]] = float("inf")
    check_against_reference(q, k, v, backend="cpu", causal=causal, key_padding_mask=mask)


# Odd sizes, Lq != Lk (causal bottom-right aligned: with Lq > Lk the first rows see no key, fully
# masked, zero gradients), padded keys holding NaN/inf, a fully padded sequence, GQA: the split's
# partials cover exactly the keys each task touched (split_key_end), which these shapes stress
# (uneven last blocks, splits that see no key, tasks past a short sequence's end).
@pytest.mark.parametrize("H,Hkv,Lq,Lk,causal,pad", [
    (1, 1, 1, 1, False, None),
    (1, 1, 7, 1025, True, None),
    (1, 1, 1025, 97, True, None),          # Lq > Lk: rows 0..927 see no key
    (1, 1, 129, 1025, False, "garbage"),
    (2, 1, 1025, 129, True, "garbage"),
    (1, 1, 97, 97, False, "all"),          # every key padded: zeros everywhere, never NaN
    (4, 2, 129, 7, True, None),
    (3, 1, 513, 1025, True, "garbage"),
])
def test_backward_split_odd_shapes(two_threads, H, Hkv, Lq, Lk, causal, pad):
    torch.manual_seed(Lq * 7 + Lk)
    q, k, v = make_qkv(1, H, Hkv, Lq, Lk, 64, torch.float32)
    mask = None
    if pad is not None:
        mask = make_padding(1, Lk, fully_padded=(0,) if pad == "all" else (),
                            generator=torch.Generator().manual_seed(Lk))
        if not mask.all():
            with torch.no_grad():
                k[0, :, ~mask[0]] = float("nan")
                v[0, :, ~mask[0]] = float("inf")
    check_against_reference(q, k, v, backend="cpu", causal=causal, key_padding_mask=mask)
    if pad == "all" or (causal and Lq > Lk):  # the rows that see no key: zeros, and zero gradients
        out = forkattn.attention(q, k, v, backend="cpu", causal=causal, key_padding_mask=mask)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        blind = slice(None) if pad == "all" else slice(0, Lq - Lk)
        assert out[:, :, blind].abs().max().item() == 0 and dq[:, :, blind].abs().max().item() == 0
        if pad == "all":
            assert dk.abs().max().item() == 0 and dv.abs().max().item() == 0


@pytest.mark.parametrize("threads", [2, 4])
def test_backward_split_matches_unsplit(threads):
    # The same problem at 1 thread (one task per kv head, no partials) and split across 2-4 threads
    # (2-16 splits): equal to rounding, for every gradient, causal with a short key side.
    torch.manual_seed(threads)
    q, k, v = make_qkv(1, 2, 1, 1025, 700, 64, torch.float32, requires_grad=False)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(q, k, v, causal=True)
        torch.set_num_threads(threads)
        many = _grads(q, k, v, causal=True)
    finally:
        torch.set_num_threads(old)
    for name, x, y in zip(("out", "dq", "dk", "dv"), one, many):
        assert (x - y).abs().max().item() <= 1e-5 * max(1.0, x.abs().max().item()), name


def _grads(q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = forkattn.attention(q, k, v, backend="cpu", **kw)
    out.backward(torch.ones_like(out) + torch.arange(out.shape[-1]) / 64)
    return out, q.grad, k.grad, v.grad


def test_backward_split_is_deterministic(two_threads):
    torch.manual_seed(1)
    q, k, v = make_qkv(1, 2, 1, 700, 700, 32, torch.float32, requires_grad=False)
    a, b = _grads(q, k, v, causal=True), _grads(q, k, v, causal=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_split_keeps_dropout_masks(causal):
    # 1 thread runs one task per kv head, 2 threads split the query blocks: the same Philox masks
    # must be redrawn, so the gradients agree to rounding (a different mask changes them by O(1)).
    torch.manual_seed(2)
    q, k, v = make_qkv(1, 3, 1, 333, 333, 64, torch.float32, requires_grad=False)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(q, k, v, causal=causal, dropout_p=0.3, seed=1234)
        torch.set_num_threads(2)
        two = _grads(q, k, v, causal=causal, dropout_p=0.3, seed=1234)
    finally:
        torch.set_num_threads(old)
    for name, x, y in zip(("out", "dq", "dk", "dv"), one, two):
        assert (x - y).abs().max().item() < 1e-4 * max(1.0, x.abs().max().item()), name


def test_varlen_backward_single_sequence_split(two_threads):
    torch.manual_seed(3)
    L, H, D = 517, 2, 64
    q, k, v = (torch.randn(L, H, D, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, L], dtype=torch.int32)
    out = forkattn.attention_varlen(q, k, v, cu, cu, L, L, causal=True, backend="cpu")
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().double().transpose(0, 1)[None].requires_grad_() for t in (q, k, v)]
    ref = forkattn.reference.attention(*ref_in, causal=True)
    refg = torch.autograd.grad(ref, ref_in, g.double().transpose(0, 1)[None])
    for name, a, r in zip(("dq", "dk", "dv"), ours, refg):
        err = (a.double() - r[0].transpose(0, 1)).abs().max().item()
        assert err < 1e-4, (name, err)
