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
