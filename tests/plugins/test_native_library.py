"""The native CRF library's C ABI (plugins/include/dynseg_crf.h), driven through dynseg.sdk._native:
the raw lattice filter and its transpose, the backward pass against autograd through the PyTorch
reference, determinism, workspace sizing and the library's own validation of a problem."""

from __future__ import annotations

import ctypes
import os
import re

import numpy as np
import pytest
import torch

import dynseg.plugins
import dynseg.sdk
from dynseg.sdk import InvalidArgumentError, NativeError, _native
from dynseg.trainer.crf import PermutohedralLattice, gaussian_features, mean_field_reference

KERNELS = {"spatial": (3.0, 0.0), "bilateral": (8.0, 13.0)}  # (theta_xy, theta_color)


def planar(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W), the library's image layout."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def one_kernel_problem(image: np.ndarray, kernel: str, labels: int) -> _native.Problem:
    theta_xy, theta_color = KERNELS[kernel]
    height, width = image.shape[:2]
    return _native.Problem(
        labels, height, width, planar(image) if theta_color else None,
        [_native.Kernel(theta_xy, theta_color, np.ones(1, np.float32))],
        compat=None, normalization="after", iterations=1, output=_native.Output.LOGITS, threads=0,
    )


def reference_lattice(image: np.ndarray, kernel: str) -> PermutohedralLattice:
    theta_xy, theta_color = KERNELS[kernel]
    height, width = image.shape[:2]
    colour = torch.from_numpy(image) if theta_color else None
    return PermutohedralLattice(gaussian_features(colour, height, width, theta_xy, theta_color or None))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| over max |expected|: error relative to the array's magnitude."""
    expected = np.asarray(expected, dtype=np.float64).reshape(actual.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# ---------------------------------------------------------------------------- identity


def _memory_and_swap_bytes() -> int:
    fields = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    return sum(int(fields[name].split()[0]) * 1024 for name in ("MemTotal", "SwapTotal"))


@pytest.mark.skipif(not os.path.exists("/proc/sys/vm/overcommit_memory")
                    or open("/proc/sys/vm/overcommit_memory").read().strip() != "0",
                    reason="needs Linux's default (heuristic) overcommit, which refuses a plain allocation this large")
def test_the_workspace_is_reserved_even_beyond_memory_and_swap():
    """A photo's worst-case workspace exceeds RAM and swap (39.9 GiB at 3000x4000) though the kernels
    touch a fraction of it: reserving it must not fail, and untouched pages must cost nothing."""
    nbytes = 2 * _memory_and_swap_bytes()
    buffer = _native._reserve(nbytes)
    assert buffer.nbytes == nbytes and buffer[0] == 0 and buffer[-1] == 0
    del buffer


def test_a_threads_scratch_shrinks_after_a_large_call_and_free_scratch_releases_it(smooth_image):
    def held_after(height: int, width: int) -> int:
        image = np.ascontiguousarray(smooth_image(height, width).transpose(2, 0, 1), dtype=np.float32)
        kernels = [_native.Kernel(3.0, 0.0, np.array(3.0, np.float32))]
        problem = _native.Problem(2, height, width, image, kernels, compat=None, normalization="after",
                                  iterations=1, output=_native.Output.LOGITS, threads=1)
        problem.forward(np.zeros((2, height, width), np.float32))
        return _native._local.buffer.nbytes

    small = held_after(32, 32)
    assert held_after(256, 256) > 16 * small  # one large image
    assert held_after(33, 31) < 2 * small  # a small one after it frees the large one's memory
    assert held_after(32, 32) == held_after(33, 31)  # similar sizes reuse one buffer
    dynseg.sdk.free_scratch()
    assert getattr(_native._local, "buffer", None) is None


def test_native_version_is_the_package_version():
    assert _native.native_version() == dynseg.sdk.__version__


def test_the_library_speaks_abi_version_6_and_reports_at_least_one_thread():
    assert _native.library().dynseg_abi_version() == _native.ABI_VERSION == 6
    assert _native.max_threads() >= 1


# ---------------------------------------------------------------------------- the raw filter


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_transpose_filter_is_the_adjoint_of_the_filter(kernel, smooth_image):
    image = smooth_image(24, 32)
    problem = one_kernel_problem(image, kernel, labels=3)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 3, 24, 32)).astype(np.float32)
    forward = np.dot(problem.filter(0, x, transpose=False).ravel().astype(np.float64), y.ravel())
    adjoint = np.dot(x.ravel().astype(np.float64), problem.filter(0, y, transpose=True).ravel())
    assert abs(forward - adjoint) <= 1e-5 * abs(forward)  # measured 1.2e-7 (spatial), 4.9e-8 (bilateral)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_transpose_filter_differs_noticeably_from_the_filter(kernel, smooth_image):
    problem = one_kernel_problem(smooth_image(24, 32), kernel, labels=3)
    x = np.random.default_rng(1).standard_normal((3, 24, 32)).astype(np.float32)
    forward, transpose = problem.filter(0, x, False), problem.filter(0, x, True)
    assert np.linalg.norm(forward - transpose) > 1e-2 * np.linalg.norm(forward)  # measured 3.6 % and 11 %


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transpose"])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_native_filter_equals_the_reference_lattice_filter(kernel, transpose, smooth_image):
    image = smooth_image(24, 32)
    x = np.random.default_rng(2).standard_normal((5, 24, 32)).astype(np.float32)
    native = one_kernel_problem(image, kernel, labels=5).filter(0, x, transpose)
    values = torch.from_numpy(x.reshape(5, -1).T.copy())  # (N, C)
    expected = reference_lattice(image, kernel).filter(values, transpose=transpose).numpy().T
    assert relative_error(native, expected) <= 1e-5  # measured 0 (bit-identical)


def test_filter_accepts_fewer_channels_than_labels_and_rejects_more(smooth_image):
    problem = one_kernel_problem(smooth_image(8, 9), "spatial", labels=3)
    ones = np.ones((1, 8, 9), np.float32)
    assert problem.filter(0, ones, False).shape == (1, 8, 9)
    with pytest.raises(InvalidArgumentError, match="channels"):
        problem.filter(0, np.ones((4, 8, 9), np.float32), False)
    with pytest.raises(InvalidArgumentError, match="kernel"):
        problem.filter(1, ones, False)
    with pytest.raises(InvalidArgumentError, match=r"kernel must be an int in 0\.\.2147483647, got 4294967296"):
        problem.filter(2**32, ones, False)  # as a C int32, kernel 0


def test_every_problem_method_refuses_planes_of_another_shape_before_the_library_reads_them(smooth_image):
    # the library reads L*H*W floats through each array: a smaller one would be read past its end
    problem = one_kernel_problem(smooth_image(8, 9), "spatial", labels=3)
    small = np.zeros((3, 2, 2), np.float32)
    with pytest.raises(InvalidArgumentError, match=r"unary must be \(3, 8, 9\) planes"):
        problem.forward(small)
    with pytest.raises(InvalidArgumentError, match=r"grad_logits must be \(3, 8, 9\) planes"):
        problem.backward(np.zeros((3, 8, 9), np.float32), small, [False], False)
    with pytest.raises(InvalidArgumentError, match=r"values must be \(1, 8, 9\) planes"):
        problem.filter(0, np.zeros((1, 9, 8), np.float32), False)
    with pytest.raises(InvalidArgumentError, match=r"values must be \(C, H, W\)"):
        problem.filter(0, np.zeros((72,), np.float32), False)


def test_both_backward_methods_read_one_gradient_pointer_per_kernel(smooth_image):
    # the library reads num_kernels pointers: a shorter list would be read past its end; checked before
    # any device is touched, so backward_cuda's check runs on any machine
    problem = one_kernel_problem(smooth_image(8, 9), "spatial", labels=3)
    planes = np.zeros((3, 8, 9), np.float32)
    for wanted in ([], [True, True]):
        with pytest.raises(InvalidArgumentError, match=rf"want_weights must have one entry per kernel \(1\), got "
                                                       rf"{len(wanted)}"):
            problem.backward(planes, planes, wanted, False)
        with pytest.raises(InvalidArgumentError, match=rf"grad_weights must have one entry per kernel \(1\), got "
                                                       rf"{len(wanted)}"):
            problem.backward_cuda(planes, planes, planes, [None] * len(wanted), None, 0, 0, 0)


def _backward_workspace(labels: int, weight: np.ndarray) -> int:
    problem = _native.Problem(labels, 1, 1, None, [_native.Kernel(3.0, 0.0, weight)], compat=None,
                              normalization="after", iterations=1, output=_native.Output.LOGITS, threads=1)
    size = ctypes.c_size_t()
    assert _native.library().dynseg_crf_workspace_size(ctypes.byref(problem.struct), _native.Pass.BACKWARD,
                                                       ctypes.byref(size)) == 0
    return size.value


def test_the_backward_workspace_holds_the_l_by_l_sums_only_where_a_matrix_reads_them():
    # one pixel: the L x L parameter sums dominate the workspace where they are taken in full
    scalar = {labels: _backward_workspace(labels, np.ones(1, np.float32)) for labels in (1024, 2048)}
    matrix = {labels: _backward_workspace(labels, np.eye(labels, dtype=np.float32)) for labels in (1024, 2048)}
    assert scalar[2048] < 2.5 * scalar[1024]  # linear in L
    assert matrix[2048] > 3.5 * matrix[1024]  # quadratic: a matrix weight reads them all
    assert scalar[2048] < matrix[2048] / 100


def test_the_filter_refuses_non_finite_values_and_an_output_that_overflows(smooth_image):
    problem = one_kernel_problem(smooth_image(8, 9), "spatial", labels=3)
    values = np.ones((1, 8, 9), np.float32)
    values[0, 3, 4] = np.nan
    with pytest.raises(InvalidArgumentError, match="values holds a non-finite value"):
        problem.filter(0, values, False)
    with pytest.raises(InvalidArgumentError, match="the filtered values overflowed float32"):
        problem.filter(0, np.full((1, 8, 9), 3e38, np.float32), False)


@pytest.mark.parametrize("theta_color, bits", [(5e4, 63), (7e4, 64)])
def test_lattice_keys_take_at_most_63_bits(theta_color, bits):
    # 13 colour channels: fifteen coordinates of 4 or 5 bits land just either side of the bound (the reference
    # counts the same bits); the 64th bit stays free, so that no key can be the hash table's empty marker
    height, width = 4, 5
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([10.0 * c + xx + 2 * yy for c in range(13)], axis=-1).astype(np.float32)
    problem = _native.Problem(2, height, width, np.ascontiguousarray(image.transpose(2, 0, 1)),
                              [_native.Kernel(1e4, theta_color, np.ones(1, np.float32))], compat=None,
                              normalization="after", iterations=1, output=_native.Output.LOGITS, threads=0)
    values = np.random.default_rng(0).standard_normal((2, height, width)).astype(np.float32)
    features = gaussian_features(torch.from_numpy(image), height, width, 1e4, theta_color)
    if bits == 63:
        expected = PermutohedralLattice(features).filter(torch.from_numpy(values.reshape(2, -1).T.copy())).numpy().T
        assert relative_error(problem.filter(0, values, False), expected) <= 1e-5
    else:
        with pytest.raises(InvalidArgumentError, match="64-bit lattice key"):
            PermutohedralLattice(features)
        with pytest.raises(InvalidArgumentError, match="lattice keys need 64 bits but only 63 fit a 64-bit key"):
            problem.filter(0, values, False)


def test_the_lanes_past_the_last_pixel_do_not_count_towards_the_feature_range():
    # 1001 rows of one pixel: the last block of eight holds one pixel. Rows 1001..1007 do not exist, so their
    # features (past 2^22 / 4 at this theta, where row 1000's is just inside) must not refuse the lattice
    height, width, theta = 1001, 1, 9.58e-4
    problem = _native.Problem(1, height, width, None, [_native.Kernel(theta, 0.0, np.ones(1, np.float32))],
                              compat=None, normalization="after", iterations=1, output=_native.Output.LOGITS, threads=0)
    values = np.random.default_rng(0).standard_normal((1, height, width)).astype(np.float32)
    lattice = PermutohedralLattice(gaussian_features(None, height, width, theta, None))
    expected = lattice.filter(torch.from_numpy(values.reshape(1, -1).T.copy())).numpy().T
    assert relative_error(problem.filter(0, values, False), expected) <= 1e-5
    with pytest.raises(InvalidArgumentError, match=r"features out of range for the lattice.*\(2\^22 / 4\)"):
        PermutohedralLattice(gaussian_features(None, height + 7, width, theta, None))


def test_the_library_takes_the_13_colour_channels_and_8_kernels_its_header_allows():
    # DYNSEG_MAX_COLOR_CHANNELS and DYNSEG_MAX_KERNELS are inclusive bounds; 13 channels fit 64-bit keys only
    # where the features barely vary (a small image, wide thetas)
    labels, height, width = 3, 4, 5
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([10.0 * c + xx + 2 * yy for c in range(13)], axis=-1).astype(np.float32)
    thetas = [(3.0, 0.0), (1e4, 1e3), (5.0, 0.0), (1e4, 1e4), (8.0, 0.0), (1e4, 2e3), (2.0, 0.0), (1e4, 5e3)]
    weights = [np.array([0.5 + k], np.float32) for k in range(8)]
    unary = np.random.default_rng(0).standard_normal((labels, height, width)).astype(np.float32)
    problem = _native.Problem(
        labels, height, width, np.ascontiguousarray(image.transpose(2, 0, 1)),
        [_native.Kernel(xy, colour, w) for (xy, colour), w in zip(thetas, weights)], compat=None,
        normalization="after", iterations=2, output=_native.Output.LOGITS, threads=0,
    )
    colour = torch.from_numpy(image)
    kernels = [(PermutohedralLattice(gaussian_features(colour if c else None, height, width, xy, c or None)),
                float(w[0])) for (xy, c), w in zip(thetas, weights)]
    expected = mean_field_reference(torch.from_numpy(unary), kernels, iterations=2).numpy()
    assert relative_error(problem.forward(unary), expected) <= 1e-5


@pytest.mark.parametrize("order", ["matrix first", "scalar first"])
def test_scalar_and_matrix_weights_mix_in_one_problem(order, smooth_image):
    # one matrix weight sends every kernel down the general path, where a scalar kernel's message adds to the
    # messages before it rather than start again from the unary
    labels, height, width = 4, 12, 15
    image = smooth_image(height, width)
    rng = np.random.default_rng(5)
    unary = (2 * rng.standard_normal((labels, height, width))).astype(np.float32)
    matrix = (np.eye(labels) * 3 + rng.uniform(0, 0.5, (labels, labels))).astype(np.float32)
    scalar = np.array([4.0], np.float32)
    kernels = [((3.0, 0.0), matrix), ((8.0, 13.0), scalar), ((3.0, 0.0), scalar)]
    if order == "scalar first":
        kernels = kernels[::-1]
    problem = _native.Problem(labels, height, width, planar(image),
                              [_native.Kernel(xy, colour, w) for (xy, colour), w in kernels], compat=None,
                              normalization="after", iterations=3, output=_native.Output.LOGITS, threads=0)
    colour = torch.from_numpy(image)
    reference = [(PermutohedralLattice(gaussian_features(colour if c else None, height, width, xy, c or None)),
                  torch.from_numpy(w) if w.size > 1 else float(w[0])) for (xy, c), w in kernels]
    expected = mean_field_reference(torch.from_numpy(unary), reference, iterations=3).numpy()
    assert relative_error(problem.forward(unary), expected) <= 1e-5


# ---------------------------------------------------------------------------- backward


GRAD_RTOL = 1e-5  # of max |gradient|; measured worst 1.3e-6 (float32 through 3 iterations)


def _weights(kind: str, labels: int, rng) -> list[np.ndarray]:
    if kind == "scalar":
        return [np.array([3.0], np.float32), np.array([5.0], np.float32)]
    return [rng.standard_normal((labels, labels)).astype(np.float32) for _ in range(2)]


def _compat(kind: str, labels: int, rng) -> np.ndarray | None:
    if kind == "potts":
        return None
    if kind == "diagonal":
        return -rng.uniform(0.5, 1.5, labels).astype(np.float32)
    return rng.standard_normal((labels, labels)).astype(np.float32)


def _backward_case(image, weight_kind, compat_kind, normalization, labels=5, iterations=3, seed=0, threads=0):
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    unary = (2 * rng.standard_normal((labels, height, width))).astype(np.float32)
    grad_logits = rng.standard_normal((labels, height, width)).astype(np.float32)
    weights = _weights(weight_kind, labels, rng)
    compat = _compat(compat_kind, labels, rng)
    problem = _native.Problem(
        labels, height, width, planar(image),
        [_native.Kernel(3.0, 0.0, weights[0]), _native.Kernel(10.0, 13.0, weights[1])],
        compat=compat, normalization=normalization, iterations=iterations, output=_native.Output.LOGITS,
        threads=threads,
    )
    return problem, unary, grad_logits, weights, compat


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("compat_kind", ["potts", "diagonal", "full"])
@pytest.mark.parametrize("weight_kind", ["scalar", "matrix"])
def test_backward_matches_autograd_through_the_reference(weight_kind, compat_kind, normalization, smooth_image):
    image = smooth_image(20, 28)
    height, width = image.shape[:2]
    problem, unary, grad_logits, weights, compat = _backward_case(image, weight_kind, compat_kind, normalization)
    grad_unary, grad_weights, grad_compat = problem.backward(unary, grad_logits, [True, True], compat is not None)

    # The oracle filters in float64 on the kernel's lattices (built from float32 features, as the kernel's
    # are): a float32 autograd's rounding alone reaches GRAD_RTOL on some CPUs (1.6e-5 for the bilateral
    # weight's gradient on an Intel Xeon, against the kernel's 1.7e-6 from a float64 oracle).
    spatial = PermutohedralLattice(gaussian_features(None, height, width, 3.0, None))
    bilateral = PermutohedralLattice(gaussian_features(torch.from_numpy(image), height, width, 10.0, 13.0))
    u = torch.from_numpy(unary).double().requires_grad_()
    w = [torch.from_numpy(x.reshape(()) if x.size == 1 else x).double().requires_grad_() for x in weights]
    mu = None if compat is None else torch.from_numpy(compat).double().requires_grad_()
    logits = mean_field_reference(u, [(spatial, w[0]), (bilateral, w[1])], compat=mu, normalization=normalization,
                                  iterations=3)
    (logits * torch.from_numpy(grad_logits).double()).sum().backward()

    assert relative_error(problem.forward(unary), logits.detach().numpy()) <= GRAD_RTOL
    assert relative_error(grad_unary, u.grad.numpy()) <= GRAD_RTOL
    for native, expected in zip(grad_weights, w):
        assert native.shape == weights[0].shape
        assert relative_error(native, expected.grad.numpy()) <= GRAD_RTOL
    if compat is not None:
        assert relative_error(grad_compat, mu.grad.numpy()) <= GRAD_RTOL
    else:
        assert grad_compat is None


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_backward_matches_float64_finite_differences_of_the_reference(normalization):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    problem, unary, grad_logits, weights, compat = _backward_case(
        image, "scalar", "full", normalization, labels=3, iterations=2, seed=4
    )
    grad_unary, grad_weights, grad_compat = problem.backward(unary, grad_logits, [True, True], True)

    spatial = PermutohedralLattice(gaussian_features(None, 5, 6, 3.0, None).double())
    bilateral = PermutohedralLattice(gaussian_features(torch.from_numpy(image), 5, 6, 10.0, 13.0).double())
    target = torch.from_numpy(grad_logits).double()

    def loss(u, w_s, w_b, mu) -> float:
        logits = mean_field_reference(torch.from_numpy(u), [(spatial, float(w_s[0])), (bilateral, float(w_b[0]))],
                                      compat=torch.from_numpy(mu), normalization=normalization, iterations=2)
        return float((logits * target).sum())

    parameters = [unary.astype(np.float64), weights[0].astype(np.float64), weights[1].astype(np.float64),
                  compat.astype(np.float64)]
    natives = [grad_unary, grad_weights[0], grad_weights[1], grad_compat]
    step = 1e-6
    for index, (parameter, native) in enumerate(zip(parameters, natives)):
        numeric = np.empty(parameter.shape)
        for position in np.ndindex(parameter.shape):
            args = [p.copy() for p in parameters]
            args[index][position] += step
            up = loss(*args)
            args[index][position] -= 2 * step
            numeric[position] = (up - loss(*args)) / (2 * step)
        assert relative_error(native, numeric) <= 1e-4, index  # measured at most 1.0e-6


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_backward_is_bitwise_identical_run_to_run_and_for_any_thread_count(normalization, photo):
    image = photo("chelsea")[100:196, 150:278]  # 96x128, the cat
    results = []
    for threads in (0, 0, 1, 3):
        problem, unary, grad_logits, _, compat = _backward_case(
            image, "matrix", "full", normalization, labels=20, threads=threads
        )
        grad_unary, grad_weights, grad_compat = problem.backward(unary, grad_logits, [True, True], True)
        results.append(b"".join(a.tobytes() for a in (grad_unary, *grad_weights, grad_compat)))
    assert all(result == results[0] for result in results[1:])


def test_backward_needs_logits_as_the_output(smooth_image):
    problem, unary, grad_logits, _, _ = _backward_case(smooth_image(6, 7), "scalar", "potts", "after")
    problem.struct.output = _native.Output.PROBABILITIES
    with pytest.raises(InvalidArgumentError, match="output"):
        problem.backward(unary, grad_logits, [True, True], False)


# ---------------------------------------------------------------------------- workspace


def test_a_too_small_workspace_fails_cleanly_with_status_2(smooth_image):
    problem = one_kernel_problem(smooth_image(16, 20), "bilateral", labels=4)
    unary = np.zeros((4, 16, 20), np.float32)
    out = np.full_like(unary, -7.0)
    workspace = np.zeros(256, np.uint8)
    status = _native.library().dynseg_crf_forward(
        ctypes.byref(problem.struct), unary.ctypes.data_as(_native._f32p), out.ctypes.data_as(_native._f32p),
        workspace.ctypes.data, workspace.nbytes,
    )
    assert status == _native.Status.WORKSPACE_TOO_SMALL
    assert "workspace" in _native.library().dynseg_last_error().decode()
    with pytest.raises(dynseg.sdk.NativeError, match="workspace"):
        _native._check(status)
    assert np.all(workspace == 0) and np.all(out == -7.0)  # nothing was written


# ---------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("threads", [1, 2], ids=["streamed", "tiled"])  # the two forward paths
@pytest.mark.parametrize("call", ["forward", "backward"])
def test_a_set_cancel_flag_stops_a_call_with_status_7_and_a_cleared_one_lets_it_finish(smooth_image, call, threads):
    image = smooth_image(16, 20)
    problem = _native.Problem(2, 16, 20, planar(image), [_native.Kernel(80.0, 13.0, np.ones(1, np.float32))],
                              compat=None, normalization="after", iterations=3, output=_native.Output.LOGITS,
                              threads=threads)
    unary = np.random.default_rng(0).normal(size=(2, 16, 20)).astype(np.float32)
    out, grad_unary = np.empty_like(unary), np.empty_like(unary)
    no_weights = (_native._f32p * 1)(None)
    lib = _native.library()

    def run() -> int:
        workspace = problem.host_workspace(_native.Pass.FORWARD if call == "forward" else _native.Pass.BACKWARD)
        if call == "forward":
            return lib.dynseg_crf_forward(ctypes.byref(problem.struct), _native._pointer(unary),
                                          _native._pointer(out), workspace.ctypes.data, workspace.nbytes)
        return lib.dynseg_crf_backward(ctypes.byref(problem.struct), _native._pointer(unary),
                                       _native._pointer(unary), _native._pointer(grad_unary), no_weights, None,
                                       workspace.ctypes.data, workspace.nbytes)

    flag = ctypes.c_int32(1)
    lib.dynseg_set_cancel_flag(ctypes.byref(flag))
    try:
        assert run() == _native.Status.CANCELLED
        assert lib.dynseg_last_error().decode() == "cancelled: the calling thread's cancel flag was set"
        flag.value = 0
        assert run() == _native.Status.OK
        flag.value = 1
    finally:
        lib.dynseg_set_cancel_flag(None)
    assert run() == _native.Status.OK  # no flag: nothing to read


def test_the_backward_pass_needs_at_least_the_forward_workspace(smooth_image):
    problem = one_kernel_problem(smooth_image(16, 20), "bilateral", labels=4)
    sizes = {}
    for pass_ in (_native.Pass.FORWARD, _native.Pass.BACKWARD):
        size = ctypes.c_size_t()
        _native._check(_native.library().dynseg_crf_workspace_size(ctypes.byref(problem.struct), pass_,
                                                                   ctypes.byref(size)))
        sizes[pass_] = size.value
    assert 0 < sizes[_native.Pass.FORWARD] <= sizes[_native.Pass.BACKWARD]


# ---------------------------------------------------------------------------- the library's own checks


class HandMadeProblem:
    """A valid 2-label, 4x5, two-kernel problem as raw ctypes structs, ready to be broken field by field."""

    def __init__(self):
        self.image = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
        self.weights = [np.array([3.0], np.float32), np.array([5.0], np.float32)]
        self.compat = np.array([-1.0, -1.0], np.float32)
        self.kernels = (_native._Kernel * 2)(
            _native._Kernel(3.0, 0.0, _native.WeightKind.SCALAR, self.weights[0].ctypes.data_as(_native._f32p)),
            _native._Kernel(8.0, 13.0, _native.WeightKind.SCALAR, self.weights[1].ctypes.data_as(_native._f32p)),
        )
        self.struct = _native._Problem(
            num_labels=2, height=4, width=5, image_channels=3, image=self.image.ctypes.data_as(_native._f32p),
            num_kernels=2, kernels=self.kernels, compat_kind=_native.CompatKind.DIAGONAL,
            compat=self.compat.ctypes.data_as(_native._f32p), normalization=0, iterations=2,
            output=_native.Output.PROBABILITIES, threads=1,
        )
        self.unary = np.zeros((2, 4, 5), np.float32)
        self.workspace = np.zeros(1 << 22, np.uint8)

    def forward(self) -> int:
        out = np.empty_like(self.unary)
        return _native.library().dynseg_crf_forward(
            ctypes.byref(self.struct), self.unary.ctypes.data_as(_native._f32p), out.ctypes.data_as(_native._f32p),
            self.workspace.ctypes.data, self.workspace.nbytes,
        )

    def workspace_size(self) -> int:
        size = ctypes.c_size_t()
        return _native.library().dynseg_crf_workspace_size(ctypes.byref(self.struct), _native.Pass.FORWARD,
                                                           ctypes.byref(size))


def _set(field, value):
    return lambda p: setattr(p.struct, field, value)


def _set_kernel(field, value):
    return lambda p: setattr(p.kernels[1], field, value)


BROKEN_FIELDS = {
    "num_labels 0": (_set("num_labels", 0), "num_labels"),
    "num_labels negative": (_set("num_labels", -3), "num_labels"),
    "num_labels past DYNSEG_MAX_LABELS": (_set("num_labels", 65537), r"num_labels must be in 1\.\.65536"),
    "height 0": (_set("height", 0), "height"),
    "width negative": (_set("width", -1), "width"),
    # checked side by side before the product, which would overflow int64
    "width 2**62": (_set("width", 2**62), r"image of 4x4611686018427387904 pixels is too large"),
    "image_channels 14": (_set("image_channels", 14), "image_channels"),
    "image NULL for a bilateral kernel": (_set("image", None), "image"),
    "num_kernels 9": (_set("num_kernels", 9), "num_kernels"),
    "kernels NULL": (_set("kernels", None), "kernels"),
    "theta_xy 0": (_set_kernel("theta_xy", 0.0), r"kernels\[1\]\.theta_xy"),
    "theta_xy NaN": (_set_kernel("theta_xy", float("nan")), r"kernels\[1\]\.theta_xy"),
    "theta_color negative": (_set_kernel("theta_color", -1.0), r"kernels\[1\]\.theta_color"),
    "theta_color inf": (_set_kernel("theta_color", float("inf")), r"kernels\[1\]\.theta_color"),
    "weight_kind 2": (_set_kernel("weight_kind", 2), r"kernels\[1\]\.weight_kind"),
    "weight NULL": (_set_kernel("weight", None), r"kernels\[1\]\.weight"),
    "compat_kind 3": (_set("compat_kind", 3), "compat_kind"),
    "compat_kind -1": (_set("compat_kind", -1), "compat_kind"),
    "compat NULL": (_set("compat", None), "compat"),
    "normalization 2": (_set("normalization", 2), "normalization"),
    "iterations negative": (_set("iterations", -1), "iterations"),
    # -8 zeroed a divisor of the size guard before iterations was checked: SIGFPE
    "iterations -8": (_set("iterations", -8), "iterations must be >= 0"),
    "iterations INT32_MIN": (_set("iterations", -2**31), "iterations must be >= 0"),
    "output 2": (_set("output", 2), "output"),
    "threads negative": (_set("threads", -2), "threads"),
}


@pytest.mark.parametrize("case", list(BROKEN_FIELDS))
def test_the_library_rejects_a_bad_problem_field_with_status_1_naming_it(case):
    problem = HandMadeProblem()
    assert problem.forward() == _native.Status.OK
    breaks, name = BROKEN_FIELDS[case]
    breaks(problem)
    for status in (problem.forward(), problem.workspace_size()):
        assert status == _native.Status.INVALID_ARGUMENT
        message = _native.library().dynseg_last_error().decode()
        assert re.search(name, message), message


def test_the_library_rejects_a_non_finite_weight_or_unary():
    problem = HandMadeProblem()
    problem.weights[0][0] = np.nan
    assert problem.forward() == _native.Status.INVALID_ARGUMENT
    assert "kernels[0].weight" in _native.library().dynseg_last_error().decode()
    problem = HandMadeProblem()
    problem.unary[1, 2, 3] = np.inf
    assert problem.forward() == _native.Status.INVALID_ARGUMENT
    assert "unary" in _native.library().dynseg_last_error().decode()


def test_the_workspace_size_query_reads_no_array_so_placeholders_get_a_size():
    # a caller may size its workspace before the arrays hold data (the TensorRT plugin does); the compute
    # call is where their values are checked
    problem = HandMadeProblem()
    expected = ctypes.c_size_t()
    assert _native.library().dynseg_crf_workspace_size(ctypes.byref(problem.struct), _native.Pass.FORWARD,
                                                       ctypes.byref(expected)) == _native.Status.OK
    problem.weights[0][0] = np.nan
    problem.compat[0] = np.inf
    problem.image[...] = np.nan
    size = ctypes.c_size_t()
    assert _native.library().dynseg_crf_workspace_size(ctypes.byref(problem.struct), _native.Pass.FORWARD,
                                                       ctypes.byref(size)) == _native.Status.OK
    assert size.value == expected.value
    assert problem.forward() == _native.Status.INVALID_ARGUMENT


@pytest.mark.parametrize("where", ["image", "compat"])
def test_the_library_refuses_a_non_finite_image_or_compat_value_naming_it(where, smooth_image):
    # nothing above the C ABI checks these: a NaN feature would reach the lattice's hash keys
    image = planar(smooth_image(6, 7))
    compat = -np.eye(2, dtype=np.float32)
    (image if where == "image" else compat)[1, 1, ...] = np.nan
    problem = _native.Problem(2, 6, 7, image, [_native.Kernel(8.0, 13.0, np.ones(1, np.float32))], compat=compat,
                              normalization="after", iterations=1, output=_native.Output.LOGITS, threads=0)
    with pytest.raises(InvalidArgumentError, match=where):
        problem.forward(np.zeros((2, 6, 7), np.float32))


@pytest.mark.parametrize("where, named", [
    ("matrix weight", r"kernels\[1\]\.weight holds a non-finite value"), ("full compat", "compat holds a non-finite"),
    ("image", "image holds a non-finite"), ("unary", "unary holds a non-finite"),
])
def test_the_library_checks_every_value_of_an_array_up_to_the_last(where, named, smooth_image):
    # the last value of each array: a scan that stopped one short, or after L values of an L x L array, misses it
    labels, height, width = 3, 6, 7
    image = planar(smooth_image(height, width))
    weight = np.full((labels, labels), 0.5, np.float32)
    compat = -np.eye(labels, dtype=np.float32)
    unary = np.zeros((labels, height, width), np.float32)
    {"matrix weight": weight, "full compat": compat, "image": image, "unary": unary}[where].reshape(-1)[-1] = np.inf
    problem = _native.Problem(labels, height, width, image, [_native.Kernel(3.0, 0.0, np.ones(1, np.float32)),
                                                             _native.Kernel(8.0, 13.0, weight)],
                              compat=compat, normalization="after", iterations=1, output=_native.Output.LOGITS,
                              threads=0)
    with pytest.raises(InvalidArgumentError, match=named):
        problem.forward(unary)


def test_backward_refuses_non_finite_grad_logits_and_a_null_pointer_naming_them():
    problem = _native.Problem(2, 6, 7, None, [_native.Kernel(3.0, 0.0, np.ones(1, np.float32))], compat=None,
                              normalization="after", iterations=1, output=_native.Output.LOGITS, threads=0)
    unary, grad_unary = np.zeros((2, 6, 7), np.float32), np.zeros((2, 6, 7), np.float32)
    grad_logits = np.zeros_like(unary)
    grad_logits[-1, -1, -1] = np.nan
    with pytest.raises(InvalidArgumentError, match="grad_logits holds a non-finite value"):
        problem.backward(unary, grad_logits, [True], False)
    workspace = problem.host_workspace(_native.Pass.BACKWARD)
    status = _native.library().dynseg_crf_backward(
        ctypes.byref(problem.struct), unary.ctypes.data_as(_native._f32p), None,
        grad_unary.ctypes.data_as(_native._f32p), None, None, workspace.ctypes.data, workspace.nbytes)
    assert status == _native.Status.INVALID_ARGUMENT
    assert "grad_logits" in _native.library().dynseg_last_error().decode()


def _size_query_status(problem: _native._Problem, pass_: int = _native.Pass.FORWARD) -> tuple[int, str]:
    size = ctypes.c_size_t()
    status = _native.library().dynseg_crf_workspace_size(ctypes.byref(problem), pass_, ctypes.byref(size))
    return status, _native.library().dynseg_last_error().decode()


def _sizes_only(labels: int, height: int, width: int, iterations: int) -> _native._Problem:
    """A problem without kernels or image: the size query reads nothing per pixel, so no array is needed."""
    return _native._Problem(num_labels=labels, height=height, width=width, image_channels=0, image=None,
                            num_kernels=0, kernels=None, compat_kind=_native.CompatKind.POTTS, compat=None,
                            normalization=0, iterations=iterations, output=_native.Output.LOGITS, threads=1)


@pytest.mark.parametrize("height, width", [(1, (2**31 - 1) // 16), (3, (2**31 - 1) // 48 + 1),
                                           ((2**31 - 1) // 16 + 1, 1)])
def test_the_pixel_limit_is_int32_max_over_16_rounded_down_exactly(height, width):
    status, message = _size_query_status(_sizes_only(1, height, width, 1))
    if height * width <= (2**31 - 1) // 16:
        assert status == _native.Status.OK, message
    else:
        assert status == _native.Status.INVALID_ARGUMENT
        assert re.search(rf"image of {height}x{width} pixels is too large \(at most 134217727 pixels\)", message)


def test_labels_pixels_and_iterations_whose_product_overflows_are_refused_by_the_size_query():
    # 65536 labels x 134217727 pixels x (2**31 - 1) iterations of history: far past int64
    problem = _sizes_only(65536, 1, (2**31 - 1) // 16, 2**31 - 1)
    for pass_ in (_native.Pass.FORWARD, _native.Pass.BACKWARD):
        status, message = _size_query_status(problem, pass_)
        assert status == _native.Status.INVALID_ARGUMENT
        assert "num_labels x pixels x iterations overflows: 65536 x 134217727 x 2147483647" in message


@pytest.mark.parametrize("change, named", [
    ("matrix weights", "the kernel weights"), ("full compatibility", "the compatibility"),
    ("detection score", r"the detection scores \(largest \|score\| 3.4e\+38\)"),
])
def test_finite_inputs_that_overflow_float32_are_refused_not_returned_as_nan(change, named, smooth_image):
    labels, height, width = 4, 8, 10
    image = planar(smooth_image(height, width))
    weight = np.full((labels, labels), 3.4e38 if change == "matrix weights" else 1.0, np.float32)
    compat = np.full((labels, labels), 3.4e38, np.float32) if change == "full compatibility" else None
    detections = None
    if change == "detection score":
        detections = _native.DetectionPotential(
            boxes=np.array([[1, 1, 6, 5], [0, 0, 9, 7]], np.float32), labels=np.array([1, 2], np.int64),
            scores=np.array([3.4e38, 0.5], np.float32), detection_x=np.array([1.5], np.float32),
            detection_y=np.array([2.0], np.float32), score_ceiling=1.0, epsilon=1e-3,
            recalibrated=np.zeros(2, np.float32))
    problem = _native.Problem(labels, height, width, image, [_native.Kernel(3.0, 0.0, weight),
                                                             _native.Kernel(8.0, 13.0, weight)],
                              compat=compat, normalization="after", iterations=3, output=_native.Output.LOGITS,
                              threads=0, detection_potential=detections)
    unary = np.random.default_rng(0).normal(size=(labels, height, width)).astype(np.float32)
    with pytest.raises(InvalidArgumentError, match=f"the logits overflowed float32 during mean field: .*{named}"):
        problem.forward(unary)


def test_gradients_that_overflow_float32_are_refused_not_returned_as_nan(smooth_image):
    problem = one_kernel_problem(smooth_image(6, 7), "bilateral", labels=3)
    unary = np.zeros((3, 6, 7), np.float32)
    with pytest.raises(InvalidArgumentError, match="the gradients overflowed float32 during the backward pass"):
        problem.backward(unary, np.full_like(unary, 3.4e38), [True], False)


def test_a_compatibility_gradient_that_overflows_float32_is_refused_even_alone():
    # every pixel's gradient is finite, but dmu sums 80 of them (in double) past FLT_MAX; with no weight
    # gradient asked for, only grad_compat can tell
    labels, height, width = 2, 8, 10
    problem = _native.Problem(labels, height, width, None, [_native.Kernel(3.0, 0.0, np.ones(1, np.float32))],
                              compat=-np.ones(labels, np.float32), normalization="after", iterations=1,
                              output=_native.Output.LOGITS, threads=0)
    unary = np.zeros((labels, height, width), np.float32)
    grad_unary, _, _ = problem.backward(unary, np.full_like(unary, 3e37), [False], False)
    assert np.all(np.isfinite(grad_unary))
    with pytest.raises(InvalidArgumentError, match="the gradients overflowed float32 during the backward pass"):
        problem.backward(unary, np.full_like(unary, 3e37), [False], True)


def test_a_null_problem_is_rejected():
    size = ctypes.c_size_t()
    assert _native.library().dynseg_crf_workspace_size(None, 0, ctypes.byref(size)) == _native.Status.INVALID_ARGUMENT
    assert "problem" in _native.library().dynseg_last_error().decode()


@pytest.mark.skipif(not _native.cuda_compiled() or _native.cuda_device_count() > 0,
                    reason="needs a library with CUDA kernels on a machine without a usable GPU")
def test_the_cuda_workspace_query_without_a_usable_gpu_reports_a_cuda_error(smooth_image):
    # CUB sizes its storage for the current device, so the query asks for one first and says why there is none
    # (it said how CUB's sizing failed without one: "cudaErrorInvalidDevice (invalid device ordinal)")
    problem = one_kernel_problem(smooth_image(6, 7), "bilateral", labels=2)
    with pytest.raises(NativeError, match=r"\(CUDA_ERROR\): cudaGetDeviceCount failed: cuda"):
        problem.workspace_size_cuda(_native.Pass.FORWARD)


@pytest.mark.skipif(not _native.cuda_compiled(), reason="needs a library with CUDA kernels")
@pytest.mark.parametrize("square", ["matrix weight", "full compatibility"])
def test_the_cuda_calls_refuse_more_labels_than_their_32_bit_l_by_l_arrays_hold(square):
    # the check reads no array, so a device view of a few bytes stands in for the 8.6 GB one
    labels, placeholder = 46341, np.ones(4, np.float32)
    matrix = _native.DeviceArray(placeholder.ctypes.data, (labels, labels))
    weight = matrix if square == "matrix weight" else np.ones(1, np.float32)
    problem = _native.Problem(labels, 1, 1, None, [_native.Kernel(3.0, 0.0, weight)],
                              compat=matrix if square == "full compatibility" else None, normalization="after",
                              iterations=1, output=_native.Output.LOGITS, threads=0)
    with pytest.raises(InvalidArgumentError, match="num_labels must be at most 46340 for the CUDA kernels with a "
                                                   "matrix weight or a full compatibility"):
        problem.workspace_size_cuda(_native.Pass.BACKWARD)


def test_a_dynseg_library_variable_naming_no_file_is_an_error_not_a_fall_back(monkeypatch, tmp_path):
    # a comparison of two builds that silently timed the installed one would be a wrong measurement
    monkeypatch.setenv("DYNSEG_LIBRARY", str(tmp_path / "nowhere.so"))
    with pytest.raises(FileNotFoundError, match="nowhere.so"):
        dynseg.plugins.library_path()


def _stand_in_library(tmp_path, c_library, kind: str):
    """A file in the native library's place: none, a text file, or a shared library of one C function."""
    if kind == "missing":
        return tmp_path / "nowhere.so"
    if kind == "not a shared library":
        (tmp_path / "text.so").write_text("not a library")
        return tmp_path / "text.so"
    function = "something_else" if kind == "foreign" else "dynseg_abi_version"
    return c_library("stand_in", f"int {function}(void) {{ return 2; }}\n")


@pytest.mark.parametrize("kind, message", [
    ("missing", "dynseg's native library libdynseg_crf.so was not found"),
    ("not a shared library", "does not load: .*text.so"),
    ("foreign", "is not dynseg's native library: it has no dynseg_abi_version"),
    ("older ABI", "speaks C ABI 2, this dynseg needs 6: rebuild it"),
])
def test_a_library_that_is_missing_or_not_this_dynsegs_raises_a_native_error(monkeypatch, tmp_path, c_library, kind,
                                                                            message):
    monkeypatch.setattr(_native, "_lib", None)  # loaded afresh, from the variable
    monkeypatch.setenv("DYNSEG_LIBRARY", str(_stand_in_library(tmp_path, c_library, kind)))
    with pytest.raises(NativeError, match=message):
        _native.library()
    with pytest.raises(NativeError, match=message):
        dynseg.sdk.dense_crf(np.zeros((2, 4, 4), np.float32), np.zeros((4, 4, 3), np.uint8))


class _GpuArrayInterface:
    """Only the `__cuda_array_interface__` of a GPU array: what DeviceArray.of reads (no memory behind it)."""

    def __init__(self, shape, typestr="<f4", strides=None, read_only=False, **rest):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (4096, read_only),
                                         "strides": strides, "version": 3, **rest}


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 3), np.float32), "image must be a GPU array exposing __cuda_array_interface__"),
    (_GpuArrayInterface((2, 3), typestr="<f8"), "image must be float32, got float64"),
    (_GpuArrayInterface((2, 3), strides=(4, 8)), r"image must be C-contiguous, got strides \(4, 8\)"),
    (_GpuArrayInterface((3, 2)), r"image must have shape \(2, 3\), got \(3, 2\)"),
    (_GpuArrayInterface((2, 3), typestr="zz"), "image has a malformed __cuda_array_interface__"),
    (_GpuArrayInterface((2, 3), mask=_GpuArrayInterface((2, 3))), "image must not be a masked array"),
    (_GpuArrayInterface((2, -3)), r"image's __cuda_array_interface__ has shape \(2, -3\): sizes must be ints >= 0"),
    (_GpuArrayInterface((2, 3.5)), r"has shape \(2, 3\.5\): sizes must be ints >= 0"),
    (_GpuArrayInterface((2, 3), data=(-5, False)), "has data pointer -5: an address must be an int in 0..2\\*\\*64-1"),
    (_GpuArrayInterface((2, 3), data=(2**64, False)), "has data pointer 18446744073709551616"),
])
def test_a_gpu_array_is_checked_before_its_address_is_taken(array, message):
    with pytest.raises(InvalidArgumentError, match=message):
        _native.DeviceArray.of(array, "image", shape=(2, 3))


def test_a_gpu_array_is_c_contiguous_whatever_strides_its_size_1_axes_report():
    # the CUDA array interface lets a producer give any stride for an axis of one element, as numpy does
    view = _native.DeviceArray.of(_GpuArrayInterface((1, 2, 3), strides=(4, 12, 4)), "unary")
    assert view.shape == (1, 2, 3)
    assert _native.DeviceArray.of(_GpuArrayInterface((0, 3), strides=(4, 4)), "unary").shape == (0, 3)
    with pytest.raises(InvalidArgumentError, match="must be C-contiguous"):
        _native.DeviceArray.of(_GpuArrayInterface((2, 1, 3), strides=(4, 12, 4)), "unary")


def test_an_interface_without_its_address_and_a_read_only_output_are_named():
    incomplete = _GpuArrayInterface((2, 3))
    del incomplete.__cuda_array_interface__["data"]
    with pytest.raises(InvalidArgumentError, match="unary has a malformed __cuda_array_interface__"):
        _native.DeviceArray.of(incomplete, "unary")
    read_only = _GpuArrayInterface((2, 3), read_only=True)
    assert _native.DeviceArray.of(read_only, "unary").pointer == 4096  # read, never written: fine
    with pytest.raises(InvalidArgumentError, match="out is read-only"):
        _native.DeviceArray.of(read_only, "out", written=True)


def test_a_gpu_arrays_view_keeps_its_address_shape_and_dtype():
    view = _native.DeviceArray.of(_GpuArrayInterface((2, 3), typestr="<i8", strides=(24, 8)), "labels", dtype=np.int64)
    assert (view.pointer, view.shape, view.dtype) == (4096, (2, 3), np.dtype(np.int64))
    with pytest.raises(NativeError, match="int64 device array where the library reads float32"):
        _native._pointer(view)


def test_a_gpu_array_that_cannot_give_its_interface_is_named():
    class RequiresGrad:  # what a torch CUDA tensor that requires grad does
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    with pytest.raises(InvalidArgumentError, match="unary: Can't get __cuda_array_interface__"):
        _native.DeviceArray.of(RequiresGrad(), "unary")


def _problem(threads: int, iterations: int = 1) -> _native.Problem:
    return _native.Problem(2, 5, 6, None, [_native.Kernel(3.0, 0.0, np.array([1.0], np.float32))], compat=None,
                           normalization="after", iterations=iterations, output=_native.Output.PROBABILITIES,
                           threads=threads)


@pytest.mark.parametrize("threads", [-1, 2**31, 2**32 + 1])
def test_a_thread_count_past_int32_is_refused_before_ctypes_wraps_it(threads):
    with pytest.raises(InvalidArgumentError, match=rf"threads must be an int in 0\.\.2147483647, got {threads}"):
        _problem(threads)


@pytest.mark.parametrize("iterations", [-1, 2**31])
def test_an_iteration_count_past_int32_is_refused_too(iterations):
    with pytest.raises(InvalidArgumentError, match=rf"iterations must be an int in 0\.\.2147483647, got {iterations}"):
        _problem(1, iterations)


def test_counts_in_range_are_packed_as_given():
    problem = _problem(2**31 - 1, iterations=3)
    assert (problem.struct.threads, problem.struct.iterations) == (2**31 - 1, 3)
    q = _problem(2).forward(np.zeros((2, 5, 6), np.float32))
    np.testing.assert_allclose(q, 0.5, atol=1e-6)
