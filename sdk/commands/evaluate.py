"""`dynseg eval`: scores a model, a training checkpoint or an exported one, through `Segmenter.segment`
on a dataset's images and their detections (`dynseg.trainer.train.predict_each`), with the trainer's
metrics (`dynseg.trainer.evaluation.evaluate_each`), one image's masks in memory at a time. Needs torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .infer import keep_most_confident

if TYPE_CHECKING:
    from ..results import SegmentationResult
    from ..segmenter import Segmenter


def run(segmenter: Segmenter, data: Any, *, seed: int, protocol: str) -> tuple[dict, int]:
    """The metrics of `segmenter` on the dataset `data` (its own detections, or simulated ones seeded by
    `seed`), and how many images had more detections than the model takes (an export's
    `--max-detections`): each of those is scored with its most confident ones, as `dynseg infer
    --keep-top` keeps them, rather than refused."""
    from dynseg.trainer.evaluation import evaluate_each
    from dynseg.trainer.train import predict_each

    limit, trimmed = segmenter.max_detections, 0

    def segment(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> SegmentationResult:
        nonlocal trimmed
        if len(scores) > limit:
            trimmed += 1
            boxes, labels, scores = keep_most_confident(boxes, labels, scores, limit)
        return segmenter.segment(image, boxes, labels, scores)

    classes = len(segmenter.class_names)
    metrics = evaluate_each(predict_each(segment, data, seed=seed, num_classes=classes), num_classes=classes,
                            protocol=protocol)
    return metrics, trimmed
