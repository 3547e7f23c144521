"""Backend registry: every op family (attention, mlm_mask, decode_attention, ...) registers
its implementations here; `resolve` turns a user's `backend=` argument into one of them.

A backend answers two questions: is it usable in this process at all (compiled, installed),
and does it support these inputs (device, dtype, head_dim, ...). `backend=None` walks the
family's preference order and takes the first backend that says yes to both; a named backend
that says no raises an error carrying its reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

Reason = Optional[str]  # None means "yes"


class BackendUnavailableError(RuntimeError):
    """A named backend cannot run these inputs here; the message says why."""


@dataclass
class Backend:
    name: str
    available: Callable[[], Reason]
    supports: Callable[..., Reason]
    impl: object = None  # what the op family calls: functions, a module, ...


@dataclass
class OpBackends:
    op: str
    # device type ("cpu", "cuda", ...) -> backend names, fastest first
    preference: Dict[str, List[str]]
    backends: Dict[str, Backend] = field(default_factory=dict)

    def register(
        self, name: str, *, available: Callable[[], Reason], supports: Callable[..., Reason], impl: object = None
    ) -> None:
        self.backends[name] = Backend(name, available, supports, impl)

    def impl(self, name: str) -> object:
        return self.backends[name].impl

    def available_names(self) -> List[str]:
        return [n for n, b in self.backends.items() if b.available() is None]

    def why_not(self, name: str, device_type: str, **ctx) -> Reason:
        """None when backend `name` can run a call with this context, else the reason."""
        b = self.backends.get(name)
        if b is None:
            return f"no backend {name!r} for {self.op} in this build"
        return b.available() or b.supports(device_type=device_type, **ctx)

    def resolve(self, backend: Optional[str], device_type: str, **ctx) -> str:
        if backend is not None:
            if not isinstance(backend, str) or backend not in self.backends:
                raise ValueError(
                    f"{self.op}: unknown backend {backend!r}; expected None or one of {sorted(self.backends)}"
                )
            why = self.why_not(backend, device_type, **ctx)
            if why is not None:
                raise BackendUnavailableError(f"{self.op}: backend {backend!r} cannot run this call: {why}")
            return backend
        tried = []
        for name in self.preference.get(device_type, []) + ["eager"]:
            if name not in self.backends:
                continue
            why = self.why_not(name, device_type, **ctx)
            if why is None:
                return name
            tried.append(f"{name}: {why}")
        raise BackendUnavailableError(f"{self.op}: no backend can run this call ({'; '.join(tried)})")


_REGISTRY: Dict[str, OpBackends] = {}


def op_backends(op: str, preference: Dict[str, List[str]]) -> OpBackends:
    """The registry of one op family, created on first use."""
    if op not in _REGISTRY:
        _REGISTRY[op] = OpBackends(op, preference)
    return _REGISTRY[op]


def get(op: str) -> OpBackends:
    """The registry of op family `op` (e.g. "attention")."""
    return _REGISTRY[op]


def available_backends() -> Dict[str, List[str]]:
    """For each op family, the backends usable in this process now."""
    return {op: reg.available_names() for op, reg in _REGISTRY.items()}


def direct_call_ok(*tensors) -> bool:
    """Whether calling a backend directly cannot be told apart from calling its custom op: not
    compiling or tracing, no torch function or dispatch mode (FakeTensorMode, make_fx, ...), no
    functorch transform, plain tensors (no subclass) that need no gradient. Custom-op dispatch
    costs 50-130 us per call on a small CPU, a large share of a decode step or a small MLM batch;
    torch.compile, opcheck and tracing still see the op."""
    import torch

    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() != 0:
        return False
    return all(t is None or (type(t) is torch.Tensor and not t.requires_grad) for t in tensors)


CUDA_HEAD_DIMS = (32, 64, 128)


def cuda_kernel_supports(*, device_type, dtype, head_dim, **_) -> Reason:
    """What the hand-written CUDA attention and decode kernels are instantiated for."""
    import torch

    if device_type != "cuda":
        return f"runs CUDA tensors only, got {device_type} tensors"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"runs float16 and bfloat16 only, got {dtype}"
    if head_dim not in CUDA_HEAD_DIMS:
        return f"head_dim must be 32, 64 or 128, got {head_dim}"
    return None


# --- availability of the shared backends -------------------------------------------------------

def native_available() -> Reason:
    return None  # the CPU kernels are always compiled into forkattn._C


def cuda_available() -> Reason:
    import torch

    from ._native import WITH_CUDA

    if not WITH_CUDA:
        return "forkattn was built without CUDA kernels (build_info()['cuda'] is None); rebuild on a machine with nvcc and a CUDA torch, or with FORCE_CUDA=1"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def triton_available() -> Reason:
    from .triton import unavailable_reason

    return unavailable_reason()
