#!/usr/bin/env python3
"""Writes one .cu per (dtype, head_dim) instantiation of the decode kernel into
kernels/decode/generated/, so a CUDA build compiles them in parallel. Checked in with its output;
rerun after changing the lists in kernels/common/generate.py:  python kernels/decode/generate_kernels.py
`--check` exits 1 when the checked-in files differ from what this script writes."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "common"))
from generate import instantiations, write_or_check  # noqa: E402

LAUNCHERS = {"decode_attention": ("decode_kernel.cuh", "FORKATTN_INSTANTIATE_DECODE_ATTENTION")}


def files() -> dict:
    """file name -> contents."""
    return instantiations("decode", LAUNCHERS)


if __name__ == "__main__":
    sys.exit(write_or_check(files(), HERE / "generated", __doc__))
