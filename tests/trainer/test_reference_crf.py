"""Tests of the PyTorch reference dense CRF (dynseg.trainer.crf) against pydensecrf and itself."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dynseg.trainer.crf import PermutohedralLattice, dense_crf_reference, gaussian_features, mean_field_reference

PARITY_ATOL = 1e-5


# ---------------------------------------------------------------------------- helpers


def max_q_difference(oracle, image, unary, iterations, spatial, bilateral, normalization) -> float:
    expected = oracle(unary, image, iterations, spatial, bilateral, normalization)
    actual = dense_crf_reference(
        torch.from_numpy(unary),
        torch.from_numpy(image),
        iterations=iterations,
        spatial=spatial,
        bilateral=bilateral,
        normalization=normalization,
    )
    return float(np.abs(actual.numpy() - expected).max())


def random_lattice(n_points: int, dim: int, seed: int, dtype=torch.float64) -> PermutohedralLattice:
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(n_points, dim, generator=generator, dtype=dtype) * 4.0
    return PermutohedralLattice(features)


SPATIAL = (3.0, 3.0)
BILATERAL = (80.0, 13.0, 10.0)
KERNEL_SETS = {
    "spatial": (SPATIAL, None),
    "bilateral": (None, BILATERAL),
    "both": (SPATIAL, BILATERAL),
}


# ---------------------------------------------------------------------------- parity with pydensecrf


@pytest.mark.parametrize("kernel_set", sorted(KERNEL_SETS))
@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("iterations", [1, 5, 10])
@pytest.mark.parametrize("n_labels", [2, 21, 100])
def test_dense_crf_matches_pydensecrf_on_smooth_images(
    n_labels, iterations, normalization, kernel_set, smooth_image, smooth_unary, pydensecrf_q
):
    spatial, bilateral = KERNEL_SETS[kernel_set]
    image, unary = smooth_image(48, 64), smooth_unary(n_labels, 48, 64)
    difference = max_q_difference(pydensecrf_q, image, unary, iterations, spatial, bilateral, normalization)
    assert difference <= PARITY_ATOL


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_dense_crf_matches_pydensecrf_on_a_larger_image(normalization, smooth_image, smooth_unary, pydensecrf_q):
    image, unary = smooth_image(240, 320), smooth_unary(21, 240, 320)
    difference = max_q_difference(pydensecrf_q, image, unary, 5, SPATIAL, BILATERAL, normalization)
    assert difference <= PARITY_ATOL


def test_dense_crf_with_zero_iterations_is_the_softmax_of_the_unary(smooth_image, smooth_unary):
    unary, image = torch.from_numpy(smooth_unary(4, 6, 7)), torch.from_numpy(smooth_image(6, 7))
    q = dense_crf_reference(unary, image, iterations=0)
    torch.testing.assert_close(q, torch.softmax(unary, dim=0), rtol=0, atol=0)


# ---------------------------------------------------------------------------- lattice properties


@pytest.mark.parametrize("dim", [2, 5])
def test_reverse_filter_is_the_exact_transpose_of_the_forward_filter(dim):
    lattice = random_lattice(300, dim, seed=dim)
    generator = torch.Generator().manual_seed(10 + dim)
    x = torch.randn(300, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(300, 3, generator=generator, dtype=torch.float64)
    forward = (lattice.filter(x) * y).sum()
    transposed = (x * lattice.filter(y, transpose=True)).sum()
    assert abs(float(forward - transposed)) <= 1e-10 * abs(float(forward))


@pytest.mark.parametrize("dim", [2, 5])
def test_reverse_filter_differs_noticeably_from_the_forward_filter(dim):
    lattice = random_lattice(300, dim, seed=dim)
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    forward = lattice.filter(x)
    reverse = lattice.filter(x, transpose=True)
    relative = float((forward - reverse).norm() / forward.norm())
    assert relative > 1e-3


def test_filtering_is_linear_and_works_channel_by_channel():
    lattice = random_lattice(200, 3, seed=7)
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    together = lattice.filter(x)
    separately = torch.cat([lattice.filter(x[:, c : c + 1]) for c in range(4)], dim=1)
    torch.testing.assert_close(together, separately, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lattice.filter(2.5 * x), 2.5 * together, rtol=1e-12, atol=1e-12)


def test_filtering_approximates_the_gaussian_it_stands_for():
    # Points on a grid of spacing 0.5 in feature space: the lattice filter of ones should be close
    # (within the permutohedral approximation) to the exact sum of exp(-|f_i - f_j|^2 / 2).
    ys, xs = torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij")
    features = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).double() * 0.5
    lattice = PermutohedralLattice(features)
    approx = lattice.filter(torch.ones(400, 1, dtype=torch.float64))[:, 0]
    exact = torch.exp(-torch.cdist(features, features).pow(2) / 2).sum(dim=1)
    centre = (features[:, 0] - 5).abs().le(2) & (features[:, 1] - 5).abs().le(2)
    relative = ((approx - exact).abs() / exact)[centre]
    assert float(relative.max()) < 0.2


def test_lattice_reports_its_size_and_dimension():
    features = gaussian_features(torch.zeros(4, 5, 3, dtype=torch.uint8), 4, 5, 3.0, 13.0)
    lattice = PermutohedralLattice(features)
    assert lattice.dim == 5
    assert lattice.num_points == 20
    assert 1 <= lattice.num_vertices <= 20 * 6


def test_gaussian_features_are_float32_divisions_in_row_major_pixel_order():
    image = torch.arange(2 * 3 * 3, dtype=torch.uint8).reshape(2, 3, 3)
    features = gaussian_features(image, 2, 3, 3.0, 13.0)
    assert features.dtype == torch.float32
    assert features.shape == (6, 5)
    n = 1 * 3 + 2  # y = 1, x = 2
    theta, theta_c = np.float32(3.0), np.float32(13.0)
    expected = [np.float32(2) / theta, np.float32(1) / theta] + [
        np.float32(v) / theta_c for v in image[1, 2].tolist()
    ]
    assert features[n].tolist() == [float(v) for v in expected]
    assert gaussian_features(None, 2, 3, 3.0, None).shape == (6, 2)


def test_lattice_rejects_features_whose_keys_need_more_than_63_bits():
    features = torch.tensor([[0.0] * 5, [1e6] * 5], dtype=torch.float32)
    features[1, ::2] = -1e6
    with pytest.raises(ValueError, match="features"):
        PermutohedralLattice(features)


# densecrf's elevation scale of a 1-D feature, rounded as it rounds it: sqrt(2/3) * (d + 1) / sqrt((i + 2)(i + 1))
ONE_D_SCALE = float(np.float32(1.0 / np.sqrt(2.0) * float(np.float32(np.sqrt(2.0 / 3.0) * 2))))


def one_dimensional_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The permutohedral filter of d = 1 written out by hand: the lattice is the integer grid of f * ONE_D_SCALE;
    splat and slice interpolate linearly between the two grid points around each point, the blur is two passes of
    v + (v[k-1] + v[k+1]) / 2 over the grid points some point touched (the others read and stay 0), and the slice
    scales by alpha = 1 / (1 + 2^-1)."""
    grid = features * ONE_D_SCALE
    low = np.floor(grid).astype(np.int64)
    upper = grid - low
    base, size = int(low.min()), int(low.max() - low.min()) + 2
    lattice, touched = np.zeros((size, values.shape[1])), np.zeros(size, dtype=bool)
    for i in range(len(features)):
        k = low[i] - base
        lattice[k] += (1 - upper[i]) * values[i]
        lattice[k + 1] += upper[i] * values[i]
        touched[k] = touched[k + 1] = True
    for _ in range(2):
        padded = np.pad(lattice, ((1, 1), (0, 0)))
        lattice = np.where(touched[:, None], lattice + 0.5 * (padded[:-2] + padded[2:]), 0.0)
    k = low - base
    sliced = (1 - upper)[:, None] * lattice[k] + upper[:, None] * lattice[k + 1]
    return sliced * float(np.float32(1.0) / np.float32(1.5))


def test_a_one_dimensional_lattice_filters_exactly_as_the_grid_it_stands_for_up_to_its_extreme_keys():
    # a cluster whose first point lies on the smallest key, and a lone point far off holding the largest key:
    # a lookup that missed a key at either end of the range would drop a neighbour from the blur
    rng = np.random.default_rng(0)
    features = np.concatenate([[0.0], rng.uniform(0.0, 6.0, 40), [6.0, 20.0]])
    values = rng.normal(size=(len(features), 2))
    lattice = PermutohedralLattice(torch.from_numpy(features[:, None]))
    assert lattice.dim == 1 and lattice.num_vertices == 10  # grid points 0..7 of the cluster, 23 and 24
    filtered = lattice.filter(torch.from_numpy(values)).numpy()
    np.testing.assert_allclose(filtered, one_dimensional_filter(features, values), rtol=0, atol=1e-12)


def test_a_one_dimensional_lattice_approximates_the_gaussian_it_stands_for():
    features = torch.arange(0.0, 12.0, 0.25, dtype=torch.float64)[:, None]
    approx = PermutohedralLattice(features).filter(torch.ones(len(features), 1, dtype=torch.float64))[:, 0]
    exact = torch.exp(-torch.cdist(features, features).pow(2) / 2).sum(dim=1)
    centre = (features[:, 0] - 6).abs().le(2)
    assert float(((approx - exact).abs() / exact)[centre].max()) < 0.2


@pytest.mark.parametrize("theta_color", [0.0, -13.0, float("nan"), float("inf"), None])
def test_gaussian_features_refuse_a_colour_theta_that_is_not_positive_and_finite(theta_color):
    # a negative theta would flip the colour features' sign, which no Gaussian of their differences sees
    image = torch.zeros(2, 3, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="theta_color must be a positive finite number"):
        gaussian_features(image, 2, 3, 3.0, theta_color)


def test_a_larger_colour_theta_lets_pixels_of_different_colours_weigh_more_on_each_other():
    image = torch.tensor([[[0, 0, 0], [200, 200, 200]]], dtype=torch.uint8)  # 1 x 2 pixels, black and light grey
    pulled = []
    for theta_color in (20.0, 150.0, 600.0, 1e4):
        features = gaussian_features(image, 1, 2, 3.0, theta_color).double()
        assert features[1, 2:].tolist() == pytest.approx([200.0 / theta_color] * 3)
        out = PermutohedralLattice(features).filter(torch.tensor([[0.0], [1.0]], dtype=torch.float64))
        pulled.append(float(out[0, 0]))  # what the light pixel's value adds to the black one's
    assert pulled[0] == 0.0 < pulled[1] < pulled[2] < pulled[3]  # 10 standard deviations apart: out of reach


def test_lattice_keys_of_63_bits_are_packed_exactly_and_64_bits_are_refused():
    # three 3-D points far apart: each key dimension spans about 2^20..2^21, 63 bits in all at 2.8e5
    direction = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    features = torch.stack([-2.8e5 * direction, torch.zeros(3, dtype=torch.float64), 2.8e5 * direction])
    lattice = PermutohedralLattice(features)
    values = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-4.0, 2.5]], dtype=torch.float64)
    together = lattice.filter(values)
    for i in range(3):  # too far apart to share a vertex: each point filters as it would alone
        alone = PermutohedralLattice(features[i : i + 1]).filter(values[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"64-bit lattice key \(64 bits needed\)"):
        PermutohedralLattice(features * (3e5 / 2.8e5))


def test_lattice_takes_scaled_features_up_to_but_not_reaching_its_float_key_range():
    # d = 1: the scaled features must stay below 2^22 / 2
    at_the_limit = 2.0**21 / ONE_D_SCALE
    assert at_the_limit * ONE_D_SCALE == 2.0**21
    below = float(np.nextafter(at_the_limit, 0.0))
    assert PermutohedralLattice(torch.tensor([[0.0], [below]], dtype=torch.float64)).num_points == 2
    with pytest.raises(ValueError, match="features out of range for the lattice"):
        PermutohedralLattice(torch.tensor([[0.0], [at_the_limit]], dtype=torch.float64))


# ---------------------------------------------------------------------------- mean field


def tiny_problem(n_labels=3, height=5, width=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    unary = torch.randn(n_labels, height, width, generator=generator, dtype=torch.float64)
    image = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8)
    spatial = PermutohedralLattice(gaussian_features(None, height, width, 2.0, None).double())
    bilateral = PermutohedralLattice(gaussian_features(image, height, width, 3.0, 40.0).double())
    return unary, spatial, bilateral, generator


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_mean_field_gradients_match_finite_differences_for_scalar_weights(normalization):
    unary, spatial, bilateral, generator = tiny_problem()
    w_s = torch.tensor(1.5, dtype=torch.float64)
    w_b = torch.tensor(2.0, dtype=torch.float64)

    def run(u, ws, wb):
        return mean_field_reference(u, [(spatial, ws), (bilateral, wb)], normalization=normalization, iterations=2)

    inputs = (unary.requires_grad_(), w_s.requires_grad_(), w_b.requires_grad_())
    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("compat_kind", ["potts", "diagonal", "full"])
def test_mean_field_gradients_match_finite_differences_for_matrix_weights_and_compat(
    normalization, compat_kind
):
    unary, spatial, bilateral, generator = tiny_problem()
    w_s = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    w_b = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    compat = {
        "potts": None,
        "diagonal": torch.randn(3, generator=generator, dtype=torch.float64),
        "full": torch.randn(3, 3, generator=generator, dtype=torch.float64),
    }[compat_kind]

    def run(u, ws, wb, *mu):
        return mean_field_reference(
            u,
            [(spatial, ws), (bilateral, wb)],
            compat=mu[0] if mu else None,
            normalization=normalization,
            iterations=2,
        )

    inputs = [unary.requires_grad_(), w_s.requires_grad_(), w_b.requires_grad_()]
    if compat is not None:
        inputs.append(compat.requires_grad_())
    assert torch.autograd.gradcheck(run, tuple(inputs))


def test_potts_scalar_weights_equal_the_matching_matrix_weights_and_compat():
    unary, spatial, bilateral, _ = tiny_problem(n_labels=4)
    eye = torch.eye(4, dtype=torch.float64)
    scalar = mean_field_reference(unary, [(spatial, 1.5), (bilateral, 2.0)], iterations=3)
    matrix = mean_field_reference(unary, [(spatial, 1.5 * eye), (bilateral, 2.0 * eye)], iterations=3)
    minus_ones = -torch.ones(4, dtype=torch.float64)
    diagonal = mean_field_reference(unary, [(spatial, 1.5), (bilateral, 2.0)], compat=minus_ones, iterations=3)
    full = mean_field_reference(unary, [(spatial, 1.5), (bilateral, 2.0)], compat=-eye, iterations=3)
    for other in (matrix, diagonal, full):
        torch.testing.assert_close(other, scalar, rtol=1e-12, atol=1e-12)


def test_mean_field_with_zero_iterations_returns_the_unary():
    unary, spatial, _, _ = tiny_problem()
    torch.testing.assert_close(mean_field_reference(unary, [(spatial, 3.0)], iterations=0), unary)


def test_positive_potts_weight_makes_neighbours_agree():
    unary, spatial, _, _ = tiny_problem()
    before = torch.softmax(unary, dim=0)
    after = torch.softmax(mean_field_reference(unary, [(spatial, 5.0)], iterations=5), dim=0)

    def label_changes(q):
        labels = q.argmax(dim=0)
        return int((labels[:, 1:] != labels[:, :-1]).sum() + (labels[1:] != labels[:-1]).sum())

    assert label_changes(after) < label_changes(before)


# ---------------------------------------------------------------------------- input validation


def test_dense_crf_takes_numpy_numbers_as_kernel_parameters(smooth_image, smooth_unary):
    unary, image = torch.from_numpy(smooth_unary(3, 4, 5)), torch.from_numpy(smooth_image(4, 5))
    q = dense_crf_reference(unary, image, spatial=(np.float32(3.0), np.int64(3)),
                            bilateral=(np.float64(80.0), 13, 10.0))
    torch.testing.assert_close(q, dense_crf_reference(unary, image, spatial=(3.0, 3.0), bilateral=(80.0, 13.0, 10.0)))


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda u, i, kw: (u[0], i, kw), "unary"),
        (lambda u, i, kw: (u[:0], i, kw), "unary"),
        (lambda u, i, kw: (u[:, :0], i[:0], kw), "unary"),
        (lambda u, i, kw: (u[:, :, :0], i[:, :0], kw), "unary"),
        (lambda u, i, kw: (u.clone().fill_(float("nan")), i, kw), "unary"),
        (lambda u, i, kw: (u.clone().fill_(float("inf")), i, kw), "unary"),
        (lambda u, i, kw: (u.to(torch.int64), i, kw), "unary"),
        (lambda u, i, kw: (u.numpy(), i, kw), "unary must be a torch.Tensor"),  # a ValueError as dense_crf's
        (lambda u, i, kw: (u, i.tolist(), kw), "image must be a torch.Tensor or None"),
        (lambda u, i, kw: (u, i[1:], kw), "image must have shape (H, W, 3) = (4, 5, 3) to match unary, got (3, 5, 3)"),
        (lambda u, i, kw: (u, i[:, :, :2], kw), "image"),
        (lambda u, i, kw: (u, i[:3], kw), "image"),
        (lambda u, i, kw: (u, i.float(), kw), "image"),
        (lambda u, i, kw: (u, None, kw), "image"),
        (lambda u, i, kw: (u, i, {**kw, "spatial": (0.0, 3.0)}), "spatial"),
        (lambda u, i, kw: (u, i, {**kw, "spatial": (-1.0, 3.0)}), "spatial"),
        (lambda u, i, kw: (u, i, {**kw, "spatial": (3.0,)}), "spatial"),
        (lambda u, i, kw: (u, i, {**kw, "bilateral": (0.0, 13.0, 10.0)}), "bilateral"),
        (lambda u, i, kw: (u, i, {**kw, "bilateral": (80.0, -13.0, 10.0)}), "bilateral"),
        (lambda u, i, kw: (u, i, {**kw, "bilateral": (80.0, 13.0)}), "bilateral"),
        (lambda u, i, kw: (u, i, {**kw, "spatial": (3.0, 1e39)}), "spatial[1] (weight)"),  # beyond float32, as the SDK
        (lambda u, i, kw: (u, i, {**kw, "iterations": -1}), "iterations"),
        (lambda u, i, kw: (u, i, {**kw, "normalization": "before"}), "normalization"),
    ],
)
def test_dense_crf_rejects_bad_inputs_naming_the_argument(change, name, smooth_image, smooth_unary):
    unary, image = torch.from_numpy(smooth_unary(3, 4, 5)), torch.from_numpy(smooth_image(4, 5))
    unary, image, kwargs = change(unary, image, {})
    with pytest.raises(ValueError, match=re.escape(name)):
        dense_crf_reference(unary, image, **kwargs)


def test_features_beyond_float_lattice_range_raise_a_value_error():
    with pytest.raises(ValueError, match="out of range for the lattice"):
        dense_crf_reference(torch.zeros(2, 150, 150), None, spatial=(1e-6, 3.0), bilateral=None)


def test_mean_field_rejects_mismatched_weights_compat_and_lattices():
    unary, spatial, _, _ = tiny_problem()
    with pytest.raises(ValueError, match="weight"):
        mean_field_reference(unary, [(spatial, torch.ones(2, 2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="compat"):
        mean_field_reference(unary, [(spatial, 1.0)], compat=torch.ones(2, dtype=torch.float64))
    other = PermutohedralLattice(gaussian_features(None, 3, 3, 2.0, None))
    with pytest.raises(ValueError, match="kernels"):
        mean_field_reference(unary, [(other, 1.0)])
    with pytest.raises(ValueError, match="normalization"):
        mean_field_reference(unary, [(spatial, 1.0)], normalization="before")
    with pytest.raises(ValueError, match="iterations"):
        mean_field_reference(unary, [(spatial, 1.0)], iterations=-2)


def test_mean_field_takes_weights_and_compat_of_another_dtype_and_refuses_non_finite_ones():
    unary, spatial, _, _ = tiny_problem()
    labels = unary.shape[0]
    single = mean_field_reference(unary, [(spatial, torch.eye(labels) * 2)], compat=-torch.eye(labels))
    double = mean_field_reference(unary, [(spatial, torch.eye(labels, dtype=torch.float64) * 2)],
                                  compat=-torch.eye(labels, dtype=torch.float64))
    assert double.dtype == unary.dtype and torch.allclose(single, double, atol=1e-6)
    for weight in (float("nan"), torch.tensor(float("inf"))):
        with pytest.raises(ValueError, match=r"kernels\[0\] weight"):
            mean_field_reference(unary, [(spatial, weight)])
    with pytest.raises(ValueError, match="compat holds a non-finite value"):
        mean_field_reference(unary, [(spatial, 1.0)], compat=torch.full((labels,), float("nan")))
