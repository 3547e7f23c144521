"""Helpers for the op modules' custom ops (torch.library.custom_op): when a call may bypass the
dispatcher and run the backend's function directly, and which helpers torch.compile treats as constants."""
from __future__ import annotations

import torch


def direct_call_ok(*tensors) -> bool:
    """Whether calling a backend directly cannot be told apart from calling its custom op: not
    compiling or tracing, no torch function or dispatch mode (FakeTensorMode, make_fx, ...), no
    functorch transform, plain tensors (no subclass) that need no gradient. Custom-op dispatch
    costs 50-130 us per call on a small CPU, a large share of a decode step or a small MLM batch;
    torch.compile, opcheck and tracing still see the op."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() != 0:
        return False
    return all(t is None or (type(t) is torch.Tensor and not t.requires_grad) for t in tensors)


def assume_constant_result(fn):
    """torch.compiler.assume_constant_result(fn) without importing torch._dynamo (and with it
    Triton) when forkattn is imported: dynamo reads the same marker. Under torch.compile, fn runs
    once at trace time and its result is a constant of the graph."""
    fn._dynamo_marked_constant = True
    return fn
