"""The CUDA attention kernels, checked without a GPU through the cuda_emulator package (tests/cuda_emulator:
a thread-level transcription of kernels/attention/*.cuh and their host glue on an SM80 model): a few
small cases against the fp64 reference, the fragment layouts against a plain matmul, and mutations (a
deliberately broken copy of one kernel step) that the checks must catch, so they cannot pass
vacuously. The full matrix is `python tests/cuda_emulator` (docs/EMULATION.md)."""
import sys

import numpy as np
import pytest
import torch
from cuda_emulator import attention as emu
from cuda_emulator import attention_host as host
from cuda_emulator import core
from cuda_emulator.attention_checks import run_case, run_mask_probe, run_varlen_case
from cuda_emulator.core import EmulationError
from forkattn import reference


@pytest.mark.parametrize("b_layout", ["nk", "kn"])
def test_kernel_fragment_loads_and_mma_compute_a_matmul(b_layout):
    """load_a / load_b_nk / load_b_kn address formulas (kernel) + ldmatrix and mma.m16n8k16 fragment
    layouts (PTX ISA) give A @ B for each warp's 16 x 16 by 16 x 16 tile."""
    D, ROW = 32, 40
    rng = np.random.default_rng(0)
    a = core.round_h(rng.standard_normal((64, D)))  # 4 warps x 16 rows, row-major [m][k]
    b = core.round_h(rng.standard_normal((16, D)))  # [n][k] for nk; its transpose stored [k][n] for kn
    sm = core.Smem(2 * ROW * 64 * 2)
    sm.h[: 64 * ROW].reshape(64, ROW)[:, :D] = a
    tile_b = 2 * 64 * ROW
    stored = b if b_layout == "nk" else b.T  # [16][32] or [32][16]
    view = sm.h[64 * ROW:].reshape(64, ROW)
    view[: stored.shape[0], : stored.shape[1]] = stored
    c = np.zeros((core.NT, 2, 4), np.float32)
    if b_layout == "nk":  # C [16 x 16 per warp] = A[:, :32] @ B^T, k over D
        emu.mma_tile_smem_a(sm, c, 0, ROW, core.WARP * 16, tile_b, D, 16, True)
        want = a @ b.T
    else:  # C = A[:, :32] @ Bkn with Bkn = b.T [32 x 16]
        emu.mma_tile_smem_a(sm, c, 0, ROW, core.WARP * 16, tile_b, D, 16, False)
        want = a @ b.T
    got = np.zeros((64, 16), np.float32)
    for j in range(2):
        for e in range(4):
            got[core.WARP * 16 + core.G + (e >> 1) * 8, j * 8 + 2 * core.TQ + (e & 1)] = c[:, j, e]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


CASES = [
    dict(B=1, H=2, Hkv=2, Lq=65, Lk=97, D=32, causal=True),  # causal, Lq < Lk, two key tiles
    dict(B=1, H=2, Hkv=1, Lq=97, Lk=7, D=64, causal=True),  # causal, Lq > Lk: leading rows see no key
    dict(B=3, H=2, Hkv=2, Lq=7, Lk=97, D=32, causal=False, padding="full"),  # a fully padded sequence
    dict(B=1, H=4, Hkv=1, Lq=33, Lk=65, D=128, causal=False),  # GQA 4:1, dk/dv blocks of 32 queries
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_emulated_kernels_match_reference(case):
    case = dict(case)
    run_case(case.pop("B"), case.pop("H"), case.pop("Hkv"), case.pop("Lq"), case.pop("Lk"), case.pop("D"),
             case.pop("causal"), verbose=False, **case)


def test_emulated_varlen_with_empty_sequences_and_oversized_grid():
    run_varlen_case([65, 0, 7, 3], [70, 3, 0, 9], 2, 1, 32, True, verbose=False, max_pad=64)


# --- mutations: each breaks one step the way a kernel bug would; the checks must fail --------------------

def _small():
    run_case(2, 2, 1, 65, 70, 32, True, padding="partial", verbose=False)


def test_mutation_wrong_ldmatrix_trans_address_is_caught(monkeypatch):
    def bad(sm, tile, ROW, n0, k0):  # the two 8-row/8-column halves swapped
        L = core.LANE
        return core.ldsm_x4(sm, tile + 2 * ((k0 + (L & 7) + (L >> 4) * 8) * ROW + n0 + ((L >> 3) & 1) * 8), trans=True)
    monkeypatch.setattr(emu, "load_b_kn", bad)
    with pytest.raises(AssertionError):
        _small()


def test_mutation_wrong_quad_reduction_lanes_are_caught(monkeypatch):
    def bad(x):  # lanes 4 apart do not share a fragment row
        x = np.fmax(x, x[core.TID ^ 1])
        return np.fmax(x, x[core.TID ^ 4])
    monkeypatch.setattr(emu, "quad_max", bad)
    with pytest.raises(AssertionError):
        _small()


def test_mutation_query_length_off_by_one_is_caught(monkeypatch):
    real = emu.sequence
    monkeypatch.setattr(emu, "sequence", lambda p, b: (lambda s: (s[0], s[1], s[2] + 1, s[3]))(real(p, b))
                        if p.causal else real(p, b))
    with pytest.raises(AssertionError):
        _small()


def test_mutation_missing_barrier_is_caught_as_a_race(monkeypatch):
    calls = {"n": 0}
    real = core.Smem.barrier

    def flaky(self):  # drop the barrier after the first wait of each block (the top of the main loop)
        calls["n"] += 1
        if calls["n"] != 1:
            real(self)
    monkeypatch.setattr(core.Smem, "barrier", flaky)
    with pytest.raises(EmulationError, match="race|in flight"):
        run_case(1, 1, 1, 7, 7, 32, False, verbose=False)


def test_mutation_unpredicated_tile_load_is_caught_out_of_bounds(monkeypatch):
    real = emu.load_tile_async
    monkeypatch.setattr(emu, "load_tile_async", lambda sm, tile, ROW, g, rs, row0, n_rows, ROWS, D, keep=None:
                        real(sm, tile, ROW, g, rs, row0, 1 << 30, ROWS, D))
    with pytest.raises(EmulationError, match="out-of-bounds"):
        run_case(1, 1, 1, 7, 7, 32, False, verbose=False)


def test_mutation_unpredicated_store_is_caught(monkeypatch):
    real = emu.store_tile
    monkeypatch.setattr(emu, "store_tile", lambda sm, g, rs, row0, n_rows, tile, ROW, ROWS, D:
                        real(sm, g, rs, row0, n_rows + 1, tile, ROW, ROWS, D))
    with pytest.raises(EmulationError):  # row past len: out of bounds or a second write of a row
        run_case(2, 2, 2, 7, 9, 32, False, verbose=False)


def test_mutation_small_score_error_in_dq_is_caught(monkeypatch):
    """A small error in one key's score (key 5 of each tile, about 0.01 in log2 units), in the dq
    kernel only: far inside the 2x rule's slack, so it is the same-rounding model that must catch
    it. (The masks are selects now, so the former mutation, a perturbed mask bias, hides the key.)"""
    real_mma, real_dq = emu.mma_tile_smem_a, emu.attention_bwd_dq_kernel
    state = {"in_dq": False}

    def bad_mma(sm, c, a_tile, ROW, r0, b_tile, K, N, B_NK):
        real_mma(sm, c, a_tile, ROW, r0, b_tile, K, N, B_NK)
        if state["in_dq"] and a_tile == 0:  # S = Q K^T (sQ is at offset 0); column 5: j 0, t 2, e odd
            lanes = core.TQ == 2
            c[lanes, 0, 1] -= np.float32(0.04)
            c[lanes, 0, 3] -= np.float32(0.04)

    def dq_kernel(*a):
        state["in_dq"] = True
        try:
            real_dq(*a)
        finally:
            state["in_dq"] = False
    monkeypatch.setattr(emu, "mma_tile_smem_a", bad_mma)
    monkeypatch.setattr(emu, "attention_bwd_dq_kernel", dq_kernel)
    with pytest.raises(AssertionError, match="same-rounding model"):
        run_case(1, 2, 2, 65, 70, 32, False, verbose=False)


# --- non-finite values (issue 12, sections 2 and 3) ----------------------------------------------------

@pytest.mark.parametrize("garbage", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("causal,padding", [(False, "full"), (True, "holes")], ids=["full-pad", "causal-holes"])
def test_emulated_garbage_in_padded_keys_changes_nothing(garbage, causal, padding):
    """inf / NaN in every padded key and value: out, lse, dq, dk, dv as without it (2x rule, the
    same-rounding model on the zero-padded inputs), padded keys' dk, dv exactly zero."""
    run_case(3, 2, 1, 33, 150 if padding == "holes" else 70, 32, causal, padding=padding, garbage=garbage,
                 verbose=False)


def _nan_pattern_case(plant, causal):
    gen = torch.Generator().manual_seed(5)
    B, H, Hkv, Lq, Lk, D = 2, 2, 1, 33, 70, 32
    q, k, v, g = (torch.randn(*s, generator=gen).half() for s in
                  ((B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), (B, H, Lq, D)))
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[1, 50:] = False
    plant(q, k)
    out, lse = host.attention_fwd_cuda(q, k, v, mask, causal, D ** -0.5)
    dq, dk, dv = host.attention_bwd_cuda(g, q, k, v, out, lse, mask, causal, D ** -0.5)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*leaves, causal=causal, key_padding_mask=mask, scale=D ** -0.5)
    refg = torch.autograd.grad(ref, leaves, g.double())
    return (out, dq, dk, dv), (ref.detach(), *refg)


@pytest.mark.parametrize("plant", ["q", "k"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_emulated_nan_propagates_like_eager(plant, causal):
    """A NaN query / visible key: NaN exactly where float64 eager has NaN (out; and dq, dk, dv
    without causal, where eager's 0 * NaN in the gradient matmuls is not the kernels' business)."""
    def put(q, k):
        if plant == "q":
            q[0, 1, 20, 3] = float("nan")
        else:
            k[1, 0, 30, 0] = float("nan")
    ours, ref = _nan_pattern_case(put, causal)
    names = ("out",) if causal else ("out", "dq", "dk", "dv")
    for name, a, r in zip(names, ours, ref):
        assert torch.isnan(r).any()
        assert torch.equal(torch.isnan(a), torch.isnan(r)), f"{name}: NaN at {int(torch.isnan(a).sum())} places, eager {int(torch.isnan(r).sum())}"
        fin = ~torch.isnan(r)
        assert (a.double()[fin] - r[fin]).abs().max() < 0.05, name


# --- dropout (issue 16): the kernels' Philox mask, fwd and bwd ------------------------------------------

DROPOUT_CASES = [
    # causal, GQA 2:1, padding, Lq != Lk (odd), two key tiles
    dict(B=2, H=2, Hkv=1, Lq=33, Lk=70, D=32, causal=True, padding="partial", dropout=(0.25, 12345)),
    # head_dim 128: dq key tiles of 32, dk/dv query tiles of 16 with dropout (NJ = 4 and 2 in dropout.cuh)
    dict(B=1, H=2, Hkv=1, Lq=7, Lk=40, D=128, causal=False, padding="partial", seed=3, dropout=(0.5, -9)),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=["causal-gqa-pad", "hdim128"])
def test_emulated_dropout_matches_reference_with_the_same_mask(case):
    """out, lse, dq, dk, dv against float64 eager fed philox.py's mask (2x rule and the same-rounding
    model), and every mask element the forward, dq and dk/dv kernels draw equal to philox.py's."""
    case = dict(case)
    run_case(case.pop("B"), case.pop("H"), case.pop("Hkv"), case.pop("Lq"), case.pop("Lk"), case.pop("D"),
             case.pop("causal"), verbose=False, **case)


def test_emulated_varlen_dropout_counts_rows_inside_each_sequence():
    run_varlen_case([33, 0, 7], [40, 3, 0], 2, 1, 64, True, verbose=False, dropout=(0.3, 2 ** 63 + 11))


def test_emulated_dropout_mask_equals_eager_end_to_end():
    """Through the outputs (q = 0, V = I, dO = I: an element is nonzero iff kept): the emulated
    forward's out and dk/dv kernel's dV, and the eager backend, against philox.py."""
    assert run_mask_probe(2, 2, 33, 60, 64, True, 0.3, 99, padding=True) > 1000


def _dropout_small():
    run_case(1, 2, 2, 33, 70, 32, False, verbose=False, dropout=(0.3, 77))


def test_mutation_dropout_shuffle_from_the_wrong_lane_is_caught(monkeypatch):
    from cuda_emulator import dropout as drop
    real = drop.shfl
    monkeypatch.setattr(drop, "shfl", lambda x, src: real(x, src ^ 1))
    with pytest.raises(AssertionError):
        _dropout_small()


def test_mutation_dkdv_ignoring_the_mask_is_caught_by_the_numerics(monkeypatch):
    """The dk/dv kernel draws the right mask but keeps every probability: only the numerics
    (2x rule, same-rounding model) can notice, and must."""
    real = emu.kept

    def kept(keep, j, e):
        return np.ones_like(real(keep, j, e)) if sys._getframe(1).f_code.co_name == "attention_bwd_dkdv_kernel" \
            else real(keep, j, e)
    monkeypatch.setattr(emu, "kept", kept)
    with pytest.raises(AssertionError, match="dk|dv"):
        _dropout_small()


def test_mutation_dkdv_mask_of_the_wrong_head_is_caught(monkeypatch):
    """The dk/dv kernel draws head 0's mask for every query head of the group (numerics and the
    mask comparison both see it; the numerics are checked first)."""
    real = emu.dropout_mask
    monkeypatch.setattr(emu, "dropout_mask", lambda p, b, h: real(p, b, h if sys._getframe(1).f_code.co_name
                                                                  != "attention_bwd_dkdv_kernel" else 0))
    with pytest.raises(AssertionError, match="dk|dv"):
        _dropout_small()
