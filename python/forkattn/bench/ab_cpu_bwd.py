"""A/B of the CPU attention backward: two builds of forkattn._C in one process, interleaved.

    python -m forkattn.bench.ab_cpu_bwd --old /tmp/attnbwd_old/oldpkg/_C.cpython-311-x86_64-linux-gnu.so \\
        --threads 1,2 --rounds 15 --cases 1,1,1,1024,causal 1,12,12,1024,causal

`--old` is another build's `_C*.so` (e.g. main's, copied out before rebuilding); it is loaded as
`<its folder>._C`, so the folder must be an importable package (an empty `__init__.py` next to it)
whose parent is put on sys.path here. "new" is the `forkattn._C` imported now. Each round times
both builds' backward (the kernel call alone: `attention_bwd_cpu` on one forward's out/lse) in
alternating order; the report is the median and p10-p90 of the per-round ratio old/new (each
round's time the best of --reps calls) and the median process CPU time per call (the work plus
OpenMP's spinning, which under load shows the threads waiting for each other). A case is
B,H,Hkv,L,mask[,D[,dtype]] with mask one of none, causal, padded (keys past 3/4 of L padded, NaN
in the padded K/V rows).
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch

from forkattn import _native


def load_old(path: str):
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, os.path.dirname(folder))
    return importlib.import_module(os.path.basename(folder) + "._C")


def make_case(spec: str):
    f = spec.split(",")
    B, H, Hkv, L = (int(x) for x in f[:4])
    kind = f[4]
    D = int(f[5]) if len(f) > 5 else 64
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[f[6] if len(f) > 6 else "fp32"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, L, D, generator=g).to(dtype) for _ in range(2))
    mask = None
    if kind == "padded":
        mask = (torch.arange(L)[None] < L * 3 // 4).expand(B, L).contiguous()
        k[:, :, L * 3 // 4:] = float("nan")
        v[:, :, L * 3 // 4:] = float("nan")
    dout = torch.randn(B, H, L, D, generator=g).to(dtype)
    return dict(q=q, k=k, v=v, mask=mask, causal=kind == "causal", scale=D ** -0.5, dout=dout)


def bwd_call(C, c, out, lse):
    return lambda: C.attention_bwd_cpu(c["dout"], c["q"], c["k"], c["v"], out, lse, c["mask"], c["causal"], c["scale"])


def q_at(xs, f):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(f * (len(xs) - 1) + 0.5))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="path of the other build's _C*.so")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3, help="calls per round and build (the round keeps the best)")
    ap.add_argument("--cases", nargs="+", required=True)
    a = ap.parse_args(argv)
    old, new = load_old(a.old), _native._C
    print(f"old {a.old}\nnew {new.__file__}\nload before: {open('/proc/loadavg').read().split()[:3]}")
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        for spec in a.cases:
            c = make_case(spec)
            out, lse = new.attention_fwd_cpu(c["q"], c["k"], c["v"], c["mask"], c["causal"], c["scale"])
            fns = {"old": bwd_call(old, c, out, lse), "new": bwd_call(new, c, out, lse)}
            ro, rn = fns["old"](), fns["new"]()
            same = all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(ro, rn))
            times = {"old": [], "new": []}
            cpu = {"old": [], "new": []}  # process CPU time per call: work, plus OpenMP spinning
            for r in range(a.rounds):
                for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    best, c0 = float("inf"), time.process_time()
                    for _ in range(a.reps):
                        t0 = time.perf_counter()
                        fns[name]()
                        best = min(best, time.perf_counter() - t0)
                    times[name].append(best * 1e3)
                    cpu[name].append((time.process_time() - c0) / a.reps * 1e3)
            o, n = times["old"], times["new"]
            sp = [x / y for x, y in zip(o, n)]
            print(f"t{threads} {spec:26s} old {statistics.median(o):8.2f} ms  new {statistics.median(n):8.2f} ms  "
                  f"old/new {statistics.median(sp):.2f}x [{q_at(sp, .1):.2f}-{q_at(sp, .9):.2f}]  "
                  f"cpu/call {statistics.median(cpu['old']):.1f} / {statistics.median(cpu['new']):.1f} ms"
                  f"{'  bit-identical' if same else ''}", flush=True)
    print(f"load after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
