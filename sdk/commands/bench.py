"""`dynseg bench`: latency and throughput of an exported model (the onnxruntime backend, on `--device`)
over a sweep of detection counts D and image sizes, split into the network (onnxruntime's partitions),
the CRFs (the dynseg::MeanFieldCRF nodes on the native kernels) and the post-processing
(`results.build_result`). With a checkpoint, the PyTorch backend's time for the same inputs (network
and CRFs together, plus the same post-processing) is measured in the same run for comparison.

Inputs: the shipped coffee photo resized to each size (bilinear), with `images.generated_detections`
boxes; the same sweep gives the same inputs. Each case runs once untimed (warm-up), then `repeats`
times, the backends' calls taking turns. Latency is the wall time of one call (checks, backend,
post-processing); throughput is 1 / mean latency (one call at a time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError
from ..segmenter import Segmenter
from .images import ImageDetections, generated_detections
from .parity import check_same_model

BENCH_DETECTIONS = (0, 1, 10, 50)  # D of `dynseg bench` without --detections


@dataclass(frozen=True)
class BenchRow:
    """One case: backend, image (H, W), D, and milliseconds (percentiles of the per-call total; medians
    of the parts; network/crf are None for a backend that does not split them)."""

    backend: str
    height: int
    width: int
    detections: int
    repeats: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    network_ms: float | None
    crf_ms: float | None
    post_ms: float
    images_per_s: float


def bench_image(height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: the coffee photo resized."""
    from PIL import Image

    from .. import samples

    with Image.open(samples.path("coffee")) as photo:
        return np.array(photo.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))


def _time_case(segmenters: Sequence[tuple[str, Segmenter]], image: np.ndarray, dets: ImageDetections,
               repeats: int) -> list[BenchRow]:
    """One row per backend. Their calls take turns, so that a slow spell of a shared machine falls on
    every backend alike and the ratio between them holds."""
    calls: dict[str, dict[str, list]] = {name: {"total": [], "network": [], "crf": [], "post": []}
                                         for name, _ in segmenters}
    for repeat in range(repeats + 1):  # the first is a warm-up
        for name, segmenter in segmenters:
            timings: dict[str, float] = {}
            start = time.perf_counter()
            segmenter.segment(image, dets.boxes, dets.labels, dets.scores, timings=timings)
            if repeat:
                calls[name]["total"].append(time.perf_counter() - start)
                for part in ("network", "crf", "post"):
                    calls[name][part].append(timings.get(part))
    ms = lambda values, q=50: float(np.percentile(values, q) * 1e3)  # noqa: E731
    rows = []
    for name, taken in calls.items():
        totals = taken["total"]
        split = None not in taken["network"] + taken["crf"]  # onnxruntime times its sessions and CRF nodes apart
        rows.append(BenchRow(backend=name, height=image.shape[0], width=image.shape[1], detections=len(dets.scores),
                             repeats=repeats, p50_ms=ms(totals), p90_ms=ms(totals, 90), p99_ms=ms(totals, 99),
                             network_ms=ms(taken["network"]) if split else None,
                             crf_ms=ms(taken["crf"]) if split else None, post_ms=ms(taken["post"]),
                             images_per_s=1.0 / float(np.mean(totals))))
    return rows


def run(model_path: str | Path, *, sizes: Sequence[tuple[int, int]], detections: Sequence[int] | None, repeats: int,
        checkpoint: str | Path | None = None, device: str = "cpu",
        on_row: Callable[[BenchRow], object] | None = None) -> list[BenchRow]:
    """Times every (size, D) case on the exported model and, given `checkpoint` (the one the model was
    exported from), on PyTorch too, both on `device` (a call's time includes copying its outputs to the
    host). detections None: BENCH_DETECTIONS, the model's limit in place of those above it. Raises
    InvalidArgumentError before timing anything for a D above the model's limit or a checkpoint the
    model did not come from."""
    where = "" if device == "cpu" else f" ({device})"
    exported = Segmenter(model_path, backend="onnxruntime", device=device)
    if detections is None:
        detections = sorted({min(count, exported.max_detections) for count in BENCH_DETECTIONS})
    if max(detections, default=0) > exported.max_detections:  # before any case is timed
        raise InvalidArgumentError(f"detection count {max(detections)} (--detections) is above this model's limit of "
                                   f"{exported.max_detections} per image: time fewer, or export the model with a "
                                   "larger --max-detections")
    segmenters = [("onnxruntime" + where, exported)]
    if checkpoint is not None:
        reference = Segmenter(checkpoint, backend="torch", device=device)
        check_same_model(exported, reference)
        segmenters.append(("torch" + where, reference))
    rows = []
    for height, width in sizes:
        image = bench_image(height, width)
        for count in detections:
            dets = generated_detections(height, width, count, num_classes=len(exported.class_names), seed=0)
            for row in _time_case(segmenters, image, dets, repeats):
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def table(rows: Sequence[BenchRow]) -> str:
    """The rows as a markdown table, milliseconds; "× torch" is a row's p50 over the PyTorch row's of the
    same case, measured in the same run ("-" without one): below 1, faster than PyTorch."""
    lines = ["| backend | H x W | D | p50 ms | p90 ms | p99 ms | network ms | CRFs ms | post ms | images/s "
             "| × torch |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    part = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    torch_p50 = {(r.height, r.width, r.detections): r.p50_ms for r in rows if r.backend.startswith("torch")}
    for r in rows:
        reference = torch_p50.get((r.height, r.width, r.detections))
        ratio = "-" if reference is None else f"{r.p50_ms / reference:.2f}"
        lines.append(f"| {r.backend} | {r.height} x {r.width} | {r.detections} | {r.p50_ms:.1f} | {r.p90_ms:.1f} | "
                     f"{r.p99_ms:.1f} | {part(r.network_ms)} | {part(r.crf_ms)} | {r.post_ms:.1f} | "
                     f"{r.images_per_s:.2f} | {ratio} |")
    return "\n".join(lines)


def as_json(rows: Sequence[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
