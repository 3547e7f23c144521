"""forkattn: fused attention (BERT key-padding and GPT causal), MLM masking and KV-cache decoding
kernels for PyTorch, on CPU (C++), CUDA and Triton."""
from . import _native
from ._native import config as _config
from .attention import attention, select_backend
from .attention import attention_varlen
from .backends import BackendUnavailableError, available_backends
from . import reference
from .mlm import mlm_mask
from . import data
from .decode import KVCache, KVCacheOverflowError, decode_attention
from .disentangled import disentangled_attention

__version__ = _config.VERSION


def build_info() -> dict:
    """How this forkattn was built, and which backends are usable now.

    keys: version, torch (the torch it was built against), cuda (CUDA version, None for a CPU
    build), archs (CUDA archs compiled, None for a CPU build), cpu_isa (the CPU kernel variant in
    use: "default", "avx2" or "avx512", chosen at the first call from torch's CPU capability or
    FORKATTN_CPU_CAPABILITY; raises ValueError for an unknown FORKATTN_CPU_CAPABILITY), cpu_isas (the
    variants compiled in), compiled (the native
    backends compiled into forkattn._C: "cpu", plus "cuda" for a CUDA build; none when _C is not
    built or failed to load, and forkattn._native.ERROR says why), backends (backend
    names usable now for any op: a CUDA build on a machine without a GPU lists no "cuda"), ops
    (per op family, the backends usable now).
    """
    ops = available_backends()
    names = sorted({n for names in ops.values() for n in names})
    return {
        "version": _config.VERSION,
        "torch": _config.TORCH_VERSION,
        "cuda": _config.CUDA_VERSION,
        "archs": _config.CUDA_ARCHS,
        "cpu_isa": None if _native._C is None else _native._C.cpu_isa(),
        "cpu_isas": [] if _native._C is None else _native._C.cpu_isas_compiled(),
        "compiled": [] if _native._C is None else ["cpu", "cuda"] if _native.WITH_CUDA else ["cpu"],
        "backends": names,
        "ops": ops,
    }


__all__ = [
    "attention",
    "attention_varlen",
    "select_backend",
    "build_info",
    "available_backends",
    "BackendUnavailableError",
    "reference",
    "mlm_mask",
    "data",
    "KVCache",
    "KVCacheOverflowError",
    "decode_attention",
    "disentangled_attention",
]
