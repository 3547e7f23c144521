"""Cases, timing and the run loop of `python -m forkattn.bench`.

A family is one module, registered by one line in FAMILIES below. It provides:

  cases(device, size) -> list[Case]
      size is "quick" (a CI smoke set, ~1-2 minutes on 2 CPU cores for all families),
      "default" (`make bench`, ~10 minutes) or "full". Listing cases must be cheap: put tensor
      and model allocation in Case.setup, which runs just before the case is timed (the
      pytest-benchmark suite in benchmarks/ lists every family's cases at collection time).
      An older two-argument form cases(device, quick: bool) returning Cases with fns filled
      in still works.
  IMPLS (optional): {implementation name or glob such as "forkattn-*": one-line description}, the legend
      printed before the family's tables and in report.md. Say there what each row is, e.g.
      that "hf-sdpa" is transformers' model with attn_implementation="sdpa".
  REQUIRES (optional): names of modules the family cannot run without (e.g. "transformers").
      When one is missing, or the family's import raises ModuleNotFoundError for a module
      outside forkattn, the family is skipped with a one-line notice and the run exits 0.

A Case holds zero-argument callables, one per implementation, the work of one call (FLOPs,
bytes moved or tokens, so the table can give TFLOP/s, TB/s or tok/s) and where its figure goes
in the family's charts (chart, panel, x). Its baselines: `eager` and `sdpa` name the rows the
"vs eager" / "vs sdpa" columns divide by ("eager" and "sdpa" unless the case says otherwise).

Timing: on CPU the implementations of a case are interleaved round-robin (each round times
every implementation once, in a rotated order) until the time budget is spent, so machine load
hits all of them alike; each figure is the median of the rounds with the interquartile range
as its spread. On CUDA each implementation goes through triton.testing.do_bench (quantiles
0.25/0.5/0.75).
"""
from __future__ import annotations

import fnmatch
import gc
import importlib
import importlib.util
import inspect
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch


@dataclass(frozen=True)
class Family:
    name: str
    module: str
    about: str


FAMILIES: List[Family] = [  # one line per family; python -m forkattn.bench runs them in this order
    Family("attention", "forkattn.bench.attention", "attention kernels alone: BERT key padding, GPT causal"),
    Family("mlm", "forkattn.bench.mlm", "BERT 80/10/10 MLM masking of int64 batches"),
    Family("decode", "forkattn.bench.decode", "KV-cache decode attention"),
    Family("bert", "forkattn.bench.bert", "BERT-base end to end: inference and an MLM training step"),
    Family("gpt", "forkattn.bench.gpt", "GPT-2: prefill and greedy generation"),
    Family("hf", "forkattn.bench.hf", "transformers' BERT, GPT-2 and GQA Llama with attn_implementation='forkattn'"),
    Family("deberta", "forkattn.bench.deberta", "DeBERTa-v3: disentangled attention and the encoder vs transformers"),
]
SIZES = ("quick", "default", "full")
NOISY = 0.20  # a spread (IQR / median) above this marks a row as noisy

# per size: seconds of timing per implementation and case (CPU), minimum and maximum rounds
BUDGETS = {"quick": (0.15, 3, 50), "default": (0.6, 5, 100), "full": (2.0, 9, 300)}


@dataclass
class Case:
    family: str
    name: str
    fns: Optional[Dict[str, Callable[[], object]]] = None  # built by setup() when None
    flops: Optional[float] = None  # per call, FlashAttention's count
    bytes: Optional[float] = None  # per call, read + written
    tokens: Optional[float] = None  # per call, tokens processed or generated (a tok/s column)
    params: dict = field(default_factory=dict)
    setup: Optional[Callable[[], Dict[str, Callable[[], object]]]] = None
    chart: str = ""  # the family's chart this case is drawn in, e.g. "float32 padded"
    panel: str = ""  # the sub-plot in that chart, e.g. "fwd" or "fwd+bwd"
    x: str = ""  # the category on the chart's x axis, e.g. "L512"
    xlabel: str = ""  # what x is, e.g. "sequence length"
    eager: str = "eager"  # the row "vs eager" divides by
    sdpa: str = "sdpa"  # the row "vs sdpa" divides by
    pause_s: float = 0.0  # CPU: sleep between timed calls, untimed (ONNX Runtime's workers; see bench/ort.py)

    def callables(self) -> Dict[str, Callable[[], object]]:
        if self.fns is None:
            self.fns = self.setup()
        return self.fns

    def release(self) -> None:
        """Drop the tensors of a case built by setup() once it is timed."""
        if self.setup is not None:
            self.fns = None

    @property
    def metric(self) -> str:
        """The figure its chart shows: tok/s for models, else TFLOP/s, TB/s, or ms."""
        return "tok_s" if self.tokens else "tflops" if self.flops else "tbps" if self.bytes else "ms"


def fused_backends(op: str, device: torch.device, dtype=None, head_dim: Optional[int] = None,
                   features=()) -> List[str]:
    """The forkattn backends a family times for a call of op family `op` ("attention",
    "decode_attention", "mlm_mask", ...): every backend the registry says can run it here, fastest
    first, except "eager" (each family has its own eager row) and a backend that runs this device
    only in an interpreter (Triton on CPU tensors: correct, but its timings mean nothing)."""
    from .. import backends

    fam = backends.get(op)
    return [n for n in fam.runnable(device.type, dtype, head_dim, features)
            if not fam.backends[n].FALLBACK and device.type not in fam.backends[n].INTERPRETED_ON]


def attention_flops(B, H, Lq, Lk, D, *, causal=False, backward=False) -> float:
    """4*B*H*Lq*Lk*D forward, half for causal, x2.5 for the backward (so x3.5 fwd+bwd)."""
    f = 4.0 * B * H * Lq * Lk * D
    if causal:
        f /= 2
    return f * 3.5 if backward else f


def cpu_model() -> str:
    """The CPU's marketing name ("model name" in /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def loadavg() -> Optional[float]:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- timing

@dataclass
class Timing:
    """Seconds per call: median, quartiles and minimum over the samples."""

    median: float
    q1: float
    q3: float
    min: Optional[float]
    samples: int

    @property
    def spread(self) -> float:
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    @classmethod
    def of(cls, xs: List[float]) -> "Timing":
        if len(xs) == 1:
            return cls(xs[0], xs[0], xs[0], xs[0], 1)
        q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        return cls(med, q1, q3, min(xs), len(xs))


def _time_cuda(fns, size):
    import triton.testing

    out = {}
    warmup, rep = (10, 20) if size == "quick" else (25, 100)
    for name, fn in fns.items():
        try:
            q1, med, q3 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.25, 0.5, 0.75])
            out[name] = Timing(med / 1e3, q1 / 1e3, q3 / 1e3, None, 0)
        except Exception as e:  # a backend that cannot run a shape is reported, not fatal
            out[name] = e
    return out


def time_interleaved(fns: Dict[str, Callable[[], object]], *, budget_s: float, min_rounds: int,
                     max_rounds: int, sync: Callable[[], None] = lambda: None, sample_s: float = 1e-3,
                     slow_round_s: float = 4.0, pause_s: float = 0.0) -> Dict[str, Union[Timing, Exception]]:
    """Round-robin timing: one warm-up call each, then rounds that time every implementation
    once (a sample of `number` calls, about sample_s long), the order rotated each round, until
    min_rounds are done and budget_s has passed (or max_rounds). When one round takes longer than
    slow_round_s (a whole model's training step per implementation), 3 rounds are the minimum.
    pause_s: an untimed sleep before each sample. GC is off while timing."""
    out: Dict[str, Union[Timing, Exception]] = {}
    number, first = {}, {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            fn()  # warm-up (and compile)
            sync()
            first[name] = time.perf_counter() - t0
            if first[name] < 50 * sample_s:  # calibrate on a second call: the first one may compile
                t0 = time.perf_counter()
                fn()
                sync()
                first[name] = time.perf_counter() - t0
            number[name] = max(1, min(1000, int(sample_s / max(first[name], 1e-7))))
        except Exception as e:  # a backend that cannot run a shape is reported, not fatal
            out[name] = e
    live = list(number)
    if sum(first.values()) > slow_round_s:
        min_rounds = min(min_rounds, 3)
    samples: Dict[str, List[float]] = {n: [] for n in live}
    gc.collect()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        start, r = time.perf_counter(), 0
        while live and r < max_rounds and (r < min_rounds or time.perf_counter() - start < budget_s):
            k = r % len(live)
            for name in live[k:] + live[:k]:
                fn, n = fns[name], number[name]
                if pause_s:
                    time.sleep(pause_s)
                try:
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    sync()
                    samples[name].append((time.perf_counter() - t0) / n)
                except Exception as e:
                    out[name] = e
            live = [n for n in live if n not in out]
            r += 1
    finally:
        if gc_was_on:
            gc.enable()
    for name, xs in samples.items():
        if name not in out and xs:
            out[name] = Timing.of(xs)
    return {name: out[name] for name in fns if name in out}


def time_case(fns, device: torch.device, size: str, pause_s: float = 0.0) -> Dict[str, Union[Timing, Exception]]:
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return _time_cuda(fns, size)
    per_impl, min_rounds, max_rounds = BUDGETS[size]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return time_interleaved(fns, budget_s=per_impl * len(fns), min_rounds=min_rounds, max_rounds=max_rounds, sync=sync,
                            pause_s=pause_s)


def case_rows(case: Case, results: Dict[str, Union[Timing, Exception]]) -> List[dict]:
    """One JSON/CSV row per implementation of a timed case."""
    base = results.get(case.eager)
    sdpa = results.get(case.sdpa)
    rows = []
    for impl, t in results.items():
        row = {"family": case.family, "case": case.name, "impl": impl, **case.params,
               "chart": case.chart, "panel": case.panel, "x": case.x, "xlabel": case.xlabel, "metric": case.metric,
               "eager_impl": case.eager if isinstance(base, Timing) else None,
               "sdpa_impl": case.sdpa if isinstance(sdpa, Timing) else None}
        if isinstance(t, Exception):
            row.update(ms=None, error=f"{type(t).__name__}: {t}".splitlines()[0][:200])
            rows.append(row)
            continue
        row.update(ms=t.median * 1e3, ms_q1=t.q1 * 1e3, ms_q3=t.q3 * 1e3, spread=t.spread, samples=t.samples)
        if t.min is not None:
            row["ms_min"] = t.min * 1e3
        if case.flops:
            row["tflops"] = case.flops / t.median / 1e12
        if case.bytes:
            row["tbps"] = case.bytes / t.median / 1e12
        if case.tokens:
            row["tok_s"] = case.tokens / t.median
        if isinstance(base, Timing):
            row["vs_eager"] = base.median / t.median
        if isinstance(sdpa, Timing):
            row["vs_sdpa"] = sdpa.median / t.median
        rows.append(row)
    return rows


# ---------------------------------------------------------------- families

class FamilySkipped(Exception):
    """A family cannot run here for a missing optional dependency (a notice, not a failure)."""


def _missing(e: ImportError) -> Optional[str]:
    name = getattr(e, "name", None) or ""
    return name if name and name.split(".")[0] != "forkattn" else None


def load_family(fam: Family, device: torch.device, size: str):
    """(module, cases) of a family; FamilySkipped when an optional dependency is missing."""
    try:
        mod = importlib.import_module(fam.module)
    except ImportError as e:
        if _missing(e):
            raise FamilySkipped(f"needs {_missing(e)} (pip install {_missing(e).split('.')[0]})") from e
        raise
    for req in getattr(mod, "REQUIRES", ()):
        if importlib.util.find_spec(req) is None:
            raise FamilySkipped(f"needs {req} (pip install {req})")
    try:
        if "size" in inspect.signature(mod.cases).parameters:
            cases = mod.cases(device, size=size)
        else:  # the older two-argument form cases(device, quick)
            cases = mod.cases(device, size == "quick")
    except ImportError as e:
        if _missing(e):
            raise FamilySkipped(f"needs {_missing(e)} (pip install {_missing(e).split('.')[0]})") from e
        raise
    return mod, cases


def legend(mod, impls: List[str]) -> Dict[str, str]:
    """The family's IMPLS entries ({name or glob pattern: text}) that match an implementation run."""
    table = getattr(mod, "IMPLS", {}) or {}
    return {key: text for key, text in table.items() if any(fnmatch.fnmatchcase(i, key) for i in impls)}


NOTICES: List[str] = []


def notice(family: str, text: str) -> None:
    """A one-line remark of a family (e.g. an optional row left out), printed and kept for report.md."""
    line = f"{family}: {text}"
    if line not in NOTICES:
        NOTICES.append(line)
        print(line, flush=True)
