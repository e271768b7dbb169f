"""The training losses (Sec. 3.4): the instance loss against the matched ground truth, and the
semantic cross-entropy of stage 1 (also usable as an auxiliary term).

The instance CRF's labels are detections, in the detector's order, so the ground-truth instance ids
mean nothing to it. The ground truth is therefore relabelled to best match the prediction: a maximum-
weight bipartite matching between predicted segments (one per detection, the instance map deployment
outputs: `dynseg.sdk.results.instance_winners`, the argmax with its ties broken by the scores) and
ground-truth instances, weight = IoU when the classes agree and 0 otherwise (scipy's
linear_sum_assignment), void pixels counted in neither segment (as the Matching IoU metric counts
them). Each matched ground-truth instance's pixels then take its detection's label;
background stays 0. Pixels of ground-truth instances matched to nothing have no correct label among
0..D, and are ignored, as are void pixels.

One addition to the paper, so that training can start from an untrained network whose predicted
segments are empty: the detections and ground-truth instances that the segment matching leaves
unmatched are then matched the same way by the IoU of the detection's box with the instance's box.
The segment matching is the paper's, unchanged. Pairs of weight 0 count as unmatched in either pass.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.results import instance_winners

from .boxes import box_iou, mask_boxes
from .data import VOID
from .matching import matched_pairs

IGNORE = -100  # cross_entropy's ignore_index


def matched_ground_truth(
    instance_logits: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    gt_masks: Tensor,
    gt_labels: Tensor,
    void: Tensor | None = None,
) -> Tensor:
    """The target map for the instance logits, (H, W) int64 in 0..D or IGNORE.

    instance_logits: (D+1, H, W); boxes (D, 4), labels (D,) and scores (D,) of the detections; gt_masks (M, H, W)
    bool and disjoint, as datasets' instance masks are (a pixel of two would take either's label),
    gt_labels (M,) in 1..K; void: (H, W) bool or None.
    """
    _check_instance_targets(instance_logits, boxes, labels, scores, gt_masks, gt_labels, void)
    device = instance_logits.device
    # the matching runs on the CPU (scipy's assignment); only the target goes back to the device
    instance_logits, boxes, labels, scores, gt_masks, gt_labels = (
        t.detach().cpu() for t in (instance_logits, boxes, labels, scores, gt_masks, gt_labels))
    void = None if void is None else void.cpu()
    detections = instance_logits.shape[0] - 1
    height, width = instance_logits.shape[1:]
    target = torch.zeros(height, width, dtype=torch.int64)
    matched = torch.zeros(gt_masks.shape[0], dtype=torch.bool)
    if detections and gt_masks.shape[0]:
        winner = torch.from_numpy(instance_winners(instance_logits.float().numpy(), scores.numpy()))
        predicted = winner.unsqueeze(0) == torch.arange(1, detections + 1).view(-1, 1, 1)  # (D, H, W)
        truth = gt_masks
        if void is not None:  # void pixels belong to no segment, as in the Matching IoU metric
            predicted, truth = predicted & ~void, gt_masks & ~void
        inter = predicted.flatten(1).float() @ truth.flatten(1).float().t()  # (D, M)
        union = predicted.flatten(1).sum(1)[:, None] + truth.flatten(1).sum(1)[None, :] - inter
        same_class = labels[:, None] == gt_labels[None, :]
        pairs = matched_pairs(((inter / union.clamp(min=1)) * same_class).numpy())
        left_d = sorted(set(range(detections)) - {d for d, _ in pairs})
        # a ground-truth instance with no pixel outside void (wholly void, or cropped away) has nothing to
        # explain: it must not take a detection by its box from an instance that can be seen
        left_m = [m for m in sorted(set(range(gt_masks.shape[0])) - {m for _, m in pairs}) if truth[m].any()]
        if left_d and left_m:
            gt_boxes = torch.from_numpy(mask_boxes(gt_masks[left_m].numpy()))
            by_box = box_iou(boxes[left_d], gt_boxes) * same_class[left_d][:, left_m]
            pairs += [(left_d[d], left_m[m]) for d, m in matched_pairs(by_box.numpy())]
        for d, m in pairs:
            target[gt_masks[m]] = d + 1
            matched[m] = True
    for unmatched in np.flatnonzero(~matched.numpy()):
        target[gt_masks[int(unmatched)]] = IGNORE  # a ground-truth instance no detection explains
    if void is not None:
        target[void] = IGNORE
    return target.to(device)


def _check_instance_targets(instance_logits: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor, gt_masks: Tensor,
                            gt_labels: Tensor, void: Tensor | None) -> None:
    """InvalidArgumentError naming the argument that is no tensor, or whose shape or dtype does not fit
    the instance logits' D and H, W (torch's own errors would name none)."""
    given = dict(instance_logits=instance_logits, boxes=boxes, labels=labels, scores=scores, gt_masks=gt_masks,
                 gt_labels=gt_labels)
    if void is not None:
        given["void"] = void
    for name, value in given.items():
        if not isinstance(value, Tensor):
            raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if instance_logits.dim() != 3:
        raise InvalidArgumentError(f"instance_logits must be (D+1, H, W), got shape {tuple(instance_logits.shape)}")
    detections, height, width = instance_logits.shape[0] - 1, *instance_logits.shape[1:]
    masks = gt_masks.shape[0] if gt_masks.dim() == 3 else -1
    wanted = dict(boxes=((detections, 4), None), labels=((detections,), None), scores=((detections,), None),
                  gt_masks=((masks, height, width), torch.bool), gt_labels=((masks,), None))
    if void is not None:
        wanted["void"] = ((height, width), torch.bool)
    written = dict(boxes="(D, 4)", labels="(D,)", scores="(D,)", gt_masks="(M, H, W) bool", gt_labels="(M,)",
                   void="(H, W) bool")
    for name, (shape, dtype) in wanted.items():
        value = given[name]
        if tuple(value.shape) != shape or (dtype is not None and value.dtype != dtype):
            raise InvalidArgumentError(f"{name} must be {written[name]} with the instance logits' D = {detections}, "
                                       f"H, W = {height}, {width}, got {value.dtype} of shape {tuple(value.shape)}")


def instance_loss(
    instance_logits: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    gt_masks: Tensor,
    gt_labels: Tensor,
    void: Tensor | None = None,
) -> Tensor:
    """Pixelwise cross-entropy of the instance logits (D+1, H, W) against the matched ground truth,
    averaged over the pixels that are not ignored (0 when all are)."""
    target = matched_ground_truth(instance_logits, boxes, labels, scores, gt_masks, gt_labels, void)
    if (target == IGNORE).all():
        return instance_logits.sum() * 0.0
    return F.cross_entropy(instance_logits.unsqueeze(0), target.unsqueeze(0), ignore_index=IGNORE)


def semantic_loss(logits: Tensor, semantic: Tensor) -> Tensor:
    """Pixelwise cross-entropy of (B, K+1, H, W) logits against (B, H, W) class maps, averaged over the
    pixels that are not void (0 when all are: cross-entropy over no pixels is NaN)."""
    target = semantic.clone()
    target[target == VOID] = IGNORE
    if (target == IGNORE).all():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE)
