"""The dynseg::MeanFieldCRF node: a torch op that stands for one whole CRF while the network is traced
for export, and its translation into the ONNX node that docs/ops.md specifies.

Owns the op's schema in torch (`torch.ops.dynseg.crf_node`), the symbolic function that
writes it as `dynseg::MeanFieldCRF` (domain "dynseg", version 1), and the two modules that stand in for
the network's CRF modules, with their calls, while it is traced (`SemanticCRFNode`, `InstanceCRFNode`).
The op's computation is the trainer's (`semantic_mean_field` with the detection potential,
`mean_field_native` without), so a traced graph carries exactly the values the network computes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.onnx import symbolic_helper

from dynseg.sdk.graph import DOMAIN, OP_TYPE
from dynseg.trainer.crf import mean_field_native
from dynseg.trainer.model.instance import InstanceCRF
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
    if unary.shape[1] == 1 or iterations == 0:  # one label, or no iteration: nothing to infer (docs/ops.md)
        return unary.clone(), scores.clone()
    compat = compatibility if compatibility.numel() else None
    if detection_potential:
        config = SemanticCRFConfig(
            iterations=iterations, theta_spatial=theta_spatial, theta_bilateral_xy=theta_bilateral_xy,
            theta_bilateral_rgb=theta_bilateral_rgb, detection_potential=True, score_ceiling=score_ceiling,
            epsilon=epsilon,
        )
        logits, recalibrated = semantic_mean_field(
            unary[0], image[0], boxes, labels, scores, spatial_weight=spatial_weight,
            bilateral_weight=bilateral_weight, compatibility=compat, detection_x=detection_x,
            detection_y=detection_y, config=config, normalization=normalization,
        )
        return logits.unsqueeze(0), recalibrated.clone()
    kernels = [(theta_spatial, 0.0, spatial_weight), (theta_bilateral_xy, theta_bilateral_rgb, bilateral_weight)]
    logits = mean_field_native(unary[0], image[0], kernels, compat=compat, normalization=normalization,
                               iterations=iterations)
    return logits.unsqueeze(0), scores.clone()


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

    def forward(self, unary: Tensor, image: Tensor, boxes: Tensor, labels: Tensor,
                scores: Tensor) -> tuple[Tensor, Tensor]:
        crf, config = self.crf, self.crf.config
        logits, recalibrated = crf_node(
            unary.unsqueeze(0), image.unsqueeze(0), crf.spatial_weight, crf.bilateral_weight, crf.compatibility,
            boxes, labels, scores, crf.detection_x, crf.detection_y, config.iterations, config.theta_spatial,
            config.theta_bilateral_xy, config.theta_bilateral_rgb, "after", int(config.detection_potential),
            config.score_ceiling, config.epsilon,
        )
        return logits.view_as(unary), recalibrated


class InstanceCRFNode(nn.Module):
    """InstanceCRF's call, (D+1, H, W) unary in, logits out, as one node (Potts, no detection potential;
    with the CRF switched off, the unary itself)."""

    def __init__(self, crf: InstanceCRF):
        super().__init__()
        self.crf = crf

    def forward(self, unary: Tensor, image: Tensor) -> Tensor:
        crf, config = self.crf, self.crf.config
        if not config.crf:
            return unary
        nothing = torch.zeros(0)
        # boxes, labels and scores are unused without the detection potential; empty ones keep the node's
        # inputs free of the detections
        logits, _ = crf_node(
            unary.unsqueeze(0), image.unsqueeze(0), crf.spatial_weight, crf.bilateral_weight, nothing,
            torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(()), torch.zeros(()),
            config.iterations, config.theta_spatial, config.theta_bilateral_xy, config.theta_bilateral_rgb,
            "after", 0, 1.0, 0.0,
        )
        return logits.view_as(unary)
