"""Build forkattn: a CPU extension always, plus the CUDA kernels when a CUDA torch and nvcc exist.

Environment:
  FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible (needs a CUDA torch + nvcc)
  FORKATTN_NO_CUDA=1      never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    CUDA archs, default "9.0"
  MAX_JOBS                parallel compile jobs (ninja), honoured by torch's BuildExtension
  FORKATTN_CPU_ISA        "avx2" (default when the build machine has AVX2+FMA) or "generic"
  FORKATTN_BUILD_DIR      where ninja keeps objects between builds (default build/, one folder per
                          torch version and CUDA/CPU flavour): a rebuild compiles only what changed
  CUDA_HOME               the CUDA toolkit; found on its own when unset (cuda_toolkit.py)
"""
import os
import platform
import sys
from pathlib import Path

from setuptools import find_packages, setup

import torch

VERSION = "0.1.0"
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import cuda_toolkit  # noqa: E402  (next to this file; scripts/gpu_check.sh runs the same search)


def _toolkit():
    """The CUDA toolkit to build with (None when torch is a CPU build or none is usable), found
    before torch.utils.cpp_extension reads CUDA_HOME at import."""
    if torch.version.cuda is None or os.environ.get("FORKATTN_NO_CUDA", "0") == "1":
        return None, "the installed torch is a CPU build"
    try:
        tk = cuda_toolkit.find()
    except cuda_toolkit.ToolkitError as e:
        return None, str(e)
    os.environ["CUDA_HOME"] = str(tk.home)
    return tk, None


toolkit, no_toolkit_reason = _toolkit()
import torch.utils.cpp_extension as cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if toolkit is not None:
    cpp_extension.CUDA_HOME = str(toolkit.home)  # in case something imported it before us


def _rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def _want_cuda() -> bool:
    if os.environ.get("FORKATTN_NO_CUDA", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if toolkit is None:
            raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {no_toolkit_reason}")
        return True
    return toolkit is not None and torch.cuda.is_available()


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
define_macros = []
include_dirs = [str(ROOT / "csrc"), str(ROOT / "kernels")]

# One persistent ninja folder per (torch, flavour): `pip install -e .` and `setup.py build_ext`
# reuse the objects of the last build and recompile only what changed (ninja tracks headers too).
flavour = f"cuda{torch.version.cuda}-sm{archs.replace(' ', '_').replace(';', '_')}" if with_cuda else "cpu"
build_temp = Path(os.environ.get("FORKATTN_BUILD_DIR", ROOT / "build")) / f"temp-torch{torch.__version__}-{flavour}-{isa}"
# Every header, so that setuptools does not skip the build when only a header changed.
depends = _rel(p for pattern in ("csrc/**/*.h", "kernels/**/*.h", "kernels/**/*.cuh") for p in ROOT.glob(pattern))

if with_cuda:
    print(f"forkattn: building the CUDA kernels for {archs} with nvcc {toolkit.version}", flush=True)
    for note in toolkit.notes:
        print(f"forkattn: {note}", flush=True)
    sources += _rel(ROOT.glob("csrc/cuda/*.cpp")) + _rel(ROOT.glob("kernels/**/*.cu"))
    define_macros.append(("FORKATTN_WITH_CUDA", None))
    ext = CUDAExtension(
        "forkattn._C",
        sources,
        depends=depends,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=link_flags + toolkit.link_flags(build_temp),
        extra_compile_args={
            "cxx": cxx_flags + toolkit.compile_flags(),
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills"],
        },
    )
else:
    if no_toolkit_reason and torch.version.cuda is not None:
        print(f"forkattn: CPU kernels only: {no_toolkit_reason}", flush=True)
    ext = CppExtension(
        "forkattn._C",
        sources,
        depends=depends,
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


class PersistentBuildExt(BuildExtension):
    """torch's ninja build in the fixed folder `build_temp` (pip's editable install would use a
    fresh temporary folder and recompile everything), with ninja's [n/N] progress lines shown."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = str(build_temp)
        # Always hand over to ninja (a no-op when nothing changed): setuptools' own up-to-date
        # check would keep a CPU-only _C after switching to FORCE_CUDA=1 with unchanged sources.
        self.force = True
        os.environ.setdefault("NINJA_STATUS", "[%f/%t %es] ")


setup(
    name="forkattn",
    version=VERSION,
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[ext],
    cmdclass={"build_ext": PersistentBuildExt.with_options(use_ninja=True)},
    zip_safe=False,
)
