"""Tiny datasets in their exact on-disk formats, for the loader tests and the command-line tests.

Pascal VOC 2012 (palette PNGs), SBD (MATLAB structs), COCO (instances JSON with polygons and RLE) and
Cityscapes (16-bit instanceIds PNGs); every image is H x W. Each `write_*` returns the root to give
the loader (and `dynseg train --data-root`); the `*_maps` / `*_ids` functions give what was written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dynseg.trainer.data import VOC_CLASSES, VOID

H, W = 24, 32
PERSON, CAR, DOG = VOC_CLASSES.index("person") + 1, VOC_CLASSES.index("car") + 1, VOC_CLASSES.index("dog") + 1


def write_rgb(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), colour, np.uint8)).save(path)


def write_palette_png(path: Path, indices: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    png = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.astype(np.uint8).tobytes())
    png.putpalette([value for i in range(256) for value in (i, 255 - i, (7 * i) % 256)])
    png.save(path)


def voc_maps() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, class indices, object indices) of two images: three objects with a void border, then none."""
    classes, objects = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    classes[2:10, 3:11], objects[2:10, 3:11] = PERSON, 1
    classes[5, 5] = CAR  # one stray pixel: the majority (person) still labels object 1
    classes[12:21, 14:28], objects[12:21, 14:28] = CAR, 2
    classes[11, 14:28], objects[11, 14:28] = VOID, VOID  # a void border in both maps
    classes[20, 14:20] = VOID  # ... and one only in the class map: void everywhere all the same
    classes[4:9, 20:26], objects[4:9, 20:26] = PERSON, 3
    classes[0, 28:32], objects[0, 28:32] = VOID, 4  # an object with only void pixels: dropped
    empty = np.zeros((H, W), np.uint8)
    return [("2007_000032", classes, objects), ("2007_000039", empty, empty)]


def write_voc(devkit: Path, split: str = "val") -> Path:
    root = devkit / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    maps = voc_maps()
    (lists / f"{split}.txt").write_text("".join(f"{image_id}\n" for image_id, _, _ in maps))
    for image_id, classes, objects in maps:
        write_rgb(root / "JPEGImages" / f"{image_id}.jpg", (200, 40, 90))
        write_palette_png(root / "SegmentationClass" / f"{image_id}.png", classes)
        write_palette_png(root / "SegmentationObject" / f"{image_id}.png", objects)
    return root


def sbd_maps() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(id, class map, instance map, categories (M, 1)) of two images: three instances, then one."""
    classes, instances = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    classes[1:8, 2:12], instances[1:8, 2:12] = DOG, 1
    classes[10:22, 5:15], instances[10:22, 5:15] = PERSON, 2
    classes[12:20, 16:30], instances[12:20, 16:30] = PERSON, 3
    classes[3:6, 10:14], instances[3:6, 10:14] = PERSON, 2  # instance 2 in two parts, over the dog
    second_classes, second_instances = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    second_classes[5:9, 5:9], second_instances[5:9, 5:9] = CAR, 1
    return [
        ("2008_000002", classes, instances, np.array([[DOG], [PERSON], [PERSON]], np.uint8)),
        ("2008_000003", second_classes, second_instances, np.array([[CAR]], np.uint8)),
    ]


def write_sbd(root: Path, split: str = "train") -> Path:
    from scipy.io import savemat

    for folder in ("img", "cls", "inst"):
        (root / folder).mkdir(parents=True)
    maps = sbd_maps()
    (root / f"{split}.txt").write_text("".join(f"{image_id}\n" for image_id, *_ in maps))
    for image_id, classes, instances, categories in maps:
        write_rgb(root / "img" / f"{image_id}.jpg", (30, 160, 220))
        boundaries = np.empty((1, 1), object)
        boundaries[0, 0] = np.zeros((H, W), bool)
        savemat(root / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": classes, "Boundaries": boundaries}})
        savemat(root / "inst" / f"{image_id}.mat", {"GTinst": {"Segmentation": instances, "Categories": categories}})
    return root


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def compressed_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def write_coco(root: Path, split: str = "val2017") -> tuple[Path, dict]:
    (root / "annotations").mkdir(parents=True)
    images = [
        {"id": 139, "file_name": "000000000139.jpg", "height": H, "width": W},
        {"id": 42, "file_name": "000000000042.jpg", "height": H, "width": W},
        {"id": 7, "file_name": "000000000007.jpg", "height": H, "width": W},  # no annotations
    ]
    categories = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    polygon = [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]]  # a person, overlapped by the later car
    rows = [  # (image, category, crowd, segmentation), in file order
        (139, 1, 0, polygon),
        (139, 3, 0, compressed_rle(rect(6, 14, 8, 20))),
        (139, 1, 1, uncompressed_rle(rect(14, 24, 0, 32))),  # a crowd, partly under the later dog
        (139, 18, 0, compressed_rle(rect(18, 22, 4, 10))),
        (42, 18, 0, compressed_rle(rect(3, 6, 3, 6))),  # entirely under the later car
        (42, 3, 0, compressed_rle(rect(2, 8, 2, 8))),
    ]
    annotations = [
        {"id": i, "image_id": image, "category_id": category, "iscrowd": crowd, "segmentation": segmentation}
        for i, (image, category, crowd, segmentation) in enumerate(rows, start=1)
    ]
    for annotation in annotations:
        annotation.update(area=1.0, bbox=[0, 0, 1, 1])
    for image in images:
        write_rgb(root / split / image["file_name"], (10, 250, 120))
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))
    return root, dataset


def cityscapes_ids() -> np.ndarray:
    """instanceIds values of one image: persons, cars, a bicycle, a car group, a caravan, void and stuff."""
    values = np.full((H, W), 7, np.uint16)  # road
    values[0:2, :] = 1  # ego vehicle: void
    values[2:4, :] = 4  # static: background
    values[5:12, 2:6] = 24000  # person, instance number 0
    values[5:12, 7:10] = 24001  # another person
    values[13:20, 2:12] = 26003  # car
    values[14:18, 13:20] = 26  # a group of cars: void
    values[19:23, 22:30] = 29001  # caravan: void
    values[6:10, 24:31] = 33002  # bicycle
    values[8:10, 14:18] = 21  # vegetation: background
    return values


def write_cityscapes(root: Path, split: str = "val") -> Path:
    for city, name in (("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000001_000019")):
        write_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", (90, 90, 200))
        target = root / "gtFine" / split / city / f"{name}_gtFine_instanceIds.png"
        target.parent.mkdir(parents=True)
        Image.fromarray(cityscapes_ids() if city == "frankfurt" else np.full((H, W), 24007, np.uint16)).save(target)
    return root
