"""forkattn's backends: the registry (registry.py), each op family's base class (families.py) and
one module per backend: eager.py (plain PyTorch, every device), cpu.py (C++), cuda.py (CUDA
kernels), triton.py (Triton). Adding a backend is adding one module here, listed below.

forkattn.backends.get(op) is the OpFamily of an op ("attention", "attention_varlen",
"decode_attention", "kv_append", "mlm_mask", "disentangled_attention"): .resolve / .why_not / .runnable / .backends.
"""
# each module registers its backend classes; this order is the order of OpFamily.backends
from . import eager, cpu, cuda, triton  # noqa: F401,I001
from .cuda import prefer_cuda_attention
from .registry import (Backend, BackendUnavailableError, Call, FwdBwd, OpFamily, available_backends,
                       clear_caches, family, get, register)

__all__ = ["Backend", "BackendUnavailableError", "Call", "FwdBwd", "OpFamily", "available_backends",
           "clear_caches", "family", "get", "prefer_cuda_attention", "register"]
