"""Compile forkattn/triton/disentangled_kernels.py for a GPU without one, and print ptxas's registers
and spills per kernel and config: triton.compile to a GPUTarget (default sm_90), then Triton's bundled
ptxas -v on the PTX. Slow on a small machine (20-200 s per compile under load); run by hand when
the kernels or their configs change.

    python scripts/ptxas_triton_disentangled.py                      # the default set below
    python scripts/ptxas_triton_disentangled.py fwd,fp16,64,64,64,8,2 dq,bf16,128,32,32,4,2
    (kernel,dtype,head_dim,BLOCK_M,BLOCK_N,num_warps,num_stages; every term and key padding on)
"""
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
os.environ.pop("TRITON_INTERPRET", None)
from forkattn.triton import disentangled_kernels as K  # noqa: E402

KERNELS = {"fwd": K._dis_fwd_kernel, "dq": K._dis_bwd_dq_kernel, "dkdv": K._dis_bwd_dkdv_kernel}
DEFAULT = ["fwd,fp16,64,32,32,4,2", "fwd,fp16,64,64,64,8,2", "dq,fp16,64,32,32,4,2", "dkdv,fp16,64,32,32,4,2"]
PTR_TYPES = {"REL": "*i64", "Lse": "*fp32", "Delta": "*fp32", "DPK": "*fp32", "DPQ": "*fp32", "KPM": "*u8",
             "KLO": "*i32", "KHI": "*i32", "qk_scale": "fp32", "sm_scale": "fp32"}
TENSORS = {"Q", "K", "V", "PK", "PQ", "Out", "DO", "DQ", "DK", "DV"}


def check(spec: str, arch: int = 90) -> str:
    name, dt, d, bm, bn, warps, stages = spec.split(",")
    d, bm, bn, warps, stages = int(d), int(bm), int(bn), int(warps), int(stages)
    kernel = KERNELS[name]
    consts = dict(C2P=True, P2C=True, HAS_MASK=True, D=d, BLOCK_D=d, UPCAST=False,
                  DOT_PREC="ieee" if dt == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn,
                  UP=triton.next_power_of_2(bm + bn - 1))
    sig = {n: "constexpr" if n in consts else ("*" + dt if n in TENSORS else PTR_TYPES.get(n, "i32"))
           for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", path, "-o", os.devnull],
                             capture_output=True, text=True)
    info = " | ".join(line.split("info    : ")[-1] for line in res.stderr.splitlines()
                      if "registers" in line or "spill" in line)
    return f"{spec}: shared {compiled.metadata.shared} B; {info or res.stderr.strip()}"


if __name__ == "__main__":
    for spec in sys.argv[1:] or DEFAULT:
        print(check(spec), flush=True)
