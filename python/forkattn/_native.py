"""Loads forkattn._C after checking it was built against the torch that is imported now.

A C++ extension built against another torch fails with undefined symbols (or worse); comparing
versions first turns that into an ImportError that says how to rebuild. An extension that is not
built, or fails to load, does not stop `import forkattn`: _C is None, ERROR says why, and the
backends that need it ("cpu", "cuda") are unavailable with that reason, while "eager" (and "triton"
where it runs) still work.
"""
from types import SimpleNamespace
from typing import Optional

import torch

_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` (or `make build`) in the forkattn checkout"

_C = None
ERROR: Optional[str] = None  # why _C is None

try:
    from . import _build_config as config
except ImportError:  # never built
    config = SimpleNamespace(VERSION=None, TORCH_VERSION=None, CUDA_VERSION=None, CUDA_ARCHS=None, CPU_ISAS=None)
    ERROR = f"forkattn's native extension is not built: {_REBUILD}"

if ERROR is None:
    if config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"forkattn was built against torch {config.TORCH_VERSION} but torch {torch.__version__} is "
            f"imported; {_REBUILD}"
        )
    try:
        from . import _C  # noqa: E402
    except ImportError as e:
        ERROR = f"forkattn's native extension failed to load ({e}); {_REBUILD}"

WITH_CUDA: bool = _C is not None and bool(_C.compiled_with_cuda())
