#!/usr/bin/env bash
# One prepared run on a GPU machine (preinstalled torch/triton, no network): build the CUDA
# extension, run the GPU tests, compute-sanitizer on a small subset, the benchmark.
# Everything lands under $OUT (./gpu_out if unset), at most 8 files. Aims at < 5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T))"; }

{
  step "device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  step "CUDA toolkit (the search setup.py runs: cuda_toolkit.py)"
  # Fails here, in seconds, naming what is missing, rather than minutes into a build.
  $PY cuda_toolkit.py || exit 1
  step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
  start=$SECONDS
  if ! FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  echo "built in $((SECONDS - start)) s"
  $PY scripts/check_cuda_build.py || exit 1
} 2>&1 | tee "$OUT/summary.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

step "GPU tests" | tee -a "$OUT/summary.log"
timeout ${GPU_TEST_TIMEOUT:-150} $PY -m pytest tests -m gpu -q --maxfail=25 -p no:cacheprovider > "$OUT/tests_gpu.log" 2>&1
echo "pytest exit $?" | tee -a "$OUT/summary.log"
tail -15 "$OUT/tests_gpu.log" | tee -a "$OUT/summary.log"

step "attention dropout cost (fwd+bwd, dropout_p 0 vs 0.1)" | tee -a "$OUT/summary.log"
timeout ${DROPOUT_BENCH_TIMEOUT:-60} $PY scripts/bench_attention_dropout.py 2>&1 | tee -a "$OUT/summary.log"

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool" | tee -a "$OUT/summary.log"
    for smoke in scripts/sanitize_*.py; do
      timeout ${SANITIZER_TIMEOUT:-60} compute-sanitizer --tool $tool --error-exitcode 9 \
        $PY "$smoke" >> "$OUT/sanitizer.log" 2>&1
      echo "$tool $smoke exit $?" | tee -a "$OUT/summary.log"
    done
  done
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.log" | tee -a "$OUT/summary.log"
fi

# DeBERTa (issue #17): the fused disentangled attention's correctness at full size is in the GPU
# tests above (tests/test_disentangled_triton.py, tests/test_disentangled_cuda.py); here its speed vs
# transformers' eager DisentangledSelfAttention (H12 D64 span 256, L128 and L512, fwd and fwd+bwd;
# goal >= 5x at L512). The forkattn-triton and forkattn-cuda rows (kernels/disentangled, forward and
# backward hand-written CUDA) are the fused kernels: their "vs eager" column at L512 is the ratio to
# transformers' eager module that the goal is about.
step "DeBERTa attention vs transformers" | tee -a "$OUT/summary.log"
# (the triton rows autotune on first use: compiles take most of the first case)
timeout ${DEBERTA_TIMEOUT:-180} $PY -m forkattn.bench --only deberta --no-plot --out "$(mktemp -d)" \
  > "$OUT/deberta.log" 2>&1
echo "deberta bench exit $?" | tee -a "$OUT/summary.log"
grep -E "^\[|^  (impl|hf-eager|forkattn-)" "$OUT/deberta.log" | tee -a "$OUT/summary.log"

# The cuda backend's backward at head_dim 32 and 128 (kernels/disentangled's D32/D128 instantiations;
# the GPU tests above cover them too): a 2x-rule check against fp64, then fwd+bwd time at B4 H12 L512
# against the eager disentangled attention and the triton backend.
step "DeBERTa attention at head_dim 32 / 128 (cuda backward)" | tee -a "$OUT/summary.log"
timeout ${DEBERTA_HDIM_TIMEOUT:-60} $PY scripts/bench_disentangled_head_dims.py 2>&1 | tee -a "$OUT/summary.log"

# The cuda backend's attention dropout (kernels/disentangled's DROPOUT instantiations, never run on
# a GPU before): the 2x rule against fp64 with the same Philox mask at each head_dim, then the
# mask's cost (fwd+bwd, dropout_p 0 vs 0.1) next to the triton backend's dropout. The GPU tests
# above hold the mask bit for bit to philox.py's and the CPU kernel's (test_disentangled_cuda.py).
step "DeBERTa attention dropout (cuda)" | tee -a "$OUT/summary.log"
timeout ${DEBERTA_DROPOUT_TIMEOUT:-90} $PY scripts/bench_disentangled_dropout.py 2>&1 | tee -a "$OUT/summary.log"

step "benchmark" | tee -a "$OUT/summary.log"
timeout ${BENCH_TIMEOUT:-120} $PY -m forkattn.bench ${BENCH_ARGS:-} --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench exit $?" | tee -a "$OUT/summary.log"
cat "$OUT/bench.log"

# Last, as it needs no GPU (device minutes go to the GPU steps first): the CPU kernels' AVX-512
# variant (issue #18) is compiled everywhere but executed only on a CPU with AVX-512 (the
# development machines have none): every CPU kernel under each variant this CPU runs,
# FORKATTN_CPU_CAPABILITY=avx512 included (2x rule against fp64, agreement between variants), then speed.
step "CPU kernel variants (default / avx2 / avx512)" | tee -a "$OUT/summary.log"
grep -o -w 'avx2\|avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ' | tee -a "$OUT/summary.log"; echo | tee -a "$OUT/summary.log"
timeout ${CPU_ISA_TIMEOUT:-120} $PY -m pytest tests/test_cpu_isa.py -v -p no:cacheprovider > "$OUT/cpu_isa.log" 2>&1
echo "pytest exit $?" | tee -a "$OUT/summary.log"
grep -E "PASS|FAIL|SKIP|ERROR|passed|failed" "$OUT/cpu_isa.log" | tail -15 | tee -a "$OUT/summary.log"
timeout ${CPU_ISA_BENCH_TIMEOUT:-60} $PY scripts/bench_cpu_isa.py --rounds 5 2>&1 | tee -a "$OUT/summary.log"
