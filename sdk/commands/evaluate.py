"""`dynseg eval`: scores a model, a training checkpoint or an exported one, through `Segmenter.segment`
on a dataset's images and their detections (`dynseg.trainer.train.predict_each`), with the trainer's
metrics (`dynseg.trainer.evaluation.evaluate_each`), one image's masks in memory at a time. Needs torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError
from ..graph import ENGINE_SUFFIXES, metadata_of
from .infer import keep_most_confident
from .progress import ItemProgress, shown

if TYPE_CHECKING:
    from ..results import SegmentationResult
    from ..segmenter import Segmenter


def training_data_of(model: Path) -> dict | None:
    """What an exported model records it was trained on (`dynseg export` copies the checkpoint's
    training_data.json into the ONNX metadata, and an engine's sidecar copies that), or None where it
    records nothing. InvalidArgumentError naming the file for a record that is malformed."""
    from dynseg.trainer.checkpoint import check_training_data

    if model.suffix in ENGINE_SUFFIXES:
        from ..tensorrt_engine import read_sidecar

        record = read_sidecar(model).get("training_data")
    else:
        import onnx

        if not model.is_file():  # a pipe would block the read: the Segmenter that opens it next names it
            return None
        try:
            proto = onnx.load(str(model), load_external_data=False)
        except Exception:  # no model at all: the Segmenter that opens it next names the file
            return None
        metadata = metadata_of(proto)
        try:
            record = json.loads(metadata["training_data"]) if "training_data" in metadata else None
        except ValueError as error:
            raise InvalidArgumentError(f"{model}: its training_data metadata is not JSON ({error}); export it "
                                       "again") from None
    if record is not None:
        try:
            check_training_data(record)
        except InvalidArgumentError as error:
            raise InvalidArgumentError(f"{model}: {error}; export it again") from None
    return record


def run(segmenter: Segmenter, data: Any, *, seed: int, protocol: str,
        progress: Callable[[int], ItemProgress] | None = None) -> tuple[dict, int]:
    """The metrics of `segmenter` on the dataset `data` (its own detections, or simulated ones seeded by
    `seed`), and how many images had more detections than the model takes (an export's
    `--max-detections`): each of those is scored with its most confident ones, as `dynseg infer
    --keep-top` keeps them, rather than refused. `progress(total)` makes the display, updated after
    each image."""
    from dynseg.trainer.evaluation import evaluate_each
    from dynseg.trainer.train import predict_each

    limit, trimmed, done = segmenter.max_detections, 0, 0
    classes = len(segmenter.class_names)
    with shown(progress, len(data)) as update:

        def segment(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                    scores: np.ndarray) -> SegmentationResult:
            nonlocal trimmed, done
            if len(scores) > limit:
                trimmed += 1
                boxes, labels, scores = keep_most_confident(boxes, labels, scores, limit)
            result = segmenter.segment(image, boxes, labels, scores)
            done += 1
            update(done, f"image {done - 1}")  # its index in the dataset
            return result

        metrics = evaluate_each(predict_each(segment, data, seed=seed, num_classes=classes), num_classes=classes,
                                protocol=protocol)
    return metrics, trimmed
