"""What users pass to `Segmenter(path, backend, device)` and `segment(image, boxes, labels, scores)`:
its checks and conversions.

Owns the SDK's side of the input contract: `cuda_index` reads a device string for every backend and
`dense_crf`, `load_image` turns an array or an image file into the
(H, W, 3) uint8 RGB array every backend takes, and `check_detections` turns the caller's boxes, labels
and scores into the `Detections` the model runs on: xyxy pixels, inclusive, floored to integers and
clipped to the image. The network's own check (dynseg.trainer.model.network.require_valid_detections) is this
one, strict: it raises on inverted and outside boxes, which the SDK drops with a warning and a record,
because a deployed detector emits such boxes now and then and one bad box should not fail a frame.
Every other bad argument raises InvalidArgumentError naming the argument (with the checks of
`checks`). numpy and Pillow only: no torch.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Union

import numpy as np
from numpy.typing import ArrayLike

from .checks import FLOAT32_MAX, array_of, finite_float32, int_in, positive_in_float32
from .errors import DetectionsDroppedWarning, InvalidArgumentError
from .files import check_regular_file, named_path

__all__ = ["Detections", "DroppedDetection", "ImageLike", "check_detections", "cuda_index", "load_image",
           "looks_normalised", "pixel_boxes"]

if TYPE_CHECKING:
    import PIL.Image

ImageLike = Union[np.ndarray, str, "os.PathLike[str]", "PIL.Image.Image"]

# Why a detection was dropped (the reason strings of DroppedDetection).
INVERTED = "inverted box (x2 < x1 or y2 < y1)"
OUTSIDE = "box wholly outside the image"


# --------------------------------------------------------------------------------------------- device


def cuda_index(device: object) -> int | None:
    """'cpu' -> None; 'cuda' or 'cuda:N' -> the device index (0 for 'cuda')."""
    if device == "cpu":
        return None
    match = re.fullmatch(r"cuda(?::([0-9]+))?", device) if isinstance(device, str) else None
    if match:
        return int(match.group(1) or 0)
    raise InvalidArgumentError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


# ---------------------------------------------------------------------------------------------- image


def load_image(image: ImageLike) -> np.ndarray:
    """The image as a C-contiguous (H, W, 3) uint8 RGB array.

    image: one of
      - (H, W, 3) uint8 RGB (returned as it is when already C-contiguous, else a contiguous copy);
      - (H, W) uint8 grayscale (replicated into the three channels);
      - (H, W, 4) uint8 RGBA: the alpha channel is dropped, not composited (transparent pixels keep
        their stored colour);
      - a path (str or os.PathLike) to an image file Pillow reads: PNG and JPEG, and also BMP, TIFF,
        WebP, ... Palette, grayscale and RGBA files are converted to RGB as above. 16-bit colour files
        come in as Pillow reads them, the top 8 bits of each channel; 16-bit grayscale and float files,
        which Pillow would clip rather than scale, are refused (convert them to 8 bits first). EXIF
        orientation is not applied: pixels come in stored order, as Pillow and torchvision read them
        (OpenCV's imread rotates by it).
      - a PIL.Image.Image, converted as a file's image is (palette, CMYK, grayscale and RGBA to RGB;
        16-bit grayscale and float refused), not read as its raw array (a palette image's indices).
    Anything else (wrong dtype, rank or channel count, an empty image, a missing or unreadable file)
    raises InvalidArgumentError naming `image` and the problem.
    """
    if isinstance(image, (str, os.PathLike)):
        return _read_image_file(named_path(image, "image file"))
    if isinstance(image, (bytes, bytearray)):
        raise InvalidArgumentError("image must be an array or a str/os.PathLike path, got bytes")
    pil = sys.modules.get("PIL.Image")  # a PIL image can only exist once Pillow is imported
    if pil is not None and isinstance(image, pil.Image):
        # np.asarray of a PIL image is its raw storage: palette indices, CMYK bytes; convert as for files
        try:
            array = _pillow_rgb(image, "image (a PIL image)")
        except InvalidArgumentError:  # a ValueError too: our own message must not be rewrapped below
            raise
        except (OSError, ValueError) as error:  # a lazily loaded image whose file is truncated, say
            raise InvalidArgumentError(f"image (a PIL image) could not be converted to RGB: {error}") from error
        return _image_array(array)
    return _image_array(array_of("image", image))


def _image_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InvalidArgumentError(
            f"image must be uint8 (0..255), got dtype {array.dtype}"
            + ("; convert floats with (image * 255).round().astype(np.uint8) when they are in 0..1, "
               "image.round().astype(np.uint8) when in 0..255" if array.dtype.kind == "f" else "")
        )
    if array.ndim not in (2, 3):
        raise InvalidArgumentError(f"image must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        raise InvalidArgumentError(
            f"image must have 3 (RGB) or 4 (RGBA) channels, or be (H, W) grayscale; got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidArgumentError(f"image is empty: shape {array.shape}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if array.shape[2] == 4:
        array = array[:, :, :3]  # RGBA loses its alpha here
    return np.ascontiguousarray(array)


# Pillow modes of more than 8 bits per channel: convert("RGB") would clip them, not scale them. (Pillow
# opens a 16-bit colour PNG as 8-bit "RGB"/"RGBA", each channel's top byte: scaled, so accepted.)
_WIDE_MODES = ("I", "F")


def _pillow_rgb(image: PIL.Image.Image, name: str) -> np.ndarray:
    """A Pillow image as (H, W, 3) uint8 RGB; `name` says what it is in messages."""
    if image.mode.split(";")[0] in _WIDE_MODES:
        raise InvalidArgumentError(f"{name} has {image.mode!r} pixels (16-bit or float); "
                                   "convert it to 8-bit RGB first")
    if image.mode == "P":  # via RGBA so palette transparency converts without Pillow's warning
        image = image.convert("RGBA")
    return np.array(image.convert("RGB"))


def _read_image_file(path: Path) -> np.ndarray:
    check_regular_file(path, "image file")
    try:
        from PIL import Image
    except ImportError as error:  # Pillow is a dependency of dynseg; a trimmed environment may lack it
        raise InvalidArgumentError(
            f"image {str(path)!r}: reading image files needs Pillow (pip install pillow); "
            "or pass the image as an (H, W, 3) uint8 RGB array"
        ) from error
    try:
        with Image.open(path) as opened:
            # decodes the whole file: truncation shows here
            array = _pillow_rgb(opened, f"image file {str(path)!r}")
    except InvalidArgumentError:  # a ValueError too: our own message must not be rewrapped below
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise InvalidArgumentError(f"image file {str(path)!r} could not be read as an image: {error}") from error
    return _image_array(array)


# ------------------------------------------------------------------------------------------ detections


class DroppedDetection(NamedTuple):
    """A detection that got no instance: its index in the caller's input (as `Instance.detection`), and why."""

    detection: int
    reason: str


@dataclass(frozen=True)
class Detections:
    """The detections a model runs on, checked and clipped. D' = len(kept) <= D, the caller's count.

    boxes: float32 (D', 4) xyxy in input-image pixels, inclusive, integer-valued, with
        0 <= x1 <= x2 <= W-1 and 0 <= y1 <= y2 <= H-1.
    labels: int64 (D',) class ids in 1..K.
    scores: float32 (D',) finite, non-negative detector scores.
    kept: int64 (D',) ascending index of each kept detection in the caller's input.
    dropped: the detections left out, ascending by index, each with its reason. Boxes that reach past
        the border are clipped without a warning: detectors routinely emit them.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    kept: np.ndarray
    dropped: list[DroppedDetection] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.kept)


def _numeric_array(name: str, value: object) -> np.ndarray:
    """value as an array of real numbers (bool, complex, strings and objects refused)."""
    array = array_of(name, value)
    if array.size == 0:  # an empty list or array carries no values whose type could be wrong
        return array.astype(np.float64)
    if array.dtype.kind not in "iuf":
        raise InvalidArgumentError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def check_detections(
    boxes: ArrayLike,
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    height: int,
    width: int,
    num_classes: int,
    max_detections: int | None = None,
    score_ceiling: float | None = None,
    stacklevel: int = 2,
) -> Detections:
    """The caller's detections, checked, clipped to the (height, width) image and stripped of boxes the
    model cannot use.

    boxes: (D, 4) xyxy in input-image pixels, inclusive (any real array-like: lists, int or float
        arrays); an empty list means D = 0.
    labels: (D,) class ids in 1..num_classes (integer arrays, or floats with integral values).
    scores: (D,) finite, non-negative detector scores (within float32's range): confidences, not logits,
        at most score_ceiling (the model's s_max, 1 by default; None: no limit, as for training data).
        The detection potential's prior is s_d / s_max, but its pixel term and the instance box term
        take s_d itself, so a score above the ceiling (a detector's percentage, say) would silently
        change the segmentation.
    D may be 0. D above max_detections (the model's limit, counted before any box is dropped; None: no
    limit, as for training data), a wrong shape or length, NaN or infinity, negative scores or ones
    above score_ceiling, labels out of range and boxes that look normalised (`looks_normalised`) raise
    InvalidArgumentError naming the argument.

    Each box is floored to integers and clipped to [0, W-1] x [0, H-1], as the network does. These are
    dropped, with one DetectionsDroppedWarning per call (at `stacklevel`) and a record in `dropped`:
      - inverted boxes (x2 < x1 or y2 < y1);
      - boxes wholly outside the image (after flooring, x2 < 0, y2 < 0, x1 > W-1 or y1 > H-1: the
        network's test).
    Every other box holds at least one pixel: boxes are inclusive, so x1 == x2 is a one-pixel column
    (a COCO box of width 1 or less, say), as the network reads it.
    """
    height = int_in("height", height, 1)
    width = int_in("width", width, 1)
    num_classes = int_in("num_classes", num_classes, 1)
    if max_detections is not None:
        max_detections = int_in("max_detections", max_detections, 1)
    if score_ceiling is not None:
        ceiling = finite_float32(score_ceiling)
        if ceiling is None or not positive_in_float32(ceiling):
            raise InvalidArgumentError(f"score_ceiling must be a number > 0 that float32 holds, or None, got "
                                       f"{score_ceiling!r}")
        score_ceiling = ceiling

    boxes_in = _numeric_array("boxes", boxes)
    if boxes_in.shape == (0,):  # [] or np.array([]): no detections
        boxes_in = boxes_in.reshape(0, 4)
    if boxes_in.ndim != 2 or boxes_in.shape[1] != 4:
        raise InvalidArgumentError(f"boxes must have shape (D, 4) (xyxy), got {boxes_in.shape}")
    count = boxes_in.shape[0]
    if max_detections is not None and count > max_detections:
        raise InvalidArgumentError(
            f"boxes has D = {count} detections, above this model's limit of {max_detections} per image"
        )
    labels_in = _numeric_array("labels", labels)
    scores_in = _numeric_array("scores", scores)
    if labels_in.shape != (count,):
        raise InvalidArgumentError(f"labels must have shape (D,) = ({count},) to match boxes, got {labels_in.shape}")
    if scores_in.shape != (count,):
        raise InvalidArgumentError(f"scores must have shape (D,) = ({count},) to match boxes, got {scores_in.shape}")

    # float64 holds every float32 and every int below 2**53 exactly, so flooring here gives the
    # network's floor of the same float32 boxes.
    boxes64 = boxes_in.astype(np.float64)
    if not np.isfinite(boxes64).all():
        bad = np.flatnonzero(~np.isfinite(boxes64).all(axis=1)).tolist()
        raise InvalidArgumentError(f"boxes must be finite: rows {bad} hold NaN or infinity")
    if looks_normalised(boxes64):
        raise InvalidArgumentError("boxes: every box lies within [0, 1], in fractions of a pixel: normalised "
                                   "coordinates? Boxes are (x1, y1, x2, y2) in pixels from the image's top-left corner")
    scores64 = _check_scores(scores_in, score_ceiling)
    labels64 = _check_labels(labels_in, num_classes)

    x1, y1, x2, y2 = boxes64.T  # (D,) each
    inverted = (x2 < x1) | (y2 < y1)
    clipped_boxes, outside = pixel_boxes(boxes64, height, width)
    outside &= ~inverted
    dropped = [DroppedDetection(int(i), INVERTED if inverted[i] else OUTSIDE)
               for i in np.flatnonzero(inverted | outside)]
    kept = np.flatnonzero(~(inverted | outside)).astype(np.int64)  # (D',)

    if dropped:
        listed = "; ".join(f"{d.detection}: {d.reason}" for d in dropped)
        warnings.warn(
            f"{len(dropped)} of {count} detections dropped ({width}x{height} image): {listed}",
            DetectionsDroppedWarning,
            stacklevel=stacklevel,
        )
    return Detections(
        boxes=clipped_boxes[kept].astype(np.float32),
        labels=labels64[kept],
        scores=scores64[kept].astype(np.float32),
        kept=kept,
        dropped=dropped,
    )


def looks_normalised(boxes: np.ndarray) -> bool:
    """Whether every one of the (D, 4) boxes lies within [0, 1], with fractions: a detector's normalised
    output, not pixels. Each such box would become its image's top-left pixel, inside the image, so no
    later check would see it."""
    return bool(len(boxes)) and boxes.min() >= 0 and boxes.max() <= 1 and bool(np.any(boxes % 1))


def pixel_boxes(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (D, 4) xyxy inclusive boxes cover as the network reads them: the boxes floored to
    integers and clipped to [0, width-1] x [0, height-1] (float64 (D, 4)), and which of them lie wholly
    outside the image (bool (D,): after flooring x2 < 0, y2 < 0, x1 > W-1 or y1 > H-1). The one rule for
    training data and deployment alike; inverted boxes are the caller's to judge."""
    floored = np.floor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    f1, g1, f2, g2 = floored.T
    outside = (f2 < 0) | (g2 < 0) | (f1 > width - 1) | (g1 > height - 1)
    limits = np.array([width - 1, height - 1, width - 1, height - 1], dtype=np.float64)
    return np.minimum(np.maximum(floored, 0.0), limits), outside


def _check_scores(scores: np.ndarray, ceiling: float | None) -> np.ndarray:
    """scores as float64 after checking they are non-negative, float32 holds them finitely, and as float32
    (what the model reads) they are at most `ceiling` (None: any)."""
    scores64 = scores.astype(np.float64)
    representable = np.isfinite(scores64) & (np.abs(scores64) <= FLOAT32_MAX)
    if not representable.all():
        bad = np.flatnonzero(~representable).tolist()
        raise InvalidArgumentError(
            f"scores must be finite float32 values: entries {bad} are NaN, infinite or too large")
    if (scores64 < 0).any():
        bad = np.flatnonzero(scores64 < 0).tolist()
        raise InvalidArgumentError(f"scores must be >= 0 (detector confidences, not logits): entries {bad} are "
                                   f"{scores64[bad].tolist()}")
    if ceiling is not None:
        above = scores64.astype(np.float32) > np.float32(ceiling)
        if above.any():
            bad = np.flatnonzero(above)
            listed = f"{bad[:8].tolist()}" + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            raise InvalidArgumentError(
                f"scores must be at most {ceiling:g}, the model's score ceiling (detector confidences: a "
                f"percentage needs dividing by 100, a logit a sigmoid): entries {listed} are above it, the "
                f"largest {scores64.max():g}")
    return scores64


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """labels as int64 after checking they are integers in 1..num_classes."""
    if labels.dtype.kind == "f":
        finite = np.isfinite(labels)
        integral = finite & (labels == np.floor(np.where(finite, labels, 0)))
        if not integral.all():
            bad = np.flatnonzero(~integral).tolist()
            raise InvalidArgumentError(f"labels must be integers (class ids 1..{num_classes}): entries {bad} are not")
    # Compare before casting: a uint64 or a huge float would wrap or overflow in int64.
    out_of_range = (labels < 1) | (labels > num_classes)
    if out_of_range.any():
        bad = np.flatnonzero(out_of_range)
        raise InvalidArgumentError(
            f"labels must be class ids in 1..{num_classes}: entries {bad.tolist()} are {labels[bad].tolist()}"
        )
    return labels.astype(np.int64)
