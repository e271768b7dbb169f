"""`dynseg quickstart`: the whole path from training to deployment in one command, CPU-sized.

1. trains the resnet18 network on the built-in synthetic scenes (dynseg.trainer.train.fit; `steps` in
   all, split 6:1 between stage 1 (semantic) and stage 2 (instance), the ratio of `dynseg train`'s
   defaults);
2. evaluates it on held-out synthetic scenes with simulated detections (metrics.json, metrics.md);
3. exports ONNX (model.onnx);
4. validates the export against the checkpoint (parity.md; `parity` module);
5. segments held-out synthetic scenes and the shipped coffee photo with hand-drawn boxes with the
   exported model (overlays/), and leaves those images (images/) and their detections as a COCO
   results file (detections.json), on which `dynseg infer` and `dynseg validate` run as they are.

Needs torch (imported when it runs). The default, 1400 steps, took 7 to 19 min on the 2-core VMs
it was measured on (docs/deploy.md has the runs).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..coco_detections import results_entries
from ..errors import DetectionsDroppedWarning, InvalidArgumentError
from ..files import write_png_whole, write_text_whole
from . import defaults, parity
from .images import ImageDetections

DEFAULT_STEPS = 1400
NUM_CLASSES = 4
HELD_OUT_IMAGES, SEGMENTED_SCENES = 20, 3

# The coffee photo (500x375) with boxes drawn by hand: xyxy inclusive pixels, and a class for each. The
# quickstart model knows synthetic shapes only, so the classes are stand-ins ("disc" for round things);
# the instances still follow the boxes and the photo's edges, which is what the CRF contributes.
PHOTO = "coffee"
PHOTO_BOXES = np.array([[118, 5, 362, 300],  # the cup
                        [25, 55, 432, 372],  # the saucer
                        [270, 52, 378, 315]], np.float32)  # the spoon
PHOTO_LABELS = np.array([1, 1, 2], np.int64)
PHOTO_SCORES = np.array([0.95, 0.9, 0.8], np.float32)


@dataclass
class QuickstartSummary:
    out: Path
    checkpoint: Path
    model: Path
    metrics: dict
    parity: parity.ParityReport
    files: list[Path] = field(default_factory=list)

    @property
    def images(self) -> list[Path]:
        """The images it segmented, as files (images/), whose detections are detections.json's."""
        return [path for path in self.files if path.parent == self.out / "images"]


def split_steps(steps: int) -> tuple[int, int]:
    """(stage 1 steps, stage 2 steps) of `steps` >= 2 in all, 6:1, each at least 1."""
    semantic = min(max(round(steps * 6 / 7), 1), steps - 1)
    return semantic, steps - semantic


def run(out: str | Path, *, steps: int = DEFAULT_STEPS, seed: int = 0, printer: Callable[[str], object] = print,
        live: bool = False) -> QuickstartSummary:
    """Runs the five steps of the module docstring into `out`; returns what it made."""
    import torch

    from dynseg.export.onnx import export_onnx
    from dynseg.trainer.checkpoint import read_training_data
    from dynseg.trainer.data.detections import simulate_detections
    from dynseg.trainer.data.synthetic import SyntheticScenes
    from dynseg.trainer.evaluation import evaluate, write_metrics
    from dynseg.trainer.model import ModelConfig, build_model
    from dynseg.trainer.train import TrainConfig, fit, predict

    from ..segmenter import Segmenter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, overlays, images = out / "checkpoint", out / "overlays", out / "images"
    for folder in (checkpoint, overlays, images):  # now: a file in the way fails the run here, not after its training
        if folder.exists() and not folder.is_dir():
            raise InvalidArgumentError(f"{folder} is a file, not a folder: quickstart writes into it")
        folder.mkdir(exist_ok=True)
    semantic_steps, instance_steps = split_steps(steps)

    printer(f"1/5 training the resnet18 network on {defaults.TRAIN_IMAGES} synthetic scenes: {semantic_steps} "
            f"semantic + {instance_steps} instance steps")
    torch.manual_seed(seed)
    data = SyntheticScenes(size=defaults.TRAIN_IMAGES, image_size=defaults.IMAGE_SIZE, num_classes=NUM_CLASSES,
                           seed=seed)
    model = build_model(ModelConfig(backbone="resnet18", class_names=tuple(data.class_names[1:])))
    fit(model, data, out_dir=checkpoint,
        semantic=TrainConfig(stage="semantic", steps=semantic_steps, learning_rate=defaults.LEARNING_RATE,
                             seed=seed),
        instance=TrainConfig(stage="instance", steps=instance_steps,
                             learning_rate=defaults.LEARNING_RATE / defaults.INSTANCE_LR_DIVISOR, seed=seed),
        printer=printer, live=live,
        training_data={"dataset": "synthetic", "seed": seed, "image_size": defaults.IMAGE_SIZE})

    printer(f"2/5 evaluating on {HELD_OUT_IMAGES} held-out scenes (seed {seed + 1}, simulated detections)")
    held_out = SyntheticScenes(size=HELD_OUT_IMAGES, image_size=defaults.IMAGE_SIZE, num_classes=NUM_CLASSES,
                               seed=seed + 1)
    metrics = evaluate(*predict(model, held_out, seed=seed + 1), num_classes=NUM_CLASSES)
    metric_files = write_metrics(out, metrics, f"{checkpoint}: {HELD_OUT_IMAGES} held-out synthetic scenes (seed "
                                                  f"{seed + 1}), simulated detections, protocol original, values in %")

    printer("3/5 exporting ONNX")
    model_path = export_onnx(model, out / "model.onnx", training_data=read_training_data(checkpoint))

    # Cases for the last two steps: held-out scenes with simulated detections, and the photo.
    cases: list[tuple[str, np.ndarray, ImageDetections]] = []
    for index in range(SEGMENTED_SCENES):
        sample = held_out[index]
        simulated = simulate_detections(sample["boxes"], sample["labels"], image_size=sample["image"].shape[:2],
                                        rng=np.random.default_rng([seed + 1, index]), num_classes=NUM_CLASSES)
        cases.append((f"scene_{index}", sample["image"], ImageDetections(index, simulated["boxes"],
                                                                         simulated["labels"], simulated["scores"])))
    from .. import samples

    cases.append((PHOTO, samples.load(PHOTO), ImageDetections(PHOTO, PHOTO_BOXES, PHOTO_LABELS, PHOTO_SCORES)))

    printer("4/5 validating the export against the checkpoint (onnxruntime vs PyTorch)")
    segmenter = Segmenter(model_path, backend="onnxruntime")
    report = parity.validate(segmenter, Segmenter(checkpoint, backend="torch"), cases)
    write_text_whole(out / "parity.md", report.table() + "\n")

    printer("5/5 segmenting the held-out scenes and the coffee photo with the exported model")
    files = [checkpoint, model_path, *metric_files, out / "parity.md"]
    entries = []
    for name, image, dets in cases:
        write_png_whole(images / f"{name}.png", image)  # for the commands it suggests next
        files.append(images / f"{name}.png")
        entries += results_entries(name, dets.boxes, dets.labels, dets.scores)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DetectionsDroppedWarning)
            result = segmenter.segment(image, dets.boxes, dets.labels, dets.scores)
        # Scenes are small (96x120): shown beside the input at 3x, nearest-neighbour.
        picture = np.concatenate([image, result.overlay()], axis=1)
        if picture.shape[0] < 200:
            picture = picture.repeat(3, axis=0).repeat(3, axis=1)
        write_png_whole(overlays / f"{name}.png", picture)
        files.append(overlays / f"{name}.png")
    files.append(write_text_whole(out / "detections.json", json.dumps(entries, indent=1) + "\n"))
    return QuickstartSummary(out=out, checkpoint=checkpoint, model=model_path, metrics=metrics, parity=report,
                             files=files)
