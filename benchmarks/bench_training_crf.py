"""The semantic CRF's training step on the CPU: forward and backward through the detection potential.

Training runs the semantic CRF with its detection potential as one native call each way
(`semantic_mean_field`: the kernel library builds each lattice once and differentiates the loop itself).
The comparison is the same loop written out (`semantic_mean_field_reference`: one native mean-field
iteration per call, the detection term in torch, autograd between them), which is how training ran
before the library had the potential's backward: it builds the lattices once per iteration each way.
Both compute the same values and gradients (tests/plugins/test_detection_potential.py).

Two scenes: the quickstart's (96×120, 4 classes + background, 4 detections) and a PASCAL-sized one
(500×375, 21 labels, 10 detections), 5 iterations, matrix kernel weights and a full compatibility as
the model learns them. Each time is the best of --repeats interleaved runs of forward plus backward.

    python benchmarks/bench_training_crf.py [--repeats 10]

Prints the machine and a markdown table with the ratio measured here.
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import torch

from bench_crf import interleaved_best_ms, smooth_unary
from dynseg.trainer.model.semantic_crf import SemanticCRFConfig, semantic_mean_field, semantic_mean_field_reference

SCENES = {"quickstart 96×120, L 5, D 4": (5, 96, 120, 4), "PASCAL 500×375, L 21, D 10": (21, 375, 500, 10)}


def training_step(function, labels: int, height: int, width: int, detections: int):
    """forward + backward of `function` on one seeded scene, as a call that returns the unary's gradient."""
    rng = np.random.default_rng(0)
    unary = torch.from_numpy(3.0 * smooth_unary(labels, height, width))
    image = torch.from_numpy(rng.uniform(0, 255, (3, height, width)).astype(np.float32))
    x1, y1 = rng.integers(0, width // 2, detections), rng.integers(0, height // 2, detections)
    boxes = torch.tensor(np.stack([x1, y1, x1 + width // 3, y1 + height // 3], 1), dtype=torch.float32)
    classes = torch.from_numpy(rng.integers(1, labels, detections))
    scores = torch.from_numpy(rng.uniform(0.3, 1.0, detections).astype(np.float32))
    spatial, bilateral = torch.eye(labels) * 3.0, torch.eye(labels) * 5.0
    compat = -torch.eye(labels) + 0.01
    upstream = torch.from_numpy(rng.normal(0, 1, (labels, height, width)).astype(np.float32))

    def step() -> np.ndarray:
        leaves = [t.clone().requires_grad_() for t in (unary, spatial, bilateral, compat, torch.tensor(1.0),
                                                        torch.tensor(1.0))]
        logits, recalibrated = function(leaves[0], image, boxes, classes, scores, spatial_weight=leaves[1],
                                        bilateral_weight=leaves[2], compatibility=leaves[3], detection_x=leaves[4],
                                        detection_y=leaves[5], config=SemanticCRFConfig(iterations=5))
        ((logits * upstream).sum() + recalibrated.sum()).backward()
        return leaves[0].grad.numpy()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}")
    print("| scene | one call each way (ms) | one call per iteration (ms) | ratio | unary gradients apart |")
    print("| --- | --- | --- | --- | --- |")
    for name, shape in SCENES.items():
        (fused, fused_grad), (loop, loop_grad) = interleaved_best_ms(
            [(training_step(semantic_mean_field, *shape), args.repeats),
             (training_step(semantic_mean_field_reference, *shape), args.repeats)])
        apart = float(np.abs(fused_grad - loop_grad).max() / np.abs(loop_grad).max())  # relative to the largest
        print(f"| {name} | {fused:.1f} | {loop:.1f} | {loop / fused:.2f}× | {apart:.1e} |", flush=True)


if __name__ == "__main__":
    main()
