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


@functools.lru_cache(maxsize=None)
def interpreter_compat() -> None:
    """Make Triton 3.6's interpreter run loops with runtime bounds under NumPy >= 2.4.

    The interpreter holds every scalar as a NumPy array of shape (1,) and converts a loop bound
    with `int(array)`, which NumPy 2.4 rejects ("only 0-dimensional arrays can be converted to
    Python scalars"), so any `for i in range(start, n)` with a non-constexpr bound fails. This
    adds one more `__index__` patch on top of the interpreter's own (same scope, restored with it)
    that reads the single element. A no-op when not interpreting or when NumPy still accepts it.
    Kernel modules call it at import.
    """
    if not interpreting() or _import_reason() is not None:
        return
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_forkattn_compat", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._forkattn_compat = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
