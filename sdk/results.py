"""What `Segmenter.segment` returns, and the post-processing every backend shares to make it.

Owns docs/algorithm.md §6 in numpy: `build_result` turns a backend's instance logits and semantic
probabilities into the instance map (argmax over the D+1 labels, values within
TIE_TOLERANCE x max(1, |largest|) of the largest tying, and a tie going to the background, else to the
most confident detection, else to the earliest; detections whose instance got no pixel dropped, the rest
renumbered 1..N in detection order), the semantic map and one `Instance` per instance, with its score
(the mean of Q_sem of its class over its pixels, the released code's ranking score). Also owns the
result's COCO export and its picture. numpy only (pycocotools for RLE, imported when an RLE is first
asked for): no torch.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidArgumentError
from .checks import finite_float32, int_in, is_int
from .inputs import Detections, DroppedDetection

__all__ = ["Instance", "SegmentationResult", "build_result", "instance_colours", "instance_winners"]

_GOLDEN = 0.618033988749895  # hue step: consecutive instances land far apart on the colour wheel
_OUTLINE_SHADE = 0.55  # outlines are the instance's colour darkened, drawn opaque


@dataclass(frozen=True, eq=False)
class Instance:
    """One segmented instance: the pixels one detection won.

    id: 1..N, its value in the result's instance_map (instances numbered in detection order).
    class_id: 1..K, its detection's label; class_name: the model's name for it.
    score: mean of Q_sem(class_id) over the instance's pixels, in 0..1.
    detection: index of its detection in the boxes/labels/scores the caller passed (dropped
        detections counted), so instance.detection == i means the caller's boxes[i].
    box: (x1, y1, x2, y2) ints, the tight box of the instance's pixels, inclusive (not the detection's
        box: the instance may cover less of it). COCO's bbox of the mask is (x1, y1, x2-x1+1, y2-y1+1).
    mask, rle: computed on first access and cached (see each), so results with many instances on large
        images cost no memory until asked (an RLE caches its counts, not a mask).
    """

    id: int
    class_id: int
    class_name: str
    score: float
    detection: int
    box: tuple[int, int, int, int]
    instance_map: np.ndarray = field(repr=False)  # (H, W) int32, the result's (shared, read-only)

    @property
    def mask(self) -> np.ndarray:
        """bool (H, W): True on the instance's pixels. Read-only, as it is cached: copy it to draw on it."""
        cached = self.__dict__.get("_mask")
        if cached is None:
            cached = self.instance_map == self.id
            cached.setflags(write=False)
            # by hand, not functools.cached_property: before Python 3.12 that locks one property of
            # every instance of the class at once, so threads segmenting separate images would queue
            cached = self.__dict__.setdefault("_mask", cached)
        return cached

    @property
    def rle(self) -> dict[str, Any]:
        """The mask in COCO's compressed RLE, a new {"size": [H, W], "counts": str} on every access, from
        pycocotools.mask.encode; counts decoded to str so the dict is JSON-ready (pycocotools' decode
        takes it as it is). Only the counts are cached, and asking for them caches no mask."""
        counts = self.__dict__.get("_rle_counts")
        if counts is None:
            try:
                from pycocotools import mask as coco_mask
            except ImportError as error:
                raise ModuleNotFoundError(
                    "Instance.rle and SegmentationResult.to_coco need pycocotools: pip install pycocotools"
                ) from error
            mask = self.__dict__.get("_mask")
            if mask is None:
                mask = self.instance_map == self.id
            counts = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
            counts = self.__dict__.setdefault("_rle_counts", counts)
        return {"size": list(self.instance_map.shape), "counts": counts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _restore_read_only(self, state, ("instance_map", "_mask"))


@dataclass(frozen=True, eq=False)
class SegmentationResult:
    """One image's segmentation. H, W: the image's size; N: instances.

    image: (H, W, 3) uint8 RGB, a copy of the image as segmented (for overlay(): a camera loop may
        reuse the buffer it passed in).
    instance_map: int32 (H, W); 0 = background, i = instances[i-1]. Labels whose logits are within
        TIE_TOLERANCE x max(1, |largest|) of a pixel's largest tie there, and the pixel goes to the
        background if it ties, else to the tying detection of the highest score (the earliest of equal
        scores; `instance_winners`). Detections of one class can tie exactly (in the unary, wherever only
        the global term speaks for them, outside their boxes), so without this rule the caller's order of
        the detections would move pixels; with it, the order changes no mask, only the numbers.
    semantic_map: int32 (H, W); argmax of the semantic probabilities (ties, with the same tolerance, to the
        lowest class), 0 = background, 1..K classes.
    instances: the N instances in detection order (ids 1..N).
    dropped: the caller's detections that got no instance, ascending by index, each with why: those
        check_detections refused (inverted, outside), and those that won no pixel.
    The three arrays are read-only, as the instances' cached masks are computed from instance_map.
    """

    image: np.ndarray = field(repr=False)
    instance_map: np.ndarray = field(repr=False)
    semantic_map: np.ndarray = field(repr=False)
    instances: list[Instance]
    dropped: list[DroppedDetection]

    def __setstate__(self, state: dict[str, Any]) -> None:
        _restore_read_only(self, state, ("image", "instance_map", "semantic_map"))

    def to_coco(self, image_id: int | str) -> list[dict[str, Any]]:
        """The instances in COCO's results format, one dict each: image_id (an int, as COCO's datasets
        number images, or a str, as VOC and SBD name them; `read_coco_results` takes both), category_id
        (= class_id; map it if your dataset numbers categories differently), segmentation (compressed
        RLE, counts as str), score, bbox ([x, y, w, h] floats of the mask, as pycocotools.mask.toBbox
        gives)."""
        if is_int(image_id):
            image_id = int(image_id)
        elif not isinstance(image_id, str):
            raise InvalidArgumentError(f"image_id must be an int or a str, got {image_id!r}")
        return [
            {
                "image_id": image_id,
                "category_id": instance.class_id,
                "segmentation": instance.rle,  # a new dict each time: the caller may edit it
                "score": instance.score,
                "bbox": _coco_bbox(instance.box),
            }
            for instance in self.instances
        ]

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """(H, W, 3) uint8 RGB picture: the image with each instance blended in its own colour
        (instance_colours) at opacity alpha in 0..1, and its outline (its pixels with a 4-neighbour
        outside it) drawn opaque in a darker shade. Background pixels are the image's own."""
        opacity = finite_float32(alpha)
        if opacity is None or not 0.0 <= opacity <= 1.0:
            raise InvalidArgumentError(f"alpha must be a number in 0..1, got {alpha!r}")
        colours = instance_colours(len(self.instances)).astype(np.float32)  # (N+1, 3), row 0 unused
        painted = colours[self.instance_map]  # (H, W, 3)
        picture = self.image.astype(np.float32)
        inside = self.instance_map > 0
        picture[inside] = (1.0 - opacity) * picture[inside] + opacity * painted[inside]
        edge = _outline(self.instance_map)
        picture[edge] = _OUTLINE_SHADE * painted[edge]
        return np.clip(np.rint(picture), 0, 255).astype(np.uint8)


def _restore_read_only(result: object, state: dict[str, Any], names: Sequence[str]) -> None:
    """A result's state after pickle or deepcopy, its arrays read-only again: numpy's copies come back
    writable, and a write would set the map apart from the masks cached from it."""
    result.__dict__.update(state)
    for name in names:
        if isinstance(state.get(name), np.ndarray):
            state[name].setflags(write=False)


def instance_colours(count: int) -> np.ndarray:
    """uint8 (count+1, 3) RGB: row i is instance i's colour (row 0, the background, black). Hues step
    by the golden ratio, so consecutive instances get well-separated colours; after rounding to 8 bits
    a hue comes round again now and then (the first repeat is at about 600 instances)."""
    count = int_in("count", count, 0)
    colours = np.zeros((count + 1, 3), np.uint8)
    for i in range(1, count + 1):
        colours[i] = np.rint(255 * np.array(colorsys.hsv_to_rgb((i * _GOLDEN) % 1.0, 0.7, 0.95)))
    return colours


def _outline(instance_map: np.ndarray) -> np.ndarray:
    """bool (H, W): instance pixels with a 4-neighbour of another id (the image border is no edge)."""
    edge = np.zeros(instance_map.shape, bool)
    vertical = instance_map[1:] != instance_map[:-1]  # (H-1, W)
    horizontal = instance_map[:, 1:] != instance_map[:, :-1]  # (H, W-1)
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge & (instance_map > 0)


def _coco_bbox(box: tuple[int, int, int, int]) -> list[float]:
    x1, y1, x2, y2 = box
    return [float(x1), float(y1), float(x2 - x1 + 1), float(y2 - y1 + 1)]  # inclusive box -> width, height


def build_result(
    image: np.ndarray,
    instance_logits: np.ndarray,
    semantic_probabilities: np.ndarray,
    detections: Detections,
    class_names: Sequence[str],
) -> SegmentationResult:
    """The result of one image from a backend's outputs. D' kept detections, K classes, N instances.

    image: (H, W, 3) uint8 RGB, as load_image returns it (the result keeps a copy).
    instance_logits: float (D'+1, H, W), label 0 = background, label k = detections' k-th kept detection.
    semantic_probabilities: float (K+1, H, W), Q_sem after the semantic CRF; 0 = background.
    detections: what check_detections returned for this image (its kept boxes are the D').
    class_names: the K class names, class id c named class_names[c-1].
    """
    height, width = _check_result_inputs(image, instance_logits, semantic_probabilities, detections, class_names)
    count = len(detections)

    winner = instance_winners(instance_logits, detections.scores)  # (H, W) in 0..D'
    pixels = np.bincount(winner.ravel(), minlength=count + 1)  # (D'+1,)
    present = np.flatnonzero(pixels[1:]) + 1  # label = kept index + 1, ascending = detection order
    renumber = np.zeros(count + 1, np.int32)
    renumber[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    instance_map = renumber[winner]  # (H, W) int32

    # Score: the mean over each instance's pixels of Q_sem of its class, summed in float64 in one pass.
    class_of_label = np.concatenate([[0], detections.labels]).astype(np.intp)  # (D'+1,), background -> 0
    q_own = np.take_along_axis(semantic_probabilities, class_of_label[winner][None], axis=0)[0]  # (H, W)
    sums = np.bincount(winner.ravel(), weights=q_own.ravel().astype(np.float64), minlength=count + 1)
    boxes = _instance_boxes(instance_map, len(present))  # (N, 4)

    instances = []
    for number, label in enumerate(present, start=1):
        class_id = int(detections.labels[label - 1])
        x1, y1, x2, y2 = (int(v) for v in boxes[number - 1])
        instances.append(Instance(
            id=number,
            class_id=class_id,
            class_name=str(class_names[class_id - 1]),
            score=float(sums[label] / pixels[label]),
            detection=int(detections.kept[label - 1]),
            box=(x1, y1, x2, y2),
            instance_map=instance_map,
        ))
    no_pixels = [DroppedDetection(int(detections.kept[label - 1]), "its instance won no pixel")
                 for label in range(1, count + 1) if pixels[label] == 0]
    semantic_map = _argmax_planes(semantic_probabilities, np.int32)
    image = image.copy()
    for array in (image, instance_map, semantic_map):
        array.setflags(write=False)
    return SegmentationResult(
        image=image,
        instance_map=instance_map,
        semantic_map=semantic_map,
        instances=instances,
        dropped=sorted(DroppedDetection(*d) for d in [*detections.dropped, *no_pixels]),
    )


# Values within TIE_TOLERANCE x max(1, |largest|) of a pixel's largest tie with it. Backends
# round alike values apart by about 1e-6 relative: onnxruntime's Log gives identical inputs different last
# bits by their place in the tensor, so two identical detections' logits drift apart, and an exact argmax
# split them into an instance and slivers on onnxruntime but not on torch.
TIE_TOLERANCE = 1e-5


def instance_winners(instance_logits: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each pixel's label (H, W) in 0..D of finite (D+1, H, W) instance logits, for detections of (D,)
    `scores`: the argmax, where a tie (within TIE_TOLERANCE) goes to the background, else to the higher
    score, else to the earlier detection (docs/algorithm.md §6). The instance map, and the predicted
    segments the training loss matches the ground truth to."""
    planes, scores = np.asarray(instance_logits), np.asarray(scores)
    if planes.ndim != 3 or scores.shape != (planes.shape[0] - 1,):  # else a label would silently never win
        raise InvalidArgumentError(f"instance_logits must be (D+1, H, W) and scores (D,), got {planes.shape} and "
                                   f"{scores.shape}")
    # the order of equally likely detections is the caller's accident, their scores are not
    by_confidence = 1 + np.argsort(-scores, kind="stable")
    return _argmax_planes(planes, preference=np.concatenate([[0], by_confidence]))


def _argmax_planes(planes: np.ndarray, dtype: type = np.intp, preference: np.ndarray | None = None) -> np.ndarray:
    """Each pixel's label of finite (L, H, W) planes: of the labels whose values are within
    TIE_TOLERANCE x max(1, |largest|) of the largest, the first in `preference` (all L labels, most preferred
    first; default 0, 1, ..., L-1), so float noise between backends decides no pixel. Plane by plane:
    contiguous passes instead of numpy's strided reductions over axis 0 (2-3x faster at 512x512)."""
    order = range(planes.shape[0]) if preference is None else preference.tolist()
    floor = _tie_floor(planes)
    index: np.ndarray = np.zeros(planes.shape[1:], dtype)
    for label in reversed(order):  # the most preferred label within reach is written last
        np.copyto(index, label, where=planes[label] >= floor)
    return index


def tied_pixels(planes: np.ndarray) -> np.ndarray:
    """bool (H, W): the pixels of finite (L, H, W) planes where two or more labels are within TIE_TOLERANCE of
    the largest, so that the tie rule, not the values, picks the winner (`instance_winners`)."""
    floor = _tie_floor(planes)
    within = np.zeros(planes.shape[1:], np.int32)
    for plane in planes:
        within += plane >= floor
    return within >= 2


def _tie_floor(planes: np.ndarray) -> np.ndarray:
    """(H, W): the least value that ties with each pixel's largest, TIE_TOLERANCE x max(1, |largest|) below it."""
    best = planes[0].copy()
    for plane in planes[1:]:
        np.maximum(best, plane, out=best)
    return best - TIE_TOLERANCE * np.maximum(np.abs(best), 1.0)


def _instance_boxes(instance_map: np.ndarray, count: int) -> np.ndarray:
    """int64 (count, 4): inclusive xyxy tight box of each instance 1..count (each has a pixel)."""
    height, width = instance_map.shape
    ids = instance_map.ravel().astype(np.intp)
    # which columns and rows each id occupies: two bincounts over the pixels, then first and last
    columns = np.bincount(ids * width + np.tile(np.arange(width), height),
                          minlength=(count + 1) * width).reshape(count + 1, width)[1:] > 0  # (count, W)
    rows = np.bincount(ids * height + np.repeat(np.arange(height), width),
                       minlength=(count + 1) * height).reshape(count + 1, height)[1:] > 0  # (count, H)
    boxes = np.empty((count, 4), np.int64)
    boxes[:, 0] = columns.argmax(axis=1)
    boxes[:, 1] = rows.argmax(axis=1)
    boxes[:, 2] = width - 1 - columns[:, ::-1].argmax(axis=1)
    boxes[:, 3] = height - 1 - rows[:, ::-1].argmax(axis=1)
    return boxes


def _check_result_inputs(
    image: np.ndarray,
    instance_logits: np.ndarray,
    semantic_probabilities: np.ndarray,
    detections: Detections,
    class_names: Sequence[str],
) -> tuple[int, int]:
    """(H, W) after checking the arrays agree, reporting a mismatch by name: a wrong shape or dtype is a
    backend's bug, a non-finite value the model's weights or the detection scores."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidArgumentError(f"image must be a (H, W, 3) uint8 array, got {_describe(image)}")
    height, width = image.shape[:2]
    if not isinstance(detections, Detections):
        raise InvalidArgumentError(f"detections must be what check_detections returns, got {_describe(detections)}")
    count = len(detections)
    shapes = {name: np.shape(getattr(detections, name)) for name in ("boxes", "labels", "scores", "kept")}
    if shapes != {"boxes": (count, 4), "labels": (count,), "scores": (count,), "kept": (count,)}:
        raise InvalidArgumentError(f"detections must hold boxes (D', 4) and labels, scores and kept (D',) for one D', "
                                   f"got {shapes}")
    if isinstance(class_names, str) or not isinstance(class_names, Sequence) \
            or not all(isinstance(name, str) for name in class_names):
        raise InvalidArgumentError(f"class_names must be a sequence of names (str), got {class_names!r:.80}")
    if not isinstance(instance_logits, np.ndarray) or instance_logits.shape != (count + 1, height, width):
        raise InvalidArgumentError(
            f"instance_logits must have shape (D'+1, H, W) = {(count + 1, height, width)}, "
            f"got {_describe(instance_logits)}")
    classes = len(class_names)
    if not isinstance(semantic_probabilities, np.ndarray) \
            or semantic_probabilities.shape != (classes + 1, height, width):
        raise InvalidArgumentError(
            f"semantic_probabilities must have shape (K+1, H, W) = {(classes + 1, height, width)}, "
            f"got {_describe(semantic_probabilities)}"
        )
    for name, value in (("instance_logits", instance_logits), ("semantic_probabilities", semantic_probabilities)):
        if value.dtype.kind != "f":
            raise InvalidArgumentError(f"{name} must be a floating-point array, got {_describe(value)}")
        if not np.isfinite(value).all():  # e.g. a model with NaN weights: its argmax would mean nothing
            raise InvalidArgumentError(f"the model's {name} hold NaN or infinite values: its weights, or this "
                                       "image's detection scores, overflow float32")
    if count and (detections.labels.min() < 1 or detections.labels.max() > classes):
        raise InvalidArgumentError(f"detections.labels must be in 1..{classes} (class_names), got {detections.labels}")
    return height, width


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
