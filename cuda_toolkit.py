"""Find the CUDA toolkit that forkattn's extension builds with; used by setup.py and scripts/gpu_check.sh.

Three set-ups work without any environment variable:
  1. a system toolkit that has everything (nvcc, cuda_runtime_api.h, the cuBLAS/cuSPARSE/cuSOLVER
     headers torch's ATen/cuda/CUDAContext.h includes), e.g. /usr/local/cuda;
  2. a toolkit without those math-library headers: they are taken from torch's own nvidia-*
     packages (site-packages/nvidia/*/include), searched after the toolkit's include folder;
  3. PyPI's toolkit only, `pip install "cuda-toolkit[nvcc,crt,nvvm,cccl]==<torch's CUDA version>"`:
     it ships libcudart.so.N but no libcudart.so, so a private folder under build/ gets the link
     that `-lcudart` needs.

An `nvcc` found on PATH may be a wrapper script or a symlink outside the toolkit (torch then guesses
the wrapper's folder as CUDA_HOME and fails on cuda_runtime_api.h): it is followed to the real
binary first. CUDA_HOME (or CUDA_PATH), when set, is used as given and only checked.

`python cuda_toolkit.py` prints what it found and exits 1, naming what is missing, when a CUDA
build cannot work here.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

# Headers torch's ATen/cuda/CUDAContext.h (included by csrc/cuda/) needs beyond the CUDA runtime.
MATH_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


@dataclass
class Toolkit:
    home: Path                    # CUDA_HOME: bin/nvcc and include/cuda_runtime_api.h live here
    nvcc: Path
    version: str                  # "13.0", from nvcc --version
    include_after: List[str] = field(default_factory=list)  # searched after the toolkit's headers
    cudart: Optional[Path] = None  # libcudart.so.N to link through a private unversioned link
    notes: List[str] = field(default_factory=list)          # how it was found, for the build log

    def compile_flags(self) -> List[str]:
        """Host-compiler flags: the extra header folders, after the toolkit's own."""
        return [f"-idirafter{d}" for d in self.include_after]

    def link_flags(self, build_dir: Path) -> List[str]:
        """Linker flags; makes build_dir/cuda-link/libcudart.so when the toolkit lacks that link."""
        if self.cudart is None:
            return []
        link_dir = Path(build_dir) / "cuda-link"
        link_dir.mkdir(parents=True, exist_ok=True)
        link = link_dir / "libcudart.so"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(self.cudart)
        return [f"-L{link_dir}"]


class ToolkitError(RuntimeError):
    """No usable CUDA toolkit; the message lists what was tried and what is missing."""


def _real_nvcc(path: Path, depth: int = 0) -> Path:
    """Follow symlinks and `exec /real/bin/nvcc "$@"` style wrapper scripts to the nvcc binary."""
    path = Path(os.path.realpath(path))
    if depth > 4:
        return path
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return path
    if not head.startswith(b"#!"):
        return path
    for m in re.finditer(rb"(/[^\s\"'$;:`]*/bin/nvcc)(?![\w.-])", head):
        target = Path(m.group(1).decode(errors="replace"))
        if target.is_file() and os.path.realpath(target) != str(path):
            return _real_nvcc(target, depth + 1)
    return path


def _nvcc_version(nvcc: Path) -> Optional[str]:
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _include_dirs(home: Path) -> List[Path]:
    return [home / "include"] + [Path(p) for p in sorted(glob.glob(str(home / "targets" / "*" / "include")))]


def _site_dirs() -> List[Path]:
    """site-packages folders to search for nvidia/* packages, torch's own first."""
    dirs = []
    try:
        import torch

        dirs.append(Path(torch.__file__).resolve().parent.parent)
    except ImportError:
        pass
    dirs += [Path(p) for p in sys.path if p and os.path.isdir(p)]
    seen, out = set(), []
    for d in dirs:
        if str(d) not in seen:
            seen.add(str(d))
            out.append(d)
    return out


def _candidates() -> List[tuple]:
    """(folder, how it was found) in order of preference."""
    found = []
    on_path = shutil.which("nvcc")
    if on_path:
        real = _real_nvcc(Path(on_path))
        how = f"nvcc on PATH ({on_path})" + (f" -> {real}" if str(real) != on_path else "")
        found.append((real.parent.parent, how))
    for pattern in ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda", "/opt/nvidia/cuda*"):
        for p in sorted(glob.glob(pattern), reverse=True):
            found.append((Path(os.path.realpath(p)), p))
    for site in _site_dirs():  # PyPI's toolkit: site-packages/nvidia/cu13/bin/nvcc
        for p in sorted(glob.glob(str(site / "nvidia" / "cu*" / "bin" / "nvcc")), reverse=True):
            found.append((Path(p).parent.parent, f"PyPI toolkit in {site}"))
    seen, unique = set(), []
    for home, how in found:  # /usr/local/cuda is often a link to /usr/local/cuda-13.0
        if os.path.realpath(home) not in seen:
            seen.add(os.path.realpath(home))
            unique.append((home, how))
    return unique


def _check(home: Path, want_major: Optional[str]) -> tuple:
    """(nvcc, version) when `home` is a usable toolkit folder, else (None, why not)."""
    nvcc = home / "bin" / "nvcc"
    if not (nvcc.is_file() and os.access(nvcc, os.X_OK)):
        return None, f"no executable {nvcc}"
    if not any((d / "cuda_runtime_api.h").is_file() for d in _include_dirs(home)):
        return None, f"no {home}/include/cuda_runtime_api.h"
    version = _nvcc_version(nvcc)
    if version is None:
        return None, f"`{nvcc} --version` printed no release number"
    if want_major and version.split(".")[0] != want_major:
        return None, f"nvcc {version}, but torch was built with CUDA {want_major}.x"
    return (nvcc, version), None


def _torch_cuda() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def find(torch_cuda: Optional[str] = None) -> Toolkit:
    """The toolkit to build with, or ToolkitError naming what is missing."""
    torch_cuda = torch_cuda or _torch_cuda()
    if torch_cuda is None:
        raise ToolkitError("the installed torch is a CPU build (torch.version.cuda is None); "
                           "install a CUDA build of torch to build the CUDA kernels")
    want_major = torch_cuda.split(".")[0]
    tried = []
    explicit = [(os.environ[v], v) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for home, how in explicit[:1] or _candidates():
        home = Path(home)
        ok, why = _check(home, want_major)
        if ok is None:
            tried.append(f"{home} ({how}): {why}")
            if explicit:
                break
            continue
        nvcc, version = ok
        return _complete(Toolkit(home=home, nvcc=nvcc, version=version, notes=[f"CUDA_HOME={home} from {how}"]),
                         torch_cuda)
    lines = "\n  ".join(tried) or "no nvcc on PATH and none in /usr/local/cuda*, /opt/cuda or site-packages/nvidia"
    raise ToolkitError(
        f"no usable CUDA {want_major}.x toolkit (torch was built with CUDA {torch_cuda}); tried:\n  {lines}\n"
        f"Install a CUDA {want_major} toolkit, or PyPI's: pip install \"cuda-toolkit[nvcc,crt,nvvm,cccl]=={torch_cuda}.*\" "
        "(pinned to torch's CUDA version), or set CUDA_HOME to the toolkit folder."
    )


def _complete(tk: Toolkit, torch_cuda: str) -> Toolkit:
    """Fill in the headers and the libcudart link the toolkit lacks, or raise saying which."""
    own = _include_dirs(tk.home)
    extra_dirs = []
    for site in _site_dirs():
        extra_dirs += [Path(p) for p in sorted(glob.glob(str(site / "nvidia" / "*" / "include")))]
    missing = []
    for header in MATH_HEADERS:
        if any((d / header).is_file() for d in own):
            continue
        where = next((d for d in extra_dirs if (d / header).is_file()), None)
        if where is None:
            missing.append(header)
        else:
            if str(where) not in tk.include_after:
                tk.include_after.append(str(where))
            tk.notes.append(f"{header} from torch's nvidia packages: {where}")
    if missing:
        raise ToolkitError(
            f"the CUDA toolkit in {tk.home} has no {', '.join(missing)} and torch's nvidia packages "
            f"(site-packages/nvidia/*/include) do not have them either; install torch's CUDA build from "
            f"PyPI (it brings nvidia-cublas/cusparse/cusolver) or the toolkit's math libraries"
        )
    major = tk.version.split(".")[0]
    lib_dir = tk.home / ("lib64" if (tk.home / "lib64").exists() or not (tk.home / "lib").exists() else "lib")
    if not (lib_dir / "libcudart.so").exists():
        versioned = sorted(glob.glob(str(lib_dir / f"libcudart.so.{major}*")))
        if not versioned:
            raise ToolkitError(f"no libcudart.so or libcudart.so.{major} in {lib_dir}: the CUDA runtime "
                               "library is missing (PyPI: pip install nvidia-cuda-runtime)")
        tk.cudart = Path(versioned[0])
        tk.notes.append(f"links {tk.cudart} through a private libcudart.so link (no unversioned one in {lib_dir})")
    if tk.version != ".".join(torch_cuda.split(".")[:2]):
        tk.notes.append(f"nvcc {tk.version} vs torch's CUDA {torch_cuda}: same major version, fine")
    return tk


def main() -> int:
    try:
        tk = find()
    except ToolkitError as e:
        print(f"cuda_toolkit: cannot build the CUDA kernels: {e}", file=sys.stderr)
        return 1
    print(f"cuda_toolkit: nvcc {tk.version} at {tk.nvcc}")
    for note in tk.notes:
        print(f"cuda_toolkit: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
