"""Tests of the instance-segmentation metrics (dynseg.trainer.evaluation): hand-computed cases, loop
re-implementations of both AP^r protocols written here from their definitions, and pycocotools."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import weakref

import numpy as np
import pytest

from dynseg.trainer.evaluation import AP_R_THRESHOLDS, evaluate, evaluate_each, json_ready, write_metrics

KEYS = [f"{tau:.1f}" for tau in AP_R_THRESHOLDS]


# ---------------------------------------------------------------------------- helpers


def box(size: tuple[int, int], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """bool (H, W), True on rows top..bottom-1 and columns left..right-1."""
    mask = np.zeros(size, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def prediction(masks, labels, scores, size=(16, 16)) -> dict:
    masks = np.array(masks, dtype=bool).reshape(-1, *size)
    return {"masks": masks, "labels": np.array(labels, dtype=np.int64), "scores": np.array(scores, dtype=np.float64)}


def truth(masks, labels, void=None, size=(16, 16)) -> dict:
    masks = np.array(masks, dtype=bool).reshape(-1, *size)
    return {"masks": masks, "labels": np.array(labels, dtype=np.int64), "void": void}


def random_dataset(seed: int, *, n_images=6, num_classes=3, size=(24, 32), max_gt=4, max_pred=7, with_void=True):
    """Rectangles: ground truth (now and then one repeated, so IoUs tie), predictions that copy, shift
    or erode a ground truth (some relabelled), and strays. Scores have one decimal so they tie too."""
    rng = np.random.default_rng(seed)
    height, width = size

    def random_box():
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        return box(size, top, left, rng.integers(top + 3, height + 1), rng.integers(left + 3, width + 1))

    predictions, ground_truths = [], []
    for _ in range(n_images):
        gt_masks = [random_box() for _ in range(rng.integers(0, max_gt + 1))]
        if gt_masks and rng.random() < 0.3:
            gt_masks.append(gt_masks[0])
        gt_labels = rng.integers(1, num_classes + 1, len(gt_masks)).tolist()
        pred_masks, pred_labels = [], []
        for _ in range(rng.integers(0, max_pred + 1)):
            if gt_masks and rng.random() < 0.75:
                j = rng.integers(len(gt_masks))
                shift = tuple(rng.integers(-2, 3, 2)) if rng.random() < 0.6 else (0, 0)
                mask = np.roll(gt_masks[j], shift, axis=(0, 1)) & (rng.random(size) > rng.uniform(0, 0.3))
                pred_masks.append(mask)
                pred_labels.append(gt_labels[j] if rng.random() < 0.85 else int(rng.integers(1, num_classes + 1)))
            else:
                pred_masks.append(random_box())
                pred_labels.append(int(rng.integers(1, num_classes + 1)))
        scores = np.round(rng.random(len(pred_masks)), 1).tolist()
        void = random_box() if with_void and rng.random() < 0.5 else None
        predictions.append(prediction(pred_masks, pred_labels, scores, size))
        ground_truths.append(truth(gt_masks, gt_labels, void, size))
    return predictions, ground_truths


# ---------------------------------------------------------------------------- loop references


def loop_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum()) / float(union) if union else 0.0


def loop_ap_r_original(predictions, ground_truths, num_classes, tau) -> float:
    """The released evaluation code's definition, one pixel mask at a time."""
    per_class = []
    for c in range(1, num_classes + 1):
        entries, gt_count = [], 0  # (score, best IoU) in dataset order
        for pred, gt in zip(predictions, ground_truths):
            keep = ~gt["void"] if gt["void"] is not None else np.ones(gt["masks"].shape[1:], bool)
            gts = [m & keep for m, label in zip(gt["masks"], gt["labels"]) if label == c]
            gt_count += len(gts)
            for mask, label, score in zip(pred["masks"], pred["labels"], pred["scores"]):
                if label == c:
                    entries.append((score, max([loop_iou(mask & keep, g) for g in gts], default=0.0)))
        if gt_count == 0:
            continue
        entries.sort(key=lambda entry: -entry[0])  # stable: ties stay in dataset order
        good_so_far, area = 0, 0.0
        for rank, (_, overlap) in enumerate(entries, start=1):
            if overlap > tau:
                good_so_far += 1
                area += good_so_far / rank
        per_class.append(area / gt_count)
    return float(np.mean(per_class))


def loop_ap_r_voc(predictions, ground_truths, num_classes, tau) -> float:
    """VOC detection protocol on masks: void kept, best ground truth per prediction, IoU >= τ, envelope."""
    per_class = []
    for c in range(1, num_classes + 1):
        entries, gt_count = [], 0
        for i, (pred, gt) in enumerate(zip(predictions, ground_truths)):
            gt_count += int(np.sum(gt["labels"] == c))
            for j, (label, score) in enumerate(zip(pred["labels"], pred["scores"])):
                if label == c:
                    entries.append((score, i, j))
        if gt_count == 0:
            continue
        entries.sort(key=lambda entry: -entry[0])
        taken, flags = set(), []
        for _, i, j in entries:
            gt = ground_truths[i]
            keep = ~gt["void"] if gt["void"] is not None else np.ones(gt["masks"].shape[1:], bool)
            best, best_k = -1.0, None
            for k, (mask, label) in enumerate(zip(gt["masks"], gt["labels"])):
                if label == c:
                    overlap = loop_iou(predictions[i]["masks"][j], mask & keep)
                    if overlap > best:
                        best, best_k = overlap, k
            hit = best_k is not None and best >= tau and (i, best_k) not in taken
            if hit:
                taken.add((i, best_k))
            flags.append(hit)
        precision, recall, tp = [], [], 0
        for rank, hit in enumerate(flags, start=1):
            tp += hit
            precision.append(tp / rank)
            recall.append(tp / gt_count)
        area, previous_recall = 0.0, 0.0
        for k in range(len(flags)):
            area += (recall[k] - previous_recall) * max(precision[k:])
            previous_recall = recall[k]
        per_class.append(area)
    return float(np.mean(per_class))


def pycocotools_mask_ap(predictions, ground_truths, num_classes) -> float:
    """COCOeval(segm).stats[0] on the masks with void removed from both sides."""
    mask_util = pytest.importorskip("pycocotools.mask")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def encode(mask):
        return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))

    images, annotations, detections = [], [], []
    for i, (pred, gt) in enumerate(zip(predictions, ground_truths), start=1):
        height, width = gt["masks"].shape[1:]
        crowds = gt.get("crowd_masks", np.zeros((0, height, width), bool))
        void = gt["void"] if gt["void"] is not None else np.zeros((height, width), bool)
        keep = ~(void & ~crowds.any(axis=0))  # crowd pixels are annotated: as crowds, COCO's iscrowd = 1
        images.append({"id": i, "height": height, "width": width})
        gts = [(m, l, 0) for m, l in zip(gt["masks"], gt["labels"])]
        for mask, label, crowd in gts + [(m, l, 1) for m, l in zip(crowds, gt.get("crowd_labels", []))]:
            rle = encode(mask & keep)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": int(label), "segmentation": rle,
                "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": crowd,
            })
        for mask, label, score in zip(pred["masks"], pred["labels"], pred["scores"]):
            detections.append({
                "image_id": i, "category_id": int(label), "segmentation": encode(mask & keep), "score": float(score),
            })
    categories = [{"id": c, "name": str(c)} for c in range(1, num_classes + 1)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return float(coco_eval.stats[0])


# ---------------------------------------------------------------------------- hand-computed AP^r

SIZE = (16, 16)
A = box(SIZE, 0, 0, 4, 4)  # 16 pixels
B = box(SIZE, 8, 8, 12, 12)  # 16 pixels
C = box(SIZE, 0, 8, 4, 12)  # 16 pixels


@pytest.mark.parametrize("protocol", ["original", "voc"])
def test_perfect_predictions_score_one_on_every_metric(protocol):
    predictions = [prediction([A, B], [1, 2], [0.9, 0.8]), prediction([C], [2], [0.5])]
    ground_truths = [truth([A, B], [1, 2]), truth([C], [2])]
    result = evaluate(predictions, ground_truths, num_classes=2, protocol=protocol)
    assert result["ap_r"] == {key: 1.0 for key in KEYS}
    assert result["ap_r_vol"] == 1.0
    assert result["matching_iou"] == 1.0
    assert result["pq"] == 1.0
    assert result["coco_mask_ap"] == pytest.approx(1.0, abs=1e-12)


def test_a_duplicate_is_correct_in_original_and_a_false_positive_in_voc():
    # three instances of class 1, two predictions both on A: original 2/3 ((1 + 1) / 3), voc 1/3 (1/1).
    predictions = [prediction([A, A], [1, 1], [0.9, 0.8])]
    ground_truths = [truth([A, B, C], [1, 1, 1])]
    original = evaluate(predictions, ground_truths, num_classes=1, protocol="original")
    voc = evaluate(predictions, ground_truths, num_classes=1, protocol="voc")
    assert original["ap_r"] == {key: pytest.approx(2 / 3) for key in KEYS}
    assert voc["ap_r"] == {key: pytest.approx(1 / 3) for key in KEYS}


def test_original_ap_exceeds_one_when_duplicates_hit_one_instance_as_the_released_code_does():
    predictions = [prediction([A, A], [1, 1], [0.9, 0.8])]
    ground_truths = [truth([A], [1])]
    assert evaluate(predictions, ground_truths, num_classes=1)["ap_r"]["0.5"] == pytest.approx(2.0)
    assert evaluate(predictions, ground_truths, num_classes=1, protocol="voc")["ap_r"]["0.5"] == 1.0


def test_an_iou_of_exactly_tau_fails_original_and_passes_voc():
    half = box(SIZE, 0, 0, 4, 2)  # 8 of A's 16 pixels: IoU exactly 0.5
    predictions, ground_truths = [prediction([half], [1], [1.0])], [truth([A], [1])]
    original = evaluate(predictions, ground_truths, num_classes=1, protocol="original")
    voc = evaluate(predictions, ground_truths, num_classes=1, protocol="voc")
    assert (original["ap_r"]["0.4"], original["ap_r"]["0.5"]) == (1.0, 0.0)
    assert (voc["ap_r"]["0.5"], voc["ap_r"]["0.6"]) == (1.0, 0.0)
    # AP^r_vol: the mean over the nine thresholds, of which four (original) and five (voc) pass
    assert original["ap_r_vol"] == pytest.approx(4 / 9) and voc["ap_r_vol"] == pytest.approx(5 / 9)


def test_void_removal_raises_iou_in_original_only():
    void = box(SIZE, 4, 0, 8, 4)  # 16 pixels just below A
    spill = A | void  # IoU 1 with void removed, 0.5 with it kept
    predictions, ground_truths = [prediction([spill], [1], [1.0])], [truth([A], [1], void)]
    original = evaluate(predictions, ground_truths, num_classes=1, protocol="original")
    voc = evaluate(predictions, ground_truths, num_classes=1, protocol="voc")
    assert original["ap_r"]["0.9"] == 1.0
    assert (voc["ap_r"]["0.5"], voc["ap_r"]["0.6"]) == (1.0, 0.0)
    assert original["matching_iou"] == original["pq"] == 1.0


def test_ap_averages_over_classes_with_ground_truth_only():
    # class 1: perfect; class 2: ground truth, no prediction (AP 0); class 3: predictions only (ignored).
    predictions = [prediction([A, C], [1, 3], [0.9, 0.8])]
    ground_truths = [truth([A, B], [1, 2])]
    result = evaluate(predictions, ground_truths, num_classes=3)
    assert result["ap_r"] == {key: 0.5 for key in KEYS}
    assert result["ap_r_vol"] == 0.5


def test_the_ranking_is_by_score_across_images():
    # the false positive outranks the true positive: precision 1/2 at the only hit.
    predictions = [prediction([A], [1], [0.4]), prediction([C], [1], [0.6])]
    ground_truths = [truth([A], [1]), truth([], [])]
    for protocol in ("original", "voc"):
        assert evaluate(predictions, ground_truths, num_classes=1, protocol=protocol)["ap_r"]["0.5"] == 0.5


def test_no_ground_truth_gives_nan():
    result = evaluate([prediction([A], [1], [0.5])], [truth([], [])], num_classes=1)
    assert np.isnan(result["ap_r_vol"]) and np.isnan(result["coco_mask_ap"])
    assert result["matching_iou"] == 0.0 and result["pq"] == 0.0  # one false positive


# ---------------------------------------------------------------------------- AP^r against loops


@pytest.mark.parametrize("seed", range(6))
def test_original_ap_r_matches_a_loop_reimplementation_on_random_predictions(seed):
    predictions, ground_truths = random_dataset(seed)
    result = evaluate(predictions, ground_truths, num_classes=3, protocol="original")
    for key, tau in zip(KEYS, AP_R_THRESHOLDS):
        assert result["ap_r"][key] == pytest.approx(loop_ap_r_original(predictions, ground_truths, 3, tau), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_voc_ap_r_matches_a_loop_reimplementation_on_random_predictions(seed):
    predictions, ground_truths = random_dataset(seed)
    result = evaluate(predictions, ground_truths, num_classes=3, protocol="voc")
    for key, tau in zip(KEYS, AP_R_THRESHOLDS):
        assert result["ap_r"][key] == pytest.approx(loop_ap_r_voc(predictions, ground_truths, 3, tau), abs=1e-12)


# ---------------------------------------------------------------------------- COCO mask AP


@pytest.mark.parametrize("seed", range(6))
def test_coco_mask_ap_equals_pycocotools_on_random_predictions(seed):
    predictions, ground_truths = random_dataset(seed)
    expected = pycocotools_mask_ap(predictions, ground_truths, 3)
    assert evaluate(predictions, ground_truths, num_classes=3)["coco_mask_ap"] == pytest.approx(expected, abs=1e-12)


def test_coco_mask_ap_ignores_a_detection_a_crowd_of_its_class_takes_as_pycocotools():
    # one person, a crowd of people below it (void to the other metrics, as the COCO loader makes it);
    # the best-scored detection is a person inside the crowd, the next the person: COCOeval ignores the
    # first, which counting it as a false positive would halve the AP of
    size = (20, 20)
    person, crowd = box(size, 0, 0, 8, 8), box(size, 10, 0, 20, 20)
    inside, elsewhere = box(size, 12, 2, 18, 8), box(size, 0, 12, 6, 18)
    for first, crowd_label, expected in ((inside, 1, 1.0),  # a person in the crowd of people: ignored
                                         (inside, 2, None),  # in a crowd of another class: a false positive
                                         (elsewhere, 1, None)):  # outside the crowd: a false positive
        ground_truth = truth([person], [1], crowd, size) | {"crowd_masks": crowd[None],
                                                            "crowd_labels": np.array([crowd_label])}
        predictions = [prediction([first, person], [1, 1], [0.9, 0.8], size)]
        result = evaluate(predictions, [ground_truth], num_classes=2)["coco_mask_ap"]
        assert result == pytest.approx(pycocotools_mask_ap(predictions, [ground_truth], 2), abs=1e-12)
        assert result == pytest.approx(expected) if expected is not None else result < 0.9


@pytest.mark.parametrize("seed", range(4))
def test_coco_mask_ap_equals_pycocotools_with_crowds_on_random_predictions(seed):
    predictions, ground_truths = random_dataset(seed, with_void=False)
    rng = np.random.default_rng(100 + seed)
    for gt in ground_truths:  # a crowd region or two per image, void where no instance is, as COCO's loader
        crowds = []
        for _ in range(rng.integers(1, 3)):
            (top, bottom), (left, right) = sorted(rng.integers(0, 24, 2)), sorted(rng.integers(0, 32, 2))
            crowds.append(box((24, 32), top, left, bottom + 1, right + 1))
        gt["crowd_masks"], gt["crowd_labels"] = np.stack(crowds), rng.integers(1, 4, len(crowds))
        gt["void"] = gt["crowd_masks"].any(axis=0) & ~gt["masks"].any(axis=0)
    expected = pycocotools_mask_ap(predictions, ground_truths, 3)
    assert evaluate(predictions, ground_truths, num_classes=3)["coco_mask_ap"] == pytest.approx(expected, abs=1e-12)


def test_coco_mask_ap_keeps_the_hundred_best_detections_per_image_and_class_as_pycocotools():
    predictions, ground_truths = random_dataset(3, n_images=3, num_classes=1, max_gt=5, max_pred=300)
    assert max(len(pred["labels"]) for pred in predictions) > 100
    expected = pycocotools_mask_ap(predictions, ground_truths, 1)
    assert evaluate(predictions, ground_truths, num_classes=1)["coco_mask_ap"] == pytest.approx(expected, abs=1e-12)


def test_coco_mask_ap_gives_an_iou_tie_to_the_later_ground_truth_as_pycocotools():
    # P1 overlaps G1 and G2 with IoU 20/28 each and takes G2 (the later); P2 = G2 is then left with
    # G1 at IoU 1/2: a hit at t = .5 only. 101-point AP: t = .5 -> 1, t = .55..7 -> 51/101 (P2 a false
    # positive after a hit at recall 1/2), t = .75..95 -> 25.5/101 (P1 misses, P2 hits at rank 2).
    g1, g2 = box(SIZE, 0, 0, 4, 6), box(SIZE, 0, 2, 4, 8)
    p1 = box(SIZE, 0, 1, 4, 7)
    predictions, ground_truths = [prediction([p1, g2], [1, 1], [0.9, 0.8])], [truth([g1, g2], [1, 1])]
    result = evaluate(predictions, ground_truths, num_classes=1)["coco_mask_ap"]
    assert result == pytest.approx((101 + 4 * 51 + 5 * 25.5) / 1010, abs=1e-12)
    assert result == pytest.approx(pycocotools_mask_ap(predictions, ground_truths, 1), abs=1e-12)


# ---------------------------------------------------------------------------- Matching IoU and PQ


def test_matching_iou_counts_matched_pixels_over_all_instance_pixels():
    shifted = box(SIZE, 0, 2, 4, 6)  # 8 pixels shared with A, union with A 24
    predictions = [prediction([shifted, B], [1, 1], [0.9, 0.8])]  # B predicted with the wrong class
    ground_truths = [truth([A, B], [1, 2])]
    assert evaluate(predictions, ground_truths, num_classes=2)["matching_iou"] == pytest.approx(8 / 40)


def test_matching_iou_sums_intersections_and_unions_over_the_dataset():
    # image 1: 16 agreeing of 16; image 2: 0 of 32 (class mismatch) -> 16 / 48, not the mean 1/2.
    predictions = [prediction([A], [1], [0.9]), prediction([A], [2], [0.9])]
    ground_truths = [truth([A], [1]), truth([B], [1])]
    assert evaluate(predictions, ground_truths, num_classes=2)["matching_iou"] == pytest.approx(16 / 48)


def test_matching_iou_uses_the_maximum_weight_matching_not_greedy():
    # P1 covers A and half of D (IoU 16/24 = 2/3 with A, 8/32 = 1/4 with D); P2 = A's top three rows
    # (IoU 3/4 with A). Greedy takes P1-A (2/3, 16 pixels); the best matching is P1-D, P2-A
    # (1/4 + 3/4 = 1 > 2/3), agreeing on 8 + 12 pixels of the 32.
    d = box(SIZE, 4, 0, 8, 4)
    p1 = A | box(SIZE, 4, 0, 6, 4)
    p2 = box(SIZE, 0, 0, 3, 4)
    result = evaluate([prediction([p1, p2], [1, 1], [0.9, 0.8])], [truth([A, d], [1, 1])], num_classes=1)
    assert result["matching_iou"] == pytest.approx((8 + 12) / 32)


def test_pq_of_one_segment_covering_three_quarters_of_its_instance_is_three_quarters():
    three_quarters = box(SIZE, 0, 0, 4, 3)
    assert evaluate([prediction([three_quarters], [1], [1.0])], [truth([A], [1])], num_classes=1)["pq"] == 0.75


def test_pq_does_not_match_a_segment_overlapping_exactly_half():
    half = box(SIZE, 0, 0, 4, 2)  # IoU 0.5: one false positive and one false negative
    assert evaluate([prediction([half], [1], [1.0])], [truth([A], [1])], num_classes=1)["pq"] == 0.0


def test_pq_counts_false_positives_by_half_and_ignores_mostly_void_predictions():
    void = box(SIZE, 12, 0, 16, 16)
    under_void = box(SIZE, 11, 0, 16, 2)  # 8 of 10 pixels void: ignored
    stray = box(SIZE, 8, 0, 10, 4)  # a false positive
    predictions = [prediction([A, under_void, stray], [1, 1, 1], [0.9, 0.8, 0.7])]
    assert evaluate(predictions, [truth([A], [1], void)], num_classes=1)["pq"] == pytest.approx(1 / 1.5)


def test_pq_counts_a_prediction_exactly_half_on_void_as_a_false_positive():
    void = box(SIZE, 12, 0, 16, 16)
    half_void = box(SIZE, 10, 0, 14, 1)  # 2 of its 4 pixels void: not more than half
    predictions = [prediction([A, half_void], [1, 1], [0.9, 0.8])]
    assert evaluate(predictions, [truth([A], [1], void)], num_classes=1)["pq"] == pytest.approx(1 / 1.5)


def test_pq_counts_no_false_negative_for_a_ground_truth_instance_wholly_in_void():
    void = box(SIZE, 12, 0, 16, 16)
    hidden = box(SIZE, 13, 2, 15, 6)  # every pixel void: nothing a prediction could match
    assert evaluate([prediction([A], [1], [0.9])], [truth([A, hidden], [1, 1], void)], num_classes=1)["pq"] == 1.0


def test_pq_applies_panopticapis_crowd_rule_given_crowds():
    # a person (class 1) above a crowd of people; the crowd's pixels are void outside instances, as the
    # COCO loader makes them. panopticapi: crowd pixels stay in a prediction's IoU, and an unmatched
    # prediction mostly on a crowd of its own class is no false positive
    size = (20, 20)
    person, crowd = box(size, 0, 0, 9, 9), box(size, 10, 0, 20, 20)
    ground_truth = truth([person], [1], crowd, size) | {"crowd_masks": crowd[None], "crowd_labels": np.array([1])}
    inside = box(size, 12, 2, 18, 8)

    def pq(masks, labels):
        return evaluate([prediction(masks, labels, [0.9] * len(masks), size)], [ground_truth], num_classes=2)["pq"]

    assert pq([person, inside], [1, 1]) == 1.0  # in its own class's crowd: ignored
    assert pq([person, inside], [1, 2]) == 0.5  # in another class's crowd: a false positive of class 2
    reaching = person | box(size, 10, 0, 12, 9)  # 81 pixels of the person and 18 of the crowd
    assert pq([reaching], [1]) == pytest.approx(81 / 99)  # the crowd's pixels count in its union


def test_pq_averages_over_classes_present_in_ground_truth_or_predictions():
    # class 1 perfect (1), class 2 prediction only (0), class 3 absent (skipped).
    predictions = [prediction([A, B], [1, 2], [0.9, 0.8])]
    assert evaluate(predictions, [truth([A], [1])], num_classes=3)["pq"] == 0.5


# ---------------------------------------------------------------------------- validation


def valid():
    return [prediction([A], [1], [0.5])], [truth([A], [1])]


def with_field(entries, key, value):
    entries[0] = {**entries[0], key: value}
    return entries


BAD_INPUTS = {
    "mismatched lengths": (lambda p, g: (p + p, g), "predictions and ground_truths"),
    "predictions not a sequence": (lambda p, g: (p[0], g), "predictions"),
    "missing scores": (lambda p, g: ([{"masks": A[None], "labels": np.array([1])}], g), r"predictions\[0\]"),
    "uint8 masks": (lambda p, g: (with_field(p, "masks", A[None].astype(np.uint8)), g), r"predictions\[0\]\['masks'\]"),
    "2-d masks": (lambda p, g: (p, with_field(g, "masks", A)), r"ground_truths\[0\]\['masks'\]"),
    "float labels": (lambda p, g: (with_field(p, "labels", np.array([1.0])), g), r"predictions\[0\]\['labels'\]"),
    "too many labels": (lambda p, g: (p, with_field(g, "labels", np.array([1, 1]))), r"ground_truths\[0\]\['labels'\]"),
    "label 0": (lambda p, g: (with_field(p, "labels", np.array([0])), g), r"predictions\[0\]\['labels'\]"),
    "label above K": (lambda p, g: (p, with_field(g, "labels", np.array([3]))), r"ground_truths\[0\]\['labels'\]"),
    "NaN score": (lambda p, g: (with_field(p, "scores", np.array([np.nan])), g), r"predictions\[0\]\['scores'\]"),
    "integer scores": (lambda p, g: (with_field(p, "scores", np.array([1])), g), r"predictions\[0\]\['scores'\]"),
    "wrong mask size": (
        lambda p, g: (with_field(p, "masks", np.zeros((1, 8, 16), bool)), g), r"predictions\[0\]\['masks'\]"),
    "wrong void size": (
        lambda p, g: (p, with_field(g, "void", np.zeros((8, 8), bool))), r"ground_truths\[0\]\['void'\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_the_argument(case):
    corrupt, pattern = BAD_INPUTS[case]
    predictions, ground_truths = corrupt(*valid())
    with pytest.raises(ValueError, match=pattern):
        evaluate(predictions, ground_truths, num_classes=2)


def test_unknown_protocol_and_bad_num_classes_raise_value_error():
    with pytest.raises(ValueError, match="protocol"):
        evaluate(*valid(), num_classes=2, protocol="coco")
    with pytest.raises(ValueError, match="num_classes"):
        evaluate(*valid(), num_classes=0)
    # its arrays are sized by it: 10**11 asked numpy for 745 GiB
    with pytest.raises(ValueError, match=r"num_classes must be an int in 1\.\.65535"):
        evaluate(*valid(), num_classes=10**11)


def test_pairs_that_are_not_pairs_are_named_by_index():
    prediction, truth_ = (entries[0] for entries in valid())
    for pairs, message in [([(prediction, truth_, 1)], r"pairs\[0\] must be a \(prediction, ground truth\) pair, got "
                                                        "tuple of 3"),
                           ([(prediction, truth_), prediction], r"pairs\[1\] must be .* got dict"),
                           (None, "pairs must be an iterable")]:
        with pytest.raises(ValueError, match=message):
            evaluate_each(pairs, num_classes=2)


def test_empty_predictions_and_ground_truths_are_accepted():
    predictions = [{"masks": np.zeros((0, 16, 16), bool), "labels": [], "scores": []}]
    result = evaluate(predictions, [truth([A], [1])], num_classes=1)
    assert result["ap_r_vol"] == 0.0 and result["pq"] == 0.0 and result["coco_mask_ap"] == 0.0


def test_undefined_metrics_become_null_in_json():
    empty = {"masks": np.zeros((0, 4, 4), bool), "labels": np.zeros(0, np.int64)}
    metrics = evaluate([{**empty, "scores": np.zeros(0)}], [{**empty, "void": None}], num_classes=2)
    assert math.isnan(metrics["pq"]) and math.isnan(metrics["ap_r"]["0.5"])
    parsed = json.loads(json.dumps(json_ready(metrics), allow_nan=False))
    assert parsed["pq"] is None and parsed["ap_r"]["0.5"] is None and set(parsed) == set(metrics)


def test_written_metrics_are_strict_json_and_a_table_of_percentages(tmp_path):
    metrics = evaluate(*random_dataset(3), num_classes=3)
    metrics["pq"] = math.nan  # undefined, as without ground truth
    as_json, as_table = write_metrics(tmp_path, metrics)
    parsed = json.loads(as_json.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert parsed["pq"] is None and parsed["ap_r_vol"] == metrics["ap_r_vol"]
    rows = dict(line.strip("|").replace(" ", "").split("|") for line in as_table.read_text().splitlines()[2:])
    assert len(rows) == len(AP_R_THRESHOLDS) + 4
    assert rows["AP^rat0.5"] == f"{100 * metrics['ap_r']['0.5']:.1f}" and rows["PQ"] == "nan"


def test_evaluate_each_holds_one_images_masks_at_a_time():
    predictions, ground_truths = random_dataset(7)
    masks = []  # weak references to each image's two mask arrays, in the order they were handed out

    def one_at_a_time():
        for index, (predicted, true) in enumerate(zip(predictions, ground_truths)):
            # evaluate_each may still hold the image before this one (its loop variables), none earlier
            gc.collect()
            held = [i // 2 for i, ref in enumerate(masks[:2 * max(0, index - 1)]) if ref() is not None]
            assert not held, f"evaluate_each still holds the masks of images {sorted(set(held))} at image {index}"
            predicted = {**predicted, "masks": predicted["masks"].copy()}  # arrays only evaluate_each references
            true = {**true, "masks": true["masks"].copy()}
            masks.extend((weakref.ref(predicted["masks"]), weakref.ref(true["masks"])))
            yield predicted, true

    for protocol in ("original", "voc"):
        masks.clear()
        streamed = evaluate_each(one_at_a_time(), num_classes=3, protocol=protocol)
        assert len(masks) == 2 * len(predictions)
        assert json.dumps(json_ready(streamed)) == json.dumps(
            json_ready(evaluate(predictions, ground_truths, num_classes=3, protocol=protocol)))
    with pytest.raises(ValueError, match=r"predictions\[1\]\['scores'\]"):
        bad = [predictions[0], {**predictions[1], "scores": np.full(len(predictions[1]["labels"]), np.nan)}]
        evaluate_each(zip(bad, ground_truths[:2]), num_classes=3)


def test_matching_iou_matches_on_iou_with_void_removed():
    void = np.zeros((16, 16), bool); void[8:, :] = True                   # rows 8..15 are void
    g = np.zeros((16, 16), bool); g[0, 0:10] = True                        # 10 ground-truth pixels
    a = np.zeros((16, 16), bool); a[0, 0:6] = True; a[8:10, 0:10] = True   # 6 of g + 20 void pixels
    b = np.zeros((16, 16), bool); b[0, 6:10] = True; b[1, 0:2] = True      # 4 of g + 2 stray pixels
    # void removed: IoU(a, g) = 6/10 > IoU(b, g) = 4/12, a is matched: 6 agreeing of |(a|b|g) \ void| = 12
    # (void kept, IoU(a, g) = 6/30 would pick b: 4/12)
    pred = {"masks": np.stack([a, b]), "labels": np.array([1, 1]), "scores": np.array([0.9, 0.8])}
    gt = {"masks": g[None], "labels": np.array([1]), "void": void}
    assert evaluate([pred], [gt], num_classes=1)["matching_iou"] == pytest.approx(6 / 12)


def test_pq_gives_an_instance_to_the_overlapping_prediction_of_higher_iou():
    three_quarters = box(SIZE, 0, 0, 4, 3)  # IoU 3/4 with A, listed first so index order cannot decide
    predictions = [prediction([three_quarters, A], [1, 1], [0.9, 0.8])]
    # A is the TP (IoU 1), three_quarters a FP: PQ = 1 / (1 + 0.5); taking the 3/4 pair gives 0.75 / 1.5
    assert evaluate(predictions, [truth([A], [1])], num_classes=1)["pq"] == pytest.approx(1 / 1.5)


def test_coco_mask_ap_crowd_share_leaves_out_void_no_crowd_explains():
    # a detection half on a crowd of its class, half on plain void: with the void removed it lies wholly
    # inside the crowd (share 1 >= every threshold) and is ignored, as COCOeval ignores it
    size = (20, 20)
    person, crowd, void = box(size, 0, 0, 8, 8), box(size, 10, 0, 20, 10), box(size, 10, 10, 20, 20)
    first = box(size, 12, 6, 16, 14)  # 16 pixels on the crowd, 16 on plain void
    ground_truth = truth([person], [1], void | crowd & ~person, size) | {
        "crowd_masks": crowd[None], "crowd_labels": np.array([1])}
    predictions = [prediction([first, person], [1, 1], [0.9, 0.8], size)]
    result = evaluate(predictions, [ground_truth], num_classes=1)["coco_mask_ap"]
    assert result == pytest.approx(pycocotools_mask_ap(predictions, [ground_truth], 1), abs=1e-12)
    assert result == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_coco_mask_ap_equals_pycocotools_with_crowds_and_void_on_random_predictions(seed):
    predictions, ground_truths = random_dataset(seed, with_void=True)
    rng = np.random.default_rng(200 + seed)
    for gt in ground_truths:
        crowds = []
        for _ in range(rng.integers(1, 3)):
            (top, bottom), (left, right) = sorted(rng.integers(0, 24, 2)), sorted(rng.integers(0, 32, 2))
            crowds.append(box((24, 32), top, left, bottom + 1, right + 1))
        gt["crowd_masks"], gt["crowd_labels"] = np.stack(crowds), rng.integers(1, 4, len(crowds))
        # plain void (VOC-like) apart from the crowds, so that "void no crowd explains" is well defined
        plain_void = gt["void"] & ~gt["crowd_masks"].any(axis=0) if gt["void"] is not None else False
        gt["void"] = (gt["crowd_masks"].any(axis=0) & ~gt["masks"].any(axis=0)) | plain_void
    expected = pycocotools_mask_ap(predictions, ground_truths, 3)
    assert evaluate(predictions, ground_truths, num_classes=3)["coco_mask_ap"] == pytest.approx(expected, abs=1e-12)
