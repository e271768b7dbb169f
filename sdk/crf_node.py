"""The dynseg::MeanFieldCRF op (docs/ops.md) on the native kernels: how the onnxruntime backend
executes the CRF nodes of an exported graph, with numpy arrays on the CPU (`mean_field_crf`) or
device-resident tensors on a GPU (`mean_field_crf_cuda`).

Owns the mapping from the node's inputs and attributes to one native mean-field call: the kernels,
the compatibility and, for the semantic CRF, the higher-order detection potential (ALGORITHM.md §4),
which the kernel library adds to every iteration's logits (dynseg_detections in dynseg_crf.h).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from . import _native
from .errors import InvalidArgumentError

__all__ = ["mean_field_crf", "mean_field_crf_cuda"]

Array = np.ndarray | _native.DeviceArray


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Softmax along `axis` (float32 in, float32 out)."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _problem(inputs: Sequence[Array], attributes: Mapping[str, object], recalibrated: Array) -> _native.Problem:
    """The node as one native problem; inputs are all numpy arrays (in the library's dtypes and
    layouts) or all DeviceArrays. `recalibrated` receives Q(Y_d = 1) when the detection potential runs."""
    unary, image, spatial, bilateral, compat, boxes, labels, scores, detection_x, detection_y = inputs
    _, count, height, width = unary.shape
    kernels = [
        _native.Kernel(float(attributes["theta_spatial"]), 0.0, spatial),
        _native.Kernel(float(attributes["theta_bilateral_xy"]), float(attributes["theta_bilateral_rgb"]), bilateral),
    ]
    detections = None
    if int(attributes.get("detection_potential", 0)) and boxes.shape[0] > 0:
        detections = _native.Detections(
            boxes=boxes, labels=labels, scores=scores, detection_x=detection_x, detection_y=detection_y,
            score_ceiling=float(attributes["score_ceiling"]), epsilon=float(attributes["epsilon"]),
            recalibrated=recalibrated,
        )
    return _native.Problem(
        count, height, width, _native.DeviceArray(image.pointer, image.shape[1:])
        if isinstance(image, _native.DeviceArray) else image[0], kernels,
        compat=compat if compat.size else None, normalization=str(attributes.get("normalization", "after")),
        iterations=int(attributes["iterations"]), output=_native.OUTPUT_LOGITS, threads=0, detections=detections,
    )


def _check_arity(inputs: Sequence[object]) -> None:
    if len(inputs) != 10:
        raise InvalidArgumentError(f"a MeanFieldCRF node has 10 inputs, this one has {len(inputs)}")
    if len(inputs[0].shape) != 4 or inputs[0].shape[0] != 1:
        raise InvalidArgumentError(f"MeanFieldCRF's unary must be (1, L, H, W), got {tuple(inputs[0].shape)}")


def mean_field_crf(inputs: Sequence[np.ndarray], attributes: Mapping[str, object]) -> tuple[np.ndarray, np.ndarray]:
    """Runs one dynseg::MeanFieldCRF node on the CPU. inputs: unary (1, L, H, W), image (1, C, H, W),
    spatial_weight and bilateral_weight (scalar or (L, L)), compatibility ((L, L) or empty: Potts),
    boxes (D, 4), labels (D,), scores (D,), detection_x, detection_y (scalars). Returns the logits
    (1, L, H, W) and the detection scores (D,)."""
    _check_arity(inputs)
    floats = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    unary, image, spatial, bilateral, compat, boxes, labels, scores, detection_x, detection_y = inputs
    scores = floats(scores)
    if unary.shape[1] == 1:  # one label: nothing to infer (docs/ops.md)
        return unary.copy(), scores.copy()
    recalibrated = scores.copy()
    arrays = [floats(unary), floats(image), floats(spatial).reshape(-1) if np.size(spatial) == 1 else floats(spatial),
              floats(bilateral).reshape(-1) if np.size(bilateral) == 1 else floats(bilateral), floats(compat),
              floats(boxes).reshape(-1, 4), np.ascontiguousarray(labels, dtype=np.int64), scores,
              floats(detection_x).reshape(1), floats(detection_y).reshape(1)]
    logits = _problem(arrays, attributes, recalibrated).forward(arrays[0][0])
    return logits[None], recalibrated


def mean_field_crf_cuda(inputs: Sequence[_native.DeviceArray], attributes: Mapping[str, object],
                        logits: _native.DeviceArray, detection_scores: _native.DeviceArray, device: int) -> None:
    """Runs one dynseg::MeanFieldCRF node on CUDA device `device`, every array in its memory: the
    inputs as `mean_field_crf`'s (float32, labels int64, C-contiguous; the caller checked the dtypes),
    the outputs written into `logits` (1, L, H, W) and `detection_scores` (D,). Runs on this thread's
    stream and returns once the stream has finished (the lattices' check needs that)."""
    _check_arity(inputs)
    unary, scores = inputs[0], inputs[7]
    _native.set_cuda_device(device)
    if unary.shape[1] == 1:  # one label: nothing to infer (docs/ops.md)
        _native.copy_on_device(logits.pointer, unary.pointer, 4 * unary.size)
        _native.copy_on_device(detection_scores.pointer, scores.pointer, 4 * scores.size)
        return
    problem = _problem(inputs, attributes, detection_scores)
    if not problem.struct.detections:  # no detections: the scores pass through
        _native.copy_on_device(detection_scores.pointer, scores.pointer, 4 * scores.size)
    nbytes = problem.workspace_size_cuda(_native.PASS_FORWARD)
    workspace = _native.cuda_workspace(nbytes, device)
    unary_planes = _native.DeviceArray(unary.pointer, unary.shape[1:])
    out_planes = _native.DeviceArray(logits.pointer, logits.shape[1:])
    problem.forward_cuda(unary_planes, out_planes, workspace.pointer, nbytes, _native.cuda_stream(device).handle)
