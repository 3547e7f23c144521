"""A/B of the DeBERTa attention on CPU: two forkattn trees, in alternating child processes.

    python -m forkattn.bench.ab_deberta_cpu --old /work/main/python --new /work/wt/debcpu4/python \\
        --threads 1,2 --rounds 4 --reps 7 --shapes 4,128 1,512 --passes fwd fwd+bwd

Each round runs one child per tree (the order alternating between rounds); a child builds
bench/deberta.py's attention case (transformers' DisentangledSelfAttention with DeBERTa-v3-base
shapes, padded L/2..L, its projections included, as the "attention" rows of `python -m forkattn.bench
deberta`) and times hf-eager and forkattn-cpu interleaved, --reps calls each after a warm-up: the
best wall time and the median process CPU time per call. The report per (threads, shape, pass):
each tree's median over rounds of forkattn-cpu's best time and its ratio to hf-eager (speed-up),
with the min..max over rounds, and old/new. --kernel times the _C forward and backward calls
alone instead (the phases: what keeping the products costs the forward and saves the backward). /proc/loadavg is printed before and after: on a shared
machine read the spread, not one figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = """
import json, sys, time, torch
torch.set_num_threads({threads})
from forkattn.bench.deberta import _attention_setup
fns = _attention_setup({B}, {L}, torch.device("cpu"), torch.float32, "{pass_}", 0)()
names = ["hf-eager", "forkattn-cpu"]
for n in names:
    for _ in range(2):
        fns[n]()
wall = {{n: [] for n in names}}
cpu = {{n: [] for n in names}}
for r in range({reps}):
    for n in (names if r % 2 == 0 else names[::-1]):
        t0, c0 = time.perf_counter(), time.process_time()
        fns[n]()
        wall[n].append(time.perf_counter() - t0)
        cpu[n].append(time.process_time() - c0)
print(json.dumps({{n: [min(wall[n]) * 1e3, sorted(cpu[n])[len(cpu[n]) // 2] * 1e3] for n in names}}))
"""

# --kernel: the _C calls alone at the same shapes (fp32, padded L/2..L, v3 table): "fwd" and "bwd"
# phases separately; a tree with the kept-products pair (commit 0ff94c0, reverted: docs/DEBERTA_CPU.md)
# runs that pair instead (its forward keeps the products, its backward reads them).
KERNEL_CHILD = """
import json, time, torch
torch.set_num_threads({threads})
from forkattn import _native
from forkattn.bench.deberta import _mask
from forkattn.disentangled import relative_position_index
C = _native._C
B, H, L, D = {B}, 12, {L}, 64
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
pk, pq = (torch.randn(H, 512, D, generator=g) for _ in range(2))
kpm = _mask(B, L, "cpu", 0).bool()
table = relative_position_index(L, L, max_relative_positions=512, position_buckets=256)
dout = torch.randn(B, H, L, D, generator=g)
s = (3 * D) ** -0.5
kept = hasattr(C, "disentangled_attention_fwd_cpu_kept")
def fwd():
    if kept:
        return C.disentangled_attention_fwd_cpu_kept(q, k, v, pk, pq, table, kpm, s, True, True)
    return C.disentangled_attention_fwd_cpu(q, k, v, pk, pq, table, kpm, s, True, True)
res = fwd()
def bwd():
    if kept:
        return C.disentangled_attention_bwd_cpu_kept(dout, q, k, v, pk, pq, res[0], res[1], res[2], res[3], table,
                                                     kpm, s, True, True)
    return C.disentangled_attention_bwd_cpu(dout, q, k, v, pk, pq, res[0], res[1], table, kpm, s, True, True)
fns = {{"fwd": fwd, "bwd": bwd}}
out = {{}}
for n, f in fns.items():
    f(); f()
    wall, cpu = [], []
    for _ in range({reps}):
        t0, c0 = time.perf_counter(), time.process_time()
        f()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out[n] = [min(wall) * 1e3, sorted(cpu)[len(cpu) // 2] * 1e3]
print(json.dumps(out))
"""


def child(path: str, threads: int, B: int, L: int, pass_: str, reps: int, kernel: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(threads))
    code = (KERNEL_CHILD if kernel else CHILD).format(threads=threads, B=B, L=L, pass_=pass_, reps=reps)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def kernel_ab(a, threads: int, B: int, L: int) -> None:
    runs = {"old": [], "new": []}
    for r in range(a.rounds):
        for tree in (("old", "new") if r % 2 == 0 else ("new", "old")):
            runs[tree].append(child(getattr(a, tree), threads, B, L, "", a.reps, kernel=True))
    for phase in ("fwd", "bwd"):
        med = {t: statistics.median(x[phase][0] for x in rs) for t, rs in runs.items()}
        spread = {t: (min(x[phase][0] for x in rs), max(x[phase][0] for x in rs)) for t, rs in runs.items()}
        cpu = {t: statistics.median(x[phase][1] for x in rs) for t, rs in runs.items()}
        print(f"kernel threads {threads} B{B} L{L} {phase}: " + " | ".join(
            f"{t}: {med[t]:7.2f} ms ({spread[t][0]:.2f}..{spread[t][1]:.2f}, cpu {cpu[t]:.1f})" for t in runs) +
            f" | old/new {med['old'] / med['new']:.2f}x  load {load()}", flush=True)


def load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split(" ")[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the old tree's python folder (on PYTHONPATH in its children)")
    ap.add_argument("--new", required=True)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--shapes", nargs="+", default=["4,128", "1,512"], help="B,L")
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--kernel", action="store_true", help="time the _C forward and backward calls alone")
    a = ap.parse_args(argv)
    print(f"load before: {load()}  ({time.strftime('%H:%M:%S', time.gmtime())} UTC)", flush=True)
    for threads in (int(t) for t in a.threads.split(",")):
        for shape in a.shapes:
            B, L = (int(x) for x in shape.split(","))
            if a.kernel:
                kernel_ab(a, threads, B, L)
                continue
            for pass_ in a.passes:
                runs = {"old": [], "new": []}
                for r in range(a.rounds):
                    for tree in (("old", "new") if r % 2 == 0 else ("new", "old")):
                        runs[tree].append(child(getattr(a, tree), threads, B, L, pass_, a.reps))
                line = [f"threads {threads} B{B} L{L} {pass_:8s}"]
                med = {}
                for tree, rs in runs.items():
                    ours = [x["forkattn-cpu"][0] for x in rs]
                    speed = [x["hf-eager"][0] / x["forkattn-cpu"][0] for x in rs]
                    cpu = statistics.median(x["forkattn-cpu"][1] for x in rs)
                    med[tree] = statistics.median(ours)
                    line.append(f"{tree}: {med[tree]:7.2f} ms ({min(ours):.2f}..{max(ours):.2f}, cpu {cpu:.1f}) "
                                f"{statistics.median(speed):.2f}x hf ({min(speed):.2f}..{max(speed):.2f})")
                line.append(f"old/new {med['old'] / med['new']:.2f}x  load {load()}")
                print(" | ".join(line), flush=True)
    print(f"load after: {load()}", flush=True)


if __name__ == "__main__":
    main()
