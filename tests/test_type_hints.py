"""The type hints dynseg ships (each package has a py.typed marker) hold under mypy, as a user's type
checker reads them: the public signatures are part of the API, so a wrong hint is a bug.

mypy runs on the installed layout (dynseg.sdk, dynseg.export, dynseg.trainer, dynseg.plugins), which
the source tree maps from sdk/, export/, trainer/ and plugins/ (pyproject.toml's wheel.packages): a
temporary folder links the four under dynseg/. Settings: pyproject.toml's [tool.mypy].
"""

from __future__ import annotations

from pathlib import Path

from mypy import api as mypy

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdk", "export", "trainer", "plugins")


def test_mypy_finds_no_type_errors_in_the_shipped_packages(tmp_path: Path, monkeypatch) -> None:
    layout = tmp_path / "dynseg"
    layout.mkdir()
    for package in PACKAGES:
        (layout / package).symlink_to(ROOT / package, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    arguments = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache")]
    for package in PACKAGES:
        arguments += ["-p", f"dynseg.{package}"]
    report, errors, status = mypy.run(arguments)
    assert status == 0, f"mypy found type errors:\n{report}{errors}"
