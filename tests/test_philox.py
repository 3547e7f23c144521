"""forkattn.philox, the eager mirror of kernels/common/philox.h: Philox4x32-10 itself and the
counter layout of attention dropout (every backend builds its mask from it, bit for bit)."""
import math

import numpy as np
import pytest
import torch

from forkattn import philox
from test_mlm import needs_triton, philox4x32_10 as numpy_philox


def test_known_answers():
    # Random123's known-answer vectors for philox4x32-10
    assert [int(x) for x in philox.philox4x32_10(0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    full = philox.philox4x32_10(-1, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)  # -1: all 64 key bits set
    assert [int(x) for x in full] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("seed", [0, 12345, 2**63 + 17, 2**64 - 5])
def test_torch_philox_is_the_numpy_reference(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    c = [torch.randint(0, 2**32, (4096,), generator=g) for _ in range(4)]
    signed = seed - 2**64 if seed >= 2**63 else seed  # the custom ops carry the seed as a signed int64
    ours = philox.philox4x32_10(signed, *c)
    ref = numpy_philox(seed, *[x.numpy() for x in c])
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a.numpy().astype(np.uint64), b)


def test_dropout_layout_by_hand():
    """u16(b, h, i, j) is half a word of the Philox block (j >> 3, i, b * H + h, DROPOUT_STREAM)."""
    seed, B, H, Lq, Lk = 0x1234_5678_9ABC, 2, 3, 5, 21
    u = philox.dropout_u16(seed, B, H, Lq, Lk)
    assert u.shape == (B, H, Lq, Lk) and int(u.min()) >= 0 and int(u.max()) < 65536
    for b, h, i, j in [(0, 0, 0, 0), (1, 2, 4, 20), (1, 0, 3, 9), (0, 1, 2, 15)]:
        words = numpy_philox(seed, j >> 3, i, b * H + h, philox.DROPOUT_STREAM)
        assert int(u[b, h, i, j]) == (int(words[(j & 7) >> 1]) >> (16 * (j & 1))) & 0xFFFF
    # one sequence of a varlen batch sees the rows of the padded layout's batch row
    np.testing.assert_array_equal(philox.dropout_u16(seed, B, H, Lq, Lk, batch_index=1)[0], u[1])
    # independent of how far the key axis reaches (no tiling dependence)
    np.testing.assert_array_equal(philox.dropout_u16(seed, B, H, Lq, 8)[..., :8], u[..., :8])


def test_threshold():
    assert philox.dropout_threshold(0.0) == 0
    assert philox.dropout_threshold(0.1) == 6554
    assert philox.dropout_threshold(0.5) == 32768
    assert philox.dropout_threshold(1 - 2**-20) == 65535
    for p in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError, match="dropout_p"):
            philox.dropout_threshold(p)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_independence(p):
    keep = philox.dropout_keep(99, p, 4, 8, 256, 256)  # 2M elements
    n = keep.numel()
    rate = keep.double().mean().item()
    expected = 1 - philox.dropout_threshold(p) / 65536
    assert abs(rate - expected) < 3 * math.sqrt(expected * (1 - expected) / n) + 2**-17
    # no repeated patterns across heads or rows, a new seed gives a new mask
    flat = keep.view(-1, 256)
    assert torch.unique(flat, dim=0).shape[0] == flat.shape[0]
    other = philox.dropout_keep(100, p, 4, 8, 256, 256)
    assert (other != keep).double().mean().item() > 2 * expected * (1 - expected) * 0.9


@needs_triton
def test_tritons_philox_gives_the_same_u16():
    import triton
    import triton.language as tl

    @triton.jit
    def k(out_ptr, seed, bh, Lk: tl.constexpr):
        j = tl.arange(0, Lk)
        i = tl.program_id(0)
        z = j * 0
        r0, r1, r2, r3 = tl.philox(seed, (j >> 3).to(tl.uint32), (z + i).to(tl.uint32), (z + bh).to(tl.uint32), (z + 1).to(tl.uint32))
        w = (j & 7) >> 1
        word = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
        u = (word >> (16 * (j & 1)).to(tl.uint32)) & 0xFFFF
        tl.store(out_ptr + i * Lk + j, u.to(tl.int64))

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    seed, H, Lq, Lk = 0xDEADBEEF12345678, 3, 4, 32
    out = torch.empty(Lq * Lk, dtype=torch.int64, device=dev)
    k[(Lq,)](out, seed, 1 * H + 2, Lk=Lk)
    ref = philox.dropout_u16(seed, 2, H, Lq, Lk)[1, 2]
    np.testing.assert_array_equal(out.view(Lq, Lk).cpu().numpy(), ref.numpy())
