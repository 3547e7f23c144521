"""Compile forkattn's Triton attention kernels for sm_80 / sm_90a without a GPU, and report what
ptxas says about each configuration: registers per thread, spill bytes, Triton's shared memory.

The interpreter (TRITON_INTERPRET=1) checks the math; this checks that the kernels compile for
real targets (types, layouts, pipelining) and which autotune configurations spill. It uses the
ptxas bundled with Triton.

    python scripts/triton_compile_check.py --arch 90 80 [--all]

--all compiles every autotune configuration the keep() filter accepts (slow: ~10 s each);
by default a few representative ones. Exit status 1 if any compile fails.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from forkattn.triton import attention as ta  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
KERNELS = {"fwd": ta._attn_fwd_kernel, "dkdv": ta._attn_bwd_dkdv_kernel, "dq": ta._attn_bwd_dq_kernel}
CONFIGS = {"fwd": ta._FWD_CONFIGS, "dkdv": ta._BWD_CONFIGS, "dq": ta._BWD_CONFIGS}
FEW = {"fwd": [(128, 64, 8, 3), (64, 64, 4, 3)], "dkdv": [(64, 128, 8, 2), (32, 64, 4, 2)],
       "dq": [(128, 64, 8, 2), (64, 64, 4, 2)]}
POINTERS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}


def signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*" + dtype
        elif name in ("Lse", "Delta"):
            sig[name] = "*fp32"
        elif name in ("KLO", "KHI", "CU_Q", "CU_K"):
            sig[name] = "*i32"
        elif name == "KPM":
            sig[name] = "*u8"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(kind, dtype, D, cfg, arch, causal=True, mask=True, varlen=False):
    bm, bn, w, s = cfg
    fn = KERNELS[kind]
    const = dict(IS_CAUSAL=causal, HAS_MASK=mask, IS_VARLEN=varlen, D=D, BLOCK_D=ta._block_d(D), UPCAST=False,
                 DOT_PREC="ieee" if dtype == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn)
    ck = triton.compile(ASTSource(fn, signature(fn, dtype, const), constexprs=const),
                        target=GPUTarget("cuda", arch, 32), options={"num_warps": w, "num_stages": s})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ck.asm["ptx"])
    try:
        sm = "sm_90a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run([PTXAS, f"-arch={sm}", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", res.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    return int(regs[0]) if regs else -1, int(spills[0]) if spills else -1, ck.metadata.shared


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--dtypes", nargs="+", default=["fp16:64", "bf16:128"], help="dtype:head_dim pairs")
    args = ap.parse_args()
    failed = 0
    for arch in args.arch:
        for pair in args.dtypes:
            dtype, D = pair.split(":")
            D = int(D)
            elem = 4 if dtype == "fp32" else 2
            for kind in KERNELS:
                cfgs = ([(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in CONFIGS[kind]]
                        if args.all else FEW[kind])
                for cfg in cfgs:
                    if not ta.keep(kind, *cfg, ta._block_d(D), elem):
                        continue
                    try:
                        regs, spill, smem = compile_one(kind, dtype, D, cfg, arch)
                        print(f"sm_{arch} {kind:4s} {dtype} D={D} BM,BN,warps,stages={cfg}: "
                              f"{regs} regs, {spill} B spilled, {smem} B smem", flush=True)
                    except Exception as e:  # report every failure, then exit 1
                        failed += 1
                        print(f"sm_{arch} {kind} {dtype} D={D} {cfg}: FAILED {type(e).__name__}: {e}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
