"""SBD, the Semantic Boundaries Dataset (Hariharan et al. 2011): instance masks for 11,355 VOC images.

Layout (`root` is the release's `dataset/` folder)::

    root/{split}.txt         one image id per line ("2008_000002"); the release has train.txt and val.txt
    root/img/{id}.jpg        RGB image
    root/cls/{id}.mat        struct GTcls with field Segmentation: (H, W) class map 0..20
    root/inst/{id}.mat       struct GTinst with fields Segmentation: (H, W) instance map 0..M
                             and Categories: (M, 1) class 1..20 of instance m at row m - 1

The .mat files are MATLAB v5 files read with `scipy.io.loadmat` (other fields, such as Boundaries,
are ignored). SBD has no void label: `semantic` and `instances` never hold 255. Classes are the 20 VOC
classes in VOC order. Instances are numbered 1..M in the order of their ids in GTinst; an id absent
from the map is dropped (the others are renumbered).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dynseg.sdk.errors import InvalidArgumentError

from .common import (
    LabelledSample,
    ListedImages,
    assemble_sample,
    check_split_name,
    read_id_list,
    read_rgb,
    require_files,
)

from .voc import VOC_CLASSES

__all__ = ["SbdInstances"]


class SbdInstances(ListedImages):
    """SBD images with their instance annotations (the `inst/` and `cls/` .mat files).

    A map-style dataset (`len`, integer indexing) returning `LabelledSample`s of numpy arrays (see
    `voc.py`); the images differ in size, so batches larger than one need a custom `collate_fn`.
    Needs scipy (imported when the dataset is created).

    Args:
        root: the SBD `dataset/` folder (holding `img/`, `cls/`, `inst/` and the split lists).
        split: a list `root/{split}.txt`, e.g. "train" or "val".

    Raises:
        FileNotFoundError: the split list or a file it names is missing (the message names the path).
        InvalidArgumentError (a ValueError): split is not a plain name, the list is empty; when a
            sample is read: a .mat file is unreadable or lacks the struct or field, a map is not 2-D or
            not the image's size, a map or Categories holds anything but whole numbers, classes are
            outside 0..20, or the instance map has ids without a category.
    """

    class_names: tuple[str, ...] = ("background",) + VOC_CLASSES
    """Indexed by label: class_names[0] == "background", class_names[1..20] the VOC classes."""
    num_classes: int = len(VOC_CLASSES)

    def __init__(self, root: str | os.PathLike, split: str):
        check_split_name(split)
        import scipy.io  # noqa: F401  (fail here, not in a DataLoader worker, when scipy is missing)

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: SBD dataset folder not found")
        self.split = split
        self.image_ids: tuple[str, ...] = read_id_list(self.root / f"{split}.txt", self.root)
        """Image ids (file stems) in the split list's order."""
        for folder, suffix in (("img", ".jpg"), ("cls", ".mat"), ("inst", ".mat")):
            require_files(self.root / folder, (image_id + suffix for image_id in self.image_ids))
        self.image_paths = tuple(self.root / "img" / f"{image_id}.jpg" for image_id in self.image_ids)

    def __getitem__(self, index: int) -> LabelledSample:
        position = self._position(index)
        image_id, image = self.image_ids[position], read_rgb(self.image_paths[position])
        shape = image.shape[:2]
        cls_path, inst_path = self.root / "cls" / f"{image_id}.mat", self.root / "inst" / f"{image_id}.mat"

        classes = _map(_fields(cls_path, "GTcls", ("Segmentation",))[0], cls_path, "GTcls.Segmentation", shape)
        if classes.size and (classes.min() < 0 or classes.max() > self.num_classes):
            raise InvalidArgumentError(f"{cls_path}: GTcls.Segmentation has classes outside 0..{self.num_classes}")
        segmentation, categories = _fields(inst_path, "GTinst", ("Segmentation", "Categories"))
        owner = _map(segmentation, inst_path, "GTinst.Segmentation", shape)
        categories = _whole_numbers(categories, inst_path, "GTinst.Categories").reshape(-1)  # (M,) from (M, 1), (0, 0)
        if owner.size and owner.min() < 0:
            raise InvalidArgumentError(f"{inst_path}: GTinst.Segmentation has a negative instance id, {owner.min()}")
        if owner.size and owner.max() > len(categories):
            raise InvalidArgumentError(
                f"{inst_path}: GTinst.Segmentation has ids up to {owner.max()} but Categories lists {len(categories)}"
            )
        if categories.size and (categories.min() < 1 or categories.max() > self.num_classes):
            raise InvalidArgumentError(f"{inst_path}: GTinst.Categories has classes outside 1..{self.num_classes}")
        no_void = np.zeros(shape, bool)
        return assemble_sample(image, classes, owner, categories, no_void, image_id, inst_path)


def _fields(path: Path, struct: str, fields: tuple[str, ...]) -> list[np.ndarray]:
    """Fields of a 1x1 MATLAB struct stored in a .mat file, as loadmat gives them (at least 2-D)."""
    import scipy.io

    try:
        contents = scipy.io.loadmat(path, variable_names=[struct])
    except MemoryError:  # the machine's, not the file's
        raise
    except Exception as error:  # a truncated or corrupt file fails anywhere in scipy (IndexError, struct.error, ...)
        raise InvalidArgumentError(f"{path}: not a readable MATLAB file ({error})") from error
    if struct not in contents:
        found = sorted(name for name in contents if not name.startswith("__"))
        raise InvalidArgumentError(f"{path}: no variable {struct!r} (found {found})")
    value = contents[struct]
    names = value.dtype.names or ()
    missing = [field for field in fields if field not in names]
    if missing or value.size != 1:
        raise InvalidArgumentError(
            f"{path}: {struct} is not a 1x1 struct with fields {list(fields)} (has {list(names)}, size {value.size})"
        )
    record = value.reshape(-1)[0]
    return [record[field] for field in fields]


def _map(values: np.ndarray, path: Path, field: str, shape: tuple[int, int]) -> np.ndarray:
    """int64 (H, W) copy of a per-pixel map, checked against the image shape."""
    values = np.asarray(values)
    if values.shape != shape:
        raise InvalidArgumentError(f"{path}: {field} has shape {values.shape}, the image is {shape} (H, W)")
    return _whole_numbers(values, path, field)


def _whole_numbers(values: np.ndarray, path: Path, field: str) -> np.ndarray:
    """int64 copy of a numeric array whose values are all whole numbers (astype alone truncates 1.7 to 1)."""
    values = np.asarray(values)
    whole = values.dtype.kind in "biu" or (
        values.dtype.kind == "f" and np.isfinite(values).all() and np.array_equal(values, np.round(values))
    )
    if not whole:
        raise InvalidArgumentError(f"{path}: {field} must hold whole numbers, got {values.dtype} values")
    return values.astype(np.int64)
