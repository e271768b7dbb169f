"""The exported model's contract, shared by the exporter (dynseg.export) and every runtime backend:
the graph's input and output names, its inputs' layout, the identity of its custom CRF op
(docs/ops.md) and `crf_nodes`, which finds it in a graph, the defaults and limits of an export's
detection count and of a TensorRT engine's profile, and `read_export`, which loads an exported file and
checks it is one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidArgumentError
from .files import check_regular_file

if TYPE_CHECKING:  # onnx loads when a model is read, not with every command that names the graph
    import onnx

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
ENGINE_SUFFIXES = (".engine", ".plan")  # what names a TensorRT engine, not an ONNX export
# The most any export takes: the instance CRF's D + 1 labels within the kernel library's 65536
# (DYNSEG_MAX_LABELS).
MAX_DETECTIONS = 65535


def graph_inputs(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                 scores: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's inputs, C-contiguous, from one checked frame: image (H, W, 3) uint8 RGB to
    (1, 3, H, W); boxes (D, 4) float32; labels (D,) int64; scores (D,) float32. No normalisation here:
    the graph casts the image to float and takes the model's mean and std itself
    (`DynamicallyInstantiatedNetwork.semantic_unary`, traced into the export), so every backend feeds
    raw 0..255 RGB."""
    return {
        "image": np.ascontiguousarray(image.transpose(2, 0, 1)[None]),
        "boxes": np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.ascontiguousarray(labels, dtype=np.int64).reshape(-1),
        "scores": np.ascontiguousarray(scores, dtype=np.float32).reshape(-1),
    }


@dataclass(frozen=True)
class Export:
    """An exported model as `read_export` found it: the graph, and what its metadata says."""

    model: onnx.ModelProto
    class_names: tuple[str, ...]
    max_detections: int
    weights_fingerprint: str | None  # sha256 of the weights; None for an export older than it
    metadata: dict[str, str]


def metadata_of(model: onnx.ModelProto) -> dict[str, str]:
    """The model's metadata entries (export_onnx's record of the network: docs/ops.md) by key."""
    return {entry.key: entry.value for entry in model.metadata_props}


def is_crf_node(node: onnx.NodeProto) -> bool:
    """Whether `node` is a dynseg::MeanFieldCRF."""
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def crf_nodes(graph: onnx.GraphProto, subgraphs: bool = False) -> list[onnx.NodeProto]:
    """The graph's dynseg::MeanFieldCRF nodes, in graph order; with `subgraphs`, also those of its
    nodes' subgraphs (an If's branches, a Loop's body), each after the node that holds it."""
    found = []
    for node in graph.node:
        if is_crf_node(node):
            found.append(node)
        if subgraphs:
            for attribute in node.attribute:
                for subgraph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                    found += crf_nodes(subgraph, subgraphs=True)
    return found


def read_export(path: Path) -> Export:
    """The model `dynseg export` wrote to `path`. Raises InvalidArgumentError, naming the file, for a
    missing, empty or unreadable file, a model that is not a dynseg export of this op version and these
    inputs and outputs, malformed metadata, and weights holding NaN or infinity."""
    model = _load(path)
    with protobuf_memory(path):
        metadata = _check_dynseg(model, path)
    try:
        names = json.loads(metadata["class_names"])
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"class_names must be a non-empty list of names, got {names!r:.80}")
        text = metadata["max_detections"]
        if not (text.isascii() and text.isdigit()):  # int() would also read "1_000" and other scripts' digits
            raise ValueError(f"max_detections must be written in the digits 0-9, got {text!r:.40}")
        max_detections = int(text)
        if not 1 <= max_detections <= MAX_DETECTIONS:
            raise ValueError(f"max_detections must be in 1..{MAX_DETECTIONS}, got {max_detections}")
    except (KeyError, TypeError, ValueError) as error:
        why = f"no {error.args[0]!r} entry" if isinstance(error, KeyError) else str(error)
        raise InvalidArgumentError(f"model file {path} has malformed dynseg metadata ({why}): export it again "
                                   "with `dynseg export`") from None
    planes = model.graph.output[1].type.tensor_type.shape.dim  # semantic_probabilities: (1, K+1, H, W)
    if len(planes) > 1 and planes[1].HasField("dim_value") and planes[1].dim_value != len(names) + 1:
        raise InvalidArgumentError(f"model file {path}'s metadata names {len(names)} classes, but its graph gives "
                                   f"{planes[1].dim_value - 1} (semantic_probabilities has {planes[1].dim_value} "
                                   "planes, background included): export it again with `dynseg export`")
    non_finite = _first_non_finite_weight(model)
    if non_finite is not None:  # every image would fail in the CRF nodes, on what the network computed
        raise InvalidArgumentError(f"model file {path}: its weights hold NaN or infinity (first in {non_finite}): "
                                   "it cannot segment anything; export the model again")
    return Export(model, tuple(names), max_detections, metadata.get("weights_sha256"), metadata)


def _first_non_finite_weight(model: onnx.ModelProto) -> str | None:
    """The name of the graph's first floating-point initializer holding NaN or infinity, if any."""
    from onnx import TensorProto, numpy_helper

    floats = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    return next((tensor.name for tensor in model.graph.initializer if tensor.data_type in floats
                 and not np.isfinite(numpy_helper.to_array(tensor).astype(np.float32)).all()), None)


@contextmanager
def protobuf_memory(path: Path) -> Iterator[None]:
    """protobuf failing to serialise the model read from `path`, as the MemoryError it is: onnx's checker,
    its shape inference and onnxruntime's sessions each take a serialised copy, and protobuf's encoder
    fails only for want of memory, nesting too deep, or a required field missing (ONNX has neither)."""
    from google.protobuf.message import EncodeError

    try:
        yield
    except EncodeError as error:
        raise MemoryError(f"handing on model file {path}: protobuf could not serialise it ({error})") from None


def _load(path: Path) -> onnx.ModelProto:
    import onnx

    if path.is_dir():
        raise InvalidArgumentError(f"model {path} is a directory, not an .onnx file (a training checkpoint runs as it "
                                   "is on the torch backend, and `dynseg export` makes the .onnx of it)")
    check_regular_file(path, "model file")
    if path.stat().st_size == 0:  # onnx parses no bytes as an empty model
        raise InvalidArgumentError(f"model file {path} is empty: export it again with `dynseg export`")
    try:
        return onnx.load(str(path))
    except MemoryError:  # the machine's, not the file's
        raise
    except Exception as error:  # protobuf's DecodeError and friends: the file is not (all of) a model
        if "alloc failed" in str(error):  # protobuf's arena was refused memory: the machine's fault, not the file's
            raise MemoryError(f"reading model file {path}: {error}") from None
        engine = " (named as a TensorRT engine: this takes the exported .onnx)" if path.suffix in ENGINE_SUFFIXES \
            else ""
        raise InvalidArgumentError(f"model file {path} is not a readable ONNX model ({error}){engine}") from None


def _check_dynseg(model: onnx.ModelProto, path: Path) -> dict[str, str]:
    import onnx

    from .crf_node import CRF_OUTPUTS, CrfInputs

    metadata = metadata_of(model)
    if "dynseg_op_version" not in metadata:
        raise InvalidArgumentError(f"model file {path} is not a dynseg export (no dynseg metadata): export one with "
                                   "`dynseg export`")
    # a network with both CRFs switched off exports without a node of the domain, and so without its opset
    has_crf = any(n.domain == DOMAIN for n in model.graph.node)
    opset = {entry.domain: entry.version for entry in model.opset_import}.get(DOMAIN)
    if metadata["dynseg_op_version"] != str(OP_VERSION) or (has_crf and opset != OP_VERSION):
        raise InvalidArgumentError(f"model file {path} records dynseg::MeanFieldCRF version "
                                   f"{metadata['dynseg_op_version']} and imports the dynseg opset version {opset}; "
                                   f"this dynseg runs version {OP_VERSION}: export the model again with it")
    unknown = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN and n.op_type != OP_TYPE})
    if unknown:
        raise InvalidArgumentError(f"model file {path} has dynseg ops this dynseg does not know: {unknown}")
    # onnx.checker knows no schema of the domain: the node's arity is checked here
    for node in crf_nodes(model.graph):
        if len(node.input) != len(CrfInputs._fields) or len(node.output) != len(CRF_OUTPUTS):
            raise InvalidArgumentError(f"model file {path}: MeanFieldCRF node {node.name!r} has {len(node.input)} "
                                       f"inputs and {len(node.output)} outputs, the op {len(CrfInputs._fields)} and "
                                       f"{len(CRF_OUTPUTS)} (docs/ops.md): export it again with `dynseg export`")
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if inputs != list(INPUTS) or outputs != list(OUTPUTS):
        raise InvalidArgumentError(f"model file {path} does not have this dynseg's inputs {list(INPUTS)} and outputs "
                                   f"{list(OUTPUTS)} (got {inputs} and {outputs}): re-export it with this dynseg")
    try:  # a damaged graph would otherwise fail inside a runtime, on the first image
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        first = str(error).strip().splitlines()[0]
        raise InvalidArgumentError(f"model file {path} is not a valid ONNX model ({first}): export it again with "
                                   "`dynseg export`") from None
    return metadata
