"""Build forkattn: a CPU extension always, plus the CUDA kernels when a CUDA torch and nvcc exist.

Environment:
  FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible (needs a CUDA torch + nvcc)
  FORKATTN_NO_CUDA=1      never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    CUDA archs, default "9.0"
  MAX_JOBS                parallel compile jobs (ninja), honoured by torch's BuildExtension
  FORKATTN_CPU_ISA        "avx2" (default when the build machine has AVX2+FMA) or "generic"
"""
import os
import platform
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

VERSION = "0.1.0"
ROOT = Path(__file__).resolve().parent


def _rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def _want_cuda() -> bool:
    if os.environ.get("FORKATTN_NO_CUDA", "0") == "1":
        return False
    has_toolchain = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if not has_toolchain:
            raise RuntimeError("FORCE_CUDA=1 needs a CUDA-enabled torch and nvcc (CUDA_HOME)")
        return True
    return has_toolchain and torch.cuda.is_available()


def _cpu_isa() -> str:
    isa = os.environ.get("FORKATTN_CPU_ISA")
    if isa:
        return isa
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "generic"
    return "avx2" if (" avx2" in flags and " fma" in flags and " f16c" in flags) else "generic"


with_cuda = _want_cuda()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
archs = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None
isa = _cpu_isa()

sources = _rel(ROOT.glob("csrc/*.cpp")) + _rel(ROOT.glob("csrc/cpu/*.cpp")) + _rel(ROOT.glob("pyext/*.cpp"))
# -Wno-unknown-pragmas: torch's at::vec headers use `#pragma unroll`, unknown to GCC (and a
# diagnostic pragma cannot silence it before GCC 13).
cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
# at::parallel_for is a header template around `#pragma omp parallel`: without -fopenmp the
# extension's loops silently run on one thread. libgomp.so.1 is the one torch already loaded.
link_flags = []
if platform.system() == "Linux":
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
if isa == "avx2":
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DFORKATTN_CPU_AVX2"]
define_macros = [("FORKATTN_VERSION", f'"{VERSION}"')]
include_dirs = [str(ROOT / "csrc"), str(ROOT / "kernels")]

if with_cuda:
    sources += _rel(ROOT.glob("csrc/cuda/*.cpp")) + _rel(ROOT.glob("kernels/**/*.cu"))
    define_macros.append(("FORKATTN_WITH_CUDA", None))
    ext = CUDAExtension(
        "forkattn._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=link_flags,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills"],
        },
    )
else:
    ext = CppExtension(
        "forkattn._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=link_flags,
        extra_compile_args={"cxx": cxx_flags},
    )

# What the package checks at import: a different torch means a different C++ ABI.
(ROOT / "python" / "forkattn" / "_build_config.py").write_text(
    "# Written by setup.py at build time; do not edit.\n"
    f"VERSION = {VERSION!r}\n"
    f"TORCH_VERSION = {torch.__version__!r}\n"
    f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n"
    f"CUDA_ARCHS = {archs!r}\n"
    f"CPU_ISA = {isa!r}\n"
)

setup(
    name="forkattn",
    version=VERSION,
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
