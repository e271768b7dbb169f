"""How far the native backward's unary gradient is from float64, beside PyTorch's float32 autograd.

Random small CRFs (1×8 to 6×8 pixels, 2–5 labels, random thetas, scalar or matrix weights, Potts,
diagonal or full compatibility, both normalisations). Each case runs three ways on the same
lattices (the reference's lattice, built from float32 features, whose weights the native kernel
shares): the native float32 backward, `mean_field_reference` in float32 under autograd, and the
same in float64, the oracle. The error of a gradient g is max|g − g64| / max|g64|, the measure of
tests/plugins/test_native_library.py.

    python benchmarks/gradient_precision.py [--cases 6000] [--seed 0]

Prints, per iteration count, the median, 99th percentile and worst error of both float32 gradients,
and the share of cases above 1e-5. docs/crf.md ("Precision") reads the result.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from dynseg.sdk import _native
from dynseg.trainer.crf import PermutohedralLattice, gaussian_features, mean_field_reference

SHAPES = ((1, 8), (1, 12), (2, 7), (3, 5), (4, 4), (2, 12), (5, 6), (6, 8))
MAX_ITERATIONS = 6


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.float32(math.exp(rng.uniform(math.log(low), math.log(high)))))


def random_case(rng: np.random.Generator) -> dict:
    """One CRF: its size, kernels (θxy, θcolour or 0, weight), compatibility and inputs."""
    height, width = SHAPES[rng.integers(len(SHAPES))]
    labels = int(rng.integers(2, 6))
    kinds = (["spatial"], ["bilateral"], ["spatial", "bilateral"])[rng.integers(3)]
    matrix_weights = rng.random() < 0.4
    kernels = []
    for kind in kinds:
        theta_xy = log_uniform(rng, 0.5, 20.0 if kind == "spatial" else 80.0)
        theta_color = log_uniform(rng, 2.0, 80.0) if kind == "bilateral" else 0.0
        weight = (rng.standard_normal((labels, labels)) * rng.uniform(0.5, 5)).astype(np.float32) \
            if matrix_weights else np.float32(rng.uniform(-2, 10))
        kernels.append((theta_xy, theta_color, weight))
    compat = (None, None, -rng.uniform(0.5, 1.5, labels), rng.standard_normal((labels, labels)))[rng.integers(4)]
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    scale = math.exp(rng.uniform(math.log(0.3), math.log(10.0)))
    return dict(
        height=height, width=width, labels=labels, kernels=kernels, image=image,
        compat=None if compat is None else compat.astype(np.float32),
        normalization=("after", "symmetric")[rng.integers(2)], iterations=int(rng.integers(1, MAX_ITERATIONS + 1)),
        unary=(scale * rng.standard_normal((labels, height, width))).astype(np.float32),
        grad_logits=rng.standard_normal((labels, height, width)).astype(np.float32))


def native_gradient(case: dict) -> np.ndarray:
    problem = _native.Problem(
        case["labels"], case["height"], case["width"],
        np.ascontiguousarray(case["image"].transpose(2, 0, 1), dtype=np.float32),
        [_native.Kernel(theta_xy, theta_color, np.asarray(weight, np.float32).reshape(-1) if np.ndim(weight) == 0
                        else weight) for theta_xy, theta_color, weight in case["kernels"]],
        compat=case["compat"], normalization=case["normalization"], iterations=case["iterations"],
        output=_native.Output.LOGITS, threads=1)
    grad_unary, _, _ = problem.backward(case["unary"], case["grad_logits"], [False] * len(case["kernels"]), False)
    return grad_unary.astype(np.float64)


def torch_gradient(case: dict, dtype: torch.dtype) -> np.ndarray:
    unary = torch.from_numpy(case["unary"]).to(dtype).requires_grad_()
    kernels = []
    for theta_xy, theta_color, weight in case["kernels"]:
        colour = torch.from_numpy(case["image"]) if theta_color else None
        features = gaussian_features(colour, case["height"], case["width"], theta_xy, theta_color or None)
        kernels.append((PermutohedralLattice(features), torch.as_tensor(weight).to(dtype)))
    compat = None if case["compat"] is None else torch.from_numpy(case["compat"]).to(dtype)
    logits = mean_field_reference(unary, kernels, compat=compat, normalization=case["normalization"],
                                  iterations=case["iterations"])
    (logits * torch.from_numpy(case["grad_logits"]).to(dtype)).sum().backward()
    assert unary.grad is not None
    return unary.grad.double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.cases < 1:
        parser.error(f"--cases must be at least 1, got {args.cases}")
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    errors: dict[int, list[tuple[float, float]]] = {t: [] for t in range(1, MAX_ITERATIONS + 1)}
    for _ in range(args.cases):
        case = random_case(rng)
        exact = torch_gradient(case, torch.float64)
        scale = max(float(np.abs(exact).max()), 1e-300)
        native = float(np.abs(native_gradient(case) - exact).max()) / scale
        reference = float(np.abs(torch_gradient(case, torch.float32) - exact).max()) / scale
        errors[case["iterations"]].append((native, reference))
    print(f"{args.cases} cases, seed {args.seed}; error = max|g - g64| / max|g64| of the unary gradient\n")
    print("| iterations | cases | native median | native p99 | native max | native > 1e-5 "
          "| torch float32 p99 | torch float32 max | torch float32 > 1e-5 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for iterations, pairs in errors.items():
        if not pairs:
            continue
        native, reference = np.array(pairs).T
        print(f"| {iterations} | {len(pairs)} | {np.median(native):.1e} | {np.quantile(native, 0.99):.1e} "
              f"| {native.max():.1e} | {np.mean(native > 1e-5):.1%} | {np.quantile(reference, 0.99):.1e} "
              f"| {reference.max():.1e} | {np.mean(reference > 1e-5):.1%} |")


if __name__ == "__main__":
    main()
