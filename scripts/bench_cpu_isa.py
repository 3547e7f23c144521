"""The per-ISA variants of forkattn's CPU kernels side by side (csrc/cpu/isa.h).

    python scripts/bench_cpu_isa.py [--rounds 15] [--threads N] [--isas default,avx2]

Every variant compiled in that this CPU executes (or --isas) is timed on attention forward and
backward, decode (GQA), disentangled attention forward and the BERT encoder epilogues, in one
process: each round runs every case under every variant in a shuffled order (switching with
forkattn._C._choose_cpu_isa), each timing the median of a few calls. Prints per case the median
and the spread (min..max over rounds) of each variant and its speed against the first variant,
with the thread count and the machine's load before and after."""
import argparse
import random
import statistics
import time
from pathlib import Path

import torch

import forkattn
from forkattn import KVCache

C = forkattn._native._C


def cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    out = {}
    q, k, v = r(4, 12, 256, 64), r(4, 12, 256, 64), r(4, 12, 256, 64)
    mask = torch.arange(256)[None] < torch.tensor([256, 200, 150, 97])[:, None]
    out["attention fwd B4 H12 L256 D64 padded"] = lambda: forkattn.attention(q, k, v, key_padding_mask=mask, backend="cpu")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o = forkattn.attention(qg, kg, vg, causal=True, backend="cpu")
    dout = r(*o.shape)
    out["attention fwd+bwd B4 H12 L256 D64 causal"] = lambda: torch.autograd.grad(
        forkattn.attention(qg, kg, vg, causal=True, backend="cpu"), (qg, kg, vg), dout)
    cache = KVCache(4, 4, 1024, 64, dtype=torch.float32, device="cpu")
    cache.append(r(4, 4, 1024, 64), r(4, 4, 1024, 64), backend="cpu")
    qd = r(4, 16, 1, 64)
    out["decode B4 H16/Hkv4 D64 ctx1024"] = lambda: forkattn.decode_attention(qd, cache, backend="cpu")
    qs, ks, vs = r(1, 12, 256, 64), r(1, 12, 256, 64), r(1, 12, 256, 64)
    pk, pq = r(12, 512, 64), r(12, 512, 64)
    out["disentangled fwd B1 H12 L256 D64"] = lambda: forkattn.disentangled_attention(
        qs, ks, vs, pk, pq, max_relative_positions=512, position_buckets=256, backend="cpu")
    x, bias = r(128, 3072), r(3072)
    out["bias+gelu 128x3072"] = lambda: C.bias_gelu_cpu(x, bias)
    h, res, b2, w, lb = r(128, 768), r(128, 768), r(768), r(768), r(768)
    out["bias+residual+layernorm 128x768"] = lambda: C.bias_residual_layernorm_cpu(h, res, b2, w, lb, 1e-12)
    return out


def runs_here(isa):
    flags = set(next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")),
                     "").split())
    avx2 = {"avx2", "fma", "f16c"} <= flags
    return {"default": True, "avx2": avx2, "avx512": avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags}[isa]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=5, help="calls per timing (their median)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--isas", default=None, help="comma list (default: every compiled variant this CPU runs)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    isas = a.isas.split(",") if a.isas else [i for i in C.cpu_isas_compiled() if runs_here(i)]
    before = C.cpu_isa()
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    work = cases()
    times = {(c, i): [] for c in work for i in isas}
    for isa in isas:  # warm-up
        C._choose_cpu_isa(isa)
        for fn in work.values():
            fn()
    for _ in range(a.rounds):
        order = [(c, i) for c in work for i in isas]
        random.shuffle(order)
        for c, isa in order:
            C._choose_cpu_isa(isa)
            reps = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                work[c]()
                reps.append(time.perf_counter() - t0)
            times[(c, isa)].append(statistics.median(reps) * 1e3)
    C._choose_cpu_isa(before)
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    print(f"# forkattn CPU kernel variants; torch {torch.__version__}, {a.threads} threads, {a.rounds} rounds x "
          f"median of {a.reps}; loadavg before {' '.join(load0)}, after {' '.join(load1)}")
    print(f"| case | " + " | ".join(f"{i} ms median (min..max)" for i in isas) + " | " +
          " | ".join(f"{i} vs {isas[0]}" for i in isas[1:]) + " |")
    print("|---" * (2 * len(isas)) + "|")
    for c in work:
        med = {i: statistics.median(times[(c, i)]) for i in isas}
        cells = [f"{med[i]:.3f} ({min(times[(c, i)]):.3f}..{max(times[(c, i)]):.3f})" for i in isas]
        ratios = [f"{med[isas[0]] / med[i]:.2f}x" for i in isas[1:]]
        print(f"| {c} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
