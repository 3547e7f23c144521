#!/usr/bin/env bash
# GPU checks of the GPT family (issue 8), for a machine with a CUDA device:
#   build with the CUDA kernels, run the GPU tests of tests/test_gpt.py (CUDA-graph generate == eager
#   decode steps, fp16/fp32, static and forkattn caches; fp32 == transformers greedy), then the GPT
#   benchmark (GPT-2 small: prefill of 1024 tokens, greedy generate at batch 1 and 32 vs transformers).
# Usage: scripts/gpu_check_gpt.sh [--no-build] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=1; QUICK=""
for a in "$@"; do
  case "$a" in
    --no-build) BUILD=0 ;;
    --quick) QUICK="--quick" ;;
  esac
done
if [ "$BUILD" = 1 ]; then
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" \
    python setup.py build_ext --inplace > /tmp/forkattn_gpt_build.log 2>&1 || { tail -50 /tmp/forkattn_gpt_build.log; exit 1; }
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
python -c "import forkattn; print(forkattn.build_info())"
python -m pytest tests/test_gpt.py -q -m gpu -x
python -m forkattn.bench --only gpt $QUICK
