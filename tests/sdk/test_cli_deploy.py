"""The deployment commands end to end on a tiny network: dynseg export -> infer -> validate -> bench,
quickstart with a few steps, and bad arguments answered with one line naming the option."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dynseg.sdk import InvalidArgumentError, Segmenter, samples
from dynseg.sdk.cli import app
from dynseg.sdk.commands.parity import compare
from dynseg.sdk.inputs import check_detections, load_image
from dynseg.sdk.results import build_result
from dynseg.trainer.model.instance import InstanceConfig
from dynseg.trainer.model.network import ModelConfig, build_model
from dynseg.trainer.checkpoint import save_checkpoint

runner = CliRunner()


def plain(text: str) -> str:
    """Output with rich's box drawing and line wrapping removed, for matching messages."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def _checkpoint(directory, seed: int):
    torch.manual_seed(seed)
    config = ModelConfig(backbone="resnet18", class_names=("cat", "cup", "person"),
                         instance=InstanceConfig(templates_per_group=4, template_size=16))
    model = build_model(config)
    with torch.no_grad():  # distinct templates, as trained ones are: identical ones make exact ties
        model.instance_unaries.templates.uniform_(0.0, 1.0)
    return save_checkpoint(directory, model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint dir, model.onnx written by `dynseg export`) of a fresh 3-class resnet18 network."""
    directory = tmp_path_factory.mktemp("deploy")
    checkpoint = _checkpoint(directory / "checkpoint", seed=0)
    result = runner.invoke(app, ["export", str(checkpoint), "--format", "onnx", "--out", str(directory / "model.onnx"),
                                 "--max-detections", "20"])
    assert result.exit_code == 0, result.output
    assert "next: dynseg validate" in result.output
    return checkpoint, directory / "model.onnx"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three small photo crops named 'chelsea.png', '000042.jpg' and 'empty.png', and a detections file
    naming the first by its stem, the second by its number, and the third not at all."""
    directory = tmp_path_factory.mktemp("photos")
    files = [directory / "chelsea.png", directory / "000042.png", directory / "empty.png"]
    for path, name in zip(files, ("chelsea", "coffee", "astronaut")):
        Image.fromarray(samples.load(name)[:72, :96]).save(path)
    detections = [
        {"image_id": "chelsea", "category_id": 1, "bbox": [10, 8, 50, 40], "score": 0.9},
        {"image_id": "chelsea", "category_id": 2, "bbox": [40, 20, 50, 45], "score": 0.7},
        {"image_id": 42, "category_id": 3, "bbox": [5, 5, 60, 60], "score": 0.8},
        {"image_id": 42, "category_id": 3, "bbox": [90, 60, 30, 30], "score": 0.5},  # reaches outside: clipped
        {"image_id": "elsewhere", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},  # no such image
    ]
    (directory / "dets.json").write_text(json.dumps(detections))
    return files, directory / "dets.json"


def test_infer_and_bench_run_where_torch_is_not_installed(exported, photos, tmp_path):
    """A deployment machine runs the exported model without torch: infer and bench must not import it
    (infer once did, through the trainer's COCO results reader)."""
    import subprocess
    import sys

    files, detections = photos
    blocked = ("import sys; sys.modules['torch'] = None; from dynseg.sdk.cli import app; "
               "app(sys.argv[1:], prog_name='dynseg')")
    for arguments in (["infer", str(exported[1]), *map(str, files), "--detections", str(detections),
                       "--out", str(tmp_path / "out")],
                      ["bench", str(exported[1]), "--sizes", "32x40", "--detections", "1", "--repeats", "1"]):
        run = subprocess.run([sys.executable, "-c", blocked, *arguments], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "out" / "results.json").is_file()


@pytest.mark.parametrize("module", ["dynseg.trainer.train", "dynseg.export.onnx"])
def test_the_trainer_and_the_exporter_without_torch_say_how_to_install_it(module):
    import subprocess
    import sys

    blocked = f"import sys; sys.modules['torch'] = None; import {module}"
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    package = ".".join(module.split(".")[:2]) if "trainer" in module else module
    assert f"ImportError: {package} needs PyTorch: pip install torch==2.13.0" in run.stderr


def test_infer_writes_overlays_instance_maps_and_coco_results(exported, photos, tmp_path):
    files, detections = photos
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(exported[1]), *map(str, files), "--detections", str(detections),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "[infer] 3/3 empty.png" in result.output  # plain progress lines off a terminal
    entries = json.loads((out / "results.json").read_text())
    # what the API makes of each image's detections, written out by hand: COCO's [x, y, w, h] is the
    # inclusive box [x, y, x + w - 1, y + h - 1]; the file's order is by descending score
    expected_detections = {
        "chelsea": ("chelsea", [[10, 8, 59, 47], [40, 20, 89, 64]], [1, 2], [0.9, 0.7]),
        "000042": (42, [[5, 5, 64, 64], [90, 60, 119, 89]], [3, 3], [0.8, 0.5]),
        "empty": ("empty", np.zeros((0, 4)), [], []),
    }
    segmenter = Segmenter(exported[1])
    for path in files:
        image_id, boxes, labels, scores = expected_detections[path.stem]
        expected = segmenter.segment(load_image(path), boxes, labels, scores)
        with Image.open(out / f"{path.stem}_overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == (96, 72)
            np.testing.assert_array_equal(np.array(overlay), expected.overlay())
        with Image.open(out / f"{path.stem}_instances.png") as ids:
            assert ids.mode == "I;16"  # 16-bit: ids past 255 (tests/sdk/test_files.py: they come back whole)
            instance_map = np.array(ids)
        # ids 1..N are the image's entries in results.json, in order; 0 is background
        np.testing.assert_array_equal(instance_map, expected.instance_map)
        assert [e for e in entries if e["image_id"] == image_id] == json.loads(json.dumps(expected.to_coco(image_id)))
    assert {e["image_id"] for e in entries} == {"chelsea", 42}  # both images with detections have instances
    # a second run into the same folder that fails on its way leaves no results.json for the first's to pass
    broken = tmp_path / "empty.png"
    broken.write_bytes(b"not a PNG")
    result = runner.invoke(app, ["infer", str(exported[1]), str(files[0]), str(broken), "--detections",
                                 str(detections), "--out", str(out)])
    assert result.exit_code == 1 and "empty.png" in result.output, result.output
    assert not (out / "results.json").exists()


def test_infer_refuses_an_output_that_would_overwrite_an_image_to_segment(exported, photos, tmp_path):
    files, _ = photos
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("x.png", "x_overlay.png"):  # x's overlay would be written over the second image
        (folder / name).write_bytes(files[0].read_bytes())
    detections = tmp_path / "d.json"
    detections.write_text(json.dumps([{"image_id": "x", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    result = runner.invoke(app, ["infer", str(exported[1]), str(folder / "x.png"), str(folder / "x_overlay.png"),
                                 "--detections", str(detections), "--out", str(folder)])
    assert result.exit_code == 1
    assert "x_overlay.png would be written for x.png, but it is one of the images" in plain(result.output)
    assert sorted(p.name for p in folder.iterdir()) == ["x.png", "x_overlay.png"]
    assert (folder / "x_overlay.png").read_bytes() == files[0].read_bytes()
    (folder / "x_overlay.png").unlink()
    detections.rename(folder / "results.json")  # the detections, where the results would go
    result = runner.invoke(app, ["infer", str(exported[1]), str(folder / "x.png"), "--detections",
                                 str(folder / "results.json"), "--out", str(folder)])
    assert result.exit_code == 1 and "results.json would be written, but it is the detections file" in \
        plain(result.output)
    assert json.loads((folder / "results.json").read_text())[0]["image_id"] == "x"


def test_infer_refuses_a_detections_file_for_other_images(exported, photos, tmp_path):
    files, _ = photos
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"image_id": "nowhere", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    result = runner.invoke(app, ["infer", str(exported[1]), str(files[0]), "--detections", str(other),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "none of its 1 detections names one of the images" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_infer_refuses_images_over_the_models_limit_before_segmenting_any_unless_told_to_keep_the_top(
        exported, photos, tmp_path):
    files, _ = photos  # the model takes 20 detections per image
    many = tmp_path / "many.json"
    entries = [{"image_id": "chelsea", "category_id": 1, "bbox": [i, i, 10, 10], "score": 0.01 * (i + 1)}
               for i in range(25)]
    many.write_text(json.dumps(entries + [{"image_id": 42, "category_id": 2, "bbox": [0, 0, 9, 9], "score": 0.5}]))
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(exported[1]), str(files[1]), str(files[0]), "--detections", str(many),
                                 "--out", str(out)])
    assert result.exit_code == 1
    assert "1 image has more detections" in plain(result.output) and "chelsea.png (25)" in plain(result.output)
    assert not out.exists() or not list(out.iterdir())  # 000042.png, the first image, was not segmented either
    result = runner.invoke(app, ["infer", str(exported[1]), str(files[1]), str(files[0]), "--detections", str(many),
                                 "--out", str(out), "--keep-top", "20"])
    assert result.exit_code == 0, result.output
    assert (out / "chelsea_instances.png").exists()


def test_keep_top_keeps_the_most_confident_detections_in_their_order():
    from dynseg.sdk.commands.images import ImageDetections
    from dynseg.sdk.commands.infer import most_confident

    dets = ImageDetections("x", np.arange(20, dtype=np.float32).reshape(5, 4), np.arange(1, 6),
                           np.array([0.5, 0.9, 0.1, 0.9, 0.3], np.float32))
    kept = most_confident(dets, 3)  # the first is kept, and stays first though two score higher
    assert kept.scores.tolist() == [np.float32(0.5), np.float32(0.9), np.float32(0.9)]
    assert kept.labels.tolist() == [1, 2, 4] and kept.boxes[:, 0].tolist() == [0, 4, 12]
    assert most_confident(dets, 5) is dets


def test_infer_names_the_image_whose_labels_the_model_does_not_know_before_segmenting_any(exported, photos,
                                                                                           tmp_path):
    files, _ = photos
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": files[0].stem, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
                               {"image_id": files[1].stem, "category_id": 9, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    result = runner.invoke(app, ["infer", str(exported[1]), str(files[0]), str(files[1]), "--detections", str(bad),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert (f"1 image has detections in {bad} of classes this model does not have (it has 1..3): "
            f"{files[1].name} ([9])") in plain(result.output)
    assert not list((tmp_path / "out").glob("*.png"))  # the good first image was not segmented either


def test_validate_names_the_image_whose_labels_the_model_does_not_know(exported, photos, tmp_path):
    files, _ = photos
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": "chelsea", "category_id": 9, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    result = runner.invoke(app, ["validate", str(exported[1]), "--checkpoint", str(exported[0]),
                                 "--images", str(files[0]), "--detections", str(bad)])
    assert result.exit_code == 1
    assert "classes this model does not have (it has 1..3): chelsea.png ([9])" in plain(result.output)


def test_validate_names_the_case_whose_detections_the_sdk_refuses(exported):
    from dynseg.sdk.commands import parity
    from dynseg.sdk.commands.images import ImageDetections

    image = np.ascontiguousarray(samples.load("coffee")[:40, :48])
    bad = ImageDetections("x", np.array([[0, 0, np.nan, 5]], np.float32), np.array([1]), np.array([0.5], np.float32))
    with Segmenter(exported[1]) as model, Segmenter(exported[0]) as checkpoint, \
            pytest.raises(InvalidArgumentError, match=r"^the NaN case: boxes must be finite"):
        parity.validate(model, checkpoint, [("the NaN case", image, bad)])


def test_validate_leaves_a_dropped_box_out_of_d_without_a_warning(exported, photos, tmp_path):
    files, _ = photos
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps([{"image_id": "chelsea", "category_id": 1, "bbox": [0, 0, 9, 9], "score": 0.5},
                                   {"image_id": "chelsea", "category_id": 1, "bbox": [500, 500, 9, 9], "score": 0.5}]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = runner.invoke(app, ["validate", str(exported[1]), "--checkpoint", str(exported[0]),
                                     "--images", str(files[0]), "--detections", str(outside)])
    assert result.exit_code == 0, result.output
    assert "| chelsea.png | 72 x 96 | 1 |" in result.output and "Warning" not in result.output
    assert "[validate] 1/1 chelsea.png" in result.output  # a line per image, as infer prints


def test_validate_passes_the_export_against_its_own_checkpoint(exported, photos):
    checkpoint, model = exported
    files, detections = photos
    result = runner.invoke(app, ["validate", str(model), "--checkpoint", str(checkpoint),
                                 "--images", str(files[0]), "--images", str(files[1]), "--detections", str(detections)])
    assert result.exit_code == 0, result.output
    assert "| chelsea.png | 72 x 96 | 2 |" in result.output
    assert "parity: ok" in result.output


def test_validate_runs_on_the_sample_photos_by_default(exported):
    checkpoint, model = exported
    result = runner.invoke(app, ["validate", str(model), "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    for name in samples.NAMES:
        assert f"| {name} |" in result.output


def test_validate_refuses_crf_nodes_whose_attributes_or_weights_are_not_the_checkpoints(exported, tmp_path):
    # a fresh network's semantic CRF barely moves its probabilities: images alone would pass these graphs
    checkpoint, original = exported
    model = onnx.load(str(original))
    semantic = next(node for node in model.graph.node if node.domain == "dynseg")
    for attribute in semantic.attribute:
        if attribute.name == "iterations":
            attribute.i += 1
        if attribute.name == "theta_bilateral_rgb":
            attribute.f *= 1.1
    weight = next(t for t in model.graph.initializer if t.name == semantic.input[3])  # bilateral_weight
    changed = onnx.numpy_helper.to_array(weight) * np.float32(1.01)
    weight.CopyFrom(onnx.numpy_helper.from_array(changed, weight.name))
    onnx.save(model, str(tmp_path / "edited.onnx"))
    result = runner.invoke(app, ["validate", str(tmp_path / "edited.onnx"), "--checkpoint", str(checkpoint)])
    assert result.exit_code == 1
    message = plain(result.output)
    assert "CRF nodes are not" in message and "attribute iterations is 6, the checkpoint's 5" in message
    assert "attribute theta_bilateral_rgb is 3.3, the checkpoint's 3" in message
    assert "input bilateral_weight differs from the checkpoint's bilateral_weight" in message
    assert "instance CRF node" not in message  # the untouched node matches


def test_validate_refuses_a_checkpoint_with_other_weights_than_the_export_came_from(exported, photos, tmp_path):
    # same architecture and classes: on images neither network recognises anything in, the two could agree
    other = _checkpoint(tmp_path / "other", seed=1)
    result = runner.invoke(app, ["validate", str(exported[1]), "--checkpoint", str(other)])
    assert result.exit_code == 1
    assert "was exported from other weights than checkpoint" in plain(result.output)


def test_validate_names_a_folder_that_is_not_a_checkpoint(exported, tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["validate", str(exported[1]), "--checkpoint", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert "is not a dynseg checkpoint: model.json is missing" in plain(result.output)


def test_validate_of_an_export_without_a_fingerprint_fails_on_the_numbers_against_other_weights(exported, photos,
                                                                                              tmp_path):
    model = onnx.load(str(exported[1]))
    kept = [entry for entry in model.metadata_props if entry.key != "weights_sha256"]
    assert len(kept) == len(model.metadata_props) - 1
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "old.onnx"))
    other = _checkpoint(tmp_path / "other", seed=1)
    files, detections = photos
    result = runner.invoke(app, ["validate", str(tmp_path / "old.onnx"), "--checkpoint", str(other),
                                 "--images", str(files[0]), "--detections", str(detections)])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "parity check failed" in result.output


def test_bench_prints_a_table_and_writes_json(exported, tmp_path):
    result = runner.invoke(app, ["bench", str(exported[1]), "--sizes", "48x64,40x40", "--detections", "0,3",
                                 "--repeats", "2", "--json", str(tmp_path / "bench.json")])
    assert result.exit_code == 0, result.output
    assert "| onnxruntime | 48 x 64 | 3 |" in result.output
    assert all(line.endswith("| - |") for line in result.output.splitlines() if line.startswith("| onnxruntime |"))
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["height"], r["width"], r["detections"]) for r in rows] == [(48, 64, 0), (48, 64, 3), (40, 40, 0),
                                                                          (40, 40, 3)]
    for row in rows:  # measured, not asserted: only that the parts are there and ordered
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["network_ms"] >= 0 and row["crf_ms"] >= 0 and row["post_ms"] >= 0


def test_bench_that_fails_leaves_no_empty_json_behind_but_keeps_an_existing_one(tmp_path):
    missing = tmp_path / "missing.onnx"
    for existing in (False, True):
        out = tmp_path / f"rows_{existing}.json"
        if existing:
            out.write_text("[]")
        result = runner.invoke(app, ["bench", str(missing), "--json", str(out)])
        assert result.exit_code == 1 and "missing.onnx" in plain(result.output)
        assert out.exists() == existing


def test_bench_times_the_checkpoint_beside_the_export(exported):
    checkpoint, model = exported
    result = runner.invoke(app, ["bench", str(model), "--sizes", "40x48", "--detections", "2", "--repeats", "1",
                                 "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(("| onnxruntime |", "| torch |"))]
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in lines)}
    assert set(rows) == {"onnxruntime", "torch"}, result.output
    # "× torch": each row's p50 over PyTorch's, both measured in this run
    assert rows["torch"][-1] == "1.00"
    assert float(rows["onnxruntime"][-1]) == pytest.approx(float(rows["onnxruntime"][3]) / float(rows["torch"][3]),
                                                           abs=0.01)


def test_segment_reports_each_stages_time_where_the_backend_tells_them_apart(exported):
    checkpoint, model = exported
    image = np.ascontiguousarray(samples.load("coffee")[:40, :48])
    for path, stages in ((model, {"network", "crf", "post"}), (checkpoint, {"post"})):
        timings: dict[str, float] = {}
        Segmenter(path).segment(image, [[2, 3, 20, 30]], [1], [0.8], timings=timings)
        assert set(timings) == stages and all(math.isfinite(seconds) and seconds >= 0 for seconds in timings.values())
    with pytest.raises(InvalidArgumentError, match="timings must be a dict"):
        Segmenter(model).segment(image, [], [], [], timings=[])
    with pytest.raises(InvalidArgumentError, match=r"timings\['post'\] must be a number of seconds to add to, got 'x'"):
        Segmenter(model).segment(image, [], [], [], timings={"post": "x"})
    shared = {"post": np.float32(1.0)}  # a caller's running totals, numpy's too: the call adds to them
    Segmenter(model).segment(image, [], [], [], timings=shared)
    assert shared["post"] >= 1.0 and "network" in shared  # added to, not replaced


def test_quickstart_with_a_few_steps_makes_everything_it_promises(tmp_path):
    out = tmp_path / "qs"
    result = runner.invoke(app, ["quickstart", "--out", str(out), "--steps", "2"])
    assert result.exit_code == 0, result.output
    for name in ("model.onnx", "metrics.json", "parity.md", "checkpoint/model.safetensors", "checkpoint/model.json",
                 "overlays/coffee.png", "overlays/scene_0.png"):
        assert (out / name).is_file(), name
    assert "ap_r_vol" in json.loads((out / "metrics.json").read_text())
    assert "parity onnxruntime vs PyTorch: ok" in result.output
    # two steps learn no instance: the parity's instance checks saw background only, and it says so
    rows = (out / "parity.md").read_text().splitlines()[2:-1]  # the images' rows: | image | H x W | D | N | ...
    no_instance = all(row.split("|")[4].strip() == "0" for row in rows)
    assert no_instance == ("compared background only: train longer" in " ".join(result.output.split()))
    assert (out / "metrics.md").read_text().startswith(f"{out / 'checkpoint'}: 20 held-out synthetic scenes (seed 1)")
    # the commands it suggests run as printed, on the images and detections it leaves
    assert sorted(p.name for p in (out / "images").iterdir()) == ["coffee.png", "scene_0.png", "scene_1.png",
                                                                  "scene_2.png"]
    suggested = [line.split()[1:] for line in result.output.splitlines() if line.startswith("  dynseg ")]
    assert [words[0] for words in suggested] == ["infer", "validate", "eval", "bench"]
    for words in suggested[:3]:
        ran = runner.invoke(app, words)
        assert ran.exit_code == 0, (words, ran.output)
    assert len(json.loads((out / "infer" / "results.json").read_text())) >= 0
    evaluated = json.loads((out / "model_eval" / "metrics.json").read_text())  # the export, on the same scenes
    quickstart_metrics = json.loads((out / "metrics.json").read_text())
    assert evaluated["ap_r_vol"] == pytest.approx(quickstart_metrics["ap_r_vol"], abs=1e-9, nan_ok=True)
    from dynseg.trainer.checkpoint import read_training_data

    for folder in (out / "checkpoint", out / "checkpoint" / "semantic"):  # so dynseg eval holds out other scenes
        assert read_training_data(folder) == {"dataset": "synthetic", "seed": 0, "image_size": [96, 120]}


@pytest.mark.parametrize("arguments, option", [
    (["export", "{checkpoint}", "--format", "tflite", "--out", "{tmp}/m.onnx"], "--format"),
    (["export", "{checkpoint}", "--out", "{tmp}/m.onnx", "--max-detections", "0"], "--max-detections"),
    (["export", "{checkpoint}", "--out", "{tmp}/m.onnx", "--max-detections", "65536"], "--max-detections"),
    (["export", "{checkpoint}", "--out", "{tmp}/m.engine"], "--out"),  # an engine name for an ONNX file
    (["export", "{checkpoint}", "--out", "{checkpoint}/model.safetensors"], "--out"),  # its own weights, overwritten
    (["export", "{checkpoint}", "--out", "{tmp}/m.onnx", "--opt-detections", "5", "--fp16"], "--format"),
    (["infer", "{model}", "{tmp}/missing.png", "--detections", "{tmp}/d.json", "--out", "{tmp}"], "'images'"),
    (["infer", "{model}", "{photo}", "--detections", "{tmp}/d.json", "--out", "{tmp}", "--backend", "tf"],
     "--backend"),
    (["validate", "{model}", "--checkpoint", "{checkpoint}", "--detections", "{tmp}/d.json"], "--detections"),
    (["bench", "{model}", "--sizes", "512by512"], "--sizes"),
    (["bench", "{model}", "--detections", "1,two"], "--detections"),
    (["bench", "{model}", "--sizes", "²x²"], "--sizes"),  # isdigit() says yes, int() says no
    (["bench", "{model}", "--sizes", "40000x40000"], "--sizes"),  # made in memory: 6 GB per image
    (["bench", "{model}", "--detections", "²"], "--detections"),
    (["bench", "{model}", "--sizes", "9" * 5000 + "x64"], "--sizes"),  # int() refuses over 4300 digits
    (["bench", "{model}", "--detections", "9" * 5000], "--detections"),
    (["bench", "{model}", "--detections", "0,3,3"], "--detections"),  # one case twice
    (["infer", "{model}", "{photo}", "--detections", "{tmp}/d.json", "--out", "{tmp}", "--keep-top", "101"],
     "--keep-top"),  # above the model's limit, whose remedy it is
    (["bench", "{model}", "--json", "{tmp}/d.json/rows.json"], "--json"),  # under a file: before any timing
    (["export", "{checkpoint}", "--out", "{tmp}/d.json/m.onnx"], "d.json is a file, not a folder"),
    (["bench", "{model}", "--repeats", "0"], "--repeats"),
    (["bench", "{model}", "--device", "gpu"], "--device"),
    (["infer", "{model}", "{photo}", "--detections", "{tmp}/d.json", "--out", "{tmp}", "--device", "gpu"], "--device"),
    (["validate", "{model}", "--checkpoint", "{checkpoint}", "--device", "cuda:x"], "--device"),
    (["quickstart", "--out", "{tmp}/q", "--steps", "1"], "--steps"),
    (["quickstart", "--out", "{tmp}/q", "--seed", "-1"], "--seed"),
    (["train", "--out", "{tmp}/t", "--seed", str(2**64)], "--seed"),  # torch.manual_seed's overflow, before
    # an engine's profile and file name are checked before the export (no .onnx written: see below)
    (["export", "{checkpoint}", "--format", "engine", "--out", "{tmp}/e/m.onnx"], "--out"),
    (["export", "{checkpoint}", "--format", "engine", "--out", "{tmp}/e/m.engine", "--min-size", "2000x2000"],
     "--min-size"),
    (["export", "{checkpoint}", "--format", "engine", "--out", "{tmp}/e/m.engine", "--min-detections", "20",
      "--opt-detections", "5"], "--min-detections"),
    (["export", "{checkpoint}", "--format", "engine", "--out", "{tmp}/e/m.engine", "--max-detections", "3000",
      "--max-size", "1024x2048"], "--min-detections / --opt-detections / --max-detections"),  # too many together
])
def test_bad_arguments_name_the_option_without_a_traceback(exported, photos, tmp_path, arguments, option):
    (tmp_path / "d.json").write_text("[]")
    values = {"checkpoint": exported[0], "model": exported[1], "photo": photos[0][0], "tmp": tmp_path}
    result = runner.invoke(app, [a.format(**values) for a in arguments])
    assert result.exit_code != 0
    assert option in plain(result.output), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert not (tmp_path / "e").exists()


def test_engine_export_without_tensorrt_says_how_to_get_it(exported, tmp_path):
    pytest.importorskip("dynseg.export.engine")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the engine would be built")
    except ImportError:
        pass
    (tmp_path / "m.onnx").write_bytes(b"an earlier export")
    result = runner.invoke(app, ["export", str(exported[0]), "--format", "engine", "--out", str(tmp_path / "m.engine")])
    assert result.exit_code == 1
    assert "TensorRT" in result.output and "Traceback" not in result.output
    # it stops before the export: the .onnx beside the engine is left as it was
    assert (tmp_path / "m.onnx").read_bytes() == b"an earlier export" and not (tmp_path / "m.engine").exists()


def test_an_engine_profile_is_judged_at_the_sizes_given_and_the_defaults_follow_the_largest(exported, tmp_path):
    pytest.importorskip("dynseg.export.engine")
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the engines would be built")
    # 3001 labels over 256x256 pixels fit the kernels' 32-bit indexing; the default 1024x1024 would not.
    # Without TensorRT the export stops after the profile's check, saying how to get TensorRT
    result = runner.invoke(app, ["export", str(exported[0]), "--format", "engine", "--out", str(tmp_path / "m.engine"),
                                 "--max-detections", "3000", "--max-size", "256x256"])
    assert result.exit_code == 1 and "TensorRT's Python package is not installed" in plain(result.output), \
        result.output  # past the profile's check
    result = runner.invoke(app, ["export", str(exported[0]), "--format", "engine", "--out", str(tmp_path / "m.engine"),
                                 "--min-size", "600x700"])  # above the default opt size: the opt size follows it
    assert result.exit_code == 1 and "TensorRT's Python package is not installed" in plain(result.output), \
        result.output


def test_engine_sizes_must_be_height_x_width(exported, tmp_path):
    result = runner.invoke(app, ["export", str(exported[0]), "--format", "engine", "--out", str(tmp_path / "m.engine"),
                                 "--opt-size", "480"])
    assert result.exit_code != 0 and "--opt-size" in plain(result.output)


def test_a_checkpoint_folder_given_as_the_onnx_model_is_named_as_a_folder(exported):
    result = runner.invoke(app, ["bench", str(exported[0]), "--sizes", "40x48", "--detections", "0"])
    assert result.exit_code == 1 and "is a directory, not an .onnx file" in plain(result.output), result.output


def test_a_file_that_is_no_model_is_named_in_one_line(photos, tmp_path):
    not_a_model = tmp_path / "model.onnx"
    not_a_model.write_bytes(b"not a model")
    files, detections = photos
    result = runner.invoke(app, ["infer", str(not_a_model), str(files[0]), "--detections", str(detections),
                                 "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "model.onnx is not a readable ONNX model" in result.output


def test_the_cuda_branch_takes_the_arrays_onnxruntime_hands_the_crf_nodes(exported, monkeypatch):
    # The CUDA path (never run here) reads the CRF nodes' OrtValues as they are. In this fresh network
    # detection_x == detection_y, so the export shares one constant and one of them arrives as an
    # Identity's 0-d output, where the CPU path's numpy copies make it (1,).
    from dynseg.sdk import _native, crf_node, onnx_backend

    seen = []
    mean_field = onnx_backend._mean_field
    monkeypatch.setattr(onnx_backend, "_mean_field", lambda step, inputs, *rest: seen.append((step, inputs))
                        or mean_field(step, inputs, *rest))
    image = np.ascontiguousarray(samples.load("coffee")[:64, :96])
    boxes = np.array([[5, 5, 40, 30], [10, 20, 70, 60]], np.float32)
    Segmenter(exported[1]).segment(image, boxes, [1, 3], [0.9, 0.6])
    assert len(seen) == 2

    class OnTheGpu:  # an OrtValue that says it is in CUDA memory: what the CUDA branch is handed
        def __init__(self, value):
            self.value = value

        def device_name(self):
            return "Cuda"

        def __getattr__(self, name):
            return getattr(self.value, name)

    for step, inputs in seen:  # the CUDA branch's views and problem, up to the call that needs a GPU
        views = crf_node.CrfInputs(*onnx_backend._cuda_views(step, [OnTheGpu(value) for value in inputs]))
        assert [view.pointer for view in views] == [value.data_ptr() for value in inputs]
        crf_node._check_shapes(views)
        problem = crf_node._problem(views, step.attributes, _native.DeviceArray(1, views.scores.shape))
        assert problem.shape == views.unary.shape[1:]
        with pytest.raises(InvalidArgumentError, match="is on cpu, not on the GPU"):  # the real ones are not
            onnx_backend._cuda_views(step, inputs)


def test_validate_generates_no_more_detections_than_the_model_takes_and_names_an_image_given_more(
        exported, photos, tmp_path):
    checkpoint, _ = exported
    small = tmp_path / "small.onnx"  # the coffee sample gets 7 generated boxes, the images 5
    assert runner.invoke(app, ["export", str(checkpoint), "--out", str(small), "--max-detections", "3"]).exit_code == 0
    result = runner.invoke(app, ["validate", str(small), "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert "| coffee | 375 x 500 | 3 |" in result.output
    files, _ = photos
    four = tmp_path / "four.json"
    four.write_text(json.dumps([{"image_id": "chelsea", "category_id": 1, "bbox": [i, i, 9, 9], "score": 0.5}
                                for i in range(4)]))
    result = runner.invoke(app, ["validate", str(small), "--checkpoint", str(checkpoint), "--images", str(files[0]),
                                 "--detections", str(four)])
    assert result.exit_code == 1
    assert "1 image has more detections than this model's limit of 3: chelsea.png (4)" in plain(result.output)


def test_infer_refuses_two_images_that_one_image_id_names(exported, photos, tmp_path):
    files, _ = photos
    for name in ("1.png", "01.png"):
        shutil.copy(files[0], tmp_path / name)
    detections = tmp_path / "d.json"
    detections.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 9, 9], "score": 0.9}]))
    result = runner.invoke(app, ["infer", str(exported[1]), str(tmp_path / "1.png"), str(tmp_path / "01.png"),
                                 "--detections", str(detections), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "both answer to image_id 1" in plain(result.output)
    assert not (tmp_path / "out").exists()


def test_bench_refuses_a_detection_count_above_the_models_limit_before_timing(exported):
    result = runner.invoke(app, ["bench", str(exported[1]), "--sizes", "40x48", "--detections", "0,21",
                                 "--repeats", "1"])
    assert result.exit_code == 1
    assert "detection count 21 (--detections) is above this model's limit of 20" in plain(result.output)
    assert "| onnxruntime |" not in result.output and "D=0" not in result.output


def test_bench_by_default_times_the_detection_counts_the_model_takes(exported):
    # the defaults 0, 1, 10 and 50, with the model's limit of 20 in place of 50
    result = runner.invoke(app, ["bench", str(exported[1]), "--sizes", "16x16", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert [int(d) for d in re.findall(r"D=(\d+):", result.output)] == [0, 1, 10, 20]


def test_bench_refuses_a_checkpoint_the_model_was_not_exported_from(exported, tmp_path):
    other = _checkpoint(tmp_path / "other", seed=1)
    result = runner.invoke(app, ["bench", str(exported[1]), "--sizes", "40x48", "--detections", "1",
                                 "--repeats", "1", "--checkpoint", str(other)])
    assert result.exit_code == 1
    assert "was exported from other weights than checkpoint" in plain(result.output)


def test_quickstart_gives_each_stage_at_least_one_step_in_a_6_to_1_split():
    from dynseg.sdk.commands.quickstart import split_steps

    assert [split_steps(steps) for steps in (2, 7, 14)] == [(1, 1), (6, 1), (12, 2)]


def test_a_parity_check_holds_at_its_limit_and_the_report_keeps_each_checks_worst_value():
    from dynseg.sdk.commands.parity import Check, ImageParity, ParityReport

    assert Check("max |Δ|", 1e-4, 1e-4, at_most=True) and Check("IoU", 0.99, 0.99, at_most=False)
    assert not Check("max |Δ|", 2e-4, 1e-4, at_most=True) and not Check("IoU", 0.98, 0.99, at_most=False)
    images = [ImageParity("a", (4, 4), 1, [Check("max |Δ|", 1e-6, 1e-4, True), Check("IoU", 1.0, 0.99, False)]),
              ImageParity("b", (4, 4), 1, [Check("max |Δ|", 5e-5, 1e-4, True), Check("IoU", 0.995, 0.99, False)])]
    assert [check.value for check in ParityReport(images).worst()] == [5e-5, 0.995]


def test_bench_leaves_the_warm_up_call_untimed_and_gives_the_throughput_of_the_mean_timed_call(exported, monkeypatch):
    from types import SimpleNamespace

    from dynseg.sdk.commands import bench

    # bench's clock moves only when a call ends, by that call's stand-in duration: a slow warm-up, and a
    # slow last timed call that pulls the mean well away from the median
    clock, durations, real = [0.0], iter([0.5, 0.010, 0.020, 0.300]), Segmenter.segment
    # and each call's parts, in seconds: (network, CRFs, post-processing), the warm-up's first
    parts = iter([(9.0, 9.0, 9.0), (0.004, 0.005, 0.001), (0.006, 0.011, 0.003), (0.200, 0.090, 0.002)])

    def segment(self, *args, timings=None, **kwargs):
        result = real(self, *args, timings=timings, **kwargs)
        clock[0] += next(durations)
        timings["network"], timings["crf"], timings["post"] = next(parts)
        return result

    monkeypatch.setattr(Segmenter, "segment", segment)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    [row] = bench.run(exported[1], sizes=[(32, 40)], detections=[1], repeats=3)
    assert next(durations, None) is None and row.repeats == 3  # one warm-up call, then the three timed ones
    timed = np.array([0.010, 0.020, 0.300])
    assert row.p50_ms == pytest.approx(20.0) and row.p99_ms == pytest.approx(np.percentile(timed, 99) * 1e3)
    assert row.images_per_s == pytest.approx(1.0 / timed.mean())  # one call at a time: 1 / the mean call
    # each part is the median of its own timed values, in milliseconds
    assert (row.network_ms, row.crf_ms, row.post_ms) == pytest.approx((6.0, 11.0, 2.0))


def test_an_instance_of_one_pixel_counts_in_the_mask_iou():
    from dynseg.sdk.commands.parity import compare
    from dynseg.sdk.inputs import check_detections
    from dynseg.sdk.results import build_result

    height, width, names = 4, 5, ("cat", "cup", "person")
    image = np.full((height, width, 3), 128, np.uint8)
    detections = check_detections([[0, 0, 4, 3]], [1], [0.9], height=height, width=width, num_classes=len(names))
    semantic = np.full((len(names) + 1, height, width), 0.25, np.float32)

    def outputs(pixels):  # background everywhere but at `pixels`, which the detection wins; every pixel decided
        logits = np.zeros((2, height, width), np.float32)
        logits[0] = 10.0
        for y, x in pixels:
            logits[:, y, x] = (-10.0, 10.0)
        return {"instance_logits": logits, "semantic_probabilities": semantic}

    def iou(candidate, reference):
        results = [build_result(image, raw["instance_logits"], semantic, detections, names)
                   for raw in (candidate, reference)]
        checks = compare("one pixel", candidate, reference, *results).checks
        return next(check for check in checks if check.name == "min mask IoU")

    one, none = outputs([(1, 2)]), outputs([])
    assert iou(one, one).value == 1.0 and iou(one, one)  # the union is the one pixel, and both have it
    for candidate, reference in ((none, one), (one, none)):  # the union is one pixel, and only one side has it
        check = iou(candidate, reference)
        assert check.value == 0.0 and not check
    assert iou(none, none).value == 1.0  # no instance on either side: nothing to compare, nothing wrong


def test_an_engine_profile_admits_widths_only_within_its_range():
    from dynseg.sdk.tensorrt_engine import make_profile

    profile = make_profile()
    (low_h, low_w), _, (high_h, high_w) = profile.sizes
    assert profile.admits(5, high_h, high_w) and profile.admits(5, low_h, low_w)
    assert not profile.admits(5, high_h, high_w + 1) and not profile.admits(5, low_h, low_w - 1)
    assert not profile.admits(5, high_h + 1, high_w)


def test_an_argmax_agreement_of_99_5_percent_fails_validate():
    height, width, names = 40, 50, ("cat", "cup", "person")
    image = np.full((height, width, 3), 128, np.uint8)
    detections = check_detections([[0, 0, width - 1, height - 1]], [1], [0.9], height=height, width=width,
                                  num_classes=len(names))
    semantic = np.full((len(names) + 1, height, width), 0.25, np.float32)

    def outputs(flipped: int):  # the detection wins the left half; `flipped` of its pixels go to background
        logits = np.empty((2, height, width), np.float32)
        logits[:, :, :] = np.array([10.0, -10.0], np.float32)[:, None, None]
        logits[:, :, : width // 2] = np.array([-10.0, 10.0], np.float32)[:, None, None]
        logits[:, 0, :flipped] = np.array([10.0, -10.0], np.float32)[:, None]  # every pixel stays decided
        return {"instance_logits": logits, "semantic_probabilities": semantic}

    candidate, reference = outputs(10), outputs(0)  # 1990 of 2000 pixels agree: 0.995
    results = [build_result(image, raw["instance_logits"], semantic, detections, names)
               for raw in (candidate, reference)]
    checks = {check.name: check for check in compare("flipped", candidate, reference, *results).checks}
    assert checks["argmax agreement"].value == 0.995
    assert not checks["argmax agreement"]  # below 99.9 %
    assert checks["min mask IoU"]  # 990 / 1000 = 0.99: at its limit, so the agreement alone fails the image


@pytest.mark.parametrize(("reference_logit", "candidate_logit", "counted"), [
    (1e-4, -1e-4, False),  # a near tie: the two labels 5e-5 apart in probability, the winner float noise
    (3e-4, -1e-5, True),  # 1.5e-4 apart: settled, though the probabilities move by less than 1e-4
])
def test_validate_counts_a_flipped_winner_only_where_the_probabilities_settle_it(reference_logit, candidate_logit,
                                                                               counted):
    height, width, names = 3, 4, ("cat", "cup", "person")
    image = np.full((height, width, 3), 128, np.uint8)
    detections = check_detections([[0, 0, width - 1, height - 1]], [1], [0.9], height=height, width=width,
                                  num_classes=len(names))
    semantic = np.full((len(names) + 1, height, width), 0.25, np.float32)

    def outputs(logit: float):  # background at 0, the detection at `logit`, on every pixel
        logits = np.zeros((2, height, width), np.float32)
        logits[1] = logit
        return {"instance_logits": logits, "semantic_probabilities": semantic}

    candidate, reference = outputs(candidate_logit), outputs(reference_logit)
    results = [build_result(image, raw["instance_logits"], semantic, detections, names)
               for raw in (candidate, reference)]
    assert results[1].instances and not results[0].instances  # the winner flipped on every pixel
    checks = {check.name: check for check in compare("near", candidate, reference, *results).checks}
    assert checks["instance prob max abs diff"]
    assert checks["argmax agreement"].value == (0.0 if counted else 1.0)


def test_tied_pixels_are_those_where_two_labels_are_within_the_tie_tolerance_of_the_largest():
    from dynseg.sdk.results import TIE_TOLERANCE, tied_pixels

    planes = np.zeros((3, 1, 4), np.float32)
    planes[:, 0, 0] = (2.0, 2.0, -1.0)  # an exact tie
    planes[:, 0, 1] = (100.0, 100.0 - 0.5 * TIE_TOLERANCE * 100, 0.0)  # within the tolerance, relative to 100
    planes[:, 0, 2] = (100.0, 100.0 - 3 * TIE_TOLERANCE * 100, 0.0)  # beyond it
    planes[:, 0, 3] = (0.0, 5.0, 0.0)  # one label on top, the others tied below it
    assert tied_pixels(planes).tolist() == [[True, True, False, False]]


def test_a_tie_broken_the_other_way_fails_validate_though_the_probabilities_agree():
    # two detections of one class tie exactly outside their boxes, a tie the scores settle on every runtime;
    # a logit error of 2e-5 relative (20x the runtimes' noise) hands those pixels to the other detection
    height, width, names = 20, 30, ("cat", "cup", "person")
    image = np.full((height, width, 3), 128, np.uint8)
    whole = [0, 0, width - 1, height - 1]
    detections = check_detections([whole, whole], [1, 1], [0.9, 0.8], height=height, width=width,
                                  num_classes=len(names))
    semantic = np.full((len(names) + 1, height, width), 0.25, np.float32)
    tied = np.stack([np.full((height, width), value, np.float32) for value in (-5.0, 3.0, 3.0)])
    moved = tied.copy()
    moved[2] *= np.float32(1 + 2e-5)
    candidate, reference = ({"instance_logits": logits, "semantic_probabilities": semantic} for logits in (moved, tied))
    results = [build_result(image, raw["instance_logits"], semantic, detections, names)
               for raw in (candidate, reference)]
    checks = {check.name: check for check in compare("tie", candidate, reference, *results).checks}
    assert checks["instance prob max abs diff"]  # 1.5e-5 apart
    assert checks["argmax agreement"].value == 0.0 and not checks["argmax agreement"]
    assert checks["min mask IoU"].value == 0.0


@pytest.mark.parametrize(("apart", "passes"), [(5e-5, True), (2e-4, False)])
def test_instance_probabilities_more_than_1e_4_apart_fail_validate_with_every_label_agreeing(apart, passes):
    height, width, names = 6, 7, ("cat", "cup", "person")
    image = np.full((height, width, 3), 128, np.uint8)
    detections = check_detections([[0, 0, width - 1, height - 1]], [1], [0.9], height=height, width=width,
                                  num_classes=len(names))
    semantic = np.full((len(names) + 1, height, width), 0.25, np.float32)
    q = 1 / (1 + np.exp(-1.0))  # the detection's probability at logits (0, 1)

    def outputs(logit: float):
        logits = np.zeros((2, height, width), np.float32)
        logits[1] = logit
        return {"instance_logits": logits, "semantic_probabilities": semantic}

    # the detection's logit moved so that its probability moves by `apart` (dq = q (1 - q) dlogit)
    candidate, reference = outputs(1.0 + apart / (q * (1 - q))), outputs(1.0)
    results = [build_result(image, raw["instance_logits"], semantic, detections, names)
               for raw in (candidate, reference)]
    checks = {check.name: check for check in compare("moved", candidate, reference, *results).checks}
    assert checks["instance prob max abs diff"].value == pytest.approx(apart, rel=1e-2)
    assert bool(checks["instance prob max abs diff"]) == passes
    assert checks["argmax agreement"].value == 1.0 and checks["min mask IoU"].value == 1.0


# ---- what the system refuses: a full disk, a pipe, a symbolic link loop, an interruption ---------------------


def test_infer_on_a_full_disk_names_the_file_and_leaves_no_results_file(exported, photos, tmp_path, full_disk):
    files, detections = photos
    out = tmp_path / "out"
    out.mkdir()
    full_disk(out / "results.json")
    result = runner.invoke(app, ["infer", str(exported[1]), *map(str, files), "--detections", str(detections),
                                 "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"No space left on device: {out / 'results.json'}" in plain(result.output), result.output
    assert not (out / "results.json").exists() and not any(p.name.endswith(".partial") for p in out.iterdir())


def test_bench_on_a_full_disk_names_its_json_and_leaves_no_empty_one(exported, tmp_path, full_disk):
    json_out = tmp_path / "rows.json"
    full_disk(json_out)
    result = runner.invoke(app, ["bench", str(exported[1]), "--sizes", "40x40", "--detections", "0", "--repeats", "1",
                                 "--json", str(json_out)])
    assert result.exit_code == 1 and f"No space left on device: {json_out}" in plain(result.output), result.output
    assert not json_out.exists()


def test_a_symbolic_link_loop_as_infers_output_is_one_line(exported, photos, tmp_path):
    files, detections = photos
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    result = runner.invoke(app, ["infer", str(exported[1]), str(files[0]), "--detections", str(detections),
                                 "--out", str(tmp_path / "loop")])
    assert result.exit_code == 1 and "Traceback" not in result.output and "loop" in result.output, result.output


def test_eval_of_a_pipe_says_so_instead_of_waiting_on_it(tmp_path):
    import subprocess
    import sys

    os.mkfifo(tmp_path / "model.onnx")  # nothing ever writes to it: a read would block for good
    run = subprocess.run([sys.executable, "-c", "from dynseg.sdk.cli import app; app()", "eval",
                          str(tmp_path / "model.onnx"), "--images", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "model.onnx is a pipe or device, not a regular file" in plain(run.stderr + run.stdout), run.stderr


def test_an_interrupted_training_run_says_how_to_resume(tmp_path, monkeypatch):
    from dynseg.trainer import train

    run, saved = tmp_path / "run", []

    def interrupted(*args, **kwargs):  # Ctrl-C in the middle of a stage, after `saved` epochs' checkpoints
        for folder in saved:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "trainer_state.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", interrupted)
    command = ["train", "--out", str(run), "--images", "2", "--image-size", "48", "48"]
    result = runner.invoke(app, command)
    assert result.exit_code == 130
    assert "interrupted: no stage finished an epoch, so nothing was saved; give the same command with --resume" \
        in plain(result.output), result.output
    saved.append(run / "semantic")
    result = runner.invoke(app, command)
    assert result.exit_code == 130
    assert f"interrupted: {run / 'semantic'} holds the checkpoint of each started stage's last finished epoch; give " \
           "the same command with --resume" in plain(result.output), result.output


def test_export_and_eval_warn_of_an_unfinished_stages_checkpoint(exported, tmp_path):
    from dynseg.trainer.checkpoint import load_checkpoint

    network = load_checkpoint(exported[0])
    checkpoint = save_checkpoint(tmp_path / "run", network, torch.optim.SGD(network.parameters(), lr=0.1), step=3)
    warning = f"Warning: {checkpoint} is the checkpoint of an unfinished training stage"
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(tmp_path / "model.onnx")])
    assert result.exit_code == 0 and warning in plain(result.output), result.output
    result = runner.invoke(app, ["eval", str(checkpoint), "--images", "1"])  # then refused: its classes are not
    assert warning in plain(result.output), result.output                     # the synthetic scenes'
    (checkpoint / "train_config.json").write_text("{}")  # what a stage writes at its end
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(tmp_path / "model.onnx")])
    assert result.exit_code == 0 and "unfinished" not in result.output, result.output


def test_a_torch_that_is_installed_but_will_not_load_is_not_reported_missing(tmp_path):
    import subprocess
    import sys

    broken = tmp_path / "site" / "torch"  # an installed torch whose libraries cannot be mapped
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("libtorch_cpu.so: failed to map segment from shared '
                                        'object")\n')
    run = subprocess.run([sys.executable, "-c", "from dynseg.sdk.cli import app; app()", "train", "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert run.returncode == 1 and "pip install" not in run.stderr, run.stderr
    assert "dynseg train needs PyTorch, which is installed but could not be imported: libtorch_cpu.so: failed to " \
           "map segment" in plain(run.stderr), run.stderr


def test_bench_refuses_a_json_path_that_is_the_model_or_a_pipe_before_timing(exported, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(exported[1], model)
    before = model.read_bytes()
    timing = ["--sizes", "40x48", "--detections", "0", "--repeats", "1"]
    result = runner.invoke(app, ["bench", str(model), *timing, "--json", str(model)])
    assert result.exit_code == 1 and "is one of the files being timed" in plain(result.output), result.output
    assert model.read_bytes() == before
    os.mkfifo(tmp_path / "rows.json")
    result = runner.invoke(app, ["bench", str(model), *timing, "--json", str(tmp_path / "rows.json")])
    assert result.exit_code == 1 and "is a pipe or device, not a file" in plain(result.output), result.output
    assert "| onnxruntime |" not in result.output


def test_infer_names_an_output_file_whose_name_grows_too_long_in_one_line(exported, photos, tmp_path):
    # a 250-character stem is a valid name; its "_overlay.png" is not
    photo = tmp_path / f"{'y' * 250}.png"
    photo.write_bytes(photos[0][0].read_bytes())
    (tmp_path / "none.json").write_text("[]")
    result = runner.invoke(app, ["infer", str(exported[1]), str(photo), "--detections", str(tmp_path / "none.json"),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "File name too long: " in plain(result.output) and "_overlay.png" in plain(result.output), result.output


def test_infer_refuses_normalised_boxes_as_training_does(exported, photos, tmp_path):
    # each would have become an inverted box, dropped: an empty result and exit status 0
    detections = tmp_path / "normalised.json"
    detections.write_text(json.dumps([{"image_id": "chelsea", "category_id": 1, "bbox": [0.1, 0.1, 0.5, 0.5],
                                       "score": 0.5}]))
    result = runner.invoke(app, ["infer", str(exported[1]), str(photos[0][0]), "--detections", str(detections),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "normalised coordinates?" in plain(result.output), result.output


def test_quickstart_names_a_file_where_it_writes_a_folder_before_training(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "overlays").write_text("")
    result = runner.invoke(app, ["quickstart", "--out", str(tmp_path / "q"), "--steps", "2"])
    assert result.exit_code == 1 and "overlays is a file, not a folder" in plain(result.output), result.output
    assert "1/5" not in result.output


def test_an_engine_given_where_an_onnx_model_goes_is_named_as_one(tmp_path):
    (tmp_path / "model.engine").write_bytes(b"\x00\x01not protobuf" * 8)
    result = runner.invoke(app, ["bench", str(tmp_path / "model.engine"), "--sizes", "40x48"])
    assert result.exit_code == 1 and "this takes the exported .onnx" in plain(result.output), result.output


def test_a_dangling_link_as_bench_json_is_refused_and_its_target_never_made(exported, tmp_path):
    (tmp_path / "rows.json").symlink_to(tmp_path / "nowhere.json")
    result = runner.invoke(app, ["bench", str(exported[1]), "--sizes", "40x48", "--detections", "0", "--repeats",
                                 "1", "--json", str(tmp_path / "rows.json")])
    assert result.exit_code == 1 and "is a symbolic link that leads nowhere" in plain(result.output), result.output
    assert not (tmp_path / "nowhere.json").exists() and (tmp_path / "rows.json").is_symlink()


def test_bench_warns_when_other_work_keeps_the_cores_busy(exported, monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 32.0, 16.0))
    result = runner.invoke(app, ["bench", str(exported[1]), "--sizes", "40x48", "--detections", "0", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "Warning: the load average is 64.0 on" in plain(result.output)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    result = runner.invoke(app, ["bench", str(exported[1]), "--sizes", "40x48", "--detections", "0", "--repeats", "1"])
    assert result.exit_code == 0 and "load average" not in result.output
