"""Loads forkattn._C after checking it was built against the torch that is imported now.

A C++ extension built against another torch fails with undefined symbols (or worse);
comparing versions first turns that into an ImportError that says how to rebuild.
"""
import torch

_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` (or `make build`) in the forkattn checkout"

try:
    from . import _build_config as config
except ImportError as e:  # never built
    raise ImportError(f"forkattn's native extension is not built: {_REBUILD}") from e

if config.TORCH_VERSION != torch.__version__:
    raise ImportError(
        f"forkattn was built against torch {config.TORCH_VERSION} but torch {torch.__version__} is "
        f"imported; {_REBUILD}"
    )

try:
    from . import _C  # noqa: E402
except ImportError as e:
    raise ImportError(f"forkattn's native extension failed to load ({e}); {_REBUILD}") from e

WITH_CUDA: bool = bool(_C.compiled_with_cuda())
