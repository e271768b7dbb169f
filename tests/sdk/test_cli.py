"""The `dynseg` command line, driven in-process through typer's CliRunner."""

from __future__ import annotations

import re

from PIL import Image
from typer.testing import CliRunner

import dynseg.sdk
from dynseg.sdk import _native, samples
from dynseg.sdk.cli import app

runner = CliRunner()


def plain(text: str) -> str:
    """Output with rich's box drawing and line wrapping removed, for matching messages."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def test_version_prints_the_package_and_native_library_versions() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert dynseg.sdk.__version__ in result.output
    assert f"native library {_native.native_version()}, " in result.output
    kernels = "CPU and CUDA kernels" if _native.cuda_compiled() else "CPU kernels only, built without CUDA"
    assert kernels in result.output


def test_help_lists_the_demo_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output


def test_demo_writes_a_side_by_side_png_and_reports_a_timing(tmp_path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["demo", "--out", str(out), "--iterations", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    height, width = samples.load("coffee").shape[:2]
    with Image.open(out / "before_after.png") as picture:
        assert picture.format == "PNG"
        assert picture.size == (3 * width, height)
    assert re.search(r"best of \d+ = \d+\.\d ms on 1 thread", result.output), result.output
    assert f"{width}x{height}" in result.output


def test_demo_reports_the_thread_count_the_kernels_used_not_the_one_asked_for(tmp_path) -> None:
    cores = _native.max_threads()
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--iterations", "1", "--threads", str(cores + 5)])
    assert result.exit_code == 0, result.output
    assert re.search(rf"ms on {cores} thread", result.output), result.output


def test_demo_accepts_an_image_path(tmp_path) -> None:
    photo = tmp_path / "small.jpg"
    Image.fromarray(samples.load("astronaut")[:40, :56]).save(photo)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--image", str(photo), "--iterations", "1"])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "before_after.png") as picture:
        assert picture.size == (3 * 56, 40)


def test_demo_rejects_negative_iterations_with_a_message_naming_the_option(tmp_path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--iterations", "-1"])
    assert result.exit_code != 0
    message = plain(result.output)
    assert "Invalid value for '--iterations'" in message, message  # the range wording varies across typer versions
    assert not (tmp_path / "before_after.png").exists()


def test_demo_reports_an_unreadable_image_in_one_line(tmp_path) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--image", str(not_an_image)])
    assert result.exit_code == 1
    assert "could not be read as an image" in result.output


def test_an_out_folder_the_system_refuses_is_reported_in_one_line(tmp_path) -> None:
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    result = runner.invoke(app, ["demo", "--out", str(in_the_way / "out"), "--iterations", "1"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().startswith("Error: Not a directory"), result.output
    assert str(in_the_way / "out") in result.output
