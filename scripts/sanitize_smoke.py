"""Tiny calls of every CUDA-backed op, for compute-sanitizer (memcheck / racecheck) in
scripts/gpu_check.sh. Odd sizes so that every boundary path runs; results are checked loosely
against eager so that a kernel that writes nothing is noticed too."""
import sys

import torch

import forkattn

assert torch.cuda.is_available(), "needs a CUDA device"
dev = torch.device("cuda")
torch.manual_seed(0)
failures = []


def check(name, got, want, tol):
    err = (got.float() - want.float()).abs().max().item()
    status = "ok" if err <= tol else "FAIL"
    print(f"{status:4} {name}: max err {err:.2e}")
    if err > tol:
        failures.append(name)


def attention_smoke():
    reg = forkattn.backends.get("attention")
    for backend in ("cuda", "triton"):
        for dtype in (torch.float16, torch.bfloat16):
            if reg.why_not(backend, "cuda", dtype=dtype, head_dim=64):
                continue
            for causal in (False, True):
                q = torch.randn(2, 4, 97, 64, device=dev, dtype=dtype, requires_grad=True)
                k = torch.randn(2, 2, 129, 64, device=dev, dtype=dtype, requires_grad=True)
                v = torch.randn(2, 2, 129, 64, device=dev, dtype=dtype, requires_grad=True)
                mask = torch.arange(129, device=dev)[None] < torch.tensor([[77], [0]], device=dev)
                out = forkattn.attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
                ref = forkattn.attention(q, k, v, causal=causal, key_padding_mask=mask, backend="eager")
                g = torch.randn_like(out)
                grads = torch.autograd.grad(out, (q, k, v), g)
                rgrads = torch.autograd.grad(ref, (q, k, v), g)
                name = f"attention {backend} {dtype} causal={causal}"
                check(name + " out", out, ref, 5e-2)
                for n, a, b in zip("qkv", grads, rgrads):
                    check(f"{name} d{n}", a, b, 1e-1)


SMOKES = [attention_smoke]

for smoke in SMOKES:
    smoke()
torch.cuda.synchronize()
print("FAILURES:", failures if failures else "none")
sys.exit(1 if failures else 0)
