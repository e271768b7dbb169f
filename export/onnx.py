"""ONNX export of a trained network: the graph docs/ops.md describes, with one dynseg::MeanFieldCRF
node per CRF, dynamic image size and detection count, and the metadata the SDK needs.

Owns `ExportGraph` (the network rearranged for deployment: uint8 image in, normalisation inside, the
CRFs as single nodes, the raw outputs every backend post-processes alike) and `export_onnx`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from dynseg.sdk import __version__
from dynseg.sdk.errors import InvalidArgumentError, LatticeRangeError, needs_trainer

try:  # said with how to install it, as dynseg.trainer says it, not as a bare ModuleNotFoundError
    import torch
    from torch import Tensor, nn
except ImportError as error:
    raise ImportError(needs_trainer("dynseg.export.onnx", error)) from error
from dynseg.sdk.files import named_path, write_whole
from dynseg.sdk.graph import (DEFAULT_MAX_DETECTIONS, DOMAIN, ENGINE_SUFFIXES, INPUTS, MAX_DETECTIONS, OP_VERSION,
                              OUTPUTS)
from dynseg.sdk.checks import int_in
from dynseg.trainer.checkpoint import check_training_data, first_non_finite_weight, weights_fingerprint
from dynseg.trainer.model.network import DynamicallyInstantiatedNetwork, compose

from . import ops



class ExportGraph(nn.Module):
    """The network as deployed: image (1, 3, H, W) uint8 RGB; boxes (D, 4) float32 xyxy pixels,
    integer-valued, inclusive and inside the image (the SDK clips and drops them first); labels (D,)
    int64 in 1..K; scores (D,) float32. Outputs: instance_logits (1, D+1, H, W) and semantic_probabilities
    (1, K+1, H, W); what a result makes of them (the instance map, instance scores) is the SDK's
    `build_result`, the one post-processing of every backend.

    It runs the network's own composition with each CRF as one dynseg::MeanFieldCRF node."""

    def __init__(self, network: DynamicallyInstantiatedNetwork):
        super().__init__()
        self.network = network
        self.semantic_crf = None if network.semantic_crf is None else ops.SemanticCRFNode(network.semantic_crf)
        self.instance_crf = ops.InstanceCRFNode(network.instance_crf)

    def forward(self, image: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        output = compose(self.network, image[0], boxes, labels, scores, semantic_crf=self.semantic_crf,
                         instance_crf=self.instance_crf)
        return output.instance_logits.unsqueeze(0), output.semantic_probabilities.unsqueeze(0)


def export_onnx(network: DynamicallyInstantiatedNetwork, path: str | Path, *,
                max_detections: int = DEFAULT_MAX_DETECTIONS,
                training_data: Mapping[str, Any] | None = None) -> Path:
    """Writes `network` as ONNX to `path` (onnx.checker-valid) and returns the path.

    The network is traced on a 64x80 example with 3 detections, so that D is not specialised; H, W and
    D are dynamic axes. max_detections is recorded for the runtime, which refuses more; training_data
    (the checkpoint's `read_training_data`) for `dynseg eval`, which holds out other data than the
    network was trained on. The file appears whole or not at all: the model is written beside `path`
    and moved over it once complete, so a failed export leaves a file that was there as it was."""
    _check_network(network)
    max_detections = int_in("max_detections", max_detections, 1, MAX_DETECTIONS)  # D + 1 CRF labels
    if training_data is not None:
        check_training_data(training_data)

    def write(partial: Path) -> None:  # the trace writes its file there too
        model = _traced(network, partial)
        _add_metadata(model, network, max_detections, training_data)
        onnx.checker.check_model(model)
        onnx.save(model, str(partial))

    return write_whole(_writable_file(path), write)


def _check_network(network: object) -> None:
    if not isinstance(network, DynamicallyInstantiatedNetwork):
        raise InvalidArgumentError(f"network must be a DynamicallyInstantiatedNetwork, got {type(network).__name__}")
    # the trace's example inputs are CPU tensors; torch's own error would name neither the network nor the fix
    devices = sorted({str(tensor.device) for tensor in network.state_dict().values()} - {"cpu"})
    if devices:
        raise InvalidArgumentError(f"network must be on the CPU to be exported, its weights are on "
                                   f"{', '.join(devices)}: export network.cpu() (or a copy.deepcopy of it)")
    # the graph's inputs, its CRF nodes and the SDK all compute in float32
    kinds = {str(tensor.dtype).removeprefix("torch.") for tensor in network.state_dict().values()
             if tensor.is_floating_point() and tensor.dtype != torch.float32}
    if kinds:
        raise InvalidArgumentError(f"network must hold float32 weights, got {', '.join(sorted(kinds))} ones: export "
                                   "network.float()")
    # the trace runs the network: weights a diverged training left non-finite would fail inside it, unnamed
    non_finite = first_non_finite_weight(network)
    if non_finite is not None:
        raise InvalidArgumentError(f"the network's weights hold NaN or infinity (first in {non_finite}): there is "
                                   "nothing to export; did its training diverge?")


def _writable_file(path: object) -> Path:
    """`path` as a Path to a file that can be written, checked before the minutes of a trace."""
    path = named_path(path, "path")
    if path.suffix in ENGINE_SUFFIXES:  # Segmenter would load the file as a TensorRT engine
        raise InvalidArgumentError(f"path {path} names a TensorRT engine: an ONNX export is a .onnx file")
    if path.is_dir():
        raise InvalidArgumentError(f"path {path} is a folder, not a file to write the model to")
    if not path.parent.is_dir():
        problem = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise InvalidArgumentError(f"path {path}: its folder {path.parent} {problem}")
    if not os.access(path.parent, os.W_OK):
        raise InvalidArgumentError(f"path {path}: its folder {path.parent} is not writable")
    return path


def _traced(network: DynamicallyInstantiatedNetwork, path: Path) -> onnx.ModelProto:
    """The network traced into `path`, read back with its outputs' fixed sizes stated."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 64, 80), dtype=torch.uint8, generator=generator)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 70.0, 50.0], [0.0, 0.0, 15.0, 15.0]])
    labels = torch.ones(3, dtype=torch.int64) * min(2, network.config.num_classes)
    scores = torch.tensor([0.9, 0.6, 0.3])
    was_training = network.training
    try:
        graph = ExportGraph(network).eval()
        with torch.no_grad(), warnings.catch_warnings():
            _ignore_known_trace_warnings()
            torch.onnx.export(
                graph, (image, boxes, labels, scores), str(path), dynamo=False, opset_version=ops.OPSET,
                input_names=list(INPUTS), output_names=list(OUTPUTS),
                dynamic_axes={
                    "image": {2: "height", 3: "width"}, "boxes": {0: "detections"}, "labels": {0: "detections"},
                    "scores": {0: "detections"}, "instance_logits": {1: "detections_plus_1", 2: "height", 3: "width"},
                    "semantic_probabilities": {2: "height", 3: "width"},
                },
                # a network without CRFs has no node of the domain, which torch would warn of on stderr
                custom_opsets={DOMAIN: OP_VERSION} if ops.crf_nodes_of(network) else None,
            )
    except LatticeRangeError as error:
        raise InvalidArgumentError(f"the network's CRF cannot run on the 64x80 example image the export traces it "
                                   f"with ({error}): a model with these thetas fails on images like it") from error
    except InvalidArgumentError as error:  # the example's values broke a check inside the network
        raise InvalidArgumentError(f"the network fails on an example image ({error}): its weights or buffers are "
                                   "not a trained network's (a BatchNorm's negative running_var, say)") from error
    finally:  # a failed export leaves the caller's network as it was
        network.train(was_training)
    model = onnx.load(str(path))
    # the tracer cannot see through the custom op and softmax to the fixed sizes: state them as docs/ops.md does
    fixed = {"instance_logits": {0: 1}, "semantic_probabilities": {0: 1, 1: network.config.num_classes + 1}}
    for output in model.graph.output:
        for axis, size in fixed[output.name].items():
            output.type.tensor_type.shape.dim[axis].dim_value = size
    return model


def _ignore_known_trace_warnings() -> None:
    """Silences the tracer's notes on what this network does on purpose, and only those, so that a new
    one (a size baked into the graph, say) reaches whoever exports; a test holds the list complete."""
    for message in (
        "Converting a tensor to a Python boolean",  # checks of the fixed channel count
        "Iterating over a tensor",  # the three term weights
        "torch.as_tensor results are registered as constants",  # of traced sizes, which stay dynamic
    ):
        warnings.filterwarnings("ignore", message=message, category=torch.jit.TracerWarning)
    # the TorchScript exporter (dynamo=False), chosen for the custom op's symbolic function
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                            category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)


def _add_metadata(model: onnx.ModelProto, network: DynamicallyInstantiatedNetwork, max_detections: int,
                  training_data: Mapping[str, Any] | None) -> None:
    """What the SDK reads of an export (docs/ops.md, metadata_props)."""
    config = network.config
    metadata = {
        "dynseg_version": __version__,
        "dynseg_op_version": str(OP_VERSION),
        "class_names": json.dumps(list(config.class_names)),
        # for the record only: the graph normalises the image itself, and no runtime reads this
        "preprocessing": json.dumps({"input": "RGB uint8 (1, 3, H, W)", "mean": list(config.mean),
                                     "std": list(config.std), "scale": 255.0}),
        "model_config": config.to_json(),
        "max_detections": str(max_detections),
        "weights_sha256": weights_fingerprint(network),
    }
    if training_data is not None:
        metadata["training_data"] = json.dumps(dict(training_data))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
