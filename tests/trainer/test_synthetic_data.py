"""The built-in synthetic scenes, the detector simulator and the COCO results reader (dynseg.trainer.data), the
training augmentation's rescaling of detections, and the detections the SDK's commands read or generate for
image files (dynseg.sdk.commands.images)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from dynseg.trainer.data import (
    VOID,
    DetectionKind,
    SyntheticScenes,
    load_coco_detections,
    simulate_detections,
)

SCENES = 120


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    scenes = SyntheticScenes(size=SCENES, seed=7)
    return [scenes[i] for i in range(SCENES)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two inclusive xyxy boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(iw, 0) * max(ih, 0)
    area = lambda box: (box[2] - box[0] + 1) * (box[3] - box[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _owner(sample: dict) -> np.ndarray:
    """int (H, W): 0 background, m + 1 where masks[m] (the instance map without void)."""
    owner = np.zeros(sample["semantic"].shape, np.int64)
    for m, mask in enumerate(sample["masks"]):
        owner[mask] = m + 1
    return owner


def _touching(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two disjoint masks share an edge (4-neighbourhood)."""
    grown = a.copy()
    grown[1:] |= a[:-1]
    grown[:-1] |= a[1:]
    grown[:, 1:] |= a[:, :-1]
    grown[:, :-1] |= a[:, 1:]
    return bool((grown & b).any())


# --------------------------------------------------------------------------------------------- scenes


def test_the_same_seed_and_index_give_identical_samples_in_any_order():
    first, second = SyntheticScenes(size=10, seed=3), SyntheticScenes(size=10, seed=3)
    later = second[7]
    for key, value in first[7].items():
        np.testing.assert_array_equal(value, later[key], err_msg=key)
    np.testing.assert_array_equal(first[-3]["image"], later["image"])


def test_different_indices_and_seeds_give_different_scenes():
    scenes = SyntheticScenes(size=4, seed=0)
    assert not np.array_equal(scenes[0]["image"], scenes[1]["image"])
    assert not np.array_equal(scenes[0]["image"], SyntheticScenes(size=4, seed=1)[0]["image"])


@pytest.mark.parametrize("image_size, num_classes, max_instances", [((128, 160), 4, 6), ((48, 40), 6, 3), ((96, 64), 1, 9)])
def test_samples_have_the_documented_shapes_dtypes_and_value_ranges(image_size, num_classes, max_instances):
    scenes = SyntheticScenes(size=12, image_size=image_size, num_classes=num_classes, max_instances=max_instances, seed=5)
    assert len(scenes) == 12
    assert scenes.class_names[0] == "background" and len(scenes.class_names) == num_classes + 1
    height, width = image_size
    for index in range(len(scenes)):
        sample = scenes[index]
        count = len(sample["labels"])
        assert 1 <= count <= max_instances
        assert sample["image"].shape == (height, width, 3) and sample["image"].dtype == np.uint8
        assert sample["semantic"].shape == (height, width) and sample["semantic"].dtype == np.int64
        assert sample["instances"].shape == (height, width) and sample["instances"].dtype == np.int32
        assert sample["masks"].shape == (count, height, width) and sample["masks"].dtype == bool
        assert sample["labels"].dtype == np.int64 and sample["boxes"].shape == (count, 4)
        assert sample["boxes"].dtype == np.float32
        assert set(np.unique(sample["semantic"])) <= {0, VOID, *range(1, num_classes + 1)}
        assert set(np.unique(sample["instances"])) <= {0, VOID, *range(1, count + 1)}
        assert sample["labels"].min() >= 1 and sample["labels"].max() <= num_classes


def test_masks_agree_with_the_instance_and_semantic_maps(samples):
    for sample in samples:
        masks, labels = sample["masks"], sample["labels"]
        assert masks.sum(axis=0).max() <= 1, "instances overlap"
        assert masks.reshape(len(masks), -1).any(axis=1).all(), "an instance has no pixels"
        void = sample["semantic"] == VOID
        np.testing.assert_array_equal(void, sample["instances"] == VOID)
        for m, mask in enumerate(masks):
            np.testing.assert_array_equal(sample["instances"] == m + 1, mask & ~void)
            assert np.all(sample["semantic"][mask & ~void] == labels[m])
        background = ~masks.any(axis=0)
        assert np.all(sample["semantic"][background & ~void] == 0)


def test_void_lies_only_on_a_thin_band_along_object_edges(samples):
    for sample in samples:
        owner = _owner(sample)
        padded = np.pad(owner, 1, mode="edge")
        differs = (
            (padded[:-2, 1:-1] != owner) | (padded[2:, 1:-1] != owner) | (padded[1:-1, :-2] != owner) | (padded[1:-1, 2:] != owner)
        )
        np.testing.assert_array_equal(sample["semantic"] == VOID, differs)
    # Some interior survives: the band is thin compared with the objects.
    labelled = sum(int(((s["semantic"] > 0) & (s["semantic"] != VOID)).sum()) for s in samples)
    void = sum(int((s["semantic"] == VOID).sum()) for s in samples)
    assert labelled > 2 * void


def test_turning_the_void_border_off_changes_only_the_labels():
    with_void, without = SyntheticScenes(size=3, seed=2)[2], SyntheticScenes(size=3, seed=2, void_border=False)[2]
    assert not (without["semantic"] == VOID).any() and not (without["instances"] == VOID).any()
    for key in ("image", "masks", "labels", "boxes"):
        np.testing.assert_array_equal(with_void[key], without[key], err_msg=key)
    np.testing.assert_array_equal(without["instances"], _owner(without))


def test_boxes_are_tight_around_the_visible_masks(samples):
    for sample in samples:
        for mask, box in zip(sample["masks"], sample["boxes"]):
            rows, cols = np.nonzero(mask)
            np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max(), rows.max()])


def test_same_class_instances_occlude_each_other_in_many_images(samples):
    with_same_class_contact = 0
    for sample in samples:
        masks, labels = sample["masks"], sample["labels"]
        pairs = [(a, b) for a in range(len(labels)) for b in range(a + 1, len(labels)) if labels[a] == labels[b]]
        with_same_class_contact += any(_touching(masks[a], masks[b]) for a, b in pairs)
    assert with_same_class_contact / len(samples) > 0.3


def test_images_show_at_least_two_classes_on_average(samples):
    assert np.mean([len(np.unique(s["labels"])) for s in samples]) >= 2.0
    present = np.unique(np.concatenate([s["labels"] for s in samples]))
    np.testing.assert_array_equal(present, [1, 2, 3, 4])


def _scripted_scene(monkeypatch, image_size: tuple[int, int], candidates: list[tuple[float, float, float]]):
    """A one-instance scene whose placements are `candidates`, discs (cy, cx, radius) proposed in turn, and
    the mask of each candidate; no wire (it would cut the instance)."""
    from dynseg.trainer.data import synthetic

    proposals = iter(candidates)

    def propose(rng, placed, num_classes, short, height, width):
        cy, cx, radius = next(proposals, (None, None, None))
        assert radius is not None, "a candidate that should have been placed was refused"
        return 1, synthetic._Geometry(cy, cx, radius, 0.0, 1.0, ()), synthetic._look(rng, 1)

    monkeypatch.setattr(synthetic, "_propose", propose)
    monkeypatch.setattr(synthetic, "_WIRE_PROBABILITY", 0.0)
    sample = SyntheticScenes(size=1, image_size=image_size, num_classes=1, max_instances=1, void_border=False)[0]
    ys, xs = np.mgrid[0 : image_size[0], 0 : image_size[1]].astype(np.float32)
    discs = [synthetic._Geometry(cy, cx, radius, 0.0, 1.0, ()) for cy, cx, radius in candidates]
    return sample, [synthetic._shape_mask(1, disc, ys, xs)[0] for disc in discs]


def test_an_instance_mostly_outside_the_image_is_not_placed(monkeypatch):
    # discs of radius 20 centred on the left border: 48 % of one at x = -1 lies inside, 52 % of one at x = 0
    sample, masks = _scripted_scene(monkeypatch, (140, 140), [(70.0, -1.0, 20.0), (70.0, 0.0, 20.0)])
    np.testing.assert_array_equal(sample["masks"], masks[1][None])


def test_an_instance_smaller_than_the_minimum_pixel_count_is_not_placed(monkeypatch):
    # 140 x 140 pixels: at least max(12, 0.25 % of them) = 49 pixels; these discs have 45 and 49
    sample, masks = _scripted_scene(monkeypatch, (140, 140), [(70.0, 70.0, 3.9), (70.0, 70.0, 4.0)])
    assert [int(mask.sum()) for mask in masks] == [45, 49]
    np.testing.assert_array_equal(sample["masks"], masks[1][None])


def test_every_instance_must_keep_30_percent_of_its_area_and_the_minimum_pixel_count_visible():
    from dynseg.trainer.data.synthetic import _all_visible

    def visible(*pixels: int) -> np.ndarray:  # an owner map where instance j + 1 shows pixels[j] pixels
        return np.concatenate([np.zeros(10, np.int32)] + [np.full(n, j + 1, np.int32) for j, n in enumerate(pixels)])

    assert _all_visible(visible(30), [100], 12) and not _all_visible(visible(29), [100], 12)  # 30 % of 100
    assert _all_visible(visible(12), [20], 12) and not _all_visible(visible(11), [20], 12)  # 12 pixels beat 30 %
    assert not _all_visible(visible(30, 11), [100, 20], 12)  # one instance short is enough
    assert not _all_visible(visible(30), [100, 20], 12)  # an instance covered completely


def test_invalid_construction_and_indices_are_rejected():
    for kwargs in ({"num_classes": 0}, {"num_classes": 7}, {"image_size": (16, 160)}, {"max_instances": 0}, {"seed": -1}):
        with pytest.raises(ValueError, match=f"^{next(iter(kwargs))} must be"):
            SyntheticScenes(**kwargs)
    with pytest.raises(IndexError, match="index 2 out of range for 2 images"):
        SyntheticScenes(size=2)[2]
    with pytest.raises(TypeError, match="index must be an int, got float"):
        SyntheticScenes(size=2)[0.5]


def test_scenes_load_through_a_torch_dataloader():
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(SyntheticScenes(size=3), batch_size=None, shuffle=False)
    batches = list(loader)
    assert len(batches) == 3 and batches[0]["image"].dtype == torch.uint8


# ----------------------------------------------------------------------------------------- detections


def _gt_scenes(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random ground truth: 1..6 boxes of classes 1..4 in a 128 x 160 image, some at the borders."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        m = int(rng.integers(1, 7))
        x1, y1 = rng.uniform(0, 150, m).round(), rng.uniform(0, 118, m).round()
        w, h = rng.uniform(1, 60, m).round(), rng.uniform(1, 60, m).round()
        boxes = np.stack([x1, y1, np.minimum(x1 + w, 159), np.minimum(y1 + h, 127)], axis=1).astype(np.float32)
        scenes.append((boxes, rng.integers(1, 5, m)))
    return scenes


RATES = dict(jitter=0.1, poor_localisation=0.25, miss_rate=0.15, false_positives=0.4, duplicates=0.2)


@pytest.fixture(scope="module")
def simulated() -> list[tuple[np.ndarray, np.ndarray, dict]]:
    rng = np.random.default_rng(11)
    return [
        (boxes, labels, simulate_detections(boxes, labels, image_size=(128, 160), rng=rng, num_classes=4, **RATES))
        for boxes, labels in _gt_scenes(700)
    ]


def test_simulated_detections_fail_at_the_requested_rates(simulated):
    objects = detected = poor = duplicates = false_positives = 0
    for boxes, _, det in simulated:
        objects += len(boxes)
        primary = np.isin(det["kind"], [DetectionKind.TRUE_POSITIVE, DetectionKind.POORLY_LOCALISED])
        assert len(np.unique(det["source"][primary])) == primary.sum(), "an object got two primary boxes"
        detected += int(primary.sum())
        poor += int((det["kind"] == DetectionKind.POORLY_LOCALISED).sum())
        duplicates += int((det["kind"] == DetectionKind.DUPLICATE).sum())
        false_positives += int((det["kind"] == DetectionKind.FALSE_POSITIVE).sum())

    def close(observed: float, expected: float, trials: int) -> bool:  # within 4.5 binomial sigmas
        return abs(observed - expected) <= 4.5 * math.sqrt(expected * (1 - expected) / trials)

    assert objects > 2000
    assert close(1 - detected / objects, RATES["miss_rate"], objects)
    assert close(poor / detected, RATES["poor_localisation"], detected)
    assert close(duplicates / detected, RATES["duplicates"], detected)
    expected_fp = RATES["false_positives"] * objects  # Poisson: sd = sqrt(mean)
    assert abs(false_positives - expected_fp) <= 4.5 * math.sqrt(expected_fp)


def test_simulated_boxes_lie_inside_the_image_and_are_never_degenerate(simulated):
    corner_cases = np.array([[0, 0, 0, 0], [159, 127, 159, 127], [0, 0, 159, 127], [158, 3, 159, 3]], np.float32)
    rng = np.random.default_rng(0)
    extra = [
        simulate_detections(corner_cases, np.array([1, 2, 3, 4]), image_size=(128, 160), rng=rng, num_classes=4, jitter=0.8,
                            poor_localisation=0.5, duplicates=0.5, false_positives=1.0)
        for _ in range(200)
    ]
    for det in [d for _, _, d in simulated] + extra:
        boxes = det["boxes"]
        assert boxes.dtype == np.float32 and np.all(np.isfinite(boxes))
        assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= 159) and np.all(boxes[:, 3] <= 127)
        assert np.all(boxes[:, 2:] - boxes[:, :2] >= 1)


def test_detections_come_sorted_by_descending_score_with_scores_in_0_1(simulated):
    for _, _, det in simulated:
        assert np.all(np.diff(det["scores"]) <= 0)
        assert np.all((det["scores"] > 0) & (det["scores"] <= 1))
        assert det["labels"].dtype == np.int64 and det["scores"].dtype == np.float32


def test_false_positives_include_confident_ones_on_background_and_on_wrong_classes(simulated):
    scores, on_background, wrong_class = [], 0, 0
    for boxes, labels, det in simulated:
        for k in np.flatnonzero(det["kind"] == DetectionKind.FALSE_POSITIVE):
            scores.append(det["scores"][k])
            source = det["source"][k]
            if source < 0:
                on_background += 1
            else:
                wrong_class += 1
                assert det["labels"][k] != labels[source]
    scores = np.array(scores)
    assert 0.15 < np.mean(scores > 0.5) < 0.7, "false positives should be mixed, some confident"
    assert on_background > 100 and wrong_class > 100


def test_true_positives_score_higher_than_false_positives_and_hug_their_object(simulated):
    tp_scores, fp_scores, tp_iou, poor_iou = [], [], [], []
    for boxes, _, det in simulated:
        for k, kind in enumerate(det["kind"]):
            if kind == DetectionKind.TRUE_POSITIVE:
                tp_scores.append(det["scores"][k])
                tp_iou.append(_iou(det["boxes"][k], boxes[det["source"][k]]))
            elif kind == DetectionKind.POORLY_LOCALISED:
                poor_iou.append(_iou(det["boxes"][k], boxes[det["source"][k]]))
            elif kind == DetectionKind.FALSE_POSITIVE:
                fp_scores.append(det["scores"][k])
    assert np.mean(tp_scores) > 0.75 > np.mean(fp_scores) + 0.2
    assert np.median(tp_iou) > 0.7
    assert np.median(poor_iou) < 0.55 and np.mean(np.array(poor_iou) < 0.6) > 0.8


def test_duplicates_overlap_their_source_detection_and_score_lower(simulated):
    seen = 0
    for _, _, det in simulated:
        for k in np.flatnonzero(det["kind"] == DetectionKind.DUPLICATE):
            first = np.flatnonzero((det["source"] == det["source"][k]) & (det["kind"] <= DetectionKind.POORLY_LOCALISED))
            assert len(first) == 1
            assert _iou(det["boxes"][k], det["boxes"][first[0]]) > 0.5
            assert det["scores"][k] < det["scores"][first[0]] and first[0] < k
            seen += 1
    assert seen > 200


def test_a_poorly_localised_box_moves_exactly_one_side_or_shifts_along_one_axis():
    gt = np.array([40, 30, 99, 79], np.float32)  # 60 x 50 pixels, far enough from the border not to be clipped
    det = simulate_detections(np.tile(gt, (300, 1)), np.ones(300, np.int64), image_size=(128, 160),
                              rng=np.random.default_rng(2), jitter=0.0, poor_localisation=1.0, miss_rate=0.0,
                              false_positives=0.0, duplicates=0.0, num_classes=1)
    assert np.all(det["kind"] == DetectionKind.POORLY_LOCALISED)
    grid = 2 / 256  # _finish rounds each side outwards onto a 1/256-pixel grid
    kinds = set()
    for box in det["boxes"]:
        same = [box[0] == gt[0] and box[2] == gt[2], box[1] == gt[1] and box[3] == gt[3]]
        assert sum(same) == 1, box  # the other axis keeps its first and its last pixel exactly
        axis = same.index(False)
        lo, hi, size = box[axis], box[axis + 2], gt[axis + 2] - gt[axis] + 1
        if lo == gt[axis] or hi == gt[axis + 2]:  # shrunk towards one side, which stays exactly where it was
            assert 0.35 <= (hi - lo + 1) / size <= 0.65 + grid, box
            kinds.add("kept last" if hi == gt[axis + 2] else "kept first")
        else:  # shifted whole
            assert abs((hi - lo + 1) - size) <= grid and 0.35 - grid <= abs(lo - gt[axis]) / size <= 0.6 + grid, box
            kinds.add("shifted")
    assert kinds == {"kept first", "kept last", "shifted"}


def test_a_perfect_detector_returns_the_ground_truth():
    boxes, labels = _gt_scenes(1, seed=4)[0]
    det = simulate_detections(boxes, labels, image_size=(128, 160), rng=np.random.default_rng(1), num_classes=4,
                              jitter=0.0, poor_localisation=0.0, miss_rate=0.0, false_positives=0.0, duplicates=0.0)
    order = np.argsort(det["source"])
    wide = (boxes[:, 2:] - boxes[:, :2] >= 1).all(axis=1)  # narrower boxes are widened to two pixels
    np.testing.assert_array_equal(det["boxes"][order][wide], boxes[wide])
    np.testing.assert_array_equal(det["labels"][order], labels)


def test_the_same_generator_state_gives_the_same_detections_and_no_objects_give_only_false_positives():
    boxes, labels = _gt_scenes(1, seed=5)[0]
    first = simulate_detections(boxes, labels, image_size=(128, 160), rng=np.random.default_rng(3), num_classes=4)
    second = simulate_detections(boxes, labels, image_size=(128, 160), rng=np.random.default_rng(3), num_classes=4)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    empty = simulate_detections(np.zeros((0, 4)), np.zeros(0, np.int64), image_size=(128, 160),
                                rng=np.random.default_rng(0), num_classes=4, false_positives=0.0)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["scores"].dtype == np.float32
    rng = np.random.default_rng(0)
    kinds = np.concatenate([
        simulate_detections(np.zeros((0, 4)), np.zeros(0, np.int64), image_size=(128, 160), rng=rng, num_classes=4,
                            false_positives=2.0)["kind"]
        for _ in range(20)
    ])
    assert len(kinds) > 10 and np.all(kinds == DetectionKind.FALSE_POSITIVE)


def test_bools_are_not_taken_for_ints_as_the_sdk_refuses_them():
    for name in ("size", "num_classes", "max_instances", "seed"):
        for flag in (True, np.True_, False):
            with pytest.raises(ValueError, match=name):
                SyntheticScenes(**{name: flag})
    with pytest.raises(ValueError, match="num_classes"):
        simulate_detections(np.array([[2, 2, 10, 10]], np.float32), np.array([1]), image_size=(32, 32),
                            rng=np.random.default_rng(0), num_classes=True)
    assert SyntheticScenes(size=np.int64(2), num_classes=np.int32(3), seed=np.uint8(1)).num_classes == 3


def test_more_scenes_than_len_can_count_are_refused_and_the_most_it_can_are_not():
    with pytest.raises(ValueError, match="size must be an int in 0..9223372036854775807, got 9223372036854775808"):
        SyntheticScenes(size=2**63)
    assert len(SyntheticScenes(size=2**63 - 1)) == 2**63 - 1


def test_the_simulator_rejects_bad_arguments():
    boxes, labels = np.array([[2, 2, 10, 10]], np.float32), np.array([1])
    good = dict(image_size=(32, 32), rng=np.random.default_rng(0), num_classes=4)
    for bad in ({"miss_rate": 1.5}, {"jitter": -0.1}, {"false_positives": math.nan}, {"num_classes": 0}, {"image_size": (1, 32)}):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))} must be"):
            simulate_detections(boxes, labels, **{**good, **bad})
    with pytest.raises(ValueError, match="labels"):
        simulate_detections(boxes, np.array([5]), **good)
    with pytest.raises(ValueError, match="x2 >= x1"):
        simulate_detections(np.array([[10, 2, 2, 10]]), labels, **good)


# --------------------------------------------------------------------------------------------- augmentation


def test_rescaling_maps_the_last_row_and_column_onto_the_last_row_and_column():
    from dynseg.trainer.train import TrainConfig, augment

    height, width = 9, 13
    image = np.zeros((height, width, 3), np.uint8)
    image[:, -1] = image[-1, :] = 255  # the far column and row
    semantic = (image[..., 0] > 0).astype(np.int64)
    boxes = np.array([[width - 1, height - 1, width - 1, height - 1], [6, 4, 6, 4], [0, 0, width - 1, height - 1]])
    sample = {"image": image, "semantic": semantic, "masks": semantic[None] == 1, "labels": np.array([1]),
              "boxes": np.array([[0, 0, width - 1, height - 1]], np.float32),
              "detections": {"boxes": boxes.astype(np.float32), "labels": np.ones(3, np.int64),
                             "scores": np.array([0.9, 0.8, 0.7], np.float32)}}
    # a one-pixel box becomes the scaled pixels whose nearest source pixel (i (w - 1) / (w' - 1), rounded) it is,
    # as the class map's pixels do: the last ones end at the last row and column
    for scale, corner, centre in ((2.0, [24, 16], [12, 8, 13, 9]), (3.0, [37, 25], [18, 12, 20, 14])):
        out = augment(sample, TrainConfig(scale_range=(scale, scale), mirror=False), np.random.default_rng(0))
        h, w = out["image"].shape[1:]
        assert (h, w) == (height * scale, width * scale)
        assert out["image"][:, :, -1].min() > 254.9 and out["image"][:, -1, :].min() > 254.9
        assert out["detections"]["boxes"].tolist() == [[*corner, w - 1, h - 1], centre, [0, 0, w - 1, h - 1]], scale
        assert out["semantic"][-1].eq(1).all() and out["semantic"][:, -1].eq(1).all()
        assert out["boxes"].tolist() == [[0, 0, w - 1, h - 1]]


@pytest.mark.parametrize("scale", [0.5, 0.75, 0.9, 1.3, 2.0])
def test_rescaled_labels_take_each_pixels_nearest_source_pixel_under_the_images_map(scale):
    from dynseg.trainer.train import TrainConfig, augment

    # stripes of columns, so the bilinear image's nearest source column is where it is above half
    columns = np.random.default_rng(1).integers(0, 2, 29)
    columns[-1] = 1  # a thin object on the far column: shrinking with F.interpolate's "nearest" dropped it
    semantic = np.broadcast_to(columns, (21, 29)).astype(np.int64)
    image = np.repeat((semantic * 255).astype(np.uint8)[..., None], 3, axis=2)
    sample = {"image": image, "semantic": semantic, "masks": semantic[None] == 1, "labels": np.array([1]),
              "boxes": np.zeros((1, 4), np.float32)}
    out = augment(sample, TrainConfig(scale_range=(scale, scale), mirror=False), np.random.default_rng(0))
    brightness = out["image"][0]
    decided = (brightness - 127.5).abs() > 1e-3  # not halfway between two source columns
    assert torch.equal((brightness > 127.5)[decided], out["semantic"].eq(1)[decided]), scale
    assert out["semantic"][:, -1].eq(1).all() and torch.equal(out["masks"][0], out["semantic"].eq(1))
    assert out["boxes"][0, 2] == out["image"].shape[-1] - 1


# --------------------------------------------------------------------------------------- COCO results


def test_coco_results_round_trip_through_a_file(tmp_path):
    rng = np.random.default_rng(0)
    expected, entries = {}, []
    for image_id in (3, 9):
        x1y1 = rng.uniform(0, 50, (5, 2)).round(2)
        boxes = np.concatenate([x1y1, x1y1 + rng.uniform(1, 40, (5, 2)).round(2)], axis=1).astype(np.float32)
        labels, scores = rng.integers(1, 5, 5), rng.uniform(0, 1, 5).astype(np.float32)
        for box, label, score in zip(boxes, labels, scores):
            x1, y1, x2, y2 = (float(v) for v in box)
            entries.append({"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1], "score": float(score)})
        order = np.argsort(-scores)
        expected[image_id] = (boxes[order], labels[order], scores[order])
    entries.append({"image_id": 12, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5})  # not asked for
    rng.shuffle(entries)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(entries))

    loaded = load_coco_detections(path, [3, 9, 4])
    assert set(loaded) == {3, 9, 4}
    for image_id, (boxes, labels, scores) in expected.items():
        det = loaded[image_id]
        np.testing.assert_allclose(det["boxes"], boxes, atol=1e-4)
        np.testing.assert_array_equal(det["labels"], labels)
        np.testing.assert_array_equal(det["scores"], scores)
        assert det["boxes"].dtype == np.float32 and det["labels"].dtype == np.int64 and det["scores"].dtype == np.float32
    assert loaded[4]["boxes"].shape == (0, 4) and loaded[4]["scores"].shape == (0,)


GOOD_ENTRY = {"image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.9}


@pytest.mark.parametrize(
    "bad_entry, message",
    [
        ({**GOOD_ENTRY, "score": math.nan}, "score"),
        ({**GOOD_ENTRY, "bbox": [1.0, 2.0, -3.0, 4.0]}, "negative size"),
        ({**GOOD_ENTRY, "bbox": [1.0, 2.0, 3.0]}, "bbox"),
        ({**GOOD_ENTRY, "bbox": [1.0, 2.0, "3", 4.0]}, "bbox"),
        ({**GOOD_ENTRY, "category_id": 0}, "category_id"),
        ({**GOOD_ENTRY, "category_id": True}, "category_id"),
        ({**GOOD_ENTRY, "category_id": 2**70}, "category_id"),  # past int64
        ({**GOOD_ENTRY, "bbox": [1.0, 2.0, 10**400, 4.0]}, "bbox"),  # past float64: OverflowError
        ({**GOOD_ENTRY, "score": 1e39}, "score"),  # past float32
        ({**GOOD_ENTRY, "score": -0.5}, r"score must be a finite float32 number >= 0 \(a confidence"),
        ({**GOOD_ENTRY, "bbox": [3e38, 0.0, 3e38, 10.0]}, r"far corner \(x \+ w - 1, y \+ h - 1\) overflows"),
        ({k: v for k, v in GOOD_ENTRY.items() if k != "score"}, "missing key 'score'"),
        ([1, 2, 3, 4], "expected an object"),
    ],
)
def test_malformed_coco_results_are_rejected_naming_the_file_and_entry(tmp_path, bad_entry, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GOOD_ENTRY, GOOD_ENTRY, bad_entry]))
    with pytest.raises(ValueError, match=message) as error:
        load_coco_detections(path, [1])
    assert "bad.json" in str(error.value) and "entry 2" in str(error.value)


def test_coco_results_may_start_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "windows.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD_ENTRY]).encode())
    detections = load_coco_detections(path, [1])[1]
    assert detections["labels"].tolist() == [2] and detections["scores"].tolist() == pytest.approx([0.9])


def test_a_results_path_that_is_no_file_and_image_ids_that_are_a_string_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"detections file \S*missing.json does not exist"):
        load_coco_detections(tmp_path / "missing.json", [1])
    with pytest.raises(ValueError, match="is a folder, not a file"):
        load_coco_detections(tmp_path, [1])
    path = tmp_path / "results.json"
    path.write_text(json.dumps([GOOD_ENTRY]))
    # a string is an iterable of its characters: it used to find no detection, silently
    with pytest.raises(ValueError, match=r"image_ids must be a collection of ids, not the string '1'"):
        load_coco_detections(path, "1")
    with pytest.raises(ValueError, match="image_ids must be a collection of ids, got NoneType"):
        load_coco_detections(path, None)
    with pytest.raises(ValueError, match=r"image_ids holds \[1\], which cannot be an id"):
        load_coco_detections(path, [[1]])


def test_coco_results_that_are_not_a_json_list_are_rejected(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        load_coco_detections(path, [1])
    path.write_bytes(b'[{"image_id": "caf\xe9"}]')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        load_coco_detections(path, [1])
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="JSON list"):
        load_coco_detections(path, [1])


# ------------------------------------------------------------------------------ detections for image files


def test_generated_boxes_reach_the_last_column_and_row_but_never_pass_them():
    from dynseg.sdk.commands.images import generated_detections

    for height, width in ((20, 30), (9, 6), (2, 2)):
        boxes = generated_detections(height, width, 200, num_classes=3, seed=1).boxes
        assert boxes.min() >= 0 and np.all(boxes[:, 2:] > boxes[:, :2])
        assert boxes[:, 2].max() == width - 1 and boxes[:, 3].max() == height - 1, (height, width)
        np.testing.assert_array_equal(boxes, generated_detections(height, width, 200, num_classes=3, seed=1).boxes)


def test_only_an_ascii_decimal_file_stem_answers_to_an_integer_image_id(tmp_path):
    from dynseg.sdk.commands.images import image_ids, read_detections

    assert image_ids(tmp_path / "000000000139.jpg") == ["000000000139", 139]
    # str.isdigit() admits these; int() reads Arabic-Indic digits as 123, and fails on a superscript
    assert image_ids(tmp_path / "\u0661\u0662\u0663.jpg") == ["\u0661\u0662\u0663"]
    assert image_ids(tmp_path / "x\u00b2.png") == ["x\u00b2"] and image_ids(tmp_path / "\u00b2.png") == ["\u00b2"]
    results = tmp_path / "dets.json"
    results.write_text(json.dumps([{"image_id": 123, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.9},
                                   {"image_id": "\u0661\u0662\u0663", "category_id": 2, "bbox": [1, 2, 3, 4],
                                    "score": 0.8}]))
    arabic, ascii_digits = read_detections(results, [tmp_path / "\u0661\u0662\u0663.jpg", tmp_path / "123.jpg"])
    assert arabic.labels.tolist() == [2] and arabic.image_id == "\u0661\u0662\u0663"
    assert ascii_digits.labels.tolist() == [1] and ascii_digits.image_id == 123


def test_detection_labels_outside_1_to_k_are_named_below_1_as_above_k():
    from dynseg.sdk import InvalidArgumentError
    from dynseg.sdk.commands.images import check_detection_labels

    check_detection_labels([("a.jpg", np.array([1, 3])), ("b.jpg", np.zeros(0, np.int64))], 3, " in dets.json")
    for bad in ([0, 2], [-1, 1], [4, 1]):
        wrong = sorted(v for v in bad if not 1 <= v <= 3)
        message = ("1 image has detections in dets.json of classes this model does not have (it has 1..3): "
                   f"c.jpg ({wrong})")
        with pytest.raises(InvalidArgumentError, match=f"^{re.escape(message)}$"):
            check_detection_labels([("a.jpg", np.array([1])), ("c.jpg", np.array(bad))], 3, " in dets.json")
