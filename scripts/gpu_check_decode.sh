#!/usr/bin/env bash
# GPU checks of the decode family (issue 6), for a machine with a CUDA device:
#   build with the CUDA kernels, run the GPU tests (CUDA and Triton vs the fp64 reference, CUDA-graph
#   capture + replay == eager launches), compute-sanitizer on a subset, then the decode benchmark.
# Usage: scripts/gpu_check_decode.sh [--no-build] [--quick]
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
    python setup.py build_ext --inplace > /tmp/forkattn_decode_build.log 2>&1 || { tail -50 /tmp/forkattn_decode_build.log; exit 1; }
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
python -c "import forkattn; print(forkattn.build_info())"
python -m pytest tests/test_decode.py -q -m gpu -x
# compute-sanitizer: memcheck on one contiguous and one paged generation, and the graph replay
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest tests/test_decode.py -q -x \
    -k "gpu_generation and cuda and fp16 and d64" -p no:cacheprovider
  compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest tests/test_decode.py -q -x \
    -k "gpu_splits and cuda and s17" -p no:cacheprovider
fi
python -m forkattn.bench --only decode $QUICK
