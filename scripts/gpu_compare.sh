#!/usr/bin/env bash
# Times this checkout's CUDA kernels against other source trees' on the same GPU, in one session
# (issue 5: a kernel change is kept only if it is measured faster). Builds each other tree's native
# library with CMake for this card alone, all at once, installs this checkout as scripts/gpu_check.sh
# does, then runs `benchmarks/bench_cuda.py --quick` for this build, each other tree in turn, and this
# build again (so that drift on a shared machine shows). Run scripts/gpu_check.sh first: this script
# checks no results. Every timing table goes into one file, compare.md, in $OUT when set, else
# ./gpu_report (the device tool brings back at most 8 files); build logs stay in a temporary folder
# and are printed only when a build fails.
#
#   git archive main CMakeLists.txt pyproject.toml plugins | (mkdir -p .ref/main && tar -x -C .ref/main)  # CPU
#   bash scripts/gpu_compare.sh .ref/main [.ref/other ...]                                   # GPU machine
#
# Every tree must speak the same C ABI as this checkout's Python side, and hold pyproject.toml (CMake reads
# the version there). A tree whose build fails is reported and left out; the others are still timed.
set -u
[ $# -ge 1 ] || { echo "usage: gpu_compare.sh SOURCE_TREE [SOURCE_TREE ...]"; exit 2; }
REPORT=${OUT:-$PWD/gpu_report}
mkdir -p "$REPORT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
[ -n "$arch" ] || { echo "NO GPU: nvidia-smi names no compute capability; nothing to compare"; exit 1; }
label() { basename "$1"; }
logs=$(mktemp -d)
: >"$REPORT/compare.md"

echo "=== building $* for sm_$arch, and this checkout"
declare -A build_dir job
for tree in "$@"; do
  build_dir[$tree]=$(mktemp -d)
  log="$logs/build_$(label "$tree")"
  (cmake -S "$tree" -B "${build_dir[$tree]}" -DCMAKE_BUILD_TYPE=Release -DDYNSEG_CUDA_ARCHITECTURES="$arch-real" \
    >"$log.configure.log" 2>&1 && cmake --build "${build_dir[$tree]}" -j 8 >"$log.log" 2>&1) &
  job[$tree]=$!
done
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$logs/build.log" 2>&1; then
  tail -30 "$logs/build.log"; echo "BUILD FAILED (this checkout)"; exit 1
fi
built=()
for tree in "$@"; do
  if wait "${job[$tree]}"; then
    built+=("$tree")
  else
    tail -n 30 "$logs/build_$(label "$tree")".*log; echo "BUILD FAILED ($tree): left out"
  fi
done

bench() {  # name [library]
  echo "=== $1"
  DYNSEG_LIBRARY=${2:-} timeout 200 $PY benchmarks/bench_cuda.py --quick --out "$logs/$1.md" | tail -9
  { echo "## $1"; echo; cat "$logs/$1.md" 2>/dev/null; echo; } >>"$REPORT/compare.md"
}
bench this
for tree in "${built[@]}"; do
  library=$(find "${build_dir[$tree]}" -name 'libdynseg_crf.so' | head -1)
  [ -n "$library" ] || { echo "NO LIBRARY built for $tree"; exit 1; }
  bench "$(label "$tree")" "$library"
done
bench this-again

echo "=== semantic 512×512 (call / graph / build ms)"
for name in this $(for tree in "${built[@]}"; do label "$tree"; done) this-again; do
  awk -F'|' -v name="$name" '/semantic \| 512×512/ { printf "%-20s %s /%s /%s\n", name, $6, $7, $8 }' \
    "$logs/$name.md"
done
