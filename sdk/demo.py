"""The `dynseg demo` job: the dense CRF snapping a blocky, poor labelling to a real photo's edges.

Owns the demo's deliberately poor unary (a colour model fitted at 1/8 resolution and upsampled by
nearest neighbour, so label boundaries are 8-pixel staircases), the timing of `dense_crf` on it and
the before/after picture. numpy and Pillow only: no torch.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import _native, samples
from .checks import check_iterations, check_threads
from .crf import dense_crf
from .errors import InvalidArgumentError
from .files import named_path, write_png_whole
from .inputs import load_image

__all__ = ["run", "OUTPUT_NAME"]

OUTPUT_NAME = "before_after.png"

_SEED = 0
_CLUSTERS = 6
_KMEANS_STEPS = 8
_DOWNSAMPLE = 8  # the unary lives on an (H/8, W/8) grid, like a semantic network's output stride
_TEMPERATURE = 0.5  # softmax temperature, in units of the median pixel-to-centre distance
_REPEATS = 3

# Fixed label colours (RGB), one per colour cluster; clusters are ordered dark to bright.
_PALETTE = np.array(
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [23, 190, 207]],
    dtype=np.uint8,
)


def _load_image(image: str | Path | None) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 RGB and a display name; None means the shipped coffee photo."""
    if image is None:
        return samples.load("coffee"), "coffee (shipped sample)"
    return load_image(image), str(image)  # the SDK's refusals: no path, 16-bit and float files, unreadable ones


def _downsample(photo: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (ceil(H/f), ceil(W/f), 3) float64 box-filtered colours."""
    from PIL import Image

    height, width = photo.shape[:2]
    size = (-(-width // factor), -(-height // factor))
    return np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BOX), dtype=np.float64)


def _kmeans(colours: np.ndarray, clusters: int, steps: int, seed: int) -> np.ndarray:
    """A few Lloyd steps on (N, 3) colours; returns (clusters, 3) centres sorted dark to bright."""
    rng = np.random.default_rng(seed)
    centres = colours[rng.choice(len(colours), size=clusters, replace=False)]
    for _ in range(steps):
        nearest = np.argmin(((colours[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)  # (N,)
        for k in range(clusters):
            members = colours[nearest == k]
            if len(members):
                centres[k] = members.mean(axis=0)
    return centres[np.argsort(centres.sum(axis=1), kind="stable")]


def _poor_unary(photo: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 photo -> float32 (L, H, W) logits that are right in the middle of regions and
    blocky at their boundaries: softmax of negative colour distances on the coarse grid, upsampled
    by nearest neighbour."""
    height, width = photo.shape[:2]
    coarse = _downsample(photo, _DOWNSAMPLE)  # (h, w, 3)
    colours = coarse.reshape(-1, 3)
    centres = _kmeans(colours, min(_CLUSTERS, len(colours)), _KMEANS_STEPS, _SEED)  # (L, 3)
    distance = np.sqrt(((colours[:, None, :] - centres[None]) ** 2).sum(-1))  # (h*w, L)
    scale = _TEMPERATURE * max(float(np.median(distance.min(axis=1))), 1.0)
    logits = (-distance / scale).T.reshape(len(centres), *coarse.shape[:2])  # (L, h, w)
    blocky = logits.repeat(_DOWNSAMPLE, axis=1).repeat(_DOWNSAMPLE, axis=2)  # (L, >=H, >=W)
    return np.ascontiguousarray(blocky[:, :height, :width], dtype=np.float32)


def _picture(photo: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(H, 3W, 3) uint8: photo | labels before | labels after, side by side."""
    return np.concatenate([photo, _PALETTE[before], _PALETTE[after]], axis=1)


def run(
    out_dir: str | Path,
    image: str | Path | None = None,
    iterations: int = 5,
    threads: int | None = None,
) -> dict:
    """Label a photo with a poor colour model, clean it up with `dense_crf` and save the comparison.

    Args:
        out_dir: folder to write OUTPUT_NAME into; created if missing.
        image: path of any image Pillow reads (converted to RGB), or None for the shipped 500×375
            coffee photo.
        iterations: mean-field iterations T >= 0 (densecrf's default kernels: spatial θγ=3, w=3;
            bilateral θα=80, θβ=13, w=10).
        threads: None for every core, or a positive count.

    Returns:
        dict with "output" (Path of the PNG: photo | argmax before | argmax after, (H, 3W) pixels),
        "image" (its display name), "width", "height", "labels", "iterations", "threads" (the count
        actually used), "best_ms" (fastest of "runs" calls to dense_crf, lattice builds included) and
        "changed" (fraction of pixels whose label the CRF changed).

    Deterministic: the same photo gives the same picture on any machine and thread count.
    """
    iterations = check_iterations(iterations)
    n_threads = check_threads(threads)
    photo, name = _load_image(image)
    out = named_path(out_dir, "out_dir")
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"out_dir {str(out)!r} exists and is not a folder")

    unary = _poor_unary(photo)  # (L, H, W)
    timings = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        q = dense_crf(unary, photo, iterations=iterations, threads=threads)
        timings.append(time.perf_counter() - start)

    out.mkdir(parents=True, exist_ok=True)
    before, after = unary.argmax(axis=0), q.argmax(axis=0)  # (H, W) each
    output = out / OUTPUT_NAME
    write_png_whole(output, _picture(photo, before, after))
    return {
        "output": output,
        "image": name,
        "width": photo.shape[1],
        "height": photo.shape[0],
        "labels": unary.shape[0],
        "iterations": iterations,
        "threads": min(n_threads or _native.max_threads(), _native.max_threads()),  # the kernels cap it so
        "best_ms": 1000.0 * min(timings),
        "runs": _REPEATS,
        "changed": float((before != after).mean()),
    }
