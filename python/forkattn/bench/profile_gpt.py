"""GPT-2 greedy generate on CPU: forkattn (fast path on and off) vs transformers' generate (sdpa).

    python -m forkattn.bench.profile_gpt [--batch 1,8] [--threads 1] [--prompt 32] [--new 64]
                                         [--rounds 5] [--profile]

GPT-2 small shapes (124M) with random weights, the same in every implementation; prompts of
random tokens. Rows, interleaved and rotated every round (a 20 ms pause before each call):
  forkattn      GPT.generate(do_sample=False) with the CPU fast path (models/cpu_inference_gpt.py)
  forkattn-nosplit  (batch 1, more than one thread) the fast path with SPLIT_ROW_GEMMS = False: the
                one-row GEMMs as one MKL call each, which runs on one thread
  forkattn-off  the same with cpu_inference_gpt.FUSED = False (the module path)
  hf-sdpa       GPT2LMHeadModel.generate(do_sample=False), attn_implementation="sdpa"
Each batch prints whether all rows produced the same tokens, the median and p10-p90 of every row,
the ratios against hf-sdpa and the 1-minute load average before and after. --profile adds
torch.profiler's per-op table of one call per row (9 new tokens). Figures feed docs/CPU_INFERENCE_GPT.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..models import cpu_inference_gpt as fast
from ..models.gpt import GPT, GPTConfig
from .gpt import _hf_models


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def _quantile(v, q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def _rows(model, hf, prompt, new):
    def ours(fused: bool, split: bool = True):
        def run():
            was, fast.FUSED = fast.FUSED, fused
            was_split, fast.SPLIT_ROW_GEMMS = fast.SPLIT_ROW_GEMMS, split
            try:
                return model.generate(prompt, new, do_sample=False)
            finally:
                fast.FUSED, fast.SPLIT_ROW_GEMMS = was, was_split
        return run
    rows = {"forkattn": ours(True)}
    if prompt.shape[0] == 1 and torch.get_num_threads() > 1 and fast._SPLIT is not None:
        rows["forkattn-nosplit"] = ours(True, split=False)  # one-row GEMMs on one thread (MKL's own)
    return {**rows, "forkattn-off": ours(False),
            "hf-sdpa": lambda: hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                           pad_token_id=0)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m forkattn.bench.profile_gpt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    hf = _hf_models(model, torch.float32, torch.device("cpu"))["sdpa"]
    print(f"GPT-2 small fp32, {a.threads} thread(s), prompt {a.prompt} + {a.new} new tokens, {a.rounds} rounds")
    for B in (int(b) for b in a.batch.split(",")):
        prompt = torch.randint(0, model.config.vocab_size, (B, a.prompt), generator=torch.Generator().manual_seed(B))
        with torch.no_grad():
            rows = _rows(model, hf, prompt, a.new)
            outs = {k: f() for k, f in rows.items()}  # warm-up: builds the fast path's caches
            same = all(torch.equal(o, outs["hf-sdpa"]) for o in outs.values())
            times = {k: [] for k in rows}
            names, load0 = list(rows), _load()
            for r in range(a.rounds):
                for k in names[r % len(names):] + names[:r % len(names)]:
                    time.sleep(0.02)
                    t = time.perf_counter()
                    rows[k]()
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"B{B}: same tokens {same}, load {load0} -> {_load()}")
        for k, v in times.items():
            print(f"  {k:16s} {med[k] * 1e3:8.0f} ms  p10-p90 [{_quantile(v, .1) * 1e3:.0f}, {_quantile(v, .9) * 1e3:.0f}]"
                  f"  vs hf-sdpa {med['hf-sdpa'] / med[k]:.2f}x", flush=True)
        if a.profile:
            from torch.profiler import profile
            short = _rows(model, hf, prompt, 9)
            for k, f in short.items():
                with torch.no_grad(), profile() as prof:
                    f()
                print(f"  profile {k} B{B} (9 new tokens)")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
