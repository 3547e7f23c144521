"""GEMM options at BERT's batch-1 layer shapes on CPU (issue #18, docs/CPU_INFERENCE.md).

    python -m forkattn.bench.bert_gemm_shapes [--model minilm,base] [--rows 128] [--reps 3] [--samples 15]
        [--isa avx512,avx2] [--only 1t,2t-rows]

For each weight shape of a layer (QKV, output projection, FFN up, FFN down) at M = --rows tokens:
ATen's linear (MKL sgemm), oneDNN's packed linear (torch.ops.mkldnn._linear_pointwise on a
_reorder_linear_weight weight: the native layer's fallback), MKL's packed sgemm
(torch.ops.mkl._mkl_linear) and forkattn's packed-panel GEMM (`panel`: _C.gemm_packed_cpu on a
_C.gemm_pack_cpu weight, csrc/cpu/gemm_cpu.cpp; `panel-avx512`, `panel-avx2`, ... with --isa: the
variants' own tiles and panel widths, each switched in for its calls), each on one thread (`1t`), on
the library's own two OpenMP threads
(`2t-lib`), and split over two Python threads each running one-thread GEMMs: half the rows each
(`2t-rows`, the native layer's row blocks) or all rows on half the columns each (`2t-cols`, its
column split, each half packed on its own; --only keeps the given modes). Samples of --reps calls, options interleaved; the min
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


def _impls(w: torch.Tensor, rows: int, isas=()):
    dn = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    mk = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    out = {"aten": lambda x: F.linear(x, w),
           "onednn": lambda x: torch.ops.mkldnn._linear_pointwise(x, dn, None, "none", [], ""),
           "mklpack": lambda x: torch.ops.mkl._mkl_linear(x, mk, w, None, rows)}
    C = _native._C
    if C is not None and hasattr(C, "gemm_pack_cpu"):
        N = w.shape[0]
        if not isas:
            pw = C.gemm_pack_cpu(w)
            out["panel"] = lambda x: panel_linear(x, pw, N)
        for isa in isas:  # each variant's own packing, switched in around its calls
            before = C.cpu_isa()
            C._choose_cpu_isa(isa)
            pw = C.gemm_pack_cpu(w)
            C._choose_cpu_isa(before)
            out[f"panel-{isa}"] = lambda x, pw=pw, isa=isa: _under(isa, lambda: panel_linear(x, pw, N))
    return out


_ISA_LOCK = threading.Lock()


def _under(isa: str, fn):
    """fn() with the CPU kernel variant `isa` in use (the two threads of a 2t mode ask for the same one)."""
    C = _native._C
    with _ISA_LOCK:
        if C.cpu_isa() != isa:
            C._choose_cpu_isa(isa)
    return fn()


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


def cases(K: int, N: int, M: int, reps: int, isas=(), only=()):
    """{name: (torch threads, timing fn)} for one shape; checks every option against fp64 first."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(M, K, generator=g)
    full, rows = _impls(w, M, isas), _impls(w, M // 2, isas)
    left, right = _impls(w[: N // 2].contiguous(), M, isas), _impls(w[N // 2:].contiguous(), M, isas)
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
    return {k: v for k, v in out.items() if not only or k.split()[0] in only}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm,base")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="calls per sample")
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--isa", default="", help="panel rows per CPU kernel variant, e.g. avx512,avx2")
    ap.add_argument("--only", default="", help="modes to run, e.g. 1t,2t-rows (default: all)")
    a = ap.parse_args(argv)
    isas = [i for i in a.isa.split(",") if i]
    only = [m for m in a.only.split(",") if m]
    before = torch.get_num_threads()
    if _native._C is not None:
        print(f"forkattn CPU kernel variant: {_native._C.cpu_isa()}")
        isa0 = _native._C.cpu_isa()
    try:
        _run(a, isas, only, before)
    finally:
        if _native._C is not None:
            _native._C._choose_cpu_isa(isa0)


def _run(a, isas, only, before):
    with torch.inference_mode():
        for model in a.model.split(","):
            for K, N in SHAPES[model]:
                cs = cases(K, N, a.rows, a.reps, isas, only)
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
