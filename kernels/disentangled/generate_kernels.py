#!/usr/bin/env python3
"""Writes one .cu per (forward|backward, with or without dropout, dtype, head_dim) instantiation of the disentangled-attention forward and backward into
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
    # dropout_p > 0: the same kernels with the mask code compiled in (kernels/attention/dropout.cuh),
    # in files of their own so that a parallel build compiles them side by side with the plain ones
    "disentangled_fwd_dropout": ("fwd_kernel.cuh", "FORKATTN_INSTANTIATE_DISENTANGLED_FWD_DROPOUT"),
    "disentangled_bwd_dropout": ("bwd_kernel.cuh", "FORKATTN_INSTANTIATE_DISENTANGLED_BWD_DROPOUT"),
}


def files() -> dict:
    """file name -> contents: forward and backward, with and without dropout, at every dtype and
    head_dim of generate.DTYPES / HEAD_DIMS (the cuda backend declares all of them)."""
    return instantiations("disentangled", LAUNCHERS)


if __name__ == "__main__":
    sys.exit(write_or_check(files(), HERE / "generated", __doc__))
