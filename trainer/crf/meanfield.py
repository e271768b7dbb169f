"""Mean-field inference of a dense CRF with Gaussian pairwise kernels: the readable PyTorch reference.

This module owns the CRF-as-RNN update (docs/algorithm.md §3) over lattices from `lattice.py`:

    Q = softmax(L_prev);  m = Σ_k W_k · K̃_k(Q);  L = U − μ·m

and `dense_crf_reference`, the torch-level counterpart of the public numpy `dense_crf` (spatial and bilateral
Potts kernels, pydensecrf's sign convention). Everything is plain autograd: gradients flow to the
unary, every kernel weight and the compatibility.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

from dynseg.sdk.checks import Normalization, check_iterations, check_normalization
from dynseg.sdk.crf import check_image_shape, gaussian_kernels
from dynseg.sdk.errors import InvalidArgumentError

from .lattice import PermutohedralLattice, gaussian_features

__all__ = ["mean_field_reference", "dense_crf_reference"]

Weight = Union[float, Tensor]


def _norm_factor(lattice: PermutohedralLattice, normalization: str, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """Per-pixel normalisation factor (N, 1) from n = K(1).

    densecrf computes 1/(n + 1e-20) (or its square root) in double and stores float; doing the same
    keeps float32 parity and avoids the 1e-20 vanishing in float32 arithmetic.
    """
    ones = torch.ones(lattice.num_points, 1, dtype=dtype, device=device)
    with torch.no_grad():
        n = lattice.filter(ones).to(torch.float64)
    if normalization == "after":
        factor = 1.0 / (n + 1e-20)
    else:
        factor = 1.0 / torch.sqrt(n + 1e-20)
    return factor.to(dtype)


def _check_unary(unary: object) -> None:
    if not isinstance(unary, Tensor):
        raise InvalidArgumentError(f"unary must be a torch.Tensor, got {type(unary).__name__}")
    if unary.dim() != 3:
        raise InvalidArgumentError(f"unary must have shape (L, H, W), got {tuple(unary.shape)}")
    if min(unary.shape) == 0:
        raise InvalidArgumentError(f"unary must have L, H, W >= 1, got shape {tuple(unary.shape)}")
    if not unary.is_floating_point():
        raise InvalidArgumentError(f"unary must be a floating-point tensor, got {unary.dtype}")
    if not bool(torch.isfinite(unary).all()):
        raise InvalidArgumentError("unary must be finite (found NaN or inf)")


def mean_field_reference(
    unary: Tensor,
    kernels: Sequence[tuple[PermutohedralLattice, Weight]],
    *,
    compat: Tensor | None = None,
    normalization: Normalization = "after",
    iterations: int = 5,
) -> Tensor:
    """Run `iterations` mean-field updates and return the final logits.

    Args:
        unary: (L, H, W) unary logits U (higher = more likely), floating point, finite.
        kernels: sequence of (lattice, weight). Each lattice is built from H·W points in row-major
            pixel order. weight is a float or 0-d tensor (label-agnostic: W·K̃(Q)) or an (L, L)
            tensor (m_a = Σ_b W[a, b]·K̃(Q)_b). Terms are added in the order given.
        compat: the label compatibility μ. None: Potts with μ = −I, i.e. L = U + m (a label's logit
            grows with the filtered probability of the same label). (L,) tensor: diagonal μ.
            (L, L) tensor: full μ, L_a = U_a − Σ_b μ[a, b]·m_b.
        normalization: "after": K̃(Q) = K(Q)/(n + 1e-20); "symmetric": K̃(Q) = s·K(s·Q) with
            s = (n + 1e-20)^-½; n = K(1), computed once per lattice.
        iterations: T ≥ 0; 0 returns the unary unchanged.

    Returns:
        (L, H, W) logits L^T of the last iteration, in the unary's dtype; softmax over dim 0 gives Q^T.

    Differentiable with respect to unary, every tensor weight and compat.
    """
    _check_unary(unary)
    check_iterations(iterations)
    check_normalization(normalization)
    n_labels, height, width = unary.shape
    n_points = height * width
    dtype, device = unary.dtype, unary.device

    prepared = []
    for index, item in enumerate(kernels):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise InvalidArgumentError(f"kernels[{index}] must be a (lattice, weight) pair, got {item!r}")
        lattice, weight = item
        if not isinstance(lattice, PermutohedralLattice):
            raise InvalidArgumentError(
                f"kernels[{index}][0] must be a PermutohedralLattice, got {type(lattice).__name__}")
        if lattice.num_points != n_points:
            raise InvalidArgumentError(
                f"kernels[{index}] lattice has {lattice.num_points} points but unary has H*W = {n_points}"
            )
        if isinstance(weight, Tensor):
            if weight.dim() not in (0, 2) or (weight.dim() == 2 and tuple(weight.shape) != (n_labels, n_labels)):
                raise InvalidArgumentError(
                    f"kernels[{index}] weight must be a scalar or ({n_labels}, {n_labels}), "
                    f"got {tuple(weight.shape)}"
                )
            if not torch.isfinite(weight).all():
                raise InvalidArgumentError(f"kernels[{index}] weight holds a non-finite value")
            weight = weight.to(dtype=dtype, device=device)  # logits in the unary's dtype; differentiable
        elif not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise InvalidArgumentError(f"kernels[{index}] weight must be a finite float or a tensor, got {weight!r}")
        prepared.append((lattice, weight, _norm_factor(lattice, normalization, dtype, device)))

    if compat is not None:
        if not isinstance(compat, Tensor):
            raise InvalidArgumentError(f"compat must be None or a torch.Tensor, got {type(compat).__name__}")
        if tuple(compat.shape) not in ((n_labels,), (n_labels, n_labels)):
            raise InvalidArgumentError(
                f"compat must be None, ({n_labels},) or ({n_labels}, {n_labels}), got {tuple(compat.shape)}"
            )
        if not torch.isfinite(compat).all():
            raise InvalidArgumentError("compat holds a non-finite value")
        compat = compat.to(dtype=dtype, device=device)

    unary_nl = unary.reshape(n_labels, n_points).t()  # (N, L), labels contiguous per pixel in spirit
    logits = unary_nl
    for _ in range(iterations):
        q = torch.softmax(logits, dim=1)  # (N, L)
        terms = []
        for lattice, weight, factor in prepared:
            if normalization == "after":
                filtered = lattice.filter(q) * factor
            else:
                filtered = lattice.filter(q * factor) * factor
            if isinstance(weight, Tensor) and weight.dim() == 2:
                terms.append(filtered @ weight.t())  # m_a = Σ_b W[a, b] K̃(Q)_b
            else:
                terms.append(filtered * weight)
        if compat is None:
            # Potts: add each term to U in order, matching densecrf's accumulation.
            logits = unary_nl
            for term in terms:
                logits = logits + term
        else:
            message = terms[0] if terms else torch.zeros_like(unary_nl)
            for term in terms[1:]:
                message = message + term
            if compat.dim() == 1:
                logits = unary_nl - message * compat
            else:
                logits = unary_nl - message @ compat.t()
    return logits.t().reshape(n_labels, height, width)


def dense_crf_reference(
    unary: Tensor,
    image: Tensor | None,
    *,
    iterations: int = 5,
    spatial: tuple[float, float] | None = (3.0, 3.0),
    bilateral: tuple[float, float, float] | None = (80.0, 13.0, 10.0),
    normalization: Normalization = "after",
) -> Tensor:
    """Dense CRF with Potts Gaussian kernels (densecrf / pydensecrf semantics), returning Q.

    Args:
        unary: (L, H, W) unary logits (pydensecrf's −energy), floating point, finite.
        image: (H, W, 3) uint8 RGB image (0..255), or None when `bilateral` is None.
        iterations: T ≥ 0 mean-field iterations.
        spatial: (θγ, weight) of the kernel over (x/θγ, y/θγ), or None for no spatial kernel.
        bilateral: (θα, θβ, weight) of the kernel over (x/θα, y/θα, r/θβ, g/θβ, b/θβ), or None.
        normalization: "after" (CRF-as-RNN) or "symmetric" (pydensecrf's default).

    Returns:
        (L, H, W) Q = softmax over labels of the final logits, in the unary's dtype. A positive weight
        rewards neighbouring pixels that agree (pydensecrf's `compat=w`). iterations=0 returns
        softmax(unary). The spatial kernel is added before the bilateral one, as in densecrf when
        added in that order.

    Raises:
        InvalidArgumentError (a ValueError): naming the offending argument (shape, empty axis,
            non-finite unary, θ ≤ 0, negative iterations, unknown normalization, missing image).
    """
    _check_unary(unary)
    check_iterations(iterations)
    check_normalization(normalization)
    n_labels, height, width = unary.shape

    if image is not None:
        if not isinstance(image, Tensor):
            raise InvalidArgumentError(f"image must be a torch.Tensor or None, got {type(image).__name__}")
        check_image_shape(tuple(image.shape), height, width)
        if image.dtype != torch.uint8:
            raise InvalidArgumentError(f"image must be uint8, got {image.dtype}")

    kernels: list[tuple[PermutohedralLattice, float]] = []
    # spatial first, as the native library orders them
    for theta_xy, theta_color, weight in gaussian_kernels(spatial, bilateral, has_image=image is not None):
        colour = image if theta_color else None
        features = gaussian_features(colour, height, width, theta_xy, theta_color or None).to(unary.device)
        kernels.append((PermutohedralLattice(features), weight))

    logits = mean_field_reference(unary, kernels, normalization=normalization, iterations=iterations)
    if not bool(torch.isfinite(logits).all()):  # refused as the native kernels refuse it, not returned as NaN
        raise InvalidArgumentError("the logits overflowed float32 during mean field: the inputs are finite but too "
                                   "large together; scale down the unary or the kernel weights")
    return torch.softmax(logits, dim=0)
