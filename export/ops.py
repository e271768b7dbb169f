"""The dynseg::MeanFieldCRF node: a torch op that stands for one whole CRF while the network is traced
for export, and its translation into the ONNX node that docs/ops.md specifies.

Owns the op's schema in torch (`torch.ops.dynseg.crf_node`), the symbolic function that
writes it as `dynseg::MeanFieldCRF` (domain "dynseg", version 1), the two modules that stand in for
the network's CRF modules, with their calls, while it is traced (`SemanticCRFNode`, `InstanceCRFNode`:
each node's attributes and constant inputs), and the check that an exported graph's CRF nodes are a
network's (`crf_node_differences`).
The op's computation is the trainer's (`semantic_mean_field`, with the detection potential or
without), so a traced graph carries exactly the values the network computes.
"""

from __future__ import annotations

from dataclasses import astuple

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn
from torch.onnx import symbolic_helper

from dynseg.sdk.crf_node import CrfAttributes, CrfInputs, nothing_to_infer
from dynseg.sdk.graph import DOMAIN, OP_TYPE, crf_nodes
from dynseg.trainer.model.instance import InstanceCRF
from dynseg.trainer.model.network import DynamicallyInstantiatedNetwork
from dynseg.trainer.model.semantic_crf import SemanticCRF, SemanticCRFConfig, semantic_mean_field

OPSET = 17  # the standard ONNX opset of the rest of the graph (GridSample needs 16)


@torch.library.custom_op("dynseg::crf_node", mutates_args=())
def crf_node(
    unary: Tensor,
    image: Tensor,
    spatial_weight: Tensor,
    bilateral_weight: Tensor,
    compatibility: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    detection_x: Tensor,
    detection_y: Tensor,
    iterations: int,
    theta_spatial: float,
    theta_bilateral_xy: float,
    theta_bilateral_rgb: float,
    normalization: str,
    detection_potential: int,
    score_ceiling: float,
    epsilon: float,
) -> tuple[Tensor, Tensor]:
    """One CRF, as the exported node computes it (docs/ops.md): unary (1, L, H, W), image (1, C, H, W);
    compatibility (L, L) or empty for Potts; returns logits (1, L, H, W) and detection scores (D,)."""
    if nothing_to_infer(unary.shape[1], iterations):
        return unary.clone(), scores.clone()
    config = SemanticCRFConfig(
        iterations=iterations, theta_spatial=theta_spatial, theta_bilateral_xy=theta_bilateral_xy,
        theta_bilateral_rgb=theta_bilateral_rgb, detection_potential=bool(detection_potential),
        # without the potential the node's score_ceiling and epsilon are neither read nor checked (docs/ops.md)
        score_ceiling=score_ceiling if detection_potential else 1.0, epsilon=epsilon if detection_potential else 0.0,
    )
    logits, recalibrated = semantic_mean_field(
        unary[0], image[0], boxes, labels, scores, spatial_weight=spatial_weight, bilateral_weight=bilateral_weight,
        compatibility=compatibility if compatibility.numel() else None, detection_x=detection_x,
        detection_y=detection_y, config=config, normalization=normalization,
    )
    return logits.unsqueeze(0), recalibrated.clone()  # a clone: an op's outputs may not alias its inputs


@crf_node.register_fake
def _(unary, image, spatial_weight, bilateral_weight, compatibility, boxes, labels, scores, detection_x,
      detection_y, *attributes):
    return torch.empty_like(unary), torch.empty_like(scores)


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "v", "v", "v", "v", "v", "i", "f", "f", "f", "s", "i", "f", "f")
def _symbolic(g, unary, image, spatial_weight, bilateral_weight, compatibility, boxes, labels, scores, detection_x,
              detection_y, iterations, theta_spatial, theta_bilateral_xy, theta_bilateral_rgb, normalization,
              detection_potential, score_ceiling, epsilon):
    logits, detection_scores = g.op(
        f"{DOMAIN}::{OP_TYPE}", unary, image, spatial_weight, bilateral_weight, compatibility, boxes, labels, scores,
        detection_x, detection_y,
        iterations_i=iterations, theta_spatial_f=theta_spatial, theta_bilateral_xy_f=theta_bilateral_xy,
        theta_bilateral_rgb_f=theta_bilateral_rgb, normalization_s=normalization,
        detection_potential_i=detection_potential, score_ceiling_f=score_ceiling, epsilon_f=epsilon, outputs=2,
    )
    logits.setType(unary.type())
    detection_scores.setType(scores.type())
    return logits, detection_scores


torch.onnx.register_custom_op_symbolic("dynseg::crf_node", _symbolic, OPSET)


class SemanticCRFNode(nn.Module):
    """SemanticCRF's call, (K+1, H, W) unary in, (logits, recalibrated scores) out, as one node."""

    def __init__(self, crf: SemanticCRF):
        super().__init__()
        self.crf = crf

    def constants(self) -> dict[str, Tensor]:
        """The node's inputs that are the module's parameters, by their names in `CrfInputs`."""
        crf = self.crf
        return {"spatial_weight": crf.spatial_weight, "bilateral_weight": crf.bilateral_weight,
                "compatibility": crf.compatibility, "detection_x": crf.detection_x, "detection_y": crf.detection_y}

    def attributes(self) -> CrfAttributes:
        config = self.crf.config
        return CrfAttributes(iterations=config.iterations, theta_spatial=config.theta_spatial,
                             theta_bilateral_xy=config.theta_bilateral_xy,
                             theta_bilateral_rgb=config.theta_bilateral_rgb, normalization="after",
                             detection_potential=int(config.detection_potential),
                             score_ceiling=config.score_ceiling, epsilon=config.epsilon)

    def forward(self, unary: Tensor, image: Tensor, boxes: Tensor, labels: Tensor,
                scores: Tensor) -> tuple[Tensor, Tensor]:
        c = self.constants()
        logits, recalibrated = crf_node(
            unary.unsqueeze(0), image.unsqueeze(0), c["spatial_weight"], c["bilateral_weight"], c["compatibility"],
            boxes, labels, scores, c["detection_x"], c["detection_y"], *astuple(self.attributes()),
        )
        return logits.view_as(unary), recalibrated


class InstanceCRFNode(nn.Module):
    """InstanceCRF's call, (D+1, H, W) unary in, logits out, as one node (Potts, no detection potential;
    with the CRF switched off, the unary itself)."""

    def __init__(self, crf: InstanceCRF):
        super().__init__()
        self.crf = crf

    def constants(self) -> dict[str, Tensor]:
        """The node's constant inputs by their names in `CrfInputs`: the module's two weights, and empty
        compatibility (Potts) and detections, which keep the node's inputs free of the image's."""
        return {"spatial_weight": self.crf.spatial_weight, "bilateral_weight": self.crf.bilateral_weight,
                "compatibility": torch.zeros(0), "boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
                "detection_x": torch.zeros(()), "detection_y": torch.zeros(())}

    def attributes(self) -> CrfAttributes:
        config = self.crf.config
        return CrfAttributes(iterations=config.iterations, theta_spatial=config.theta_spatial,
                             theta_bilateral_xy=config.theta_bilateral_xy,
                             theta_bilateral_rgb=config.theta_bilateral_rgb, normalization="after",
                             detection_potential=0)  # score_ceiling and epsilon: unread without it

    def forward(self, unary: Tensor, image: Tensor) -> Tensor:
        if not self.crf.config.crf:
            return unary
        c = self.constants()
        logits, _ = crf_node(unary.unsqueeze(0), image.unsqueeze(0), *(c[name] for name in CrfInputs._fields[2:]),
                             *astuple(self.attributes()))
        return logits.view_as(unary)


def crf_nodes_of(network: DynamicallyInstantiatedNetwork) -> list[SemanticCRFNode | InstanceCRFNode]:
    """The CRF nodes an export of `network` holds, in the graph's order."""
    nodes: list[SemanticCRFNode | InstanceCRFNode] = []
    if network.semantic_crf is not None:
        nodes.append(SemanticCRFNode(network.semantic_crf))
    if network.instance_crf.config.crf:
        nodes.append(InstanceCRFNode(network.instance_crf))
    return nodes


def crf_node_differences(model: onnx.ModelProto, network: DynamicallyInstantiatedNetwork) -> list[str]:
    """How the CRF nodes of an exported `model` differ from the CRFs of `network`: their count, each
    node's attributes (compared as the float32 values ONNX stores) and its constant inputs (the
    weights, bit for bit). Empty when the graph holds the network's CRFs; a check no image can fool,
    where comparing outputs needs a CRF that changes them (docs/deploy.md, `dynseg validate`)."""
    found = crf_nodes(model.graph)
    expected = crf_nodes_of(network)
    if len(found) != len(expected):
        return [f"the graph has {len(found)} CRF nodes, the checkpoint's network {len(expected)}"]
    constants = _constant_values(model.graph)
    differences = []
    for node, module in zip(found, expected):
        name = f"{'semantic' if isinstance(module, SemanticCRFNode) else 'instance'} CRF node {node.name!r}"
        got, want = CrfAttributes.of_node(node), module.attributes()  # floats as float32 holds them, both
        differences += [f"{name}: attribute {field} is {_shown(getattr(got, field))}, the checkpoint's "
                        f"{_shown(getattr(want, field))}" for field in got.__dataclass_fields__
                        if getattr(got, field) != getattr(want, field)]
        inputs = dict(zip(CrfInputs._fields, node.input))
        for input_name, tensor in module.constants().items():
            value = constants.get(inputs[input_name])
            if value is None:
                differences.append(f"{name}: input {input_name} is computed in the graph, not the checkpoint's "
                                   "constant")
            elif not (value.shape == tuple(tensor.shape) and np.array_equal(value, tensor.detach().cpu().numpy())):
                differences.append(f"{name}: input {input_name} differs from the checkpoint's {input_name}")
    return differences


def _shown(value: object) -> str:
    return f"{value:.7g}" if isinstance(value, float) else repr(value)  # a float32's digits


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every tensor of `graph` that is a constant: its initializers, Constant nodes' outputs and
    Identity nodes of constants (the exporter shares equal initializers through them)."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            if tensor is not None:
                values[node.output[0]] = numpy_helper.to_array(tensor)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values
