"""The build's two shapes: with nvcc the installed library carries the CUDA kernels; with
DYNSEG_CUDA=OFF (or no nvcc) it still builds, and its CUDA entry points say what is missing. Either
way the library exports its C ABI and nothing else."""

from __future__ import annotations

import ctypes
import glob
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from dynseg.plugins import library_path
from dynseg.sdk import _native
from dynseg.sdk.errors import NativeError

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
         # the hardening that Ubuntu's and Fedora's compilers turn on by default
         "-DCMAKE_CXX_FLAGS=-D_FORTIFY_SOURCE=3 -D_GLIBCXX_ASSERTIONS", *static_cxx_runtime_flags()],
        capture_output=True, text=True,
    )
    assert configure.returncode == 0, configure.stderr
    assert "building the CPU kernels only" in configure.stdout
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j", "2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert "warning" not in build.stdout + build.stderr, build.stdout + build.stderr
    built = next(tmp_path.rglob("libdynseg_crf.so"))
    assert {name for name in exported_names(built) if not name.startswith("dynseg_")} == set()
    library = ctypes.CDLL(str(built))
    library.dynseg_last_error.restype = ctypes.c_char_p
    assert library.dynseg_cuda_compiled() == 0
    assert library.dynseg_cuda_device_count() == 0
    status = library.dynseg_crf_forward_cuda(None, None, None, None, ctypes.c_size_t(0), None)
    assert status == _native.Status.NOT_SUPPORTED
    assert b"built without CUDA" in library.dynseg_last_error()


# gcc's -m flag and name for an instruction-set extension, and /proc/cpuinfo's
_EXTENSIONS = {"avx512vp2intersect": "avx512_vp2intersect", "avx512fp16": "avx512_fp16", "avx512bf16": "avx512_bf16",
               "avx512f": "avx512f", "avx2": "avx2"}


def _an_extension_this_cpu_lacks() -> str | None:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return next((name for name, flag in _EXTENSIONS.items() if flag not in flags), None)


def test_the_installed_library_runs_on_this_cpu():
    library = ctypes.CDLL(str(library_path()))
    library.dynseg_cpu_missing.restype = ctypes.c_char_p
    assert library.dynseg_cpu_missing() == b""


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="the CPU check is x86-64's; finding an extension this CPU lacks reads /proc/cpuinfo")
@pytest.mark.parametrize("compiler", ["g++", "clang++"])  # they name CPU features differently: CPUID does not
def test_a_library_compiled_for_instructions_this_cpu_lacks_is_refused_naming_them(tmp_path, compiler):
    found = shutil.which(compiler) or next(iter(sorted(glob.glob(f"/usr/bin/{compiler}-[0-9]*"))), None)
    if found is None:
        pytest.skip(f"{compiler} is not installed")
    lacking = _an_extension_this_cpu_lacks()
    if lacking is None:
        pytest.skip(f"this CPU has every extension of {', '.join(_EXTENSIONS)}")
    built = tmp_path / "libcheck.so"
    # _FORTIFY_SOURCE as Ubuntu's gcc sets it: glibc's string functions become always-inline wrappers
    # that gcc would not inline into the check's baseline code, and the build failed
    compile_ = subprocess.run([found, "-std=c++17", "-O2", "-D_FORTIFY_SOURCE=2", "-shared", "-fPIC", f"-m{lacking}",
                               f"-I{ROOT / 'plugins' / 'include'}", str(ROOT / "plugins" / "src" / "cpu_features.cpp"),
                               "-o", str(built)], capture_output=True, text=True)
    assert compile_.returncode == 0, compile_.stderr
    library = ctypes.CDLL(str(built))
    library.dynseg_cpu_missing.restype = ctypes.c_char_p
    assert lacking in library.dynseg_cpu_missing().decode().split()
    with pytest.raises(NativeError, match=f"was compiled for a CPU with .*{lacking}.*which this CPU lacks.*"
                                                  "DYNSEG_NATIVE_ARCH=OFF"):
        _native._refuse_a_foreign_cpu(library, built)
