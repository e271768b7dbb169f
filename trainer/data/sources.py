"""Which images and which detections a run uses: one of the datasets by name, and detections either
simulated from the ground truth (the default) or read from a detector's COCO results file.

`open_dataset(name, root=..., split=...)` opens "synthetic" (the built-in scenes; no root) or an
on-disk dataset ("voc", "sbd", "coco", "cityscapes"; see their modules for the layouts).

`with_detections(dataset, path)` attaches a COCO results file's detections to the samples, under
the key "detections" (`DetectorOutput`: boxes float32 (D, 4) xyxy inclusive image pixels, labels int64 in
1..K, scores float32). The trainer and `predict` use a sample's detections when it has them, and
simulate them from the ground truth otherwise. The file's image ids are matched against:

| dataset    | image id in the results file                          |
|------------|-------------------------------------------------------|
| synthetic  | the scene's index 0..N-1 (int)                        |
| voc, sbd   | the file stem, e.g. "2007_000032" (str)                |
| cityscapes | "{city}_{sequence}_{frame}" (str)                     |
| coco       | COCO's integer image id                               |

category_id is the label 1..K, except for COCO, where it is COCO's category id (mapped to labels as
the dataset maps its annotations). Boxes reaching outside the image are clipped to it; boxes lying
wholly outside it are dropped (detections of the image size the file's detector saw are assumed).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np

from dynseg.sdk.checks import one_of
from dynseg.sdk.coco_detections import detections_by_image, read_coco_results, refuse_normalised_boxes
from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.inputs import pixel_boxes

from .cityscapes import CityscapesInstances
from .coco import CocoInstances
from .common import Dataset, Samples
from .detections import DetectorOutput
from .sbd import SbdInstances
from .synthetic import SyntheticScenes
from .voc import VocInstances

__all__ = ["DATASETS", "DEFAULT_SPLITS", "open_dataset", "with_detections", "WithDetections", "image_ids",
           "inside_image"]

DATASETS = ("synthetic", "voc", "sbd", "coco", "cityscapes")
"""Dataset names `open_dataset` takes; "synthetic" is the default everywhere a dataset is optional."""

DEFAULT_SPLITS = {
    "train": {"voc": "train", "sbd": "train", "coco": "train2017", "cityscapes": "train"},
    "eval": {"voc": "val", "sbd": "val", "coco": "val2017", "cityscapes": "val"},
}
"""The split each command reads when none is given, per on-disk dataset."""

_LOADERS: dict[str, Callable[[str | os.PathLike, str], Dataset]] = {
    "voc": VocInstances, "sbd": SbdInstances, "coco": CocoInstances, "cityscapes": CityscapesInstances,
}


def open_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    split: str = "train",
    size: int = 256,
    image_size: tuple[int, int] = (128, 160),
    num_classes: int = 4,
    seed: int = 0,
) -> Dataset:
    """The dataset called `name` (one of DATASETS).

    "synthetic" takes size, image_size, num_classes and seed (see `SyntheticScenes`) and no root;
    the on-disk datasets take root and split and ignore the rest.

    Raises:
        InvalidArgumentError (a ValueError): an unknown name, a root given for "synthetic" or missing
            for an on-disk dataset, and whatever the dataset's constructor rejects.
        FileNotFoundError: the on-disk dataset's folders or files are missing (the message names them).
    """
    one_of("dataset", name, DATASETS)
    if name == "synthetic":
        if root is not None:
            raise InvalidArgumentError("the synthetic dataset is generated, it takes no data root")
        return SyntheticScenes(size=size, image_size=image_size, num_classes=num_classes, seed=seed)
    if root is None:
        raise InvalidArgumentError(f"dataset {name!r} needs a data root (the folder holding it)")
    return _LOADERS[name](root, split)


def image_ids(dataset: Samples) -> tuple[Hashable, ...]:
    """The id of every image of `dataset` as results files name them (see the module docstring)."""
    if isinstance(dataset, (CocoInstances, CityscapesInstances, VocInstances, SbdInstances)):
        return dataset.image_ids
    return tuple(range(len(dataset)))


class WithDetections:
    """`dataset`'s samples with a "detections" entry (`DetectorOutput`) from a results file.

    Args:
        dataset: a `Dataset` (`class_names`, `image_shape`; for COCO, `label_of_category` too).
        detections: {image id: DetectorOutput} with labels already in 1..K, one entry per image.
    """

    def __init__(self, dataset: Dataset, detections: dict[Hashable, DetectorOutput]) -> None:
        self.dataset = dataset
        self.class_names = dataset.class_names
        self._detections = [detections[image_id] for image_id in image_ids(dataset)]

    def __len__(self) -> int:
        return len(self.dataset)

    def image_shape(self, index: int) -> tuple[int, int]:
        return self.dataset.image_shape(index)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        height, width = sample["image"].shape[:2]
        sample["detections"] = inside_image(self._detections[index], height, width)
        return sample

    def __repr__(self) -> str:
        return f"WithDetections({self.dataset!r}, detections={sum(map(_count, self._detections))})"

    def fingerprint(self) -> str:
        """sha256 of the detections, image by image: what a resumed run must train on again."""
        digest = hashlib.sha256()
        for detections in self._detections:
            for key in ("boxes", "labels", "scores"):
                digest.update(np.ascontiguousarray(detections[key]).tobytes())
        return digest.hexdigest()


def detections_fingerprint(samples: Samples) -> str | None:
    """`WithDetections.fingerprint` of `samples` (also through torch Subsets of one, whose indices a run
    keeps); None for samples that carry no detections (training simulates them from the ground truth)."""
    while not isinstance(samples, WithDetections) and hasattr(samples, "dataset") and hasattr(samples, "indices"):
        samples = samples.dataset
    return samples.fingerprint() if isinstance(samples, WithDetections) else None


def with_detections(dataset: Dataset, path: str | os.PathLike) -> WithDetections:
    """`dataset` with the detections of the COCO results file at `path` (see the module docstring).

    Raises:
        FileNotFoundError: no file at path.
        InvalidArgumentError (a ValueError) naming the file: a folder, pipe or device; not a COCO
            results file (the entry at fault named), a category that is no class of the dataset, no
            detection of any image of the dataset (a file for another split or dataset), boxes in
            normalised coordinates, or none whose box lies inside its image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: detections file not found")
    ids = image_ids(dataset)
    entries = read_coco_results(path)
    found = detections_by_image(entries, ids)
    num_classes = len(dataset.class_names) - 1
    mapping = getattr(dataset, "label_of_category", None)  # COCO: category id -> label
    for image_id, detections in found.items():
        if mapping is not None:
            unknown = sorted({int(c) for c in detections["labels"]} - set(mapping))
            if unknown:
                raise InvalidArgumentError(f"{path}: image {image_id!r} has category ids {unknown}, which are "
                                           f"not in the dataset's categories {sorted(mapping)}")
            detections["labels"] = np.array([mapping[int(c)] for c in detections["labels"]], np.int64)
        elif len(detections["labels"]) and detections["labels"].max() > num_classes:
            raise InvalidArgumentError(f"{path}: image {image_id!r} has category_id {int(detections['labels'].max())}; "
                                       f"the dataset's classes are 1..{num_classes}")
    if ids and not any(map(_count, found.values())):
        # repr: an id "0" in the file is no id 0 of the dataset's
        file_ids = list(dict.fromkeys(image_id for image_id, *_ in entries))[:3]
        theirs = f"the file's are such as {', '.join(map(repr, file_ids))}" if file_ids else "the file holds no entry"
        raise InvalidArgumentError(f"{path}: no detection belongs to an image of the dataset (the dataset's image "
                                   f"ids are such as {', '.join(repr(i) for i in ids[:3])}; {theirs}; see "
                                   "dynseg.trainer.data.sources for the id of each dataset)")
    refuse_normalised_boxes(path, np.concatenate([d["boxes"] for d in found.values()]) if found
                            else np.zeros((0, 4), np.float32))
    # Boxes outside their image are dropped when a sample is read; if every box is, training would learn
    # nothing from the file. The first image with a box inside settles it, so this reads few headers.
    if ids and not any(_count(inside_image(found[image_id], *dataset.image_shape(index)))
                       for index, image_id in enumerate(ids) if _count(found[image_id])):
        raise InvalidArgumentError(f"{path}: no detection's box holds a pixel of its image (a bbox is [x, y, width, "
                                   "height] in pixels from the image's top-left corner)")
    return WithDetections(dataset, found)


def _count(detections: DetectorOutput) -> int:
    return len(detections["labels"])


def inside_image(detections: DetectorOutput, height: int, width: int) -> DetectorOutput:
    """The detections whose boxes hold a pixel of the (height, width) image, their boxes floored and
    clipped to it (`dynseg.sdk.inputs.pixel_boxes`: the rule deployment applies)."""
    boxes, outside = pixel_boxes(detections["boxes"], height, width)
    keep = ~outside
    return DetectorOutput(boxes=boxes[keep].astype(np.float32), labels=np.asarray(detections["labels"])[keep],
                          scores=np.asarray(detections["scores"])[keep])
