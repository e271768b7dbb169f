#!/usr/bin/env bash
# aarch64_sysroot.sh DIR: what tests/plugins/test_aarch64.py needs to build dynseg's kernel library for
# 64-bit ARM (Jetson, DRIVE, Grace) and run it here, on an x86-64 Debian or Ubuntu machine:
#   - the cross compiler (g++-aarch64-linux-gnu) and user-mode emulation (qemu-user), from apt;
#   - DIR/root: an ARM CPython 3.11 with its C libraries, from the distribution's arm64 packages,
#     unpacked without installing them (no maintainer scripts run; of the host, only dpkg's list of
#     architectures changes, below);
#   - DIR/site: numpy's manylinux aarch64 wheel, unpacked: the version $PYTHON (default python) has, or
#     the newest where it has none (the kernels, not numpy, compute what the test compares); and what
#     the Segmenter needs beside it: onnxruntime, onnx and their dependencies, Pillow. onnxruntime is
#     1.20.1 (dynseg takes 1.19 and newer): 1.32's aarch64 wheel crashes at import under Debian 12's
#     qemu 7.2 (SIGSEGV, not pursued), 1.20.1 runs there.
# Needs root for apt (it adds the arm64 architecture to dpkg so that apt can fetch those packages).
# The test reads DIR from DYNSEG_AARCH64_SYSROOT, else .aarch64 in the checkout (git-ignored).
set -euo pipefail

dir="${1:?usage: aarch64_sysroot.sh DIR}"
python="${PYTHON:-python}"

export DEBIAN_FRONTEND=noninteractive
tools=(g++-aarch64-linux-gnu qemu-user)
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  # a machine whose package lists are missing or stale gets them first
  apt-get install -y -q "${tools[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${tools[@]}" >/dev/null; }
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  apt-get update -q >/dev/null
fi

# python3.11's own packages and every library it or its extension modules (ctypes, ssl, sqlite, ...) link
packages=(libc6 libgcc-s1 libstdc++6 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libffi8
          libexpat1 zlib1g libbz2-1.0 liblzma5 libssl3 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1
          libcrypt1 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2
          libkeyutils1)
debs="$(mktemp -d)"
built=0
# a sysroot left half built (a wheel that failed to download) would make the tests fail, not skip
trap 'rm -rf "$debs"; [ "$built" = 1 ] || rm -rf "$dir/root" "$dir/site"' EXIT
trap 'exit 1' TERM INT  # a time limit's signal still runs the cleanup above
(cd "$debs" && apt-get download -q "${packages[@]/%/:arm64}" >/dev/null)
rm -rf "$dir/root" "$dir/site"
mkdir -p "$dir/root" "$dir/site"
for deb in "$debs"/*.deb; do
  dpkg-deb -x "$deb" "$dir/root"
done

numpy="$("$python" -c 'import numpy; print("numpy==" + numpy.__version__)' 2>/dev/null || echo "numpy>=1.24")"
for wheel in "$numpy" onnxruntime==1.20.1 onnx ml_dtypes protobuf typing_extensions flatbuffers packaging pillow; do
  "$python" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.11 \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform any "$wheel" -d "$debs"
done
for wheel in "$debs"/*.whl; do
  "$python" -m zipfile -e "$wheel" "$dir/site"
done

qemu-aarch64 -L "$dir/root" "$dir/root/usr/bin/python3.11" -c \
  "import sys; sys.path.insert(0, '$dir/site'); import numpy, platform; print('aarch64 python', platform.python_version(), 'numpy', numpy.__version__, platform.machine())"
built=1
