"""The CPU attention kernels with forkattn's own tile matmul (csrc/cpu/tile_gemm.h) against the same
kernels on MKL's sgemm_, in one process (FORKATTN_CPU_TILE_GEMM=blas is read at every kernel call).

    python scripts/ab_tile_gemm_cpu.py [--threads 1] [--rounds 11] [--only attn|deb] [--isa avx2]

Kernel calls only (_C forward and backward, fp32): BERT/GPT attention at B4 L128 D64 padded, B1 L512
D64, B32 L128 D32 padded (MiniLM) and B1 L128 D32; DeBERTa-v3-base disentangled attention (H12 D64,
c2p + p2c, span 256, padded L/2..L) at B4 L128 and B1 L512. The two paths alternate call by call
(order flipped every round); per case the median wall ms of each, min..max, and blas / own (> 1:
ours faster), with /proc/loadavg before and after. --isa picks the variant (FORKATTN_CPU_CAPABILITY
semantics; the own path exists in the avx2 and avx512 variants, default always runs MKL)."""
import argparse
import os
import statistics
import time

import torch

from forkattn import _native
from forkattn.bench.deberta import _mask
from forkattn.disentangled import relative_position_index

C = _native._C


def attention_cases(g):
    for B, H, L, D, padded in [(4, 12, 128, 64, True), (1, 12, 512, 64, False), (32, 12, 128, 32, True),
                               (1, 12, 128, 32, False)]:
        q, k, v, do = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
        kpm = _mask(B, L, "cpu", 0).bool() if padded else None
        s = D ** -0.5
        o, lse = C.attention_fwd_cpu(q, k, v, kpm, False, s)
        yield (f"attn B{B} L{L} D{D}{' padded' if padded else ''}",
               lambda q=q, k=k, v=v, kpm=kpm, s=s: C.attention_fwd_cpu(q, k, v, kpm, False, s),
               lambda q=q, k=k, v=v, kpm=kpm, s=s, o=o, lse=lse, do=do:
               C.attention_bwd_cpu(do, q, k, v, o, lse, kpm, False, s))


def deberta_cases(g):
    for B, L in [(4, 128), (1, 512)]:
        H, D = 12, 64
        q, k, v, do = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
        pk, pq = (torch.randn(H, 512, D, generator=g) for _ in range(2))
        kpm = _mask(B, L, "cpu", 0).bool()
        t = relative_position_index(L, L, max_relative_positions=512, position_buckets=256)
        s = (3 * D) ** -0.5
        r = C.disentangled_attention_fwd_cpu(q, k, v, pk, pq, t, kpm, s, True, True)
        yield (f"deberta B{B} L{L}",
               lambda q=q, k=k, v=v, pk=pk, pq=pq, t=t, kpm=kpm, s=s:
               C.disentangled_attention_fwd_cpu(q, k, v, pk, pq, t, kpm, s, True, True),
               lambda q=q, k=k, v=v, pk=pk, pq=pq, t=t, kpm=kpm, s=s, r=r, do=do:
               C.disentangled_attention_bwd_cpu(do, q, k, v, pk, pq, r[0], r[1], t, kpm, s, True, True))


def set_path(path):
    if path == "blas":
        os.environ["FORKATTN_CPU_TILE_GEMM"] = "blas"
    else:
        os.environ.pop("FORKATTN_CPU_TILE_GEMM", None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--only", choices=["attn", "deb"])
    ap.add_argument("--isa", default="", help="default, avx2 or avx512 (unset: the process's choice)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    isa = C._choose_cpu_isa(args.isa)
    g = torch.Generator().manual_seed(0)
    cases = [*([] if args.only == "deb" else attention_cases(g)), *([] if args.only == "attn" else deberta_cases(g))]
    print(f"variant {isa}, threads {args.threads}, load {' '.join(open('/proc/loadavg').read().split()[:3])}")
    paths = ["blas", "own"]
    for name, fwd, bwd in cases:
        for phase, fn in (("fwd", fwd), ("bwd", bwd)):
            t = {p: [] for p in paths}
            for p in paths:
                set_path(p)
                fn()
                fn()
            for r in range(args.rounds):
                for p in paths if r % 2 == 0 else paths[::-1]:
                    set_path(p)
                    t0 = time.perf_counter()
                    fn()
                    t[p].append((time.perf_counter() - t0) * 1e3)
            med = {p: statistics.median(t[p]) for p in paths}
            cells = "  ".join(f"{p} {med[p]:7.2f} ({min(t[p]):.2f}..{max(t[p]):.2f})" for p in paths)
            print(f"{name:26s} {phase}: {cells}  blas/own {med['blas'] / med['own']:.2f}x", flush=True)
    set_path("own")
    print(f"load after {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
