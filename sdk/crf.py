"""The public numpy dense CRF: a fast drop-in for pydensecrf on the native kernel library.

Owns the user-facing checks of `dense_crf` (every bad input is a ValueError naming the argument)
and the translation of its densecrf-style parameters into a native `Problem`. The maths and the
lattice are described in docs/crf.md; the readable PyTorch definition is dynseg.trainer.crf.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from . import _native
from .errors import InvalidArgumentError

Normalization = Literal["after", "symmetric"]

__all__ = ["dense_crf", "gaussian_kernels"]


def _number(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise InvalidArgumentError(f"{name} must be {'a positive' if positive else 'a'} finite number, got {value!r}")
    return value


def gaussian_kernels(
    spatial: tuple[float, float] | None, bilateral: tuple[float, float, float] | None
) -> list[tuple[float, float, float]]:
    """Checks densecrf-style kernel parameters and returns (theta_xy, theta_color, weight) per kernel,
    spatial first (theta_color = 0), then bilateral. Shared by the numpy and torch front ends."""
    kernels = []
    if spatial is not None:
        if not isinstance(spatial, (tuple, list)) or len(spatial) != 2:
            raise InvalidArgumentError(f"spatial must be (theta, weight) or None, got {spatial!r}")
        kernels.append((_number("spatial theta", spatial[0], positive=True), 0.0,
                        _number("spatial weight", spatial[1], positive=False)))
    if bilateral is not None:
        if not isinstance(bilateral, (tuple, list)) or len(bilateral) != 3:
            raise InvalidArgumentError(f"bilateral must be (theta_xy, theta_rgb, weight) or None, got {bilateral!r}")
        kernels.append((_number("bilateral theta_xy", bilateral[0], positive=True),
                        _number("bilateral theta_rgb", bilateral[1], positive=True),
                        _number("bilateral weight", bilateral[2], positive=False)))
    return kernels


def check_iterations(iterations: object) -> int:
    if isinstance(iterations, (bool, np.bool_)) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise InvalidArgumentError(f"iterations must be a non-negative int, got {iterations!r}")
    if iterations > 2**31 - 1:
        raise InvalidArgumentError(f"iterations must fit in 32 bits, got {iterations}")
    return int(iterations)


def check_normalization(normalization: object) -> str:
    if normalization not in _native.NORMALIZATION:
        raise InvalidArgumentError(f"normalization must be 'after' or 'symmetric', got {normalization!r}")
    return str(normalization)


def check_threads(threads: object) -> int:
    """threads=None means every core (0 for the native library)."""
    if threads is None:
        return 0
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InvalidArgumentError(f"threads must be None or a positive int, got {threads!r}")
    return int(threads)


def _check_unary(unary: object) -> np.ndarray:
    if not isinstance(unary, np.ndarray):
        raise InvalidArgumentError(f"unary must be a numpy array, got {type(unary).__name__}")
    if unary.dtype != np.float32:
        raise InvalidArgumentError(f"unary must be float32 logits, got dtype {unary.dtype}")
    if unary.ndim != 3:
        raise InvalidArgumentError(f"unary must have shape (L, H, W), got shape {unary.shape}")
    if 0 in unary.shape:
        raise InvalidArgumentError(f"unary must have L, H, W >= 1, got shape {unary.shape}")
    # finiteness is checked by the native library, which scans the values anyway
    return np.ascontiguousarray(unary)


def _check_image(image: object, height: int, width: int, needed: bool) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, the native library's planar layout."""
    if image is None:
        if needed:
            raise InvalidArgumentError("image must be given when bilateral is not None")
        return None
    if not isinstance(image, np.ndarray):
        raise InvalidArgumentError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidArgumentError(f"image must be uint8 RGB, got dtype {image.dtype}")
    if image.shape != (height, width, 3):
        raise InvalidArgumentError(
            f"image must have shape (H, W, 3) = ({height}, {width}, 3) to match unary, got {image.shape}"
        )
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def dense_crf(
    unary: np.ndarray,
    image: np.ndarray | None,
    *,
    iterations: int = 5,
    spatial: tuple[float, float] | None = (3.0, 3.0),
    bilateral: tuple[float, float, float] | None = (80.0, 13.0, 10.0),
    normalization: Normalization = "after",
    device: Literal["cpu", "cuda"] = "cpu",
    threads: int | None = None,
) -> np.ndarray:
    """Mean-field inference of a fully connected CRF with Gaussian Potts kernels (densecrf).

    Args:
        unary: float32 (L, H, W) logits, L >= 1; Q^0 = softmax over L. pydensecrf's unary energy is
            the negative of this.
        image: uint8 (H, W, 3) RGB, or None when `bilateral` is None.
        iterations: mean-field updates T >= 0; 0 returns softmax(unary).
        spatial: (theta_gamma, weight) of the kernel over features (x/theta, y/theta), x = column,
            or None. A positive weight rewards agreeing labels (pydensecrf's `compat`).
        bilateral: (theta_alpha, theta_beta, weight) of the kernel over
            (x/theta_alpha, y/theta_alpha, r/theta_beta, g/theta_beta, b/theta_beta), colour in 0..255,
            or None.
        normalization: "after" (K(Q)/K(1), CRF-as-RNN; pydensecrf's NORMALIZE_AFTER) or "symmetric"
            (pydensecrf's default NORMALIZE_SYMMETRIC).
        device: "cpu". ("cuda" arrives with the CUDA kernels.)
        threads: None for every core; 1 forces one thread. Results are identical for any count.

    Returns:
        Q: float32 (L, H, W) label probabilities after `iterations` updates.

    Raises:
        ValueError (InvalidArgumentError): naming the argument and the problem.
    """
    unary = _check_unary(unary)
    labels, height, width = unary.shape
    iterations = check_iterations(iterations)
    normalization = check_normalization(normalization)
    n_threads = check_threads(threads)
    kernels = gaussian_kernels(spatial, bilateral)
    planar_image = _check_image(image, height, width, needed=bilateral is not None)
    if device != "cpu":
        if device == "cuda":
            raise InvalidArgumentError("device='cuda' needs the CUDA kernels, which this build of dynseg lacks")
        raise InvalidArgumentError(f"device must be 'cpu' or 'cuda', got {device!r}")

    problem = _native.Problem(
        labels, height, width, planar_image,
        [_native.Kernel(theta_xy, theta_color, np.array([weight], dtype=np.float32))
         for theta_xy, theta_color, weight in kernels],
        compat=None,
        normalization=normalization,
        iterations=iterations,
        output=_native.OUTPUT_PROBABILITIES,
        threads=n_threads,
    )
    return problem.forward(unary)
