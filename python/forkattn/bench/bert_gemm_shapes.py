"""GEMM options at BERT's batch-1 layer shapes on CPU (issue #18, docs/CPU_INFERENCE.md).

    python -m forkattn.bench.bert_gemm_shapes [--model minilm,base] [--rows 128] [--reps 3] [--samples 15]

For each weight shape of a layer (QKV, output projection, FFN up, FFN down) at M = --rows tokens:
ATen's linear (MKL sgemm), oneDNN's packed linear (torch.ops.mkldnn._linear_pointwise on a
_reorder_linear_weight weight: the native layer's fallback), MKL's packed sgemm
(torch.ops.mkl._mkl_linear) and forkattn's packed-panel GEMM (`panel`: _C.gemm_packed_cpu on a
_C.gemm_pack_cpu weight, csrc/cpu/gemm_cpu.cpp, in the CPU kernel variant in use), each on one thread (`1t`), on the library's own two OpenMP threads
(`2t-lib`), and split over two Python threads each running one-thread GEMMs: half the rows each
(`2t-rows`, the native layer's row blocks) or all rows on half the columns each (`2t-cols`, its
column split, each half packed on its own). Samples of --reps calls, options interleaved; the min
(the least contended sample) and the median per option, in ms and GFLOP/s, with the load average.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from .. import _native
from ..models.cpu_inference import panel_linear

SHAPES = {"minilm": [(384, 1152), (384, 384), (384, 1536), (1536, 384)],
          "base": [(768, 2304), (768, 768), (768, 3072), (3072, 768)]}


def _impls(w: torch.Tensor, rows: int):
    dn = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    mk = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    out = {"aten": lambda x: F.linear(x, w),
           "onednn": lambda x: torch.ops.mkldnn._linear_pointwise(x, dn, None, "none", [], ""),
           "mklpack": lambda x: torch.ops.mkl._mkl_linear(x, mk, w, None, rows)}
    C = _native._C
    if C is not None and hasattr(C, "gemm_pack_cpu"):
        pw, N = C.gemm_pack_cpu(w), w.shape[0]
        out["panel"] = lambda x: panel_linear(x, pw, N)
    return out


def _serial(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _pair(fa, fb, reps):
    """Two Python threads (torch's ops release the GIL), `reps` calls each: wall time per call."""
    start = threading.Barrier(3)

    def run(f):
        start.wait()
        for _ in range(reps):
            f()
    ts = [threading.Thread(target=run, args=(f,)) for f in (fa, fb)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return (time.perf_counter() - t0) / reps


def cases(K: int, N: int, M: int, reps: int):
    """{name: (torch threads, timing fn)} for one shape; checks every option against fp64 first."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(M, K, generator=g)
    full, rows = _impls(w, M), _impls(w, M // 2)
    left, right = _impls(w[: N // 2].contiguous(), M), _impls(w[N // 2:].contiguous(), M)
    top, bottom = x[: M // 2].contiguous(), x[M // 2:].contiguous()
    ref = x.double() @ w.double().T
    out = {}
    for k, f in full.items():
        err = (f(x).double() - ref).abs().max().item()
        assert err < 1e-3, (k, err)
        out[f"1t {k}"] = (1, lambda f=f: _serial(lambda: f(x), reps))
        out[f"2t-lib {k}"] = (2, lambda f=f: _serial(lambda: f(x), reps))
        out[f"2t-rows {k}"] = (1, lambda f=rows[k]: _pair(lambda: f(top), lambda: f(bottom), reps))
        out[f"2t-cols {k}"] = (1, lambda a=left[k], b=right[k]: _pair(lambda: a(x), lambda: b(x), reps))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm,base")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="calls per sample")
    ap.add_argument("--samples", type=int, default=15)
    a = ap.parse_args(argv)
    before = torch.get_num_threads()
    if _native._C is not None:
        print(f"forkattn CPU kernel variant: {_native._C.cpu_isa()}")
    with torch.inference_mode():
        for model in a.model.split(","):
            for K, N in SHAPES[model]:
                cs = cases(K, N, a.rows, a.reps)
                ts = {c: [] for c in cs}
                load0 = open("/proc/loadavg").read().split()[0]
                for s in range(a.samples):
                    order = list(cs.items()) if s % 2 == 0 else list(cs.items())[::-1]
                    for c, (threads, fn) in order:
                        torch.set_num_threads(threads)
                        ts[c].append(fn())
                torch.set_num_threads(before)
                flop = 2 * a.rows * K * N
                print(f"{model} M{a.rows} K{K} N{N}  load {load0} -> {open('/proc/loadavg').read().split()[0]}")
                for c, v in ts.items():
                    lo, md = min(v), statistics.median(v)
                    print(f"  {c:16s} min {lo * 1e3:8.3f} ms {flop / lo / 1e9:6.1f} GFLOP/s | "
                          f"median {md * 1e3:8.3f} ms {flop / md / 1e9:6.1f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
