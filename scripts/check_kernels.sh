#!/usr/bin/env bash
# Compile-check every CUDA file in kernels/ with plain nvcc (no torch, no GPU needed) for
# sm_80 and sm_90a, print ptxas' register/stack/spill report, and fail on any spill.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "check_kernels: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
mapfile -t files < <(find kernels -name '*.cu' | sort)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_kernels: no .cu files under kernels/" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
run_one() {
  local f=$1 log=$out/$(echo "$1" | tr '/' '_').log
  if ! "$NVCC" -std=c++17 -O3 -Xptxas -v --expt-relaxed-constexpr -I kernels \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
      -c "$f" -o "$out/$(basename "$f").o" >"$log" 2>&1; then
    echo "FAIL $f"; cat "$log"; return 1
  fi
  local spills
  spills=$(grep -Eo '[0-9]+ bytes spill (stores|loads)' "$log" | awk '$1 > 0' | wc -l)
  local kernels
  kernels=$(grep -c 'Compiling entry function' "$log" || true)
  echo "ok   $f: $kernels entry functions, $(grep -c 'Used [0-9]* registers' "$log" || true) register reports"
  grep -E "Compiling entry function|Used [0-9]+ registers|spill" "$log" | sed 's/^ptxas info    : /    /' | paste - - - | \
    sed -E 's/Compiling entry function .(_Z[0-9]+)?([A-Za-z_0-9]{0,60})[^ ]* for .(sm_[0-9a]+)./\2 [\3]/' | sed 's/^/    /' | head -40
  if [ "$spills" -gt 0 ]; then
    echo "SPILL $f: local-memory spills reported"; return 1
  fi
}
for f in "${files[@]}"; do
  run_one "$f" || status=1
done
exit $status
