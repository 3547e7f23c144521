"""The FMA order of cpu/regblock.h's register block, the one block behind both the packed-panel GEMM
(csrc/cpu/gemm_cpu.cpp) and the attention kernels' tile matmuls (csrc/cpu/tile_gemm.h), pinned bit
for bit.

1. Against a reference that runs the kernels' exact arithmetic in Python: per output one chain over
   k in order, acc = fma(a, b, acc) from 0 in fp32 (emulated in fp64: the product of two floats is
   exact there, so only the fp64 sum's double rounding could differ, a case of ~2^-29 per step that
   the fixed data below does not hit), then each caller's epilogue: the panel GEMM's bias add, the
   tile matmul's alpha * acc (+ fma(beta, C, .)) per k step of 128. The DEFAULT panel GEMM (x86-64
   baseline, no FMA) is pinned to the unfused chain acc + a * b. Reordering the k loop, splitting a
   chain or dropping the fusion fails these.
2. Against another build (the tree before a change, e.g. main's): with FORKATTN_BITWISE_REF_TREE set
   to a tree's python/ folder, a subprocess dumps that build's outputs (this file run as a script)
   and every output here, GELU epilogue included, must equal them bit for bit (so must the CPU
   attention forward's output and lse: its softmax's row max, tiles.h row_max, is exact). Skipped
   otherwise.
"""
import os
import platform
import subprocess
import sys

import pytest
import torch

from forkattn import _native

C = _native._C
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "gemm_pack_cpu"), reason=f"forkattn._C: {_native.ERROR}")
GEMM_SHAPES = [(17, 97, 130), (8, 48, 64), (5, 25, 7)]  # (M, N, K): full and partial panels, row tails
TILE_SHAPES = [(97, 33, 64), (7, 129, 200), (64, 128, 32)]  # (m, n, k), column-major as _tile_gemm_cpu
TRANS = [(False, False), (False, True), (True, False)]  # the products the attention kernels make


def _variants():
    from test_cpu_isa import compiled, runs_here
    return [i for i in ("default", "avx2", "avx512") if i in compiled() and runs_here(i)]


def _gemm_data(M, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)


def _tile_data(ta, tb, m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m * k, generator=g)  # column-major op(A): [m, k], or [k, m] when ta
    b = torch.randn(k * n, generator=g)
    c = torch.randn(m * n, generator=g)
    return a, b, c


def _run_all(variants):
    """Every output this test pins, keyed by case, from the forkattn on sys.path."""
    out, before = {}, C.cpu_isa()
    try:
        for isa in variants:
            C._choose_cpu_isa(isa)
            for s, (M, N, K) in enumerate(GEMM_SHAPES):
                x, w, b = _gemm_data(M, N, K, s)
                packed = C.gemm_pack_cpu(w)
                for ep in (0, 1, 2):
                    y = torch.full((M, N), float("nan"))
                    C.gemm_packed_cpu(x, packed, N, b, ep, y, 0, N)
                    out[f"gemm {isa} {M}x{N}x{K} ep{ep}"] = y
            for B, L, D in ((1, 97, 32), (2, 128, 64)):  # the online softmax (tiles.h row_max) beside them
                g = torch.Generator().manual_seed(L)
                q, k, v = (torch.randn(B, 3, L, D, generator=g) for _ in range(3))
                kpm = torch.arange(L)[None, :] < torch.tensor([L, L // 2 + 1])[:B, None]
                o, lse = C.attention_fwd_cpu(q, k, v, kpm, False, D ** -0.5)
                out[f"attn {isa} B{B} L{L} D{D}"], out[f"lse {isa} B{B} L{L} D{D}"] = o, lse
            if isa == "default":
                continue  # the tile matmuls' own path exists in AVX2 / AVX512 (DEFAULT runs MKL)
            for s, (m, n, k) in enumerate(TILE_SHAPES):
                for ta, tb in TRANS:
                    for alpha, beta in ((1.0, 0.0), (0.37, -0.5)):
                        a, b, c = _tile_data(ta, tb, m, n, k, s)
                        C._tile_gemm_cpu(ta, tb, m, n, k, alpha, a, k if ta else m, b, n if tb else k, beta, c, m)
                        out[f"tile {isa} {m}x{n}x{k} ta={ta} tb={tb} a={alpha} b={beta}"] = c
    finally:
        C._choose_cpu_isa(before)
    return out


def _chain(a, b, fused):
    """acc[i, j] = sum over p of a[i, p] * b[p, j] as the kernels' one chain per output, in fp32."""
    acc = torch.zeros(a.shape[0], b.shape[1])
    for p in range(a.shape[1]):
        prod = a[:, p:p + 1].double() * b[p:p + 1, :].double()  # exact
        acc = (acc.double() + (prod if fused else prod.float().double())).float()
    return acc


@pytest.fixture(scope="module")
def ours():
    os.environ.pop("FORKATTN_CPU_TILE_GEMM", None)
    os.environ.pop("FORKATTN_CPU_NAIVE_GEMM", None)
    return _run_all(_variants())


def test_panel_gemm_is_one_fma_chain_per_output(ours):
    vs = [v for v in _variants() if v != "default" or platform.machine() in ("x86_64", "AMD64")]
    assert vs
    for isa in vs:
        for s, (M, N, K) in enumerate(GEMM_SHAPES):
            x, w, b = _gemm_data(M, N, K, s)
            acc = _chain(x, w.t(), fused=isa != "default")
            assert torch.equal(ours[f"gemm {isa} {M}x{N}x{K} ep0"], acc), f"{isa} {M}x{N}x{K}"
            assert torch.equal(ours[f"gemm {isa} {M}x{N}x{K} ep1"], acc + b), f"{isa} {M}x{N}x{K} bias"


def test_tile_matmul_is_one_fma_chain_per_output(ours):
    vs = [v for v in _variants() if v != "default"]
    if not vs:
        pytest.skip("no AVX2 / AVX512 variant runs here")
    for isa in vs:
        for s, (m, n, k) in enumerate(TILE_SHAPES):
            for ta, tb in TRANS:
                for alpha, beta in ((1.0, 0.0), (0.37, -0.5)):
                    a, b, c = _tile_data(ta, tb, m, n, k, s)
                    opa = a.view(m, k) if ta else a.view(k, m).t()  # column-major storage
                    opb = b.view(k, n) if tb else b.view(n, k).t()
                    want = c.view(n, m).t().clone()
                    for p0 in range(0, k, 128):  # k steps of 128: beta on the first, then 1
                        acc = _chain(opa[:, p0:p0 + 128], opb[p0:p0 + 128], fused=True)
                        r = acc * alpha
                        bs = beta if p0 == 0 else 1.0
                        want = r if bs == 0 else (bs * want.double() + r.double()).float()
                    got = ours[f"tile {isa} {m}x{n}x{k} ta={ta} tb={tb} a={alpha} b={beta}"].view(n, m).t()
                    assert torch.equal(got, want), f"{isa} {m}x{n}x{k} ta={ta} tb={tb} alpha={alpha} beta={beta}"


@pytest.mark.skipif(not os.environ.get("FORKATTN_BITWISE_REF_TREE"),
                    reason="set FORKATTN_BITWISE_REF_TREE to another tree's python/ folder to compare with its build")
def test_equal_to_another_build_bitwise(ours, tmp_path):
    ref_file = tmp_path / "ref.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.environ["FORKATTN_BITWISE_REF_TREE"],
                                                        os.path.dirname(os.path.abspath(__file__))]))
    subprocess.run([sys.executable, os.path.abspath(__file__), str(ref_file), ",".join(_variants())], env=env,
                   check=True, cwd=tmp_path)
    ref = torch.load(ref_file)
    assert set(ref) == set(ours)
    for key in ours:
        assert torch.equal(ours[key], ref[key]), key


if __name__ == "__main__":  # dump this build's outputs: python test_regblock_bitwise.py OUT.pt VARIANTS
    import forkattn
    print("reference build:", forkattn.__file__, file=sys.stderr)
    torch.save(_run_all(sys.argv[2].split(",")), sys.argv[1])
