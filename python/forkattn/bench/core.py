"""Timing, table and files for `python -m forkattn.bench`.

A Case holds zero-argument callables, one per implementation ("eager" is the baseline for the
speedup column, "sdpa" PyTorch's scaled_dot_product_attention, "forkattn-<backend>" ours), and
the work of one call (FLOPs, or bytes moved) so the table can give TFLOP/s or TB/s.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

FAMILIES = ["attention", "mlm", "decode", "bert", "gpt"]


@dataclass
class Case:
    family: str
    name: str
    fns: Dict[str, Callable[[], object]]
    flops: Optional[float] = None  # per call, FlashAttention's count
    bytes: Optional[float] = None  # per call, read + written
    tokens: Optional[float] = None  # per call, tokens processed or generated (a tok/s column)
    params: dict = field(default_factory=dict)


def attention_flops(B, H, Lq, Lk, D, *, causal=False, backward=False) -> float:
    """4*B*H*Lq*Lk*D forward, half for causal, x2.5 for the backward (so x3.5 fwd+bwd)."""
    f = 4.0 * B * H * Lq * Lk * D
    if causal:
        f /= 2
    return f * 3.5 if backward else f


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, quick: bool) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        try:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=20 if quick else 100) / 1e3
        except ImportError:
            pass
    fn()  # warm-up (and compile)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    budget = 0.3 if quick else 2.0
    reps = int(max(3, min(200, budget / one)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_cases(cases: List[Case], device: torch.device, *, quick: bool) -> List[dict]:
    rows = []
    for case in cases:
        base = None
        results = {}
        for impl, fn in case.fns.items():
            try:
                results[impl] = time_fn(fn, device, quick=quick)
            except Exception as e:  # a backend that cannot run a shape is reported, not fatal
                results[impl] = e
        base = results.get("eager")
        for impl, t in results.items():
            row = {"family": case.family, "case": case.name, "impl": impl, **case.params}
            if isinstance(t, Exception):
                row.update(ms=None, error=f"{type(t).__name__}: {t}"[:200])
            else:
                row["ms"] = t * 1e3
                if case.flops:
                    row["tflops"] = case.flops / t / 1e12
                if case.bytes:
                    row["tbps"] = case.bytes / t / 1e12
                if case.tokens:
                    row["tok_s"] = case.tokens / t
                if isinstance(base, float):
                    row["vs_eager"] = base / t
                sdpa = results.get("sdpa")
                if isinstance(sdpa, float):
                    row["vs_sdpa"] = sdpa / t
            rows.append(row)
        print_case(case, [r for r in rows if r["case"] == case.name and r["family"] == case.family])
    return rows


def print_case(case: Case, rows: List[dict]) -> None:
    print(f"\n{case.family}: {case.name}")
    print(f"  {'impl':<22}{'ms':>10}{'TFLOP/s':>10}{'TB/s':>9}{'vs eager':>10}{'vs sdpa':>9}"
          + (f"{'tok/s':>12}" if case.tokens else ""))
    for r in rows:
        if r.get("ms") is None:
            print(f"  {r['impl']:<22}  {r['error']}")
            continue
        tf = f"{r['tflops']:.3f}" if "tflops" in r else "-"
        tb = f"{r['tbps']:.3f}" if "tbps" in r else "-"
        ve = f"{r['vs_eager']:.2f}x" if "vs_eager" in r else "-"
        vs = f"{r['vs_sdpa']:.2f}x" if "vs_sdpa" in r else "-"
        ts = f"{r['tok_s']:>12,.0f}" if "tok_s" in r else ""
        print(f"  {r['impl']:<22}{r['ms']:>10.3f}{tf:>10}{tb:>9}{ve:>10}{vs:>9}{ts}")


def environment(device: torch.device) -> dict:
    import forkattn

    env = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "forkattn": forkattn.build_info(),
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m forkattn.bench", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (CI)")
    p.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated families of {FAMILIES}")
    p.add_argument("--out", default=os.environ.get("FORKATTN_BENCH_OUT", "bench_out"), help="folder for JSON and CSV")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    families = [f for f in args.only.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; expected some of {FAMILIES}")
    env = environment(device)
    print(f"forkattn bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['timestamp']})")
    rows = []
    for fam in families:
        try:
            mod = importlib.import_module(f"forkattn.bench.{fam}")
        except ModuleNotFoundError as e:
            if e.name == f"forkattn.bench.{fam}":
                print(f"\n{fam}: no benchmark in this build")
                continue
            raise
        rows += run_cases(mod.cases(device, args.quick), device, quick=args.quick)
    os.makedirs(args.out, exist_ok=True)
    stamp = env["timestamp"].replace(":", "").replace("-", "")
    base = os.path.join(args.out, f"bench_{device.type}_{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
    keys = sorted({k for r in rows for k in r})
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "timestamp", "torch", "forkattn"] + keys)
        w.writeheader()
        for r in rows:
            w.writerow({"device": env["device"], "timestamp": env["timestamp"], "torch": env["torch"],
                        "forkattn": env["forkattn"]["version"], **r})
    print(f"\nwrote {base}.json and {base}.csv")
    return 0
