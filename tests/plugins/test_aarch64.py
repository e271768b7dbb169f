"""The kernel library on 64-bit ARM (Jetson, DRIVE, Grace), from this x86-64 machine: cross-built with
aarch64-linux-gnu-g++, then run under qemu-aarch64, where it must pass the C ABI driver and compute the
same bits as the library installed here (same_bits_cases.py, through the numpy API of an ARM Python).
The TensorRT plugin is cross-compiled too, against each folder of TensorRT headers found (conftest.py).

Needs the cross compiler, qemu-user and an ARM Python with numpy (and onnxruntime, for the Segmenter's
case): `bash scripts/aarch64_sysroot.sh .aarch64` installs and unpacks them (CI runs it),
DYNSEG_AARCH64_SYSROOT names another folder."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SYSROOT = Path(os.environ.get("DYNSEG_AARCH64_SYSROOT", ROOT / ".aarch64"))
COMPILER = "aarch64-linux-gnu-g++"
PYTHON = SYSROOT / "root" / "usr" / "bin" / "python3.11"

pytestmark = [
    pytest.mark.skipif(shutil.which(COMPILER) is None or shutil.which("qemu-aarch64") is None,
                       reason=f"needs {COMPILER} and qemu-aarch64 (bash scripts/aarch64_sysroot.sh .aarch64 "
                              "installs them; CI runs it)"),
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on the PATH"),
    # qemu runs a dynamically linked ARM program only with the sysroot's loader and C library
    pytest.mark.skipif(not (SYSROOT / "root" / "lib" / "ld-linux-aarch64.so.1").exists(),
                       reason=f"no ARM sysroot in {SYSROOT} (bash scripts/aarch64_sysroot.sh {SYSROOT} unpacks one; "
                              "CI runs it)"),
]


def under_qemu(*command: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-aarch64", "-L", str(SYSROOT / "root"), *map(str, command)], capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def arm_library(tmp_path_factory) -> Path:
    """libdynseg_crf.so for aarch64, as a Jetson's `pip install .` would build it, for any ARMv8-A CPU."""
    build = tmp_path_factory.mktemp("aarch64-build")
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
         f"-DCMAKE_CXX_COMPILER={COMPILER}", "-DDYNSEG_CUDA=OFF", "-DDYNSEG_NATIVE_ARCH=OFF"],
        capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    compile_ = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert compile_.returncode == 0, compile_.stdout[-3000:] + compile_.stderr[-3000:]
    assert "warning" not in compile_.stdout + compile_.stderr, compile_.stdout + compile_.stderr
    library = next(build.rglob("libdynseg_crf.so"))
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # e_machine: EM_AARCH64
    return library


def test_the_arm_library_exports_its_c_abi_and_nothing_else(arm_library):
    nm = shutil.which("aarch64-linux-gnu-nm")
    if nm is None:
        pytest.skip("aarch64-linux-gnu-nm (binutils-aarch64-linux-gnu, beside the cross compiler) is missing")
    listing = subprocess.run([nm, "-D", "--defined-only", str(arm_library)], capture_output=True, text=True,
                             check=True)
    names = {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}
    assert "dynseg_crf_forward" in names
    assert {name for name in names if not name.startswith("dynseg_")} == set()


def test_every_cpu_entry_point_succeeds_or_refuses_as_documented_on_arm(arm_library, tmp_path):
    driver = tmp_path / "abi_driver"
    subprocess.run([COMPILER, "-std=c++17", "-O1", "-Wall", "-Wextra", f"-I{ROOT / 'plugins' / 'include'}",
                    str(HERE / "abi_driver.cpp"), "-o", str(driver), str(arm_library),
                    f"-Wl,-rpath,{arm_library.parent}", "-pthread"], check=True)
    run = under_qemu(driver)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1].endswith("checks, 0 failed"), run.stdout


def _cuda_include() -> Path | None:
    """The CUDA toolkit's headers, where nvcc says its toolkit lies (it may be a wrapper script)."""
    if shutil.which("nvcc") is None:
        return None
    verbose = subprocess.run(["nvcc", "-v", "-x", "cu", "-E", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    top = next((line.split("=", 1)[1] for line in verbose.splitlines() if line.startswith("#$ TOP=")), None)
    return Path(top).resolve() / "include" if top else None


def test_the_tensorrt_plugin_compiles_for_arm_without_warnings(tensorrt_headers, tmp_path):
    # Jetson's JetPack 6 carries TensorRT 10.3: the plugin is C++ and reaches the kernels through the C ABI
    cuda_include = _cuda_include()  # asked here, not at collection: it runs nvcc
    if cuda_include is None:
        pytest.skip("the plugin includes cuda_runtime_api.h: needs the CUDA toolkit (nvcc on the PATH)")
    tensorrt = ROOT / "plugins" / "tensorrt"
    build = subprocess.run(
        [COMPILER, "-std=c++17", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'plugins' / 'include'}",
         f"-I{tensorrt}", "-isystem", str(tensorrt_headers), "-isystem", str(cuda_include), "-c",
         str(tensorrt / "mean_field_crf_plugin.cpp"), "-o", str(tmp_path / "plugin.o")],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]


needs_arm_python = pytest.mark.skipif(
    not PYTHON.is_file(), reason=f"no ARM Python at {PYTHON} (bash scripts/aarch64_sysroot.sh {SYSROOT} unpacks one; "
                                 "CI runs it)")


def run_both(script: Path, arguments: list[Path], suffix: str, arm_library: Path, tmp_path: Path) -> tuple[Path, Path]:
    """`script` run with `arguments` and an output file (tmp_path/arm`suffix`) by the ARM Python under qemu
    with the ARM library, then (tmp_path/here`suffix`) by this machine's Python with the installed
    library; the two output files."""
    # The ARM Python imports dynseg.sdk from this checkout; DYNSEG_LIBRARY points it at the ARM library.
    package = tmp_path / "package" / "dynseg"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("sdk", "plugins"):
        if not (package / name).exists():
            (package / name).symlink_to(ROOT / name, target_is_directory=True)
    env = {"PATH": os.environ.get("PATH", ""), "DYNSEG_LIBRARY": str(arm_library),
           "PYTHONPATH": f"{SYSROOT / 'site'}:{package.parent}"}
    outputs = tmp_path / f"arm{suffix}", tmp_path / f"here{suffix}"
    arm = under_qemu(PYTHON, script, *arguments, outputs[0], env=env)
    assert arm.returncode == 0, arm.stdout + arm.stderr
    here = subprocess.run([sys.executable, str(script), *map(str, arguments), str(outputs[1])],
                          capture_output=True, text=True, timeout=600)
    assert here.returncode == 0, here.stdout + here.stderr
    return outputs


@needs_arm_python
def test_arm_computes_the_same_bits_as_this_machine(arm_library, tmp_path):
    arm, here = run_both(HERE / "same_bits_cases.py", [], ".npz", arm_library, tmp_path)

    with np.load(arm) as arm_results, np.load(here) as results:
        assert sorted(arm_results.files) == sorted(results.files) and len(results.files) >= 20
        for name in results.files:
            assert np.isfinite(results[name]).all(), name
            assert results[name].tobytes() == arm_results[name].tobytes(), (
                f"{name}: max |difference| {np.abs(results[name] - arm_results[name]).max()}")


@needs_arm_python
@pytest.mark.skipif(not (SYSROOT / "site" / "onnxruntime").is_dir(),
                    reason=f"no onnxruntime for the ARM Python in {SYSROOT / 'site'} (scripts/aarch64_sysroot.sh)")
def test_an_exported_model_segments_on_arm_as_on_this_machine(arm_library, learned_looking_network, tmp_path):
    # The whole deployment path on ARM: onnxruntime's aarch64 build for the network, the ARM kernel
    # library for the CRF nodes, the SDK around them. onnxruntime's kernels differ by instruction set,
    # so the two are held to `dynseg validate`'s checks rather than to the bit.
    pytest.importorskip("torch", reason="exporting the model needs torch")
    from dynseg.export.onnx import export_onnx
    from dynseg.sdk import samples
    from dynseg.sdk.commands.parity import ParityReport, compare

    model = export_onnx(learned_looking_network(seed=3), tmp_path / "model.onnx")
    np.save(tmp_path / "coffee.npy", samples.load("coffee"))
    arm, here = run_both(HERE / "segment_case.py", [model, tmp_path / "coffee.npy"], ".pickle", arm_library, tmp_path)
    arm_runs, runs = (pickle.loads(path.read_bytes()) for path in (arm, here))
    assert list(arm_runs) == list(runs) and len(runs) == 2
    report = ParityReport([compare(name, arm_runs[name][1], runs[name][1], arm_runs[name][0], runs[name][0])
                           for name in runs])
    assert report and report.exercised_instances(), report.table()
    for name in runs:
        assert [(i.detection, i.class_id) for i in arm_runs[name][0].instances] == \
               [(i.detection, i.class_id) for i in runs[name][0].instances], name
