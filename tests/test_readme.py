"""README.md and docs/sdk.md stay true: their runnable examples run, and CI runs exactly the README's test
command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SDK_GUIDE = ROOT / "docs" / "sdk.md"
MARKER = "<!-- readme-test: run -->"


def runnable_blocks(document: Path = README) -> list[str]:
    """The python code blocks of `document` directly preceded by MARKER, in order."""
    pattern = re.compile(re.escape(MARKER) + r"\s*\n```python\n(.*?)\n```", re.DOTALL)
    return pattern.findall(document.read_text(encoding="utf-8"))


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_readme_has_runnable_examples() -> None:
    assert len(runnable_blocks()) >= 2


@pytest.mark.parametrize("document, index", [(d, i) for d in (README, SDK_GUIDE) for i in range(len(runnable_blocks(d)))],
                         ids=lambda value: value.name if isinstance(value, Path) else str(value))
def test_documented_example_runs(document: Path, index: int, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # what an example writes in "the current folder" goes with the test
    code = runnable_blocks(document)[index]
    name = f"{document.name} example {index + 1}"
    exec(compile(code, name, "exec"), {"__name__": name.replace(" ", "_").replace(".", "_")})


def test_the_sdk_guide_has_a_runnable_example() -> None:
    assert len(runnable_blocks(SDK_GUIDE)) >= 1


def test_readme_opens_with_one_line_install_and_quickstart_and_install_and_test_commands() -> None:
    blocks = bash_blocks()
    assert len(blocks) == 2, blocks
    assert all("\n" not in block for block in blocks)
    assert "dynseg quickstart --out" in blocks[0]
    assert "pytest" in blocks[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = bash_blocks()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert test_command in ci_lines
