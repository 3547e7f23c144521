"""Check that forkattn._C is a CUDA build with every CUDA entry point bound (no GPU needed).

The expected names are the `m.def("..._cuda", ...)` lines of pyext/, so a binding added there is
checked without editing this file. Exits 1 with the missing names.
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
expected = sorted({m for f in (ROOT / "pyext").glob("*.cpp")
                   for m in re.findall(r'm\.def\(\s*"(\w+_cuda)"', f.read_text())} - {"compiled_with_cuda"})
if not expected:
    sys.exit("check_cuda_build: found no m.def(\"*_cuda\") lines under pyext/")

import forkattn  # noqa: E402
from forkattn import _C  # noqa: E402

problems = []
if not _C.compiled_with_cuda():
    problems.append("_C.compiled_with_cuda() is False")
absent = [name for name in expected if not callable(getattr(_C, name, None))]
if absent:
    problems.append(f"entry points missing from _C: {', '.join(absent)}")
print(json.dumps(forkattn.build_info()))
print(f"check_cuda_build: {_C.__file__}")
print(f"check_cuda_build: {len(expected) - len(absent)}/{len(expected)} CUDA entry points: {', '.join(expected)}")
if problems:
    sys.exit("check_cuda_build: FAILED: " + "; ".join(problems))
print("check_cuda_build: OK")
