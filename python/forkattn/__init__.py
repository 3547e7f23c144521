"""forkattn: fused attention (BERT key-padding and GPT causal), MLM masking and KV-cache decoding
kernels for PyTorch, on CPU (C++), CUDA and Triton."""
from . import _native
from ._native import config as _config
from .attention import attention, select_backend
from .backends import BackendUnavailableError, available_backends
from . import reference
from .mlm import mlm_mask
from . import data

__version__ = _config.VERSION


def build_info() -> dict:
    """How this forkattn was built, and which backends are usable now.

    keys: version, torch (the torch it was built against), cuda (CUDA version, None for a CPU
    build), archs (CUDA archs compiled, None for a CPU build), cpu_isa, backends (backend names
    usable now for any op), ops (per op family, the backends usable now).
    """
    ops = available_backends()
    names = sorted({n for names in ops.values() for n in names})
    return {
        "version": _config.VERSION,
        "torch": _config.TORCH_VERSION,
        "cuda": _config.CUDA_VERSION,
        "archs": _config.CUDA_ARCHS,
        "cpu_isa": _config.CPU_ISA,
        "backends": names,
        "ops": ops,
    }


__all__ = [
    "attention",
    "select_backend",
    "build_info",
    "available_backends",
    "BackendUnavailableError",
    "reference",
    "mlm_mask",
    "data",
]
