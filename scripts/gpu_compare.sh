#!/usr/bin/env bash
# Times this checkout's CUDA kernels against another source tree's on the same GPU, in one session
# (issue 5: a kernel change is kept only if it is measured faster). Builds the other tree's native
# library with CMake for this card alone, installs this checkout as scripts/gpu_check.sh does, then
# runs `benchmarks/bench_cuda.py --quick` for this build, the other, and this build again (so that
# drift on a shared machine shows). Run scripts/gpu_check.sh first: this script checks no results.
#
#   git archive main CMakeLists.txt plugins | (mkdir -p .ref && tar -x -C .ref)     # on the CPU machine
#   bash scripts/gpu_compare.sh .ref [REPORT_DIR]                                    # on the GPU machine
#
# The other tree must speak the same C ABI as this checkout's Python side.
set -u
OTHER=${1:?usage: gpu_compare.sh OTHER_SOURCE_TREE [REPORT_DIR]}
REPORT=${2:-${OUT:-$PWD/gpu_report}}
mkdir -p "$REPORT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
other_build=$(mktemp -d)

echo "=== building $OTHER for sm_$arch, and this checkout"
(cmake -S "$OTHER" -B "$other_build" -DCMAKE_BUILD_TYPE=Release -DDYNSEG_CUDA_ARCHITECTURES="$arch-real" \
  >"$REPORT/other_configure.log" 2>&1 && cmake --build "$other_build" -j 8 >"$REPORT/other_build.log" 2>&1) &
other=$!
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$REPORT/build.log" 2>&1; then
  tail -30 "$REPORT/build.log"; echo "BUILD FAILED (this checkout)"; exit 1
fi
if ! wait $other; then tail -30 "$REPORT/other_build.log"; echo "BUILD FAILED ($OTHER)"; exit 1; fi
library=$(find "$other_build" -name 'libdynseg_crf.so' | head -1)

for run in this other this-again; do
  echo "=== $run"
  if [ $run = other ]; then
    DYNSEG_LIBRARY=$library timeout 200 $PY benchmarks/bench_cuda.py --quick --out "$REPORT/compare_$run.md" | tail -9
  else
    timeout 200 $PY benchmarks/bench_cuda.py --quick --out "$REPORT/compare_$run.md" | tail -9
  fi
done
