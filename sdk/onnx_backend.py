"""The onnxruntime backend: runs an exported dynseg graph with onnxruntime for the standard ONNX and
the native kernel library for each dynseg::MeanFieldCRF node.

onnxruntime cannot run our custom op without a compiled custom-op library (its C headers are not
available to the build), so the graph is partitioned once, at load time, at the custom nodes: the
standard nodes between two CRF nodes become one onnxruntime session each, and a call runs the
sessions and the CRF nodes in the graph's topological order, passing tensors by name. Sessions are
built once; dynamic H, W and D never rebuild them. Safe to call from several threads at once
(onnxruntime's `run` is, and each call keeps its tensors to itself).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, shape_inference

from .crf_node import mean_field_crf
from .errors import InvalidArgumentError

DOMAIN, OP_TYPE, OP_VERSION = "dynseg", "MeanFieldCRF", 1
OUTPUTS = ("instance_logits", "instance_map", "semantic_probabilities", "instance_scores")


@dataclass
class _Session:
    """Standard nodes run by onnxruntime: what they read and what the later steps need from them."""

    session: ort.InferenceSession
    inputs: list[str]
    outputs: list[str]


@dataclass
class _CrfNode:
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, object] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # its inputs that are initializers


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise InvalidArgumentError(f"model file {path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError and friends: the file is not (all of) a model
        raise InvalidArgumentError(f"model file {path} is not a readable ONNX model ({error})") from None


def _check_dynseg(model: onnx.ModelProto, path: Path) -> dict[str, str]:
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    crf_nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    if "dynseg_op_version" not in metadata or not crf_nodes:
        raise InvalidArgumentError(f"model file {path} is not a dynseg export (no dynseg metadata or "
                                   "MeanFieldCRF node): export one with `dynseg export`")
    if metadata["dynseg_op_version"] != str(OP_VERSION):
        raise InvalidArgumentError(f"model file {path} uses dynseg::MeanFieldCRF version "
                                   f"{metadata['dynseg_op_version']}, this dynseg runs version {OP_VERSION}")
    names = [i.name for i in model.graph.input]
    if names != ["image", "boxes", "labels", "scores"] or [o.name for o in model.graph.output] != list(OUTPUTS):
        raise InvalidArgumentError(f"model file {path} does not have dynseg's inputs and outputs (got {names})")
    return metadata


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, the CRF nodes' outputs included (shape inference cannot see
    through a custom op, so they are declared float32 before it runs)."""
    graph = model.graph
    for node in graph.node:
        if node.domain == DOMAIN:
            graph.value_info.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                    for name in node.output)
    inferred = shape_inference.infer_shapes(model)
    types = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        types[info.name] = info.type.tensor_type.elem_type
    return types


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    values = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        values[attribute.name] = value.decode() if isinstance(value, bytes) else value
    return values


def _partition(model: onnx.ModelProto, providers: list[str]) -> list[_Session | _CrfNode]:
    graph = model.graph
    types = _value_types(model)
    initializers = {t.name: t for t in graph.initializer}
    # the graph's nodes in order, cut at the CRF nodes
    segments: list[list[onnx.NodeProto] | onnx.NodeProto] = [[]]
    for node in graph.node:
        if node.domain == DOMAIN:
            segments += [node, []]
        else:
            segments[-1].append(node)
    # what each step must hand on: everything a later step or the graph's outputs read
    needed_after: list[set[str]] = []
    needed = {o.name for o in graph.output}
    for segment in reversed(segments):
        needed_after.append(set(needed))
        nodes = [segment] if isinstance(segment, onnx.NodeProto) else segment
        for node in nodes:
            needed.update(node.input)
    needed_after.reverse()
    steps: list[_Session | _CrfNode] = []
    options = ort.SessionOptions()
    options.log_severity_level = 3  # our partitions are valid; spare users onnxruntime's notes
    for index, segment in enumerate(segments):
        if isinstance(segment, onnx.NodeProto):
            constants = {n: numpy_helper.to_array(initializers[n]) for n in segment.input if n in initializers}
            steps.append(_CrfNode(list(segment.input), list(segment.output), _attributes(segment), constants))
            continue
        if not segment:
            continue
        produced = {name for node in segment for name in node.output}
        consumed = [name for node in segment for name in node.input if name]
        inputs = list(dict.fromkeys(n for n in consumed if n not in produced and n not in initializers))
        outputs = [n for n in dict.fromkeys(name for node in segment for name in node.output)
                   if n in needed_after[index]]
        if not outputs:
            continue
        sub = helper.make_graph(
            segment, f"dynseg_part_{index}",
            [helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None) for n in inputs],
            [helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None) for n in outputs],
            initializer=[initializers[n] for n in dict.fromkeys(consumed) if n in initializers],
        )
        part = helper.make_model(sub, opset_imports=[o for o in model.opset_import if o.domain in ("", "ai.onnx")],
                                 ir_version=model.ir_version)
        session = ort.InferenceSession(part.SerializeToString(), sess_options=options, providers=providers)
        steps.append(_Session(session, inputs, outputs))
    return steps


class OnnxRuntimeBackend:
    """An exported dynseg graph, partitioned and ready to run; see the module docstring."""

    def __init__(self, path: str | Path, *, device: str = "cpu"):
        if device != "cpu":
            raise InvalidArgumentError(
                f"device {device!r}: the onnxruntime backend runs on the CPU in this release (the CUDA "
                "execution provider with device-resident CRF tensors is not built yet)"
            )
        self.path = Path(path)
        model = _load(self.path)
        self.metadata = _check_dynseg(model, self.path)
        self.class_names: tuple[str, ...] = tuple(json.loads(self.metadata["class_names"]))
        self.max_detections = int(self.metadata["max_detections"])
        self._steps = _partition(model, ["CPUExecutionProvider"])

    def run(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, *,
            timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """image (H, W, 3) uint8 RGB; boxes (D, 4) float32 checked; labels (D,) int64; scores (D,)
        float32. Returns the graph's outputs by name, batch axes dropped. timings, if given, gains the
        seconds spent in onnxruntime ("network") and in the CRF nodes ("crf")."""
        values: dict[str, np.ndarray] = {
            "image": np.ascontiguousarray(image.transpose(2, 0, 1)[None]),
            "boxes": np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.ascontiguousarray(labels, dtype=np.int64).reshape(-1),
            "scores": np.ascontiguousarray(scores, dtype=np.float32).reshape(-1),
        }
        for step in self._steps:
            start = time.perf_counter()
            if isinstance(step, _CrfNode):
                outputs = mean_field_crf([step.constants[n] if n in step.constants else values[n] for n in step.inputs],
                                         step.attributes)
            else:
                outputs = step.session.run(step.outputs, {name: values[name] for name in step.inputs})
            values.update(zip(step.outputs, outputs))
            if timings is not None:
                kind = "crf" if isinstance(step, _CrfNode) else "network"
                timings[kind] = timings.get(kind, 0.0) + time.perf_counter() - start
        return {
            "instance_logits": values["instance_logits"][0],
            "instance_map": values["instance_map"],
            "semantic_probabilities": values["semantic_probabilities"][0],
            "instance_scores": values["instance_scores"],
        }
