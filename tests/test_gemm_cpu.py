"""The packed-panel GEMM of the BERT CPU fast path (csrc/gemm.h, csrc/cpu/gemm_cpu.cpp):
_C.gemm_pack_cpu and _C.gemm_packed_cpu against an fp64 reference with the 2x rule (our max error
<= 2x torch's fp32 F.linear error + 1e-5), at odd sizes (every row-tile and panel edge), into
strided outputs and column slices, with the bias and bias + exact GELU epilogues, in every CPU
kernel variant compiled in that this CPU runs (each with its own panel width: 48 columns for the
AVX-512 tile, 24 for AVX2 / DEFAULT); bad arguments, and a weight packed for another variant's
panel width, raise exceptions naming them."""
import pytest
import torch
import torch.nn.functional as F

from forkattn import _native

from attn_utils import assert_within_budget
from test_cpu_isa import compiled, runs_here

C = _native._C
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "gemm_pack_cpu"),
                                reason=f"forkattn._C without the packed-panel GEMM: {_native.ERROR}")
EPILOGUES = {0: "none", 1: "bias", 2: "bias+gelu"}
WIDTHS = {"default": 24, "avx2": 24, "avx512": 48}  # each variant's panel width (csrc/cpu/gemm_cpu.cpp)


@pytest.fixture(params=[i for i in ["default", "avx2", "avx512"] if i in compiled() and runs_here(i)])
def isa(request):
    before = C.cpu_isa()
    assert C._choose_cpu_isa(request.param) == request.param
    yield request.param
    C._choose_cpu_isa(before)


def _data(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / max(K, 1) ** 0.5, torch.randn(N, generator=g)


def _expected(x, w, b, epilogue, dtype):
    y = F.linear(x.to(dtype), w.to(dtype), None if epilogue == 0 else b.to(dtype))
    return F.gelu(y) if epilogue == 2 else y


def _check(name, ours, x, w, b, epilogue):
    assert_within_budget(name, ours, _expected(x, w, b, epilogue, torch.float32), _expected(x, w, b, epilogue, torch.float64))


def _gemm(x, w, b, epilogue, y=None, n0=0, n1=None):
    N = w.shape[0]
    packed = C.gemm_pack_cpu(w)
    y = torch.full((x.shape[0], N), float("nan")) if y is None else y
    C.gemm_packed_cpu(x, packed, N, b, epilogue, y, n0, N if n1 is None else n1)
    return y


@pytest.mark.parametrize("K", [1, 7, 64, 97, 513])
@pytest.mark.parametrize("N", [1, 7, 16, 17, 24, 25, 47, 48, 49, 97, 1025])
@pytest.mark.parametrize("M", [1, 4, 5, 7, 8, 9, 15, 17, 97, 128, 129])
def test_sizes_within_budget(isa, M, N, K):
    """Every row-tile remainder of the 4- and 8-row tiles, every panel edge of 24 and 48 columns."""
    assert C.gemm_panel_cols() == WIDTHS[isa]
    x, w, b = _data(M, N, K)
    epilogue = (M + N + K) % 3  # every epilogue across the grid (each one fully below)
    _check(f"{isa} M{M} N{N} K{K} {EPILOGUES[epilogue]}", _gemm(x, w, b, epilogue), x, w, b, epilogue)


@pytest.mark.parametrize("M,N,K", [(1025, 97, 129), (7, 129, 1025), (0, 48, 7), (3, 0, 5)])
def test_large_and_empty_sizes(isa, M, N, K):
    """M and K of 1025 (a last row tile of one row; K past the k-unroll), and M or N of 0 (nothing
    to write: y stays as it was)."""
    x, w, b = _data(M, N, K, seed=3)
    for ep in (0, 1, 2):
        y = _gemm(x, w, b, ep)
        if M and N:
            _check(f"{isa} M{M} N{N} K{K} {EPILOGUES[ep]}", y, x, w, b, ep)
        else:
            assert y.shape == (M, N)


@pytest.mark.parametrize("epilogue", [0, 1, 2])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 17, 97), (129, 1025, 64), (128, 384, 1536), (13, 40, 5000)])
def test_variants_and_epilogues(isa, epilogue, M, N, K):
    """K = 5000 passes the kernel's K blocking (4096): the second block adds onto the stored first."""
    x, w, b = _data(M, N, K, seed=M + N + K)
    x[0, 0] = 30.0  # large pre-activations: GELU's tails
    _check(f"{isa} M{M} N{N} K{K} {EPILOGUES[epilogue]}", _gemm(x, w, b, epilogue), x, w, b, epilogue)


def test_empty_sum_gives_the_epilogue_of_zero(isa):
    x, w, b = torch.empty(5, 0), torch.empty(9, 0), torch.randn(9)
    for ep in (0, 1, 2):
        _check(f"{isa} K0 {EPILOGUES[ep]}", _gemm(x, w, b, ep), x, w, b, ep)
    assert C.gemm_pack_cpu(w).numel() == 0


def test_strided_rows_column_slices_and_panel_ranges(isa):
    """x with a row stride (a column slice of a wider activation), y a column slice of a wider buffer
    (the native layer's [T, 3H]), written by panel ranges as the column split does: the columns
    outside the slice stay untouched."""
    M, N, K = 97, 1025, 97
    big_x = torch.randn(M, K + 11)
    x = big_x[:, 3:3 + K]
    _, w, b = _data(M, N, K)
    packed, NR = C.gemm_pack_cpu(w), WIDTHS[isa]
    buf = torch.full((M, N + 40), -7.0)
    y = buf[:, 24:24 + N]
    panels = -(-N // NR)
    for n0, n1 in [(0, NR), (NR, 10 * NR), (10 * NR, (panels - 1) * NR), ((panels - 1) * NR, N)]:
        C.gemm_packed_cpu(x, packed, N, b, 2, y, n0, n1)
    _check(f"{isa} strided", y, x, w, b, 2)
    assert (buf[:, :24] == -7).all() and (buf[:, 24 + N:] == -7).all()


def test_pack_layout(isa):
    """[panels, K, NR]: panels of the variant's NR output columns, k-major, the last one
    zero-padded; any strides of w."""
    NR = C.gemm_panel_cols()
    assert NR == WIDTHS[isa]
    w = torch.arange(3 * (NR + 3), dtype=torch.float32).view(NR + 3, 3)
    panels = C.gemm_pack_cpu(w.t().contiguous().t())  # column-major w
    assert panels.shape == (2, 3, NR) and panels.is_contiguous()
    assert torch.equal(panels[0], w[:NR].t())
    assert torch.equal(panels[1, :, :3], w[NR:].t()) and (panels[1, :, 3:] == 0).all()


def test_bad_arguments_name_them(isa):
    x, w, b = _data(4, 20, 8)
    p, y, NR = C.gemm_pack_cpu(w), torch.empty(4, 20), C.gemm_panel_cols()
    ok = dict(x=x, packed=p, N=20, bias=b, epilogue=1, y=y, n0=0, n1=20)
    bad = [
        (dict(x=x.double()), TypeError, "x"),
        (dict(packed=p.double()), TypeError, "packed"),
        (dict(packed=p[:, :-1]), ValueError, "packed must be a weight packed by gemm_pack_cpu for .N, K. = .20, 8."),
        (dict(packed=p.flatten()), ValueError, "packed must be a weight packed by gemm_pack_cpu"),  # the old 1-D form
        (dict(packed=torch.cat([p, p])), ValueError, "packed must be"),  # two panels for one
        (dict(packed=torch.zeros(1, 8, 2 * NR)[:, :, :NR]), ValueError, "packed must be a .*contiguous"),
        (dict(N=19), ValueError, "y must be"),  # 19 columns pack into the same panel: y catches it
        (dict(N=NR + 1), ValueError, "packed"),
        (dict(x=x.t().contiguous().t()), ValueError, "x must have unit column stride"),
        (dict(x=x[:, :7]), ValueError, "packed"),  # K 7 against a weight packed for K 8
        (dict(y=torch.empty(4, 21)), ValueError, "y must be"),
        (dict(y=torch.empty(3, 20)), ValueError, "y must be"),
        (dict(y=torch.empty(20, 4).t()), ValueError, "y must have unit column stride"),
        (dict(y=y.double()), TypeError, "y"),
        (dict(bias=None), ValueError, "bias must be given"),
        (dict(bias=b[:19]), ValueError, "bias must be"),
        (dict(bias=b.double()), TypeError, "bias"),
        (dict(epilogue=3), ValueError, "epilogue"),
        (dict(n0=8), ValueError, "n0 and n1"),
        (dict(n1=21), ValueError, "n0 and n1"),
        (dict(n0=NR, n1=8), ValueError, "n0 and n1"),
    ]
    for change, exc, match in bad:
        with pytest.raises(exc, match=match):
            C.gemm_packed_cpu(**{**ok, **change})
    with pytest.raises(ValueError, match="w must be .out_features, in_features."):
        C.gemm_pack_cpu(torch.randn(3))
    with pytest.raises(TypeError, match="w"):
        C.gemm_pack_cpu(torch.randn(3, 3, dtype=torch.float64))
    C.gemm_packed_cpu(**ok)  # and the unchanged call works
    _check("ok", y, x, w, b, 1)


@pytest.mark.skipif(not all(i in compiled() and runs_here(i) for i in ("avx2", "avx512")),
                    reason="needs the AVX2 and AVX-512 variants, compiled in and runnable here")
def test_weight_packed_for_another_variant_raises():
    """A process may switch variants (FORKATTN_CPU_CAPABILITY, _choose_cpu_isa): a weight packed into
    24-column panels (AVX2) is never read as 48-column ones (AVX-512) or back, by the GEMM or by the
    native layer, even where the two hold the same number of floats (N = 48 here)."""
    before = C.cpu_isa()
    x, w, b = _data(5, 48, 16)
    y = torch.empty(5, 48)
    try:
        for packer, user, got, want in (("avx2", "avx512", 24, 48), ("avx512", "avx2", 48, 24)):
            C._choose_cpu_isa(packer)
            p = C.gemm_pack_cpu(w)
            C._choose_cpu_isa(user)
            with pytest.raises(ValueError, match=f"packed was packed into panels of {got} columns .*the variant "
                                                 f"in use .{user}. reads panels of {want}"):
                C.gemm_packed_cpu(x, p, 48, b, 1, y, 0, 48)
            C._choose_cpu_isa(packer)
            C.gemm_packed_cpu(x, p, 48, b, 1, y, 0, 48)  # and under its own variant it is right
            _check(f"{packer} after the refusal", y, x, w, b, 1)
    finally:
        C._choose_cpu_isa(before)


@pytest.mark.skipif(not all(i in compiled() and runs_here(i) for i in ("avx2", "avx512")),
                    reason="needs the AVX2 and AVX-512 variants, compiled in and runnable here")
@pytest.mark.parametrize("epilogue", [0, 1, 2])
def test_avx512_tile_equals_avx2_tile_bitwise(epilogue):
    """Both tiles sum each output over k in one FMA chain in the same order and share the epilogue's
    math (bias, then cpu/gelu.h's 8-wide GELU), so the AVX-512 tile changes the speed, not one bit of
    the result: the accuracy measured for the AVX2 tile (docs/CPU_INFERENCE.md) carries over. (Only
    the GELU of the AVX2 tile's last, partial panel differs by rounding: a scalar std::erf loop there,
    where the AVX-512 tile's masked stores keep the vector GELU.)"""
    before = C.cpu_isa()
    x, w, b = _data(129, 1025, 97, seed=11)
    outs = []
    try:
        for isa in ("avx2", "avx512"):
            C._choose_cpu_isa(isa)
            outs.append(_gemm(x, w, b, epilogue))
    finally:
        C._choose_cpu_isa(before)
    full = 1025 // 24 * 24 if epilogue == 2 else 1025  # the AVX2 tile's full panels
    assert torch.equal(outs[0][:, :full], outs[1][:, :full])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
