"""The backend registry: one `Backend` subclass per (op family, backend), declaring what it runs.

A backend class says, once, what it supports (the style of xformers' op classes):
SUPPORTED_DEVICES, SUPPORTED_DTYPES, head-dim bounds, FEATURES (the optional parts of a call it
handles: "causal", "key_padding", "gqa", "paged", ...), whether it is usable in this process at all
(`available()`: compiled, installed, a device visible), where backend=None may pick it
(`priority(device_type)`), and its `impl`, what the op family calls. `not_supported_reasons(call)`
lists why it cannot run a call; `@register` adds one instance to its op family.

An `OpFamily` (one per op: "attention", "attention_varlen", "decode_attention", "kv_append",
"mlm_mask", "disentangled_attention") resolves a user's `backend=` argument: a named backend that cannot run the call raises
BackendUnavailableError with its reasons; None walks the backends that have a priority on the call's
device type, highest first, then the fallback ("eager"), and takes the first that can run it.
Answers are cached per (backend argument, device type, dtype, head_dim, features): availability
is process-constant. What a backend reads from the environment at call time (ENV_VARS: e.g.
TRITON_INTERPRET) is re-read on a cache hit only for the backends that answer depended on.
"""
from __future__ import annotations

import functools
import itertools
import os
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Tuple

import torch

from .._custom_op import assume_constant_result

Reason = Optional[str]  # None means "yes"


class BackendUnavailableError(RuntimeError):
    """A named backend cannot run these inputs here; the message says why."""


class FwdBwd(NamedTuple):
    """The impl of a differentiable op's kernel backend: forward and backward functions."""

    fwd: object
    bwd: object


class Call(NamedTuple):
    """What resolve knows about a call: enough to pick a backend, cheap to hash."""

    device_type: str
    dtype: object = None  # torch.dtype, or None when the family does not care
    head_dim: Optional[int] = None
    features: Tuple[str, ...] = ()  # optional parts of the call it uses, e.g. ("causal", "gqa")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _join(items) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class Backend:
    """One backend of one op family. Subclasses set the class attributes; `@register` instantiates."""

    OP: str = ""  # the op family, e.g. "attention"
    NAME: str = ""  # what backend= names, e.g. "cpu"
    SUPPORTED_DEVICES: Optional[Tuple[str, ...]] = None  # device types it is built for; None = any
    SUPPORTED_DTYPES: Optional[Tuple[object, ...]] = None  # None = any the op takes
    MAX_HEAD_DIM: Optional[int] = None
    HEAD_DIMS: Optional[Tuple[int, ...]] = None  # exactly these (instantiated kernels); None = any
    FEATURES: FrozenSet[str] = frozenset()  # optional parts of a call it supports
    MISSING_FEATURE = "{feature} is not supported by backend {name!r}"  # text of a missing feature's reason
    FEATURE_TEXT: Dict[str, str] = {}  # feature -> how a reason names it (default: the feature)
    PRIORITY: Dict[str, int] = {}  # device type -> rank for backend=None (higher first); absent: named only
    FALLBACK = False  # picked last on every device when nothing with a priority can run the call
    CUSTOM_OP = True  # False: impl is plain PyTorch, called directly (autograd sees through it)
    INTERPRETED_ON: Tuple[str, ...] = ()  # device types it runs only in an interpreter (correct, slow)
    ENV_VARS: Tuple[str, ...] = ()  # environment variables its answers follow, read at call time

    # --- what a backend class may override -------------------------------------------------------
    def available(self) -> Reason:
        """None when usable in this process at all (compiled, installed, device present), else why not."""
        return None

    def device_reason(self, device_type: str) -> Reason:
        if self.SUPPORTED_DEVICES is None or device_type in self.SUPPORTED_DEVICES:
            return None
        return f"runs {_join(d.upper() for d in self.SUPPORTED_DEVICES)} tensors only, got {device_type} tensors"

    def priority(self, device_type: str) -> Optional[int]:
        return self.PRIORITY.get(device_type)

    @functools.cached_property
    def impl(self):
        """What the op family calls (its contract is in the op module's docstring); built on first use."""
        return self.make_impl()

    def make_impl(self):
        raise NotImplementedError(f"{type(self).__name__} has no impl")

    # --- the capability check ----------------------------------------------------------------------
    def not_supported_reasons(self, call: Call) -> List[str]:
        """Why this backend cannot run `call` (empty: it can), ignoring availability."""
        reasons = []
        why = self.device_reason(call.device_type)
        if why is not None:
            reasons.append(why)
        if self.SUPPORTED_DTYPES is not None and call.dtype is not None and call.dtype not in self.SUPPORTED_DTYPES:
            reasons.append(f"runs {_join(_dtype_name(d) for d in self.SUPPORTED_DTYPES)} only, got {call.dtype}")
        if call.head_dim is not None:
            if self.HEAD_DIMS is not None and call.head_dim not in self.HEAD_DIMS:
                reasons.append(f"head_dim must be {_join(self.HEAD_DIMS).replace(' and ', ' or ')}, got {call.head_dim}")
            if self.MAX_HEAD_DIM is not None and call.head_dim > self.MAX_HEAD_DIM:
                reasons.append(f"head_dim must be at most {self.MAX_HEAD_DIM}, got {call.head_dim}")
        for f in call.features:
            if f not in self.FEATURES:
                reasons.append(self.MISSING_FEATURE.format(feature=self.FEATURE_TEXT.get(f, f), name=self.NAME))
        return reasons

    def why_not(self, call: Call) -> Reason:
        """None when this backend can run `call` here, else the reason(s), joined."""
        why = self.available()
        if why is not None:
            return why
        reasons = self.not_supported_reasons(call)
        return "; ".join(reasons) if reasons else None

    def supports(self, *, device_type: str, dtype=None, head_dim: Optional[int] = None, features=(), **_) -> Reason:
        """not_supported_reasons as one string (None: supported), for a call given by keywords."""
        reasons = self.not_supported_reasons(Call(device_type, dtype, head_dim, tuple(features)))
        return "; ".join(reasons) if reasons else None

    def __repr__(self) -> str:
        return f"<backend {self.NAME!r} of {self.OP}>"


def _env(names: Tuple[str, ...]) -> Tuple[Optional[str], ...]:
    return tuple(os.environ.get(n) for n in names)


class OpFamily:
    """The backends of one op family and the resolution of backend= for it."""

    def __init__(self, op: str):
        self.op = op
        self.backends: Dict[str, Backend] = {}  # in registration order
        # (backend argument, Call) -> (Backend, env var names its answer read, their values then)
        self._cache: Dict[tuple, Tuple[Backend, Tuple[str, ...], tuple]] = {}

    def add(self, backend: Backend) -> None:
        if backend.NAME in self.backends:
            raise ValueError(f"{self.op}: backend {backend.NAME!r} is registered twice")
        self.backends[backend.NAME] = backend
        self._cache.clear()  # a new backend may answer differently

    def impl(self, name: str):
        return self.backends[name].impl

    def order(self, device_type: str) -> List[Backend]:
        """The backends backend=None tries on this device type: by priority, then the fallbacks."""
        ranked = []
        for b in self.backends.values():
            p = b.priority(device_type)
            if p is not None:
                ranked.append((-p, len(ranked), b))
        return [b for _, _, b in sorted(ranked)] + [b for b in self.backends.values() if b.FALLBACK]

    @property
    def preference(self) -> Dict[str, List[str]]:
        """Device type -> the names backend=None tries, fastest first (fallbacks left out)."""
        devices = sorted({d for b in self.backends.values() for d in (b.SUPPORTED_DEVICES or ())})
        return {d: [b.NAME for b in self.order(d) if not b.FALLBACK] for d in devices}

    def available_names(self) -> List[str]:
        return [n for n, b in self.backends.items() if b.available() is None]

    def why_not(self, name: str, device_type: str, dtype=None, head_dim: Optional[int] = None, features=()) -> Reason:
        """None when backend `name` can run a call with this context, else the reason."""
        b = self.backends.get(name)
        if b is None:
            return f"no backend {name!r} for {self.op} in this build"
        return b.why_not(Call(device_type, dtype, head_dim, tuple(features)))

    def runnable(self, device_type: str, dtype=None, head_dim: Optional[int] = None, features=()) -> List[str]:
        """Every backend that can run this call here: backend=None's order first, then the others."""
        call = Call(device_type, dtype, head_dim, tuple(features))
        first = self.order(device_type)
        ordered = [b for b in first if not b.FALLBACK] + [b for b in self.backends.values() if b not in first]
        ordered += [b for b in first if b.FALLBACK]
        return [b.NAME for b in ordered if b.why_not(call) is None]

    def resolve(self, backend: Optional[str], device_type: str, dtype=None, head_dim: Optional[int] = None,
                features: Tuple[str, ...] = ()) -> Backend:
        """The Backend that runs this call: `backend` itself when it can, else BackendUnavailableError
        (ValueError for a name that is no backend); None: the first in order() that can."""
        if torch.compiler.is_compiling():  # a constant while tracing: see _resolve_traced
            kind, value = _resolve_traced(self.op, backend, device_type, dtype, head_dim, features)
            if kind is None:
                return self.backends[value]
            raise kind(value)
        return self._resolve(backend, device_type, dtype, head_dim, features)

    def _resolve(self, backend, device_type, dtype, head_dim, features) -> Backend:
        key = (backend, device_type, dtype, head_dim, features)
        try:
            hit = self._cache.get(key)
        except TypeError:  # an unhashable backend= argument: refused below
            hit = None
        if hit is not None and (not hit[1] or _env(hit[1]) == hit[2]):
            return hit[0]
        call = Call(device_type, dtype, head_dim, features)
        if backend is not None:
            if not isinstance(backend, str) or backend not in self.backends:
                raise ValueError(
                    f"{self.op}: unknown backend {backend!r}; expected None or one of {sorted(self.backends)}"
                )
            b = self.backends[backend]
            why = b.why_not(call)
            if why is not None:
                raise BackendUnavailableError(f"{self.op}: backend {backend!r} cannot run this call: {why}")
            return self._remember(key, b, b.ENV_VARS)
        # the order follows the env vars of every backend built for this device type (a preference
        # setting), the answer those of every backend consulted
        env = {v for b in self.backends.values() if device_type in (b.SUPPORTED_DEVICES or ()) for v in b.ENV_VARS}
        tried = []
        for b in self.order(device_type):
            env.update(b.ENV_VARS)
            why = b.why_not(call)
            if why is None:
                return self._remember(key, b, tuple(sorted(env)))
            tried.append(f"{b.NAME}: {why}")
        raise BackendUnavailableError(f"{self.op}: no backend can run this call ({'; '.join(tried)})")

    def _remember(self, key, backend: Backend, env_vars: Tuple[str, ...]) -> Backend:
        self._cache[key] = (backend, env_vars, _env(env_vars))
        return backend

    def clear_cache(self) -> None:
        self._cache.clear()


@assume_constant_result  # tests/test_api.py's fullgraph test relies on it
def _resolve_traced(op: str, backend, device_type, dtype, head_dim, features):
    """resolve() for torch.compile: run once at trace time, its answer a constant of the graph (the
    registry's own code is not traced). Returns (None, backend name) or (exception class, message),
    raised by the traced caller as eager code raises it."""
    try:
        return None, _FAMILIES[op]._resolve(backend, device_type, dtype, head_dim, features).NAME
    except (ValueError, BackendUnavailableError) as e:
        return type(e), str(e)



def feature_table(*names: str) -> Dict[Tuple[bool, ...], Tuple[str, ...]]:
    """{(flag, ...): the names whose flag is set}: an op module looks a call's features up in it
    instead of building the tuple on every call."""
    return {flags: tuple(n for n, on in zip(names, flags) if on)
            for flags in itertools.product((False, True), repeat=len(names))}


_FAMILIES: Dict[str, OpFamily] = {}


def family(op: str) -> OpFamily:
    """The OpFamily of op `op`, created on first use."""
    if op not in _FAMILIES:
        _FAMILIES[op] = OpFamily(op)
    return _FAMILIES[op]


def get(op: str) -> OpFamily:
    """The registry of op family `op` (e.g. "attention"); KeyError for an unknown family."""
    return _FAMILIES[op]


def register(cls: type) -> type:
    """Class decorator: adds one instance of a Backend subclass to the family named by its OP."""
    family(cls.OP).add(cls())
    return cls


def clear_caches() -> None:
    """Forget every family's resolved answers (a setting that changes them was changed)."""
    for fam in _FAMILIES.values():
        fam.clear_cache()


def available_backends() -> Dict[str, List[str]]:
    """For each op family, the backends usable in this process now."""
    return {op: fam.available_names() for op, fam in _FAMILIES.items()}
