"""Peak memory of one DeBERTa-v3-base disentangled-attention call (the deberta family's attention case), per
implementation, each in a fresh subprocess: the process's peak resident set during the call (Linux VmHWM,
reset through /proc/self/clear_refs just before it) minus its resident set just before it. An [H, L, L]
fp32 matrix per batch entry is printed next to it: at L2048, H12 one such matrix is 201 MB, and
transformers' eager attention holds several.

    python -m forkattn.bench.deberta_memory [--L 2048] [--B 1] [--pass fwd|fwd+bwd|both] [--impls a,b]

Implementations: the deberta family's (hf-eager, forkattn-eager, forkattn-<fused backend>). A warm-up call at
L64 first loads libraries and thread pools, and the allocator's free memory is trimmed, so the figure is the call's own working memory (inputs,
weights and the module built before the measurement are not counted; the outputs and, for fwd+bwd, the
gradients it returns are).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def _trim() -> None:
    """Hands the allocator's free memory back (glibc malloc_trim), so that the call cannot reuse memory
    the set-up freed without the resident set showing it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Resets VmHWM to the current resident set (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(impl: str, B: int, L: int, pass_: str) -> dict:
    import torch

    from . import deberta

    torch.manual_seed(0)
    warm = deberta._attention_setup(B, 64, torch.device("cpu"), torch.float32, pass_, 0)()
    warm[impl]()
    fns = deberta._attention_setup(B, L, torch.device("cpu"), torch.float32, pass_, 0)()
    fn = fns[impl]
    del warm, fns
    _trim()
    before = _status_kb("VmRSS") * 1024
    reset = _reset_peak()
    peak_before = _status_kb("VmHWM") * 1024
    result = fn()
    peak = _status_kb("VmHWM") * 1024
    del result
    # without the reset, a call that never rose above the set-up's peak gives only an upper bound
    return {"impl": impl, "B": B, "L": L, "pass": pass_, "extra_mb": (peak - before) / 1e6,
            "bound_only": not reset and peak <= peak_before}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, default=2048)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--pass", dest="pass_", choices=["fwd", "fwd+bwd", "both"], default="both")
    ap.add_argument("--impls", default=None, help="comma-separated (default: every implementation of the family)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_measure(a.child, a.B, a.L, a.pass_)))
        return
    import torch

    from .core import fused_backends
    impls = a.impls.split(",") if a.impls else (
        ["hf-eager", "forkattn-eager"]
        + [f"forkattn-{b}" for b in fused_backends("disentangled_attention", torch.device("cpu"), torch.float32, 64)])
    passes = ["fwd", "fwd+bwd"] if a.pass_ == "both" else [a.pass_]
    H = 12
    lxl = a.B * H * a.L * a.L * 4 / 1e6
    print(f"DeBERTa-v3-base attention, B{a.B} H{H} L{a.L} D64 span 256, fp32, CPU; one [B, H, L, L] fp32 matrix = "
          f"{lxl:.0f} MB")
    print(f"{'pass':8} {'implementation':22} {'peak extra MB':>14} {'/ one LxL':>10}")
    for pass_ in passes:
        for impl in impls:
            cmd = [sys.executable, "-m", "forkattn.bench.deberta_memory", "--child", impl, "--L", str(a.L), "--B",
                   str(a.B), "--pass", pass_]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{pass_:8} {impl:22} failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            mark = " (<=)" if m["bound_only"] else ""
            print(f"{pass_:8} {impl:22} {m['extra_mb']:14.1f} {m['extra_mb'] / lxl:10.2f}{mark}")


if __name__ == "__main__":
    main()
