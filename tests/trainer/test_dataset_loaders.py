"""The on-disk dataset loaders (dynseg.trainer.data): Pascal VOC 2012, SBD, COCO and Cityscapes.

Each test writes a tiny fixture in the dataset's exact on-disk format (palette PNGs, MATLAB structs,
COCO JSON with polygons and RLE, 16-bit instanceIds PNGs) and checks what the loader makes of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynseg.trainer.data import (
    VOC_CLASSES,
    VOID,
    CityscapesInstances,
    CocoInstances,
    SbdInstances,
    VocInstances,
)

H, W = 24, 32
PERSON, CAR, DOG = VOC_CLASSES.index("person") + 1, VOC_CLASSES.index("car") + 1, VOC_CLASSES.index("dog") + 1


def _box(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [cols[0], rows[0], cols[-1], rows[-1]]


def _check_contract(sample: dict, num_classes: int) -> None:
    """The invariants every loader's sample keeps (the SyntheticScenes format, masks without void)."""
    count = len(sample["labels"])
    assert sample["image"].shape == (H, W, 3) and sample["image"].dtype == np.uint8
    assert sample["semantic"].shape == (H, W) and sample["semantic"].dtype == np.int64
    assert sample["instances"].shape == (H, W) and sample["instances"].dtype == np.int32
    assert sample["masks"].shape == (count, H, W) and sample["masks"].dtype == bool
    assert sample["labels"].shape == (count,) and sample["labels"].dtype == np.int64
    assert sample["boxes"].shape == (count, 4) and sample["boxes"].dtype == np.float32
    assert set(np.unique(sample["semantic"])) <= {0, VOID, *range(1, num_classes + 1)}
    assert set(np.unique(sample["instances"])) <= {0, VOID, *range(1, count + 1)}
    np.testing.assert_array_equal(sample["semantic"] == VOID, sample["instances"] == VOID)
    assert sample["masks"].sum(axis=0).max(initial=0) <= 1, "masks overlap"
    for m, mask in enumerate(sample["masks"]):
        np.testing.assert_array_equal(mask, sample["instances"] == m + 1)
        assert np.all(sample["semantic"][mask] == sample["labels"][m])
        np.testing.assert_array_equal(sample["boxes"][m], _box(mask))
    assert np.all((sample["labels"] >= 1) & (sample["labels"] <= num_classes))


def _write_rgb(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), colour, np.uint8)).save(path)


def _write_palette_png(path: Path, indices: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    png = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.astype(np.uint8).tobytes())
    png.putpalette([value for i in range(256) for value in (i, 255 - i, (7 * i) % 256)])
    png.save(path)


# ------------------------------------------------------------------------------------ Pascal VOC 2012


def _voc_maps() -> list[tuple[str, np.ndarray, np.ndarray]]:
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


def _write_voc(devkit: Path, split: str = "val") -> Path:
    root = devkit / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    maps = _voc_maps()
    (lists / f"{split}.txt").write_text("".join(f"{image_id}\n" for image_id, _, _ in maps))
    for image_id, classes, objects in maps:
        _write_rgb(root / "JPEGImages" / f"{image_id}.jpg", (200, 40, 90))
        _write_palette_png(root / "SegmentationClass" / f"{image_id}.png", classes)
        _write_palette_png(root / "SegmentationObject" / f"{image_id}.png", objects)
    return root


def test_the_voc_fixture_pngs_read_back_as_palette_indices(tmp_path):
    root = _write_voc(tmp_path)
    _, classes, _ = _voc_maps()[0]
    with Image.open(root / "SegmentationClass" / "2007_000032.png") as png:
        assert png.mode == "P"
        np.testing.assert_array_equal(np.asarray(png), classes)


def test_voc_gives_each_object_its_majority_class_and_voids_both_borders(tmp_path):
    _write_voc(tmp_path)
    dataset = VocInstances(tmp_path, "val")
    assert len(dataset) == 2 and dataset.num_classes == 20
    assert dataset.class_names[0] == "background" and dataset.class_names[PERSON] == "person"
    sample = dataset[0]
    _check_contract(sample, 20)
    assert sample["image_id"] == "2007_000032"
    np.testing.assert_array_equal(sample["labels"], [PERSON, CAR, PERSON])
    np.testing.assert_array_equal(sample["boxes"], [[3, 2, 10, 9], [14, 12, 27, 20], [20, 4, 25, 8]])
    _, classes, objects = _voc_maps()[0]
    void = (classes == VOID) | (objects == VOID)
    np.testing.assert_array_equal(sample["semantic"] == VOID, void)
    classes_but_stray = classes.copy()
    classes_but_stray[5, 5] = PERSON
    # The class map, except where object 1 (a person by majority) overrules its stray car pixel.
    np.testing.assert_array_equal(sample["semantic"][~void], classes_but_stray[~void])
    assert sample["masks"][1].sum() == 9 * 14 - 6  # the car minus the class-only void pixels
    assert abs(sample["image"].astype(float).mean(axis=(0, 1)) - [200, 40, 90]).max() < 4  # JPEG, RGB order


def test_voc_images_without_objects_have_no_instances(tmp_path):
    _write_voc(tmp_path)
    sample = VocInstances(tmp_path, "val")[-1]
    _check_contract(sample, 20)
    assert sample["masks"].shape == (0, H, W) and sample["boxes"].shape == (0, 4)
    assert not sample["semantic"].any() and not sample["instances"].any()


def test_voc_accepts_the_voc2012_folder_itself_as_root(tmp_path):
    root = _write_voc(tmp_path)
    np.testing.assert_array_equal(VocInstances(root, "val")[0]["masks"], VocInstances(tmp_path, "val")[0]["masks"])


def test_voc_names_the_missing_split_list_and_the_available_ones(tmp_path):
    _write_voc(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train\.txt.*available.*'val'"):
        VocInstances(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no VOC2012 segmentation data"):
        VocInstances(tmp_path / "elsewhere", "val")


def test_voc_names_a_missing_object_png(tmp_path):
    root = _write_voc(tmp_path)
    (root / "SegmentationObject" / "2007_000039.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"SegmentationObject.*2007_000039\.png"):
        VocInstances(tmp_path, "val")


def test_voc_rejects_annotations_saved_as_colours_instead_of_indices(tmp_path):
    root = _write_voc(tmp_path)
    Image.new("RGB", (W, H)).save(root / "SegmentationClass" / "2007_000032.png")
    with pytest.raises(ValueError, match=r"2007_000032\.png.*palette"):
        VocInstances(tmp_path, "val")[0]


# ------------------------------------------------------------------------------------------------ SBD


def _sbd_maps() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
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


def _write_sbd(root: Path, split: str = "train") -> Path:
    from scipy.io import savemat

    for folder in ("img", "cls", "inst"):
        (root / folder).mkdir(parents=True)
    maps = _sbd_maps()
    (root / f"{split}.txt").write_text("".join(f"{image_id}\n" for image_id, *_ in maps))
    for image_id, classes, instances, categories in maps:
        _write_rgb(root / "img" / f"{image_id}.jpg", (30, 160, 220))
        boundaries = np.empty((1, 1), object)
        boundaries[0, 0] = np.zeros((H, W), bool)
        savemat(root / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": classes, "Boundaries": boundaries}})
        savemat(root / "inst" / f"{image_id}.mat", {"GTinst": {"Segmentation": instances, "Categories": categories}})
    return root


def test_the_sbd_fixture_loads_back_as_matlab_structs(tmp_path):
    from scipy.io import loadmat

    root = _write_sbd(tmp_path)
    image_id, _, instances, categories = _sbd_maps()[0]
    gt = loadmat(root / "inst" / f"{image_id}.mat")["GTinst"]
    assert gt.shape == (1, 1) and set(gt.dtype.names) == {"Segmentation", "Categories"}
    np.testing.assert_array_equal(gt[0, 0]["Segmentation"], instances)
    assert gt[0, 0]["Categories"].shape == (3, 1)
    np.testing.assert_array_equal(gt[0, 0]["Categories"], categories)


def test_sbd_gives_each_instance_the_category_of_its_id(tmp_path):
    dataset = SbdInstances(_write_sbd(tmp_path), "train")
    assert len(dataset) == 2 and dataset.num_classes == 20
    sample = dataset[0]
    _check_contract(sample, 20)
    image_id, classes, instances, _ = _sbd_maps()[0]
    assert sample["image_id"] == image_id
    np.testing.assert_array_equal(sample["labels"], [DOG, PERSON, PERSON])
    np.testing.assert_array_equal(sample["instances"], instances)
    np.testing.assert_array_equal(sample["semantic"], classes)
    np.testing.assert_array_equal(sample["boxes"], [[2, 1, 11, 7], [5, 3, 14, 21], [16, 12, 29, 19]])
    assert not (sample["semantic"] == VOID).any()  # SBD has no void label


def test_sbd_reads_a_single_instance_whose_categories_loadmat_returns_as_1x1(tmp_path):
    sample = SbdInstances(_write_sbd(tmp_path), "train")[1]
    _check_contract(sample, 20)
    np.testing.assert_array_equal(sample["labels"], [CAR])
    np.testing.assert_array_equal(sample["boxes"], [[5, 5, 8, 8]])


def test_sbd_reads_an_image_without_instances(tmp_path):
    from scipy.io import savemat

    root = _write_sbd(tmp_path)
    empty = np.zeros((H, W), np.uint8)
    savemat(root / "cls" / "2008_000003.mat", {"GTcls": {"Segmentation": empty}})
    no_categories = np.zeros((0, 1), np.uint8)
    savemat(root / "inst" / "2008_000003.mat", {"GTinst": {"Segmentation": empty, "Categories": no_categories}})
    sample = SbdInstances(root, "train")[1]
    _check_contract(sample, 20)
    assert sample["masks"].shape == (0, H, W) and not sample["semantic"].any()


def test_sbd_names_missing_files_and_malformed_structs(tmp_path):
    from scipy.io import savemat

    root = _write_sbd(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"val\.txt.*available.*'train'"):
        SbdInstances(root, "val")
    savemat(root / "inst" / "2008_000003.mat", {"GTinst": {"Segmentation": np.zeros((H, W), np.uint8)}})
    with pytest.raises(ValueError, match=r"2008_000003\.mat.*'Categories'"):
        SbdInstances(root, "train")[1]
    savemat(root / "inst" / "2008_000003.mat", {"other": np.zeros(3)})
    with pytest.raises(ValueError, match=r"2008_000003\.mat.*no variable 'GTinst'"):
        SbdInstances(root, "train")[1]
    (root / "cls" / "2008_000002.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"cls.*2008_000002\.mat"):
        SbdInstances(root, "train")


def test_sbd_rejects_instance_ids_without_a_category(tmp_path):
    from scipy.io import savemat

    root = _write_sbd(tmp_path)
    _, _, instances, _ = _sbd_maps()[0]
    savemat(root / "inst" / "2008_000002.mat", {"GTinst": {"Segmentation": instances, "Categories": np.array([[DOG]])}})
    with pytest.raises(ValueError, match="Categories lists 1"):
        SbdInstances(root, "train")[0]


# ----------------------------------------------------------------------------------------------- COCO


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def _compressed_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _write_coco(root: Path, split: str = "val2017") -> tuple[Path, dict]:
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
        (139, 3, 0, _compressed_rle(_rect(6, 14, 8, 20))),
        (139, 1, 1, _uncompressed_rle(_rect(14, 24, 0, 32))),  # a crowd, partly under the later dog
        (139, 18, 0, _compressed_rle(_rect(18, 22, 4, 10))),
        (42, 18, 0, _compressed_rle(_rect(3, 6, 3, 6))),  # entirely under the later car
        (42, 3, 0, _compressed_rle(_rect(2, 8, 2, 8))),
    ]
    annotations = [
        {"id": i, "image_id": image, "category_id": category, "iscrowd": crowd, "segmentation": segmentation}
        for i, (image, category, crowd, segmentation) in enumerate(rows, start=1)
    ]
    for annotation in annotations:
        annotation.update(area=1.0, bbox=[0, 0, 1, 1])
    for image in images:
        _write_rgb(root / split / image["file_name"], (10, 250, 120))
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))
    return root, dataset


def test_coco_maps_sorted_category_ids_to_contiguous_labels(tmp_path):
    root, _ = _write_coco(tmp_path)
    dataset = CocoInstances(root, "val2017")
    assert dataset.category_ids == (1, 3, 18)
    assert dataset.label_of_category == {1: 1, 3: 2, 18: 3}
    assert dataset.class_names == ("background", "person", "car", "dog") and dataset.num_classes == 3
    assert dataset.image_ids == (7, 42, 139) and len(dataset) == 3


def test_coco_voids_crowds_and_lets_later_annotations_win_overlaps(tmp_path):
    from pycocotools import mask as mask_utils

    root, coco = _write_coco(tmp_path)
    sample = CocoInstances(root, "val2017")[2]
    _check_contract(sample, 3)
    assert sample["image_id"] == 139
    polygon = coco["annotations"][0]["segmentation"]
    person = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, H, W))).astype(bool)
    car, crowd, dog = _rect(6, 14, 8, 20), _rect(14, 24, 0, 32), _rect(18, 22, 4, 10)
    assert (person & car).any()  # the fixture does overlap
    np.testing.assert_array_equal(sample["labels"], [1, 2, 3])
    np.testing.assert_array_equal(sample["masks"][0], person & ~car)  # what the later car left visible
    np.testing.assert_array_equal(sample["masks"][1], car)
    np.testing.assert_array_equal(sample["masks"][2], dog)  # drawn over the crowd region
    np.testing.assert_array_equal(sample["semantic"] == VOID, crowd & ~dog)
    np.testing.assert_array_equal(sample["boxes"][1:], [[8, 6, 19, 13], [4, 18, 9, 21]])


def test_coco_drops_an_annotation_that_later_ones_cover_completely(tmp_path):
    root, _ = _write_coco(tmp_path)
    sample = CocoInstances(root, "val2017")[1]
    _check_contract(sample, 3)
    np.testing.assert_array_equal(sample["labels"], [2])  # the dog lies entirely under the later car
    np.testing.assert_array_equal(sample["masks"][0], _rect(2, 8, 2, 8))


def test_coco_keeps_images_without_annotations(tmp_path):
    root, _ = _write_coco(tmp_path)
    sample = CocoInstances(root, "val2017")[0]
    _check_contract(sample, 3)
    assert sample["image_id"] == 7 and sample["masks"].shape == (0, H, W) and not sample["semantic"].any()


def test_coco_names_the_missing_annotation_file_image_and_bad_references(tmp_path):
    root, coco = _write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"instances_train2017\.json"):
        CocoInstances(root, "train2017")
    (root / "val2017" / "000000000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"val2017.*000000000042\.jpg"):
        CocoInstances(root, "val2017")
    _write_rgb(root / "val2017" / "000000000042.jpg", (0, 0, 0))
    coco["annotations"][0]["category_id"] = 99
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="category 99, not in 'categories'"):
        CocoInstances(root, "val2017")
    (root / "annotations" / "instances_val2017.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        CocoInstances(root, "val2017")


def test_coco_rejects_an_image_whose_size_differs_from_the_annotation(tmp_path):
    root, _ = _write_coco(tmp_path)
    Image.new("RGB", (W + 1, H)).save(root / "val2017" / "000000000007.jpg")
    with pytest.raises(ValueError, match=r"000000000007\.jpg.*33x24.*32x24"):
        CocoInstances(root, "val2017")[0]


# ----------------------------------------------------------------------------------------- Cityscapes


def _cityscapes_ids() -> np.ndarray:
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


def _write_cityscapes(root: Path, split: str = "val") -> Path:
    for city, name in (("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000001_000019")):
        _write_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", (90, 90, 200))
        target = root / "gtFine" / split / city / f"{name}_gtFine_instanceIds.png"
        target.parent.mkdir(parents=True)
        Image.fromarray(_cityscapes_ids() if city == "frankfurt" else np.full((H, W), 24007, np.uint16)).save(target)
    return root


def test_the_cityscapes_fixture_is_a_16_bit_png(tmp_path):
    root = _write_cityscapes(tmp_path)
    with Image.open(root / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_instanceIds.png") as png:
        values = np.asarray(png)
    assert values.dtype == np.uint16
    np.testing.assert_array_equal(values, _cityscapes_ids())


def test_cityscapes_maps_thing_instances_to_eight_classes_and_voids_groups(tmp_path):
    dataset = CityscapesInstances(_write_cityscapes(tmp_path), "val")
    assert dataset.image_ids == ("frankfurt_000000_000294", "lindau_000001_000019")
    assert dataset.num_classes == 8 and dataset.class_names[1] == "person" and dataset.class_names[8] == "bicycle"
    sample = dataset[0]
    _check_contract(sample, 8)
    assert sample["image_id"] == "frankfurt_000000_000294"
    values = _cityscapes_ids()
    np.testing.assert_array_equal(sample["labels"], [1, 1, 3, 8])  # ascending instanceIds: 24000, 24001, 26003, 33002
    for m, value in enumerate((24000, 24001, 26003, 33002)):
        np.testing.assert_array_equal(sample["masks"][m], values == value)
    np.testing.assert_array_equal(sample["boxes"][0], [2, 5, 5, 11])
    np.testing.assert_array_equal(sample["semantic"] == VOID, np.isin(values, [1, 26, 29001]))
    assert np.all(sample["semantic"][np.isin(values, [4, 7, 21])] == 0)


def test_cityscapes_images_covered_by_one_instance_work(tmp_path):
    sample = CityscapesInstances(_write_cityscapes(tmp_path), "val")[1]
    _check_contract(sample, 8)
    np.testing.assert_array_equal(sample["labels"], [1])
    np.testing.assert_array_equal(sample["boxes"], [[0, 0, W - 1, H - 1]])


def test_cityscapes_names_missing_splits_and_annotations(tmp_path):
    root = _write_cityscapes(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit.*train.*available splits: \['val'\]"):
        CityscapesInstances(root, "train")
    (root / "gtFine/val/lindau/lindau_000001_000019_gtFine_instanceIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"lindau.*lindau_000001_000019_gtFine_instanceIds\.png"):
        CityscapesInstances(root, "val")


_BUILDERS = {
    "voc": lambda root: VocInstances(_write_voc(root), "val"),
    "sbd": lambda root: SbdInstances(_write_sbd(root), "train"),
    "coco": lambda root: CocoInstances(_write_coco(root)[0], "val2017"),
    "cityscapes": lambda root: CityscapesInstances(_write_cityscapes(root), "val"),
}


@pytest.mark.parametrize("name", sorted(_BUILDERS))
def test_every_loader_indexes_from_the_end_and_rejects_bad_indices(tmp_path, name):
    dataset = _BUILDERS[name](tmp_path)
    assert dataset[-len(dataset)]["image_id"] == dataset[0]["image_id"]
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(dataset)]
    with pytest.raises(TypeError, match="index must be an int"):
        dataset["0"]


@pytest.mark.parametrize("name", sorted(_BUILDERS))
def test_every_loader_rejects_a_split_that_is_a_path(tmp_path, name):
    dataset = _BUILDERS[name](tmp_path)
    with pytest.raises(ValueError, match="split must be a plain name"):
        type(dataset)(dataset.root, "../val")
