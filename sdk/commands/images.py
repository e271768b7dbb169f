"""Which detections go with which image: read from a detector's COCO results file, or generated.

A results file is the format `dynseg train --detections` reads (`dynseg.sdk.coco_detections`, which
needs no torch): a JSON list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"}. For image
files the `image_id` names the file by its stem, the convention of the VOC and SBD loaders:

- a string image_id matches the file whose name without extension equals it ("2007_000032" ->
  2007_000032.jpg);
- an integer image_id N matches the file whose stem is the number N written in decimal, leading
  zeros allowed (COCO's file names: 139 -> 000000000139.jpg).

category_id is the model's class id 1..K. Images without an entry get no detections (D = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..coco_detections import detections_by_image, read_coco_results, refuse_normalised_boxes
from ..errors import InvalidArgumentError
from ..files import check_regular_file


class ImageDetections(NamedTuple):
    """One image's detections: boxes float32 (D, 4) xyxy inclusive pixels, labels int64 (D,) in 1..K,
    scores float32 (D,); `image_id` is the id the results file names the image by (stem or int)."""

    image_id: int | str
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray


def image_ids(path: Path) -> list[int | str]:
    """The ids a results file may name the image file `path` by: its stem, and the stem's integer
    value when the stem is all digits."""
    stem = path.stem
    return [stem, int(stem)] if stem.isascii() and stem.isdigit() else [stem]


def read_detections(results: str | Path, images: Sequence[str | Path]) -> list[ImageDetections]:
    """The detections of each image file in `images` from the COCO results file `results` (see the
    module docstring), in the order of `images`; detections sorted by descending score.

    Raises InvalidArgumentError naming the file: not a readable results file (the entry at fault
    named), two images one image_id names (the same stem, or 1 and 01), or entries that match none of
    the images (a file for other images).
    """
    results = Path(results)
    check_regular_file(results, "detections file")
    paths = [Path(p) for p in images]
    named: dict[int | str, Path] = {}
    for path in paths:
        for image_id in image_ids(path):
            if image_id in named:  # the same stem, or stems such as 1 and 01 that read as one integer id
                raise InvalidArgumentError(f"images {named[image_id]} and {path} both answer to image_id "
                                           f"{image_id!r}: a results file could not tell them apart")
            named[image_id] = path
    wanted = [image_id for path in paths for image_id in image_ids(path)]
    try:
        entries = read_coco_results(results)
    except OSError as error:  # read_coco_results names a malformed file itself
        raise InvalidArgumentError(f"detections file {results} could not be read: {error}") from error
    found = detections_by_image(entries, wanted)
    out = []
    for path in paths:
        parts = [found[image_id] for image_id in image_ids(path)]
        scores = np.concatenate([p["scores"] for p in parts])
        order = np.argsort(-scores, kind="stable")
        out.append(ImageDetections(
            image_id=image_ids(path)[-1] if len(parts[-1]["scores"]) else path.stem,
            boxes=np.concatenate([p["boxes"] for p in parts]).reshape(-1, 4)[order],
            labels=np.concatenate([p["labels"] for p in parts])[order],
            scores=scores[order],
        ))
    refuse_normalised_boxes(results, np.concatenate([d.boxes for d in out]))
    if entries and not any(len(d.scores) for d in out):
        shown = ", ".join(repr(image_ids(p)[-1]) for p in paths[:3])
        raise InvalidArgumentError(f"detections file {results}: none of its {len(entries)} detections names one of the "
                                   f"images (image_id is the file's stem, or its number, such as {shown})")
    return out


def generated_detections(height: int, width: int, count: int, *, num_classes: int, seed: int) -> ImageDetections:
    """`count` deterministic boxes over a (height, width) image: random corners, each side up to half the
    image, classes uniform in 1..num_classes, scores in 0.05..1; the same arguments give the same boxes."""
    rng = np.random.default_rng([seed, height, width, count])
    x1 = rng.integers(0, max(width - 2, 1), count)
    y1 = rng.integers(0, max(height - 2, 1), count)
    x2 = np.minimum(width - 1, x1 + rng.integers(1, max(width // 2, 2), count))
    y2 = np.minimum(height - 1, y1 + rng.integers(1, max(height // 2, 2), count))
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32).reshape(-1, 4)
    return ImageDetections(image_id=seed, boxes=boxes, labels=rng.integers(1, num_classes + 1, count).astype(np.int64),
                           scores=rng.uniform(0.05, 1.0, count).astype(np.float32))


def _images(count: int) -> str:
    """"1 image has", "3 images have"."""
    return "1 image has" if count == 1 else f"{count} images have"


def check_detection_counts(counts: Sequence[tuple[str, int]], limit: int, where: str, remedy: str) -> None:
    """Raises InvalidArgumentError naming the images (the first five) whose detection count, of the
    (image name, count) pairs, exceeds the model's `limit`; `where` says where the detections came from
    and `remedy` what the caller can do besides re-exporting."""
    over = [f"{name} ({count})" for name, count in counts if count > limit]
    if over:
        raise InvalidArgumentError(
            f"{_images(len(over))} more detections{where} than this model's limit of {limit}: "
            f"{', '.join(over[:5])}{' (the first five)' if len(over) > 5 else ''}; {remedy} or re-export with a "
            "larger --max-detections")


def check_detection_labels(labels: Sequence[tuple[str, np.ndarray]], num_classes: int, where: str) -> None:
    """Raises InvalidArgumentError naming the images (the first five) whose detections, of the (image
    name, labels) pairs, hold a class id outside the model's 1..num_classes, so that a run stops before
    it segments anything rather than at the first such image."""
    bad = [f"{name} ({sorted({int(v) for v in ids if not 1 <= v <= num_classes})})"
           for name, ids in labels if len(ids) and (ids.min() < 1 or ids.max() > num_classes)]
    if bad:
        raise InvalidArgumentError(
            f"{_images(len(bad))} detections{where} of classes this model does not have "
            f"(it has 1..{num_classes}): "
            f"{', '.join(bad[:5])}{' (the first five)' if len(bad) > 5 else ''}")


SAMPLE_DETECTION_COUNTS = {"coffee": 7, "chelsea": 2, "astronaut": 1}
"""How many generated boxes each shipped photo gets when a command runs on the samples."""


def sample_cases(num_classes: int, max_detections: int) -> list[tuple[str, np.ndarray, ImageDetections]]:
    """(name, (H, W, 3) uint8 RGB photo, generated detections) for every shipped sample photo
    (dynseg.sdk.samples), with SAMPLE_DETECTION_COUNTS boxes each but at most the model's
    max_detections, seeded by the photo's position."""
    from .. import samples

    cases = []
    for seed, name in enumerate(samples.NAMES):
        image = samples.load(name)
        count = min(SAMPLE_DETECTION_COUNTS[name], max_detections)
        height, width = image.shape[:2]
        cases.append((name, image, generated_detections(height, width, count, num_classes=num_classes, seed=seed)))
    return cases
