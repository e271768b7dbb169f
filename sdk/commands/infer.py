"""`dynseg infer`: segment image files with a model, writing per image an overlay and an instance-id
PNG, and one COCO results file for all.

What it writes into `out`:

- `{stem}_overlay.png`: `SegmentationResult.overlay()`, the photo with each instance blended in its
  own colour and outlined (8-bit RGB).
- `{stem}_instances.png`: the instance map, a 16-bit grayscale PNG of the image's size; pixel value 0
  is background and i > 0 is the image's i-th instance, the i-th entry of that image in
  `results.json` (instances are numbered by descending detection score: `read_detections` sorts
  each image's detections so). Read it with
  `np.array(PIL.Image.open(path))`.
- `results.json`: COCO results, one entry per instance of every image (image_id as the detections
  file named the image, category_id, segmentation as compressed RLE, score, bbox of the mask).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DetectionsDroppedWarning, InvalidArgumentError
from ..files import write_png_whole, write_text_whole
from ..inputs import load_image
from .images import ImageDetections, check_detection_counts, check_detection_labels, read_detections
from .progress import ItemProgress, shown

if TYPE_CHECKING:
    from ..segmenter import Segmenter

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class InferSummary:
    images: int
    instances: int
    dropped: int  # detections that got no instance (refused boxes and those that won no pixel)
    results: Path  # the COCO results file


def most_confident(dets: ImageDetections, count: int) -> ImageDetections:
    """The `count` highest-scoring of an image's detections (ties: the earlier one), in their order."""
    if len(dets.scores) <= count:
        return dets
    boxes, labels, scores = keep_most_confident(dets.boxes, dets.labels, dets.scores, count)
    return dets._replace(boxes=boxes, labels=labels, scores=scores)


def keep_most_confident(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                        count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `count` highest-scoring of (D, 4) boxes, (D,) labels and (D,) scores (ties: the earlier one), in
    their order."""
    kept = np.sort(np.argsort(-np.asarray(scores), kind="stable")[:count])
    return boxes[kept], labels[kept], scores[kept]


def _refuse_overwriting_inputs(paths: Sequence[Path], detections: Path, out: Path) -> None:
    """Refuses, before anything is written, an output file that is one of the inputs: an image named
    x_overlay.png beside x.png, or a detections file named results.json, in the output folder would be
    overwritten before it is read."""
    inputs = {path.resolve(): f"one of the images to segment ({path})" for path in paths}
    inputs[detections.resolve()] = f"the detections file ({detections})"
    outputs = [(out / RESULTS_FILE, "")] + [(out / f"{path.stem}_{kind}.png", f" for {path.name}")
                                            for path in paths for kind in ("overlay", "instances")]
    for written, purpose in outputs:
        if written.resolve() in inputs:
            raise InvalidArgumentError(f"{written} would be written{purpose}, but it is {inputs[written.resolve()]}: "
                                       "give another --out folder")


def run(segmenter: Segmenter, images: Sequence[str | Path], detections: str | Path, out: str | Path, *,
        keep_top: int | None = None, progress: Callable[[int], ItemProgress] | None = None) -> InferSummary:
    """Segments every image file of `images` with `segmenter`, its
    detections read from the COCO results file `detections` (matched as dynseg.sdk.commands.images
    says; only each image's `keep_top` most confident when given), and writes the files the module
    docstring lists into `out`. `progress(total)` makes the display, updated after each image. Raises
    InvalidArgumentError naming the image or file at fault: before any image is segmented for the file
    and for images with more detections than the model takes or classes it does not have, else when the
    image is reached (nothing is written for images after it, and no results file: an earlier one in
    `out` is deleted before the first image)."""
    paths = [Path(p) for p in images]
    found = read_detections(detections, paths)  # checks the file before any image is segmented
    if keep_top is not None:
        found = [most_confident(dets, keep_top) for dets in found]
    check_detection_counts([(path.name, len(dets.boxes)) for path, dets in zip(paths, found)],
                           segmenter.max_detections, f" in {detections}",
                           "keep each image's most confident ones (dynseg infer --keep-top N)")
    check_detection_labels([(path.name, dets.labels) for path, dets in zip(paths, found)],
                           len(segmenter.class_names), f" in {detections}")
    out = Path(out)
    _refuse_overwriting_inputs(paths, Path(detections), out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).unlink(missing_ok=True)  # an earlier run's would pass for this one's if it failed
    entries, dropped = [], 0
    with shown(progress, len(paths)) as update:
        for done, (path, dets) in enumerate(zip(paths, found), start=1):
            image = load_image(path)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DetectionsDroppedWarning)  # counted in the summary instead
                    result = segmenter.segment(image, dets.boxes, dets.labels, dets.scores)
            except InvalidArgumentError as error:
                raise InvalidArgumentError(f"{path} (detections from {detections}): {error}") from None
            write_png_whole(out / f"{path.stem}_overlay.png", result.overlay())
            write_png_whole(out / f"{path.stem}_instances.png", result.instance_map.astype(np.uint16))
            entries += result.to_coco(dets.image_id)
            dropped += len(result.dropped)
            update(done, path.name)
    write_text_whole(out / RESULTS_FILE, json.dumps(entries))
    return InferSummary(images=len(paths), instances=len(entries), dropped=dropped, results=out / RESULTS_FILE)
