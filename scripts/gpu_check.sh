#!/usr/bin/env bash
# One command for a session with a GPU (issue 5): builds dynseg with its CUDA kernels, runs the GPU
# tests and the TensorRT plugin's enqueue on the GPU (a stand-in for TensorRT, where TensorRT's
# headers were carried along), compute-sanitizer (memcheck with its leak check, racecheck, synccheck)
# on a small forward and backward, the GPU benchmark and, where Nsight Compute is installed, an
# analysis of the main kernels, and writes a report. Under 5 minutes on an H100/H200 machine (the
# analysis is capped at 150 s). The steps run in the order of what they prove for issue 5 (tests, then
# the benchmark, then the sanitizers and the plugin), each capped so that all of them end within
# DYNSEG_GPU_CHECK_S seconds of the start (default 360): a short lease keeps the most important ones.
# The report is at most 8 files (what the device tool brings back): gpu.txt, build.log, tests.log,
# bench.log, bench_cuda.md, sanitizers.log, plugin.log and, with the analysis, ncu.txt.
#
#   bash scripts/gpu_check.sh [REPORT_DIR]      (default: $OUT when set, else ./gpu_report)
#
# DYNSEG_NCU=0 skips the Nsight Compute analysis (150 s of a short device lease).
#
# Uses $PYTHON, else the python3 on the PATH (it must have torch with CUDA, pytest and
# scikit-build-core), and installs dynseg into it (editable, no dependencies fetched). If
# .whl/pydensecrf2-*.tar.gz exists it builds pydensecrf from it for the benchmark's CPU comparison.
# Every step runs even when one before it failed; the exit status is 1 if any failed (the steps are
# named at the end), and the script stops at once where the build fails or no GPU is usable.
set -u
REPORT=${1:-${OUT:-$PWD/gpu_report}}
mkdir -p "$REPORT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
started=$(date +%s)
deadline=$(( started + ${DYNSEG_GPU_CHECK_S:-360} ))
step() { echo; echo "=== $1 ($(( $(date +%s) - started )) s)"; }
# a step's timeout: its own cap, or what is left before the deadline when that is less (at least 5 s)
cap() {
  local left=$(( deadline - $(date +%s) ))
  if (( left < $1 )); then echo $(( left > 5 ? left : 5 )); else echo "$1"; fi
}
failed=()
check() { [ "$2" = 0 ] || failed+=("$1 (exit code $2)"); }  # step name, its exit code

if ! missing=$($PY -c 'import importlib.util as u; print(" ".join(m for m in ("torch", "pytest", "scikit_build_core", "cmake")
                                                                   if u.find_spec(m) is None))'); then
  echo "cannot run $PY: set PYTHON to the python that has torch with CUDA"; exit 1
fi
if command -v cmake >/dev/null; then missing=${missing/cmake/}; fi  # CMake on the PATH serves as well
missing=$(echo $missing)
if [ -n "$missing" ]; then
  echo "$PY lacks $missing: pip install -e \".[dev]\" (and cmake where no CMake is on the PATH) with a CUDA build" \
       "of torch, or set PYTHON"
  exit 1
fi

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | tee "$REPORT/gpu.txt"
nvcc --version | tail -1
# the build compiles for this card alone (CI compiles every architecture): 30 s less of the lease
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
arch_option=${arch:+-C cmake.define.DYNSEG_CUDA_ARCHITECTURES=${arch}-real}

if ls .whl/pydensecrf2-*.tar.gz >/dev/null 2>&1; then
  (timeout 240 $PY -m pip install -q --no-deps --no-build-isolation .whl/pydensecrf2-*.tar.gz \
     >/tmp/pydensecrf_build.log 2>&1 && echo "pydensecrf built" || echo "pydensecrf build failed (see build.log)") &
  dcrf=$!
fi

step "build"
if ! $PY -m pip install -v --no-deps --no-build-isolation $arch_option -e . >"$REPORT/build.log" 2>&1; then
  tail -30 "$REPORT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -i "warning" "$REPORT/build.log" | grep -v -i "pip\|setuptools" | head -20
$PY -c "from dynseg.sdk import _native as n; print('native', n.native_version(), 'cuda compiled', n.cuda_compiled(), 'devices', n.cuda_device_count())"
$PY - <<'EOF' || exit 1
from dynseg.sdk import _native
try:
    _native.check_cuda_device(0)
except ValueError as error:
    raise SystemExit(f"NO USABLE GPU, nothing to check: {error}")
EOF

step "GPU tests"
# -v names every case (L, size) that passed; -rfEs lists failures and errors as well as the skips' reasons
timeout "$(cap 300)" $PY -m pytest -v -rfEs -p no:cacheprovider tests/gpu 2>&1 | tee "$REPORT/tests.log" | tail -25
check "GPU tests" "${PIPESTATUS[0]}"

if [ -n "${dcrf:-}" ]; then
  wait $dcrf
  { echo; echo "=== pydensecrf"; cat /tmp/pydensecrf_build.log; } >>"$REPORT/build.log" 2>/dev/null
fi
step "benchmark"
timeout "$(cap 200)" $PY benchmarks/bench_cuda.py --profile --out "$REPORT/bench_cuda.md" 2>&1 \
  | tee "$REPORT/bench.log" | tail -12
check benchmark "${PIPESTATUS[0]}"

step "compute-sanitizer"
# memcheck with its leak check; then what the CPU emulation of the kernels cannot see: shared-memory
# races between a block's threads, and barriers or warp intrinsics that not every thread they name reaches
for tool in memcheck racecheck synccheck; do
  options=(--tool "$tool" --error-exitcode 1)
  [ "$tool" = memcheck ] && options+=(--leak-check full)
  { echo "=== $tool"; timeout "$(cap 120)" compute-sanitizer "${options[@]}" $PY scripts/cuda_smoke.py; } \
    >>"$REPORT/sanitizers.log" 2>&1
  code=$?; check "$tool" $code; echo "$tool exit code $code"
done
grep -E "^=== |ERROR SUMMARY|LEAK SUMMARY|RACECHECK SUMMARY" "$REPORT/sanitizers.log"

step "the TensorRT plugin on the GPU, without TensorRT"
# TensorRT's public headers cannot come from this machine's network: copy them on the CPU machine into
# .ref/trt-headers/<version>/ (.ref is git-ignored; the device tool carries it), or set
# DYNSEG_TENSORRT_HEADERS.
if [ -z "${DYNSEG_TENSORRT_HEADERS:-}" ] && ls -d .ref/trt-headers/*/ >/dev/null 2>&1; then
  DYNSEG_TENSORRT_HEADERS=$(ls -d "$PWD"/.ref/trt-headers/*/ | tr '\n' ':')
  export DYNSEG_TENSORRT_HEADERS
fi
if [ -n "${DYNSEG_TENSORRT_HEADERS:-}" ]; then
  timeout "$(cap 120)" $PY -m pytest -q -rfEs -p no:cacheprovider tests/cuda_emulation/test_emulated_plugin.py -k gpu \
    2>&1 | tee "$REPORT/plugin.log" | tail -8
  check "plugin tests" "${PIPESTATUS[0]}"
else
  echo "skipped: no TensorRT headers (.ref/trt-headers/<version>/ or DYNSEG_TENSORRT_HEADERS)"
fi

step "kernel analysis (Nsight Compute, when the machine has it)"
# What bounds each kernel of one semantic 512×512 call (memory or compute throughput, cache hit rates,
# occupancy, stall reasons): the first launches of the filtering kernels and the key insertion. Caches
# and clocks are left as they are: in a call, each kernel reads what the one before left in L2.
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ "${DYNSEG_NCU:-1}" = 0 ]; then
  echo "skipped (DYNSEG_NCU=0)"
elif [ -n "$ncu" ]; then
  timeout 150 "$ncu" -k regex:'slice$|vertex_sums|chunk_sums|blur_step|softmax_short_rows|insert_entries' \
    --launch-count 25 --cache-control none --clock-control none \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section WarpStateStats $PY benchmarks/bench_cuda.py --once >"$REPORT/ncu.txt" 2>&1
  echo "ncu exit code $? (report: ncu.txt)"
  grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|L1/TEX Hit|L2 Hit|Achieved Occupancy" "$REPORT/ncu.txt" | head -60
else
  echo "no ncu on this machine"
fi
step "done"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"; exit 1
fi
