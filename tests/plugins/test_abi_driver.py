"""The C ABI from C++ alone: tests/plugins/abi_driver.cpp, built against the installed library and run.
scripts/cpu_sanitizers.sh runs the same program under AddressSanitizer with leak detection; this test
keeps it compiling and its expectations true."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dynseg.plugins import library_path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="building the C++ driver needs g++ on the PATH")
def test_every_cpu_entry_point_from_cpp_succeeds_or_refuses_as_documented(tmp_path):
    library = library_path()
    driver = tmp_path / "abi_driver"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", f"-I{ROOT / 'plugins' / 'include'}",
                    str(HERE / "abi_driver.cpp"), "-o", str(driver), str(library), f"-Wl,-rpath,{library.parent}",
                    "-pthread"], check=True)
    run = subprocess.run([str(driver)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1].endswith("checks, 0 failed"), run.stdout
