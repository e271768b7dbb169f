"""The dynseg::MeanFieldCRF op (docs/ops.md) on the native kernels: how the onnxruntime backend
executes the CRF nodes of an exported graph, with numpy arrays on the CPU (`run_node`) or
device-resident tensors on a GPU (`run_node_cuda`).

Owns the node's attributes and their rules (`CrfAttributes`, read from a node with `of_node` by the
onnxruntime backend and by the TensorRT exporter's check) and the mapping from the node's inputs and
attributes to one native mean-field call: the kernels, the compatibility and, for the semantic CRF,
the higher-order detection potential (docs/algorithm.md §4), which the kernel library adds to every
iteration's logits (dynseg_detections in dynseg_crf.h).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, cast, overload

import numpy as np
from onnx import NodeProto, helper

from . import _native
from .checks import check_iterations, check_normalization, finite_float32, positive_in_float32
from .errors import InvalidArgumentError

__all__ = ["CRF_OUTPUTS", "CrfAttributes", "CrfInputs", "nothing_to_infer", "run_node", "run_node_cuda",
           "score_ceiling_of"]

Array = np.ndarray | _native.DeviceArray


class CrfInputs(NamedTuple):
    """A MeanFieldCRF node's ten inputs, in the node's order (docs/ops.md): unary (1, L, H, W),
    image (1, C, H, W), spatial_weight and bilateral_weight (scalar or (L, L)), compatibility ((L, L)
    or empty: Potts), boxes (D, 4), labels (D,) int64, scores (D,), detection_x, detection_y
    (scalars); every other input float32."""

    unary: Array
    image: Array
    spatial_weight: Array
    bilateral_weight: Array
    compatibility: Array
    boxes: Array
    labels: Array
    scores: Array
    detection_x: Array
    detection_y: Array

    @classmethod
    def of(cls, inputs: Sequence[Array]) -> CrfInputs:
        if len(inputs) != len(cls._fields):
            raise InvalidArgumentError(f"a MeanFieldCRF node has {len(cls._fields)} inputs, this one has {len(inputs)}")
        return cls(*inputs)

    @staticmethod
    def dtype(name: str) -> type:
        return np.int64 if name == "labels" else np.float32


CRF_OUTPUTS = ("logits", "detection_scores")  # a MeanFieldCRF node's outputs, in order (docs/ops.md)


@overload
def _planes(array: np.ndarray) -> np.ndarray: ...
@overload
def _planes(array: _native.DeviceArray) -> _native.DeviceArray: ...
def _planes(array: Array) -> Array:
    """A (1, C, H, W) tensor without its batch axis, (C, H, W), in the same memory."""
    if isinstance(array, _native.DeviceArray):
        return replace(array, shape=array.shape[1:])
    return array[0]


_ANY_NODE = "MeanFieldCRF"  # how CrfAttributes' own checks name the node; `parse` names the one at hand


@dataclass(frozen=True)
class CrfAttributes:
    """A MeanFieldCRF node's attributes, checked by the rules docs/ops.md gives them, the TensorRT
    plugin's rules: the ONNX type of each, the four required ones, the defaults of the others, and
    their ranges (score_ceiling and epsilon only matter, and are only checked, with the potential; without
    it they hold the defaults).
    The thetas are the paper's θγ (theta_spatial), θα (theta_bilateral_xy) and θβ (theta_bilateral_rgb):
    the C ABI's theta_xy of the spatial and the bilateral kernel, and theta_color of the bilateral one.
    Made directly (export.ops, from a network's config) or by `parse`, they are held to the same ranges,
    their floats as float32 holds them: ONNX's FLOAT attributes and the kernels' parameters are float32, so
    1e-46 is 0 to both, and two sets compare equal when the nodes they make would."""

    iterations: int
    theta_spatial: float
    theta_bilateral_xy: float
    theta_bilateral_rgb: float
    normalization: str = "after"
    detection_potential: int = 0
    score_ceiling: float = 1.0
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        def fail(problem: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"{_ANY_NODE}: attribute {problem}")

        check_iterations(self.iterations, f"{_ANY_NODE}: attribute iterations")
        check_normalization(self.normalization, f"{_ANY_NODE}: attribute normalization")
        for name in ("theta_spatial", "theta_bilateral_xy", "theta_bilateral_rgb"):
            number = finite_float32(getattr(self, name))
            if number is None or not positive_in_float32(number):
                raise fail(f"{name} must be finite and > 0 as a float32, got {getattr(self, name)!r}")
            object.__setattr__(self, name, float(np.float32(number)))
        if self.detection_potential not in (0, 1) or isinstance(self.detection_potential, bool):
            raise fail(f"detection_potential must be 0 or 1, got {self.detection_potential!r}")
        if not self.detection_potential:
            # score_ceiling and epsilon are neither read nor checked: they take the defaults, so that two sets
            # making one computation are equal
            object.__setattr__(self, "score_ceiling", 1.0)
            object.__setattr__(self, "epsilon", 0.0)
            return
        ceiling, epsilon = finite_float32(self.score_ceiling), finite_float32(self.epsilon)
        if ceiling is None or not positive_in_float32(ceiling):
            raise fail(f"score_ceiling must be finite and > 0 as a float32, got {self.score_ceiling!r}")
        if epsilon is None or not 0 <= np.float32(epsilon) < 1:
            raise fail(f"epsilon must be in [0, 1) as a float32, got {self.epsilon!r}")
        object.__setattr__(self, "score_ceiling", float(np.float32(ceiling)))
        object.__setattr__(self, "epsilon", float(np.float32(epsilon)))

    @classmethod
    def of_node(cls, node: NodeProto) -> CrfAttributes:
        """A MeanFieldCRF node's attributes, checked by `parse` (errors name the node)."""
        values = {}
        for attribute in node.attribute:
            value = helper.get_attribute_value(attribute)
            values[attribute.name] = value.decode() if isinstance(value, bytes) else value  # STRING is bytes
        return cls.parse(values, node=f"MeanFieldCRF node {node.name!r}")

    @classmethod
    def parse(cls, attributes: Mapping[str, object], node: str = "MeanFieldCRF") -> CrfAttributes:
        """The attributes of the node named `node` as ONNX gives them (int, float, str); raises
        InvalidArgumentError naming the node and the attribute for a missing, unknown, mistyped or
        out-of-range one."""
        def fail(problem: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"{node}: {problem}")

        kinds = {"iterations": int, "theta_spatial": float, "theta_bilateral_xy": float, "theta_bilateral_rgb": float,
                 "normalization": str, "detection_potential": int, "score_ceiling": float, "epsilon": float}
        # how TensorRT's parser finds the plugin (export.engine's TensorRT copy of a model carries them)
        attributes = {k: v for k, v in attributes.items() if k not in ("plugin_namespace", "plugin_version")}
        for name, value in attributes.items():
            if name not in kinds:
                raise fail(f"unknown attribute {name!r} (a MeanFieldCRF node has {', '.join(kinds)})")
            if type(value) is not kinds[name]:  # exact: ONNX's INT is no FLOAT, and a bool is no INT
                raise fail(f"attribute {name} must be of type {kinds[name].__name__}, got {value!r}")
        missing = [name for name in ("iterations", "theta_spatial", "theta_bilateral_xy", "theta_bilateral_rgb")
                   if name not in attributes]
        if missing:
            raise fail(f"attributes {', '.join(missing)} are missing (iterations and the three thetas are required)")
        try:
            return cls(**attributes)  # type: ignore[arg-type]
        except InvalidArgumentError as error:  # the ranges' message, for the node at hand
            raise fail(str(error).removeprefix(f"{_ANY_NODE}: ")) from None


def score_ceiling_of(nodes: Iterable[CrfAttributes]) -> float:
    """The score ceiling s_max of a model with these CRF nodes: its detection potential's (the semantic
    CRF node's), else 1: the detector scores it takes are confidences in 0..s_max either way."""
    return next((a.score_ceiling for a in nodes if a.detection_potential), 1.0)


def _adds_detection_potential(inputs: CrfInputs, attributes: CrfAttributes) -> bool:
    """Whether the library adds the detection potential (else the scores pass through unchanged)."""
    return bool(attributes.detection_potential) and inputs.boxes.shape[0] > 0


def _problem(inputs: CrfInputs, attributes: CrfAttributes, detection_scores: Array,
             threads: int = 0) -> _native.Problem:
    """The node as one native problem; inputs are all numpy arrays (in the library's dtypes and
    layouts) or all DeviceArrays. `detection_scores` receives Q(Y_d = 1) when the detection potential runs.
    threads: the CPU kernels' thread count (0: every core)."""
    _, num_labels, height, width = inputs.unary.shape
    kernels = [
        _native.Kernel(attributes.theta_spatial, 0.0, inputs.spatial_weight),
        _native.Kernel(attributes.theta_bilateral_xy, attributes.theta_bilateral_rgb, inputs.bilateral_weight),
    ]
    potential = None
    if _adds_detection_potential(inputs, attributes):
        potential = _native.DetectionPotential(
            boxes=inputs.boxes, labels=inputs.labels, scores=inputs.scores, detection_x=inputs.detection_x,
            detection_y=inputs.detection_y, score_ceiling=attributes.score_ceiling, epsilon=attributes.epsilon,
            recalibrated=detection_scores,
        )
    compat = inputs.compatibility
    return _native.Problem(
        num_labels, height, width, _planes(inputs.image), kernels, compat=compat if compat.size else None,
        normalization=attributes.normalization, iterations=attributes.iterations,
        output=_native.Output.LOGITS, threads=threads, detection_potential=potential,
    )


def _check_shapes(inputs: CrfInputs) -> None:
    """The shapes docs/ops.md gives the node's inputs: the library reads as many values as they say."""
    shapes = {name: tuple(int(n) for n in array.shape) for name, array in zip(CrfInputs._fields, inputs)}
    unary, image = shapes["unary"], shapes["image"]
    if len(unary) != 4 or unary[0] != 1:
        raise InvalidArgumentError(f"MeanFieldCRF's unary must be (1, L, H, W), got {unary}")
    if len(image) != 4 or image[0] != 1 or image[2:] != unary[2:]:
        raise InvalidArgumentError(f"MeanFieldCRF's image must be (1, C, {unary[2]}, {unary[3]}), got {image}")
    square = (unary[1], unary[1])
    for name in ("spatial_weight", "bilateral_weight"):
        shape = shapes[name]
        if int(np.prod(shape)) != 1 and shape != square:
            raise InvalidArgumentError(f"MeanFieldCRF's {name} must be a scalar or {square}, got {shape}")
    compatibility = shapes["compatibility"]
    if int(np.prod(compatibility)) != 0 and compatibility != square:
        raise InvalidArgumentError(f"MeanFieldCRF's compatibility must be {square} or empty, got {compatibility}")
    boxes, labels, scores = shapes["boxes"], shapes["labels"], shapes["scores"]
    if len(boxes) != 2 or boxes[1] != 4 or labels != boxes[:1] or scores != boxes[:1]:
        raise InvalidArgumentError(f"MeanFieldCRF's boxes, labels and scores must be (D, 4), (D,), (D,), got "
                                   f"{boxes}, {labels}, {scores}")
    if int(np.prod(shapes["detection_x"])) != 1 or int(np.prod(shapes["detection_y"])) != 1:
        raise InvalidArgumentError(f"MeanFieldCRF's detection_x and detection_y must be scalars, got "
                                   f"{shapes['detection_x']}, {shapes['detection_y']}")


def nothing_to_infer(num_labels: int, iterations: int) -> bool:
    """One label or no iteration: the node's outputs are its unary and scores (docs/ops.md), whatever
    the other inputs hold; the torch op (dynseg.export.ops) and the TensorRT plugin keep the same rule."""
    return num_labels == 1 or iterations == 0


def run_node(inputs: Sequence[np.ndarray], attributes: CrfAttributes,
             threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Runs one dynseg::MeanFieldCRF node on the CPU with `threads` threads (0: every core). inputs: the
    node's ten, as `CrfInputs` lists them (float32, labels int64). Returns the logits (1, L, H, W) and the
    detection scores (D,)."""
    node_inputs = CrfInputs.of(inputs)
    _check_shapes(node_inputs)
    arrays = CrfInputs(*[np.require(a, requirements=["C", "A"]) for a in node_inputs])  # the kernels' layout
    for name, array in zip(CrfInputs._fields, arrays):
        # a cast would truncate a float label or wrap a uint64 one without a word
        if array.dtype != CrfInputs.dtype(name):
            raise InvalidArgumentError(f"MeanFieldCRF's {name} must be {np.dtype(CrfInputs.dtype(name))}, got "
                                       f"{array.dtype}")
    unary, scores = cast(np.ndarray, arrays.unary), cast(np.ndarray, arrays.scores)  # numpy's, as just made
    if nothing_to_infer(unary.shape[1], attributes.iterations):
        return unary.copy(), scores.copy()
    detection_scores = scores.copy()
    # the library refuses logits that finite inputs overflowed on the way, naming the detection scores
    logits = _problem(arrays, attributes, detection_scores, threads).forward(_planes(unary))
    return logits[None], detection_scores


def run_node_cuda(inputs: Sequence[_native.DeviceArray], attributes: CrfAttributes, logits: _native.DeviceArray,
                  detection_scores: _native.DeviceArray, device: int) -> None:
    """Runs one dynseg::MeanFieldCRF node on CUDA device `device`, every array in its memory: the
    inputs as `run_node`'s (float32, labels int64, C-contiguous; the caller checked the dtypes),
    the outputs written into `logits` (1, L, H, W) and `detection_scores` (D,). Runs on this thread's
    stream and returns once the stream has finished (the lattices' check needs that)."""
    node_inputs = CrfInputs.of(inputs)
    _check_shapes(node_inputs)
    unary, scores = cast(_native.DeviceArray, node_inputs.unary), cast(_native.DeviceArray, node_inputs.scores)
    for name, output, like in (("logits", logits, unary), ("detection_scores", detection_scores, scores)):
        if output.shape != like.shape or output.dtype != np.float32:  # the copies below write that many bytes
            raise InvalidArgumentError(f"{name} must be float32 of shape {like.shape}, got {output.dtype} "
                                       f"{output.shape}")
    _native.set_cuda_device(device)
    if nothing_to_infer(unary.shape[1], attributes.iterations):
        _native.copy_on_device(logits.pointer, unary.pointer, 4 * unary.size)
        _native.copy_on_device(detection_scores.pointer, scores.pointer, 4 * scores.size)
        return
    if not _adds_detection_potential(node_inputs, attributes):  # the scores pass through
        _native.copy_on_device(detection_scores.pointer, scores.pointer, 4 * scores.size)
    problem = _problem(node_inputs, attributes, detection_scores)
    nbytes = problem.workspace_size_cuda(_native.Pass.FORWARD)
    workspace = _native.cuda_workspace(nbytes, device)
    problem.forward_cuda(_planes(unary), _planes(logits), workspace.pointer, nbytes,
                         _native.cuda_stream(device).handle)
