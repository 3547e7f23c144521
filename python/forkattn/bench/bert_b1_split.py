"""Batch-1 BERT on CPU: the native layer's row split vs its column split (with and without
serial_torch_ops), on oneDNN-packed weights and on forkattn's packed-panel GEMM (`panel ...`:
cpu_inference.PANEL_GEMM), vs ONNX Runtime, interleaved in one process (issue #18,
docs/CPU_INFERENCE.md).

    python -m forkattn.bench.bert_b1_split [--model minilm] [--batch 1] [--seqlen 128] [--threads 2] [--reps 20]
        [--onnx PATH]   # an exported model to reuse (else exported here; needs onnxruntime + onnx)

Per configuration: wall time and process CPU time per forward (median, quartiles, min), ORT÷config
per call pair, and each configuration's speed-up over the row split; the load average before/after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ..models import cpu_inference as ci
from . import bert
from . import ort as peers
from . import profile_bert as pb

CONFIGS = {  # name: (COL_SPLIT_ROWS, COL_PARTS_PER_THREAD, SERIAL_TORCH_OPS, PANEL_GEMM)
    "rows": (0, 1, False, False), "cols+serial": (128, 1, True, False),
    "panel rows": (0, 1, False, True), "panel cols+serial": (128, 1, True, True)}


def _q(v, f):
    return sorted(v)[int(f * (len(v) - 1))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", choices=["minilm", "base"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--onnx", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import onnx
    cfg = dict({"minilm": bert.MINILM, "base": bert.BASE}[a.model], hidden_dropout_prob=0.0)
    ours, hf = pb.build(cfg)
    ids = torch.randint(1000, cfg["vocab_size"], (a.batch, a.seqlen), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    model = onnx.load(a.onnx) if a.onnx and os.path.exists(a.onnx) else peers.export_bert(hf, cfg)
    fns = {}
    for name, (rows, parts, serial, panel) in CONFIGS.items():
        def f(rows=rows, parts=parts, serial=serial, panel=panel):
            ci.COL_SPLIT_ROWS, ci.COL_PARTS_PER_THREAD, ci.SERIAL_TORCH_OPS, ci.PANEL_GEMM = rows, parts, serial, panel
            with torch.inference_mode():
                return ours(input_ids=ids, attention_mask=mask).last_hidden_state
        fns[name] = f
    fns["ort"] = peers.ort_fn(peers.session(model, a.threads), ids, mask)
    with torch.inference_mode():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    for k, f in fns.items():
        print(f"{k}: max|diff| vs transformers {(torch.as_tensor(f()) - ref).abs().max().item():.1e}")
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    load0 = open("/proc/loadavg").read().split()[0]
    for r in range(a.reps):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            time.sleep(0.02)  # ORT's workers do not spin (peers.session), but leave a pause anyway
            c0, t0 = time.process_time(), time.perf_counter()
            fns[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    print(f"{a.model} B{a.batch} L{a.seqlen} threads {a.threads} reps {a.reps} "
          f"load {load0} -> {open('/proc/loadavg').read().split()[0]}")
    for k in fns:
        w, c = wall[k], cpu[k]
        line = (f"  {k:13s} wall {statistics.median(w) * 1e3:8.2f} ms [q1 {_q(w, .25) * 1e3:.2f}, q3 "
                f"{_q(w, .75) * 1e3:.2f}, min {min(w) * 1e3:.2f}]  CPU {statistics.median(c) * 1e3:8.2f} ms")
        if k != "ort":
            rr = [o / f for o, f in zip(wall["ort"], w)]
            sp = [b / f for b, f in zip(wall["rows"], w)]
            line += (f"  ORT/this {statistics.median(rr):.2f}x [{_q(rr, .25):.2f}, {_q(rr, .75):.2f}]"
                     f"  vs rows {statistics.median(sp):.2f}x [{_q(sp, .25):.2f}, {_q(sp, .75):.2f}]")
        print(line)


if __name__ == "__main__":
    main()
