"""dynseg.sdk.results: build_result computes the instance map and scores' pixel-by-pixel definition (on
random inputs), maps instances back to the caller's detections, and its COCO export and overlay are right."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from dynseg.sdk import Instance, SegmentationResult
from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.inputs import INVERTED, Detections, DroppedDetection, check_detections
from dynseg.sdk.results import build_result, instance_colours, instance_winners

CLASS_NAMES = ("person", "cat", "cup")
K = len(CLASS_NAMES)


def gray_image(height: int, width: int) -> np.ndarray:
    """Gray is never an instance colour (they are saturated), so painting always changes a pixel."""
    return np.full((height, width, 3), 128, np.uint8)


def random_outputs(count: int, height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 instance logits (count+1, H, W) and semantic probabilities (K+1, H, W)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(count + 1, height, width)).astype(np.float32)
    semantic = rng.random((K + 1, height, width)).astype(np.float32)
    return logits, semantic / semantic.sum(axis=0)


def detections(labels: list[int], kept: list[int] | None = None, scores: list[float] | None = None) -> Detections:
    """Detections with the given labels and scores (0.5 each unless given; boxes do not matter to
    post-processing)."""
    count = len(labels)
    return Detections(
        boxes=np.zeros((count, 4), np.float32),
        labels=np.asarray(labels, np.int64),
        scores=np.full(count, 0.5, np.float32) if scores is None else np.asarray(scores, np.float32),
        kept=np.arange(count, dtype=np.int64) if kept is None else np.asarray(kept, np.int64),
    )


def painted(height: int, width: int, regions: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Instance logits (len(regions)+1, H, W) where detection k wins exactly its region (x1, y1, x2, y2
    inclusive), later regions over earlier ones, and the background wins elsewhere."""
    logits = np.zeros((len(regions) + 1, height, width), np.float32)
    logits[0] = 1.0
    for k, (x1, y1, x2, y2) in enumerate(regions, start=1):
        logits[k, y1:y2 + 1, x1:x2 + 1] = 2.0 + k
    return logits


# ----------------------------------------------------------------- against a pixel-by-pixel reference


def reference_argmax(values: np.ndarray, preference: list[int] | None = None) -> np.ndarray:
    """One pixel at a time: of the labels whose values are within 1e-5 (relative, at least 1e-5) of the
    pixel's largest, the first in `preference` (default: the lowest)."""
    _, height, width = values.shape
    preference = list(range(len(values))) if preference is None else preference
    winner = np.zeros((height, width), np.int64)
    for y in range(height):
        for x in range(width):
            column = [float(v) for v in values[:, y, x]]
            largest = max(column)
            floor = np.float32(largest) - np.float32(1e-5) * np.float32(max(abs(largest), 1.0))
            winner[y, x] = next(label for label in preference if column[label] >= floor)
    return winner


def reference_instances(logits: np.ndarray, semantic: np.ndarray, labels: np.ndarray,
                        scores: np.ndarray | None = None):
    """The instance map, and each instance's label index and score, one pixel at a time: the winner is
    reference_argmax's, preferring the background, then detections by descending score (all 0.5 unless
    given), then the earliest; instances that win pixels are numbered 1..N in detection order; a score is
    the mean of Q_sem of the instance's class over its pixels."""
    scores = np.full(len(labels), 0.5) if scores is None else scores
    by_confidence = sorted(range(len(labels)), key=lambda k: (-scores[k], k))
    winner = reference_argmax(logits, [0] + [k + 1 for k in by_confidence])
    present = sorted(set(winner.ravel().tolist()) - {0})
    instance_map = np.zeros_like(winner)
    scores = []
    for number, label in enumerate(present, start=1):
        instance_map[winner == label] = number
        scores.append(float(np.mean(semantic[labels[label - 1]][winner == label], dtype=np.float64)))
    return instance_map, [label - 1 for label in present], scores


@pytest.mark.parametrize(("count", "height", "width", "seed"), [(1, 9, 13, 0), (2, 16, 16, 1), (7, 23, 31, 2),
                                                                 (50, 12, 40, 3), (3, 1, 1, 4)])
def test_build_result_computes_the_pixel_by_pixel_definition(count, height, width, seed) -> None:
    logits, semantic = random_outputs(count, height, width, seed)
    logits[1:] += np.random.default_rng(seed).normal(0, 2, (count, 1, 1)).astype(np.float32)  # some win nothing
    labels = np.random.default_rng(seed + 100).integers(1, K + 1, count)
    kept = np.sort(np.random.default_rng(seed).choice(3 * count, count, replace=False))  # some input dropped
    confidences = np.random.default_rng(seed).choice([0.2, 0.5, 0.9], count).astype(np.float32)  # some equal
    logits[1:, ::2] = np.round(logits[1:, ::2])  # on every other row, many exact ties
    result = build_result(gray_image(height, width), logits, semantic,
                          detections(labels.tolist(), kept.tolist(), confidences.tolist()), CLASS_NAMES)
    instance_map, indices, scores = reference_instances(logits, semantic, labels, confidences)

    np.testing.assert_array_equal(result.instance_map, instance_map)
    assert result.instance_map.dtype == np.int32
    assert [i.class_id for i in result.instances] == labels[indices].tolist()
    assert [i.detection for i in result.instances] == kept[indices].tolist()
    np.testing.assert_allclose([i.score for i in result.instances], scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(result.semantic_map, reference_argmax(semantic))


def test_argmax_ties_go_to_the_lowest_label_as_in_torch() -> None:
    rng = np.random.default_rng(5)
    logits = rng.integers(0, 3, (6, 10, 12)).astype(np.float32)  # many ties
    _, semantic = random_outputs(5, 10, 12, 6)
    labels = np.array([1, 2, 3, 1, 2])
    result = build_result(gray_image(10, 12), logits, semantic, detections(labels.tolist()), CLASS_NAMES)
    np.testing.assert_array_equal(result.instance_map, reference_instances(logits, semantic, labels)[0])


@pytest.mark.parametrize("shape, scores", [((3, 2, 2), [0.9]), ((3, 2, 2), [0.9, 0.8, 0.7]),
                                           ((3, 2, 2), [[0.9, 0.8]]), ((2, 2), [0.9])])
def test_instance_winners_refuses_scores_that_do_not_match_the_detections(shape, scores) -> None:
    # one score short would leave the last detection's label never winning, its pixels background
    with pytest.raises(InvalidArgumentError, match=r"instance_logits must be \(D\+1, H, W\) and scores \(D,\)"):
        instance_winners(np.zeros(shape, np.float32), np.array(scores))


def test_the_callers_order_of_the_detections_changes_no_mask_only_the_instances_numbers() -> None:
    # detections of one class tie exactly where only the global term speaks for them: their scores decide
    rng = np.random.default_rng(11)
    count = 6
    logits, semantic = random_outputs(count, 16, 20, 12)
    logits[1:] = np.round(logits[1:] * 0.5)  # many exact ties
    labels = rng.integers(1, K + 1, count)
    confidences = (rng.permutation(count) + 1) / (count + 1)
    first = build_result(gray_image(16, 20), logits, semantic, detections(labels.tolist(), scores=confidences),
                         CLASS_NAMES)
    assert not np.array_equal(first.instance_map, reference_instances(logits, semantic, labels)[0]), "no tie decided"
    masks = {instance.detection: instance.mask for instance in first.instances}
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(count)  # the caller's detection i is order[i] above
        again = build_result(gray_image(16, 20), logits[np.concatenate([[0], order + 1])], semantic,
                             detections(labels[order].tolist(), scores=confidences[order]), CLASS_NAMES)
        assert {int(order[i.detection]): i.mask.tolist() for i in again.instances} == \
            {detection: mask.tolist() for detection, mask in masks.items()}


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e-3])
def test_duplicate_detections_whose_logits_differ_by_float_noise_make_one_instance(scale) -> None:
    # what onnxruntime makes of two identical detections: logits a few ulps apart, either way
    rng = np.random.default_rng(7)
    logits, semantic = random_outputs(3, 12, 14, 8)
    logits *= scale
    logits[2] = logits[1] * (1 + rng.uniform(-3e-6, 3e-6, logits[1].shape).astype(np.float32))
    result = build_result(gray_image(12, 14), logits, semantic, detections([1, 1, 2]), CLASS_NAMES)
    assert [i.detection for i in result.instances if i.detection in (0, 1)] == [0]
    np.testing.assert_array_equal(result.instance_map, reference_instances(logits, semantic, np.array([1, 1, 2]))[0])
    # a real margin still decides: 1e-4 relative above the others
    logits[2] = logits.max(axis=0) + 1e-4 * np.maximum(np.abs(logits.max(axis=0)), 1)
    result = build_result(gray_image(12, 14), logits, semantic, detections([1, 1, 2]), CLASS_NAMES)
    assert [i.detection for i in result.instances] == [1]


# ------------------------------------------------------------------------------------ the result


def test_instances_are_renumbered_in_detection_order_and_map_to_the_callers_detections() -> None:
    # Detection 1 of 4 (input index 1) was dropped by check_detections; kept detection 1 (input 2) wins no pixel.
    regions = [(0, 0, 4, 4), (10, 10, 12, 12), (6, 0, 9, 3)]
    logits = painted(16, 16, regions)
    logits[2] = -1.0  # input 2 wins nothing
    dets = Detections(boxes=np.zeros((3, 4), np.float32), labels=np.array([2, 1, 3]), scores=np.ones(3, np.float32),
                      kept=np.array([0, 2, 3]), dropped=[DroppedDetection(1, INVERTED)])
    _, semantic = random_outputs(3, 16, 16, 7)
    result = build_result(gray_image(16, 16), logits, semantic, dets, CLASS_NAMES)

    assert [(i.id, i.detection, i.class_id, i.class_name) for i in result.instances] == [(1, 0, 2, "cat"),
                                                                                          (2, 3, 3, "cup")]
    assert set(np.unique(result.instance_map).tolist()) == {0, 1, 2}
    assert result.instances[0].box == (0, 0, 4, 4) and result.instances[1].box == (6, 0, 9, 3)
    assert [d.detection for d in result.dropped] == [1, 2]
    assert result.dropped[1].reason == "its instance won no pixel"
    first = result.instances[0]
    np.testing.assert_array_equal(first.mask, result.instance_map == 1)
    assert first.mask.dtype == bool and first.mask.shape == (16, 16)
    assert first.score == pytest.approx(float(semantic[2][first.mask].mean()), rel=1e-6)


def test_the_result_owns_read_only_arrays_so_a_reused_frame_buffer_cannot_change_it() -> None:
    frame = gray_image(8, 10)
    logits = painted(8, 10, [(0, 0, 4, 4)])
    _, semantic = random_outputs(1, 8, 10, 3)
    result = build_result(frame, logits, semantic, detections([1]), CLASS_NAMES)
    before = result.overlay()
    frame[:] = 255  # the camera writes its next frame into the same buffer
    np.testing.assert_array_equal(result.overlay(), before)
    for array in (result.image, result.instance_map, result.semantic_map, result.instances[0].mask):
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 1


@pytest.mark.parametrize("copy", ["pickle", "deepcopy"])
def test_a_copied_result_keeps_its_arrays_read_only(copy: str) -> None:
    import copy as copying
    import pickle

    result = build_result(gray_image(8, 10), painted(8, 10, [(0, 0, 4, 4)]), random_outputs(1, 8, 10, 3)[1],
                          detections([1]), CLASS_NAMES)
    result.instances[0].mask  # cached before the copy, as a process pool's worker may have
    copied = pickle.loads(pickle.dumps(result)) if copy == "pickle" else copying.deepcopy(result)
    np.testing.assert_array_equal(copied.instance_map, result.instance_map)
    for array in (copied.image, copied.instance_map, copied.semantic_map, copied.instances[0].mask,
                  copied.instances[0].instance_map):
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 1


def test_no_detections_give_an_all_background_result() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dets = check_detections([], [], [], height=8, width=10, num_classes=K, max_detections=5)
    _, semantic = random_outputs(0, 8, 10, 8)
    result = build_result(gray_image(8, 10), np.zeros((1, 8, 10), np.float32), semantic, dets, CLASS_NAMES)
    assert isinstance(result, SegmentationResult)
    assert result.instances == [] and result.dropped == [] and result.to_coco(1) == []
    assert result.instance_map.shape == (8, 10) and not result.instance_map.any()
    assert result.semantic_map.shape == (8, 10) and result.semantic_map.dtype == np.int32
    np.testing.assert_array_equal(result.overlay(), result.image)


def test_to_coco_round_trips_through_pycocotools() -> None:
    coco_mask = pytest.importorskip("pycocotools.mask")
    regions = [(0, 0, 4, 6), (3, 2, 11, 8), (13, 0, 13, 9)]
    logits = painted(10, 14, regions)
    _, semantic = random_outputs(3, 10, 14, 9)
    result = build_result(gray_image(10, 14), logits, semantic, detections([1, 3, 2]), CLASS_NAMES)
    records = json.loads(json.dumps(result.to_coco(image_id=42)))  # JSON-ready as it is

    assert len(records) == 3
    for record, instance in zip(records, result.instances):
        assert isinstance(instance, Instance)
        assert record["image_id"] == 42 and record["category_id"] == instance.class_id
        assert record["score"] == instance.score
        assert isinstance(record["segmentation"]["counts"], str) and record["segmentation"]["size"] == [10, 14]
        np.testing.assert_array_equal(coco_mask.decode(record["segmentation"]).astype(bool), instance.mask)
        np.testing.assert_array_equal(record["bbox"], coco_mask.toBbox(record["segmentation"]))
    assert records[1]["bbox"] == [3.0, 2.0, 9.0, 7.0]


def test_to_coco_hands_out_records_the_caller_may_edit_and_caches_no_mask() -> None:
    pytest.importorskip("pycocotools.mask")
    result = build_result(gray_image(10, 14), painted(10, 14, [(0, 0, 4, 6)]), random_outputs(1, 10, 14, 9)[1],
                          detections([1]), CLASS_NAMES)
    first = result.to_coco(1)
    assert "_mask" not in result.instances[0].__dict__  # an RLE caches its counts, not a mask
    first[0]["segmentation"]["counts"] = first[0]["segmentation"]["counts"].encode()  # for an older pycocotools
    first[0]["segmentation"]["size"].append(3)
    again = result.to_coco(1)[0]["segmentation"]
    assert isinstance(again["counts"], str) and again["size"] == [10, 14] == result.instances[0].rle["size"]


def test_to_coco_takes_an_int_or_str_image_id_and_refuses_anything_else() -> None:
    result = build_result(gray_image(4, 4), painted(4, 4, [(0, 0, 1, 1)]), random_outputs(1, 4, 4, 0)[1],
                          detections([1]), CLASS_NAMES)
    assert [entry["image_id"] for entry in result.to_coco("2007_000032")] == ["2007_000032"]
    numbered = result.to_coco(np.int64(7))
    assert [entry["image_id"] for entry in numbered] == [7] and type(numbered[0]["image_id"]) is int  # JSON-ready
    for bad in (7.0, True, None, b"7"):
        with pytest.raises(InvalidArgumentError, match="image_id must be an int or a str"):
            result.to_coco(bad)


def test_overlay_changes_the_image_exactly_where_instances_are() -> None:
    regions = [(1, 1, 6, 6), (4, 4, 12, 9), (14, 2, 18, 11)]
    image = gray_image(12, 20)
    _, semantic = random_outputs(3, 12, 20, 10)
    result = build_result(image, painted(12, 20, regions), semantic, detections([1, 2, 3]), CLASS_NAMES)
    for alpha in (0.0, 0.5, 1.0):
        picture = result.overlay(alpha=alpha)
        assert picture.shape == (12, 20, 3) and picture.dtype == np.uint8
        changed = (picture != image).any(axis=2)
        if alpha > 0:
            np.testing.assert_array_equal(changed, result.instance_map > 0)
        else:  # only the outlines are drawn
            assert changed.any() and not changed[result.instance_map == 0].any()
        # (2, 2): inside instance 1, every 4-neighbour too; (1, 1): its corner, on its outline
        colour = instance_colours(3)[1].astype(np.float64)
        np.testing.assert_array_equal(picture[2, 2], np.rint((1 - alpha) * 128 + alpha * colour))
        np.testing.assert_array_equal(picture[1, 1], np.rint(0.55 * colour))
    np.testing.assert_array_equal(image, gray_image(12, 20))  # the image itself is untouched


def test_instance_colours_are_distinct() -> None:
    colours = instance_colours(60)
    assert colours.shape == (61, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours[1:]}) == 60
    for bad in (-1, 2.5, "3", None, True):
        with pytest.raises(InvalidArgumentError, match="count must be a non-negative int"):
            instance_colours(bad)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.5", True])
def test_overlay_wants_alpha_in_0_to_1(alpha: object) -> None:
    result = build_result(gray_image(4, 4), painted(4, 4, [(0, 0, 1, 1)]), random_outputs(1, 4, 4, 0)[1],
                          detections([1]), CLASS_NAMES)
    with pytest.raises(InvalidArgumentError, match="alpha"):
        result.overlay(alpha=alpha)


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"image": np.zeros((4, 4), np.uint8)}, "image"),
        ({"image": np.zeros((5, 4, 3), np.uint8)}, "instance_logits"),
        ({"instance_logits": np.zeros((3, 4, 4), np.float32)}, "instance_logits"),
        ({"semantic_probabilities": np.zeros((K, 4, 4), np.float32)}, "semantic_probabilities"),
        ({"class_names": ("a",)}, "semantic_probabilities"),
        ({"class_names": "xyz"}, "class_names must be a sequence of names"),
        ({"class_names": None}, "class_names must be a sequence of names"),
        ({"detections": Detections(np.zeros((1, 4), np.float32), np.ones(3, np.int64), np.ones(1, np.float32),
                                   np.zeros(1, np.int64))}, "detections must hold boxes"),
        ({"detections": "boxes"}, "detections must be what check_detections returns"),
        ({"instance_logits": np.zeros((2, 4, 4), complex)}, "instance_logits must be a floating-point array"),
        ({"semantic_probabilities": np.zeros((K + 1, 4, 4), object)},
         "semantic_probabilities must be a floating-point array"),
        ({"detections": detections([0])}, r"detections.labels must be in 1..3 \(class_names\), got \[0\]"),
        ({"detections": detections([K + 1])}, r"detections.labels must be in 1..3 \(class_names\), got \[4\]"),
    ],
)
def test_mismatched_backend_outputs_are_named(change: dict, argument: str) -> None:
    arguments = dict(image=gray_image(4, 4), instance_logits=painted(4, 4, [(0, 0, 1, 1)]),
                     semantic_probabilities=random_outputs(1, 4, 4, 0)[1], detections=detections([1]),
                     class_names=CLASS_NAMES) | change
    with pytest.raises(InvalidArgumentError, match=argument):
        build_result(**arguments)


def test_outline_is_every_instance_pixel_with_a_foreign_4_neighbour():
    logits = np.zeros((2, 12, 20), np.float32); logits[0] = 1.0
    logits[1, 3:8, 5:12] = 3.0  # one instance, rows 3..7, cols 5..11
    image = np.full((12, 20, 3), 128, np.uint8)
    sem = np.full((2, 12, 20), 0.5, np.float32)
    dets = Detections(boxes=np.zeros((1, 4), np.float32), labels=np.array([1]), scores=np.ones(1, np.float32),
                      kept=np.array([0]))
    result = build_result(image, logits, sem, dets, ("cat",))
    changed = (result.overlay(alpha=0.0) != image).any(axis=2)
    expected = np.zeros((12, 20), bool)
    expected[3:8, 5:12] = True
    expected[4:7, 6:11] = False  # interior pixels have all four neighbours inside
    np.testing.assert_array_equal(changed, expected)


@pytest.mark.parametrize("which", ["instance_logits", "semantic_probabilities"])
def test_outputs_holding_nan_are_refused_not_turned_into_a_map(which):
    logits, semantic = random_outputs(2, 6, 8, seed=3)
    (logits if which == "instance_logits" else semantic)[1, 2, 3] = np.nan
    with pytest.raises(InvalidArgumentError, match=f"the model's {which} hold NaN or infinite values"):
        build_result(gray_image(6, 8), logits, semantic, detections([1, 2]), CLASS_NAMES)


def test_dropped_detections_are_listed_ascending_whatever_dropped_them() -> None:
    # inputs 0..3: input 3 refused (inverted) by check_detections, kept inputs 0, 1, 2; input 0 wins no pixel
    logits = np.zeros((4, 8, 8), np.float32)
    logits[0] = 1.0
    logits[1] = -1.0  # input 0: no pixel
    logits[2, :4] = 3.0  # input 1
    logits[3, 4:] = 3.0  # input 2
    dets = Detections(boxes=np.zeros((3, 4), np.float32), labels=np.array([1, 1, 2]), scores=np.ones(3, np.float32),
                      kept=np.array([0, 1, 2]), dropped=[DroppedDetection(3, INVERTED)])
    semantic = np.full((4, 8, 8), 0.25, np.float32)
    result = build_result(np.full((8, 8, 3), 128, np.uint8), logits, semantic, dets, ["a", "b", "c"])
    assert [i.detection for i in result.instances] == [1, 2]
    assert result.dropped == [(0, "its instance won no pixel"), (3, INVERTED)]
