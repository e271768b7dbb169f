"""The wheel a team builds once and installs across a fleet (docs/deploy.md, "A wheel for a fleet").

Built as that page says (`pip wheel . -C cmake.define.DYNSEG_NATIVE_ARCH=OFF`, here also without the
CUDA kernels, whose build the development install already checks, to keep this under a minute), it
is installed with no index and no compiler into a fresh virtual environment outside the source tree.
Its third-party dependencies come from this interpreter's site-packages (a .pth file names them; the
editable install's import hook there is not run), so everything dynseg imports there is the wheel's.
"""

from __future__ import annotations

import json
import pickle
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path
from zipfile import ZipFile

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("scikit_build_core", reason="building the wheel without an index needs scikit-build-core "
                                                    "(the dev extra installs it)")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-q", str(ROOT), "-w", str(out),
                    "-C", "cmake.define.DYNSEG_CUDA=OFF", "-C", "cmake.define.DYNSEG_NATIVE_ARCH=OFF",
                    "-C", f"build-dir={out / 'build'}"], check=True)  # the source tree's build/ is the dev install's
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def fleet(wheel, tmp_path_factory) -> Path:
    """The fresh virtual environment's folder, the wheel installed in it."""
    venv = tmp_path_factory.mktemp("fleet") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check", "-q",
                    str(wheel)], check=True)
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    dependencies = [*site.getsitepackages(), sysconfig.get_path("purelib")]
    (purelib / "dependencies_of_the_test.pth").write_text("\n".join(dict.fromkeys(dependencies)) + "\n")
    return venv


def run_in(venv: Path, *arguments: str | Path, cwd: Path) -> str:
    """stdout of `arguments` run with the venv's bin/ first on the PATH, in `cwd` (outside the source tree)."""
    run = subprocess.run([str(a) for a in arguments], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)})
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_the_wheel_serves_any_cpython_and_carries_the_library_and_its_header(wheel):
    # the native library is reached through ctypes, so no wheel per Python version is needed
    assert wheel.name.startswith("dynseg-") and "-py3-none-linux_" in wheel.name, wheel.name
    names = set(ZipFile(wheel).namelist())
    assert {"dynseg/plugins/libdynseg_crf.so", "dynseg/plugins/include/dynseg_crf.h",
            "dynseg/sdk/samples/coffee.png", "dynseg/plugins/tensorrt/mean_field_crf_plugin.cpp"} <= names


def test_the_installed_wheel_imports_its_own_files_and_runs_the_cli(fleet, tmp_path):
    where = json.loads(run_in(fleet, "python", "-c", "import json, dynseg.sdk, dynseg.export; "
                                                     "from dynseg.sdk import _native; "
                                                     "print(json.dumps([dynseg.sdk.__file__, dynseg.export.__file__, "
                                                     "str(_native.library_path())]))", cwd=tmp_path))
    assert all(Path(path).is_relative_to(fleet) for path in where), where
    from dynseg.sdk import __version__
    assert run_in(fleet, "dynseg", "--version", cwd=tmp_path).strip() == \
        f"dynseg {__version__} (native library {__version__}, CPU kernels only, built without CUDA)"
    run_in(fleet, "dynseg", "demo", "--out", tmp_path / "demo", "--threads", "1", cwd=tmp_path)
    assert (tmp_path / "demo" / "before_after.png").stat().st_size > 0


def test_the_installed_wheel_segments_as_the_development_install_does(fleet, learned_looking_network, tmp_path):
    # the same onnxruntime, and kernels built for any x86-64 CPU against this machine's: the kernels'
    # arithmetic does not depend on the vector width, so the results must be the same bits
    pytest.importorskip("torch", reason="exporting the model needs torch")
    from dynseg.export.onnx import export_onnx
    from dynseg.sdk import samples

    model = export_onnx(learned_looking_network(seed=3), tmp_path / "model.onnx")
    np.save(tmp_path / "coffee.npy", samples.load("coffee"))
    case = ROOT / "tests" / "plugins" / "segment_case.py"
    run_in(fleet, "python", case, model, tmp_path / "coffee.npy", tmp_path / "fleet.pickle", cwd=tmp_path)
    subprocess.run([sys.executable, case, model, tmp_path / "coffee.npy", tmp_path / "here.pickle"], check=True)
    fleet_runs, runs = (pickle.loads((tmp_path / name).read_bytes()) for name in ("fleet.pickle", "here.pickle"))
    assert list(fleet_runs) == list(runs) and len(runs) == 2
    for name, (result, outputs) in runs.items():
        fleet_result, fleet_outputs = fleet_runs[name]
        assert sorted(fleet_outputs) == sorted(outputs)
        for output in outputs:
            assert np.array_equal(fleet_outputs[output], outputs[output]), (name, output)
        assert np.array_equal(fleet_result.instance_map, result.instance_map)
        assert len(result.instances) >= 1, name


def test_a_c_program_builds_and_runs_against_the_installed_header_and_library(fleet, tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler")
    plugins = next(fleet.glob("lib/python3*/site-packages/dynseg/plugins"))
    (tmp_path / "embed.c").write_text(
        '#include <stdio.h>\n#include "dynseg_crf.h"\n'
        'int main(void) {\n'
        '    if (dynseg_abi_version() != DYNSEG_ABI_VERSION) return 1;\n'
        '    printf("%s %d %d\\n", dynseg_version(), dynseg_abi_version(), dynseg_cuda_compiled());\n'
        '    return 0;\n}\n')
    subprocess.run([compiler, "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", plugins / "include",
                    tmp_path / "embed.c", "-o", tmp_path / "embed", "-L", plugins, "-ldynseg_crf",
                    f"-Wl,-rpath,{plugins}"], check=True)
    from dynseg.sdk import __version__, _native
    assert run_in(fleet, tmp_path / "embed", cwd=tmp_path).split() == [__version__, str(_native.ABI_VERSION), "0"]
