"""Reading a detector's COCO results file: the detections `dynseg infer` segments with, and a
trainer's dataset of real detections (`dynseg.trainer.data.sources`); and writing one
(`results_entries`, as the quickstart does for the images it leaves). numpy only, so the SDK reads
them without torch."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable
from typing import TypedDict

import numpy as np

from .errors import InvalidArgumentError
from .checks import finite_float32, is_int
from .files import check_regular_file
from .inputs import looks_normalised

__all__ = ["DetectorOutput", "detections_by_image", "load_coco_detections", "read_coco_results",
           "refuse_normalised_boxes", "results_entries"]


class DetectorOutput(TypedDict):
    """One image's detections, by descending score (file order among equal scores)."""

    boxes: np.ndarray  # float32 (D, 4) xyxy, inclusive image pixels
    labels: np.ndarray  # int64 (D,) class in 1..K
    scores: np.ndarray  # float32 (D,)


def load_coco_detections(path: str | os.PathLike, image_ids: Iterable[Hashable]) -> dict[Hashable, DetectorOutput]:
    """Read a COCO results-format JSON file: a list of {"image_id", "category_id", "bbox", "score"}.

    bbox is COCO's [x, y, w, h] in pixels; it becomes inclusive xyxy (x, y, x + w - 1, y + h - 1),
    float32, with x2 >= x1 kept for boxes narrower than a pixel. category_id is kept as the label
    (map it to 1..K yourself if the detector's ids differ). Every entry is validated, also those of
    images not asked for; entries of other images are then ignored.

    Returns:
        {image_id: DetectorOutput} for every requested id (empty arrays for ids without detections),
        each sorted by descending score (file order among equal scores).

    Raises:
        InvalidArgumentError (a ValueError): a path that is no readable file; image_ids a string (an
        iterable of its characters) or holding an id that cannot be looked up; and, naming the file and
        the entry index: not a JSON list,
        an entry that is not an object or lacks a key, an image_id that is not an int or str, a
        category_id that is not an int in 1..2**63-1, a bbox that is not 4 numbers finite in float32, a
        negative width or height or a far corner beyond float32, a score that is not a number >= 0 finite in
        float32 (NaN included).
    """
    return detections_by_image(read_coco_results(path), image_ids)


Entry = tuple[Hashable, int, list[float], float]
"""One detection of a results file: (image_id, category_id, inclusive xyxy box, score)."""


def results_entries(image_id: Hashable, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> list[dict]:
    """One image's detections, (D, 4) xyxy inclusive pixel boxes, labels and scores, as the entries of a
    COCO results file, which `read_coco_results` reads back to the same boxes: bbox [x, y, w, h] with
    w = x2 - x1 + 1 (the inclusive last column)."""
    return [{"image_id": image_id, "category_id": int(label),
             "bbox": [float(x1), float(y1), float(x2 - x1 + 1), float(y2 - y1 + 1)], "score": float(score)}
            for (x1, y1, x2, y2), label, score in zip(np.asarray(boxes, np.float64), labels, scores)]


def read_coco_results(path: str | os.PathLike) -> list[Entry]:
    """Every entry of a COCO results file, validated and converted as `load_coco_detections` says, in
    file order; raises as it does."""
    path = check_regular_file(path, "detections file")
    try:
        with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark, as Windows tools write, is no error
            entries = json.load(handle)
    except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, over-long integers, deep nesting
        raise InvalidArgumentError(f"{path}: not valid JSON in UTF-8 ({error})") from error
    if not isinstance(entries, list):
        kind = type(entries).__name__
        raise InvalidArgumentError(f"{path}: a COCO results file is a JSON list of detections, got {kind}")
    return [_parse_entry(entry, f"{path}: entry {index}") for index, entry in enumerate(entries)]


def detections_by_image(entries: Iterable[Entry], image_ids: Iterable[Hashable]) -> dict[Hashable, DetectorOutput]:
    """The entries of each of `image_ids` (empty arrays for ids without any), each sorted by descending
    score (file order among equal scores); entries of other images are ignored."""
    if isinstance(image_ids, (str, bytes)):
        raise InvalidArgumentError(f"image_ids must be a collection of ids, not the string {image_ids!r} "
                                   f"(one image: [{image_ids!r}])")
    if not isinstance(image_ids, Iterable):
        raise InvalidArgumentError(f"image_ids must be a collection of ids, got {type(image_ids).__name__}")
    ids = list(image_ids)
    for image_id in ids:
        if not isinstance(image_id, Hashable):
            raise InvalidArgumentError(f"image_ids holds {image_id!r}, which cannot be an id (not hashable)")
    wanted: dict[Hashable, tuple[list[list[float]], list[int], list[float]]] = {image_id: ([], [], []) for image_id in ids}
    for image_id, label, box, score in entries:
        if image_id in wanted:
            boxes, labels, scores = wanted[image_id]
            boxes.append(box)
            labels.append(label)
            scores.append(score)

    result: dict[Hashable, DetectorOutput] = {}
    for image_id, (boxes, labels, scores) in wanted.items():
        score_array = np.array(scores, np.float32)
        order = np.argsort(-score_array, kind="stable")
        result[image_id] = DetectorOutput(
            boxes=np.array(boxes, np.float32).reshape(-1, 4)[order],
            labels=np.array(labels, np.int64)[order],
            scores=score_array[order],
        )
    return result


def refuse_normalised_boxes(path: str | os.PathLike, boxes: np.ndarray) -> None:
    """InvalidArgumentError naming the results file `path` when its (D, 4) boxes, all its images' together,
    look normalised (`inputs.looks_normalised`)."""
    if looks_normalised(boxes):
        raise InvalidArgumentError(f"{path}: every bbox lies within [0, 1], in fractions of a pixel: normalised "
                                   "coordinates? A bbox is [x, y, width, height] in pixels from the image's "
                                   "top-left corner")


def _parse_entry(entry: object, where: str) -> Entry:
    if not isinstance(entry, dict):
        raise InvalidArgumentError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in ("image_id", "category_id", "bbox", "score"):
        if key not in entry:
            raise InvalidArgumentError(f"{where}: missing key {key!r}")
    image_id, category, bbox, score = entry["image_id"], entry["category_id"], entry["bbox"], entry["score"]
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        raise InvalidArgumentError(f"{where}: image_id must be an int or a string, got {image_id!r}")
    if not is_int(category) or not 1 <= category < 2**63:
        raise InvalidArgumentError(f"{where}: category_id must be an int >= 1 (0 is background), got {category!r}")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_int(v) or isinstance(v, float) for v in bbox):
        raise InvalidArgumentError(f"{where}: bbox must be [x, y, w, h], four numbers, got {bbox!r}")
    values = [value for value in map(finite_float32, bbox) if value is not None]
    if len(values) != 4:
        raise InvalidArgumentError(f"{where}: bbox must be finite float32 values, got {bbox!r}")
    x, y, w, h = values
    if w < 0 or h < 0:
        raise InvalidArgumentError(f"{where}: bbox has a negative size (w={w}, h={h})")
    x2, y2 = finite_float32(x + max(w - 1, 0.0)), finite_float32(y + max(h - 1, 0.0))
    if x2 is None or y2 is None:
        raise InvalidArgumentError(f"{where}: bbox's far corner (x + w - 1, y + h - 1) overflows float32, got {bbox!r}")
    finite_score = finite_float32(score)
    if finite_score is None or finite_score < 0:
        raise InvalidArgumentError(f"{where}: score must be a finite float32 number >= 0 (a confidence, not a logit), "
                                   f"got {score!r}")
    return image_id, int(category), [x, y, x2, y2], finite_score
