"""The on-disk dataset loaders (dynseg.trainer.data): Pascal VOC 2012, SBD, COCO and Cityscapes.

Each test writes a tiny fixture in the dataset's exact on-disk format (palette PNGs, MATLAB structs,
COCO JSON with polygons and RLE, 16-bit instanceIds PNGs; the writers are in dataset_fixtures.py,
shared with the command-line tests) and checks what the loader makes of it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dataset_fixtures import (
    CAR, DOG, PERSON, H, W, cityscapes_ids, compressed_rle, rect, sbd_maps, voc_maps, write_cityscapes, write_coco,
    uncompressed_rle, write_palette_png, write_rgb, write_sbd, write_voc,
)
from dynseg.trainer.data import VOID, CityscapesInstances, CocoInstances, SbdInstances, VocInstances


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


# ------------------------------------------------------------------------------------ Pascal VOC 2012


def test_the_voc_fixture_pngs_read_back_as_palette_indices(tmp_path):
    root = write_voc(tmp_path)
    _, classes, _ = voc_maps()[0]
    with Image.open(root / "SegmentationClass" / "2007_000032.png") as png:
        assert png.mode == "P"
        np.testing.assert_array_equal(np.asarray(png), classes)


def test_voc_gives_each_object_its_majority_class_and_voids_both_borders(tmp_path):
    write_voc(tmp_path)
    dataset = VocInstances(tmp_path, "val")
    assert len(dataset) == 2 and dataset.num_classes == 20
    assert dataset.class_names[0] == "background" and dataset.class_names[PERSON] == "person"
    sample = dataset[0]
    _check_contract(sample, 20)
    assert sample["image_id"] == "2007_000032"
    np.testing.assert_array_equal(sample["labels"], [PERSON, CAR, PERSON])
    np.testing.assert_array_equal(sample["boxes"], [[3, 2, 10, 9], [14, 12, 27, 20], [20, 4, 25, 8]])
    _, classes, objects = voc_maps()[0]
    void = (classes == VOID) | (objects == VOID)
    np.testing.assert_array_equal(sample["semantic"] == VOID, void)
    classes_but_stray = classes.copy()
    classes_but_stray[5, 5] = PERSON
    # The class map, except where object 1 (a person by majority) overrules its stray car pixel.
    np.testing.assert_array_equal(sample["semantic"][~void], classes_but_stray[~void])
    assert sample["masks"][1].sum() == 9 * 14 - 6  # the car minus the class-only void pixels
    assert abs(sample["image"].astype(float).mean(axis=(0, 1)) - [200, 40, 90]).max() < 4  # JPEG, RGB order


def test_voc_images_without_objects_have_no_instances(tmp_path):
    write_voc(tmp_path)
    sample = VocInstances(tmp_path, "val")[-1]
    _check_contract(sample, 20)
    assert sample["masks"].shape == (0, H, W) and sample["boxes"].shape == (0, 4)
    assert not sample["semantic"].any() and not sample["instances"].any()


def test_voc_accepts_the_voc2012_folder_itself_as_root(tmp_path):
    root = write_voc(tmp_path)
    np.testing.assert_array_equal(VocInstances(root, "val")[0]["masks"], VocInstances(tmp_path, "val")[0]["masks"])


def test_voc_names_the_missing_split_list_and_the_available_ones(tmp_path):
    write_voc(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train\.txt.*available.*'val'"):
        VocInstances(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no VOC2012 segmentation data"):
        VocInstances(tmp_path / "elsewhere", "val")


def test_voc_names_a_missing_object_png(tmp_path):
    root = write_voc(tmp_path)
    (root / "SegmentationObject" / "2007_000039.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"SegmentationObject.*2007_000039\.png"):
        VocInstances(tmp_path, "val")


def test_voc_names_an_image_or_annotation_that_cannot_be_decoded(tmp_path):
    root = write_voc(tmp_path)
    for path in (root / "JPEGImages" / "2007_000032.jpg", root / "SegmentationObject" / "2007_000032.png"):
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 2])  # a partial download
        with pytest.raises(ValueError, match=rf"{path.name}.*could not be read"):
            VocInstances(tmp_path, "val")[0]
        path.write_bytes(original)


def test_voc_refuses_a_16_bit_image_instead_of_clipping_it(tmp_path):
    root = write_voc(tmp_path)
    Image.fromarray(np.full((H, W), 40000, np.uint16)).save(root / "JPEGImages" / "2007_000032.jpg", format="PNG")
    with pytest.raises(ValueError, match=r"2007_000032\.jpg.*16-bit"):
        VocInstances(tmp_path, "val")[0]


def test_voc_reads_a_split_list_saved_with_a_byte_order_mark(tmp_path):
    root = write_voc(tmp_path)
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    plain = VocInstances(tmp_path, "val").image_ids
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes())  # what some Windows editors save
    assert VocInstances(tmp_path, "val").image_ids == plain


def test_voc_refuses_a_split_list_that_names_an_image_twice(tmp_path):
    root = write_voc(tmp_path)
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    first = split.read_text().split()[0]
    split.write_text(split.read_text() + f"{first}\n")
    with pytest.raises(ValueError, match=f"val.txt: the split list names '{first}' more than once"):
        VocInstances(root, "val")


def test_voc_names_a_split_list_that_is_not_utf8(tmp_path):
    root = write_voc(tmp_path)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_bytes(b"2007_0000\xe932\n")
    with pytest.raises(ValueError, match=r"val\.txt.*not UTF-8"):
        VocInstances(tmp_path, "val")


def test_voc_rejects_annotations_saved_as_colours_instead_of_indices(tmp_path):
    root = write_voc(tmp_path)
    Image.new("RGB", (W, H)).save(root / "SegmentationClass" / "2007_000032.png")
    with pytest.raises(ValueError, match=r"2007_000032\.png.*palette"):
        VocInstances(tmp_path, "val")[0]


def test_voc_voids_a_pixel_only_the_object_png_marks_void(tmp_path):
    root = write_voc(tmp_path)
    classes, objects = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    classes[4:12, 4:14], objects[4:12, 4:14] = PERSON, 1
    objects[8, 4:14] = VOID  # across the person, whom the class PNG still shows there
    objects[20, 0:5] = VOID  # and on background
    write_palette_png(root / "SegmentationClass" / "2007_000039.png", classes)
    write_palette_png(root / "SegmentationObject" / "2007_000039.png", objects)
    sample = VocInstances(tmp_path, "val")[1]
    _check_contract(sample, 20)
    void = objects == VOID
    np.testing.assert_array_equal(sample["semantic"] == VOID, void)  # the union of both PNGs' void
    np.testing.assert_array_equal(sample["instances"] == VOID, void)
    np.testing.assert_array_equal(sample["labels"], [PERSON])
    np.testing.assert_array_equal(sample["masks"][0], objects == 1)  # the person without its void row
    assert sample["masks"][0].sum() == 7 * 10


# ------------------------------------------------------------------------------------------------ SBD


def test_the_sbd_fixture_loads_back_as_matlab_structs(tmp_path):
    from scipy.io import loadmat

    root = write_sbd(tmp_path)
    image_id, _, instances, categories = sbd_maps()[0]
    gt = loadmat(root / "inst" / f"{image_id}.mat")["GTinst"]
    assert gt.shape == (1, 1) and set(gt.dtype.names) == {"Segmentation", "Categories"}
    np.testing.assert_array_equal(gt[0, 0]["Segmentation"], instances)
    assert gt[0, 0]["Categories"].shape == (3, 1)
    np.testing.assert_array_equal(gt[0, 0]["Categories"], categories)


def test_sbd_gives_each_instance_the_category_of_its_id(tmp_path):
    dataset = SbdInstances(write_sbd(tmp_path), "train")
    assert len(dataset) == 2 and dataset.num_classes == 20
    sample = dataset[0]
    _check_contract(sample, 20)
    image_id, classes, instances, _ = sbd_maps()[0]
    assert sample["image_id"] == image_id
    np.testing.assert_array_equal(sample["labels"], [DOG, PERSON, PERSON])
    np.testing.assert_array_equal(sample["instances"], instances)
    np.testing.assert_array_equal(sample["semantic"], classes)
    np.testing.assert_array_equal(sample["boxes"], [[2, 1, 11, 7], [5, 3, 14, 21], [16, 12, 29, 19]])
    assert not (sample["semantic"] == VOID).any()  # SBD has no void label


def test_sbd_reads_a_single_instance_whose_categories_loadmat_returns_as_1x1(tmp_path):
    sample = SbdInstances(write_sbd(tmp_path), "train")[1]
    _check_contract(sample, 20)
    np.testing.assert_array_equal(sample["labels"], [CAR])
    np.testing.assert_array_equal(sample["boxes"], [[5, 5, 8, 8]])


def test_sbd_reads_an_image_without_instances(tmp_path):
    from scipy.io import savemat

    root = write_sbd(tmp_path)
    empty = np.zeros((H, W), np.uint8)
    savemat(root / "cls" / "2008_000003.mat", {"GTcls": {"Segmentation": empty}})
    no_categories = np.zeros((0, 1), np.uint8)
    savemat(root / "inst" / "2008_000003.mat", {"GTinst": {"Segmentation": empty, "Categories": no_categories}})
    sample = SbdInstances(root, "train")[1]
    _check_contract(sample, 20)
    assert sample["masks"].shape == (0, H, W) and not sample["semantic"].any()


def test_sbd_names_missing_files_and_malformed_structs(tmp_path):
    from scipy.io import savemat

    root = write_sbd(tmp_path)
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

    root = write_sbd(tmp_path)
    _, _, instances, _ = sbd_maps()[0]
    savemat(root / "inst" / "2008_000002.mat", {"GTinst": {"Segmentation": instances, "Categories": np.array([[DOG]])}})
    with pytest.raises(ValueError, match="Categories lists 1"):
        SbdInstances(root, "train")[0]
    negative = instances.astype(np.int16)
    negative[0, 0] = -1
    savemat(root / "inst" / "2008_000002.mat", {"GTinst": {"Segmentation": negative, "Categories": np.zeros((0, 0))}})
    with pytest.raises(ValueError, match="GTinst.Segmentation has a negative instance id, -1"):
        SbdInstances(root, "train")[0]


def test_sbd_names_a_mat_file_cut_inside_its_header(tmp_path):
    root = write_sbd(tmp_path)
    path = root / "cls" / "2008_000003.mat"
    path.write_bytes(path.read_bytes()[:100])  # scipy raises IndexError on it
    with pytest.raises(ValueError, match=r"cls/2008_000003\.mat: not a readable MATLAB file"):
        SbdInstances(root, "train")[1]


def _write_sbd_mats(root, image_id: str, classes, instances, categories) -> None:
    from scipy.io import savemat

    savemat(root / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": classes}})
    savemat(root / "inst" / f"{image_id}.mat", {"GTinst": {"Segmentation": instances, "Categories": categories}})


_, _SBD_CLASSES, _SBD_INSTANCES, _ = sbd_maps()[1]  # one car: classes 0 / CAR, instances 0 / 1


@pytest.mark.parametrize(
    "field, bad",
    [
        ("GTinst.Categories", {"categories": np.array([[CAR + 0.9]])}),  # astype(int64) made it CAR
        ("GTinst.Categories", {"categories": np.array([[np.nan]])}),
        ("GTinst.Categories", {"categories": "car"}),
        ("GTinst.Segmentation", {"instances": np.where(_SBD_INSTANCES > 0, 1.7, 0.0)}),  # was read as instance 1
        ("GTcls.Segmentation", {"classes": np.where(_SBD_CLASSES > 0, CAR + 0.5, 0.0)}),
    ],
)
def test_sbd_rejects_maps_and_categories_that_are_not_whole_numbers(tmp_path, field, bad):
    root = write_sbd(tmp_path)
    _, classes, instances, categories = sbd_maps()[1]
    whole = {"classes": classes, "instances": instances, "categories": categories}
    whole = {name: values.astype(float) for name, values in whole.items()}
    _write_sbd_mats(root, "2008_000003", **whole)  # doubles (MATLAB's default type) are fine while whole
    np.testing.assert_array_equal(SbdInstances(root, "train")[1]["labels"], [CAR])
    _write_sbd_mats(root, "2008_000003", **{**whole, **bad})
    with pytest.raises(ValueError, match=rf"2008_000003\.mat: {field} must hold whole numbers"):
        SbdInstances(root, "train")[1]


def test_sbd_refuses_an_instance_id_one_past_the_categories(tmp_path):
    root = write_sbd(tmp_path)
    _, classes, instances, categories = sbd_maps()[0]  # ids 1..3
    _write_sbd_mats(root, "2008_000002", classes, instances, categories[:2])
    message = r"2008_000002\.mat: GTinst.Segmentation has ids up to 3 but Categories lists 2"
    with pytest.raises(ValueError, match=message):
        SbdInstances(root, "train")[0]


@pytest.mark.parametrize("category", [0, 21])
def test_sbd_refuses_a_category_outside_1_to_20(tmp_path, category):
    root = write_sbd(tmp_path)
    _, classes, instances, _ = sbd_maps()[1]  # one instance
    _write_sbd_mats(root, "2008_000003", classes, instances, np.array([[category]], np.uint8))
    with pytest.raises(ValueError, match=r"2008_000003\.mat: GTinst.Categories has classes outside 1\.\.20"):
        SbdInstances(root, "train")[1]


# ----------------------------------------------------------------------------------------------- COCO


def test_coco_maps_sorted_category_ids_to_contiguous_labels(tmp_path):
    root, _ = write_coco(tmp_path)
    dataset = CocoInstances(root, "val2017")
    assert dataset.category_ids == (1, 3, 18)
    assert dataset.label_of_category == {1: 1, 3: 2, 18: 3}
    assert dataset.class_names == ("background", "person", "car", "dog") and dataset.num_classes == 3
    assert dataset.image_ids == (7, 42, 139) and len(dataset) == 3


def test_coco_voids_crowds_and_lets_later_annotations_win_overlaps(tmp_path):
    from pycocotools import mask as mask_utils

    root, coco = write_coco(tmp_path)
    sample = CocoInstances(root, "val2017")[2]
    _check_contract(sample, 3)
    assert sample["image_id"] == 139
    polygon = coco["annotations"][0]["segmentation"]
    person = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, H, W))).astype(bool)
    car, crowd, dog = rect(6, 14, 8, 20), rect(14, 24, 0, 32), rect(18, 22, 4, 10)
    assert (person & car).any()  # the fixture does overlap
    np.testing.assert_array_equal(sample["labels"], [1, 2, 3])
    np.testing.assert_array_equal(sample["masks"][0], person & ~car)  # what the later car left visible
    np.testing.assert_array_equal(sample["masks"][1], car)
    np.testing.assert_array_equal(sample["masks"][2], dog)  # drawn over the crowd region
    np.testing.assert_array_equal(sample["semantic"] == VOID, crowd & ~dog)
    np.testing.assert_array_equal(sample["boxes"][1:], [[8, 6, 19, 13], [4, 18, 9, 21]])
    # and the crowd whole, with its class, for COCO mask AP's crowd rule
    np.testing.assert_array_equal(sample["crowd_masks"], crowd[None])
    np.testing.assert_array_equal(sample["crowd_labels"], [1])
    assert CocoInstances(root, "val2017")[1]["crowd_masks"].shape == (0, H, W)  # an image without crowds


def test_coco_drops_an_annotation_that_later_ones_cover_completely(tmp_path):
    root, _ = write_coco(tmp_path)
    sample = CocoInstances(root, "val2017")[1]
    _check_contract(sample, 3)
    np.testing.assert_array_equal(sample["labels"], [2])  # the dog lies entirely under the later car
    np.testing.assert_array_equal(sample["masks"][0], rect(2, 8, 2, 8))


def test_coco_keeps_images_without_annotations(tmp_path):
    root, _ = write_coco(tmp_path)
    sample = CocoInstances(root, "val2017")[0]
    _check_contract(sample, 3)
    assert sample["image_id"] == 7 and sample["masks"].shape == (0, H, W) and not sample["semantic"].any()


@pytest.mark.parametrize("crowd", ["no", 2, True, 1.0])
def test_coco_refuses_an_iscrowd_other_than_0_or_1(tmp_path, crowd):
    root, coco = write_coco(tmp_path)
    coco["annotations"][0]["iscrowd"] = crowd
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=f"has iscrowd {crowd!r}; it must be 0 or 1"):
        CocoInstances(root, "val2017")


def test_coco_refuses_a_split_without_images(tmp_path):
    root, coco = write_coco(tmp_path)
    coco["images"], coco["annotations"] = [], []
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"instances_val2017\.json: 'images' is empty"):
        CocoInstances(root, "val2017")


def test_coco_names_the_missing_annotation_file_image_and_bad_references(tmp_path):
    root, coco = write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"instances_train2017\.json"):
        CocoInstances(root, "train2017")
    (root / "val2017" / "000000000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"val2017.*000000000042\.jpg"):
        CocoInstances(root, "val2017")
    write_rgb(root / "val2017" / "000000000042.jpg", (0, 0, 0))
    coco["annotations"][0]["category_id"] = 99
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="category 99, not in 'categories'"):
        CocoInstances(root, "val2017")
    (root / "annotations" / "instances_val2017.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        CocoInstances(root, "val2017")
    coco["annotations"][0]["category_id"] = 1
    coco["categories"][0]["id"] = "dog"
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="category ids must be integers, got 'dog'"):
        CocoInstances(root, "val2017")
    (root / "annotations" / "instances_val2017.json").write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoInstances(root, "val2017")


def test_coco_rejects_an_image_whose_size_differs_from_the_annotation(tmp_path):
    root, _ = write_coco(tmp_path)
    Image.new("RGB", (W + 1, H)).save(root / "val2017" / "000000000007.jpg")
    with pytest.raises(ValueError, match=r"000000000007\.jpg.*33x24.*32x24"):
        CocoInstances(root, "val2017")[0]


def _rewrite_coco(root, coco: dict) -> None:
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))


def test_coco_rejects_an_rle_of_another_size_than_its_image_when_loading(tmp_path):
    root, coco = write_coco(tmp_path)
    coco["annotations"][1]["segmentation"] = compressed_rle(np.ones((10, 10), bool))  # was an IndexError in ds[2]
    _rewrite_coco(root, coco)
    message = r"instances_val2017\.json: annotation 2 \(#1 in 'annotations'\) of image 139: RLE size \[10, 10\]"
    with pytest.raises(ValueError, match=message + r" is not the image's \[height, width\] = \[24, 32\]"):
        CocoInstances(root, "val2017")


_POLYGON = "polygon {} is not a list of an even number \\(>= 6\\) of finite coordinates"


@pytest.mark.parametrize(
    "segmentation, problem",
    [
        ([[1.0, 2.0]], _POLYGON.format(0)),
        ([[2.0, 2.0, 12.0, 10.0]], _POLYGON.format(0)),  # a box: pycocotools would read it as one
        ([[2, 2, 12, 2, 12, 10, 2]], _POLYGON.format(0)),
        ([[2, 2, 12, 2, 12, 10], [2, 2, 12, "2", 12, 10]], _POLYGON.format(1)),
        ([[2, 2, 12, 2, 12, float("nan")]], _POLYGON.format(0)),
        ([[2, 2, 12, 2, 12, 5e8]], _POLYGON.format(0)),  # overflows pycocotools' ints: an empty mask
        ([], "'segmentation' is an empty list of polygons"),
        (None, "'segmentation' is NoneType, neither a list of polygons nor an RLE dict"),
        ("abc", "'segmentation' is str"),
        ({"size": [10, 10], "counts": [0, 100]}, r"RLE size \[10, 10\] is not the image's"),
        ({"size": [24.0, 32.0], "counts": [0, 768]}, r"RLE size \[24.0, 32.0\] is not the image's"),
        ({"counts": [0, 768]}, "RLE size None is not the image's"),
        ({"size": [24, 32], "counts": [0, 700]}, "RLE counts are not runs .* adding up to 24 x 32"),  # 68 undefined
        ({"size": [24, 32], "counts": [0, -1, 769]}, "RLE counts are not runs"),
        ({"size": [24, 32], "counts": [0, 768.0]}, "RLE counts are not runs"),
        ({"size": [24, 32], "counts": ""}, "RLE counts are not runs"),
        ({"size": [24, 32], "counts": "PP"}, "RLE counts are not runs"),  # ends inside a number
        ({"size": [24, 32], "counts": None}, "RLE counts are not runs"),
    ],
)
def test_coco_rejects_segmentations_pycocotools_cannot_rasterise_when_loading(tmp_path, segmentation, problem):
    root, coco = write_coco(tmp_path)
    coco["annotations"][1]["segmentation"] = segmentation
    _rewrite_coco(root, coco)
    with pytest.raises(ValueError, match=r"annotation 2 \(#1 in 'annotations'\) of image 139: " + problem):
        CocoInstances(root, "val2017")


def test_coco_checks_a_crowd_rle_and_each_annotation_that_repeats_an_id(tmp_path):
    root, coco = write_coco(tmp_path)
    crowd = coco["annotations"][2]["segmentation"]
    crowd["counts"] = crowd["counts"][:-1]  # covers less than the image
    _rewrite_coco(root, coco)
    with pytest.raises(ValueError, match=r"annotation 3 \(#2 in 'annotations'\) of image 139: RLE counts"):
        CocoInstances(root, "val2017")
    root, coco = write_coco(tmp_path / "again")
    coco["annotations"][0]["segmentation"] = None
    coco["annotations"][1]["id"] = 1  # pycocotools' index keeps only this one of the two annotations 1
    _rewrite_coco(root, coco)
    with pytest.raises(ValueError, match=r"annotation 1 \(#0 in 'annotations'\) of image 139: 'segmentation' is"):
        CocoInstances(root, "val2017")


_ABSENT = object()


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("height", _ABSENT, "'height' must be an int >= 1, got None"),
        ("height", "24", "'height' must be an int >= 1, got '24'"),
        ("height", 0, "'height' must be an int >= 1, got 0"),
        ("width", 32.0, "'width' must be an int >= 1, got 32.0"),
        ("width", True, "'width' must be an int >= 1, got True"),
        ("file_name", _ABSENT, "'file_name' must be a string, got None"),
        ("file_name", 139, "'file_name' must be a string, got 139"),
    ],
)
def test_coco_rejects_image_records_without_a_whole_size_or_a_file_name(tmp_path, key, value, problem):
    root, coco = write_coco(tmp_path)
    if value is _ABSENT:
        del coco["images"][1][key]
    else:
        coco["images"][1][key] = value
    _rewrite_coco(root, coco)
    with pytest.raises(ValueError, match=r"instances_val2017\.json: image 42 \(#1 in 'images'\): " + problem):
        CocoInstances(root, "val2017")


def test_coco_rejects_image_ids_that_are_not_ints_or_listed_twice(tmp_path):
    root, coco = write_coco(tmp_path)
    coco["images"].append(dict(coco["images"][0], file_name="000000000042.jpg"))  # pycocotools kept only this
    _rewrite_coco(root, coco)
    with pytest.raises(ValueError, match=r"image 139 \(#3 in 'images'\): the id is listed twice in 'images'"):
        CocoInstances(root, "val2017")
    coco["images"].pop()
    coco["images"][2]["id"] = "7"
    _rewrite_coco(root, coco)
    with pytest.raises(ValueError, match=r"image '7' \(#2 in 'images'\): 'id' must be an int"):
        CocoInstances(root, "val2017")


def test_coco_matches_image_and_category_ids_as_ints_only(tmp_path):
    root, coco = write_coco(tmp_path)
    coco["annotations"][4]["image_id"] = 42.0  # would find image 42 in pycocotools' dict
    _rewrite_coco(root, coco)
    with pytest.raises(ValueError, match=r"annotation 5 \(#4 in 'annotations'\) names image 42.0, not in 'images'"):
        CocoInstances(root, "val2017")
    coco["annotations"][4]["image_id"] = 42
    coco["annotations"][4]["category_id"] = True  # would find category 1 (person)
    _rewrite_coco(root, coco)
    with pytest.raises(ValueError, match="annotation 5 .* has category True, not in 'categories'"):
        CocoInstances(root, "val2017")


@pytest.mark.parametrize("change, message", [
    (lambda cats: cats.append({**cats[0], "name": "another"}), r"category ids \[\d+\] are listed more than once"),
    (lambda cats: cats[0].update(name=""), r"category \d+ has no name"),
    (lambda cats: cats[0].pop("name"), r"category \d+ has no name"),
    (lambda cats: cats[1].update(name=cats[0]["name"]), "several categories are named"),
])
def test_coco_categories_must_name_one_class_each(tmp_path, change, message):
    root, coco = write_coco(tmp_path)
    change(coco["categories"])
    _rewrite_coco(root, coco)
    with pytest.raises(ValueError, match=message):
        CocoInstances(root, "val2017")


def test_coco_refuses_as_many_categories_as_would_make_a_class_void(tmp_path):
    # the 255th class would share the value that marks void pixels: its objects ignored in training and
    # unmatchable in evaluation, without a word
    root, coco = write_coco(tmp_path)
    coco["categories"] += [{"id": 1000 + i, "name": f"extra {i}"} for i in range(255 - len(coco["categories"]))]
    _rewrite_coco(root, coco)
    with pytest.raises(ValueError, match="255 classes, but dynseg's datasets hold at most 254"):
        CocoInstances(root, "val2017")
    coco["categories"].pop()
    _rewrite_coco(root, coco)
    assert CocoInstances(root, "val2017").num_classes == 254


# ----------------------------------------------------------------------------------------- Cityscapes


def test_the_cityscapes_fixture_is_a_16_bit_png(tmp_path):
    root = write_cityscapes(tmp_path)
    with Image.open(root / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_instanceIds.png") as png:
        values = np.asarray(png)
    assert values.dtype == np.uint16
    np.testing.assert_array_equal(values, cityscapes_ids())


def test_cityscapes_maps_thing_instances_to_eight_classes_and_voids_groups(tmp_path):
    dataset = CityscapesInstances(write_cityscapes(tmp_path), "val")
    assert dataset.image_ids == ("frankfurt_000000_000294", "lindau_000001_000019")
    assert dataset.num_classes == 8 and dataset.class_names[1] == "person" and dataset.class_names[8] == "bicycle"
    sample = dataset[0]
    _check_contract(sample, 8)
    assert sample["image_id"] == "frankfurt_000000_000294"
    values = cityscapes_ids()
    np.testing.assert_array_equal(sample["labels"], [1, 1, 3, 8])  # ascending instanceIds: 24000, 24001, 26003, 33002
    for m, value in enumerate((24000, 24001, 26003, 33002)):
        np.testing.assert_array_equal(sample["masks"][m], values == value)
    np.testing.assert_array_equal(sample["boxes"][0], [2, 5, 5, 11])
    np.testing.assert_array_equal(sample["semantic"] == VOID, np.isin(values, [1, 26, 29001]))
    assert np.all(sample["semantic"][np.isin(values, [4, 7, 21])] == 0)


def test_cityscapes_images_covered_by_one_instance_work(tmp_path):
    sample = CityscapesInstances(write_cityscapes(tmp_path), "val")[1]
    _check_contract(sample, 8)
    np.testing.assert_array_equal(sample["labels"], [1])
    np.testing.assert_array_equal(sample["boxes"], [[0, 0, W - 1, H - 1]])


def test_cityscapes_voids_id_0_and_takes_ids_above_33_for_background(tmp_path):
    root = write_cityscapes(tmp_path)
    values = np.full((H, W), 7, np.uint16)  # road
    values[0, :] = 0  # unlabeled: void
    values[1, :] = 34  # above the labels table (33 bicycle): background
    values[2, :] = 34001  # ... with an instance number too
    values[3, :] = 65535  # class 65, instance 535
    values[10:14, 5:10] = 24001  # a person
    Image.fromarray(values).save(root / "gtFine/val/lindau/lindau_000001_000019_gtFine_instanceIds.png")
    sample = CityscapesInstances(root, "val")[1]
    _check_contract(sample, 8)
    np.testing.assert_array_equal(sample["labels"], [1])
    np.testing.assert_array_equal(sample["masks"][0], values == 24001)
    void = np.zeros((H, W), bool)
    void[0] = True
    np.testing.assert_array_equal(sample["semantic"] == VOID, void)
    np.testing.assert_array_equal(sample["instances"] == VOID, void)
    assert not sample["semantic"][1:4].any() and not sample["instances"][1:4].any()


def test_cityscapes_names_missing_splits_and_annotations(tmp_path):
    root = write_cityscapes(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit.*train.*available splits: \['val'\]"):
        CityscapesInstances(root, "train")
    (root / "gtFine/val/lindau/lindau_000001_000019_gtFine_instanceIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"lindau.*lindau_000001_000019_gtFine_instanceIds\.png"):
        CityscapesInstances(root, "val")


_BUILDERS = {
    "voc": lambda root: VocInstances(write_voc(root), "val"),
    "sbd": lambda root: SbdInstances(write_sbd(root), "train"),
    "coco": lambda root: CocoInstances(write_coco(root)[0], "val2017"),
    "cityscapes": lambda root: CityscapesInstances(write_cityscapes(root), "val"),
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


def test_a_sample_holds_at_most_254_instances_beside_void():
    from dynseg.sdk import InvalidArgumentError
    from dynseg.trainer.data.common import assemble_sample

    def sample(count: int):
        owner = np.zeros((16, 16), np.int64)
        owner.ravel()[:count] = np.arange(1, count + 1)  # one pixel each
        return assemble_sample(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.int64), owner,
                               np.ones(count, np.int64), np.zeros((16, 16), bool), "x", "annotation x.png")

    assert sample(VOID - 1)["instances"].max() == VOID - 1  # instance 254 is no void
    with pytest.raises(InvalidArgumentError, match=f"annotation x.png: {VOID} instances; at most {VOID - 1} fit"):
        sample(VOID)


def test_an_instance_pixel_under_void_belongs_to_no_mask():
    from dynseg.trainer.data.common import assemble_sample

    owner = np.zeros((4, 4), np.int64)
    owner[:2] = 1
    void = np.zeros((4, 4), bool)
    void[0, 0] = True
    made = assemble_sample(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int64), owner, [1], void, "x", "x")
    assert not made["masks"][0, 0, 0] and made["masks"][0].sum() == 7
    assert made["instances"][0, 0] == VOID and made["semantic"][0, 0] == VOID


# ------------------------------------------------------------------------------------ detections files


def _detections_file(tmp_path, entries: list[dict]) -> str:
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(entries))
    return str(path)


def test_a_detections_file_may_name_every_class_but_none_past_the_last(tmp_path):
    from dynseg.trainer.data import SyntheticScenes
    from dynseg.trainer.data.sources import with_detections

    scenes = SyntheticScenes(size=2, image_size=(48, 64), num_classes=4)
    entry = {"image_id": 1, "category_id": 4, "bbox": [3, 4, 10, 10], "score": 0.9}
    assert with_detections(scenes, _detections_file(tmp_path, [entry]))[1]["detections"]["labels"].tolist() == [4]
    with pytest.raises(ValueError, match=r"dets\.json: image 1 has category_id 5; the dataset's classes are 1\.\.4"):
        with_detections(scenes, _detections_file(tmp_path, [{**entry, "category_id": 5}]))


def test_a_detections_file_of_normalised_boxes_is_refused_also_when_they_start_at_0(tmp_path):
    from dynseg.trainer.data import SyntheticScenes
    from dynseg.trainer.data.sources import with_detections

    scenes = SyntheticScenes(size=2, image_size=(48, 64))
    normalised = [{"image_id": i, "category_id": 1, "bbox": [0.0, 0.0, 0.5, 0.25], "score": 0.9} for i in (0, 1)]
    normalised[1]["bbox"] = [0.0, 0.25, 0.5, 0.5]  # the far corners: (0, 0) and (0, 0.25), a fraction
    with pytest.raises(ValueError, match=r"dets\.json: every bbox lies within \[0, 1\].*normalised"):
        with_detections(scenes, _detections_file(tmp_path, normalised))
    # whole pixels at the origin are pixel boxes: [x, y, w, h] = [0, 0, 2, 1] covers x 0..1, y 0
    pixels = [{"image_id": 0, "category_id": 1, "bbox": [0, 0, 2, 1], "score": 0.9}]
    detections = with_detections(scenes, _detections_file(tmp_path, pixels))[0]["detections"]
    np.testing.assert_array_equal(detections["boxes"], [[0, 0, 1, 0]])


def test_coco_voids_a_crowd_of_an_unlisted_category_without_keeping_it_as_a_crowd(tmp_path):
    root, coco = write_coco(tmp_path)
    unlisted = rect(0, 4, 20, 32)  # image 42's top-right corner, away from its dog and car
    coco["annotations"].append({"id": 99, "image_id": 42, "category_id": 77, "iscrowd": 1, "area": 1.0,
                                "bbox": [0, 0, 1, 1], "segmentation": uncompressed_rle(unlisted)})
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    dataset = CocoInstances(root, "val2017")
    sample = dataset[dataset.image_ids.index(42)]
    np.testing.assert_array_equal(sample["semantic"] == VOID, unlisted)  # void, as any crowd
    np.testing.assert_array_equal(sample["instances"] == VOID, unlisted)
    assert sample["crowd_masks"].shape == (0, H, W)  # but no crowd of a class the dataset scores
    assert sample["crowd_labels"].shape == (0,) and sample["crowd_labels"].dtype == np.int64  # as labels
    np.testing.assert_array_equal(sample["labels"], [2])  # the car alone: the dog is wholly under it
