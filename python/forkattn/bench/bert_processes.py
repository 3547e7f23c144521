"""BERT inference on CPU with each implementation alone in its own process (issue #18's "ONNX
Runtime's best configuration"), processes alternating, so no implementation shares a process's
threads or caches with another, and ONNX Runtime may spin as it does by default.

    python -m forkattn.bench.bert_processes [--model minilm|base|small] [--batch 1] [--seqlen 128]
        [--threads 2] [--rounds 4] [--reps 30] [--impls forkattn,ort,ort-spin] [--onnx PATH]

Implementations: `forkattn` (forkattn's BertModel, inference mode), `ort` (ONNX Runtime on the plain
export, `session.intra_op.allow_spinning` 0 as in `python -m forkattn.bench`'s interleaved rows),
`ort-spin` (the same with spinning on: ORT's default, and at batch 1 its fastest when it has the
cores to itself: docs/CPU_INFERENCE.md), `hf-sdpa` (transformers' BertModel, sdpa). The bench's
interleaved rows time every implementation in one process; there ORT's spinning would slow what
runs next, and the implementations evict each other's weights from the caches. Both views are
measured; this one is each implementation's own best case.

Per round, each implementation runs in a fresh process (order rotated between rounds): 3 untimed
calls, then `reps` timed calls with 20 ms pauses; per process the median. Reported: the median of
the process medians with their range, the best call, and per round each peer's time over
forkattn's, with the load average. Every process checks its output against transformers fp32 on
the real tokens (max |diff|). B > 1 is a padded batch (lengths L/2..L, bench/bert.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

IMPLS = ("forkattn", "ort", "ort-spin", "hf-sdpa")


def _inputs(cfg: dict, B: int, L: int):
    import torch

    from . import bert
    if B == 1:
        ids = torch.randint(1000, cfg["vocab_size"], (1, L), generator=torch.Generator().manual_seed(0))
        return ids, torch.ones_like(ids)
    ids, mask, _ = bert._batch(B, L, "cpu", vocab_size=cfg["vocab_size"])
    return ids, mask


def child(a) -> dict:
    """One implementation's timings in this process (the --child side)."""
    import torch
    torch.set_num_threads(a.threads)
    from . import ort as peers
    from . import profile_bert as pb
    cfg = _config(a.model)
    ours, hf = pb.build(cfg)
    ids, mask = _inputs(cfg, a.batch, a.seqlen)
    if a.child in ("ort", "ort-spin"):
        import onnx
        fn = peers.ort_fn(peers.session(onnx.load(a.onnx), a.threads, spinning=a.child == "ort-spin"), ids, mask)
    else:
        model = ours if a.child == "forkattn" else hf

        def fn():
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.inference_mode():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    diff = (fn() - ref)[real].abs().max().item()
    for _ in range(2):
        fn()
    times = []
    for _ in range(a.reps):
        time.sleep(0.02)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "best": min(times), "diff": diff}


def _config(model: str) -> dict:
    from . import bert
    return dict({"minilm": bert.MINILM, "base": bert.BASE, "small": bert.SMALL}[model], hidden_dropout_prob=0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", choices=["minilm", "base", "small"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--impls", default="forkattn,ort,ort-spin")
    ap.add_argument("--onnx", default=None, help="an exported model to reuse (else exported here)")
    ap.add_argument("--child", default=None, choices=IMPLS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return
    impls = [s for s in a.impls.split(",") if s]
    bad = [s for s in impls if s not in IMPLS]
    if bad or "forkattn" not in impls:
        ap.error(f"--impls must name forkattn and any of {', '.join(IMPLS)}; got {a.impls!r}")
    with tempfile.TemporaryDirectory() as tmp:
        if any(s.startswith("ort") for s in impls) and not (a.onnx and os.path.exists(a.onnx)):
            from . import ort as peers
            from . import profile_bert as pb
            missing = peers.ort_missing()
            if missing:
                sys.exit(f"the ort rows need ONNX Runtime: {missing}")
            import onnx
            a.onnx = a.onnx or os.path.join(tmp, f"{a.model}.onnx")
            onnx.save(peers.export_bert(pb.build(_config(a.model))[1], _config(a.model)), a.onnx)
        _run(a, impls)


def _run(a, impls):
    res = {s: [] for s in impls}
    loads = []
    for r in range(a.rounds):
        for name in impls[r % len(impls):] + impls[:r % len(impls)]:
            loads.append(float(open("/proc/loadavg").read().split()[0]) if os.path.exists("/proc/loadavg") else 0.0)
            cmd = [sys.executable, "-m", "forkattn.bench.bert_processes", "--child", name, "--model", a.model,
                   "--batch", str(a.batch), "--seqlen", str(a.seqlen), "--threads", str(a.threads),
                   "--reps", str(a.reps), "--onnx", str(a.onnx)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            res[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{a.model} B{a.batch} L{a.seqlen}, {a.threads} threads, {a.rounds} processes x {a.reps} calls each, "
          f"load {min(loads):.2f}-{max(loads):.2f}")
    for name, rs in res.items():
        ms = [x["median"] * 1e3 for x in rs]
        print(f"  {name:9s} {statistics.median(ms):8.2f} ms [{min(ms):.2f}-{max(ms):.2f}] best "
              f"{min(x['best'] for x in rs) * 1e3:.2f}  max|diff| vs transformers {max(x['diff'] for x in rs):.1e}")
    for name in impls:
        if name != "forkattn":
            q = [p["median"] / f["median"] for p, f in zip(res[name], res["forkattn"])]
            print(f"  {name} / forkattn per round: {statistics.median(q):.3f} [{min(q):.3f}-{max(q):.3f}]")


if __name__ == "__main__":
    main()
