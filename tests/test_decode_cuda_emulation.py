"""The CUDA decode kernels (split + merge) and the KV-cache append kernel, checked without a GPU through
the cuda_emulator package (tests/cuda_emulator/decode.py: a thread-level transcription of kernels/decode/
and its host glue on an SM80 model, with bounds-checked page pools and a shared-memory race detector):
the quick cases against forkattn.reference, and mutations (a deliberately broken copy of one kernel
step) that the checks must catch. The full matrix is `python tests/cuda_emulator --only decode`."""
import numpy as np
import pytest
from cuda_emulator import core
from cuda_emulator import decode as emu
from cuda_emulator.core import EmulationError
from cuda_emulator.decode_checks import QUICK_APPEND, QUICK_DECODE, run, run_append


def _id(case):
    a, kw = case[0], case[1]
    return "-".join(str(x).replace(" ", "") for x in a) + "".join(f"-{k}{v}" for k, v in kw.items()).replace(" ", "")


@pytest.mark.parametrize("case", QUICK_DECODE, ids=_id)
def test_emulated_decode_matches_reference(case):
    args, kw = case
    run(*args, verbose=False, **kw)


@pytest.mark.parametrize("case", QUICK_APPEND, ids=_id)
def test_emulated_append_matches_eager(case):
    args, kw, want = case
    got = run_append(*args, verbose=False, **kw)
    assert want is None or got == want


# --- mutations: each breaks one step the way a kernel bug would; the checks must fail --------------------

BAD_PAGE = ((2, 1, 2, 1, 32, 40, [40, 30], 1), {"page_size": 8, "bad": (0, 1, 10)})  # entry == num_pages


def test_mutation_dereferencing_a_page_outside_the_pool_is_caught(monkeypatch):
    """page_of without the `page < num_pages ? page : -1` skip: the split kernel loads the bad page."""
    def no_skip(p, b, pos):
        if p.block_table is None:
            return np.full(pos.shape, b, np.int64)
        lp = pos // p.page_size
        page = np.full(pos.shape, -1, np.int64)
        inside = lp < p.pages_per_seq
        page[inside] = p.block_table.read(b * p.bt_b + lp[inside])
        return page
    monkeypatch.setattr(emu, "page_of", no_skip)
    with pytest.raises(EmulationError, match="out-of-pool access to k_cache"):
        run(*BAD_PAGE[0], verbose=False, **BAD_PAGE[1])


def test_mutation_append_past_the_pool_is_caught(monkeypatch):
    """The append's count without the pool check: it writes into a page outside the pool."""
    def no_pool_check(p, b, L):
        n = 0
        while L >= 0 and n < p.new_tokens and L + n < p.max_seqlen and (L + n) // p.page_size < p.pages_per_seq:
            n += 1
        return n
    monkeypatch.setattr(emu, "append_count", no_pool_check)
    with pytest.raises(EmulationError, match="out-of-pool access"):
        run_append(3, 2, 5, 16, 20, [2, 6, 5], page_size=4, bad=(1, 2, 15), verbose=False)


def test_mutation_missing_barrier_is_caught_as_a_race(monkeypatch):
    calls = {"n": 0}
    real = core.Smem.barrier

    def flaky(self):  # drop the barrier between the score phase and P @ V of the first tile
        calls["n"] += 1
        if calls["n"] != 2:
            real(self)
    monkeypatch.setattr(core.Smem, "barrier", flaky)
    with pytest.raises(EmulationError, match="race|in flight"):
        run(2, 1, 1, 1, 32, 70, [70, 1], 1, verbose=False)


def test_mutation_wrong_warp_reduction_lanes_are_caught(monkeypatch):
    """The row sum's shuffle skips lane ^ 1 (a wrong answer, not a fault): the 1e-4 check fails."""
    def bad(x):
        for o in (16, 8, 4, 2):
            x = (x + core.shfl_xor(x, o)).astype(np.float32)
        return x
    monkeypatch.setattr(emu, "warp_sum", bad)
    with pytest.raises(AssertionError):
        run(2, 2, 2, 3, 32, 70, [70, 3], 3, verbose=False)
