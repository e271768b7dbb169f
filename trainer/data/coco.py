"""COCO instance segmentation (the `instances_*.json` annotations), read with pycocotools.

Layout (`root` is the COCO folder)::

    root/annotations/instances_{split}.json    COCO annotations ("images", "annotations", "categories")
    root/{split}/{file_name}                   the images ("val2017/000000000139.jpg")

Labels: the categories in ascending category id become labels 1..K (COCO 2017: 80 classes, ids
1..90 with gaps); `category_ids[label - 1]` and `label_of_category[category_id]` convert both ways.

Rasterising one image (annotations in the order of the JSON file, polygons and RLE alike via
`COCO.annToMask`):
1. Crowd annotations (iscrowd = 1) are painted first, as void (255) in `semantic` and `instances`.
   They are never instances.
2. The other annotations are painted over them in file order; where two overlap, the later one wins
   the pixel in `instances` and `semantic`. A crowd region thus never hides an annotated object.
3. `masks[m]` is what instance m kept after step 2 (its visible, non-overwritten pixels), so the masks
   never overlap and masks[m] == (instances == m + 1). An annotation with no pixel left (empty
   polygon, or fully covered by later ones) is dropped; the rest are numbered 1..M in file order.
4. Each crowd annotation of a listed category is also kept whole, as `crowd_masks` (C, H, W) and
   `crowd_labels` (C,), for COCO mask AP's crowd rule (`trainer.evaluation`).
Images without annotations are kept, with M = 0. Images are in ascending image id.

`image_id` in a sample is COCO's integer image id, the key of COCO results files (and of
`load_coco_detections`), not the file stem.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np

from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.checks import is_int

from .common import (LabelledSample, ListedImages, assemble_sample, check_class_count, check_split_name, read_rgb,
                     require_files)

__all__ = ["CocoInstances"]

_COORDINATE_LIMIT = 1e6  # pixels: far beyond any image, far below where pycocotools' frPoly overflows


class CocoSample(LabelledSample, total=False):
    """A `LabelledSample` with the image's crowd regions (step 4 of the module docstring)."""

    crowd_masks: np.ndarray  # bool (C, H, W), each crowd annotation whole
    crowd_labels: np.ndarray  # int64 (C,) in 1..K


class CocoInstances(ListedImages):
    """COCO images with their instance annotations, as `LabelledSample`s (see `voc.py`).

    A map-style dataset (`len`, integer indexing) of numpy arrays; the images differ in size, so
    batches larger than one need a custom `collate_fn`. Needs pycocotools.

    Args:
        root: the COCO folder holding `annotations/` and the image folders.
        split: e.g. "train2017" or "val2017": reads `annotations/instances_{split}.json` and `{split}/`.

    Attributes:
        class_names: ("background", name of label 1, ..., name of label K).
        num_classes: K, the number of categories in the file.
        category_ids: COCO category id of each label 1..K (tuple indexed by label - 1), ascending.
        label_of_category: {COCO category id: label 1..K}.
        image_ids: COCO image ids in dataset order (ascending).

    Raises:
        FileNotFoundError: the annotation file, the image folder or an image it lists is missing.
        InvalidArgumentError (a ValueError): split is not a plain name; the annotation file is not
            COCO JSON, has no categories, an image record lacks an int id, height or width or a str
            file_name, or repeats an id, or an annotation names an unknown image or category or has a
            segmentation pycocotools cannot rasterise at its image's size (see `_segmentation_problem`);
            when a sample is read, an image whose size differs from the annotation's width and height.
    """

    def __init__(self, root: str | os.PathLike, split: str):
        check_split_name(split)
        try:
            from pycocotools.coco import COCO
        except ImportError as error:
            raise ImportError("CocoInstances needs pycocotools (pip install pycocotools)") from error

        self.root = Path(root)
        self.split = split
        self.annotation_file = self.root / "annotations" / f"instances_{split}.json"
        self.image_folder = self.root / split
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"{self.annotation_file}: COCO annotation file not found")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
                self._coco = COCO(str(self.annotation_file))
        except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, over-long integers, deep nesting
            raise InvalidArgumentError(f"{self.annotation_file}: not valid JSON ({error})") from error
        except (AssertionError, KeyError, TypeError) as error:  # COCO.createIndex on a malformed file
            raise InvalidArgumentError(f"{self.annotation_file}: not a COCO annotation file ({error!r})") from error

        odd = [c for c in self._coco.cats if not is_int(c)]
        if odd:
            raise InvalidArgumentError(f"{self.annotation_file}: category ids must be integers, got {odd[0]!r}")
        self.category_ids: tuple[int, ...] = tuple(sorted(self._coco.cats))
        if not self.category_ids:
            raise InvalidArgumentError(f"{self.annotation_file}: no categories")
        # pycocotools keeps the last of a repeated id: the class would change name silently
        listed = Counter(category.get("id") for category in self._coco.dataset["categories"])
        repeated = sorted(c for c, n in listed.items() if n > 1)
        if repeated:
            raise InvalidArgumentError(f"{self.annotation_file}: category ids {repeated} are listed more than once")
        names = [self._coco.cats[c].get("name") for c in self.category_ids]
        unnamed = next((c for c, name in zip(self.category_ids, names) if not (isinstance(name, str) and name)), None)
        if unnamed is not None:
            raise InvalidArgumentError(f"{self.annotation_file}: category {unnamed} has no name (a non-empty string)")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise InvalidArgumentError(f"{self.annotation_file}: several categories are named {twice[0]!r}; a class "
                                       "name must name one class")
        self.label_of_category: dict[int, int] = {c: label for label, c in enumerate(self.category_ids, start=1)}
        self.class_names: tuple[str, ...] = ("background", *names)
        self.num_classes = len(self.category_ids)
        check_class_count(self.num_classes, str(self.annotation_file))
        self._check_images()
        # The file's list, not `_coco.anns`: that keeps one annotation per id, `imgToAnns` (what is drawn) keeps all.
        for index, annotation in enumerate(self._coco.dataset.get("annotations", [])):
            where = f"{self.annotation_file}: annotation {annotation.get('id')!r} (#{index} in 'annotations')"
            image_id = annotation.get("image_id")
            if not is_int(image_id) or image_id not in self._coco.imgs:  # not is_int: True and 1.0 would match 1
                raise InvalidArgumentError(f"{where} names image {image_id!r}, not in 'images'")
            crowd = annotation.get("iscrowd", 0)
            if not (is_int(crowd) and crowd in (0, 1)):  # "no" or 2 would count as a crowd, silently
                raise InvalidArgumentError(f"{where} has iscrowd {crowd!r}; it must be 0 or 1")
            category = annotation.get("category_id")
            if not crowd and not (is_int(category) and category in self.label_of_category):
                raise InvalidArgumentError(f"{where} has category {category!r}, not in 'categories'")
            if "segmentation" not in annotation:
                raise InvalidArgumentError(f"{where} has no 'segmentation'")
            image = self._coco.imgs[image_id]
            problem = _segmentation_problem(annotation["segmentation"], image["height"], image["width"])
            if problem:
                raise InvalidArgumentError(f"{where} of image {image_id}: {problem}")
        self.image_ids: tuple[int, ...] = tuple(sorted(self._coco.imgs))
        if not self.image_ids:  # as the other loaders refuse an empty split list: nothing to train or score on
            raise InvalidArgumentError(f"{self.annotation_file}: 'images' is empty")
        names = [self._coco.imgs[i]["file_name"] for i in self.image_ids]
        require_files(self.image_folder, names)
        self.image_paths = tuple(self.image_folder / name for name in names)

    def _check_images(self) -> None:
        """Every image record has an int id (listed once), int height and width >= 1 and a str file_name."""
        seen = set()  # pycocotools' index keeps the last record of a repeated id, silently
        for index, record in enumerate(self._coco.dataset.get("images", [])):
            where = f"{self.annotation_file}: image {record.get('id')!r} (#{index} in 'images')"
            if not is_int(record.get("id")):
                raise InvalidArgumentError(f"{where}: 'id' must be an int")
            if record["id"] in seen:
                raise InvalidArgumentError(f"{where}: the id is listed twice in 'images'")
            seen.add(record["id"])
            for key in ("height", "width"):
                if not is_int(record.get(key)) or record[key] < 1:
                    raise InvalidArgumentError(f"{where}: {key!r} must be an int >= 1, got {record.get(key)!r}")
            if not isinstance(record.get("file_name"), str):
                raise InvalidArgumentError(f"{where}: 'file_name' must be a string, got {record.get('file_name')!r}")

    def image_shape(self, index: int) -> tuple[int, int]:
        """(H, W) as the annotation file records it (`__getitem__` checks the image against it)."""
        record = self._coco.imgs[self.image_ids[self._position(index)]]
        return int(record["height"]), int(record["width"])

    def __getitem__(self, index: int) -> CocoSample:
        position = self._position(index)
        image_id, path = self.image_ids[position], self.image_paths[position]
        image = read_rgb(path)
        shape = self.image_shape(index)
        if image.shape[:2] != shape:
            raise InvalidArgumentError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]}, the annotation says {shape[1]}x{shape[0]} (WxH)"
            )

        annotations = self._coco.imgToAnns.get(image_id, [])  # file order
        crowds = []  # (mask, label) of each crowd of a listed category: the others are void alone
        void = np.zeros(shape, bool)
        for annotation in annotations:
            if annotation.get("iscrowd", 0):
                mask = self._coco.annToMask(annotation).astype(bool)
                void |= mask
                if is_int(annotation.get("category_id")) and annotation["category_id"] in self.label_of_category:
                    crowds.append((mask, self.label_of_category[annotation["category_id"]]))
        semantic = np.zeros(shape, np.int64)
        owner = np.zeros(shape, np.int64)
        labels = []
        for annotation in annotations:
            if annotation.get("iscrowd", 0):
                continue
            mask = self._coco.annToMask(annotation).astype(bool)  # (H, W)
            labels.append(self.label_of_category[annotation["category_id"]])
            owner[mask] = len(labels)
            semantic[mask] = labels[-1]
            void[mask] = False
        return CocoSample(**assemble_sample(image, semantic, owner, labels, void, image_id, self.annotation_file),
                          crowd_masks=np.stack([m for m, _ in crowds]) if crowds else np.zeros((0, *shape), bool),
                          crowd_labels=np.array([label for _, label in crowds], np.int64))


def _segmentation_problem(segmentation: object, height: int, width: int) -> str | None:
    """What keeps pycocotools from rasterising a COCO segmentation on a height x width image; None if nothing.

    pycocotools would otherwise raise an unhelpful error in `annToMask` (an empty list, a polygon of fewer than
    3 points, a null), decode an RLE of another size than the image, or, worse, return wrong pixels: RLE runs
    that do not cover the image leave the rest of the mask uninitialised, and frPoly turns coordinates of 4.3e8
    or more into overflowed C ints (and allocates memory for every pixel along an edge).
    """
    if isinstance(segmentation, list):
        if not segmentation:
            return "'segmentation' is an empty list of polygons"
        for k, polygon in enumerate(segmentation):
            if not _is_polygon(polygon):
                return (f"polygon {k} is not a list of an even number (>= 6) of finite coordinates x, y, ... "
                        f"of at most {_COORDINATE_LIMIT:g} in magnitude")
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if size != [height, width] or not all(map(is_int, size)):
            return f"RLE size {size!r} is not the image's [height, width] = [{height}, {width}]"
        if isinstance(counts, str):
            runs = _compressed_runs(counts)
        else:
            runs = counts if isinstance(counts, list) and all(map(is_int, counts)) else None
        if runs is None or min(runs, default=0) < 0 or sum(runs) != height * width:
            return f"RLE counts are not runs (a list of ints or a compressed string) adding up to {height} x {width}"
        return None
    return f"'segmentation' is {type(segmentation).__name__}, neither a list of polygons nor an RLE dict"


def _is_polygon(polygon: object) -> bool:
    # The chained comparison also refuses NaN and infinities (and is exact for ints past float range).
    return (
        isinstance(polygon, list)
        and len(polygon) >= 6
        and len(polygon) % 2 == 0
        and all(type(value) in (int, float) and -_COORDINATE_LIMIT <= value <= _COORDINATE_LIMIT for value in polygon)
    )


def _compressed_runs(counts: str) -> list[int] | None:
    """Run lengths of a compressed RLE string, decoded as pycocotools' rleFrString does; None if malformed.

    Each run is a little-endian base-32 number of characters 48 + (5 bits | 0x20 when more follow), sign-extended
    from its last 5 bits; from the third run on, it is stored as the difference to the run two before.
    """
    runs: list[int] = []
    value, shift = 0, 0
    for char in counts:
        code = ord(char) - 48
        if not 0 <= code < 64:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
        value, shift = 0, 0
    return runs if shift == 0 else None  # shift > 0: the string ends inside a number (rleFrString reads past it)
