"""`dynseg validate`: does an exported model compute what its checkpoint computes?

Runs the exported model (onnxruntime backend) and the checkpoint (torch backend) on the same images
and detections and compares, per image (the tolerances below, which tests/export/test_onnx_parity.py
holds the export to as well):

- instance probabilities: max |Δ| of softmax(instance logits) over the D+1 labels, at most 1e-4;
- semantic probabilities: max |Δ|, at most 1e-3 (looser than the instance bound: the
  semantic CRF amplifies the two runtimes' float32 rounding of the backbone, about 3e-6 apart, by up to
  ~100x over its five iterations: docs/ops.md, Numerics);
- argmax agreement: of the results' instance labels (the argmax with its tie rule) on *settled* pixels,
  at least 99.9 %;
- per-instance mask IoU (each detection's instance, on settled pixels), the smallest at least 0.99.

A pixel is settled when PyTorch's two most probable instance labels differ by more than the
probability tolerance (1e-4), or when its largest logits tie (within `results.TIE_TOLERANCE`), as two
detections of one class do outside both boxes (they share their global term; docs/ops.md): there the
tie rule picks the winner on both runtimes. Elsewhere, a near tie, the winner is float noise. The
report is truthy when every check passes and shows the value each check measured beside its limit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DetectionsDroppedWarning, InvalidArgumentError
from ..inputs import load_image
from ..results import SegmentationResult, tied_pixels
from ..segmenter import Segmenter
from .images import (ImageDetections, check_detection_counts, check_detection_labels, generated_detections,
                     read_detections, sample_cases)
from .progress import ItemProgress, shown

PROBABILITY_ATOL = 1e-4
SEMANTIC_ATOL = 1e-3
MIN_AGREEMENT = 0.999
MIN_IOU = 0.99


@dataclass(frozen=True)
class Check:
    """One measured quantity against its limit: a ceiling (`at_most`) or a floor (not `at_most`)."""

    name: str
    value: float
    limit: float
    at_most: bool

    def __bool__(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def format(self, number: float) -> str:
        """A value or limit of this check as the report prints it: small differences in exponent form."""
        return f"{number:.2e}" if self.at_most else f"{number:.5f}"

    def __str__(self) -> str:
        sign = "<=" if self.at_most else ">="
        return f"{self.name} {self.format(self.value)} ({sign} {self.format(self.limit)}) {'ok' if self else 'FAIL'}"


@dataclass(frozen=True)
class ImageParity:
    """The checks of one image: name, (H, W), D (detections the model ran on), N (instances PyTorch's
    result holds: with none, the instance checks compare background only) and the four checks."""

    name: str
    size: tuple[int, int]
    detections: int
    checks: list[Check]
    instances: int = 0

    def __bool__(self) -> bool:
        return all(self.checks)


@dataclass
class ParityReport:
    """Every image's checks; truthy when all pass."""

    images: list[ImageParity] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.images) and all(self.images)

    def exercised_instances(self) -> bool:
        """Whether any image gave PyTorch an instance: else every instance check held trivially, since
        both runtimes called every pixel background."""
        return any(image.instances for image in self.images)

    def worst(self) -> list[Check]:
        """Per check name, the worst value over the images (what the model actually needed)."""
        out: dict[str, Check] = {}
        for image in self.images:
            for check in image.checks:
                best = out.get(check.name)
                if best is None or (check.value > best.value if check.at_most else check.value < best.value):
                    out[check.name] = check
        return list(out.values())

    def table(self) -> str:
        """A markdown table: one row per image, one column per check, then the worst row."""
        names = [c.name for c in self.images[0].checks] if self.images else []
        lines = ["| image | H x W | D | N | " + " | ".join(names) + " | result |",
                 "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " | --- |"]
        for image in self.images:
            values = [c.format(c.value) for c in image.checks]
            lines.append(f"| {image.name} | {image.size[0]} x {image.size[1]} | {image.detections} | "
                         f"{image.instances} | " + " | ".join(values) + f" | {'ok' if image else 'FAIL'} |")
        first = self.images[0].checks if self.images else []
        limits = [("<= " if c.at_most else ">= ") + c.format(c.limit) for c in first]
        lines.append("| limit | | | | " + " | ".join(limits) + " | |")
        return "\n".join(lines)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Softmax along `axis` (float32 in, float32 out)."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def compare(name: str, candidate: dict, reference: dict, candidate_result: SegmentationResult,
            reference_result: SegmentationResult) -> ImageParity:
    """The four checks of one image. candidate/reference: a backend's raw outputs (instance_logits
    (D+1, H, W), semantic_probabilities (K+1, H, W)), the exported model's and PyTorch's; the results
    are build_result's of the same outputs."""
    q_cand, q_ref = (_softmax(r["instance_logits"], axis=0) for r in (candidate, reference))  # (D+1, H, W)
    sem = np.abs(candidate["semantic_probabilities"] - reference["semantic_probabilities"]).max()
    # A zero row makes the gap of a single label (D = 0) its probability, 1: always settled.
    top2 = np.sort(np.concatenate([np.zeros_like(q_ref[:1]), q_ref]), axis=0)[-2:]  # (2, H, W)
    settled = (top2[1] - top2[0] > PROBABILITY_ATOL) | tied_pixels(reference["instance_logits"])  # (H, W)
    winners = [_winning_detections(r) for r in (candidate_result, reference_result)]
    agree = (winners[0] == winners[1])[settled]
    ious = []
    for detection in np.union1d(winners[0][settled], winners[1][settled]):
        if detection < 0:  # background
            continue
        a, b = ((winner == detection) & settled for winner in winners)
        ious.append((a & b).sum() / (a | b).sum())
    return ImageParity(name=name, size=tuple(settled.shape), detections=len(q_ref) - 1,
                       instances=len(reference_result.instances), checks=[
        Check("instance prob max abs diff", float(np.abs(q_cand - q_ref).max()), PROBABILITY_ATOL, True),
        Check("semantic prob max abs diff", float(sem), SEMANTIC_ATOL, True),
        Check("argmax agreement", float(agree.mean()) if agree.size else 1.0, MIN_AGREEMENT, False),
        Check("min mask IoU", float(min(ious, default=1.0)), MIN_IOU, False),
    ])


def _winning_detections(result: SegmentationResult) -> np.ndarray:
    """int64 (H, W): each pixel's instance as the index of its detection, -1 on background: what two results
    can compare when an instance one of them lost left the other's numbers shifted."""
    detection_of_id = np.array([-1, *(instance.detection for instance in result.instances)], np.int64)
    return detection_of_id[result.instance_map]  # instance_map holds 0 (background) or instances[i - 1]'s i


def check_same_model(exported: Segmenter, reference: Segmenter) -> None:
    """Raises InvalidArgumentError unless the exported model came from the checkpoint: the same classes
    and, where the export recorded them, the same weights."""
    if exported.class_names != reference.class_names:
        raise InvalidArgumentError(f"model {exported.path} has classes {list(exported.class_names)}, checkpoint "
                                   f"{reference.path} has {list(reference.class_names)}: not the same model")
    # Two models of one architecture and classes can agree on images neither recognises anything in,
    # so the weights must be the same ones, not merely compatible.
    found, expected = exported.weights_fingerprint, reference.weights_fingerprint
    if found is not None and found != expected:
        held = "none recorded" if expected is None else f"{expected[:12]}..."
        raise InvalidArgumentError(f"model {exported.path} was exported from other weights than checkpoint "
                                   f"{reference.path} holds (weights sha256 {found[:12]}... vs {held}): compare it "
                                   "with the checkpoint it was exported from")


def validate(exported: Segmenter, reference: Segmenter, cases: Iterable[tuple[str, np.ndarray, ImageDetections]],
             progress: Callable[[int], ItemProgress] | None = None) -> ParityReport:
    """Runs the exported model (an onnxruntime Segmenter) and the checkpoint (a torch Segmenter on the
    CPU, the reference) on each (name, (H, W, 3) uint8 image, detections with boxes, labels, scores)
    case and returns the report. Raises InvalidArgumentError when the export is not the checkpoint's
    (`check_same_model`), a case has more detections than the export takes or classes it does not
    have (before any case runs), or a case's image or detections are refused (the message then starts
    with the case's name). Boxes the SDK drops (inverted, or wholly outside the image) are left out
    without a warning: D counts the detections the model ran on. `progress(total)` makes the display,
    updated after each case."""
    check_same_model(exported, reference)
    cases = list(cases)
    check_detection_counts([(name, len(dets.scores)) for name, _, dets in cases], exported.max_detections, "",
                           "give each image fewer")
    check_detection_labels([(name, dets.labels) for name, _, dets in cases], len(exported.class_names), "")
    report = ParityReport()
    with shown(progress, len(cases)) as update:
        for done, (name, image, dets) in enumerate(cases, start=1):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DetectionsDroppedWarning)  # the table's D counts what ran
                    (candidate, candidate_outputs), (expected, reference_outputs) = (
                        s.segment_with_outputs(image, dets.boxes, dets.labels, dets.scores)
                        for s in (exported, reference))
            except InvalidArgumentError as error:
                raise InvalidArgumentError(f"{name}: {error}") from None
            report.images.append(compare(name, candidate_outputs, reference_outputs, candidate, expected))
            update(done, name)
    return report


def validate_export(model: Path, checkpoint: Path, images: Sequence[Path] = (), detections: Path | None = None,
                    device: str = "cpu", progress: Callable[[int], ItemProgress] | None = None) -> ParityReport:
    """`dynseg validate` (needs torch): the exported .onnx `model` on onnxruntime on `device` against the
    `checkpoint` folder it was exported from, on PyTorch on the CPU. Cases: `images` with `detections` (a
    COCO results file) or with generated boxes (at most 5, of the model's classes), else the sample
    photos. Raises InvalidArgumentError when the export is not the checkpoint's, in its classes, its
    weights or its CRF nodes' attributes and weights (checked apart: the images compare the CRFs only
    where they change the output), or as `validate` says. progress: as `validate`'s."""
    from dynseg.export.ops import crf_node_differences
    from dynseg.trainer.checkpoint import load_checkpoint

    from ..graph import read_export

    if detections is not None and not images:
        raise InvalidArgumentError("detections needs images, the files it names")
    exported = Segmenter(model, backend="onnxruntime", device=device)
    try:
        network = load_checkpoint(checkpoint)
    except FileNotFoundError as error:
        raise InvalidArgumentError(str(error)) from None
    reference = Segmenter.of_network(network, path=checkpoint)
    check_same_model(exported, reference)
    differences = crf_node_differences(read_export(model).model, network)
    if differences:
        raise InvalidArgumentError(f"{model}'s CRF nodes are not {checkpoint}'s CRFs: " + "; ".join(differences))
    classes, most = len(exported.class_names), exported.max_detections
    if not images:
        cases = sample_cases(classes, most)
    else:
        pictures = [load_image(path) for path in images]
        if detections is None:
            found = [generated_detections(p.shape[0], p.shape[1], min(5, most), num_classes=classes, seed=i)
                     for i, p in enumerate(pictures)]
        else:
            found = read_detections(detections, images)
        cases = [(Path(path).name, picture, dets) for path, picture, dets in zip(images, pictures, found)]
    return validate(exported, reference, cases, progress)
