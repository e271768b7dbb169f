"""The exported model's contract, shared by the exporter (dynseg.export) and every runtime backend:
the graph's input and output names, its inputs' layout, and the identity of its custom CRF op
(docs/ops.md)."""

from __future__ import annotations

import numpy as np

INPUTS = ("image", "boxes", "labels", "scores")
OUTPUTS = ("instance_logits", "semantic_probabilities")

DOMAIN = "dynseg"  # the custom op's ONNX domain, and the TensorRT plugin's namespace
OP_TYPE = "MeanFieldCRF"
OP_VERSION = 1

# What an export takes unless told otherwise: the most detections per image (`dynseg export
# --max-detections`), and a TensorRT engine's optimisation profile, (min, opt, max) of D and of (H, W).
DEFAULT_MAX_DETECTIONS = 100
DEFAULT_ENGINE_DETECTIONS = (1, 10, DEFAULT_MAX_DETECTIONS)
DEFAULT_ENGINE_SIZES = ((32, 32), (480, 640), (1024, 1024))
# The most any export takes: the instance CRF's D + 1 labels within the kernel library's 65536
# (DYNSEG_MAX_LABELS).
MAX_DETECTIONS = 65535


def graph_inputs(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                 scores: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's inputs, C-contiguous, from one checked frame: image (H, W, 3) uint8 RGB to
    (1, 3, H, W); boxes (D, 4) float32; labels (D,) int64; scores (D,) float32."""
    return {
        "image": np.ascontiguousarray(image.transpose(2, 0, 1)[None]),
        "boxes": np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.ascontiguousarray(labels, dtype=np.int64).reshape(-1),
        "scores": np.ascontiguousarray(scores, dtype=np.float32).reshape(-1),
    }
