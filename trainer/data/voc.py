"""Pascal VOC 2012 instance segmentation (the `SegmentationObject` annotations).

Layout (`root` is either the VOCdevkit folder that holds `VOC2012/`, or the `VOC2012/` folder itself;
the first is tried first)::

    VOC2012/ImageSets/Segmentation/{split}.txt    one image id per line ("2007_000032")
    VOC2012/JPEGImages/{id}.jpg                   RGB image
    VOC2012/SegmentationClass/{id}.png            palette PNG: index = class 0..20, 255 = void
    VOC2012/SegmentationObject/{id}.png           palette PNG: index = instance 1..M, 0 = none, 255 = void

The PNGs are read as their palette indices (not their colours). A pixel is void where either PNG says
255 (the two void borders coincide in the release; the union is taken so that `semantic` and
`instances` are void at exactly the same pixels). An instance's class is the most frequent class
among its non-void pixels that carry a class (1..20), and `semantic` takes that class on all of its
pixels (so a stray class-PNG pixel that disagrees is overruled); an instance with no such pixel is
dropped, and its pixels keep the class PNG's value in `semantic` and become 0 in `instances`.
Instances are numbered 1..M in the order of their ids in the object PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dynseg.sdk.errors import InvalidArgumentError

from .common import (
    LabelledSample, ListedImages, assemble_sample, check_split_name, read_id_list, read_indexed_png, read_rgb,
    require_files,
)
from .synthetic import VOID

__all__ = ["VocInstances", "VOC_CLASSES"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""The 20 Pascal VOC classes in label order 1..20 (the order of the devkit and of SBD)."""


class VocInstances(ListedImages):
    """Pascal VOC 2012 segmentation images with their instance (object) annotations.

    A map-style dataset (`len`, integer indexing) returning `LabelledSample`s of numpy arrays; the
    images differ in size, so batches larger than one need a custom `collate_fn`.

    Args:
        root: the VOCdevkit folder (containing `VOC2012/`) or the `VOC2012/` folder itself.
        split: a list in `ImageSets/Segmentation/`, e.g. "train", "val" or "trainval".

    Raises:
        FileNotFoundError: the VOC2012 folder, the split list, or an image / PNG the list names is
            missing (the message names the path, and for a missing split the available ones).
        InvalidArgumentError (a ValueError): split is not a plain name, or the split list is empty.
    """

    class_names: tuple[str, ...] = ("background",) + VOC_CLASSES
    """Indexed by label: class_names[0] == "background", class_names[1..20] the VOC classes."""
    num_classes: int = len(VOC_CLASSES)

    def __init__(self, root: str | os.PathLike, split: str):
        check_split_name(split)
        self.root = _voc2012_folder(Path(root))
        self.split = split
        lists = self.root / "ImageSets" / "Segmentation"
        self.image_ids: tuple[str, ...] = read_id_list(lists / f"{split}.txt", lists)
        """Image ids (file stems) in the split list's order."""
        for folder, suffix in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png"), ("SegmentationObject", ".png")):
            require_files(self.root / folder, (image_id + suffix for image_id in self.image_ids))
        self.image_paths = tuple(self.root / "JPEGImages" / f"{image_id}.jpg" for image_id in self.image_ids)

    def __getitem__(self, index: int) -> LabelledSample:
        position = self._position(index)
        image_id, image = self.image_ids[position], read_rgb(self.image_paths[position])
        class_path = self.root / "SegmentationClass" / f"{image_id}.png"
        object_path = self.root / "SegmentationObject" / f"{image_id}.png"
        classes = read_indexed_png(class_path, image.shape[:2])
        objects = read_indexed_png(object_path, image.shape[:2])
        unknown = np.setdiff1d(np.unique(classes), [*range(self.num_classes + 1), VOID])
        if unknown.size:
            raise InvalidArgumentError(f"{class_path}: class indices {unknown.tolist()} are not in 0..20 or 255")

        void = (classes == VOID) | (objects == VOID)
        ids = np.setdiff1d(np.unique(objects), [0, VOID])  # instance ids in the PNG, ascending
        owner = np.zeros(objects.shape, np.int64)
        labels = []
        for object_id in ids:
            pixels = (objects == object_id) & ~void
            votes = np.bincount(classes[pixels], minlength=self.num_classes + 1)[1 : self.num_classes + 1]
            if votes.sum() == 0:  # no classed pixel: not an instance we can label
                continue
            labels.append(int(np.argmax(votes)) + 1)  # ties go to the lower class index
            owner[pixels] = len(labels)
        return assemble_sample(image, classes.astype(np.int64), owner, labels, void, image_id, object_path)


def _voc2012_folder(root: Path) -> Path:
    for candidate in (root / "VOC2012", root):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{root}: no VOC2012 segmentation data: expected {root / 'VOC2012' / 'ImageSets' / 'Segmentation'} "
        f"(root = VOCdevkit) or {root / 'ImageSets' / 'Segmentation'} (root = VOC2012)"
    )

