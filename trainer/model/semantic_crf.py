"""The semantic CRF: CRF-as-RNN over the K+1 classes, plus the higher-order detection potential.

Owns the semantic subnetwork's CRF (docs/algorithm.md §3-4): per-class kernel weight matrices W_s, W_b
(initialised diagonal) and a learned compatibility mu (initialised -I), and the detection potential
of Arnab et al. (ECCV 2016) with F_d = the pixels of detection d's box, which also yields the
recalibrated detection scores Q(Y_d = 1).

Each iteration is  L^t = U + pairwise(Q^{t-1}) + detection(B^{t-1}),  Q^t = softmax(L^t), where B^t is
the belief Q(Y_d) in each detection: B^0 its prior, B^t the Y update from Q^{t-1} (the order of the
authors' released code: the pixel update reads the belief the previous iteration left). This
loop is what the exported dynseg::MeanFieldCRF node means (docs/ops.md).

Training and deployment run the whole loop, detection term included, as one call of the kernel library
(`mean_field_native_with_detections`; `dynseg_detections` in its C ABI), which builds each lattice once
and differentiates the loop itself, w_x and w_y included. `semantic_mean_field_reference` writes the
loop out readably, the detection term in torch and the pairwise message one native iteration at a
time; tests/plugins/test_detection_potential.py holds the two together, values and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynseg.sdk.checks import INT32_MAX

from .. import fields
from ..boxes import box_masks
from ..crf import DetectionPotential, crf_kernels, mean_field_native, mean_field_native_with_detections


@dataclass(frozen=True)
class SemanticCRFConfig:
    """CRF-as-RNN's defaults (docs/algorithm.md §3) and the detection potential's weights."""

    iterations: int = 5
    theta_spatial: float = 3.0
    theta_bilateral_xy: float = 160.0
    theta_bilateral_rgb: float = 3.0
    weight_spatial: float = 3.0
    weight_bilateral: float = 5.0
    detection_potential: bool = True
    detection_x: float = 1.0  # w_x: how strongly a detection pulls its box's pixels, x_d = w_x·s_d
    detection_y: float = 1.0  # w_y: how strongly the pixels vote on the detection, y_d = w_y·s_d/n_d
    score_ceiling: float = 1.0  # s_max: p_d = min(s_d / s_max, 1 - epsilon)
    epsilon: float = 1e-4

    def __post_init__(self) -> None:
        fields.ints(self, "iterations", least=0, most=INT32_MAX)  # the CRF node's and the kernels' range
        fields.numbers(self, "theta_spatial", "theta_bilateral_xy", "theta_bilateral_rgb", "score_ceiling", low=0,
                       low_open=True, float32=True)
        fields.numbers(self, "weight_spatial", "weight_bilateral", "detection_x", "detection_y", float32=True)
        fields.numbers(self, "epsilon", low=0, high=1, high_open=True, float32=True)
        fields.flags(self, "detection_potential")


class SemanticCRF(nn.Module):
    """CRF-as-RNN with learned per-class weights and compatibility, and the detection potential."""

    def __init__(self, *, num_classes: int, config: SemanticCRFConfig = SemanticCRFConfig()):
        super().__init__()
        labels = num_classes + 1
        self.config = config
        self.spatial_weight = nn.Parameter(torch.eye(labels) * config.weight_spatial)  # W_s (K+1, K+1)
        self.bilateral_weight = nn.Parameter(torch.eye(labels) * config.weight_bilateral)  # W_b
        self.compatibility = nn.Parameter(-torch.eye(labels))  # mu, so L = U + m at initialisation
        self.detection_x = nn.Parameter(torch.tensor(config.detection_x))
        self.detection_y = nn.Parameter(torch.tensor(config.detection_y))

    def forward(
        self, unary: Tensor, image: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Mean-field inference for one image.

        Args:
            unary: (K+1, H, W) float32 logits (already upsampled to the image).
            image: (3, H, W) float32 RGB in 0..255, for the bilateral kernel.
            boxes: (D, 4) float32 xyxy, integer-valued, inclusive, inside the image.
            labels: (D,) int64 in 1..K. scores: (D,) float32 detector scores.

        Returns:
            (K+1, H, W) logits of the last iteration, and (D,) recalibrated scores Q(Y_d = 1)
            (the input scores when the detection potential is off or D = 0).
        """
        return semantic_mean_field(
            unary, image, boxes, labels, scores, spatial_weight=self.spatial_weight,
            bilateral_weight=self.bilateral_weight, compatibility=self.compatibility, detection_x=self.detection_x,
            detection_y=self.detection_y, config=self.config,
        )


def semantic_mean_field(
    unary: Tensor, image: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor, *, spatial_weight: Tensor,
    bilateral_weight: Tensor, compatibility: Tensor | None, detection_x: Tensor, detection_y: Tensor,
    config: SemanticCRFConfig, normalization: str = "after",
) -> tuple[Tensor, Tensor]:
    """The semantic CRF as a function of its parameters (SemanticCRF.forward's arguments, then, by
    name, the module's parameters): what the module computes and what the exported dynseg::MeanFieldCRF
    node with the detection potential means (docs/ops.md), whose `normalization` attribute is the last
    argument."""
    kernels = crf_kernels(theta_spatial=config.theta_spatial, theta_bilateral_xy=config.theta_bilateral_xy,
                          theta_bilateral_rgb=config.theta_bilateral_rgb, spatial_weight=spatial_weight,
                          bilateral_weight=bilateral_weight)
    if not (config.detection_potential and boxes.shape[0] > 0):  # the plain mean field
        logits = mean_field_native(unary, image, kernels, compat=compatibility, normalization=normalization,
                                   iterations=config.iterations)
        return logits, scores
    potential = DetectionPotential(boxes, labels, scores, detection_x, detection_y,
                                   score_ceiling=config.score_ceiling, epsilon=config.epsilon)
    return mean_field_native_with_detections(unary, image, kernels, potential, compat=compatibility,
                                             normalization=normalization, iterations=config.iterations)


def semantic_mean_field_reference(
    unary: Tensor, image: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor, *, spatial_weight: Tensor,
    bilateral_weight: Tensor, compatibility: Tensor | None, detection_x: Tensor, detection_y: Tensor,
    config: SemanticCRFConfig, normalization: str = "after",
) -> tuple[Tensor, Tensor]:
    """`semantic_mean_field` written out (the module docstring's loop), differentiable by autograd: the
    definition the kernel library's detection potential is tested against. It defines the detection
    terms; the pairwise message comes from the native kernels (one iteration's logits less its input),
    which the tests hold to the lattice reference, `mean_field_reference`, on their own."""
    if not (config.detection_potential and boxes.shape[0] > 0):  # no loop to write out
        return semantic_mean_field(unary, image, boxes, labels, scores, spatial_weight=spatial_weight,
                                   bilateral_weight=bilateral_weight, compatibility=compatibility,
                                   detection_x=detection_x, detection_y=detection_y, config=config,
                                   normalization=normalization)
    kernels = crf_kernels(theta_spatial=config.theta_spatial, theta_bilateral_xy=config.theta_bilateral_xy,
                          theta_bilateral_rgb=config.theta_bilateral_rgb, spatial_weight=spatial_weight,
                          bilateral_weight=bilateral_weight)
    inside = box_masks(boxes, unary.shape[1], unary.shape[2]).to(unary.dtype)  # (D, H, W)
    pixels = inside.flatten(1).sum(1)  # n_d
    prior = torch.clamp(scores / config.score_ceiling, max=1.0 - config.epsilon)  # p_d
    belief = torch.stack([1.0 - prior, prior], dim=1)  # (D, 2) Q(Y_d = 0), Q(Y_d = 1) before the first iteration
    recalibrated = scores
    logits = unary
    for _ in range(config.iterations):
        q = torch.softmax(logits, dim=0)
        # one mean-field iteration from `logits` returns them plus the pairwise message of q
        pairwise = mean_field_native(logits, image, kernels, compat=compatibility, normalization=normalization,
                                     iterations=1) - logits
        logits = unary + pairwise + detection_pixel_term(belief, inside, labels, scores, detection_x, q.shape[0])
        belief = detection_y_update(q, inside, pixels, prior, labels, scores, detection_y)
        recalibrated = belief[:, 1]
    return logits, recalibrated


def detection_pixel_term(
    belief: Tensor, inside: Tensor, labels: Tensor, scores: Tensor, detection_x: Tensor, num_labels: int
) -> Tensor:
    """The detection potential's pixel update, its contribution to the logits (K+1, H, W)
    (docs/algorithm.md §4). belief: (D, 2) Q(Y_d = 0), Q(Y_d = 1); inside: (D, H, W) 1 on each box's
    pixels F_d, else 0; labels: (D,) int64 l_d; scores: (D,) s_d; detection_x: 0-d, the learned w_x."""
    x = detection_x * scores
    # inside F_d: every label gets -x_d·Q(Y_d=1), the detection's own label -x_d·Q(Y_d=0) instead
    everyone = -(x * belief[:, 1]).view(-1, 1, 1) * inside  # (D, H, W)
    own = (x * (belief[:, 1] - belief[:, 0])).view(-1, 1, 1) * inside
    one_hot = torch.nn.functional.one_hot(labels, num_labels).to(inside.dtype)  # (D, K+1)
    return everyone.sum(0).unsqueeze(0) + torch.einsum("dk,dhw->khw", one_hot, own)


def detection_y_update(
    q: Tensor, inside: Tensor, pixels: Tensor, prior: Tensor, labels: Tensor, scores: Tensor, detection_y: Tensor
) -> Tensor:
    """The detection potential's Y update: the belief (D, 2) Q(Y_d = 0), Q(Y_d = 1) from how much of each
    box F_d q gives to its class (docs/algorithm.md §4); its column 1 is the recalibrated score. q:
    (K+1, H, W) the iteration's starting Q; inside: (D, H, W); pixels: (D,) n_d = |F_d|; prior: (D,) p_d,
    the clamped scores; labels, scores as for detection_pixel_term; detection_y: 0-d, the learned w_y."""
    q_label = q[labels]  # (D, H, W): Q_i(l_d)
    agree = (q_label * inside).flatten(1).sum(1)  # sum over F_d of Q_i(l_d)
    disagree = pixels - agree  # sum over F_d of (1 - Q_i(l_d))
    y = detection_y * scores / pixels
    a0 = (1.0 - prior) - y * agree  # Y_d = 0: the detection is wrong
    a1 = prior - y * disagree  # Y_d = 1: it is right
    return torch.softmax(torch.stack([a0, a1], dim=1), dim=1)
