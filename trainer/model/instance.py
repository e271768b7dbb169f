"""The instance subnetwork: box, global and shape terms, and the instance CRF with D+1 labels.

Owns docs/algorithm.md §5: for detection k (class c_k, score s_k, integer inclusive box B_k),
  box term     psi_box(k, i)    = s_k · Q_i(c_k) inside B_k, 0 outside (none for the background);
  global term  psi_global(k, i) = Q_i(c_k) everywhere; the background's is Q_i(0);
  shape term   psi_shape(k, i)  = Q_i(c_k) · t*(i) inside B_k, t* the learned template of the box's
               aspect-ratio group that best matches Q(c_k) in the box (<T, Q_crop> / ||T||, at
               template resolution: the crop is resized to the template, an accepted approximation);
  U_k = ln(max(w1·psi_box + w2·psi_global + w3·psi_shape, epsilon)),
then the label-agnostic instance CRF: one scalar weight per kernel shared by all D+1 labels, fixed
Potts, so the same parameters serve any number of detections. The box term uses the detector's
score s (the paper's choice; the released code fed sigmoid(2s - 1)), or the semantic CRF's
recalibrated score when its detection potential is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynseg.sdk.checks import INT32_MAX
from dynseg.sdk.crf_node import nothing_to_infer
from dynseg.sdk.errors import InvalidArgumentError

from .. import fields
from ..boxes import box_masks
from ..crf import crf_kernels, mean_field_native


@dataclass(frozen=True)
class InstanceConfig:
    """Which unary terms, the templates' layout, and the instance CRF: the released code's CRF and
    terms; fewer and smaller templates than the paper's (about 250 per group), sized for CPU training.

    Only the global term gives the background label evidence: without it (box term alone, say) the
    background unary is the ε clamp and every pixel inside a box goes to the box. The paper's box-only
    ablation added a whole-image background detection, which this configuration does not (docs/results.md).
    """

    box_term: bool = True
    global_term: bool = True
    shape_term: bool = True
    template_groups: int = 5  # aspect-ratio groups
    templates_per_group: int = 16  # the paper used about 250 on VOC
    template_size: int = 32
    epsilon: float = 1e-6  # the clamp that keeps ln finite
    crf: bool = True
    iterations: int = 3
    theta_spatial: float = 3.0
    theta_bilateral_xy: float = 49.0
    theta_bilateral_rgb: float = 5.0
    weight_spatial: float = 3.0
    weight_bilateral: float = 4.0

    def __post_init__(self) -> None:
        fields.flags(self, "box_term", "global_term", "shape_term", "crf")
        fields.ints(self, "template_groups", "templates_per_group", "template_size", least=1)
        fields.ints(self, "iterations", least=0, most=INT32_MAX)  # the CRF node's and the kernels' range
        fields.numbers(self, "epsilon", low=0, high=1, low_open=True, high_open=True, float32=True)
        fields.numbers(self, "theta_spatial", "theta_bilateral_xy", "theta_bilateral_rgb", low=0, low_open=True,
                       float32=True)
        fields.numbers(self, "weight_spatial", "weight_bilateral", float32=True)


def aspect_groups(boxes: Tensor, groups: int) -> Tensor:
    """(D,) int64 group of each box by aspect ratio (height / width): equal bins of its logarithm over
    [1/4, 4], a ratio beyond either end in the end group."""
    heights = boxes[:, 3] - boxes[:, 1] + 1
    widths = boxes[:, 2] - boxes[:, 0] + 1
    ratio = torch.log(heights / widths).clamp(-math.log(4.0), math.log(4.0))
    return ((ratio + math.log(4.0)) / (2 * math.log(4.0)) * groups).long().clamp(max=groups - 1)


class InstanceUnaries(nn.Module):
    """U (D+1, H, W) from the semantic probabilities and the detections."""

    def __init__(self, *, config: InstanceConfig = InstanceConfig()):
        super().__init__()
        self.config = config
        self.term_weights = nn.Parameter(torch.ones(3))  # w1 (box), w2 (global), w3 (shape)
        size = config.template_size
        templates = torch.zeros(config.template_groups, config.templates_per_group, size, size)
        templates[..., size // 8 : size - size // 8, size // 8 : size - size // 8] = 1.0  # until initialised
        self.templates = nn.Parameter(templates)  # (G, T, S, S)

    @torch.no_grad()
    def initialise_templates(self, masks: list[np.ndarray], boxes: list[np.ndarray], *, seed: int = 0) -> None:
        """k-means of training instance masks (each cropped to its box, resized to the template
        size), per aspect-ratio group. masks: bool (H, W) each; boxes: xyxy inclusive each."""
        config = self.config
        if not masks:
            raise InvalidArgumentError("masks must hold at least one training instance mask")
        crops, groups = [], []
        for mask, box in zip(masks, boxes):
            plane = torch.tensor(np.asarray(mask, dtype=np.float32))[None]
            box_tensor = torch.tensor(np.asarray(box, dtype=np.float32)[None])
            crops.append(_crops(plane, box_tensor, config.template_size)[0])  # what _best_templates compares
            groups.append(int(aspect_groups(box_tensor, config.template_groups)))
        crops_t = torch.stack(crops).flatten(1)  # (n, S*S)
        groups_t = torch.tensor(groups)
        generator = torch.Generator().manual_seed(seed)
        for group in range(config.template_groups):
            members = crops_t[groups_t == group]
            if len(members) == 0:
                members = crops_t  # no training shape of this aspect: borrow from all
            self.templates[group] = _kmeans(members, config.templates_per_group, generator).view(
                -1, config.template_size, config.template_size)

    def forward(self, q_sem: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor) -> Tensor:
        """q_sem: (K+1, H, W) semantic probabilities; boxes (D, 4) integer-valued xyxy inclusive in the
        image; labels (D,) in 1..K; scores (D,). Returns U, (D+1, H, W) logits, label 0 = background."""
        config = self.config
        height, width = q_sem.shape[1:]
        w_box, w_global, w_shape = self.term_weights
        q_class = q_sem[labels]  # (D, H, W): Q_i(c_k)
        inside = box_masks(boxes, height, width).to(q_sem.dtype)
        total = torch.zeros_like(q_class)
        if config.box_term:
            box_term = w_box * scores.view(-1, 1, 1) * q_class * inside
            total = total + box_term
        if config.global_term:
            global_term = w_global * q_class
            total = total + global_term
        if config.shape_term:
            shape_term = w_shape * q_class * self._best_templates(q_class, boxes)
            total = total + shape_term
        background = w_global * q_sem[0] if config.global_term else torch.zeros_like(q_sem[0])
        total = torch.cat([background.unsqueeze(0), total], dim=0)  # (D+1, H, W)
        return torch.log(torch.clamp(total, min=config.epsilon))

    def _best_templates(self, q_class: Tensor, boxes: Tensor) -> Tensor:
        """(D, H, W): each detection's best template t*, pasted over its box (0 elsewhere).

        All detections at once, with no loop over D (so the exported graph keeps D dynamic): the crop
        of Q(c_k) resized to the template (`_crops`), and the best template back onto the box (`_paste`)."""
        config = self.config
        size = config.template_size
        height, width = q_class.shape[1:]
        count = boxes.shape[0]
        crops = _crops(q_class, boxes, size)  # (D, S, S)
        candidates = self.templates[aspect_groups(boxes, config.template_groups)]  # (D, T, S, S)
        # explicit sizes rather than flatten(): a reshape to (0, T, -1) is ambiguous for D = 0
        flat = candidates.reshape(count, config.templates_per_group, size * size)
        norms = flat.norm(dim=2).clamp(min=1e-12)  # (D, T)
        similarity = torch.bmm(flat, crops.reshape(count, size * size, 1)).squeeze(2) / norms  # <T, Q_crop> / ||T||
        best = torch.gather(candidates, 1, similarity.argmax(dim=1).view(-1, 1, 1, 1).expand(-1, 1, size, size))
        return _paste(best[:, 0], boxes, height, width)


def _crops(planes: Tensor, boxes: Tensor, size: int) -> Tensor:
    """(D, S, S): plane k (of (D, H, W)) cropped to box k and resized bilinearly (corners aligned) to
    S × S, the one crop of the shape term: what templates are learned from and compared with. Template
    pixel (u, v) reads image point (x1 + u (w-1)/(S-1), y1 + v (h-1)/(S-1)), through grid_sample: no
    loop over D, so the exported graph keeps D dynamic."""
    count, height, width = planes.shape
    x1, y1, x2, y2 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    steps = torch.arange(size, dtype=planes.dtype, device=planes.device) / max(size - 1, 1)
    xs = x1 + steps.view(1, 1, size) * (x2 - x1)  # (D, 1, S)
    ys = y1 + steps.view(1, size, 1) * (y2 - y1)  # (D, S, 1)
    grid = torch.stack([_normalised(xs.expand(count, size, size), width),
                        _normalised(ys.expand(count, size, size), height)], dim=-1)  # (D, S, S, 2)
    return F.grid_sample(planes.unsqueeze(1), grid, mode="bilinear", align_corners=True)[:, 0]


def _paste(templates: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """(D, S, S) templates resized bilinearly (corners aligned) onto their boxes in (D, H, W), 0 outside.

    The resize is separable, so a paste is Wy · t · Wxᵀ with one (pixels, S) matrix of interpolation
    weights per axis: two small batched matmuls rather than a sampling grid of D·H·W points."""
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    rows = _interpolation_weights(y1, y2, height, templates.shape[1])  # (D, H, S)
    columns = _interpolation_weights(x1, x2, width, templates.shape[2])  # (D, W, S)
    return rows @ templates @ columns.transpose(1, 2)


def _interpolation_weights(start: Tensor, end: Tensor, pixels: int, size: int) -> Tensor:
    """(D, pixels, size): the bilinear weight of template index s at pixel p of the box start..end
    (inclusive), which reads template point (p - start)(size - 1)/(end - start); 0 outside the box.
    The weights are the hat function max(0, 1 - |point - s|)."""
    p = torch.arange(pixels, dtype=start.dtype, device=start.device).view(1, pixels, 1)
    s = torch.arange(size, dtype=start.dtype, device=start.device).view(1, 1, size)
    start, end = start.view(-1, 1, 1), end.view(-1, 1, 1)
    point = (p - start) / torch.clamp(end - start, min=1.0) * (size - 1)
    inside = ((p >= start) & (p <= end)).to(start.dtype)
    return torch.clamp(1 - (point - s).abs(), min=0.0) * inside


def _normalised(coordinate: Tensor, size: int | Tensor) -> Tensor:
    """Pixel coordinates 0..size-1 to grid_sample's -1..1 (corners aligned). `size` stays a tensor
    op, not a Python max, so that an exported graph keeps the image size dynamic."""
    span = torch.clamp(torch.as_tensor(size, dtype=coordinate.dtype, device=coordinate.device) - 1, min=1.0)
    return coordinate * 2.0 / span - 1.0


def _kmeans(points: Tensor, k: int, generator: torch.Generator, iterations: int = 20) -> Tensor:
    """Lloyd's k-means; (n, dim) -> (k, dim) centres (points repeat when n < k)."""
    n = points.shape[0]
    centres = points[torch.randint(n, (k,), generator=generator)].clone()
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(dim=1)
        for c in range(k):
            members = points[assign == c]
            if len(members):
                centres[c] = members.mean(dim=0)
    return centres


class InstanceCRF(nn.Module):
    """The label-agnostic instance CRF: scalar kernel weights shared by all D+1 labels, Potts."""

    def __init__(self, *, config: InstanceConfig = InstanceConfig()):
        super().__init__()
        self.config = config
        self.spatial_weight = nn.Parameter(torch.tensor(config.weight_spatial))
        self.bilateral_weight = nn.Parameter(torch.tensor(config.weight_bilateral))

    def forward(self, unary: Tensor, image: Tensor) -> Tensor:
        """unary (D+1, H, W) logits, image (3, H, W) RGB 0..255 -> (D+1, H, W) logits; with no
        detections (D = 0) there is nothing to infer and the unary is the result."""
        config = self.config
        if not config.crf or nothing_to_infer(unary.shape[0], config.iterations):
            return unary
        kernels = crf_kernels(theta_spatial=config.theta_spatial, theta_bilateral_xy=config.theta_bilateral_xy,
                              theta_bilateral_rgb=config.theta_bilateral_rgb, spatial_weight=self.spatial_weight,
                              bilateral_weight=self.bilateral_weight)
        return mean_field_native(unary, image, kernels, iterations=config.iterations)
