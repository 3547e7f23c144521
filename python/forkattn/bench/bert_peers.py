"""Issue #18's table: forkattn's BertModel vs ONNX Runtime vs transformers on CPU inference, fp32.

    python -m forkattn.bench.bert_peers [--model minilm,base] [--budget 2.0] [--rounds 9]

Runs only the six cases of issue #18 (the bert family's `--full` cases that have the ORT and
torch.compile peer rows: MiniLM-L6 B1 L128, B32 L128, B8 L512; BERT-base B1 L128, B8 L128, B4 L512;
batches padded to lengths uniform in L/2..L, row 0 full) with the bench's own setup, peer checks
and interleaved timing (core.time_interleaved, a pause before every call for ORT's workers), and
prints per case the median [q1, q3] of every row and the ratios the issue asks for: forkattn's best
row vs the best ORT row, and vs hf-sdpa. `python -m forkattn.bench --only bert --full` times the
same cases among many others (training steps, eager rows); this is the short way to the table.
The machine's 1-minute load average is printed before and after each case. The row
`forkattn-cpu-ops` is forkattn-cpu with the one-native-call-per-layer path off
(models/cpu_inference.NATIVE_LAYER): the per-op fast path, timed in the same rounds (not counted
as forkattn's best); the native layer runs batch 1 and, unpadded, the padded batches.
"""
from __future__ import annotations

import argparse

import torch

from . import bert, core
from . import ort as peers
from ..models import cpu_inference

DROP = ("hf-eager", "forkattn-eager")  # used by the peer checks, not timed here
OPS_ROW = "forkattn-cpu-ops"


def _ops_path(fn):
    """fn with the native layer off: the per-op fast path (the state before the native layer)."""
    def run():
        cpu_inference.NATIVE_LAYER = False
        try:
            return fn()
        finally:
            cpu_inference.NATIVE_LAYER = True
    return run


def _load() -> str:
    return open("/proc/loadavg").read().split()[0]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m forkattn.bench.bert_peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm,base", help="minilm, base or both")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per row and case")
    p.add_argument("--rounds", type=int, default=9, help="minimum interleaved rounds")
    p.add_argument("--skip-compile", action="store_true",
                   help="no hf-sdpa-compile row (inductor's compile takes minutes on a loaded 2-core machine)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (ORT gets the same); unset: torch's")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.skip_compile:
        def skipped(model):
            raise RuntimeError("skipped (--skip-compile)")
        peers.compiled = skipped
    wanted = {"minilm": "all-MiniLM-L6 shape", "base": "bert-base"}
    models = {wanted[m] for m in args.model.split(",")}
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {core.cpu_model()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    summary = []
    for case in bert.cases(cpu, "full"):
        model, B, L = case.params.get("model"), case.params["B"], case.params["L"]
        if case.params["mode"] != "inference" or (model, B, L) not in bert.PEER_SHAPES["full"] or model not in models:
            continue
        fns = {k: f for k, f in case.callables().items() if k not in DROP}
        if "forkattn-cpu" in fns:
            fns[OPS_ROW] = _ops_path(fns["forkattn-cpu"])
        load0 = _load()
        res = core.time_interleaved(fns, budget_s=args.budget * len(fns), min_rounds=args.rounds, max_rounds=300,
                                    pause_s=peers.PAUSE_S)
        load1 = _load()
        case.release()
        print(f"\n{case.name}  (load {load0} -> {load1})")
        t = {k: v for k, v in res.items() if isinstance(v, core.Timing)}
        for k, v in res.items():
            print(f"  {k:24s} " + (f"{v.median * 1e3:9.1f} ms [{v.q1 * 1e3:.1f}, {v.q3 * 1e3:.1f}] n={v.samples}"
                                   if isinstance(v, core.Timing) else f"failed: {v!r}"))
        ours = min((k for k in t if k.startswith("forkattn") and k != OPS_ROW), key=lambda k: t[k].median, default=None)
        ort = min((k for k in t if k.startswith("ort")), key=lambda k: t[k].median, default=None)
        if ours and "hf-sdpa" in t:
            line = (f"{model} B{B} L{L}: {ours} {t['hf-sdpa'].median / t[ours].median:.2f}x hf-sdpa"
                    + (f", {t[ort].median / t[ours].median:.2f}x {ort} (best ORT)" if ort else ", no ORT row")
                    + f"; spreads {ours} {t[ours].spread:.0%}" + (f", {ort} {t[ort].spread:.0%}" if ort else "")
                    + (f"; {t[OPS_ROW].median / t[ours].median:.2f}x {OPS_ROW}" if OPS_ROW in t else "")
                    + f"; load {load0} -> {load1}")
            summary.append(line)
            print("  " + line)
    print("\nsummary (ratios > 1: forkattn faster)")
    for line in summary:
        print("  " + line)


if __name__ == "__main__":
    main()
