"""The CUDA attention kernels, checked without a GPU through scripts/emulate_attention_kernel.py (a
thread-level transcription of kernels/attention/*.cuh and csrc/cuda/attention_cuda.cpp): a few small
cases against the fp64 reference, the fragment layouts against a plain matmul, and mutations (a
deliberately broken copy of one kernel step) that the checks must catch, so they cannot pass
vacuously. The full matrix is the script's __main__."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "emulate_attention_kernel.py"
_spec = importlib.util.spec_from_file_location("emulate_attention_kernel", _PATH)
emu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = emu
_spec.loader.exec_module(emu)


@pytest.mark.parametrize("b_layout", ["nk", "kn"])
def test_kernel_fragment_loads_and_mma_compute_a_matmul(b_layout):
    """load_a / load_b_nk / load_b_kn address formulas (kernel) + ldmatrix and mma.m16n8k16 fragment
    layouts (PTX ISA) give A @ B for each warp's 16 x 16 by 16 x 16 tile."""
    D, ROW = 32, 40
    rng = np.random.default_rng(0)
    a = emu.round_h(rng.standard_normal((64, D)))  # 4 warps x 16 rows, row-major [m][k]
    b = emu.round_h(rng.standard_normal((16, D)))  # [n][k] for nk; its transpose stored [k][n] for kn
    sm = emu.Smem(2 * ROW * 64 * 2)
    sm.h[: 64 * ROW].reshape(64, ROW)[:, :D] = a
    tile_b = 2 * 64 * ROW
    stored = b if b_layout == "nk" else b.T  # [16][32] or [32][16]
    view = sm.h[64 * ROW:].reshape(64, ROW)
    view[: stored.shape[0], : stored.shape[1]] = stored
    c = np.zeros((emu.NT, 2, 4), np.float32)
    if b_layout == "nk":  # C [16 x 16 per warp] = A[:, :32] @ B^T, k over D
        emu.mma_tile_smem_a(sm, c, 0, ROW, emu.WARP * 16, tile_b, D, 16, True)
        want = a @ b.T
    else:  # C = A[:, :32] @ Bkn with Bkn = b.T [32 x 16]
        emu.mma_tile_smem_a(sm, c, 0, ROW, emu.WARP * 16, tile_b, D, 16, False)
        want = a @ b.T
    got = np.zeros((64, 16), np.float32)
    for j in range(2):
        for e in range(4):
            got[emu.WARP * 16 + emu.G + (e >> 1) * 8, j * 8 + 2 * emu.TQ + (e & 1)] = c[:, j, e]
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
    emu.run_case(case.pop("B"), case.pop("H"), case.pop("Hkv"), case.pop("Lq"), case.pop("Lk"), case.pop("D"),
                 case.pop("causal"), verbose=False, **case)


def test_emulated_varlen_with_empty_sequences_and_oversized_grid():
    emu.run_varlen_case([65, 0, 7, 3], [70, 3, 0, 9], 2, 1, 32, True, verbose=False, max_pad=64)


# --- mutations: each breaks one step the way a kernel bug would; the checks must fail --------------------

def _small():
    emu.run_case(2, 2, 1, 65, 70, 32, True, padding="partial", verbose=False)


def test_mutation_wrong_ldmatrix_trans_address_is_caught(monkeypatch):
    def bad(sm, tile, ROW, n0, k0):  # the two 8-row/8-column halves swapped
        L = emu.LANE
        return emu.ldsm_x4(sm, tile + 2 * ((k0 + (L & 7) + (L >> 4) * 8) * ROW + n0 + ((L >> 3) & 1) * 8), trans=True)
    monkeypatch.setattr(emu, "load_b_kn", bad)
    with pytest.raises(AssertionError):
        _small()


def test_mutation_wrong_quad_reduction_lanes_are_caught(monkeypatch):
    def bad(x):  # lanes 4 apart do not share a fragment row
        x = np.fmax(x, x[emu.TID ^ 1])
        return np.fmax(x, x[emu.TID ^ 4])
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
    real = emu.Smem.barrier

    def flaky(self):  # drop the barrier after the first wait of each block (the top of the main loop)
        calls["n"] += 1
        if calls["n"] != 1:
            real(self)
    monkeypatch.setattr(emu.Smem, "barrier", flaky)
    with pytest.raises(emu.EmulationError, match="race|in flight"):
        emu.run_case(1, 1, 1, 7, 7, 32, False, verbose=False)


def test_mutation_unpredicated_tile_load_is_caught_out_of_bounds(monkeypatch):
    real = emu.load_tile_async
    monkeypatch.setattr(emu, "load_tile_async", lambda sm, tile, ROW, g, rs, row0, n_rows, ROWS, D:
                        real(sm, tile, ROW, g, rs, row0, 1 << 30, ROWS, D))
    with pytest.raises(emu.EmulationError, match="out-of-bounds"):
        emu.run_case(1, 1, 1, 7, 7, 32, False, verbose=False)


def test_mutation_unpredicated_store_is_caught(monkeypatch):
    real = emu.store_tile
    monkeypatch.setattr(emu, "store_tile", lambda sm, g, rs, row0, n_rows, tile, ROW, ROWS, D:
                        real(sm, g, rs, row0, n_rows + 1, tile, ROW, ROWS, D))
    with pytest.raises(emu.EmulationError):  # row past len: out of bounds or a second write of a row
        emu.run_case(2, 2, 2, 7, 9, 32, False, verbose=False)


def test_mutation_small_masking_error_in_dq_is_caught(monkeypatch):
    """A small bias error on one key, in the dq kernel only: far inside the 2x rule's slack, so it is
    the same-rounding model that must catch it."""
    real_next, real_dq = emu.next_key_tile, emu.attention_bwd_dq_kernel
    state = {"in_dq": False}

    def bad_next(sm, n, n_tiles, mask, len_k, bias, BN):
        out = real_next(sm, n, n_tiles, mask, len_k, bias, BN)
        if state["in_dq"] and out < n_tiles and out * BN + 5 < len_k:  # key 5 of the tile
            sm.f[(bias + 4 * 5) // 4] -= np.float32(0.01)
        return out

    def dq_kernel(*a):
        state["in_dq"] = True
        try:
            real_dq(*a)
        finally:
            state["in_dq"] = False
    monkeypatch.setattr(emu, "next_key_tile", bad_next)
    monkeypatch.setattr(emu, "attention_bwd_dq_kernel", dq_kernel)
    with pytest.raises(AssertionError, match="same-rounding model"):
        emu.run_case(1, 2, 2, 65, 70, 32, False, verbose=False)
