"""The dynseg::MeanFieldCRF op (docs/ops.md) on the native kernels, numpy in and out: how the
onnxruntime backend executes the CRF nodes of an exported graph.

Owns the mapping from the node's inputs and attributes to one native mean-field call: the kernels,
the compatibility and, for the semantic CRF, the higher-order detection potential (ALGORITHM.md §4),
which the kernel library adds to every iteration's logits (dynseg_detections in dynseg_crf.h).
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


def mean_field_crf(inputs: Sequence[np.ndarray], attributes: Mapping[str, object]) -> tuple[np.ndarray, np.ndarray]:
    """Runs one dynseg::MeanFieldCRF node. inputs: unary (1, L, H, W), image (1, C, H, W),
    spatial_weight and bilateral_weight (scalar or (L, L)), compatibility ((L, L) or empty: Potts),
    boxes (D, 4), labels (D,), scores (D,), detection_x, detection_y (scalars). Returns the logits
    (1, L, H, W) and the detection scores (D,)."""
    if len(inputs) != 10:
        raise InvalidArgumentError(f"a MeanFieldCRF node has 10 inputs, this one has {len(inputs)}")
    unary, image, spatial, bilateral, compat, boxes, labels, scores, detection_x, detection_y = inputs
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    if unary.ndim != 4 or unary.shape[0] != 1:
        raise InvalidArgumentError(f"MeanFieldCRF's unary must be (1, L, H, W), got {unary.shape}")
    _, count, height, width = unary.shape
    if count == 1:  # one label: nothing to infer (docs/ops.md)
        return unary.copy(), scores.copy()
    weight = lambda w: np.ascontiguousarray(w, dtype=np.float32).reshape(-1) if np.size(w) == 1 else \
        np.ascontiguousarray(w, dtype=np.float32)
    kernels = [
        _native.Kernel(float(attributes["theta_spatial"]), 0.0, weight(spatial)),
        _native.Kernel(float(attributes["theta_bilateral_xy"]), float(attributes["theta_bilateral_rgb"]),
                       weight(bilateral)),
    ]
    recalibrated = scores.copy()
    detections = None
    if int(attributes.get("detection_potential", 0)) and len(scores) > 0:
        detections = _native.Detections(
            boxes=np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.ascontiguousarray(labels, dtype=np.int64),
            scores=scores,
            detection_x=np.ascontiguousarray(detection_x, dtype=np.float32).reshape(1),
            detection_y=np.ascontiguousarray(detection_y, dtype=np.float32).reshape(1),
            score_ceiling=float(attributes["score_ceiling"]),
            epsilon=float(attributes["epsilon"]),
            recalibrated=recalibrated,
        )
    problem = _native.Problem(
        count, height, width, np.ascontiguousarray(image[0], dtype=np.float32), kernels,
        compat=np.ascontiguousarray(compat, dtype=np.float32) if np.size(compat) else None,
        normalization=str(attributes.get("normalization", "after")), iterations=int(attributes["iterations"]),
        output=_native.OUTPUT_LOGITS, threads=0, detections=detections,
    )
    logits = problem.forward(np.ascontiguousarray(unary[0], dtype=np.float32))
    return logits[None], recalibrated
