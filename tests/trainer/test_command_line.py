"""`dynseg train` then `dynseg eval` from the command line on every dataset format and on a detections
file, the progress display and the per-epoch log, and one-line errors for bad arguments."""

from __future__ import annotations

import io
import json
import math
import os
import re

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from dataset_fixtures import write_cityscapes, write_coco, write_sbd, write_voc
from dynseg.sdk import DetectionsDroppedWarning, InvalidArgumentError
from dynseg.sdk.cli import app
from dynseg.sdk.inputs import check_detections
from dynseg.trainer.data import SyntheticScenes
from dynseg.trainer.data.sources import inside_image, with_detections
from dynseg.trainer.progress import LiveProgress
from dynseg.trainer.train import TrainConfig, _instance_batch, augment, evaluation_inputs
from dynseg.sdk.commands import defaults

runner = CliRunner()
TINY = ["--semantic-steps", "2", "--instance-steps", "2"]
SYNTHETIC = ["--images", "4", "--image-size", "48", "64"]

# (fixture writer, split it writes): the loaders' test fixtures, in their exact on-disk formats
FORMATS = {
    "voc": (write_voc, "val"),
    "sbd": (write_sbd, "train"),
    "coco": (lambda root: write_coco(root)[0], "val2017"),
    "cityscapes": (write_cityscapes, "val"),
}


def run(*arguments: str):
    result = runner.invoke(app, [str(a) for a in arguments])
    assert "Traceback" not in result.output, result.output
    return result


def epochs(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "epochs.jsonl").read_text().splitlines()]


def test_training_on_the_synthetic_default_prints_progress_and_logs_every_epoch(tmp_path):
    out = tmp_path / "run"
    result = run("train", "--out", out, *SYNTHETIC, "--semantic-steps", "3", "--instance-steps", "4",
                 "--held-out-images", "2")
    assert result.exit_code == 0, result.output
    assert "training on 4 synthetic images, simulated detections" in result.output
    # not a terminal: plain lines with the loss, the throughput and the time left
    assert re.search(r"\[semantic\] step 3/3  loss \d+\.\d{4}  \d+\.\d images/s  eta \d+s", result.output)
    held_out = re.search(r"\[instance\] epoch 1: held-out AP\^r_vol (\d+\.\d)%, Matching IoU (\d+\.\d)%", result.output)
    assert held_out, result.output  # in %, as dynseg eval prints them
    log = epochs(out)
    # stage 1: 4 images per step, so an epoch of 4 images is one step; stage 2: one image per step
    assert [(e["stage"], e["epoch"], e["step"]) for e in log] == [
        ("semantic", 1, 1), ("semantic", 2, 2), ("semantic", 3, 3), ("instance", 1, 4)]
    for entry in log:
        assert {"loss", "lr", "images_per_s", "images", "seconds"} <= set(entry)
        assert math.isfinite(entry["images_per_s"]) and entry["images_per_s"] >= 0
    assert "held_out" not in log[0]
    assert set(log[-1]["held_out"]) == {"ap_r", "ap_r_vol", "matching_iou", "pq", "coco_mask_ap"}
    assert float(held_out[1]) == pytest.approx(100 * log[-1]["held_out"]["ap_r_vol"], abs=0.051)
    assert float(held_out[2]) == pytest.approx(100 * log[-1]["held_out"]["matching_iou"], abs=0.051)
    stage1, stage2 = (json.loads((folder / "train_config.json").read_text()) for folder in (out / "semantic", out))
    assert (stage1["batch_size"], stage1["images_per_step"]) == (4, 4)
    assert "batch_size" not in stage2 and stage2["images_per_step"] == 1  # stage 1's field would mislead
    result = run("eval", out, "--images", "2", "--image-size", "48", "64")
    assert result.exit_code == 0, result.output
    assert "2 synthetic images, simulated detections (seed 1)" in result.output
    assert "[eval] 1/2 image 0" in result.output and "[eval] 2/2 image 1" in result.output  # a line per image
    assert f"wrote {out}/metrics.json and {out}/metrics.md" in result.output


def test_eval_holds_out_the_scenes_after_the_training_seed_at_the_training_size(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run("train", "--out", out, *SYNTHETIC, *TINY, "--seed", "5").exit_code == 0
    sizes = []
    real = SyntheticScenes.__init__
    monkeypatch.setattr(SyntheticScenes, "__init__",  # records the size; the scenes are made as always
                        lambda self, *a, **k: sizes.append(k.get("image_size")) or real(self, *a, **k))
    result = run("eval", out, "--images", "2")
    assert result.exit_code == 0, result.output
    assert "(seed 6)" in result.output and sizes == [(48, 64)]
    result = run("eval", out, "--images", "2", "--seed", "5")
    assert result.exit_code == 0 and "these are its training scenes" in result.output
    sizes.clear()
    result = run("eval", out / "semantic", "--images", "2")  # stage 1's checkpoint knows its data too
    assert result.exit_code == 0, result.output
    assert "(seed 6)" in result.output and sizes == [(48, 64)]
    assert run("export", out, "--out", tmp_path / "model.onnx").exit_code == 0  # and so does its export
    sizes.clear()
    result = run("eval", tmp_path / "model.onnx", "--images", "2")
    assert result.exit_code == 0, result.output
    assert "(seed 6)" in result.output and sizes == [(48, 64)] and "records no training data" not in result.output
    record = out / "training_data.json"  # damaged, it is named, not replaced by a guess at the training seed
    record.write_text(record.read_text()[:-1])
    _fails_naming(run("eval", out, "--images", "2"), f"{record} is malformed", "delete it")
    record.write_text('{"dataset": "synthetic", "seed": 5, "image_size": [48.0, 64]}')
    _fails_naming(run("eval", out, "--images", "2"), f"{record} is malformed")
    record.unlink()
    record.mkdir()  # not a record at all: named too, not taken for its absence
    _fails_naming(run("eval", out, "--images", "2"), f"training record {record} is a folder, not a file")
    record.rmdir()
    (tmp_path / "file").touch()
    _fails_naming(run("eval", out / "semantic", "--images", "2", "--out", tmp_path / "file" / "metrics"), "--out",
                  "file is a file, not a folder")


def test_eval_of_a_model_with_more_classes_than_synthetic_scenes_have_names_both_counts(tmp_path):
    import torch

    from dynseg.trainer.checkpoint import save_checkpoint
    from dynseg.trainer.data.synthetic import MAX_CLASSES
    from dynseg.trainer.model.instance import InstanceConfig
    from dynseg.trainer.model.network import ModelConfig, build_model

    torch.manual_seed(0)  # a VOC model, say: more classes than the synthetic scenes draw
    names = tuple(f"class{index}" for index in range(MAX_CLASSES + 1))
    network = build_model(ModelConfig(backbone="resnet18", class_names=names,
                                      instance=InstanceConfig(templates_per_group=2, template_size=8)))
    checkpoint = save_checkpoint(tmp_path / "checkpoint", network)
    _fails_naming(run("eval", checkpoint, "--dataset", "synthetic", *SYNTHETIC),
                  f"the model has {MAX_CLASSES + 1} classes, --dataset synthetic has at most {MAX_CLASSES}")


def test_eval_scores_an_exported_model_as_it_scores_its_checkpoint(tmp_path):
    import torch

    from dynseg.trainer.checkpoint import save_checkpoint
    from dynseg.trainer.model.instance import InstanceConfig
    from dynseg.trainer.model.network import ModelConfig, build_model

    torch.manual_seed(0)  # a fresh network of the synthetic classes: it finds instances, if poor ones
    classes = tuple(SyntheticScenes(size=1, image_size=(48, 64)).class_names[1:])
    network = build_model(ModelConfig(backbone="resnet18", class_names=classes,
                                      instance=InstanceConfig(templates_per_group=4, template_size=16)))
    with torch.no_grad():
        network.instance_unaries.templates.uniform_(0.0, 1.0)
    checkpoint = save_checkpoint(tmp_path / "checkpoint", network)
    for name, limit in (("model.onnx", "100"), ("few.onnx", "1")):
        assert run("export", checkpoint, "--out", tmp_path / name, "--max-detections", limit).exit_code == 0
    scored = {}
    for model, written in ((checkpoint, checkpoint), (tmp_path / "model.onnx", tmp_path / "model_eval"),
                           (tmp_path / "few.onnx", tmp_path / "few_eval")):
        result = run("eval", model, *SYNTHETIC, "--seed", "3")
        assert result.exit_code == 0, result.output
        assert f"wrote {written}/metrics.json" in result.output
        assert "records no training data: scoring synthetic scenes of seed 3 at 48x64" in " ".join(result.output.split())
        metrics = json.loads((written / "metrics.json").read_text())
        scored[model.name] = {**{f"ap_r {k}": v for k, v in metrics.pop("ap_r").items()}, **metrics}
    assert scored["checkpoint"]["matching_iou"] > 0  # instances were found and matched
    assert scored["model.onnx"] == pytest.approx(scored["checkpoint"], abs=1e-3)
    assert "had more detections than" in result.output and "(1): each was scored with its 1 most confident" in (
        " ".join(result.output.split()))
    _fails_naming(run("eval", tmp_path / "model.onnx", *SYNTHETIC, "--device", "gpu"), "--device", "gpu")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_train_then_eval_read_each_on_disk_format(tmp_path, name):
    write, split = FORMATS[name]
    root = write(tmp_path / name)
    out = tmp_path / "run"
    result = run("train", "--out", out, "--dataset", name, "--data-root", root, "--split", split, *TINY)
    assert result.exit_code == 0, result.output
    assert f"{name} images (split {split}), simulated detections" in result.output
    assert (out / "model.safetensors").is_file() and epochs(out)[-1]["stage"] == "instance"
    # an on-disk dataset's images have their own sizes: the record holds its split, not a scene size
    assert json.loads((out / "training_data.json").read_text()) == {"dataset": name, "seed": 0, "split": split}
    result = run("eval", out, "--data-root", root, "--split", split)  # the dataset it was trained on by default
    assert result.exit_code == 0, result.output
    assert "AP^r_vol" in result.output and f"{name} images" in result.output
    # the fixtures hold one split: scoring the training split is allowed, and said
    assert f"split {split} is the split {out} was trained on" in " ".join(result.output.split())
    _fails_naming(run("eval", out, "--dataset", "synthetic"), "classes")  # 4 synthetic shapes are not these
    _fails_naming(run("eval", out), "--data-root", f"was trained on {name}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("ap_r_vol", "matching_iou", "pq", "coco_mask_ap"))


def _results_file(path, entries) -> str:
    path.write_text(json.dumps(entries))
    return str(path)


def test_train_and_eval_read_detections_from_a_coco_results_file(tmp_path):
    # synthetic scenes are named by their index; one confident box per scene, over its first object
    scenes = SyntheticScenes(size=4, image_size=(48, 64), seed=0)
    entries = []
    for index in range(len(scenes)):
        x1, y1, x2, y2 = scenes[index]["boxes"][0].tolist()
        label = int(scenes[index]["labels"][0])
        entries.append({"image_id": index, "category_id": label, "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1],
                        "score": 0.9})
    detections = _results_file(tmp_path / "dets.json", entries)
    out = tmp_path / "run"
    result = run("train", "--out", out, *SYNTHETIC, *TINY, "--detections", detections)
    assert result.exit_code == 0, result.output
    assert f"detections from {detections}" in result.output
    result = run("eval", out, "--images", "4", "--image-size", "48", "64", "--seed", "0", "--detections", detections)
    assert result.exit_code == 0, result.output
    assert f"detections from {detections}" in result.output
    # resumed on simulated detections, the rest of the run would train on other boxes: refused, naming them
    result = run("train", "--out", out, *SYNTHETIC, *TINY, "--resume")
    assert result.exit_code == 1 and "other settings (detections '" in " ".join(result.output.split()), result.output


def test_training_and_evaluation_take_a_results_files_detections_rather_than_simulating_them(tmp_path):
    scenes = SyntheticScenes(size=3, image_size=(48, 64), seed=0)
    # the same two boxes in every scene, a confident one and a doubtful one: any drawn sample has them
    boxes, labels, scores = np.array([[3, 4, 20, 30], [30, 10, 60, 40]], np.float32), [1, 2], [0.9, 0.3]
    entries = [{"image_id": index, "category_id": label, "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1], "score": score}
               for index in range(len(scenes))
               for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), labels, scores)]
    dataset = with_detections(scenes, _results_file(tmp_path / "dets.json", entries))
    evaluated = list(evaluation_inputs(dataset, seed=0, num_classes=scenes.num_classes))
    assert len(evaluated) == len(scenes)
    for _, detections, _ in evaluated:
        np.testing.assert_array_equal(detections["boxes"].numpy(), boxes)
        assert detections["labels"].tolist() == labels
        assert detections["scores"].numpy().tolist() == pytest.approx(scores)
    # stage 2's batches, with the augmentation off so that the boxes stay where they are
    config = TrainConfig(stage="instance", scale_range=(1.0, 1.0), mirror=False)
    for step in range(3):
        batch = _instance_batch(dataset, config, step, 0, scenes.num_classes)
        np.testing.assert_array_equal(batch["boxes"].numpy(), boxes)
        assert batch["labels"].tolist() == labels and batch["scores"].numpy().tolist() == pytest.approx(scores)


def test_stage_two_hands_the_network_and_the_loss_the_pixels_each_simulated_box_covers():
    scenes = SyntheticScenes(size=2, image_size=(48, 64), seed=0)
    boxes = []
    for step in range(4):
        batch = _instance_batch(scenes, TrainConfig(stage="instance"), step, 0, scenes.num_classes)
        height, width = batch["image"].shape[1:]
        boxes.append(batch["boxes"].numpy())
        assert ((boxes[-1] >= 0) & (boxes[-1] <= [width - 1, height - 1] * 2)).all()
    boxes = np.concatenate(boxes)
    assert len(boxes) and np.array_equal(boxes, np.floor(boxes))  # whole pixels, as inside_image gives them


def test_coco_detections_keep_coco_category_ids_and_map_them_to_labels(tmp_path):
    root = write_coco(tmp_path / "coco")[0]
    detections = _results_file(tmp_path / "dets.json", [
        {"image_id": 139, "category_id": 18, "bbox": [4, 18, 6, 4], "score": 0.8},  # the dog: label 3
        {"image_id": 42, "category_id": 3, "bbox": [2, 2, 6, 6], "score": 0.7},  # the car: label 2
    ])
    result = run("eval", _trained(tmp_path, "coco", root, "val2017"), "--dataset", "coco", "--data-root", root,
                 "--detections", detections)
    assert result.exit_code == 0, result.output
    from dynseg.trainer.data import CocoInstances

    dataset = with_detections(CocoInstances(root, "val2017"), detections)
    assert dataset[2]["detections"]["labels"].tolist() == [3] and len(dataset[0]["detections"]["labels"]) == 0


@pytest.mark.parametrize("name", ["synthetic", *sorted(FORMATS)])
def test_a_detections_file_whose_boxes_all_lie_outside_their_images_is_refused(tmp_path, name):
    # stage 2 would drop every box when it reads a sample, and learn nothing from the file
    from dynseg.trainer.data.sources import image_ids, open_dataset

    if name == "synthetic":
        dataset = open_dataset(name, size=3, image_size=(48, 64))
    else:
        write, split = FORMATS[name]
        dataset = open_dataset(name, root=write(tmp_path / name), split=split)
    ids, category = image_ids(dataset), min(getattr(dataset, "label_of_category", [1]))  # COCO: a category id
    height, width = dataset.image_shape(len(ids) - 1)
    assert all(dataset.image_shape(i) == dataset[i]["image"].shape[:2] for i in range(len(ids)))  # from the header
    beyond = [{"image_id": image_id, "category_id": category, "bbox": bbox, "score": 0.9}
              for image_id, bbox in [(i, [10_000, 0, 10, 10]) for i in ids] + [(ids[0], [-30, 0, 20, 10])]]
    with pytest.raises(InvalidArgumentError, match=r"dets.json: no detection's box holds a pixel of its image"):
        with_detections(dataset, _results_file(tmp_path / "dets.json", beyond))
    # a detector's normalised boxes: each would be its image's top-left pixel, inside the image
    normalised = [{"image_id": i, "category_id": category, "bbox": [0.1, 0.2, 0.3, 0.4], "score": 0.9} for i in ids]
    with pytest.raises(InvalidArgumentError, match=r"dets.json: every bbox lies within \[0, 1\].*normalised"):
        with_detections(dataset, _results_file(tmp_path / "dets.json", normalised))
    inside = {"image_id": ids[-1], "category_id": category, "bbox": [width - 1, height - 1, 10, 10], "score": 0.9}
    dataset = with_detections(dataset, _results_file(tmp_path / "dets.json", [*beyond, inside]))
    assert len(dataset[len(ids) - 1]["detections"]["labels"]) == 1
    corner = {**inside, "bbox": [0, 0, 1, 1]}  # one whole pixel in the corner is a box, not a fraction
    assert len(with_detections(dataset.dataset, _results_file(tmp_path / "dets.json", [corner])))


def _trained(tmp_path, name, root, split):
    out = tmp_path / f"{name}-run"
    result = run("train", "--out", out, "--dataset", name, "--data-root", root, "--split", split,
                 "--semantic-steps", "1", "--instance-steps", "1")
    assert result.exit_code == 0, result.output
    return out


def test_augmentation_moves_file_detections_with_the_image():
    sample = dict(SyntheticScenes(size=1, image_size=(48, 64), seed=0)[0])
    sample["detections"] = {"boxes": sample["boxes"].copy(), "labels": sample["labels"].copy(),
                            "scores": np.ones(len(sample["labels"]), np.float32)}
    for seed in range(6):  # scales, crops and mirrors of both kinds
        config = TrainConfig(scale_range=(0.6, 1.4), crop=(40, 40), mirror=True)
        moved = augment(sample, config, np.random.default_rng(seed))
        height, width = moved["image"].shape[1:]
        boxes = moved["detections"]["boxes"]
        assert boxes.shape[1] == 4 and (boxes[:, 2] <= width - 1).all() and (boxes[:, 3] <= height - 1).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        # a detection that was an object's box is still that object's box, to within the resampling
        for box in moved["boxes"].numpy():
            assert np.abs(boxes - box).max(axis=1).min() <= 2.0


def test_a_mirrored_detection_covers_the_mirror_image_of_its_pixels():
    image = np.zeros((4, 10, 3), np.uint8)
    sample = {"image": image, "semantic": np.zeros((4, 10), np.int64), "masks": np.zeros((0, 4, 10), bool),
              "labels": np.zeros(0, np.int64), "boxes": np.zeros((0, 4), np.float32),
              "detections": {"boxes": np.array([[2.5, 0.0, 5.5, 3.0]], np.float32), "labels": np.array([1]),
                             "scores": np.array([0.9], np.float32)}}
    columns = lambda moved: tuple(range(int(moved["detections"]["boxes"][0, 0]),
                                        int(moved["detections"]["boxes"][0, 2]) + 1))
    seen = {columns(augment(sample, TrainConfig(scale_range=(1.0, 1.0), mirror=True), np.random.default_rng(seed)))
            for seed in range(8)}  # the coin mirrors some of them
    assert seen == {(2, 3, 4, 5), (4, 5, 6, 7)}  # the pixels 2.5..5.5 covers, or their mirror images 9 - x


def test_training_keeps_the_file_detections_deployment_keeps():
    detections = {"boxes": np.array([[9.5, 0, 12, 3], [-3, 0, -0.5, 3], [-3, 0, 0.5, 3]], np.float32),
                  "labels": np.array([1, 1, 1]), "scores": np.full(3, 0.9, np.float32)}
    kept = inside_image(detections, 10, 10)
    with pytest.warns(DetectionsDroppedWarning):
        deployed = check_detections(detections["boxes"], detections["labels"], detections["scores"], height=10,
                                    width=10, num_classes=1, max_detections=3)
    assert kept["boxes"].tolist() == deployed.boxes.tolist() == [[9, 0, 9, 3], [0, 0, 0, 3]]


def test_the_live_display_shows_loss_throughput_and_time_left_on_a_terminal():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    progress = LiveProgress("semantic", 4, 0, images_per_step=2, console=console)
    for step in range(1, 5):
        progress.update(step, 0.5 / step)
    progress.close()
    text = screen.getvalue()
    assert "semantic" in text and "4/4" in text and "loss 0.1250" in text
    assert re.search(r"\d+\.\d images/s  eta 0s", text), text


# ---------------------------------------------------------------------------------------- bad arguments


def _fails_naming(result, *words: str) -> None:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a message, not a crash
    message = " ".join(re.sub(r"[\u2500-\u257f]", " ", result.output).split())
    for word in words:
        assert word in message, message


def test_an_interrupted_run_leaves_stage_1_knowing_what_it_was_trained_on(tmp_path, monkeypatch):
    from dynseg.trainer import train as training
    from dynseg.trainer.checkpoint import read_training_data
    from dynseg.trainer.model import ModelConfig, build_model

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "initialise_templates", interrupted)  # between the two stages
    scenes = SyntheticScenes(size=2, image_size=(48, 64), seed=4)
    model = build_model(ModelConfig(backbone="resnet18", class_names=tuple(scenes.class_names[1:])))
    with pytest.raises(KeyboardInterrupt):
        training.fit(model, scenes, out_dir=tmp_path / "run", semantic=TrainConfig(stage="semantic", steps=1),
                     instance=TrainConfig(stage="instance", steps=1), printer=lambda _: None,
                     training_data={"dataset": "synthetic", "seed": 4, "image_size": (48, 64)})
    assert read_training_data(tmp_path / "run" / "semantic") == {"dataset": "synthetic", "seed": 4,
                                                                 "image_size": [48, 64]}
    assert read_training_data(tmp_path / "run") is None  # stage 2 wrote no checkpoint
    with pytest.raises(InvalidArgumentError, match=r"training_data: seed -1"):  # refused before any training
        training.fit(model, scenes, out_dir=tmp_path / "other", semantic=TrainConfig(stage="semantic", steps=1),
                     instance=TrainConfig(stage="instance", steps=1), printer=lambda _: None,
                     training_data={"dataset": "synthetic", "seed": -1, "image_size": (48, 64)})
    assert not (tmp_path / "other").exists()


def test_held_out_images_from_the_training_split_are_trained_on_and_said_to_be(tmp_path):
    root = write_voc(tmp_path / "voc")  # holds the val split alone
    result = run("train", "--out", tmp_path / "run", "--dataset", "voc", "--data-root", root, "--split", "val",
                 "--held-out-images", "1", "--semantic-steps", "1", "--instance-steps", "1")
    assert result.exit_code == 0, result.output
    assert "held-out images come from the training split val" in " ".join(result.output.split())


def test_training_for_no_steps_at_all_says_the_checkpoint_is_untrained(tmp_path):
    result = run("train", "--out", tmp_path / "run", *SYNTHETIC, "--semantic-steps", "0", "--instance-steps", "0")
    assert result.exit_code == 0, result.output
    assert "the checkpoint will hold the untrained network" in " ".join(result.output.split())


def test_training_on_images_without_objects_says_stage_2_learnt_nothing(tmp_path):
    from dataset_fixtures import voc_maps

    root = write_voc(tmp_path / "voc")
    empty = next(image_id for image_id, _, objects in voc_maps() if not objects.any())
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{empty}\n")
    result = run("train", "--out", tmp_path / "run", "--dataset", "voc", "--data-root", root, "--split", "val", *TINY)
    assert result.exit_code == 0, result.output
    assert "stage 2 drew no image with a ground-truth instance in its 2 steps" in " ".join(result.output.split())


@pytest.mark.parametrize("record, problem", [
    ('{"dataset": "synthetic", "seed": -5, "image_size": [48, 64]}', "seed -5"),
    ('{"dataset": "synthetic", "seed": 9223372036854775807, "image_size": [48, 64]}',
     "seed 9223372036854775807"),  # MAX_SEED + 1
    ('{"dataset": "synthetic", "seed": 1, "image_size": [0, 64]}', "image_size [0, 64]"),
    ('{"dataset": "imagenet", "seed": 1, "image_size": [48, 64]}', "dataset 'imagenet'"),
    ('{"dataset": "voc", "seed": 1, "image_size": [48, 64], "split": 3}', "split 3"),
    ('{"dataset": "synthetic", "seed": 1}', "no image_size for synthetic scenes"),
])
def test_a_training_data_record_out_of_range_is_named_not_blamed_on_an_option(tmp_path, record, problem):
    from dynseg.trainer.checkpoint import TRAINING_DATA

    (tmp_path / TRAINING_DATA).write_text(record)
    _fails_naming(run("eval", tmp_path), f"{tmp_path / TRAINING_DATA} is malformed ({problem})")


@pytest.mark.parametrize("command, option", [("train", "--images"), ("train", "--held-out-images"),
                                             ("eval", "--images")])
def test_an_image_count_past_what_a_dataset_can_hold_is_named_as_the_option(tmp_path, command, option):
    target = ["--out", tmp_path / "run"] if command == "train" else [tmp_path]
    _fails_naming(run(command, *target, option, str(2**63)), option, "9223372036854775807")  # the limit


def test_an_unknown_dataset_is_named_in_the_error(tmp_path):
    _fails_naming(run("train", "--out", tmp_path, "--dataset", "imagenet"), "--dataset", "imagenet", "voc")
    # not the synthetic scenes' options that came with it
    _fails_naming(run("train", "--out", tmp_path, "--dataset", "imagenet", "--images", "2"), "--dataset",
                  "'imagenet' is not one of")
    _fails_naming(run("eval", tmp_path, "--dataset", "imagenet", "--images", "2"), "--dataset",
                  "'imagenet' is not one of")


def test_an_unknown_backbone_is_named_as_the_option(tmp_path):
    _fails_naming(run("train", "--out", tmp_path, "--backbone", "foo"), "--backbone", "'foo'", "resnet18")


def test_an_on_disk_dataset_without_a_data_root_is_refused(tmp_path):
    _fails_naming(run("train", "--out", tmp_path, "--dataset", "voc"), "--data-root")
    _fails_naming(run("train", "--out", tmp_path, "--dataset", "voc", "--data-root", tmp_path / "nowhere"),
                  "--data-root", "does not exist")


def test_synthetic_scene_options_are_refused_for_an_on_disk_dataset_rather_than_dropped(tmp_path):
    root = write_voc(tmp_path / "voc")
    on_disk = ["--dataset", "voc", "--data-root", root, "--split", "val"]
    _fails_naming(run("train", "--out", tmp_path / "run", *on_disk, "--images", "4"), "--images", "synthetic")
    _fails_naming(run("train", "--out", tmp_path / "run", *on_disk, "--image-size", "48", "64"), "--image-size")
    _fails_naming(run("eval", tmp_path, *on_disk, *SYNTHETIC), "--images and --image-size", "--dataset voc")
    out = tmp_path / "voc-run"  # eval's dataset from the checkpoint's training_data.json, named as such
    assert run("train", "--out", out, *on_disk, *TINY).exit_code == 0
    _fails_naming(run("eval", out, "--data-root", root, "--images", "5"), "voc, the dataset", "training_data.json")
    assert not (tmp_path / "run").exists()


def test_a_data_root_without_the_dataset_names_the_root_and_the_split(tmp_path):
    result = run("train", "--out", tmp_path / "run", "--dataset", "sbd", "--data-root", tmp_path)
    _fails_naming(result, "--data-root", "--split train", "train.txt")
    assert not (tmp_path / "run").exists()


def test_an_infinite_learning_rate_and_a_huge_image_size_are_named(tmp_path):
    _fails_naming(run("train", "--out", tmp_path / "run", *SYNTHETIC, "--lr", "inf"), "--lr", "finite")
    _fails_naming(run("train", "--out", tmp_path / "run", *SYNTHETIC, "--lr", "nan"), "--lr", "finite")
    _fails_naming(run("train", "--out", tmp_path / "run", "--image-size", "100000", "100000"), "--image-size",
                  "32..4096")
    _fails_naming(run("train", "--out", tmp_path / "run", *SYNTHETIC, "--held-out-split", "val"), "--held-out-split")
    assert not (tmp_path / "run").exists()


def test_a_held_out_split_without_held_out_images_is_refused_for_an_on_disk_dataset(tmp_path):
    root = write_voc(tmp_path / "voc")
    result = run("train", "--out", tmp_path / "run", "--dataset", "voc", "--data-root", root, "--split", "val", *TINY,
                 "--held-out-split", "val")
    _fails_naming(result, "--held-out-split", "--held-out-images N")
    assert not (tmp_path / "run").exists()


class _Stop(Exception):
    """Raised by a stand-in to end a command once it has shown what the test looks at."""


def test_training_scores_held_out_scenes_drawn_with_the_next_seed(tmp_path, monkeypatch):
    import dynseg.trainer.train as train_module

    def fit(model, data, *, held_out, eval_seed, **_):
        raise _Stop(data, held_out, eval_seed)

    monkeypatch.setattr(train_module, "fit", fit)
    result = run("train", "--out", tmp_path / "run", *SYNTHETIC, "--seed", "5", "--held-out-images", "2")
    assert isinstance(result.exception, _Stop), result.output
    data, held_out, eval_seed = result.exception.args
    assert data.seed == 5 and held_out.dataset.seed == 6 and eval_seed == 6


def test_quickstart_scores_held_out_scenes_drawn_with_the_next_seed(tmp_path, monkeypatch):
    import dynseg.trainer.data.synthetic as synthetic
    import dynseg.trainer.model as model_module
    import dynseg.trainer.train as train_module
    from dynseg.sdk.commands import quickstart

    made = []

    class Recorded(synthetic.SyntheticScenes):
        def __init__(self, **arguments):
            super().__init__(**arguments)
            made.append(self)

    def predict(model, dataset, *, seed):
        raise _Stop(dataset, seed)

    monkeypatch.setattr(synthetic, "SyntheticScenes", Recorded)
    monkeypatch.setattr(model_module, "build_model", lambda config, **_: None)
    monkeypatch.setattr(train_module, "fit", lambda *_, **__: None)
    monkeypatch.setattr(train_module, "predict", predict)
    with pytest.raises(_Stop) as stopped:
        quickstart.run(tmp_path / "quickstart", steps=2, seed=5, printer=lambda *_: None)
    held_out, seed = stopped.value.args
    assert [scenes.seed for scenes in made] == [5, 6] and held_out is made[1] and seed == 6


def test_a_missing_detections_file_is_named(tmp_path):
    _fails_naming(run("train", "--out", tmp_path, *SYNTHETIC, "--detections", tmp_path / "dets.json"),
                  "--detections", "does not exist")


def test_a_pipe_as_the_detections_file_is_named_as_one_not_read(tmp_path):
    os.mkfifo(tmp_path / "dets.json")  # nothing writes to it: a read would block for good
    _fails_naming(run("train", "--out", tmp_path / "run", *SYNTHETIC, "--detections", tmp_path / "dets.json"),
                  "--detections", "is a pipe or device, not a regular file")


@pytest.mark.parametrize("content, words", [
    ("{not json", ["not valid JSON"]),
    ('{"image_id": 0}', ["JSON list"]),
    ('[{"image_id": 0, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}]', ["entry 0", "bbox"]),
    ('[{"image_id": 0, "category_id": 9, "bbox": [1, 2, 3, 4], "score": 0.5}]', ["category_id 9", "1..4"]),
    ('[{"image_id": "2007_000032", "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]', ["no detection"]),
    # a string id is no int id: both are shown as Python writes them
    ('[{"image_id": "0", "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]',
     ["no detection belongs to an image of the dataset (the dataset's image ids are such as 0, 1, 2; the file's are "
      "such as '0'"]),
    ("[]", ["the file holds no entry"]),
    ("[" * 100_000 + "]" * 100_000, ["not valid JSON"]),  # Python's parser recurses: RecursionError
    ('[{"image_id": ' + "9" * 5000 + "}]", ["not valid JSON"]),  # over the 4300-digit int limit: ValueError
])
def test_a_malformed_detections_file_is_named_with_what_is_wrong(tmp_path, content, words):
    detections = tmp_path / "dets.json"
    detections.write_text(content)
    _fails_naming(run("train", "--out", tmp_path / "run", *SYNTHETIC, *TINY, "--detections", detections),
                  "--detections", *words)
    assert not (tmp_path / "run").exists()


def test_stage_two_learns_at_a_twentieth_of_the_learning_rate_given(tmp_path):
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), "--images", "2", "--image-size", "48",
                                      "64", "--semantic-steps", "0", "--instance-steps", "0", "--lr", "0.04"])
    assert result.exit_code == 0, result.output
    semantic = json.loads((tmp_path / "run" / "semantic" / "train_config.json").read_text())
    instance = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (semantic["stage"], instance["stage"]) == ("semantic", "instance")
    assert defaults.INSTANCE_LR_DIVISOR == 20
    assert semantic["learning_rate"] == pytest.approx(0.04)
    assert instance["learning_rate"] == pytest.approx(0.04 / 20)


def test_an_out_folder_a_file_blocks_is_named_before_the_data_is_made(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "semantic").write_text("not stage 1's checkpoint")
    result = run("train", "--out", tmp_path / "run", *SYNTHETIC, *TINY)
    _fails_naming(result, "--out", "semantic is a file, not a folder")
    assert "training on" not in result.output


def test_a_pipe_as_the_pretrained_weights_or_the_training_record_is_named_not_read(tmp_path):
    from dynseg.trainer.checkpoint import TRAINING_DATA

    os.mkfifo(tmp_path / "weights.pth")  # nothing writes to it: a read would block for good
    _fails_naming(run("train", "--out", tmp_path / "run", *SYNTHETIC, *TINY, "--pretrained", tmp_path / "weights.pth"),
                  "weights.pth is a pipe or device, not a regular file")
    os.mkfifo(tmp_path / TRAINING_DATA)
    _fails_naming(run("eval", tmp_path), f"{TRAINING_DATA} is a pipe or device, not a regular file")


@pytest.mark.parametrize("content, why", [(b"", "it is empty"), (b"not a zip", "UnpicklingError: ")])
def test_pretrained_weights_that_are_no_state_dict_say_why(tmp_path, content, why):
    (tmp_path / "weights.pth").write_bytes(content)
    _fails_naming(run("train", "--out", tmp_path / "run", *SYNTHETIC, *TINY, "--pretrained", tmp_path / "weights.pth"),
                  "weights.pth: cannot be read as a torch state_dict", f"(resnet18-f37072fd.pth): {why}")


def test_a_stage_1_that_diverged_in_its_last_step_is_named_at_stage_2s_first(tmp_path):
    # stage 1's one update leaves finite weights whose outputs overflow: the CRF's refusal alone said nothing
    result = run("train", "--out", tmp_path / "run", "--images", "2", "--image-size", "48", "64",
                 "--semantic-steps", "1", "--instance-steps", "1", "--lr", "1e30")
    _fails_naming(result, "stage 2's first step", "stage 1 diverged: lower the learning rate")
