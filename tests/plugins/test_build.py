"""The build's two shapes: with nvcc the installed library carries the CUDA kernels; with
DYNSEG_CUDA=OFF (or no nvcc) it still builds, and its CUDA entry points say what is missing."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from dynseg.sdk import _native

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_library_has_cuda_kernels_exactly_when_nvcc_is_there():
    assert _native.cuda_compiled() == (shutil.which("nvcc") is not None)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on the PATH")
def test_a_cpu_only_build_works_and_its_cuda_entry_points_say_so(tmp_path):
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DDYNSEG_CUDA=OFF", "-DDYNSEG_NATIVE_ARCH=OFF"],
        capture_output=True, text=True,
    )
    assert configure.returncode == 0, configure.stderr
    assert "building the CPU kernels only" in configure.stdout
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j", "2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    library = ctypes.CDLL(str(next(tmp_path.rglob("libdynseg_crf.so"))))
    library.dynseg_last_error.restype = ctypes.c_char_p
    assert library.dynseg_cuda_compiled() == 0
    assert library.dynseg_cuda_device_count() == 0
    status = library.dynseg_crf_forward_cuda(None, None, None, None, ctypes.c_size_t(0), None)
    assert status == _native.Status.NOT_SUPPORTED
    assert b"built without CUDA" in library.dynseg_last_error()
