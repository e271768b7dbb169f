"""The dynseg::MeanFieldCRF op (docs/ops.md) on the native kernels, numpy in and out: how the
onnxruntime backend executes the CRF nodes of an exported graph.

Owns the op's inference semantics outside torch: one native mean-field call for a CRF without the
detection potential; with it, iteration by iteration, the native pairwise message plus the
higher-order detection term (ALGORITHM.md §4), exactly as the trainer's `semantic_mean_field` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from . import _native
from .errors import InvalidArgumentError

__all__ = ["mean_field_crf"]


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Softmax along `axis` (float32 in, float32 out)."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _box_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(D, H, W) float32: 1 on the pixels of each inclusive integer box."""
    ys = np.arange(height).reshape(1, height, 1)
    xs = np.arange(width).reshape(1, 1, width)
    x1, y1, x2, y2 = (boxes[:, i].reshape(-1, 1, 1) for i in range(4))
    return ((xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)).astype(np.float32)


def _detection_term(q, inside, pixels, prior, labels, scores, detection_x, detection_y):
    """The higher-order potential's logits and Q(Y_d = 1); the trainer's `detection_term` in numpy."""
    q_label = q[labels]  # (D, H, W)
    agree = (q_label * inside).reshape(len(labels), -1).sum(1)
    disagree = pixels - agree
    y = detection_y * scores / pixels
    a0 = (np.float32(1.0) - prior) - y * agree
    a1 = prior - y * disagree
    q_y = softmax(np.stack([a0, a1], axis=1), axis=1)  # (D, 2)
    x = detection_x * scores
    everyone = -(x * q_y[:, 1]).reshape(-1, 1, 1) * inside
    own = (x * (q_y[:, 1] - q_y[:, 0])).reshape(-1, 1, 1) * inside
    one_hot = np.eye(q.shape[0], dtype=np.float32)[labels]  # (D, K+1)
    term = everyone.sum(0)[None] + np.einsum("dk,dhw->khw", one_hot, own)
    return term.astype(np.float32), q_y[:, 1].astype(np.float32)


def mean_field_crf(inputs: Sequence[np.ndarray], attributes: Mapping[str, object]) -> tuple[np.ndarray, np.ndarray]:
    """Runs one dynseg::MeanFieldCRF node. inputs: unary (1, L, H, W), image (1, C, H, W),
    spatial_weight and bilateral_weight (scalar or (L, L)), compatibility ((L, L) or empty: Potts),
    boxes (D, 4), labels (D,), scores (D,), detection_x, detection_y (scalars). Returns the logits
    (1, L, H, W) and the detection scores (D,)."""
    if len(inputs) != 10:
        raise InvalidArgumentError(f"a MeanFieldCRF node has 10 inputs, this one has {len(inputs)}")
    unary, image, spatial, bilateral, compat, boxes, labels, scores, detection_x, detection_y = inputs
    scores = np.asarray(scores, dtype=np.float32)
    if unary.ndim != 4 or unary.shape[0] != 1:
        raise InvalidArgumentError(f"MeanFieldCRF's unary must be (1, L, H, W), got {unary.shape}")
    _, count, height, width = unary.shape
    if count == 1:  # one label: nothing to infer
        return unary.copy(), scores.copy()
    planar = np.ascontiguousarray(image[0], dtype=np.float32)
    weight = lambda w: np.ascontiguousarray(w, dtype=np.float32).reshape(-1) if np.size(w) == 1 else \
        np.ascontiguousarray(w, dtype=np.float32)
    kernels = [
        _native.Kernel(float(attributes["theta_spatial"]), 0.0, weight(spatial)),
        _native.Kernel(float(attributes["theta_bilateral_xy"]), float(attributes["theta_bilateral_rgb"]),
                       weight(bilateral)),
    ]
    compat = np.ascontiguousarray(compat, dtype=np.float32) if np.size(compat) else None
    iterations = int(attributes["iterations"])

    def native(logits: np.ndarray, steps: int) -> np.ndarray:
        problem = _native.Problem(count, height, width, planar, kernels, compat=compat,
                                  normalization=str(attributes.get("normalization", "after")), iterations=steps,
                                  output=_native.OUTPUT_LOGITS, threads=0)
        return problem.forward(np.ascontiguousarray(logits, dtype=np.float32))

    u = np.ascontiguousarray(unary[0], dtype=np.float32)
    if not int(attributes.get("detection_potential", 0)):
        return native(u, iterations)[None], scores.copy()
    boxes = np.asarray(boxes, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    use_detections = len(boxes) > 0
    if use_detections:
        inside = _box_masks(boxes, height, width)
        pixels = inside.reshape(len(boxes), -1).sum(1)
        prior = np.minimum(scores / np.float32(attributes["score_ceiling"]),
                           np.float32(1.0 - float(attributes["epsilon"]))).astype(np.float32)
    recalibrated = scores
    logits = u
    for _ in range(iterations):
        q = softmax(logits, axis=0)
        new_logits = u + (native(logits, 1) - logits)  # U + the pairwise message of Q
        if use_detections:
            term, recalibrated = _detection_term(q, inside, pixels, prior, labels, scores,
                                                 np.float32(detection_x), np.float32(detection_y))
            new_logits = new_logits + term
        logits = new_logits
    return logits[None].astype(np.float32), np.asarray(recalibrated, dtype=np.float32)
