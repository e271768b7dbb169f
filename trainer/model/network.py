"""The Dynamically Instantiated Network: semantic subnetwork, semantic CRF, instance unaries, instance CRF.

Owns the composition (docs/algorithm.md §1) and everything around a forward pass: checking the detections,
and the model's configuration (all that is needed to rebuild it, kept as JSON beside a checkpoint).
The instance map, classes and scores (§6) are made from its outputs by `dynseg.sdk.results.build_result`,
as for every backend.

    image ──► backbone + head ──► logits (K+1, h, w) ──► upsample (align corners) to H×W
          ──► semantic CRF (with the detection potential) ──► Q_sem
          ──► box, global, shape terms ──► U (D+1, H, W) ──► instance CRF ──► instance logits
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynseg.sdk import inputs
from dynseg.sdk.errors import DetectionsDroppedWarning, InvalidArgumentError

from .. import fields
from ..backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneName, semantic_network
from .instance import InstanceConfig, InstanceCRF, InstanceUnaries
from .semantic_crf import SemanticCRF, SemanticCRFConfig


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network; saved as JSON next to its weights."""

    backbone: BackboneName = "resnet18"
    class_names: tuple[str, ...] = ("object",)
    semantic_crf: SemanticCRFConfig | None = field(default_factory=SemanticCRFConfig)
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # of RGB in 0..1, as the backbone expects
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        fields.choices(self, "backbone", get_args(BackboneName))
        names = self.class_names
        if not (isinstance(names, tuple) and names and all(isinstance(n, str) and n for n in names)):
            raise InvalidArgumentError(f"ModelConfig.class_names must be a non-empty tuple of class names (str), got "
                                       f"{names!r}")
        if twice := sorted({n for n in names if names.count(n) > 1}):  # a result's class name must tell its label
            raise InvalidArgumentError(f"ModelConfig.class_names must name each class once, got {', '.join(twice)} "
                                       "more than once")
        fields.number_tuple(self, "mean", 3)
        fields.number_tuple(self, "std", 3, positive=True)
        if not isinstance(self.semantic_crf, (SemanticCRFConfig, type(None))):
            raise InvalidArgumentError(f"ModelConfig.semantic_crf must be a SemanticCRFConfig or None, got "
                                       f"{type(self.semantic_crf).__name__}")
        if not isinstance(self.instance, InstanceConfig):
            raise InvalidArgumentError(f"ModelConfig.instance must be an InstanceConfig, got "
                                       f"{type(self.instance).__name__}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def score_ceiling(self) -> float:
        """The largest detector score the network takes: its detection potential's s_max, else 1 (the
        box term and the pixel term read the score itself, so one above would change what they say)."""
        crf = self.semantic_crf
        return crf.score_ceiling if crf is not None and crf.detection_potential else 1.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise InvalidArgumentError(f"a model config is a JSON object, got {type(raw).__name__}")
        # to_json writes every field: one missing or unknown is a damaged or foreign file, as nested ones are
        keys = {f.name for f in dataclasses.fields(cls)}
        if raw.keys() != keys:
            missing, unknown = sorted(keys - raw.keys()), sorted(raw.keys() - keys)
            problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
                [f"has unknown keys {unknown}"] if unknown else [])
            raise InvalidArgumentError(f"a model config {'; '.join(problems)}")
        for key in ("class_names", "mean", "std"):  # tuple("disc") would be four class names
            if not isinstance(raw.get(key), list):
                raise InvalidArgumentError(f"a model config's {key} must be a JSON list, got {raw.get(key)!r:.80}")
        semantic = raw.get("semantic_crf")
        return cls(
            backbone=raw["backbone"],
            class_names=tuple(raw["class_names"]),
            semantic_crf=None if semantic is None else SemanticCRFConfig(**semantic),
            instance=InstanceConfig(**raw["instance"]),
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
        )


@dataclass
class NetworkOutput:
    """One image's outputs (H, W: the image; D: detections). A result, the instance map and the
    instances' scores, is made from them by `dynseg.sdk.results.build_result`, as for every backend."""

    semantic_logits: Tensor  # (K+1, H, W), after the semantic CRF
    semantic_probabilities: Tensor  # (K+1, H, W)
    recalibrated_scores: Tensor  # (D,) Q(Y_d = 1) of the detection potential (else the input scores)
    instance_logits: Tensor  # (D+1, H, W), label 0 = background


def require_valid_detections(
    boxes: Tensor, labels: Tensor, scores: Tensor, *, height: int, width: int, num_classes: int,
    score_ceiling: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The SDK's check of the detections (`dynseg.sdk.inputs.check_detections`: boxes (D, 4) xyxy pixels,
    inclusive, floored to integers and clipped to the image; labels integers in 1..K; finite scores >= 0,
    at most score_ceiling, the network's `ModelConfig.score_ceiling`, where given) on tensors, strict: a
    box the SDK would drop with a warning (inverted, or wholly outside the image) raises here, as
    training and evaluation data should hold none. Returns boxes (D, 4) float32, labels (D,) int64 and
    scores (D,) float32 on the boxes' device; bad detections raise InvalidArgumentError, a ValueError,
    naming the argument."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DetectionsDroppedWarning)  # raised below instead
        checked = inputs.check_detections(
            *(tensor.detach().cpu().numpy() for tensor in (boxes, labels, scores)), height=height, width=width,
            num_classes=num_classes, score_ceiling=score_ceiling,
        )
    if checked.dropped:
        listed = "; ".join(f"{dropped.detection}: {dropped.reason}" for dropped in checked.dropped)
        raise InvalidArgumentError(f"boxes must lie at least partly inside the {width}x{height} image and not be "
                                   f"inverted, got {listed}")
    return (torch.from_numpy(checked.boxes).to(boxes.device), torch.from_numpy(checked.labels).to(boxes.device),
            torch.from_numpy(checked.scores).to(boxes.device))


class DynamicallyInstantiatedNetwork(nn.Module):
    """Image and detections in, semantic and instance segmentations out (one image at a time: D
    differs per image)."""

    mean: Tensor  # (1, 3, 1, 1) buffers: the backbone's normalisation, in 0..255
    std: Tensor

    def __init__(
        self,
        *,
        config: ModelConfig,
        semantic: nn.Module,
        semantic_crf: SemanticCRF | None,
        instance_unaries: InstanceUnaries,
        instance_crf: InstanceCRF,
    ):
        super().__init__()
        self.config = config
        self.semantic = semantic
        self.semantic_crf = semantic_crf
        self.instance_unaries = instance_unaries
        self.instance_crf = instance_crf
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def semantic_unary(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float RGB in 0..255 -> (B, K+1, H, W) the semantic CRF's unary: the segmentation
        network's logits, upsampled (align corners) before any softmax, as the released model did."""
        coarse = self.semantic((images - self.mean) / self.std)
        return F.interpolate(coarse, size=images.shape[-2:], mode="bilinear", align_corners=True)

    def forward(self, image: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor) -> NetworkOutput:
        """image: (3, H, W) float32 or uint8 RGB in 0..255; boxes: (D, 4) float32 xyxy pixels (inclusive);
        labels: (D,) int64 in 1..K; scores: (D,) float32. Any D >= 0."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise InvalidArgumentError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
        if image.dtype not in (torch.float32, torch.uint8):
            raise InvalidArgumentError(f"image must be float32 (or uint8) RGB in 0..255, got {image.dtype}")
        height, width = image.shape[1:]
        boxes, labels, scores = require_valid_detections(boxes, labels, scores, height=height, width=width,
                                                         num_classes=self.config.num_classes,
                                                         score_ceiling=self.config.score_ceiling)
        return compose(self, image, boxes, labels, scores, semantic_crf=self.semantic_crf,
                       instance_crf=self.instance_crf)


def compose(
    network: DynamicallyInstantiatedNetwork, image: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor, *,
    semantic_crf: nn.Module | None, instance_crf: nn.Module,
) -> NetworkOutput:
    """The network's composition (docs/algorithm.md §1) on checked detections, with the two CRFs given:
    the network passes its own modules, the ONNX export (`dynseg.export.onnx.ExportGraph`) each as one
    dynseg::MeanFieldCRF node with the same call, so both run this one function.

    semantic_crf(unary, image, boxes, labels, scores) -> (logits, recalibrated scores), or None;
    instance_crf(unary, image) -> logits."""
    image = image.to(torch.float32)
    logits = network.semantic_unary(image.unsqueeze(0))[0]  # (K+1, H, W)
    recalibrated_scores = scores
    if semantic_crf is not None:
        logits, recalibrated_scores = semantic_crf(logits, image, boxes, labels, scores)
    q_sem = channel_softmax(logits)
    unary = network.instance_unaries(q_sem, boxes, labels, recalibrated_scores)  # (D+1, H, W)
    return NetworkOutput(
        semantic_logits=logits,
        semantic_probabilities=q_sem,
        recalibrated_scores=recalibrated_scores,
        instance_logits=instance_crf(unary, image),
    )


def channel_softmax(logits: Tensor) -> Tensor:
    """Softmax over the labels (dim 0), written out as max, subtract, exp, sum and divide: exported,
    these are ReduceMax, Sub, Exp, ReduceSum and Div, as onnxruntime's Softmax over a non-last axis
    transposes the tensor there and back, 6-10x slower on the CPU (docs/benchmarks.md)."""
    exp = torch.exp(logits - logits.amax(dim=0, keepdim=True))
    return exp / exp.sum(dim=0, keepdim=True)


def build_model(config: ModelConfig, *, pretrained: str | Path | None = None) -> DynamicallyInstantiatedNetwork:
    """A network for `config`, with the backbone's ImageNet weights from `pretrained` if given."""
    if not isinstance(config, ModelConfig):
        raise InvalidArgumentError(f"config must be a ModelConfig, got {type(config).__name__}")
    return DynamicallyInstantiatedNetwork(
        config=config,
        semantic=semantic_network(config.backbone, num_classes=config.num_classes + 1, pretrained=pretrained),
        semantic_crf=None if config.semantic_crf is None else SemanticCRF(num_classes=config.num_classes,
                                                                          config=config.semantic_crf),
        instance_unaries=InstanceUnaries(config=config.instance),
        instance_crf=InstanceCRF(config=config.instance),
    )
