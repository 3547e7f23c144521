#!/usr/bin/env bash
# MLM masking on a GPU machine: compile-check the kernel, build, run the GPU tests (CUDA and Triton
# bit-identical to the CPU kernel, statistics), and the benchmark. To be folded into scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc -std=c++17 -O3 -Xptxas -v -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
  -c kernels/mlm/mlm.cu -I kernels -o /tmp/mlm_check.o 2>&1 | grep -E "spill|stack frame"
pip install --no-build-isolation --no-deps -e . > /tmp/forkattn_build.log 2>&1 || { tail -50 /tmp/forkattn_build.log; exit 1; }
TRITON_INTERPRET=0 python -m pytest tests/test_mlm.py -q  # includes the @pytest.mark.gpu tests
python -m forkattn.bench --only mlm
