"""Detections for the instance CRF: a detector simulator (real detectors' COCO results files are read by
`dynseg.sdk.coco_detections.load_coco_detections`, re-exported here).

The instance CRF's labels are the image's detections (docs/algorithm.md §1, §5), so what the network learns
to cope with is set by how the detections go wrong. `simulate_detections` turns ground truth into
detections with the failure modes a real detector has, each with its own rate:

- jitter: every box's centre moves by N(0, jitter) of the box's width/height, and its width/height
  scale by exp(N(0, jitter)) (normals clipped at 2.5 sigma). The released training data layer moved
  boxes uniformly within ±5 % (docs/algorithm.md §7); jitter = 0.05 has that spread as its standard
  deviation, with tails to 12.5 %, which is rougher, as real detectors are; the default, 0.1, doubles
  that (tails to 25 %).
- poor_localisation: the probability that a detected object's box covers only part of it: shrunk to
  35-65 % of its width or height (anchored on a random side) or shifted by 35-60 % of its size, so the
  box cuts the object (IoU with the object's box below about 0.5).
- miss_rate: the probability that an object gets no detection at all.
- false_positives: the expected number of false positives per ground-truth object (Poisson; an image
  without objects counts as one object). Half sit on background, sized like the image's objects and
  placed away from them where possible; when the image has objects and more than one class, the other
  half are boxes on an object with a wrong class. About a third are confident (score 0.55-0.95).
- duplicates: the probability that a detected object gets a second box, shifted by up to 8 % of its
  size (IoU with the first box > 0.5), scoring 40-90 % of the first.

Scores: well-localised true positives 0.3 + 0.7·Beta(5, 1.5) (mean 0.84), poorly localised
0.2 + 0.7·Beta(3, 2) (mean 0.62), false positives a mixture of low and confident.

Boxes everywhere here are float32 (D, 4) xyxy in image pixels, inclusive: a box covering columns 10..19
has x1 = 10, x2 = 19. Simulated boxes are clipped to the image and non-degenerate (x2 - x1 >= 1 and
y2 - y1 >= 1, so at least two pixels each way even after truncating to integers); they are real-valued
(consumers truncate, as the released code does).
"""

from __future__ import annotations

import math
from enum import IntEnum

import numpy as np

from dynseg.sdk.coco_detections import DetectorOutput
from dynseg.sdk.coco_detections import load_coco_detections
from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.checks import int_in, is_int

__all__ = ["DetectorOutput", "SimulatedDetections", "DetectionKind", "simulate_detections", "load_coco_detections"]


class SimulatedDetections(DetectorOutput):
    """`DetectorOutput` plus where each simulated detection came from (for analysis and tests)."""

    source: np.ndarray  # int64 (D,): index of the ground-truth object it was made from, -1 on background
    kind: np.ndarray  # int8 (D,): a DetectionKind


class DetectionKind(IntEnum):
    """What a simulated detection is."""

    TRUE_POSITIVE = 0  # the object's class, a jittered box around it
    POORLY_LOCALISED = 1  # the object's class, a box covering only part of it
    DUPLICATE = 2  # a second, slightly shifted, lower-scoring box on an object already detected
    FALSE_POSITIVE = 3  # a box on background (source -1), or on an object with a wrong class


_FALSE_POSITIVE_ON_OBJECT = 0.5  # share of false positives that are wrong-class boxes on an object
_CONFIDENT_FALSE_POSITIVE = 0.35
_BACKGROUND_TRIES = 10
_BACKGROUND_MAX_IOU = 0.3


def simulate_detections(
    boxes: np.ndarray,
    labels: np.ndarray,
    *,
    image_size: tuple[int, int],
    rng: np.random.Generator,
    jitter: float = 0.1,
    poor_localisation: float = 0.2,
    miss_rate: float = 0.1,
    false_positives: float = 0.3,
    duplicates: float = 0.1,
    num_classes: int,
) -> SimulatedDetections:
    """Imperfect detections of one image's ground-truth objects (see the module docstring for each rate).

    Args:
        boxes: float (M, 4) xyxy inclusive ground-truth boxes in image pixels (M may be 0).
        labels: int (M,) ground-truth classes in 1..num_classes.
        image_size: (H, W) of the image, each >= 2.
        rng: the only source of randomness; the same generator state gives the same detections.
        jitter: >= 0, relative std of the box noise. poor_localisation, miss_rate, duplicates: in [0, 1].
        false_positives: >= 0, expected false positives per ground-truth object.
        num_classes: K.

    Returns:
        `SimulatedDetections` sorted by descending score (stable), boxes clipped to the image.
    """
    gt_boxes, gt_labels = _check_inputs(boxes, labels, image_size, num_classes)
    for name, value in (("poor_localisation", poor_localisation), ("miss_rate", miss_rate), ("duplicates", duplicates)):
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise InvalidArgumentError(f"{name} must be a probability in [0, 1], got {value!r}")
    for name, value in (("jitter", jitter), ("false_positives", false_positives)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
            raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(rng, np.random.Generator):
        raise InvalidArgumentError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    height, width = int(image_size[0]), int(image_size[1])

    out_boxes: list[np.ndarray] = []
    out: list[tuple[int, float, int, int]] = []  # (label, score, source, kind)

    def emit(box: np.ndarray, label: int, score: float, source: int, kind: DetectionKind) -> np.ndarray:
        box = _finish(box, height, width)
        out_boxes.append(box)
        out.append((label, score, source, int(kind)))
        return box

    for m in range(len(gt_boxes)):
        if rng.random() < miss_rate:
            continue
        label = int(gt_labels[m])
        if rng.random() < poor_localisation:
            box = _poor_box(rng, gt_boxes[m])
            box = emit(box, label, 0.2 + 0.7 * rng.beta(3, 2), m, DetectionKind.POORLY_LOCALISED)
        else:
            box = _jitter_box(rng, gt_boxes[m], jitter)
            box = emit(box, label, 0.3 + 0.7 * rng.beta(5, 1.5), m, DetectionKind.TRUE_POSITIVE)
        if rng.random() < duplicates:
            score = out[-1][1] * rng.uniform(0.4, 0.9)
            emit(_duplicate_box(rng, box, height, width), label, score, m, DetectionKind.DUPLICATE)

    for _ in range(int(rng.poisson(false_positives * max(len(gt_boxes), 1)))):
        if rng.random() < _CONFIDENT_FALSE_POSITIVE:
            score = rng.uniform(0.55, 0.95)
        else:
            score = rng.uniform(0.05, 0.55)
        if len(gt_boxes) and num_classes > 1 and rng.random() < _FALSE_POSITIVE_ON_OBJECT:
            m = int(rng.integers(len(gt_boxes)))
            wrong = int(rng.integers(1, num_classes))  # 1..K-1, shifted past the true class
            wrong += wrong >= gt_labels[m]
            emit(_jitter_box(rng, gt_boxes[m], jitter), wrong, score, m, DetectionKind.FALSE_POSITIVE)
        else:
            box = _background_box(rng, gt_boxes, height, width)
            emit(box, int(rng.integers(1, num_classes + 1)), score, -1, DetectionKind.FALSE_POSITIVE)

    if not out:
        return SimulatedDetections(
            boxes=np.zeros((0, 4), np.float32),
            labels=np.zeros(0, np.int64),
            scores=np.zeros(0, np.float32),
            source=np.zeros(0, np.int64),
            kind=np.zeros(0, np.int8),
        )
    scores = np.array([o[1] for o in out], np.float32)
    order = np.argsort(-scores, kind="stable")
    return SimulatedDetections(
        boxes=np.stack(out_boxes).astype(np.float32)[order],
        labels=np.array([o[0] for o in out], np.int64)[order],
        scores=scores[order],
        source=np.array([o[2] for o in out], np.int64)[order],
        kind=np.array([o[3] for o in out], np.int8)[order],
    )


def _check_inputs(boxes, labels, image_size, num_classes) -> tuple[np.ndarray, np.ndarray]:
    int_in("num_classes", num_classes, 1, rule="an int >= 1")
    if len(tuple(image_size)) != 2 or any(not is_int(s) or s < 2 for s in image_size):
        raise InvalidArgumentError(f"image_size must be (H, W) ints, each >= 2, got {image_size!r}")
    gt_boxes = np.asarray(boxes, np.float64)
    gt_labels = np.asarray(labels)
    if gt_boxes.ndim != 2 or gt_boxes.shape[1] != 4:
        raise InvalidArgumentError(f"boxes must be (M, 4) xyxy, got shape {gt_boxes.shape}")
    if gt_labels.shape != (len(gt_boxes),) or (gt_labels.size and gt_labels.dtype.kind not in "iu"):
        raise InvalidArgumentError(
            f"labels must be ({len(gt_boxes)},) ints, got shape {gt_labels.shape} {gt_labels.dtype}"
        )
    if not np.all(np.isfinite(gt_boxes)) or np.any(gt_boxes[:, 2:] < gt_boxes[:, :2]):
        raise InvalidArgumentError(f"boxes must be finite with x2 >= x1 and y2 >= y1, got {gt_boxes.tolist()}")
    if gt_labels.size and (gt_labels.min() < 1 or gt_labels.max() > num_classes):
        raise InvalidArgumentError(f"labels must lie in 1..{num_classes}, got {gt_labels.tolist()}")
    return gt_boxes, gt_labels.astype(np.int64)


# Internally boxes are continuous extents (X1, Y1, X2, Y2) = (x1, y1, x2 + 1, y2 + 1): width = X2 - X1.


def _extent(box: np.ndarray) -> tuple[float, float, float, float]:
    """Centre and size (cx, cy, w, h) of an inclusive xyxy box."""
    x1, y1, x2, y2 = (float(c) for c in box)
    return (x1 + x2 + 1) / 2, (y1 + y2 + 1) / 2, x2 - x1 + 1, y2 - y1 + 1


def _from_extent(cx: float, cy: float, w: float, h: float) -> np.ndarray:
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2 - 1, cy + h / 2 - 1])


def _finish(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip an inclusive box to the image and widen it to at least 2 pixels each way (x2 - x1 >= 1).

    Coordinates land on a 1/256-pixel grid, exact in float32, so the guarantees survive the cast."""
    bounds = (width, height)
    lo = np.array(box[:2], np.float64)
    hi = np.array(box[2:], np.float64) + 1  # continuous extents
    for axis in range(2):
        # On a 1/256 grid (exact in float32, so the checks below hold after the cast), rounded outwards.
        lo[axis] = min(max(math.floor(lo[axis] * 256) / 256, 0.0), bounds[axis])
        hi[axis] = min(max(math.ceil(hi[axis] * 256) / 256, 0.0), bounds[axis])
        if hi[axis] - lo[axis] < 2.0:
            centre = min(max((lo[axis] + hi[axis]) / 2, 1.0), bounds[axis] - 1.0)
            centre = round(centre * 256) / 256
            lo[axis], hi[axis] = centre - 1.0, centre + 1.0
    return np.array([lo[0], lo[1], hi[0] - 1, hi[1] - 1], np.float32)


def _normal(rng: np.random.Generator, sigma: float) -> float:
    return float(np.clip(rng.normal(), -2.5, 2.5)) * sigma


def _jitter_box(rng: np.random.Generator, box: np.ndarray, jitter: float) -> np.ndarray:
    cx, cy, w, h = _extent(box)
    cx, cy = cx + _normal(rng, jitter) * w, cy + _normal(rng, jitter) * h
    return _from_extent(cx, cy, w * math.exp(_normal(rng, jitter)), h * math.exp(_normal(rng, jitter)))


def _poor_box(rng: np.random.Generator, box: np.ndarray) -> np.ndarray:
    """A box that cuts the object: one side shrunk to 35-65 %, or the whole box shifted 35-60 %."""
    x1, y1, x2, y2 = (float(c) for c in box)
    lo, hi = [x1, y1], [x2 + 1, y2 + 1]
    axis = int(rng.integers(2))
    size = hi[axis] - lo[axis]
    if rng.random() < 0.5:
        keep = rng.uniform(0.35, 0.65) * size
        if rng.random() < 0.5:
            hi[axis] = lo[axis] + keep
        else:
            lo[axis] = hi[axis] - keep
    else:
        shift = rng.uniform(0.35, 0.6) * size * (1 if rng.random() < 0.5 else -1)
        lo[axis] += shift
        hi[axis] += shift
    return np.array([lo[0], lo[1], hi[0] - 1, hi[1] - 1])


def _duplicate_box(rng: np.random.Generator, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """A second box on the same object: each side moved by up to 8 % of the box's size; IoU > 0.5."""
    cx, cy, w, h = _extent(box)
    offsets = rng.uniform(-0.08, 0.08, 4) * np.array([w, h, w, h])
    candidate = _finish(np.asarray(box, np.float64) + offsets, height, width)
    if _iou(candidate, box) > 0.5:
        return candidate
    return _finish(_from_extent(cx, cy, w * 0.95, h * 0.95), height, width)  # rare: a slightly shrunk copy


def _background_box(rng: np.random.Generator, gt_boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """A box sized like the image's objects, placed where it overlaps them least (of a few tries)."""
    best, best_overlap = _background_try(rng, gt_boxes, height, width)
    for _ in range(_BACKGROUND_TRIES - 1):
        if best_overlap < _BACKGROUND_MAX_IOU:
            break
        box, overlap = _background_try(rng, gt_boxes, height, width)
        if overlap < best_overlap:
            best, best_overlap = box, overlap
    return best


def _background_try(rng: np.random.Generator, gt_boxes: np.ndarray, height: int,
                    width: int) -> tuple[np.ndarray, float]:
    """One random placement for _background_box, and its largest IoU with the ground truth."""
    if len(gt_boxes):
        _, _, w, h = _extent(gt_boxes[int(rng.integers(len(gt_boxes)))])
        w, h = w * rng.uniform(0.6, 1.4), h * rng.uniform(0.6, 1.4)
    else:
        w, h = width * rng.uniform(0.1, 0.4), height * rng.uniform(0.1, 0.4)
    w, h = min(max(w, 2.0), width), min(max(h, 2.0), height)
    x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    box = np.array([x1, y1, x1 + w - 1, y1 + h - 1])
    return box, max((_iou(box, g) for g in gt_boxes), default=0.0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two inclusive xyxy boxes (as continuous extents x1 .. x2 + 1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return float(inter / union) if union > 0 else 0.0
