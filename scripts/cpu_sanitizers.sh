#!/usr/bin/env bash
# The CPU kernel library under gcc's sanitizers, for a change to plugins/src: builds it twice beside
# the package's own build (AddressSanitizer with UndefinedBehaviorSanitizer, then ThreadSanitizer),
# loads each through DYNSEG_LIBRARY with its runtime preloaded, and runs the native tests under the
# first and a threaded call under the second. The first also runs a C++ program that calls every entry
# point (tests/plugins/abi_driver.cpp) with leak detection on, which Python can't have, against the
# library and against its CUDA kernels emulated on the CPU (tests/cuda_emulation), whose parity cases it
# also runs. Any report stops the step; the exit status is 1 if a step failed. About 11 minutes on 2
# cores.
#
#   bash scripts/cpu_sanitizers.sh [BUILD_DIR]      (default: the checkout's build/sanitizers)
#
# Uses $PYTHON, else the python3 on the PATH, with dynseg installed (editable or not: only the kernel
# library is swapped) and pytest. Python itself is not instrumented, so leak checking is off under it.
set -u
BUILD=$(realpath -m "${1:-$(dirname "${BASH_SOURCE[0]}")/../build/sanitizers}")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
failed=()
ASAN_RUNTIME="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"  # for Python to preload
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

build() {  # folder, sanitizer flags
  cmake -S . -B "$1" -DDYNSEG_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        "-DCMAKE_CXX_FLAGS=$2 -fno-omit-frame-pointer" "-DCMAKE_SHARED_LINKER_FLAGS=$2" >/dev/null &&
    cmake --build "$1" -j --target dynseg_crf >/dev/null
}

driver() {  # library, program: tests/plugins/abi_driver.cpp under ASan+UBSan, linked to the library
  g++ -std=c++17 -g -fsanitize=address,undefined -fno-omit-frame-pointer -I plugins/include \
      tests/plugins/abi_driver.cpp -o "$2" "$1" -Wl,-rpath,"$(dirname "$1")" -pthread
}

echo "=== AddressSanitizer + UndefinedBehaviorSanitizer: the native tests"
if build "$BUILD/address" "-fsanitize=address,undefined -fno-sanitize-recover=undefined"; then
  # the deselected test starts a child whose environment no longer puts ASan's runtime first
  LD_PRELOAD="$ASAN_RUNTIME" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
  DYNSEG_LIBRARY="$BUILD/address/plugins/libdynseg_crf.so" \
    "$PY" -m pytest -q -p no:cacheprovider tests/plugins/test_native_library.py \
      tests/plugins/test_detection_potential.py tests/sdk/test_dense_crf.py tests/trainer/test_native_op.py \
      tests/trainer/test_reference_crf.py \
      --deselect tests/sdk/test_dense_crf.py::test_where_no_thread_can_start_a_call_on_several_threads_runs_on_the_callers_alone \
    || failed+=("address/undefined")
else
  failed+=("address/undefined build")
fi

echo "=== AddressSanitizer with leak detection: every C entry point from a C++ program"
# tests/plugins/abi_driver.cpp, which has no Python around it to keep memory alive until exit
if [ -f "$BUILD/address/plugins/libdynseg_crf.so" ] &&
   driver "$BUILD/address/plugins/libdynseg_crf.so" "$BUILD/address/abi_driver"; then
  ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 "$BUILD/address/abi_driver" || failed+=("address/leaks")
else
  failed+=("address/leaks build")
fi

echo "=== AddressSanitizer + UndefinedBehaviorSanitizer: the CUDA kernels emulated on the CPU"
# parity.py's cases through every kernel; then the C++ program through the CUDA entry points with leak
# detection on (their host side allocates device memory, which the emulation takes from the heap)
emulated="$BUILD/address/libdynseg_crf_emulated.so"
if "$PY" tests/cuda_emulation/emulator.py --sanitize "$emulated" >/dev/null &&
   driver "$emulated" "$BUILD/address/abi_driver_emulated"; then
  LD_PRELOAD="$ASAN_RUNTIME" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
  DYNSEG_LIBRARY="$emulated" "$PY" tests/cuda_emulation/parity.py >"$BUILD/address/parity.log" ||
    { tail -20 "$BUILD/address/parity.log"; failed+=("address/undefined, CUDA emulated"); }
  tail -1 "$BUILD/address/parity.log"
  ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 "$BUILD/address/abi_driver_emulated" ||
    failed+=("address/leaks, CUDA emulated")
else
  failed+=("CUDA emulated build")
fi

echo "=== ThreadSanitizer: calls on two threads, equal to one thread's"
if build "$BUILD/thread" "-fsanitize=thread"; then
  LD_PRELOAD="$(gcc -print-file-name=libtsan.so)" TSAN_OPTIONS=halt_on_error=1:exitcode=66 \
  DYNSEG_LIBRARY="$BUILD/thread/plugins/libdynseg_crf.so" "$PY" - <<'EOF' || failed+=("thread")
import numpy as np
from dynseg.sdk import dense_crf

rng = np.random.default_rng(0)
for labels, height, width in ((21, 64, 80), (3, 97, 33), (2, 1, 200)):
    unary = rng.normal(size=(labels, height, width)).astype(np.float32)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert np.array_equal(dense_crf(unary, image, threads=2), dense_crf(unary, image, threads=1))
print("no data race reported; two threads' results equal one thread's")
EOF
else
  failed+=("thread build")
fi

if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all clean"
