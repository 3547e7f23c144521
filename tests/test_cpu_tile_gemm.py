"""The CPU attention kernels' tile matmul (csrc/cpu/tiles.h gemm: the AVX2 / AVX512 variants' register-blocked
kernels of csrc/cpu/tile_gemm.h, MKL's sgemm_, or the plain loop), through the test-only binding _tile_gemm_cpu:
every transposition case, odd sizes, leading dimensions above the minimum, alpha and beta, against a
float64 reference with the 2x rule (our error <= 2x torch's fp32 matmul's + 1e-5), on every variant
compiled in that this CPU executes and on each path. beta = 0 must never read C (NaN there must not
leak), and nothing of C outside its m x n entries may change."""
import itertools
import math

import pytest
import torch

from forkattn import _native
from test_cpu_isa import compiled, runs_here

C = _native._C
pytestmark = pytest.mark.skipif(C is None, reason=f"forkattn._C is not built: {_native.ERROR}")

# The tile shapes the kernels make (m, n, k in the column-major convention: e.g. S^T = K Q^T is
# (T, N) with m = keys, n = query rows, k = D), then odd sizes.
KERNEL_SHAPES = [(128, 256, 64), (64, 256, 128), (64, 128, 256), (159, 32, 64), (64, 287, 32)]
ODD = [1, 7, 97, 129]
TRANS = [(False, False), (False, True), (True, False), (True, True)]
# path: the env that selects it (tiles.h): "own" is the default (tile_gemm.h in AVX2 / AVX512, MKL in DEFAULT)
PATHS = {"own": {}, "blas": {"FORKATTN_CPU_TILE_GEMM": "blas"}, "naive": {"FORKATTN_CPU_NAIVE_GEMM": "1"}}


@pytest.fixture(params=["default", "avx2", "avx512"])
def variant(request):
    isa = request.param
    if isa not in compiled():
        pytest.skip(f"the {isa} variant is not compiled in (FORKATTN_CPU_ISAS)")
    if not runs_here(isa):
        pytest.skip(f"this CPU does not execute the {isa} variant")
    assert C._choose_cpu_isa(isa) == isa
    yield isa
    C._choose_cpu_isa("")


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    monkeypatch.delenv("FORKATTN_CPU_TILE_GEMM", raising=False)
    monkeypatch.delenv("FORKATTN_CPU_NAIVE_GEMM", raising=False)
    for k, v in PATHS[request.param].items():
        monkeypatch.setenv(k, v)
    return request.param


def operand(rows, cols, ld, gen, fill=float("nan")):
    """A flat buffer holding a column-major [rows, cols] matrix with leading dimension ld (the gaps
    filled with `fill`), and the matrix as a strided view of it."""
    buf = torch.full((max(0, ld * (cols - 1) + rows) + 5,), fill)
    view = buf.as_strided((rows, cols), (1, ld))
    view.copy_(torch.randn(rows, cols, generator=gen))
    return buf, view


def check_case(ta, tb, m, n, k, alpha, beta, pad, gen):
    ar, ac = (k, m) if ta else (m, k)
    br, bc = (n, k) if tb else (k, n)
    a, av = operand(ar, ac, ar + pad, gen)
    b, bv = operand(br, bc, br + pad, gen)
    c, cv = operand(m, n, m + pad, gen, fill=-7.0)
    if beta == 0:
        cv.fill_(float("nan"))  # never to be read
    c0 = c.clone()
    opa, opb = (av.t() if ta else av), (bv.t() if tb else bv)
    c_in = torch.zeros(m, n, dtype=torch.float64) if beta == 0 else cv.double()
    ref = alpha * (opa.double() @ opb.double()) + beta * c_in
    eager = alpha * (opa @ opb) + (0 if beta == 0 else beta * cv)
    out = C._tile_gemm_cpu(ta, tb, m, n, k, alpha, a, ar + pad, b, br + pad, beta, c, m + pad)
    assert out.data_ptr() == c.data_ptr()
    ours = c.as_strided((m, n), (1, m + pad))
    name = f"ta={ta} tb={tb} m={m} n={n} k={k} alpha={alpha} beta={beta} pad={pad}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite output"
    err = (ours.double() - ref).abs().max().item() if ours.numel() else 0.0
    err_eager = (eager.double() - ref).abs().max().item() if ours.numel() else 0.0
    assert err <= 2 * err_eager + 1e-5, f"{name}: error {err:.3g} vs eager {err_eager:.3g}"
    # everything outside the m x n entries (the ld gaps, the tail) is untouched
    inside = torch.zeros_like(c, dtype=torch.bool)
    inside.as_strided((m, n), (1, m + pad)).fill_(True)
    assert torch.equal(c[~inside], c0[~inside]), f"{name}: wrote outside C"


@pytest.mark.parametrize("ta,tb", TRANS)
def test_kernel_shapes(variant, path, ta, tb):
    gen = torch.Generator().manual_seed(1)
    for (m, n, k), (alpha, beta) in itertools.product(KERNEL_SHAPES, [(1.0, 0.0), (0.125, 1.0)]):
        check_case(ta, tb, m, n, k, alpha, beta, 0, gen)
    check_case(ta, tb, 128, 256, 64, 0.37, -0.5, 11, gen)


@pytest.mark.parametrize("ta,tb", TRANS)
def test_odd_sizes_strides_alpha_beta(variant, path, ta, tb):
    gen = torch.Generator().manual_seed(2)
    for m, n, k in itertools.product(ODD, ODD, ODD):
        # one (alpha, beta, pad) per size, cycling, so each appears with many sizes
        idx = (m * 7 + n * 3 + k) % 6
        alpha, beta = [(1.0, 0.0), (0.37, 1.0), (-1.5, -0.5), (1.0, 1.0), (0.5, 0.0), (2.0, 0.25)][idx]
        check_case(ta, tb, m, n, k, alpha, beta, [0, 3, 17][idx % 3], gen)


def test_degenerate_sizes(variant, path):
    gen = torch.Generator().manual_seed(3)
    for ta, tb in TRANS:
        for m, n, k in [(5, 3, 0), (0, 4, 6), (4, 0, 6), (1, 1, 1)]:
            for beta in (0.0, 0.5):
                check_case(ta, tb, m, n, k, 1.0, beta, 2, gen)


def test_nan_in_the_operands_propagates(variant, path):
    # a NaN of A reaches exactly the row of C it multiplies (no tile may drop or spread it)
    m, n, k = 97, 33, 64
    a = torch.randn(m * k)
    a[5 + 3 * m] = math.nan  # A[5, 3], column-major [m, k]
    b = torch.randn(k * n)
    c = torch.full((m * n,), math.nan)
    C._tile_gemm_cpu(False, False, m, n, k, 1.0, a, m, b, k, 0.0, c, m)
    cm = c.view(n, m).t()
    assert torch.isnan(cm[5]).all() and torch.isfinite(cm[torch.arange(m) != 5]).all()


def test_bad_arguments():
    a, b, c = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    with pytest.raises(ValueError, match="a holds 64 floats"):
        C._tile_gemm_cpu(False, False, 8, 8, 9, 1.0, a, 8, b, 9, 0.0, c, 8)
    with pytest.raises(ValueError, match="b: need ld >= max"):
        C._tile_gemm_cpu(False, False, 4, 4, 4, 1.0, a, 4, b, 3, 0.0, c, 4)
    with pytest.raises(ValueError, match="c must be a contiguous 1-D"):
        C._tile_gemm_cpu(False, False, 4, 4, 4, 1.0, a, 4, b, 4, 0.0, c.view(8, 8), 4)
    with pytest.raises(TypeError, match="c must have dtype Float"):
        C._tile_gemm_cpu(False, False, 4, 4, 4, 1.0, a, 4, b, 4, 0.0, c.double(), 4)
    with pytest.raises(ValueError, match="a: need ld >= max"):
        C._tile_gemm_cpu(False, False, -1, 4, 4, 1.0, a, 4, b, 4, 0.0, c, 4)
