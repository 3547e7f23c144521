"""Where BERT inference time goes on CPU: forkattn's BertModel vs transformers (sdpa) vs ONNX Runtime.

    python -m forkattn.bench.profile_bert [--model minilm,base] [--batch 1] [--seqlen 128] [--rounds 15]

For each model shape (random weights, the same in every implementation; one unpadded batch, so
forkattn runs its padded path with no mask): an interleaved wall-clock comparison (median and IQR,
a pause between calls), torch.profiler's per-op table for forkattn and transformers grouped into
GEMM / LayerNorm / GELU / adds / attention / copies / other, the share of wall time not covered by
any op (Python and dispatcher), ORT's own per-node profile grouped the same way, and a few
micro-measurements of the levers (the GEMMs alone, a concatenated-weight copy, mkl-prepacked linear).
Figures feed docs/CPU_INFERENCE.md; the machine's load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from . import ort as peers
from ..models import cpu_inference as ci
from .bert import BASE, MINILM

GROUPS = [  # (group, substrings of aten/ORT op names), first match wins
    ("gemm", ("addmm", "aten::mm", "aten::bmm", "matmul", "linear", "gemm", "fusedmatmul", "mkl_linear")),
    ("attention", ("forkattn", "attention", "softmax", "scaled_dot_product", "_flash")),
    ("layernorm", ("layer_norm", "layernorm")),
    ("gelu", ("gelu", "erf")),
    ("add/mul", ("aten::add", "aten::mul", "aten::div", "aten::sub", "add", "mul", "div", "where")),
    ("copy/reshape", ("copy", "cat", "contiguous", "clone", "transpose", "permute", "reshape", "view",
                      "unflatten", "unbind", "expand", "as_strided", "select", "slice", "concat",
                      "unsqueeze", "squeeze", "empty", "gather", "shape", "cast", "flatten")),
]


def group_of(op: str) -> str:
    low = op.lower()
    for name, keys in GROUPS:
        if any(k in low for k in keys):
            return name
    return "other"


def build(cfg: dict):
    import transformers

    from forkattn.models import bert as fb

    torch.manual_seed(0)
    hc = transformers.BertConfig(**cfg)
    hc._attn_implementation = "sdpa"
    hf = transformers.BertModel(hc).eval()
    ours = fb.BertModel(fb.BertConfig(**cfg))
    ours.load_hf_state_dict({f"bert.{k}": v for k, v in hf.state_dict().items()})
    return ours.eval(), hf


def interleaved(fns, rounds, pause):
    samples = defaultdict(list)
    for f in fns.values():
        f()
    for r in range(rounds):
        names = list(fns)
        names = names[r % len(names):] + names[:r % len(names)]
        for n in names:
            time.sleep(pause)
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    out = {}
    for n, xs in samples.items():
        q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        out[n] = (med * 1e3, q1 * 1e3, q3 * 1e3)
    return out


def torch_profile(fn, iters):
    """(per-group ms per call, top ops [(name, self ms per call, calls per call)], wall ms per call,
    ms per call covered by top-level ops)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        wall = (time.perf_counter() - t0) / iters * 1e3
    groups, top = defaultdict(float), []
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3 / iters
        groups[group_of(ev.key)] += ms
        top.append((ev.key, ms, ev.count / iters))
    top.sort(key=lambda t: -t[1])
    # top-level ops: events with no parent op; their total is the time inside ATen/our ops
    covered = sum(e.cpu_time_total for e in prof.events() if e.cpu_parent is None) / 1e3 / iters
    return dict(groups), top[:18], wall, covered


def ort_profile(proto, ids, mask, iters, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    sess.run(None, feed)
    for _ in range(iters):
        sess.run(None, feed)
    path = sess.end_profiling()
    events = json.load(open(path))
    os.remove(path)
    groups, ops, runs = defaultdict(float), defaultdict(float), []
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append(e["dur"] / 1e3)
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            groups[group_of(op)] += e["dur"] / 1e3 / (iters + 1)
            ops[op] += e["dur"] / 1e3 / (iters + 1)
    return dict(groups), sorted(ops.items(), key=lambda t: -t[1])[:10], statistics.median(runs[1:] or runs)


def gemm_floor(cfg, B, L, iters):
    """ms per forward of only the encoder's GEMMs (F.linear, [B*L, H] x W^T + b), the same shapes."""
    H, I, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    x, xi = torch.randn(B * L, H), torch.randn(B * L, I)
    shapes = [(x, torch.randn(3 * H, H)), (x, torch.randn(H, H)), (x, torch.randn(I, H)), (xi, torch.randn(H, I))]
    bias = [torch.randn(w.shape[0]) for _, w in shapes]

    def plain():
        for (a, w), b in zip(shapes, bias):
            F.linear(a, w, b)

    def cat_weights():  # what forkattn's BertLayer.qkv does per call: concatenate W_q, W_k, W_v
        torch.cat([shapes[1][1]] * 3)
        torch.cat([bias[1]] * 3)
    out = {}
    for name, fn in (("linear", plain), ("qkv weight cat", cat_weights)):
        fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out[name] = (time.perf_counter() - t0) / iters * 1e3 * n
    try:  # the MKL-packed linear inductor uses with freezing (weights reordered once)
        packed = [(a, torch.ops.mkl._mkl_reorder_linear_weight(w, B * L), w, b) for (a, w), b in zip(shapes, bias)]

        def mkl():
            for a, p, w, b in packed:
                torch.ops.mkl._mkl_linear(a, p, w, b, B * L)
        mkl()
        t0 = time.perf_counter()
        for _ in range(iters):
            mkl()
        out["mkl packed linear"] = (time.perf_counter() - t0) / iters * 1e3 * n
    except Exception as e:  # not built with MKL here
        out["mkl packed linear"] = f"unavailable ({type(e).__name__})"
    if ci.PACKED:  # oneDNN-packed weights, what the inference fast path uses (models/cpu_inference.py)
        dnn = [(a, torch.ops.mkldnn._reorder_linear_weight(w, B * L), b) for (a, w), b in zip(shapes, bias)]

        def onednn():
            for a, p, b in dnn:
                torch.ops.mkldnn._linear_pointwise(a, p, b, "none", [], "")
        onednn()
        t0 = time.perf_counter()
        for _ in range(iters):
            onednn()
        out["onednn packed linear"] = (time.perf_counter() - t0) / iters * 1e3 * n
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m forkattn.bench.profile_bert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm,base")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=10, help="calls per profile")
    p.add_argument("--variants", action="store_true",
                   help="also time forkattn without packed weights and without the fast path (models/cpu_inference.py)")
    p.add_argument("--no-profile", action="store_true", help="only the interleaved wall-clock comparison")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    for name in args.model.split(","):
        cfg = dict({"minilm": MINILM, "base": BASE}[name], hidden_dropout_prob=0.0)
        B, L = args.batch, args.seqlen
        ours, hf = build(cfg)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, cfg["vocab_size"], (B, L), generator=g)
        mask = torch.ones_like(ids)
        fns = {}

        def wrap(m, fused=True, packed=ci.PACKED):
            def run():
                ci.FUSED, ci.PACKED = fused, packed  # models/cpu_inference.py's switches
                with torch.inference_mode():
                    return m(input_ids=ids, attention_mask=mask).last_hidden_state
            return run
        fns["forkattn"], fns["hf-sdpa"] = wrap(ours), wrap(hf)
        if args.variants:  # the inference fast path's steps, each against the others
            fns["forkattn-unpacked"] = wrap(ours, packed=False)
            fns["forkattn-module-path"] = wrap(ours, fused=False)
        proto = None
        if not peers.ort_missing():
            proto = peers.export_bert(hf, cfg)
            fns["ort"] = peers.ort_fn(peers.session(proto, threads), ids, mask)
        ref = fns["hf-sdpa"]()
        diffs = {k: f"{peers.max_abs_diff(f(), ref):.1e}" for k, f in fns.items()}
        print(f"\n##### {name} B{B} L{L} fp32, load {open('/proc/loadavg').read().split()[:3]}, "
              f"max |diff| vs hf-sdpa {diffs}")
        for rep in range(2):
            wall = interleaved(fns, args.rounds, 0.02)
            print(f"wall (median [q1, q3] ms), repeat {rep}: " +
                  ", ".join(f"{k} {m:.1f} [{a:.1f}, {b:.1f}]" for k, (m, a, b) in wall.items()) +
                  f"; load {open('/proc/loadavg').read().split()[0]}")
        if args.no_profile:
            continue
        for impl in ("forkattn", "hf-sdpa"):
            groups, top, wall_ms, covered = torch_profile(fns[impl], args.iters)
            tot = sum(groups.values())
            print(f"\n{impl}: profiled wall {wall_ms:.1f} ms/call, ops (top level) {covered:.1f} ms, "
                  f"outside ops (Python, module calls) {wall_ms - covered:.1f} ms = "
                  f"{(wall_ms - covered) / cfg['num_hidden_layers'] * 1e3:.0f} us/layer")
            print("  groups (self CPU ms/call, share): " + ", ".join(
                f"{k} {v:.2f} ({v / tot:.0%})" for k, v in sorted(groups.items(), key=lambda t: -t[1])))
            for op, ms, calls in top:
                print(f"    {op:42s} {ms:8.3f} ms  {calls:6.1f} calls")
        if proto is not None:
            groups, ops, run_ms = ort_profile(proto, ids, mask, args.iters, threads)
            tot = sum(groups.values())
            print(f"\nort: model_run {run_ms:.1f} ms (profiling on), node kernels {tot:.1f} ms")
            print("  groups: " + ", ".join(f"{k} {v:.2f} ({v / tot:.0%})"
                                           for k, v in sorted(groups.items(), key=lambda t: -t[1])))
            for op, ms in ops:
                print(f"    {op:42s} {ms:8.3f} ms")
        print(f"\nGEMMs alone (ms per forward, {cfg['num_hidden_layers']} layers): " +
              ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in gemm_floor(cfg, B, L, args.iters).items()))


if __name__ == "__main__":
    main()
