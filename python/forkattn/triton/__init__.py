"""Triton kernels. Importing forkattn never fails because of Triton: its absence (or a machine
with neither a GPU nor TRITON_INTERPRET=1) only makes the "triton" backend unavailable."""
import functools
import os
from typing import Optional


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_reason() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(e).__name__}: {e}); pip install triton"
    return None


def unavailable_reason() -> Optional[str]:
    why = _import_reason()
    if why is not None:
        return why
    import torch

    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA device is visible (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter on CPU tensors)"
    return None


def device_ok(device_type: str) -> Optional[str]:
    """Triton runs CUDA tensors, and CPU tensors only under its interpreter."""
    if device_type == "cuda":
        return None
    if device_type == "cpu" and interpreting():
        return None
    return f"needs CUDA tensors (got {device_type}); CPU tensors only under TRITON_INTERPRET=1"
