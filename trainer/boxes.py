"""Boxes as the whole trainer takes them: (·, 4) float32 xyxy in pixels, integer-valued and inclusive
(x2 is the last column a box covers), inside the image. Owns the conversions between boxes and masks
and their overlap; the network's box term, the torch reference of the detection potential, the
datasets and the matched ground truth of the loss go through these (the shape term's paste,
`model.instance._paste`, applies the same inclusive rule per axis; the global term takes no box; the
kernels' detection potential applies it as `box_span` in plugins/src/detections.h, and the SDK floors
and clips its callers' boxes to it with `dynseg.sdk.inputs.pixel_boxes`). (The detection simulator, whose
jittered boxes are not integer-valued, scores its candidates with a float64 twin of `box_iou`:
`data.detections._iou`; training floors and clips them with `data.sources.inside_image` before the
network sees them.)"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["box_iou", "box_masks", "mask_boxes"]


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """(D, H, W) bool: the pixels of each box; boxes (D, 4) xyxy, integer-valued, inclusive, in the image."""
    ys = torch.arange(height, device=boxes.device).view(1, height, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, width)
    x1, y1, x2, y2 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """float32 (M, 4) xyxy inclusive pixel coordinates of each bool (H, W) mask in masks; ValueError for
    an empty mask, which has no box."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for m, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            raise ValueError(f"masks[{m}] is empty: it has no box")
        boxes[m] = (cols[0], rows[0], cols[-1], rows[-1])
    return boxes


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(P, Q) IoU of inclusive integer xyxy boxes a (P, 4) and b (Q, 4)."""
    x1 = torch.maximum(a[:, None, 0], b[None, :, 0])
    y1 = torch.maximum(a[:, None, 1], b[None, :, 1])
    x2 = torch.minimum(a[:, None, 2], b[None, :, 2])
    y2 = torch.minimum(a[:, None, 3], b[None, :, 3])
    inter = (x2 - x1 + 1).clamp(min=0) * (y2 - y1 + 1).clamp(min=0)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)
