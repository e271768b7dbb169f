"""A fixed set of CRF problems through dynseg.sdk, every output written to one .npz.

    python tests/plugins/same_bits_cases.py OUT.npz

tests/plugins/test_aarch64.py runs it on this machine and, under qemu-aarch64, against the library
cross-built for 64-bit ARM (Jetson, Grace), and requires the same bits: the kernels round the same
way on every instruction set (no fused multiply-adds, fixed reduction orders, the softmax's exp their
own; the detection potential's expf is glibc's). It needs numpy and dynseg.sdk alone.
"""

from __future__ import annotations

import sys

import numpy as np

from dynseg.sdk import _native, dense_crf


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: a few flat regions with soft edges and some noise, like a photo at small scale."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(4):
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(5, 0.6 * max(height, width))
        inside = 1.0 / (1.0 + np.exp((np.hypot(y - cy, x - cx) - radius) / 2.0))
        image += inside[..., None] * rng.uniform(0, 255, 3).astype(np.float32)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def numpy_api_cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """dense_crf with both normalisations, label counts on and off the vector width, 1 and 2 threads."""
    out: dict[str, np.ndarray] = {}
    for labels, height, width in ((2, 37, 53), (5, 48, 64), (21, 31, 45)):
        image = smooth_image(rng, height, width)
        unary = rng.normal(0, 2, (labels, height, width)).astype(np.float32)
        for normalization in ("after", "symmetric"):
            for threads in (1, 2):
                q = dense_crf(unary, image, iterations=5, normalization=normalization, threads=threads)
                out[f"dense_crf_L{labels}_{normalization}_{threads}threads"] = q
    return out


def detection_potential_case(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The semantic CRF as training runs it: matrix weights, a full compatibility, the detection
    potential, forward and backward."""
    labels, height, width, count = 6, 29, 41, 3
    image = np.ascontiguousarray(smooth_image(rng, height, width).transpose(2, 0, 1), dtype=np.float32)
    unary = rng.normal(0, 2, (labels, height, width)).astype(np.float32)
    spatial = (3.0 * np.eye(labels) + rng.uniform(0, 0.3, (labels, labels))).astype(np.float32)
    bilateral = (5.0 * np.eye(labels) + rng.uniform(0, 0.3, (labels, labels))).astype(np.float32)
    compat = (-np.eye(labels) + rng.uniform(-0.1, 0.1, (labels, labels))).astype(np.float32)
    boxes = np.array([[2, 3, 30, 20], [0, 0, width - 1, height - 1], [10, 12, 11, 28]], np.float32)
    recalibrated = np.empty(count, np.float32)
    grad_x, grad_y = np.empty(1, np.float32), np.empty(1, np.float32)
    potential = _native.DetectionPotential(
        boxes=boxes, labels=np.array([1, 3, 5], np.int64), scores=np.array([0.9, 0.4, 0.7], np.float32),
        detection_x=np.array([1.3], np.float32), detection_y=np.array([0.7], np.float32), score_ceiling=1.0,
        epsilon=1e-4, recalibrated=recalibrated, grad_recalibrated=rng.normal(0, 1, count).astype(np.float32),
        grad_detection_x=grad_x, grad_detection_y=grad_y)
    problem = _native.Problem(
        labels, height, width, image, [_native.Kernel(3.0, 0.0, spatial), _native.Kernel(20.0, 13.0, bilateral)],
        compat=compat, normalization="after", iterations=4, output=_native.Output.LOGITS, threads=2,
        detection_potential=potential)
    logits = problem.forward(unary)
    forward_recalibrated = recalibrated.copy()
    grad_logits = rng.normal(0, 1, unary.shape).astype(np.float32)
    grad_unary, (grad_spatial, grad_bilateral), grad_compat = problem.backward(unary, grad_logits, [True, True], True)
    return {"potential_logits": logits, "potential_recalibrated": forward_recalibrated,
            "potential_grad_unary": grad_unary, "potential_grad_spatial": grad_spatial,
            "potential_grad_bilateral": grad_bilateral, "potential_grad_compat": grad_compat,
            "potential_grad_detection_x": grad_x, "potential_grad_detection_y": grad_y}


def main(path: str) -> None:
    rng = np.random.default_rng(2026)
    np.savez(path, **numpy_api_cases(rng), **detection_potential_case(rng))


if __name__ == "__main__":
    main(sys.argv[1])
