"""What every dataset loader shares: the sample type with its image id, argument checks, file checks,
image reading, and assembling a sample (void, masks, labels, boxes) from class and instance maps.

Every loader returns `LabelledSample`: `SceneSample` (see `synthetic.py`) plus `image_id`. Unlike the
synthetic scenes, `masks` never include void pixels: on real annotations nobody knows which object a
void pixel belongs to, so masks[m] == (instances == m + 1) exactly. As there, semantic == labels[m]
on every pixel of masks[m]."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Protocol
from pathlib import Path

import numpy as np
from PIL import Image

from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.inputs import load_image

from ..boxes import mask_boxes
from .synthetic import VOID, SceneSample


class LabelledSample(SceneSample):
    """One annotated image: `SceneSample`'s arrays (masks without void: see the module docstring)."""

    image_id: str | int  # the image's id in its dataset: the file stem (COCO: the integer image id)


class Samples(Protocol):
    """What training and evaluation read: samples indexed 0..len-1, each a dict with `SceneSample`'s
    entries (and "detections" where the dataset has them): `SyntheticScenes`, every on-disk loader,
    `sources.WithDetections`, or a torch Subset of one."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


class Dataset(Samples, Protocol):
    """`Samples` that name their classes, as the loaders do: ("background", class 1, ..., class K)."""

    @property
    def class_names(self) -> tuple[str, ...]: ...

    def image_shape(self, index: int) -> tuple[int, int]:
        """(H, W) of image `index`, without reading its pixels."""
        ...


class ListedImages:
    """What every on-disk loader shares: its root and split, the split's image ids in order, each image's
    file (`image_paths[i]`), and the count, shape and repr that follow from them."""

    root: Path
    split: str
    image_ids: tuple[str | int, ...]
    image_paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_shape(self, index: int) -> tuple[int, int]:
        """(H, W) of image `index`, from its file's header."""
        return read_image_shape(self.image_paths[self._position(index)])

    def _position(self, index: int) -> int:
        return check_index(index, len(self.image_ids))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"


def check_sample(sample: object, where: str, num_classes: int) -> None:
    """InvalidArgumentError naming `where` (e.g. "dataset[3]") and the field unless `sample` holds what
    training and evaluation read of a `SceneSample`: image uint8 (H, W, 3) RGB, semantic (H, W) integers
    in 0..num_classes or VOID, masks bool (M, H, W), labels (M,) integers in 1..num_classes. A dataset of
    one's own can get them subtly wrong: a float image in 0..1 would train on pictures 255 times too dark."""
    check_class_count(num_classes, where)
    if not isinstance(sample, Mapping):
        raise InvalidArgumentError(f"{where} must be a mapping of image, semantic, masks and labels, got "
                                   f"{type(sample).__name__}")
    missing = [key for key in ("image", "semantic", "masks", "labels") if key not in sample]
    if missing:
        raise InvalidArgumentError(f"{where} lacks {', '.join(missing)}")
    image, semantic, masks, labels = (np.asarray(sample[key]) for key in ("image", "semantic", "masks", "labels"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidArgumentError(f"{where}['image'] must be uint8 (H, W, 3) RGB, got {image.dtype} of shape "
                                   f"{image.shape}")
    size = image.shape[:2]
    if semantic.dtype.kind not in "iu" or semantic.shape != size:
        raise InvalidArgumentError(f"{where}['semantic'] must be integers of shape {size}, got {semantic.dtype} of "
                                   f"shape {semantic.shape}")
    wrong = ((semantic < 0) | (semantic > num_classes)) & (semantic != VOID)
    if wrong.any():
        raise InvalidArgumentError(f"{where}['semantic'] must hold classes 0..{num_classes} or {VOID} (void), got "
                                   f"{int(semantic[wrong][0])}")
    if masks.dtype != bool or masks.ndim != 3 or masks.shape[1:] != size:
        raise InvalidArgumentError(f"{where}['masks'] must be bool of shape (M, {size[0]}, {size[1]}), got "
                                   f"{masks.dtype} of shape {masks.shape}")
    if labels.dtype.kind not in "iu" or labels.shape != (len(masks),):
        raise InvalidArgumentError(f"{where}['labels'] must be integers of shape ({len(masks)},), one per mask, got "
                                   f"{labels.dtype} of shape {labels.shape}")
    if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
        raise InvalidArgumentError(f"{where}['labels'] must be classes 1..{num_classes}, got {labels.tolist()}")


def check_class_count(num_classes: int, source: str) -> None:
    """InvalidArgumentError naming `source` when its classes 1..num_classes reach VOID: a semantic map marks
    void pixels with VOID, so class VOID's pixels would be read as void, ignored by the loss and unmatchable
    in evaluation, without a word."""
    if num_classes >= VOID:
        raise InvalidArgumentError(f"{source}: {num_classes} classes, but dynseg's datasets hold at most {VOID - 1}: "
                                   f"a semantic map marks void pixels with {VOID}, so class {VOID} would be void")


def check_split_name(split: object) -> None:
    """Raise InvalidArgumentError unless split is a non-empty name without path separators."""
    if not isinstance(split, str) or not split or split in (".", "..") or "/" in split or os.sep in split:
        raise InvalidArgumentError(f"split must be a plain name such as 'train' or 'val', got {split!r}")


def check_index(index: object, size: int) -> int:
    """The index as a non-negative int (negative ones count from the end), or TypeError / IndexError."""
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    position = int(index) + size if index < 0 else int(index)
    if not 0 <= position < size:
        raise IndexError(f"index {index} out of range for {size} images")
    return position


def read_id_list(path: Path, folder: Path) -> tuple[str, ...]:
    """The non-empty, stripped lines of a split list, each id once. FileNotFoundError names the lists that
    exist in folder."""
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
        raise FileNotFoundError(f"{path}: split list not found (available in {folder}: {available or 'none'})")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark would stick to the first id, unseen
    except UnicodeDecodeError as error:
        raise InvalidArgumentError(f"{path}: the split list is not UTF-8 text ({error})") from error
    ids = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not ids:
        raise InvalidArgumentError(f"{path}: the split list is empty")
    if len(set(ids)) < len(ids):  # the image would count twice in training and in every metric
        twice = next(image_id for image_id, n in Counter(ids).items() if n > 1)
        raise InvalidArgumentError(f"{path}: the split list names {twice!r} more than once")
    return ids


def require_files(folder: Path, names: Iterable[str]) -> None:
    """Raise FileNotFoundError naming the folder and the first missing names, unless all exist in it."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    present = set(os.listdir(folder))
    missing = [name for name in names if name not in present and not ("/" in name and (folder / name).is_file())]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{folder}: {len(missing)} file(s) missing: {shown}")


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of an image file, read as the SDK reads one (`load_image`): grey and
    palette images converted, 16-bit and float ones refused rather than clipped, and a file that
    cannot be decoded (a truncated download) named in the error."""
    return load_image(Path(path))


def read_image_shape(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding its pixels."""
    try:
        with Image.open(path) as opened:
            width, height = opened.size
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise InvalidArgumentError(f"image file {str(path)!r} could not be read as an image: {error}") from error
    return height, width


def read_annotation_png(path: Path, shape: tuple[int, int], modes: tuple[str, ...], expected: str) -> np.ndarray:
    """The (H, W) values of an annotation PNG in one of Pillow's `modes`, of the image's `shape`. A
    PNG of another mode or size, or one that cannot be decoded, raises InvalidArgumentError naming it."""
    try:
        with Image.open(path) as png:
            if png.mode not in modes:
                raise InvalidArgumentError(f"{path}: expected {expected}, got mode {png.mode!r}")
            values = np.array(png)
    except (InvalidArgumentError, FileNotFoundError):
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise InvalidArgumentError(f"{path}: could not be read as a PNG: {error}") from error
    if values.shape != shape:
        raise InvalidArgumentError(f"{path}: annotation is {values.shape[::-1]} (W, H), the image {shape[::-1]}")
    return values


def read_indexed_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) palette indices of a mode "P" (or greyscale "L") PNG of the given shape."""
    return read_annotation_png(path, shape, ("P", "L"), "a palette (mode 'P') PNG of indices").astype(np.uint8)


def assemble_sample(
    image: np.ndarray,
    semantic: np.ndarray,
    owner: np.ndarray,
    labels: list[int] | np.ndarray,
    void: np.ndarray,
    image_id: str | int,
    source: object,
) -> LabelledSample:
    """Build a `LabelledSample` from per-pixel maps.

    Args:
        image: uint8 (H, W, 3) RGB.
        semantic: int (H, W) class 0..K per pixel (its values under `void` and under instances are
            replaced: by void, and by the instance's label).
        owner: int (H, W): 0 no instance, m in 1..len(labels) the pixel's instance.
        labels: class 1..K of each owner index.
        void: bool (H, W), void in both output maps and in no mask.
        source: names the annotation in the error raised when more than 254 instances remain.

    Instances left with no pixel outside void are dropped; the rest are renumbered 1..M in order.
    """
    labels = np.asarray(labels, np.int64).reshape(-1)
    owner = np.where(void, 0, owner)
    kept = np.flatnonzero(np.bincount(owner.ravel(), minlength=len(labels) + 1)[1:])  # (M,) 0-based
    if len(kept) >= VOID:
        raise InvalidArgumentError(f"{source}: {len(kept)} instances; at most {VOID - 1} fit beside void = {VOID}")
    renumber = np.zeros(len(labels) + 1, np.int64)
    renumber[kept + 1] = np.arange(1, len(kept) + 1)
    instances = renumber[owner]  # (H, W) 0..M
    masks = instances[None] == np.arange(1, len(kept) + 1)[:, None, None]  # (M, H, W)
    semantic = np.where(instances > 0, np.concatenate([[0], labels[kept]])[instances], semantic)
    semantic = np.where(void, VOID, semantic).astype(np.int64)
    instances[void] = VOID
    return LabelledSample(
        image=image,
        semantic=semantic,
        instances=instances.astype(np.int32),
        masks=masks,
        labels=labels[kept],
        boxes=mask_boxes(masks),
        image_id=image_id,
    )
