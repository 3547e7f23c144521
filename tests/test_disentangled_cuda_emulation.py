"""The CUDA disentangled-attention kernels (kernels/disentangled/: forward, dq and dk/dv backward),
checked without a GPU through the cuda_emulator package (a thread-level transcription of the kernel and its host
glue on an SM80 model, tests/cuda_emulator/disentangled.py): small odd cases against the fp64
reference with the 2x rule (Lq != Lk, 1 / 7 / 97 rows, buckets on and off, c2p / p2c subsets,
padding with an empty row and NaN in padded keys), with and without attention dropout (the mask
bit for bit philox.h's, as the CPU kernel draws it), and mutations (one kernel step broken on
purpose) that the checks must catch. The bigger matrix: `python tests/cuda_emulator --only disentangled`."""
import numpy as np
import pytest
from cuda_emulator import disentangled as emu
from cuda_emulator.core import EmulationError
from cuda_emulator.disentangled_checks import (BWD_QUICK, DROPOUT_QUICK, QUICK, run_bwd_case, run_case,
                                               run_dropout_p0_identity, run_mask_probe_vs_cpu)

SMALL = QUICK[2]  # one query row against two key tiles, p2c only: the cheapest case
BOTH = (1, 1, 5, 9, 64, True, True, 4, 6, True, False)  # both terms, buckets, padding


@pytest.mark.parametrize("case", QUICK, ids=lambda c: f"B{c[0]}H{c[1]}q{c[2]}k{c[3]}D{c[4]}c2p{int(c[5])}p2c{int(c[6])}")
def test_emulated_forward_matches_fp64_within_the_2x_rule(case):
    run_case(case)


def test_mutation_wrong_c2p_skew_is_caught(monkeypatch):
    """c2p's diagonal -> column map off by one: the position terms land on the wrong keys."""
    good = emu.scatter_c2p

    def bad(sm, sB, BROW, c, u0, add):
        return good(sm, sB, BROW, c, u0 - 1, add)

    monkeypatch.setattr(emu, "scatter_c2p", bad)
    with pytest.raises((AssertionError, EmulationError)):
        run_case(BOTH)


def test_mutation_wrong_position_row_is_caught(monkeypatch):
    """The position tile read one table entry too far: rows of the wrong relative position."""
    good = emu.load_pos_rows_async

    def bad(sm, tile, ROW, pos, row_stride, rel, t0, n_diag, n_rel, ROWS, D):
        return good(sm, tile, ROW, pos, row_stride, rel, t0 + 1, n_diag, n_rel, ROWS, D)

    monkeypatch.setattr(emu, "load_pos_rows_async", bad)
    with pytest.raises((AssertionError, EmulationError)):
        run_case(SMALL)


def test_mutation_p2c_scatter_dropped_is_caught(monkeypatch):
    """p2c computed but its stores skipped: sB keeps shared memory's NaN poison."""
    monkeypatch.setattr(emu, "scatter_p2c", lambda *a: None)
    with pytest.raises((AssertionError, EmulationError)):
        run_case(SMALL)


def test_mutation_missing_syncwarp_is_caught(monkeypatch):
    """Without the __syncwarp between the c2p stores and the score reads, lanes read sB entries
    other lanes wrote in the same epoch: the race detector raises."""
    monkeypatch.setattr(emu, "syncwarp", lambda sm: None)
    with pytest.raises(EmulationError, match="race"):
        run_case(BOTH)


@pytest.mark.parametrize("case", [BOTH, QUICK[1]], ids=["both-terms-padded", "c2p-clamped-97x7"])
def test_emulated_backward_matches_fp64_within_the_2x_rule(case):
    """dq, dk, dv, dpos_key, dpos_query (QUICK[1] clamps most diagonals onto two rows: the position
    gradients sum hundreds of dS per row)."""
    run_bwd_case(case)


@pytest.mark.parametrize("case", BWD_QUICK, ids=lambda c: f"B{c[0]}q{c[2]}k{c[3]}D{c[4]}c2p{int(c[5])}p2c{int(c[6])}")
def test_emulated_backward_head_dims_32_128_match_fp64_within_the_2x_rule(case):
    """The backward instantiations at head_dim 32 (the dk/dv kernel in one 64-query piece) and 128
    (four 16-query pieces): all five gradients, NaN in padded keys, an empty batch entry."""
    run_bwd_case(case)


def test_mutation_query_split_piece_skipped_is_caught(monkeypatch):
    """The dk/dv kernel at head_dim 128 visiting one query piece fewer than BwdConfig's split:
    dk and dv miss a quarter of the queries."""
    monkeypatch.setattr(emu, "query_pieces", lambda HM: range(0, 64 - HM, HM))
    with pytest.raises((AssertionError, EmulationError)):
        run_bwd_case(BWD_QUICK[1])


def test_mutation_dpos_scattered_to_the_wrong_row_is_caught(monkeypatch):
    good = emu.add_dpos

    def bad(sm, dpos, row_stride, rel, t0, u0, n_rel, a, a_lo, b_tile, ROW, D):
        return good(sm, dpos, row_stride, rel, t0 - 1, u0, n_rel, a, a_lo, b_tile, ROW, D)

    monkeypatch.setattr(emu, "add_dpos", bad)
    with pytest.raises((AssertionError, EmulationError)):
        run_bwd_case(BOTH)


def test_mutation_wrong_y_diagonal_in_dk_is_caught(monkeypatch):
    """The p2c term's dS by diagonal read one query off: dk (and dpos_query) go wrong."""
    good = emu.read_ds

    def bad(sm, base, BROW, r, c, ok):
        return good(sm, base, BROW, r, np.where(ok & (c > 0), c - 1, c), ok)

    monkeypatch.setattr(emu, "read_ds", bad)
    with pytest.raises((AssertionError, EmulationError)):
        run_bwd_case(BOTH)


# --- attention dropout (the DROPOUT instantiations) -------------------------------------------------

@pytest.mark.parametrize("case,dropout", DROPOUT_QUICK,
                         ids=[f"q{c[2]}k{c[3]}D{c[4]}p{d[0]}" for c, d in DROPOUT_QUICK])
def test_emulated_dropout_forward_and_backward_match_fp64_with_the_same_mask(case, dropout):
    """out and all five gradients within the 2x rule of fp64 with philox.py's mask for the seed;
    every mask element the three kernels draw equals philox.py's and every visible (b, h, i, j) is
    drawn; NaN in padded keys, an empty batch entry (zeros, no NaN); D32 and D128 (four sweeps)."""
    run_case(case, dropout=dropout)
    worst = run_bwd_case(case, dropout=dropout)
    assert worst["mask"][0] > 0


def test_emulated_dropout_p0_is_the_path_without_dropout():
    run_dropout_p0_identity(DROPOUT_QUICK[0][0])


def test_emulated_dropout_mask_equals_the_cpu_kernels():
    """out and dV recovered masks (q = 0, V = I, dO = I) against the C++ CPU kernel's and
    philox.py's for the same seed, with padding."""
    assert run_mask_probe_vs_cpu(2, 2, 61, 64, 64, 0.3, -5) > 0


def _mutated(name, wrap):
    good = getattr(emu, name)
    return lambda *a: wrap(good, *a)


def test_mutation_dropout_mask_not_redrawn_in_dkdv_is_caught(monkeypatch):
    """The dk/dv kernel keeps every probability (its mask never drawn): dk, dv and dpos_query
    go wrong, and the mask check misses the kernel."""
    monkeypatch.setattr(emu, "dropout_keep_cols", lambda m, kb0, m0, NJ: np.full(128, (1 << 32) - 1, np.int64))
    with pytest.raises((AssertionError, EmulationError)):
        run_bwd_case(DROPOUT_QUICK[0][0], dropout=DROPOUT_QUICK[0][1])


def test_mutation_dropout_mask_of_the_wrong_query_in_dq_is_caught(monkeypatch):
    """The dq kernel draws the mask one query row off: a mask that differs from the forward's."""
    monkeypatch.setattr(emu, "dropout_keep_rows",
                        _mutated("dropout_keep_rows", lambda good, m, row0, col0, NJ: good(m, row0 + 1, col0, NJ)))
    with pytest.raises((AssertionError, EmulationError)):
        run_bwd_case(DROPOUT_QUICK[0][0], dropout=DROPOUT_QUICK[0][1])


def test_mutation_dropout_dv_unscaled_is_caught(monkeypatch):
    """dV staged without the survivors' 1 / (1 - p): every dv too small by (1 - p)."""
    good = emu.disentangled_bwd_dkdv_kernel

    def bad(p, D, C2P, P2C, blk, DROPOUT=False):
        scale = p.dropout_scale
        p.dropout_scale = 1.0  # dP's and dV's factor both lost
        try:
            return good(p, D, C2P, P2C, blk, DROPOUT)
        finally:
            p.dropout_scale = scale

    monkeypatch.setattr(emu, "disentangled_bwd_dkdv_kernel", bad)
    with pytest.raises((AssertionError, EmulationError)):
        run_bwd_case(DROPOUT_QUICK[0][0], dropout=DROPOUT_QUICK[0][1])
