"""dynseg's CUDA kernels, emulated on the CPU (emulator.py), against its CPU kernels, so that their
logic is checked on every machine, GPU or not. The GPU tests (tests/gpu) keep the last word: the
emulator knows nothing of timing, memory limits or a real GPU's memory model."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("cuda_emulator", HERE / "emulator.py")
emulator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emulator)


@pytest.fixture(scope="module")
def emulated_library(tmp_path_factory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulator needs g++")
    return emulator.build(ROOT, tmp_path_factory.mktemp("emulated") / "libdynseg_crf_emulated.so")


def test_emulated_cuda_kernels_match_the_cpu_kernels(emulated_library):
    result = subprocess.run(
        [sys.executable, str(HERE / "parity.py")], env=dict(os.environ, DYNSEG_LIBRARY=str(emulated_library)),
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0 and "all match" in result.stdout, result.stdout + result.stderr[-3000:]


def test_the_cuda_entry_points_succeed_and_refuse_as_documented_when_called_from_cpp(emulated_library, tmp_path):
    driver = tmp_path / "abi_driver"
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{ROOT / 'plugins' / 'include'}",
                    str(ROOT / "tests" / "plugins" / "abi_driver.cpp"), "-o", str(driver), str(emulated_library),
                    "-pthread"], check=True)
    run = subprocess.run([str(driver)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-2] == "the CUDA entry points were called too" and lines[-1].endswith("checks, 0 failed"), run.stdout


def test_every_kernel_launch_form_is_rewritten():
    source = (
        "a<<<blocks, kThreads>>>(x, y);\n"
        "embed<5><<<launch.blocks(n), kThreads, 0, stream>>>(c, f(p, q),\n    r);\n"
        "step<<<std::min(t, cap), kThreads, shared, launch.stream>>>(s);\n"
    )
    rewritten = emulator.emulated_source(source)
    assert "<<<" not in rewritten
    assert "emu::launch([&] { embed<5>(c, f(p, q),\n    r); }, launch.blocks(n), kThreads, 0, stream);" in rewritten
    with pytest.raises(ValueError, match="cannot rewrite"):
        emulator.emulated_source("kernel<<<1, 1>>>(x)")  # no semicolon: not a launch statement it knows


def _dense_crf_cuda_under(emulated_library: Path, gpu: str) -> subprocess.CompletedProcess:
    """dense_crf(device="cuda") on the emulated library, in a process whose emulated GPU fails as `gpu` says."""
    call = ("import numpy as np\nfrom dynseg.sdk import dense_crf\n"
            "dense_crf(np.zeros((2, 8, 8), np.float32), None, bilateral=None, device='cuda')\n")
    return subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, DYNSEG_LIBRARY=str(emulated_library), DYNSEG_EMULATED_GPU=gpu))


def test_a_gpu_the_build_has_no_kernels_for_is_named_with_the_architectures_built(emulated_library):
    run = _dense_crf_cuda_under(emulated_library, "without-kernels")
    assert run.returncode != 0
    assert ("NativeError: dynseg native library failed (NOT_SUPPORTED): CUDA device 0 (compute capability 9.0) "
            "cannot run this library's CUDA kernels, which were built for no GPU (the CPU emulation) "
            "(cudaErrorNoKernelImageForDevice): reinstall dynseg with its architecture, e.g. pip install . -C "
            "cmake.define.DYNSEG_CUDA_ARCHITECTURES=90-real") in run.stderr, run.stderr


def test_a_runtime_that_cannot_count_the_gpus_says_what_it_reported(emulated_library):
    run = _dense_crf_cuda_under(emulated_library, "without-driver")
    assert run.returncode != 0
    assert ("InvalidArgumentError: device='cuda:0' but the native library sees 0 CUDA device(s) (no GPU or no NVIDIA "
            "driver on this machine; cudaGetDeviceCount failed: cudaErrorInsufficientDriver (emulated error); the "
            "library carries the CUDA 13.0 runtime, which needs an NVIDIA driver at least as new)") in run.stderr, \
        run.stderr
