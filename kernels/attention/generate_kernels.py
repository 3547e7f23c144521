#!/usr/bin/env python3
"""Writes one .cu per (forward|backward, with or without dropout, dtype, head_dim) into kernels/attention/generated/, so a
CUDA build compiles the instantiations in parallel. Checked in with its output; rerun after
changing the lists in kernels/common/generate.py:  python kernels/attention/generate_kernels.py
`--check` exits 1 when the checked-in files differ from what this script writes."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "common"))
from generate import instantiations, write_or_check  # noqa: E402

LAUNCHERS = {
    "attention_fwd": ("fwd_kernel.cuh", "FORKATTN_INSTANTIATE_ATTENTION_FWD"),
    "attention_bwd": ("bwd_kernel.cuh", "FORKATTN_INSTANTIATE_ATTENTION_BWD"),
    # dropout_p > 0: the same kernels with the mask code compiled in, in files of their own so that
    # a parallel build compiles them side by side with the plain ones
    "attention_fwd_dropout": ("fwd_kernel.cuh", "FORKATTN_INSTANTIATE_ATTENTION_FWD_DROPOUT"),
    "attention_bwd_dropout": ("bwd_kernel.cuh", "FORKATTN_INSTANTIATE_ATTENTION_BWD_DROPOUT"),
}


def files() -> dict:
    """file name -> contents."""
    return instantiations("attention", LAUNCHERS)


if __name__ == "__main__":
    sys.exit(write_or_check(files(), HERE / "generated", __doc__))
