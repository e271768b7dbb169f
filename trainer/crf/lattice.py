"""Permutohedral-lattice Gaussian filtering: the readable PyTorch reference.

This module owns the lattice (Adams, Baek & Davis 2010) exactly as densecrf builds it: the feature
scaling, the elevation onto the d-dimensional hyperplane of R^(d+1), the enclosing simplex, the
barycentric weights and the vertex keys, then splat → blur → slice. It also owns the pixel features of
the two dense-CRF kernels (`gaussian_features`).

Everything is float-for-float the same recipe as densecrf (the operation order included), so that the
vertices and barycentric weights agree bit for bit in float32 and a mean-field CRF built on this
lattice matches pydensecrf to ~1e-6. The native kernels of the project are tested against this file.

Layouts: features are (N, d) with one row per pixel, pixels in row-major order (n = y·W + x); values
are (N, C) with the channels (labels) contiguous per pixel; lattice values are (M, C), one row per
lattice vertex.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from dynseg.sdk.errors import InvalidArgumentError

__all__ = ["PermutohedralLattice", "gaussian_features"]


class PermutohedralLattice:
    """A permutohedral lattice built once from pixel features and reused for any values.

    The filter approximates ``out_i = Σ_j exp(-|f_i - f_j|² / 2) · in_j`` (self-pair included), so the
    features must already be divided by the kernel's standard deviations (see `gaussian_features`).

    Args:
        features: (N, d) float32 or float64, one row per point; any device. All lattice arithmetic runs
            in this dtype; float32 reproduces densecrf's lattice exactly.

    Raises:
        InvalidArgumentError (a ValueError): features are not a finite 2-D floating tensor with N ≥ 1
            and d ≥ 1, or the vertex keys span more than 63 bits (feature range too large for the lattice).

    The lattice carries no gradient; `splat`, `blur`, `slice` and `filter` are differentiable with
    respect to the values through ordinary autograd.
    """

    def __init__(self, features: Tensor) -> None:
        if not isinstance(features, Tensor):
            raise InvalidArgumentError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise InvalidArgumentError(f"features must have shape (N, d) with N, d >= 1, got {tuple(features.shape)}")
        if features.dtype not in (torch.float32, torch.float64):
            raise InvalidArgumentError(f"features must be float32 or float64, got {features.dtype}")
        if not bool(torch.isfinite(features).all()):
            raise InvalidArgumentError("features must be finite")

        with torch.no_grad():
            self._build(features.detach())

    # ------------------------------------------------------------------ construction

    def _build(self, features: Tensor) -> None:
        n_points, d = features.shape
        dtype, device = features.dtype, features.device
        self._n_points = n_points
        self._d = d

        # Constants as densecrf rounds them: computed in double, stored as float32.
        inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
        scale = [float(np.float32(1.0 / math.sqrt(float((i + 2) * (i + 1))) * inv_std_dev)) for i in range(d)]
        inv_dp1 = torch.tensor(float(np.float32(1.0 / (d + 1))), dtype=dtype, device=device)
        dp1 = float(d + 1)
        scale_t = torch.tensor(scale, dtype=dtype, device=device)

        # Elevation onto the hyperplane Σ = 0 of R^(d+1), same float operation order as densecrf.
        cf_all = features * scale_t  # (N, d)
        # Elevated coordinates sum up to 2d scaled features and are rounded in float: past 2^22 there
        # are no fraction bits left and the lattice would be meaningless (the native library agrees).
        largest = float(cf_all.abs().max())
        if not largest * 2 * d < 2.0**22:
            raise InvalidArgumentError(
                f"features out of range for the lattice: scaled features reach {largest:g}, beyond what "
                f"float lattice keys resolve (2^22 / {2 * d}); a kernel's theta is too small for this image"
            )
        elevated = []  # coordinates d, d-1, ..., 0
        sm = torch.zeros(n_points, dtype=dtype, device=device)
        for j in range(d, 0, -1):
            cf = cf_all[:, j - 1]
            elevated.append(sm - cf * float(j))
            sm = sm + cf
        elevated.append(sm)
        elevated_t = torch.stack(elevated[::-1], dim=1)  # (N, d+1)

        # Nearest remainder-0 lattice point; torch.round is half-to-even like the SSE build.
        v = torch.round(elevated_t * inv_dp1)
        rem0 = v * dp1  # (N, d+1)
        coord_sum = torch.zeros(n_points, dtype=dtype, device=device)
        for i in range(d + 1):
            coord_sum = coord_sum + v[:, i]

        # Rank of each residual in sorted order; strict "<" so ties go to the later index.
        residual = elevated_t - rem0
        rank = torch.zeros_like(elevated_t)
        for i in range(d):
            for j in range(i + 1, d + 1):
                less = (residual[:, i] < residual[:, j]).to(dtype)
                rank[:, i] += less
                rank[:, j] += 1.0 - less

        # Bring points whose coordinate sum is not 0 back onto the plane by wrapping the ranks.
        rank = rank + coord_sum[:, None]
        shift = torch.where(rank < 0, dp1, 0.0) - torch.where(rank >= dp1, dp1, 0.0)
        rank = rank + shift
        rem0 = rem0 + shift

        # Barycentric weights. Ranks are a permutation of 0..d, so each slot receives one "+" and one
        # "-" contribution and the order of the two does not change the float result.
        rank_i = rank.to(torch.int64)  # (N, d+1)
        pos = d - rank_i
        bary_v = (elevated_t - rem0) * inv_dp1
        bary = torch.zeros(n_points, d + 2, dtype=dtype, device=device)
        bary.scatter_add_(1, pos, bary_v)
        bary.scatter_add_(1, pos + 1, -bary_v)
        bary[:, 0] = bary[:, 0] + (1.0 + bary[:, d + 1])
        weights = bary[:, : d + 1].contiguous()  # (N, d+1), remainder r ↔ column r

        # Vertex keys (first d coordinates; the last is implied by Σ = 0) from the canonical simplex:
        # canonical[r][k] = r if k <= d - r else r - (d + 1).
        rem0_i = rem0[:, :d].to(torch.int64)
        rank_k = rank_i[:, :d]
        keys = torch.stack(
            [rem0_i + torch.where(rank_k <= d - r, r, r - (d + 1)) for r in range(d + 1)], dim=1
        )  # (N, d+1, d)

        # Pack each key into one int64 so that deduplication is a 1-D unique (≈100× faster than
        # unique over rows).
        flat_keys = keys.reshape(-1, d)
        key_min = flat_keys.amin(dim=0)  # (d,)
        key_max = flat_keys.amax(dim=0)
        bits = [max(1, int(span).bit_length()) for span in (key_max - key_min).tolist()]
        if sum(bits) > 63:
            f_min = features.amin(dim=0).tolist()
            f_max = features.amax(dim=0).tolist()
            raise InvalidArgumentError(
                f"features span too large a range for a 64-bit lattice key ({sum(bits)} bits needed): "
                f"per-dimension min {f_min}, max {f_max}"
            )
        shifts = [0] * d
        for k in range(1, d):
            shifts[k] = shifts[k - 1] + bits[k - 1]
        self._key_min = key_min
        self._key_max = key_max
        self._shifts = torch.tensor(shifts, dtype=torch.int64, device=device)

        packed = self._pack(flat_keys)
        unique_keys, inverse = torch.unique(packed, sorted=True, return_inverse=True)
        n_vertices = unique_keys.numel()
        self._n_vertices = n_vertices
        self._vertex_ids = inverse.reshape(n_points, d + 1)  # (N, d+1) int64
        self._weights = weights  # (N, d+1)
        alpha = np.float32(1.0) / np.float32(1.0 + 2.0 ** (-d))
        # densecrf's SSE slice folds alpha into the barycentric weight before multiplying the value.
        self._slice_weights = weights * torch.tensor(float(alpha), dtype=dtype, device=device)

        # Blur neighbours along each of the d+1 lattice axes; index n_vertices is a zero row.
        vertex_keys = self._unpack(unique_keys)  # (M, d)
        neighbours = []
        for j in range(d + 1):
            n1 = vertex_keys - 1
            n2 = vertex_keys + 1
            if j < d:
                n1[:, j] = vertex_keys[:, j] + d
                n2[:, j] = vertex_keys[:, j] - d
            neighbours.append((self._lookup(n1, unique_keys), self._lookup(n2, unique_keys)))
        self._neighbours = neighbours

    def _pack(self, keys: Tensor) -> Tensor:
        return ((keys - self._key_min) << self._shifts).sum(dim=1)

    def _unpack(self, packed: Tensor) -> Tensor:
        masks = []
        for k in range(self._d):
            width = int(self._key_max[k] - self._key_min[k]).bit_length()
            masks.append((1 << max(1, width)) - 1)
        mask_t = torch.tensor(masks, dtype=torch.int64, device=packed.device)
        return ((packed[:, None] >> self._shifts) & mask_t) + self._key_min

    def _lookup(self, keys: Tensor, unique_keys: Tensor) -> Tensor:
        """Vertex id of each key (M', d), or `num_vertices` (the zero row) when absent."""
        in_range = ((keys >= self._key_min) & (keys <= self._key_max)).all(dim=1)
        packed = self._pack(torch.where(in_range[:, None], keys, self._key_min))
        pos = torch.searchsorted(unique_keys, packed).clamp_(max=unique_keys.numel() - 1)
        found = in_range & (unique_keys[pos] == packed)
        return torch.where(found, pos, self._n_vertices)

    # ------------------------------------------------------------------ properties

    @property
    def num_vertices(self) -> int:
        """M, the number of lattice vertices touched by the points."""
        return self._n_vertices

    @property
    def num_points(self) -> int:
        """N, the number of points (pixels) the lattice was built from."""
        return self._n_points

    @property
    def dim(self) -> int:
        """d, the feature dimension."""
        return self._d

    # ------------------------------------------------------------------ filtering

    def _check_values(self, values: Tensor, rows: int, name: str) -> None:
        if not isinstance(values, Tensor):
            raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
        if values.dim() != 2 or values.shape[0] != rows:
            raise InvalidArgumentError(f"{name} must have shape ({rows}, C), got {tuple(values.shape)}")
        if not values.is_floating_point():
            raise InvalidArgumentError(f"{name} must be a floating-point tensor, got {values.dtype}")

    def splat(self, values: Tensor) -> Tensor:
        """Accumulate weight × value onto the enclosing vertices: (N, C) → (M, C).

        Contributions reach each vertex in pixel-major, remainder-minor order, as in densecrf.
        """
        self._check_values(values, self._n_points, "values")
        n_channels = values.shape[1]
        weights = self._weights.to(values.dtype)
        contrib = weights[:, :, None] * values[:, None, :]  # (N, d+1, C)
        index = self._vertex_ids.reshape(-1, 1).expand(-1, n_channels)
        out = values.new_zeros(self._n_vertices, n_channels)
        return out.scatter_add(0, index, contrib.reshape(-1, n_channels))

    def blur(self, lattice_values: Tensor, reverse: bool = False) -> Tensor:
        """Blur along the lattice axes 0..d (d..0 when `reverse`): (M, C) → (M, C).

        Each pass is new = v + 0.5·(v[n1] + v[n2]) with missing neighbours read as 0. The reverse order
        is the exact transpose of the forward blur (each pass is symmetric, their product is not).
        """
        self._check_values(lattice_values, self._n_vertices, "lattice_values")
        v = lattice_values
        axes = range(self._d, -1, -1) if reverse else range(self._d + 1)
        zero_row = v.new_zeros(1, v.shape[1])
        for j in axes:
            padded = torch.cat([v, zero_row], dim=0)  # (M+1, C)
            n1, n2 = self._neighbours[j]
            v = v + 0.5 * (padded.index_select(0, n1) + padded.index_select(0, n2))
        return v

    def slice(self, lattice_values: Tensor) -> Tensor:
        """Interpolate vertex values back at the points, times α = 1/(1+2^-d): (M, C) → (N, C)."""
        self._check_values(lattice_values, self._n_vertices, "lattice_values")
        weights = self._slice_weights.to(lattice_values.dtype)
        out = lattice_values.new_zeros(self._n_points, lattice_values.shape[1])
        for r in range(self._d + 1):
            out = out + weights[:, r : r + 1] * lattice_values.index_select(0, self._vertex_ids[:, r])
        return out

    def filter(self, values: Tensor, transpose: bool = False) -> Tensor:
        """Gaussian-filter values: slice(blur(splat(values), reverse=transpose)), (N, C) → (N, C).

        `transpose=True` (the blur's axes in reverse order) gives the exact transpose of the forward filter (the
        operator a backward pass needs); the two differ by several percent, so one must not stand in for the other.
        """
        return self.slice(self.blur(self.splat(values), reverse=transpose))


def gaussian_features(
    image: Tensor | None,
    height: int,
    width: int,
    theta_xy: float,
    theta_color: float | None,
) -> Tensor:
    """Pixel features of a dense-CRF Gaussian kernel, in densecrf's order and float32 values.

    Args:
        image: (H, W, C) colour image in 0..255 units (uint8 or any real dtype), or None for the
            spatial kernel.
        height, width: H and W; must match the image when one is given.
        theta_xy: positional standard deviation θ in pixels (> 0).
        theta_color: colour standard deviation θβ in 0..255 units (> 0); required with an image and
            ignored without one.

    Returns:
        (H·W, 2) float32 rows (x/θ, y/θ) for the spatial kernel, or (H·W, 2 + C) rows
        (x/θ, y/θ, c0/θβ, c1/θβ, …) for the bilateral kernel; x is the column index, y the row index,
        pixels in row-major order (n = y·W + x). Each entry is a float32 division, as densecrf computes
        it; the feature order matters for exact agreement (the lattice is not permutation-invariant).
    """
    if height <= 0 or width <= 0:
        raise InvalidArgumentError(f"height and width must be positive, got height={height}, width={width}")
    if not (math.isfinite(theta_xy) and theta_xy > 0):
        raise InvalidArgumentError(f"theta_xy must be a positive finite number, got {theta_xy}")
    device = image.device if image is not None else torch.device("cpu")
    theta = torch.tensor(theta_xy, dtype=torch.float32, device=device)
    xs = torch.arange(width, dtype=torch.float32, device=device) / theta
    ys = torch.arange(height, dtype=torch.float32, device=device) / theta
    columns = [xs.repeat(height), ys.repeat_interleave(width)]
    if image is not None:
        if image.dim() != 3 or image.shape[0] != height or image.shape[1] != width:
            raise InvalidArgumentError(f"image must have shape ({height}, {width}, C), got {tuple(image.shape)}")
        if theta_color is None or not (math.isfinite(theta_color) and theta_color > 0):
            raise InvalidArgumentError(f"theta_color must be a positive finite number, got {theta_color}")
        theta_c = torch.tensor(theta_color, dtype=torch.float32, device=device)
        colour = image.reshape(height * width, -1).to(torch.float32) / theta_c  # (N, C)
        columns.extend(colour.unbind(dim=1))
    return torch.stack(columns, dim=1)
