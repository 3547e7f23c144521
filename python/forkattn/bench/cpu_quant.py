"""Speed of forkattn's optional int8 / bf16 CPU inference (models/cpu_quant.py) against fp32 and peers.

    python -m forkattn.bench.cpu_quant [--threads 1,2] [--cases minilm-b1,minilm-b32,base-b1]
                                       [--budget 1.0] [--rounds 7] [--no-bf16]

Rows, interleaved in one process (core.time_interleaved, a pause before every call so ONNX
Runtime's workers hand the cores back), random weights the same in every model:
  forkattn-fp32      forkattn's BertModel, fp32 inference fast path (the default)
  forkattn-int8      quantize_for_cpu(model, "int8", accept_inexact=True): fbgemm dynamic int8 GEMMs, forkattn attention
  forkattn-int8-cal  the same with calibration (outlier input channels kept in fp32)
  forkattn-bf16      quantize_for_cpu(model, "bf16") (emulated on CPUs without native bf16)
  hf-sdpa            transformers' BertModel, sdpa, fp32
  ort                ONNX Runtime, fp32, on transformers' exported model (bench/ort.py's export + session)
  ort-int8           ONNX Runtime's own onnxruntime.quantization.quantize_dynamic of that export
                     (QInt8 weights, per channel), same session options
Cases: all-MiniLM-L6 shape B1 L128, B32 L128 padded (lengths uniform in 64..128, row 0 full, the
bert family's batches), BERT-base B1 L128; each at every thread count (torch and ORT alike). Per
row: median [q1, q3] ms, n samples, max |last_hidden_state - hf-sdpa| on the case's real tokens,
and the speed-up over forkattn-fp32; the 1-minute load average before and after each case.
Accuracy on real embeddings: python -m forkattn.bench.cpu_quant_accuracy.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from typing import Callable, Dict

import torch

from . import core
from . import ort as peers
from .bert import BASE, MINILM, _batch

CASES = {"minilm-b1": ("all-MiniLM-L6 shape", MINILM, 1, 128), "minilm-b32": ("all-MiniLM-L6 shape", MINILM, 32, 128),
         "base-b1": ("bert-base", BASE, 1, 128)}


def ort_int8_proto(proto):
    """onnxruntime.quantization.quantize_dynamic of an exported fp32 model (QInt8 per-channel weights,
    uint8 dynamic activations: ORT's defaults for dynamic quantization, weights as ours)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
        onnx.save(proto, src)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
        return onnx.load(dst)


def build(cfg: dict, bf16: bool, ort: bool):
    """(models by row name, exported ORT protos by row name) for one model shape."""
    from ..models.cpu_quant import quantize_for_cpu
    from .profile_bert import build as build_pair

    ours, hf = build_pair(cfg)  # forkattn's BertModel and transformers' (sdpa), same random weights
    cal_ids, cal_mask, _ = _batch(8, 128, "cpu", seed=1, vocab_size=cfg["vocab_size"])
    models = {"forkattn-fp32": ours, "forkattn-int8": quantize_for_cpu(ours, "int8", accept_inexact=True),
              "forkattn-int8-cal": quantize_for_cpu(ours, "int8", accept_inexact=True,
                                                   calibration={"input_ids": cal_ids, "attention_mask": cal_mask}),
              "hf-sdpa": hf}
    if bf16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "no native bf16": the row measures exactly that
            models["forkattn-bf16"] = quantize_for_cpu(ours, "bf16")
    protos = {}
    if ort:
        missing = peers.ort_missing()
        if missing:
            print(f"no ORT rows: {missing}")
        else:
            protos["ort"] = peers.export_bert(hf, cfg)
            protos["ort-int8"] = ort_int8_proto(protos["ort"])
    return models, protos


def fns_for(models, sessions, ids, mask) -> Dict[str, Callable[[], torch.Tensor]]:
    def torch_fn(m):
        def run():
            with torch.inference_mode():
                return m(input_ids=ids, attention_mask=mask).last_hidden_state
        return run
    fns = {k: torch_fn(m) for k, m in models.items()}
    fns.update({k: peers.ort_fn(s, ids, mask) for k, s in sessions.items()})
    return fns


def run_case(label, B, L, threads, models, protos, args):
    torch.set_num_threads(threads)
    ids, mask, _ = _batch(B, L, "cpu", vocab_size=models["hf-sdpa"].config.vocab_size)
    sessions = {k: peers.session(p, threads) for k, p in protos.items()}
    fns = fns_for(models, sessions, ids, mask)
    real = mask.bool()
    ref = fns["hf-sdpa"]()
    diffs = {k: (f() - ref)[real].abs().max().item() for k, f in fns.items()}
    load0 = core_load()
    res = core.time_interleaved(fns, budget_s=args.budget * len(fns), min_rounds=args.rounds, max_rounds=200,
                                pause_s=peers.PAUSE_S)
    load1 = core_load()
    print(f"\n{label} B{B} L{L}, {threads} thread(s)  (load {load0} -> {load1})")
    base = res.get("forkattn-fp32")
    for k, v in res.items():
        if isinstance(v, core.Timing):
            vs = f"  {base.median / v.median:5.2f}x forkattn-fp32" if isinstance(base, core.Timing) else ""
            print(f"  {k:18s} {v.median * 1e3:9.1f} ms [{v.q1 * 1e3:.1f}, {v.q3 * 1e3:.1f}] n={v.samples:<3d}"
                  f" max|diff| vs hf-sdpa {diffs[k]:.1e}{vs}")
        else:
            print(f"  {k:18s} failed: {v!r}")
    return res


def core_load() -> str:
    return open("/proc/loadavg").read().split()[0]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m forkattn.bench.cpu_quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per row and case")
    p.add_argument("--rounds", type=int, default=7, help="minimum interleaved rounds")
    p.add_argument("--no-bf16", action="store_true", help="no forkattn-bf16 row (it is slow where bf16 is emulated)")
    p.add_argument("--no-ort", action="store_true", help="no ONNX Runtime rows")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"--cases: unknown {bad}, expected some of {list(CASES)}")
    threads = [int(t) for t in args.threads.split(",")]
    print(f"torch {torch.__version__}, {core.cpu_model()}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"quantized engines {torch.backends.quantized.supported_engines}, "
          f"native bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    built = {}
    for c in cases:
        label, cfg, B, L = CASES[c]
        if label not in built:
            built.clear()  # one model shape in memory at a time
            built[label] = build(cfg, not args.no_bf16, not args.no_ort)
        for t in threads:
            run_case(label, B, L, t, *built[label], args)


if __name__ == "__main__":
    main()
