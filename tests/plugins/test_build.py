"""The build's two shapes: with nvcc the installed library carries the CUDA kernels; with
DYNSEG_CUDA=OFF (or no nvcc) it still builds, and its CUDA entry points say what is missing. Either
way the library exports its C ABI and nothing else."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from dynseg.plugins import library_path
from dynseg.sdk import _native

ROOT = Path(__file__).resolve().parents[2]
needs_nm = pytest.mark.skipif(platform.system() != "Linux" or shutil.which("nm") is None,
                              reason="reading a library's exports needs Linux and binutils' nm")


def exported_names(library: Path) -> set[str]:
    """The symbols a shared library defines for others to bind to."""
    listing = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}


def static_cxx_runtime_flags() -> list[str]:
    """Linker flags that put the C++ runtime inside the library, as some toolchains do by default (one
    lent GPU machine's did, and its exported copy crashed a plugin), where g++ has the archives."""
    compiler = shutil.which("g++")
    if compiler is None:
        return []
    archive = subprocess.run([compiler, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    return ["-DCMAKE_SHARED_LINKER_FLAGS=-static-libstdc++ -static-libgcc"] if Path(archive).is_absolute() else []


def test_the_installed_library_has_cuda_kernels_exactly_when_nvcc_is_there():
    assert _native.cuda_compiled() == (shutil.which("nvcc") is not None)


@needs_nm
def test_the_installed_library_exports_its_c_abi_and_nothing_else():
    names = exported_names(library_path())
    assert "dynseg_crf_forward" in names
    assert {name for name in names if not name.startswith("dynseg_")} == set()


@needs_nm
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on the PATH")
def test_a_cpu_only_build_works_exports_only_the_c_abi_and_its_cuda_entry_points_say_so(tmp_path):
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DDYNSEG_CUDA=OFF", "-DDYNSEG_NATIVE_ARCH=OFF",
         *static_cxx_runtime_flags()],
        capture_output=True, text=True,
    )
    assert configure.returncode == 0, configure.stderr
    assert "building the CPU kernels only" in configure.stdout
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j", "2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    built = next(tmp_path.rglob("libdynseg_crf.so"))
    assert {name for name in exported_names(built) if not name.startswith("dynseg_")} == set()
    library = ctypes.CDLL(str(built))
    library.dynseg_last_error.restype = ctypes.c_char_p
    assert library.dynseg_cuda_compiled() == 0
    assert library.dynseg_cuda_device_count() == 0
    status = library.dynseg_crf_forward_cuda(None, None, None, None, ctypes.c_size_t(0), None)
    assert status == _native.Status.NOT_SUPPORTED
    assert b"built without CUDA" in library.dynseg_last_error()
