"""The `dynseg` command line, driven in-process through typer's CliRunner."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import dynseg.sdk
from dynseg.sdk import _native, dense_crf, samples
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
    if _native.cuda_compiled():  # which GPUs it runs on: a Jetson needs 87-real, say
        assert re.search(r"CPU and CUDA kernels: CUDA \d+\.\d+ runtime, architectures \d+", result.output)
    else:
        assert "CPU kernels only, built without CUDA" in result.output


def test_version_still_prints_where_the_native_library_is_missing(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(_native, "_lib", None)  # loaded afresh, from the variable
    monkeypatch.setenv("DYNSEG_LIBRARY", str(tmp_path / "nowhere.so"))
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert f"dynseg {dynseg.sdk.__version__} (native library unavailable (" in result.output
    assert "nowhere.so" in result.output


def test_help_lists_the_demo_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output


def test_demo_writes_a_side_by_side_png_and_reports_a_timing(tmp_path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["demo", "--out", str(out), "--iterations", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    photo = samples.load("coffee")
    height, width = photo.shape[:2]
    with Image.open(out / "before_after.png") as picture:
        assert picture.format == "PNG"
        assert picture.size == (3 * width, height)
        panels = np.split(np.array(picture), 3, axis=1)
    # the photo, the poor labelling's argmax, and the CRF's: each panel what it says
    from dynseg.sdk import demo

    unary = demo._poor_unary(photo)
    np.testing.assert_array_equal(panels[0], photo)
    np.testing.assert_array_equal(panels[1], demo._PALETTE[unary.argmax(0)])
    np.testing.assert_array_equal(panels[2], demo._PALETTE[dense_crf(unary, photo, iterations=2).argmax(0)])
    assert (panels[1] != panels[2]).any()  # the CRF changed something
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


@pytest.mark.parametrize("option, value", [("--iterations", "-1"), ("--iterations", str(2**31)),
                                           ("--threads", "0"), ("--threads", str(2**31))])
def test_demo_rejects_counts_out_of_range_with_a_message_naming_the_option(tmp_path, option, value) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), option, value])
    assert result.exit_code != 0
    message = plain(result.output)
    assert f"Invalid value for '{option}'" in message, message  # the range wording varies across typer versions
    assert not (tmp_path / "before_after.png").exists()


def test_demo_reports_an_unreadable_image_in_one_line(tmp_path) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--image", str(not_an_image)])
    assert result.exit_code == 1
    assert "could not be read as an image" in result.output


@pytest.mark.parametrize("words, named", [
    (["demo", "--out", ""], "'--out'"),
    (["train", "--out", ""], "'--out'"),
    (["train", "--out", "run", "--dataset", "voc", "--split", ""], "'--split'"),
    (["eval", "", "--images", "1"], "'model'"),
    (["export", "", "--out", "model.onnx"], "'checkpoint'"),
    (["infer", "model.onnx", "x.png", "", "--detections", "d.json", "--out", "out"], "'images'"),
    (["validate", "", "--checkpoint", "."], "'model'"),
    (["bench", "model.onnx", "--json="], "'--json'"),
    (["quickstart", "--out", ""], "'--out'"),
])
def test_an_empty_value_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, words, named) -> None:
    # pathlib reads "" as "."; an unset $OUT would have `dynseg train` replace the run in the current folder
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, words)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {named}: is empty (an unset shell variable?)" in plain(result.output)
    assert not any(tmp_path.iterdir())


def test_every_command_refuses_empty_values() -> None:
    from dynseg.sdk.cli import _Command

    assert all(command.cls is _Command for command in app.registered_commands)


@pytest.mark.parametrize("below", ["", "/out"])
def test_an_out_folder_whose_name_is_too_long_is_named_in_one_line(tmp_path, below) -> None:
    # ENAMETOOLONG met while looking for links that lead nowhere once raised from the error handler itself
    folder = f"{tmp_path / ('x' * 300)}{below}"
    result = runner.invoke(app, ["demo", "--out", folder, "--iterations", "1"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert plain(result.output) == f"Error: --out {folder}: File name too long"


def test_an_out_folder_the_system_refuses_is_reported_in_one_line(tmp_path) -> None:
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    result = runner.invoke(app, ["demo", "--out", str(in_the_way / "out"), "--iterations", "1"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().startswith(f"Error: --out {in_the_way / 'out'}: "), result.output
    assert f"{in_the_way} is a file, not a folder" in result.output


def test_an_infer_out_folder_under_a_file_is_named_before_the_model_loads(tmp_path) -> None:
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    image, detections = tmp_path / "x.png", tmp_path / "d.json"
    image.write_bytes(b"")
    detections.write_text("[]")
    result = runner.invoke(app, ["infer", str(tmp_path / "no_model.onnx"), str(image), "--detections", str(detections),
                                 "--out", str(in_the_way / "out")])
    assert result.exit_code == 1
    assert f"--out {in_the_way / 'out'}: {in_the_way} is a file, not a folder" in result.output, result.output


def test_a_folder_that_holds_an_export_but_no_checkpoint_names_the_export_not_torch(tmp_path) -> None:
    # a quickstart's --out given in place of its model.onnx: checked before torch would be imported
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "model.onnx").write_bytes(b"")
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "x.png").write_bytes(b"")
    result = runner.invoke(app, ["infer", str(tmp_path / "qs"), str(tmp_path / "x.png"), "--detections",
                                 str(tmp_path / "d.json"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert plain(result.output).strip() == (f"Error: {tmp_path / 'qs'} is not a dynseg checkpoint: model.json is "
                                            f"missing (for the exported model give {tmp_path / 'qs' / 'model.onnx'})")


@pytest.mark.parametrize("sizes", ["7x8", "8x7", "4097x8", "8x4097", "64x64,8x4097", "8x0"])
def test_bench_refuses_a_side_outside_8_to_4096_naming_sizes(tmp_path, sizes) -> None:
    result = runner.invoke(app, ["bench", str(tmp_path / "model.onnx"), "--sizes", sizes])
    assert result.exit_code == 2, result.output
    message = plain(result.output)
    assert "--sizes" in message and f"'{sizes.split(',')[-1]}'" in message, message


def test_bench_takes_sides_of_8_and_4096_and_goes_on_to_the_model(tmp_path) -> None:
    result = runner.invoke(app, ["bench", str(tmp_path / "model.onnx"), "--sizes", "8x4096,4096x8,8x8"])
    assert result.exit_code == 1, result.output  # past the sizes: the model is what is missing
    assert "model.onnx does not exist" in plain(result.output) and "--sizes" not in result.output, result.output


@pytest.mark.parametrize("height, width", [(48, 31), (31, 48), (48, 4097), (4097, 48)])
def test_train_refuses_a_synthetic_side_outside_32_to_4096_naming_image_size(tmp_path, height, width) -> None:
    pytest.importorskip("torch")
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--image-size", str(height), str(width)])
    assert result.exit_code == 2, result.output
    message = plain(result.output)
    assert "--image-size" in message and f"{height} {width}: each side must be in 32..4096" in message, message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("height, width", [(32, 4096), (4096, 32)])
def test_train_takes_synthetic_sides_of_32_and_4096(tmp_path, height, width) -> None:
    pytest.importorskip("torch")
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--images", "1", "--image-size", str(height),
                                 str(width), "--semantic-steps", "0", "--instance-steps", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "training_data.json").read_text())["image_size"] == [height, width]


@pytest.mark.parametrize("option, size", [("--max-size", "1024x0"), ("--max-size", "0x1024"), ("--min-size", "32x0"),
                                          ("--opt-size", "0x640")])
def test_an_engine_size_without_pixels_is_refused_naming_its_option(tmp_path, option, size) -> None:
    result = runner.invoke(app, ["export", str(tmp_path), "--format", "engine", "--out", str(tmp_path / "m.engine"),
                                 option, size])
    assert result.exit_code == 2, result.output
    message = plain(result.output)
    assert option in message and f"'{size}' is not HEIGHTxWIDTH (e.g. 512x512, each at least 1)" in message, message


@pytest.mark.parametrize("refusal", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] . "
                                                                  "DefaultCPUAllocator: can't allocate memory")],
                         ids=["python", "torch's cpu allocator"])
def test_running_out_of_memory_is_one_line_and_another_runtime_error_is_not_hidden(tmp_path, monkeypatch,
                                                                                   refusal) -> None:
    from dynseg.sdk import demo

    def refuse(*args, **kwargs):  # what an allocation refused deep inside a command raises
        raise refusal

    monkeypatch.setattr(demo, "run", refuse)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "out of memory (" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output

    def fail(*args, **kwargs):
        raise RuntimeError("a defect")

    monkeypatch.setattr(demo, "run", fail)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a defect"


def test_a_symbolic_link_loop_as_the_output_folder_is_one_line(tmp_path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "loop")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{tmp_path / 'loop'} is a symbolic link that leads nowhere" in plain(result.output), result.output


def test_the_time_left_follows_the_pace_of_about_the_last_minute(monkeypatch) -> None:
    # a machine that slows down (another job starts) must show in the time left, not hide in the mean
    import types

    from dynseg.sdk.commands import progress

    now = [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    clock = progress.ProgressClock(1000)
    for step in range(1, 101):  # 1 s a step for 100 s
        now[0] += 1.0
        speed, left = clock.rates(step)
    assert speed == pytest.approx(1.0) and left == pytest.approx(900.0)
    for step in range(101, 111):  # then 10 s a step
        now[0] += 10.0
        speed, left = clock.rates(step)
    assert speed == pytest.approx(0.1) and left == pytest.approx(890 * 10.0)
    assert clock.throughput(110) == pytest.approx(110 / 200)  # since the start, for the logs


def test_the_live_bar_shows_a_file_name_with_brackets_as_it_is() -> None:
    import io

    from rich.console import Console

    from dynseg.sdk.commands.progress import LiveItemProgress

    for name in ("cat [copy].png", "[red]b.png"):  # rich markup would take "[copy]" for a style and drop it
        out = io.StringIO()
        bar = LiveItemProgress("infer", 1, console=Console(file=out, force_terminal=True, width=120))
        bar.update(1, name)
        bar.close()  # draws the last state
        assert name in out.getvalue()
