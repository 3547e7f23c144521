#!/usr/bin/env python3
"""Writes one .cu per (dtype, head_dim) instantiation of the disentangled-attention forward and backward into
kernels/disentangled/generated/, so a CUDA build compiles them in parallel. Checked in with its
output; rerun after changing the lists in kernels/common/generate.py:
python kernels/disentangled/generate_kernels.py
`--check` exits 1 when the checked-in files differ from what this script writes."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "common"))
from generate import instantiations, write_or_check  # noqa: E402

LAUNCHERS = {
    "disentangled_fwd": ("fwd_kernel.cuh", "FORKATTN_INSTANTIATE_DISENTANGLED_FWD"),
    "disentangled_bwd": ("bwd_kernel.cuh", "FORKATTN_INSTANTIATE_DISENTANGLED_BWD"),
}


BWD_HEAD_DIMS = (64,)  # DeBERTa-v2/v3's head_dim; 32 and 128 spill in the dk/dv kernel (see launch.cu)


def files() -> dict:
    """file name -> contents."""
    return {name: text for name, text in instantiations("disentangled", LAUNCHERS).items()
            if not name.startswith("disentangled_bwd") or any(name.endswith(f"_hdim{d}.cu") for d in BWD_HEAD_DIMS)}


if __name__ == "__main__":
    sys.exit(write_or_check(files(), HERE / "generated", __doc__))
