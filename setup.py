"""Build forkattn: a CPU extension always, plus the CUDA kernels when a CUDA torch and nvcc exist.

Environment:
  FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible (needs a CUDA torch + nvcc)
  FORKATTN_NO_CUDA=1      never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    CUDA archs, default "9.0"
  MAX_JOBS                parallel compile jobs (ninja), honoured by torch's BuildExtension
  FORKATTN_CPU_ISAS       the per-ISA variants of the CPU kernels to compile, comma-separated from
                          default, avx2, avx512 (default: all three on x86-64, "default" elsewhere);
                          the extension picks one at run time (csrc/cpu_dispatch.h)
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


# The CPU kernels (csrc/cpu/*.cpp) are compiled once per ISA, as ATen compiles its native/cpu
# kernels: each variant's flags and CPU_CAPABILITY macros (csrc/cpu/isa.h). Everything else is
# compiled once for the baseline, and the extension calls the variant chosen at run time.
CPU_ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _cpu_isas() -> list:
    x86 = platform.machine() in ("x86_64", "AMD64")
    want = os.environ.get("FORKATTN_CPU_ISAS", "default,avx2,avx512" if x86 else "default")
    isas = [i.strip().lower() for i in want.split(",") if i.strip()]
    bad = [i for i in isas if i not in CPU_ISA_FLAGS]
    if bad:
        raise SystemExit(f"FORKATTN_CPU_ISAS={want!r}: unknown {bad}; expected a list from {list(CPU_ISA_FLAGS)}")
    if not x86 and isas != ["default"]:
        raise SystemExit(f"FORKATTN_CPU_ISAS={want!r}: only 'default' exists on {platform.machine()}")
    # "default" is always compiled (the fallback), and first: the link order matters (PersistentBuildExt).
    return [i for i in CPU_ISA_FLAGS if i in isas or i == "default"]


with_cuda = _want_cuda()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
archs = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None
cpu_isas = _cpu_isas()

sources = _rel(ROOT.glob("csrc/*.cpp")) + _rel(ROOT.glob("pyext/*.cpp"))
cpu_kernel_sources = _rel(ROOT.glob("csrc/cpu/*.cpp"))  # compiled once per ISA: PersistentBuildExt
# -Wno-unknown-pragmas: torch's at::vec headers use `#pragma unroll`, unknown to GCC (and a
# diagnostic pragma cannot silence it before GCC 13).
cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
# at::parallel_for is a header template around `#pragma omp parallel`: without -fopenmp the
# extension's loops silently run on one thread. libgomp.so.1 is the one torch already loaded.
link_flags = []
if platform.system() == "Linux":
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
define_macros = [(f"FORKATTN_CPU_HAVE_{i.upper()}", None) for i in cpu_isas if i != "default"]
include_dirs = [str(ROOT / "csrc"), str(ROOT / "kernels")]

# One persistent ninja folder per (torch, flavour): `pip install -e .` and `setup.py build_ext`
# reuse the objects of the last build and recompile only what changed (ninja tracks headers too).
flavour = f"cuda{torch.version.cuda}-sm{archs.replace(' ', '_').replace(';', '_')}" if with_cuda else "cpu"
build_temp = Path(os.environ.get("FORKATTN_BUILD_DIR", ROOT / "build")) / f"temp-torch{torch.__version__}-{flavour}"
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
    f"CPU_ISAS = {cpu_isas!r}\n"
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

    def build_extension(self, ext):
        """Compile csrc/cpu/*.cpp once per ISA variant (own flags, own ninja folder, so each stays
        incremental) and link those objects after the others, in the order default, avx2, avx512.
        The order matters: an inline function (a torch or std template) that several objects
        emit is taken by the linker from the first object that has it, so a baseline or AVX2 caller
        never ends up in a copy compiled for a wider ISA than its own."""
        objects = []
        for cpu_isa in cpu_isas:
            args = {key: list(flags) for key, flags in ext.extra_compile_args.items()}
            args["cxx"] += CPU_ISA_FLAGS[cpu_isa] + [f"-DCPU_CAPABILITY={cpu_isa.upper()}", f"-DCPU_CAPABILITY_{cpu_isa.upper()}"]
            print(f"forkattn: CPU kernels, {cpu_isa} variant", flush=True)
            objects += self.compiler.compile(
                cpu_kernel_sources, output_dir=str(build_temp / f"cpu-{cpu_isa}"), macros=ext.define_macros,
                include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=args, depends=ext.depends)
        ext.extra_objects = objects
        super().build_extension(ext)


setup(
    name="forkattn",
    version=VERSION,
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[ext],
    cmdclass={"build_ext": PersistentBuildExt.with_options(use_ninja=True)},
    zip_safe=False,
)
