#!/usr/bin/env bash
# First, every family's generated instantiations are up to date (kernels/*/generate_kernels.py
# --check; needs only python3). Then compile-check every CUDA file in kernels/ with plain nvcc
# (no torch, no GPU needed) for sm_80 and sm_90a, print ptxas' register/stack/spill report per
# kernel, and fail on any error or local-memory spill. Files compile in parallel (MAX_JOBS,
# default nproc). KERNELS_UNDER=kernels/disentangled (say) compiles only that folder's files.
set -euo pipefail
cd "$(dirname "$0")/.."
for gen in kernels/*/generate_kernels.py; do
  if ! python3 "$gen" --check; then
    echo "check_kernels: $gen --check failed (run it without --check and commit generated/)" >&2
    exit 1
  fi
  echo "ok    $gen --check"
done
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "check_kernels: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
mapfile -t files < <(find "${KERNELS_UNDER:-kernels}" -name '*.cu' | sort)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_kernels: no .cu files under kernels/" >&2
  exit 1
fi
OUTDIR=$(mktemp -d)
trap 'rm -rf "$OUTDIR"' EXIT
export NVCC OUTDIR

compile_one() {
  local f=$1 tag
  tag=$(echo "$f" | tr '/' '_')
  if "$NVCC" -std=c++17 -O3 -Xptxas -v --expt-relaxed-constexpr -I kernels \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
      -c "$f" -o "$OUTDIR/$tag.o" >"$OUTDIR/$tag.log" 2>&1; then
    echo ok >"$OUTDIR/$tag.status"
  else
    echo fail >"$OUTDIR/$tag.status"
  fi
}
export -f compile_one
printf '%s\n' "${files[@]}" | xargs -P "${MAX_JOBS:-$(nproc)}" -I{} bash -c 'compile_one "$@"' _ {}

status=0
for f in "${files[@]}"; do
  tag=$(echo "$f" | tr '/' '_')
  log=$OUTDIR/$tag.log
  if [ "$(cat "$OUTDIR/$tag.status")" != ok ]; then
    echo "FAIL  $f"; cat "$log"; status=1; continue
  fi
  # One line per (kernel, arch): registers, stack frame, spills.
  report=$(python3 - "$log" <<'PY'
import re, sys
name = arch = frame = ""
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_[0-9a]+)'", line)
    if m:
        name, arch = m.group(1), m.group(2)
    m = re.search(r"(\d+ bytes stack frame.*)", line)
    if m:
        frame = m.group(1).strip()
    m = re.search(r"Used (\d+) registers", line)
    if m:
        print(f"    {arch:8} {m.group(1):>3} regs; {frame}; {name}")
PY
)
  report=$(echo "$report" | (c++filt 2>/dev/null || cat) | cut -c1-200)
  spills=$( (grep -Eo '[0-9]+ bytes spill (stores|loads)' "$log" || true) | awk '$1 > 0' | wc -l)
  echo "ok    $f"
  if [ -n "$report" ]; then echo "$report"; else echo "    (no kernels: host-side launch code)"; fi
  if [ "$spills" -gt 0 ]; then
    echo "SPILL $f: local-memory spills reported"; status=1
  fi
done
exit $status
