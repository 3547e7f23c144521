"""The CPU attention forward's row max (csrc/cpu/tiles.h row_max: in the AVX512 variant two max
chains, a mask OR for NaN and a masked tail). A row max that missed an entry would not show in the
accuracy tests (softmax is shift invariant) unless exp overflows: here one key scores 200 for every
query (exp(200) overflows fp32), at every position class of the row (first, inside a 32-column
step, in the 16-column and the masked tail), so a missed max gives inf / NaN. A NaN score anywhere
in the row must give the NaN row eager gives. Every variant compiled in that this CPU runs."""
import pytest
import torch

from forkattn import _native
from test_gemm_cpu import isa  # noqa: F401  (the fixture: each variant compiled in that runs here)

C = _native._C
pytestmark = pytest.mark.skipif(C is None, reason=f"forkattn._C is not built: {_native.ERROR}")
LENGTHS = [1, 7, 16, 31, 32, 33, 47, 97, 129]


def _inputs(L, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (0.1 * torch.randn(1, 2, L, D, generator=g) for _ in range(3))
    q[..., 0] = 1.0
    return q, k, v


@pytest.mark.parametrize("L", LENGTHS)
def test_the_max_is_found_at_every_position(isa, L):
    D = 32
    for j in sorted({0, L // 2, L - 1, min(L - 1, 33), max(0, L - 9)}):
        q, k, v = _inputs(L, D, seed=j)
        k[..., j, 0] = 200.0 * D ** 0.5  # score 200 against every query
        o, lse = C.attention_fwd_cpu(q, k, v, None, False, D ** -0.5)
        s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
        ref = torch.softmax(s, -1) @ v.double()
        assert torch.isfinite(o).all() and torch.isfinite(lse).all(), f"L={L} j={j}: max missed"
        torch.testing.assert_close(o.double(), ref, rtol=0, atol=1e-5, msg=f"L={L} j={j}")
        torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("L", LENGTHS)
def test_a_nan_score_gives_a_nan_row(isa, L):
    for j in sorted({0, L // 2, L - 1}):
        q, k, v = _inputs(L, seed=j)
        k[..., j, 1] = float("nan")  # NaN in column j of every row's scores
        o, _ = C.attention_fwd_cpu(q, k, v, None, False, 32 ** -0.5)
        eager = torch.softmax(q @ k.transpose(-1, -2) * 32 ** -0.5, -1) @ v
        assert torch.isnan(eager).all()
        assert torch.isnan(o).all(), f"L={L} j={j}"
