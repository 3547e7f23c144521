"""Per-ISA variants of the CPU kernels (csrc/cpu/isa.h) and their run-time choice
(csrc/cpu_dispatch.h): every variant this CPU executes passes the 2x rule on every CPU kernel
(tests/cpu_isa_crosscheck.py, one process per variant, chosen with FORKATTN_CPU_CAPABILITY) and
the variants agree closely; the AVX-512 variant is in the binary even where it cannot run, and a
request for it there falls back with a warning; an unknown value raises ValueError."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forkattn
from forkattn import _native

C = _native._C
pytestmark = pytest.mark.skipif(C is None, reason=f"forkattn._C is not built: {_native.ERROR}")
HERE = Path(__file__).resolve().parent
ISAS = ["default", "avx2", "avx512"]
ENTRY_POINTS = ["attention_fwd_kernel", "attention_bwd_kernel", "attention_varlen_fwd_kernel",
                "attention_varlen_bwd_kernel", "kv_append_kernel", "decode_kernel",
                "disentangled_attention_fwd_kernel", "disentangled_attention_bwd_kernel", "bias_gelu_kernel",
                "bias_residual_layernorm_kernel", "mlm_mask_kernel",
                "gemm_kernel", "gemm_pack_kernel", "gemm_panel_width_kernel", "tile_gemm_kernel"]


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def runs_here(isa: str) -> bool:
    flags = cpu_flags()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    return {"default": True, "avx2": avx2,
            "avx512": avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags}[isa]


def compiled() -> list:
    return C.cpu_isas_compiled() if C is not None else []


def run(code_or_file, *args, env=None, timeout=900):
    """python in a fresh process with FORKATTN_CPU_CAPABILITY / ATEN_CPU_CAPABILITY only as given."""
    e = {k: v for k, v in os.environ.items() if k not in ("FORKATTN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    e["PYTHONPATH"] = os.pathsep.join([str(Path(forkattn.__file__).parents[1]), e.get("PYTHONPATH", "")])
    e.update(env or {})
    cmd = [sys.executable, str(code_or_file), *args] if str(code_or_file).endswith(".py") else \
        [sys.executable, "-c", code_or_file, *args]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


SMALL_CALL = ("import torch, forkattn; q = torch.randn(1, 2, 9, 16); "
              "forkattn.attention(q, q, q, backend='cpu'); print(forkattn.build_info()['cpu_isa'])")


@pytest.fixture(scope="module")
def crosscheck(tmp_path_factory):
    """{isa: (CompletedProcess, outputs or None)} for every variant compiled in and executable here."""
    results = {}
    for isa in compiled():
        if runs_here(isa):
            out = tmp_path_factory.mktemp("isa") / f"{isa}.pt"
            proc = run(HERE / "cpu_isa_crosscheck.py", str(out), env={"FORKATTN_CPU_CAPABILITY": isa})
            results[isa] = (proc, torch.load(out) if proc.returncode == 0 else None)
    return results


@pytest.mark.parametrize("isa", ISAS)
def test_variant_passes_the_2x_rule(isa, crosscheck):
    if isa not in compiled():
        pytest.skip(f"the {isa} variant is not compiled in (FORKATTN_CPU_ISAS)")
    if not runs_here(isa):
        pytest.skip(f"this CPU does not execute the {isa} variant")
    proc, _ = crosscheck[isa]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == isa, proc.stdout


def test_variants_agree(crosscheck):
    ran = {isa: outs for isa, (_, outs) in crosscheck.items() if outs is not None}
    if len(ran) < 2:
        pytest.skip(f"fewer than two variants ran here: {sorted(ran)}")
    base_isa, base = next(iter(ran.items()))
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
    for isa, outs in ran.items():
        assert outs.keys() == base.keys()
        for name, a in outs.items():
            b = base[name]
            if not a.is_floating_point():  # the MLM sampler: bit-identical
                assert torch.equal(a, b), f"{name}: {isa} differs from {base_isa}"
                continue
            diff = (a.double() - b.double()).abs().max().item()
            bound = tol[a.dtype] * (1 + b.double().abs().max().item())
            assert diff <= bound, f"{name}: {isa} vs {base_isa} differ by {diff:.3g} > {bound:.3g}"


def test_avx512_variant_is_in_the_binary():
    if "avx512" not in compiled():
        pytest.skip("built without the avx512 variant (FORKATTN_CPU_ISAS)")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to list the extension's symbols")
    syms = subprocess.run([nm, "-C", C.__file__], capture_output=True, text=True, check=True).stdout
    for isa in compiled():
        for name in ENTRY_POINTS:
            assert f"forkattn::cpu::{isa.upper()}::{name}(" in syms, f"{isa} {name} missing from {C.__file__}"


def test_request_above_the_cpu_falls_back_with_a_warning():
    above = [isa for isa in compiled() if not runs_here(isa)]
    if not above:
        pytest.skip("this CPU executes every compiled variant")
    best_here = [isa for isa in compiled() if runs_here(isa)][-1]
    proc = run(SMALL_CALL, env={"FORKATTN_CPU_CAPABILITY": above[-1]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == best_here
    assert "this CPU does not support them" in proc.stderr and f"using the {best_here} ones" in proc.stderr, proc.stderr


def test_torch_choice_is_followed():
    # torch trusts ATEN_CPU_CAPABILITY; we follow it downwards, never above what the CPU executes
    proc = run(SMALL_CALL, env={"ATEN_CPU_CAPABILITY": "default"})
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "default", proc.stderr[-3000:]
    proc = run(SMALL_CALL)
    torch_isa = torch.backends.cpu.get_cpu_capability().lower()
    expect = torch_isa if torch_isa in compiled() and runs_here(torch_isa) else \
        [isa for isa in compiled() if runs_here(isa)][-1]
    assert proc.returncode == 0 and proc.stdout.split()[-1] == expect, proc.stderr[-3000:]


@pytest.mark.parametrize("value", ["sse9", "AVX-512", " "])
def test_unknown_value_raises(value):
    proc = run("import torch, forkattn\n"
               "try:\n    forkattn.attention(*[torch.randn(1, 1, 3, 8)] * 3, backend='cpu')\n"
               "except ValueError as e:\n    print('ValueError:', e)\n",
               env={"FORKATTN_CPU_CAPABILITY": value})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ValueError:" in proc.stdout and "FORKATTN_CPU_CAPABILITY" in proc.stdout, proc.stdout + proc.stderr
    assert "default, avx2, avx512" in proc.stdout


def test_choose_in_process_and_back():
    before = C.cpu_isa()
    try:
        assert C._choose_cpu_isa("default") == "default"
        assert forkattn.build_info()["cpu_isa"] == "default"
        with pytest.raises(ValueError, match="FORKATTN_CPU_CAPABILITY"):
            C._choose_cpu_isa("neon9")
        assert C.cpu_isa() == "default"  # a bad request changes nothing
    finally:
        C._choose_cpu_isa(before)
    assert C.cpu_isa() == before


def test_supported_variants_follow_the_cpu_flags():
    """_C.cpu_isas_supported (csrc/cpu_dispatch.cpp runs_here, what the fast path's weight_kind asks)
    agrees with this file's own reading of /proc/cpuinfo."""
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    assert C.cpu_isas_supported() == [isa for isa in ISAS if runs_here(isa)]
