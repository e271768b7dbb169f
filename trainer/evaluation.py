"""Instance-segmentation metrics: AP^r, AP^r_vol, Matching IoU, PQ and COCO mask AP (docs/algorithm.md §8).

`evaluate` takes per-image predictions and ground truth as boolean masks and returns every metric as a
fraction; `evaluate_each` does the same over an iterable of (prediction, ground truth) pairs, holding
one image's masks at a time; `write_metrics` writes them as JSON and a markdown table. All metrics share
one overlap computation per image: the masks are flattened and multiplied (float32 while H*W < 2**24,
float64 beyond, so the counts are exact), giving |P ∩ G| for every predicted/ground-truth pair, |P|,
|P ∩ void| and |G \\ void|. Every IoU is a float64 division of those integer counts; an IoU whose union is
empty is 0.

Void. Void pixels (VOC's 255) belong to nothing: they are removed from every ground-truth mask, and,
except in AP^r's "voc" protocol, from every predicted mask before its IoU is computed (so predicting
into void is never penalised). A prediction keeps its place in the ranking even when void removal
empties it; it then overlaps nothing and counts as a false positive. A ground-truth mask wholly in
void keeps no pixel: AP^r and COCO mask AP still count it (a miss no prediction can hit), PQ skips it
(below). The on-disk loaders make none (`assemble_sample` drops them); SyntheticScenes can at small
image sizes (5 of 1424 instances in 400 scenes at 32x32, none of 1419 at its default 96x120), and so
can direct callers.

AP^r at τ (the measure of SDS, Hariharan et al. 2014, computed by one of the two protocols below; neither
is SDS's own matching, which gives a prediction the best ground truth not yet taken: under "voc" a
prediction whose best ground truth is taken is a false positive, which SDS would match to its next
best, a difference only at τ <= 0.5), per class c over the whole dataset, then the mean over the
classes that have at least one ground-truth instance. A class with ground truth but no predictions
has AP 0; predictions of a class with no ground truth anywhere are ignored (that class has no AP).
Predictions are ranked by score, descending; ties keep dataset order (image index, then prediction
index), as a stable sort does. τ ∈ {0.1, 0.2, ..., 0.9}, the float64 values nearest to k/10.

- protocol "original" follows the authors' released evaluation code: void removed from predictions;
  each prediction is scored by its maximum IoU over the same-class ground truth of its image, with no
  one-to-one assignment (two predictions may both be correct on one ground-truth instance); correct
  means IoU > τ (strict); AP is the non-interpolated sum (1 / n_gt) Σ_{k correct} precision@k.
  Because duplicates can all be correct, this AP is not bounded by 1 when two predictions exceed τ on
  the same instance (possible at τ < 0.5 even for non-overlapping segment maps; at τ >= 0.5 it needs
  overlapping predicted masks). It is reported as the released code computes it, not clipped.
- protocol "voc" is VOCdevkit's detection protocol (VOCevaldet) applied to masks: void pixels stay in the
  predicted masks (they count in the union, so on VOC, whose objects are ringed by a void band, a mask
  equal to its object scores below 1 and the high-τ numbers are depressed); in descending score order
  each prediction takes the same-class ground truth of its image with the largest IoU (the first one on
  ties); it is a true positive if that IoU >= τ (VOCdevkit's VOCevaldet compares with ">=", as COCO does)
  and that ground truth is not taken yet, otherwise a false positive (duplicates are false positives). AP
  is the VOC2010+ area under the monotone precision envelope: Σ_k (recall_k - recall_{k-1}) · max_{j>=k}
  precision_j.

AP^r_vol is the mean of AP^r over the nine thresholds.

Matching IoU (the paper's Sec. 4.2). In each image, predicted and ground-truth segments are matched
one-to-one by maximum-weight bipartite matching (scipy's linear_sum_assignment), weight = IoU (void
removed) when the classes agree, else 0; pairs of weight 0 count as unmatched. The prediction is
relabelled with the matched ground-truth ids, unmatched predictions get fresh ids that match nothing,
and the IoU of the two labelled maps over their instance pixels is taken:
    agreeing pixels = Σ_{matched (p, g)} |P ∩ G|,   union = |(∪_p P ∪ ∪_g G) \\ void|.
The dataset value is Σ_images agreeing / Σ_images union (pixel-weighted, not a mean of per-image
ratios). For overlapping predicted masks the sum counts each matched pair's own intersection. Where
several matchings reach the same maximum total IoU (exact ties: rare on real images), the one scipy's
solver returns is taken, and the value can then depend on the predictions' order.

PQ (Kirillov et al. 2019) over things only, per class over the whole dataset, then the mean over the
classes with TP + FP + FN > 0:  PQ_c = Σ_{TP} IoU / (|TP| + ½|FP| + ½|FN|). A predicted and a
ground-truth segment of the same class match when their IoU (void removed from the prediction) is > 0.5;
for non-overlapping masks such matches are unique, and for overlapping ones pairs are taken greedily by
decreasing IoU (ties: lower prediction, then lower ground-truth index) so each segment matches at most
once. Unmatched predictions more than half of whose pixels are void are ignored (not FP), as in the PQ
paper. Given crowd regions (COCO's), PQ follows panopticapi: only the void no crowd explains leaves a
prediction's IoU, and an unmatched prediction more than half of whose pixels are that void or a crowd of
its own class is ignored. Scores play no part. Masks with no pixels are not segments: they are skipped (a
prediction with no pixels at all; a ground truth with none outside void).

COCO mask AP (AP@[.50:.05:.95]), computed here and equal to pycocotools' COCOeval(iouType="segm")
stats[0] on the same masks with void removed from both sides (void treated as not annotated), and with
the ground truth's crowd regions passed as COCO's iscrowd = 1 annotations: a detection that matches no
instance but whose share inside a crowd region of its class reaches the threshold is ignored (neither a
hit nor a miss), and crowds count no ground truth. Crowd pixels are then no void to COCO mask AP (void
there is what no instance or crowd annotates), nor to PQ, which applies panopticapi's rule with them
(above); AP^r and Matching IoU see the truth's void alone, in which the COCO loader puts the crowd pixels
outside instances. A ground-truth instance loses its void pixels for every metric, COCO mask AP included,
even where a crowd covers them (pycocotools would keep those; no loader marks an instance's pixel void). The masks are the loader's: COCO's are each annotation's pixels that no later
annotation covers, so where annotations overlap the value differs from COCO's official one, which
compares whole annotations. The rest of the definition: per image and class the 100 highest-scoring
predictions (stable sort), greedy matching in score order where each prediction takes the unmatched
same-class ground truth of highest IoU >= t (ties: the later ground truth, as COCOeval's loop does),
101-point interpolated precision, area range "all", then the mean over IoU thresholds, recall points and
the classes with ground truth.

Undefined values (no ground truth at all, an empty union) are NaN (`json_ready` makes them null for
JSON). The protocol affects AP^r and AP^r_vol only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.checks import int_in, one_of
from dynseg.sdk.files import write_text_whole
from dynseg.sdk._native import MAX_LABELS

from .matching import matched_pairs

__all__ = ["AP_R_THRESHOLDS", "PROTOCOLS", "evaluate", "evaluate_each", "json_ready", "metrics_table",
           "write_metrics"]

AP_R_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PROTOCOLS = ("original", "voc")
_MAX_CLASSES = MAX_LABELS - 1  # a network's semantic CRF takes K + 1 labels; the arrays here are sized by K

PQ_MATCH_IOU = 0.5  # strict: IoU > 0.5
PQ_MAX_VOID_FRACTION = 0.5  # unmatched predictions with more void than this are ignored

# The same float64 values pycocotools uses (np.linspace, not decimal literals).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
COCO_MAX_DETECTIONS = 100

_EXACT_FLOAT32_COUNT = 2**24  # float32 holds every integer count below this exactly


def evaluate(
    predictions: Sequence[Mapping[str, np.ndarray]],
    ground_truths: Sequence[Mapping[str, np.ndarray | None]],
    *,
    num_classes: int,
    protocol: str = "original",
) -> dict:
    """Evaluate instance segmentations: AP^r at τ = 0.1..0.9, AP^r_vol, Matching IoU, PQ and COCO mask AP.

    Args:
        predictions: one mapping per image with
            "masks": bool (N, H, W), one mask per predicted instance (may be empty, N = 0);
            "labels": integer (N,), classes in 1..num_classes;
            "scores": floating (N,), ranking scores, higher first, no NaN.
        ground_truths: one mapping per image, same length and order, with
            "masks": bool (M, H, W), the same H, W as the image's predictions;
            "labels": integer (M,), classes in 1..num_classes;
            "void": bool (H, W) or None, the pixels that are not evaluated (VOC's 255);
            optionally "crowd_masks": bool (C, H, W) and "crowd_labels": integer (C,), crowd regions
            (COCO's iscrowd = 1) for COCO mask AP's crowd rule (module docstring).
        num_classes: K, the number of object classes (background excluded).
        protocol: AP^r protocol, "original" (the released evaluation code) or "voc" (one-to-one
            greedy matching, IoU >= τ, interpolated AP). See the module docstring for both.

    Returns:
        {"ap_r": {"0.1": float, ..., "0.9": float}, "ap_r_vol": float, "matching_iou": float,
         "pq": float, "coco_mask_ap": float}: fractions, NaN where undefined (AP^r and COCO mask AP
        without ground truth; Matching IoU and PQ with neither ground truth nor predictions). Under
        the "original" protocol AP^r can exceed 1 when duplicates hit one instance (module docstring).

    Raises:
        InvalidArgumentError (a ValueError): mismatched lengths, wrong dtypes or shapes, labels outside
            1..num_classes, NaN scores, masks of another size than the image's ground truth, unknown
            protocol; the message names the offending argument, e.g. "predictions[3]['scores']".
    """
    for name, value in (("predictions", predictions), ("ground_truths", ground_truths)):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise InvalidArgumentError(f"{name} must be a sequence with one mapping per image, "
                                       f"got {type(value).__name__}")
    if len(predictions) != len(ground_truths):
        raise InvalidArgumentError(
            f"predictions and ground_truths must have one entry per image each, "
            f"got {len(predictions)} predictions and {len(ground_truths)} ground_truths"
        )
    return evaluate_each(zip(predictions, ground_truths), num_classes=num_classes, protocol=protocol)


def evaluate_each(
    pairs: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray | None]]],
    *,
    num_classes: int,
    protocol: str = "original",
) -> dict:
    """`evaluate` over (prediction, ground truth) pairs that may come one image at a time (a generator):
    each image's masks are reduced to its overlap counts as it arrives, so memory holds one image's
    masks, not a split's (a Cityscapes val split's would be tens of GiB). Same arguments, same result."""
    protocol = one_of("protocol", protocol, PROTOCOLS)
    num_classes = int_in("num_classes", num_classes, 1, _MAX_CLASSES)
    if not isinstance(pairs, Iterable):
        raise InvalidArgumentError(f"pairs must be an iterable of (prediction, ground truth), got {type(pairs).__name__}")
    images = [_image(i, *_pair(i, pair), num_classes) for i, pair in enumerate(pairs)]
    ap_r = _ap_r(images, num_classes, protocol)
    return {
        "ap_r": {f"{tau:.1f}": ap_r[tau] for tau in AP_R_THRESHOLDS},
        "ap_r_vol": float(np.mean([ap_r[tau] for tau in AP_R_THRESHOLDS])),
        "matching_iou": _matching_iou(images),
        "pq": _panoptic_quality(images, num_classes),
        "coco_mask_ap": _coco_mask_ap(images, num_classes),
    }


def json_ready(metrics: dict) -> dict:
    """`evaluate`'s metrics with each undefined (NaN) value as None, which json.dumps writes as null:
    a bare NaN is no JSON, and strict parsers (jq, browsers) refuse it."""
    return {k: json_ready(v) if isinstance(v, dict) else None if isinstance(v, float) and math.isnan(v) else v
            for k, v in metrics.items()}


def metrics_table(metrics: dict) -> str:
    """`evaluate`'s metrics as a Markdown table, values in % (nan where undefined)."""
    rows = [(f"AP^r at {tau}", value) for tau, value in metrics["ap_r"].items()]
    rows += [("AP^r_vol", metrics["ap_r_vol"]), ("Matching IoU", metrics["matching_iou"]), ("PQ", metrics["pq"]),
             ("COCO mask AP", metrics["coco_mask_ap"])]
    return "| metric | value |\n| --- | ---: |\n" + "\n".join(f"| {name} | {100 * v:.1f} |" for name, v in rows)


def write_metrics(folder: str | Path, metrics: dict, description: str | None = None) -> tuple[Path, Path]:
    """Write `evaluate`'s metrics into folder as metrics.json (NaN as null) and metrics.md (the table,
    after `description`, a line saying what was scored, when given)."""
    folder = Path(folder)
    as_json, as_table = folder / "metrics.json", folder / "metrics.md"
    write_text_whole(as_json, json.dumps(json_ready(metrics), indent=2, allow_nan=False))
    write_text_whole(as_table, (f"{description}\n\n" if description else "") + metrics_table(metrics) + "\n")
    return as_json, as_table


# ---------------------------------------------------------------------------- per-image overlaps


@dataclass(frozen=True)
class _Image:
    """The counts every metric needs for one image. G is always the ground truth with void removed."""

    pred_labels: np.ndarray  # int64 (N,)
    pred_scores: np.ndarray  # float64 (N,)
    gt_labels: np.ndarray  # int64 (M,)
    intersection: np.ndarray  # int64 (N, M): |P ∩ G|
    pred_area: np.ndarray  # int64 (N,): |P|, void included
    pred_void: np.ndarray  # int64 (N,): |P ∩ void|
    gt_area: np.ndarray  # int64 (M,): |G|
    instance_union: int  # |(∪P ∪ ∪G) \ void|
    # COCO's crowd regions, for COCO mask AP's crowd rule (the other metrics see void only)
    pred_unannotated: np.ndarray  # int64 (N,): |P ∩ (void \ crowds)|, the void no crowd explains
    crowd_labels: np.ndarray  # int64 (C,)
    crowd_intersection: np.ndarray  # int64 (N, C): |P ∩ crowd|
    pred_own_crowds: np.ndarray  # int64 (N,): |P ∩ the union of the crowds of P's class|

    def same_class(self) -> np.ndarray:
        """bool (N, M): prediction n and ground truth m are of the same class."""
        return self.pred_labels[:, None] == self.gt_labels[None, :]

    def iou(self, *, remove_void: bool) -> np.ndarray:
        """float64 (N, M) IoU; with remove_void the predicted pixels under void are dropped first."""
        return self._iou(self.pred_area - self.pred_void if remove_void else self.pred_area)

    def annotated_area(self) -> np.ndarray:
        """int64 (N,): |P| without the void no crowd explains (COCOeval and panopticapi know crowds as
        annotations, not as void)."""
        return self.pred_area - self.pred_unannotated

    def annotated_iou(self) -> np.ndarray:
        """float64 (N, M) IoU of the predictions' annotated_area with the ground truth."""
        return self._iou(self.annotated_area())

    def _iou(self, pred_area: np.ndarray) -> np.ndarray:
        return _ratio(self.intersection, pred_area[:, None] + self.gt_area[None, :] - self.intersection)


def _precision_envelope(precision: np.ndarray) -> np.ndarray:
    """max_{j>=k} precision_j at each k: the monotone envelope VOC2010+ and COCO integrate."""
    return np.maximum.accumulate(precision[::-1])[::-1]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """float64 numerator / denominator, 0 where the denominator is 0 (an empty union or mask)."""
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape),
                     where=denominator > 0)


def _overlaps(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels, void, crowd_masks, crowd_labels) -> _Image:
    n, height, width = pred_masks.shape
    pixels = height * width
    pred = pred_masks.reshape(n, pixels)  # (N, HW)
    gt = gt_masks.reshape(len(gt_masks), pixels)  # (M, HW)
    crowds = crowd_masks.reshape(len(crowd_masks), pixels)  # (C, HW)
    not_void = np.ones(pixels, dtype=bool) if void is None else ~void.reshape(pixels)
    unannotated = ~not_void & ~crowds.any(axis=0)  # COCO mask AP's void: crowds are annotated, as crowds
    gt = gt & not_void
    dtype = np.float32 if pixels < _EXACT_FLOAT32_COUNT else np.float64
    pred_f = pred.astype(dtype)
    intersection = pred_f @ gt.astype(dtype).T  # (N, M)
    pred_void = pred_f @ (~not_void).astype(dtype)  # (N,)
    covered = pred.any(axis=0) | gt.any(axis=0)  # (HW,)
    return _Image(
        pred_labels=pred_labels.astype(np.int64),
        pred_scores=pred_scores.astype(np.float64),
        gt_labels=gt_labels.astype(np.int64),
        intersection=np.rint(intersection).astype(np.int64),
        pred_area=np.count_nonzero(pred, axis=1).astype(np.int64),
        pred_void=np.rint(pred_void).astype(np.int64),
        gt_area=np.count_nonzero(gt, axis=1).astype(np.int64),
        instance_union=int(np.count_nonzero(covered & not_void)),
        pred_unannotated=np.rint(pred_f @ unannotated.astype(dtype)).astype(np.int64),
        crowd_labels=crowd_labels.astype(np.int64),
        crowd_intersection=np.rint(pred_f @ crowds.astype(dtype).T).astype(np.int64),
        pred_own_crowds=_own_crowds(pred_f, pred_labels, crowds, crowd_labels),
    )


def _own_crowds(pred_f: np.ndarray, pred_labels: np.ndarray, crowds: np.ndarray,
                crowd_labels: np.ndarray) -> np.ndarray:
    """int64 (N,): |P ∩ the union of the crowds of P's class|, one union per class that has crowds."""
    own = np.zeros(len(pred_labels), dtype=np.int64)
    for label in np.unique(crowd_labels):
        of_class = pred_labels == label
        union = crowds[crowd_labels == label].any(axis=0).astype(pred_f.dtype)
        own[of_class] = np.rint(pred_f[of_class] @ union).astype(np.int64)
    return own


# ---------------------------------------------------------------------------- AP^r


def _ap_r(images: list[_Image], num_classes: int, protocol: str) -> dict[float, float]:
    if not images:
        return {tau: math.nan for tau in AP_R_THRESHOLDS}
    thresholds = np.asarray(AP_R_THRESHOLDS)  # (T,)
    label_parts: list[np.ndarray] = []
    score_parts: list[np.ndarray] = []
    correct_parts: list[np.ndarray] = []
    gt_count = np.zeros(num_classes + 1, dtype=np.int64)
    for image in images:
        np.add.at(gt_count, image.gt_labels, 1)
        same_class = image.same_class()  # (N, M)
        if protocol == "original":
            best = np.where(same_class, image.iou(remove_void=True), 0.0).max(axis=1, initial=0.0)  # (N,)
            correct_parts.append(best[None, :] > thresholds[:, None])  # (T, N)
        else:
            correct_parts.append(_voc_true_positives(image, same_class, thresholds))
        label_parts.append(image.pred_labels)
        score_parts.append(image.pred_scores)
    labels, scores = np.concatenate(label_parts), np.concatenate(score_parts)
    correct = np.concatenate(correct_parts, axis=1)  # (T, N_total)
    average_precision = _voc_average_precision if protocol == "voc" else _original_average_precision

    per_class = []  # (T,) for every class with ground truth
    for c in range(1, num_classes + 1):
        if gt_count[c] == 0:
            continue
        in_class = np.flatnonzero(labels == c)
        ranked = in_class[np.argsort(-scores[in_class], kind="stable")]
        per_class.append([average_precision(correct[t, ranked], gt_count[c]) for t in range(len(thresholds))])
    if not per_class:
        return {tau: math.nan for tau in AP_R_THRESHOLDS}
    mean = np.mean(per_class, axis=0)  # (T,)
    return {tau: float(value) for tau, value in zip(AP_R_THRESHOLDS, mean)}


def _voc_true_positives(image: _Image, same_class: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """bool (T, N): VOC greedy one-to-one matching in score order, IoU >= τ, void kept in predictions."""
    iou = np.where(same_class, image.iou(remove_void=False), -1.0)  # (N, M), -1: other class
    correct = np.zeros((len(thresholds), len(image.pred_labels)), dtype=bool)
    taken = np.zeros((len(thresholds), len(image.gt_labels)), dtype=bool)
    if iou.size == 0:
        return correct
    for d in np.argsort(-image.pred_scores, kind="stable"):
        g = int(np.argmax(iou[d]))  # the best same-class ground truth, taken or not
        if iou[d, g] < 0:
            continue  # no ground truth of this class in the image
        hit = (iou[d, g] >= thresholds) & ~taken[:, g]  # (T,)
        correct[:, d] = hit
        taken[:, g] |= hit
    return correct


def _original_average_precision(correct: np.ndarray, gt_count: int) -> float:
    """Σ_{k correct} precision@k / n_gt, non-interpolated, as the released code computes it."""
    true_positives = np.cumsum(correct)
    ranks = np.arange(1, len(correct) + 1)
    return float(np.sum(true_positives[correct] / ranks[correct]) / gt_count)


def _voc_average_precision(correct: np.ndarray, gt_count: int) -> float:
    """Area under the monotone precision envelope (VOC2010+)."""
    if len(correct) == 0:
        return 0.0
    true_positives = np.cumsum(correct)
    recall = true_positives / gt_count
    precision = true_positives / np.arange(1, len(correct) + 1)
    envelope = _precision_envelope(precision)
    recall_step = np.diff(recall, prepend=0.0)
    return float(np.sum(recall_step * envelope))


# ---------------------------------------------------------------------------- Matching IoU


def _matching_iou(images: list[_Image]) -> float:
    # Σ matched |P ∩ G| over Σ |instance pixels of either map| after the loss's bipartite matching.
    agreeing, union = 0, 0
    for image in images:
        union += image.instance_union
        if image.intersection.size == 0:
            continue
        same_class = image.same_class()
        weight = np.where(same_class, image.iou(remove_void=True), 0.0)  # (N, M)
        agreeing += sum(int(image.intersection[p, g]) for p, g in matched_pairs(weight))
    return agreeing / union if union > 0 else math.nan


# ---------------------------------------------------------------------------- PQ


def _panoptic_quality(images: list[_Image], num_classes: int) -> float:
    iou_sum = np.zeros(num_classes + 1)
    tp, fp, fn = (np.zeros(num_classes + 1, dtype=np.int64) for _ in range(3))
    for image in images:
        pred_ok = image.pred_area > 0
        gt_ok = image.gt_area > 0
        iou = image.annotated_iou()  # (N, M), panopticapi's: crowd pixels stay in the prediction
        candidate = image.same_class() & (iou > PQ_MATCH_IOU)
        candidate &= pred_ok[:, None] & gt_ok[None, :]
        pred_matched = np.zeros(len(pred_ok), dtype=bool)
        gt_matched = np.zeros(len(gt_ok), dtype=bool)
        pairs = np.argwhere(candidate)  # (P, 2), row-major: lower prediction, then lower ground truth
        for p, g in pairs[np.argsort(-iou[candidate], kind="stable")]:
            if pred_matched[p] or gt_matched[g]:
                continue
            pred_matched[p] = gt_matched[g] = True
            c = image.pred_labels[p]
            tp[c] += 1
            iou_sum[c] += iou[p, g]
        np.add.at(fn, image.gt_labels[gt_ok & ~gt_matched], 1)
        # an unmatched prediction mostly on void or on a crowd of its class is no false positive
        mostly_void = image.pred_unannotated + image.pred_own_crowds > PQ_MAX_VOID_FRACTION * image.pred_area
        np.add.at(fp, image.pred_labels[pred_ok & ~pred_matched & ~mostly_void], 1)
    present = (tp + fp + fn) > 0
    present[0] = False  # label 0 is background, never a class
    if not present.any():
        return math.nan
    pq = iou_sum[present] / (tp + 0.5 * fp + 0.5 * fn)[present]
    return float(np.mean(pq))


# ---------------------------------------------------------------------------- COCO mask AP


def _coco_mask_ap(images: list[_Image], num_classes: int) -> float:
    """COCOeval's mask AP: each image's detections matched per class and IoU threshold, then each class's
    interpolated precision at 101 recall points, averaged over thresholds, recall points and classes."""
    # per class, per image: the scores (D,) in score order, and per IoU threshold which match and which a crowd takes
    scores: list[list[np.ndarray]] = [[] for _ in range(num_classes + 1)]
    matched: list[list[np.ndarray]] = [[] for _ in range(num_classes + 1)]
    ignored: list[list[np.ndarray]] = [[] for _ in range(num_classes + 1)]
    gt_count = np.zeros(num_classes + 1, dtype=np.int64)
    for image in images:
        iou_all = image.annotated_iou()  # (N, M): void removed from both sides, crowds kept, as COCOeval has them
        # a crowd's IoU with a detection is the share of the detection it covers (COCOeval's iscrowd rule)
        crowd_iou_all = _ratio(image.crowd_intersection, image.annotated_area()[:, None])  # (N, C)
        for c in np.union1d(image.pred_labels, image.gt_labels):
            dts = np.flatnonzero(image.pred_labels == c)
            dts = dts[np.argsort(-image.pred_scores[dts], kind="stable")][:COCO_MAX_DETECTIONS]
            gts = np.flatnonzero(image.gt_labels == c)
            gt_count[c] += len(gts)
            hits, skip = _coco_match(iou_all[np.ix_(dts, gts)],
                                     crowd_iou_all[np.ix_(dts, np.flatnonzero(image.crowd_labels == c))])
            scores[c].append(image.pred_scores[dts])
            matched[c].append(hits)
            ignored[c].append(skip)

    precision = -np.ones((len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_THRESHOLDS), num_classes))  # -1: no ground truth
    for c in range(1, num_classes + 1):
        if gt_count[c] > 0:
            precision[:, :, c - 1] = _coco_class_precision(
                np.concatenate(scores[c]), np.concatenate(matched[c], axis=1), np.concatenate(ignored[c], axis=1),
                int(gt_count[c]))
    defined = precision[precision > -1]
    return float(np.mean(defined)) if defined.size else math.nan


def _coco_match(iou: np.ndarray, crowd_iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's greedy matching of one image's detections of one class, in score order, to its instances
    (iou, (D, G)) and crowds (crowd_iou, (D, C)): per IoU threshold, which detections hit an instance, and
    which a crowd takes instead (neither hit nor miss); both bool (T, D)."""
    hits = np.zeros((len(COCO_IOU_THRESHOLDS), len(iou)), dtype=bool)
    skip = np.zeros_like(hits)
    for t, threshold in enumerate(COCO_IOU_THRESHOLDS):
        threshold = min(threshold, 1 - 1e-10)
        taken = np.zeros(iou.shape[1], dtype=bool)
        for d in range(len(iou)):
            eligible = ~taken & (iou[d] >= threshold)
            if not eligible.any():
                skip[t, d] = bool((crowd_iou[d] >= threshold).any())
                continue
            best = iou[d][eligible].max()
            g = np.flatnonzero(eligible & (iou[d] == best))[-1]  # COCOeval keeps the later on ties
            taken[g] = hits[t, d] = True
    return hits, skip


def _coco_class_precision(scores: np.ndarray, hits: np.ndarray, skip: np.ndarray, gt_count: int) -> np.ndarray:
    """One class's interpolated precision (T, R) at COCO's recall points, from its detections over all images:
    scores (D,), hits and skip (T, D) as _coco_match gives them, and its number of instances."""
    order = np.argsort(-scores, kind="mergesort")
    counted = ~skip[:, order]
    tp_sum = np.cumsum(hits[:, order] & counted, axis=1).astype(float)
    fp_sum = np.cumsum(~hits[:, order] & counted, axis=1).astype(float)
    precision = np.zeros((len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_THRESHOLDS)))
    for t in range(len(COCO_IOU_THRESHOLDS)):
        recall = tp_sum[t] / gt_count
        envelope = _precision_envelope(tp_sum[t] / (fp_sum[t] + tp_sum[t] + np.spacing(1)))
        at = np.searchsorted(recall, COCO_RECALL_THRESHOLDS, side="left")  # (R,)
        reached = at < len(recall)
        precision[t, reached] = envelope[at[reached]]
    return precision


# ---------------------------------------------------------------------------- validation


def _pair(i: int, pair: object) -> tuple[object, object]:
    """evaluate_each's pairs[i] as its (prediction, ground truth)."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise InvalidArgumentError(f"pairs[{i}] must be a (prediction, ground truth) pair, got {type(pair).__name__}"
                                   + (f" of {len(pair)}" if isinstance(pair, (tuple, list)) else ""))
    return pair[0], pair[1]


def _image(i: int, prediction, truth, num_classes: int) -> _Image:
    """Image i's pair, checked (messages name predictions[i] / ground_truths[i]), as its counts."""
    gt_masks = _masks(truth, f"ground_truths[{i}]")
    height, width = gt_masks.shape[1:]
    gt_labels = _labels(truth, f"ground_truths[{i}]", len(gt_masks), num_classes)
    void = _void(truth, f"ground_truths[{i}]", (height, width))
    crowd_masks, crowd_labels = _crowds(truth, f"ground_truths[{i}]", (height, width), num_classes)
    pred_masks = _masks(prediction, f"predictions[{i}]")
    if pred_masks.shape[1:] != (height, width):
        raise InvalidArgumentError(
            f"predictions[{i}]['masks'] has size {pred_masks.shape[1:]} but ground_truths[{i}]['masks'] "
            f"has size {(height, width)}; masks must have the size of their image's ground truth"
        )
    pred_labels = _labels(prediction, f"predictions[{i}]", len(pred_masks), num_classes)
    pred_scores = _scores(prediction, f"predictions[{i}]", len(pred_masks))
    return _overlaps(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels, void, crowd_masks, crowd_labels)


def _field(entry, where: str, key: str) -> np.ndarray:
    if not isinstance(entry, Mapping):
        raise InvalidArgumentError(f"{where} must be a mapping with 'masks', 'labels' (and, for predictions, "
                                   f"'scores'), got {type(entry).__name__}")
    if key not in entry:
        raise InvalidArgumentError(f"{where} has no {key!r}")
    return np.asarray(entry[key])


def _masks(entry, where: str) -> np.ndarray:
    masks = _field(entry, where, "masks")
    if masks.dtype != np.bool_ or masks.ndim != 3:
        raise InvalidArgumentError(f"{where}['masks'] must be bool (N, H, W), got {masks.dtype} {masks.shape}")
    return masks


def _labels(entry, where: str, count: int, num_classes: int, key: str = "labels") -> np.ndarray:
    labels = _field(entry, where, key)
    if labels.shape != (count,):
        raise InvalidArgumentError(f"{where}[{key!r}] must have shape ({count},), one per mask, got {labels.shape}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidArgumentError(f"{where}[{key!r}] must be integer, got {labels.dtype}")
    outside = (labels < 1) | (labels > num_classes)
    if outside.any():
        raise InvalidArgumentError(
            f"{where}[{key!r}] must lie in 1..num_classes={num_classes}, got {labels[outside].tolist()}"
        )
    return labels


def _scores(entry, where: str, count: int) -> np.ndarray:
    scores = _field(entry, where, "scores")
    if scores.shape != (count,):
        raise InvalidArgumentError(f"{where}['scores'] must have shape ({count},), one per mask, got {scores.shape}")
    if count == 0:
        return np.zeros(0, dtype=np.float64)
    if not np.issubdtype(scores.dtype, np.floating):
        raise InvalidArgumentError(f"{where}['scores'] must be floating point, got {scores.dtype}")
    if np.isnan(scores).any():
        raise InvalidArgumentError(f"{where}['scores'] contains NaN at {np.flatnonzero(np.isnan(scores)).tolist()}")
    return scores


def _crowds(entry, where: str, size: tuple[int, int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The optional crowd regions, (C, H, W) bool masks and (C,) labels; none when not given."""
    if entry.get("crowd_masks") is None and entry.get("crowd_labels") is None:
        return np.zeros((0, *size), bool), np.zeros(0, np.int64)
    masks = _field(entry, where, "crowd_masks")
    if masks.dtype != np.bool_ or masks.ndim != 3 or masks.shape[1:] != size:
        raise InvalidArgumentError(f"{where}['crowd_masks'] must be bool (C, {size[0]}, {size[1]}), got "
                                   f"{masks.dtype} {masks.shape}")
    return masks, _labels(entry, where, len(masks), num_classes, key="crowd_labels")


def _void(entry, where: str, size: tuple[int, int]) -> np.ndarray | None:
    if entry.get("void") is None:
        return None
    void = np.asarray(entry["void"])
    if void.dtype != np.bool_ or void.shape != size:
        raise InvalidArgumentError(f"{where}['void'] must be None or bool {size}, got {void.dtype} {void.shape}")
    return void
