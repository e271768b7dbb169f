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
Images without annotations are kept, with M = 0. Images are in ascending image id.

`image_id` in a sample is COCO's integer image id, the key of COCO results files (and of
`load_coco_detections`), not the file stem.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np

from dynseg.sdk.errors import InvalidArgumentError

from .common import LabelledSample, assemble_sample, check_index, check_split_name, read_rgb, require_files

__all__ = ["CocoInstances"]


class CocoInstances:
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
            COCO JSON, has no categories, or an annotation names an unknown image or category; when
            a sample is read, an image whose size differs from the annotation's width and height.
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
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidArgumentError(f"{self.annotation_file}: not valid JSON ({error})") from error
        except (AssertionError, KeyError, TypeError) as error:  # COCO.createIndex on a malformed file
            raise InvalidArgumentError(f"{self.annotation_file}: not a COCO annotation file ({error!r})") from error

        self.category_ids: tuple[int, ...] = tuple(sorted(self._coco.cats))
        if not self.category_ids:
            raise InvalidArgumentError(f"{self.annotation_file}: no categories")
        self.label_of_category: dict[int, int] = {c: label for label, c in enumerate(self.category_ids, start=1)}
        self.class_names: tuple[str, ...] = ("background",) + tuple(
            str(self._coco.cats[c].get("name", c)) for c in self.category_ids
        )
        self.num_classes = len(self.category_ids)
        for annotation in self._coco.anns.values():
            where = f"{self.annotation_file}: annotation {annotation.get('id')!r}"
            if annotation.get("image_id") not in self._coco.imgs:
                raise InvalidArgumentError(f"{where} names image {annotation.get('image_id')!r}, not in 'images'")
            if not annotation.get("iscrowd", 0) and annotation.get("category_id") not in self.label_of_category:
                category = annotation.get("category_id")
                raise InvalidArgumentError(f"{where} has category {category!r}, not in 'categories'")
            if "segmentation" not in annotation:
                raise InvalidArgumentError(f"{where} has no 'segmentation'")
        self.image_ids: tuple[int, ...] = tuple(sorted(self._coco.imgs))
        require_files(self.image_folder, (self._coco.imgs[i]["file_name"] for i in self.image_ids))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> LabelledSample:
        image_id = self.image_ids[check_index(index, len(self.image_ids))]
        record = self._coco.imgs[image_id]
        path = self.image_folder / record["file_name"]
        image = read_rgb(path)
        shape = (int(record["height"]), int(record["width"]))
        if image.shape[:2] != shape:
            raise InvalidArgumentError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]}, the annotation says {shape[1]}x{shape[0]} (WxH)"
            )

        annotations = self._coco.imgToAnns.get(image_id, [])  # file order
        void = np.zeros(shape, bool)
        for annotation in annotations:
            if annotation.get("iscrowd", 0):
                void |= self._coco.annToMask(annotation).astype(bool)
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
        return assemble_sample(image, semantic, owner, labels, void, image_id, self.annotation_file)

    def __repr__(self) -> str:
        return f"CocoInstances(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"

