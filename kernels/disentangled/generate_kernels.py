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


def files() -> dict:
    """file name -> contents: forward and backward at every head_dim of generate.HEAD_DIMS."""
    return instantiations("disentangled", LAUNCHERS)


if __name__ == "__main__":
    sys.exit(write_or_check(files(), HERE / "generated", __doc__))
