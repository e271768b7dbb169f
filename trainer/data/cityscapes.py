"""Cityscapes instance segmentation (the fine annotations' `*_instanceIds.png`), 8 thing classes.

Layout (`root` is the Cityscapes folder)::

    root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png        RGB image
    root/gtFine/{split}/{city}/{name}_gtFine_instanceIds.png      16-bit (or 32-bit) greyscale PNG

`name` is "{city}_{sequence}_{frame}" and is the sample's `image_id`. An instanceIds value v >= 1000
is instance v % 1000 of class id v // 1000; a value v < 1000 is class id v with no instance (stuff,
or a group of things, e.g. "cars" too crowded to split).

Label mapping (class ids are those of Cityscapes' labels table):

| class ids                                   | with an instance number   | without one (v < 1000) |
|---------------------------------------------|---------------------------|------------------------|
| 24 person, 25 rider, 26 car, 27 truck,      | instance, labels 1..8 in  | void 255 (a group)     |
| 28 bus, 31 train, 32 motorcycle, 33 bicycle | this order                |                        |
| 29 caravan, 30 trailer                      | void 255                  | void 255               |
| 0 unlabeled, 1 ego vehicle,                 | void 255                  | void 255               |
| 2 rectification border, 3 out of roi        |                           |                        |
| every other id (4 static, 5 dynamic,        | background 0              | background 0           |
| 6 ground, roads, buildings, sky, ...)       |                           |                        |

Choices: ids 0..3 mark pixels outside the annotated scene (unlabelled, the car's own bonnet, the
rectification border, outside the region of interest), so they are void; 4..6 are annotated scene
content that is simply no thing class, so background. Groups of a thing class are void rather than
background, because their pixels do show objects of that class. Caravan and trailer are void as in
Cityscapes' own instance evaluation (where they are ignored). Negative values (a signed 32-bit PNG)
are void.

Instances are numbered 1..M in ascending instanceIds value (so grouped by class, then by instance).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .common import (
    LabelledSample, ListedImages, assemble_sample, check_split_name, read_annotation_png, read_rgb, require_files,
)
from .synthetic import VOID

__all__ = ["CityscapesInstances", "CITYSCAPES_THING_CLASSES"]

CITYSCAPES_THING_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
"""The 8 evaluated thing classes, labels 1..8."""

_THING_IDS = (24, 25, 26, 27, 28, 31, 32, 33)  # Cityscapes class id of labels 1..8
_VOID_IDS = (0, 1, 2, 3, 29, 30)  # unlabeled, ego vehicle, rectification border, out of roi, caravan, trailer
_IMAGE_SUFFIX = "_leftImg8bit.png"
_TARGET_SUFFIX = "_gtFine_instanceIds.png"


class CityscapesInstances(ListedImages):
    """Cityscapes images with their fine instance annotations, as `LabelledSample`s (see `voc.py`).

    A map-style dataset (`len`, integer indexing) of numpy arrays; all images are 1024x2048, still
    with a varying number of instances, so batches larger than one need a custom `collate_fn`.

    Args:
        root: the Cityscapes folder holding `leftImg8bit/` and `gtFine/`.
        split: "train", "val" or "test" (any folder in `leftImg8bit/`).

    Attributes:
        image_ids: "{city}_{sequence}_{frame}" of each image, sorted by city, then name.

    Raises:
        FileNotFoundError: `leftImg8bit/{split}` is missing or holds no images, or an image has no
            instanceIds PNG (the message names the path).
        InvalidArgumentError (a ValueError): split is not a plain name; when a sample is read, an
            annotation that is not a single-channel integer PNG of the image's size, or holds more
            than 254 instances.
    """

    class_names: tuple[str, ...] = ("background",) + CITYSCAPES_THING_CLASSES
    """Indexed by label: class_names[0] == "background", class_names[1..8] the thing classes."""
    num_classes: int = len(CITYSCAPES_THING_CLASSES)

    def __init__(self, root: str | os.PathLike, split: str):
        check_split_name(split)
        self.root = Path(root)
        self.split = split
        images = self.root / "leftImg8bit" / split
        if not images.is_dir():
            available = sorted(p.name for p in (self.root / "leftImg8bit").glob("*") if p.is_dir())
            raise FileNotFoundError(
                f"{images}: Cityscapes image folder not found (available splits: {available or 'none'})"
            )
        found = sorted(images.glob(f"*/*{_IMAGE_SUFFIX}"), key=lambda p: (p.parent.name, p.name))
        if not found:
            raise FileNotFoundError(f"{images}: no {{city}}/*{_IMAGE_SUFFIX} images")
        self.image_paths = tuple(found)
        self.image_ids: tuple[str, ...] = tuple(p.name[: -len(_IMAGE_SUFFIX)] for p in found)
        self._targets = tuple(self.root / "gtFine" / split / p.parent.name / f"{i}{_TARGET_SUFFIX}"
                              for p, i in zip(found, self.image_ids))
        for city in sorted({p.parent.name for p in found}):
            names = (t.name for t in self._targets if t.parent.name == city)
            require_files(self.root / "gtFine" / split / city, names)

        # Class id (0..33) -> label 0..8 or VOID, for pixels with / without an instance number.
        self._with_instance = np.zeros(34, np.int64)
        self._with_instance[list(_VOID_IDS)] = VOID
        self._with_instance[list(_THING_IDS)] = np.arange(1, len(_THING_IDS) + 1)
        self._without_instance = self._with_instance.copy()
        self._without_instance[list(_THING_IDS)] = VOID

    def __getitem__(self, index: int) -> LabelledSample:
        position = self._position(index)
        image_id, image, path = self.image_ids[position], read_rgb(self.image_paths[position]), self._targets[position]
        values = _read_integer_png(path, image.shape[:2])  # (H, W) int64

        has_instance = values >= 1000
        class_ids = np.where(has_instance, values // 1000, values)
        known = (class_ids >= 0) & (class_ids < len(self._with_instance))
        clipped = np.where(known, class_ids, 0)
        semantic = np.where(has_instance, self._with_instance[clipped], self._without_instance[clipped])
        semantic[~known] = np.where(class_ids[~known] < 0, VOID, 0)  # negative: void; ids above 33: background
        void = semantic == VOID

        thing = has_instance & (semantic >= 1) & (semantic <= self.num_classes)
        keys, owner_of_thing = np.unique(values[thing], return_inverse=True)  # ascending instanceIds values
        owner = np.zeros(values.shape, np.int64)
        owner[thing] = owner_of_thing.reshape(-1) + 1
        labels = self._with_instance[keys // 1000]
        return assemble_sample(image, np.where(void, 0, semantic), owner, labels, void, image_id, path)


def _read_integer_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """int64 (H, W) values of a single-channel 8/16/32-bit integer PNG of the given shape."""
    modes = ("I;16", "I;16B", "I;16L", "I", "L")
    return read_annotation_png(path, shape, modes, "a single-channel integer PNG").astype(np.int64)
