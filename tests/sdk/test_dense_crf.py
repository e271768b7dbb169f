"""dynseg.sdk.dense_crf, the numpy dense CRF on the native kernels: parity with pydensecrf and with the
PyTorch reference, determinism, run-time label counts, contiguity, and the checks of every argument."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dynseg.sdk import InvalidArgumentError, NativeError, _native, dense_crf, dense_crf_cuda
from dynseg.sdk.crf import CudaArray
from dynseg.trainer.crf import dense_crf_reference

PARITY_ATOL = 1e-5  # max |ΔQ|; measured worst cases are quoted next to each test
SPATIAL = (3.0, 3.0)
BILATERAL = (80.0, 13.0, 10.0)
KERNEL_SETS = {
    "spatial": (SPATIAL, None),
    "bilateral": (None, BILATERAL),
    "both": (SPATIAL, BILATERAL),
}


def softmax(unary: np.ndarray) -> np.ndarray:
    """float64 softmax over the label axis."""
    shifted = np.exp(unary.astype(np.float64) - unary.max(axis=0))
    return shifted / shifted.sum(axis=0)


def assert_the_crf_changed_q(q: np.ndarray, unary: np.ndarray) -> None:
    """Parity only means something if the pairwise terms moved Q well beyond the tolerance."""
    assert np.abs(q - softmax(unary)).max() > 1e-2


# ---------------------------------------------------------------------------- parity with pydensecrf


@pytest.mark.parametrize("kernel_set", sorted(KERNEL_SETS))
@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("iterations", [1, 5, 10])
@pytest.mark.parametrize("n_labels", [2, 21, 100])
def test_dense_crf_matches_pydensecrf_on_smooth_images(
    n_labels, iterations, normalization, kernel_set, smooth_image, smooth_unary, pydensecrf_q
):
    # measured worst case over this sweep: 1.2e-6
    spatial, bilateral = KERNEL_SETS[kernel_set]
    image, unary = smooth_image(48, 64), smooth_unary(n_labels, 48, 64)
    q = dense_crf(unary, image, iterations=iterations, spatial=spatial, bilateral=bilateral,
                  normalization=normalization)
    expected = pydensecrf_q(unary, image, iterations, spatial, bilateral, normalization)
    assert q.dtype == np.float32 and q.shape == unary.shape
    assert_the_crf_changed_q(q, unary)
    assert np.abs(q - expected).max() <= PARITY_ATOL


@pytest.mark.parametrize("kernel_set", sorted(KERNEL_SETS))
@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("height, width", [(37, 53), (53, 37), (1, 29), (29, 1)])
def test_dense_crf_matches_pydensecrf_on_odd_image_sizes(
    height, width, normalization, kernel_set, smooth_image, smooth_unary, pydensecrf_q
):
    # measured worst case: 3.8e-6 (37x53, 21 labels, 10 iterations, bilateral)
    spatial, bilateral = KERNEL_SETS[kernel_set]
    image, unary = smooth_image(height, width, seed=3), smooth_unary(21, height, width, seed=4)
    q = dense_crf(unary, image, iterations=10, spatial=spatial, bilateral=bilateral, normalization=normalization)
    expected = pydensecrf_q(unary, image, 10, spatial, bilateral, normalization)
    assert_the_crf_changed_q(q, unary)
    assert np.abs(q - expected).max() <= PARITY_ATOL


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("name", ["chelsea", "astronaut"])
def test_dense_crf_matches_pydensecrf_on_photos_it_was_not_tuned_on(
    name, normalization, photo, field_unary, pydensecrf_q
):
    # measured: 9.5e-7 on both photos, both normalisations
    image = photo(name)
    height, width = image.shape[:2]
    unary = field_unary(21, height, width)
    q = dense_crf(unary, image, iterations=5, normalization=normalization)
    expected = pydensecrf_q(unary, image, 5, SPATIAL, BILATERAL, normalization)
    assert (q.argmax(0) != unary.argmax(0)).mean() > 0.05  # the CRF relabels a good part of the photo
    assert np.abs(q - expected).max() <= PARITY_ATOL


def test_zero_iterations_return_the_softmax_of_the_unary(smooth_image, smooth_unary):
    unary = 3 * smooth_unary(5, 12, 17)
    q = dense_crf(unary, smooth_image(12, 17), iterations=0)
    assert np.abs(q - softmax(unary)).max() <= 1e-6  # measured 1.2e-7


def test_a_label_far_below_the_others_gets_probability_zero_not_a_floor():
    # 20 pixels (the vector loop and its tail), the gaps spanning the exp's reduction and its cut at -87
    gaps = np.linspace(0.0, 120.0, 20, dtype=np.float32)
    unary = np.stack([np.zeros_like(gaps), -gaps]).reshape(2, 1, 20)
    q = dense_crf(unary, None, iterations=0, spatial=None, bilateral=None)
    exact = 1.0 / (1.0 + np.exp(gaps.astype(np.float64)))  # Q of the lower label
    normal = exact > np.finfo(np.float32).tiny
    np.testing.assert_allclose(q[1, 0, normal], exact[normal], rtol=2e-6)
    assert (q[1, 0, gaps > 87] == 0).all()  # before: e^-87 = 1.6e-38, so log Q read -87 at any gap


def test_large_but_packable_lattice_keys_work(smooth_image, smooth_unary, pydensecrf_q):
    # spatial theta 0.5 on 300x300: features up to 600, far more lattice vertices than the default
    unary = smooth_unary(2, 300, 300)
    q = dense_crf(unary, None, spatial=(0.5, 3.0), bilateral=None)
    expected = pydensecrf_q(unary, None, 5, (0.5, 3.0), None, "after")
    assert np.abs(q - expected).max() <= PARITY_ATOL


# ---------------------------------------------------------------------------- parity with the PyTorch reference


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("n_labels", [2, 21, 100])
def test_dense_crf_matches_the_pytorch_reference(n_labels, normalization, smooth_image, smooth_unary):
    # measured worst case: 1.1e-6
    image, unary = smooth_image(48, 64, seed=5), smooth_unary(n_labels, 48, 64, seed=6)
    q = dense_crf(unary, image, iterations=5, normalization=normalization)
    expected = dense_crf_reference(torch.from_numpy(unary), torch.from_numpy(image), iterations=5,
                                   normalization=normalization).numpy()
    assert_the_crf_changed_q(q, unary)
    assert np.abs(q - expected).max() <= PARITY_ATOL


# ---------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("n_labels", [21, 100])  # 100 labels span several label tiles
def test_results_are_bitwise_identical_run_to_run_and_for_any_thread_count(
    n_labels, normalization, photo, field_unary
):
    image = photo("astronaut")  # 65536 pixels: enough work for every thread
    unary = field_unary(n_labels, *image.shape[:2], seed=7)
    first = dense_crf(unary, image, normalization=normalization)
    again = dense_crf(unary, image, normalization=normalization)
    assert first.tobytes() == again.tobytes()
    for threads in (1, 2, 3):
        assert np.array_equal(dense_crf(unary, image, normalization=normalization, threads=threads), first), threads


@pytest.mark.parametrize("n_labels", [33, 40, 64])
def test_label_counts_between_one_and_two_label_tiles_give_the_same_bits_on_one_thread_as_on_several(
    n_labels, smooth_image, smooth_unary
):
    # one thread streams at most 32 labels (one label tile); more must take the tiled path
    image, unary = smooth_image(30, 40), smooth_unary(n_labels, 30, 40, amplitude=6.0)
    one = dense_crf(unary, image, threads=1)
    assert np.array_equal(one, dense_crf(unary, image, threads=2))
    expected = dense_crf_reference(torch.from_numpy(unary), torch.from_numpy(image), iterations=5).numpy()
    assert np.abs(one - expected).max() <= PARITY_ATOL


def test_the_thread_count_reaches_the_native_library(monkeypatch, smooth_image, smooth_unary):
    # results do not depend on it (above), so a call-through spy sees what the library is asked for
    asked = []
    construct = _native.Problem.__init__

    def spy(self, *args, **kwargs):
        asked.append(kwargs["threads"])
        construct(self, *args, **kwargs)

    monkeypatch.setattr(_native.Problem, "__init__", spy)
    unary, image = smooth_unary(3, 9, 11), smooth_image(9, 11)
    for threads in (1, 2, None):
        dense_crf(unary, image, threads=threads)
    assert asked == [1, 2, 0]  # None: the library's own count


# ---------------------------------------------------------------------------- label counts


def test_a_single_label_gets_probability_one_everywhere(smooth_image, smooth_unary):
    q = dense_crf(smooth_unary(1, 9, 11), smooth_image(9, 11))
    assert q.shape == (1, 9, 11)
    assert np.all(q == 1.0)


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("n_labels", [256, 257, 300])
def test_label_counts_of_256_and_more_run_and_match_pydensecrf(
    n_labels, normalization, smooth_image, smooth_unary, pydensecrf_q
):
    # measured worst case: 3.2e-6 (amplitude 6 makes Q peaked, so the comparison is not of tiny numbers)
    image, unary = smooth_image(24, 32), smooth_unary(n_labels, 24, 32, amplitude=6.0)
    q = dense_crf(unary, image, normalization=normalization)
    expected = pydensecrf_q(unary, image, 5, SPATIAL, BILATERAL, normalization)
    assert_the_crf_changed_q(q, unary)
    assert np.abs(q - expected).max() <= PARITY_ATOL


# ---------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(np.asfortranarray, id="fortran-order"),
        pytest.param(lambda u: u[:, ::-1, ::2], id="reversed-and-strided"),
        pytest.param(lambda u: np.moveaxis(np.ascontiguousarray(np.moveaxis(u, 0, -1)), -1, 0), id="labels-last"),
    ],
)
def test_non_contiguous_unary_gives_the_result_of_its_contiguous_copy(view, smooth_image, smooth_unary):
    unary = view(smooth_unary(6, 20, 30))
    assert not unary.flags.c_contiguous
    image = smooth_image(*unary.shape[1:])
    expected = dense_crf(np.ascontiguousarray(unary), image)
    assert np.array_equal(dense_crf(unary, image), expected)


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(np.asfortranarray, id="fortran-order"),
        pytest.param(lambda i: i[::-1, ::2], id="reversed-and-strided"),
        pytest.param(lambda i: np.concatenate([i, i[..., :1]], axis=2)[..., :3], id="rgb-of-rgba"),
    ],
)
def test_non_contiguous_image_gives_the_result_of_its_contiguous_copy(view, smooth_image, smooth_unary):
    image = view(smooth_image(20, 30))
    assert not image.flags.c_contiguous
    unary = smooth_unary(6, *image.shape[:2])
    expected = dense_crf(unary, np.ascontiguousarray(image))
    assert np.array_equal(dense_crf(unary, image), expected)


def test_the_inputs_are_not_modified(smooth_image, smooth_unary):
    unary, image = smooth_unary(4, 10, 12), smooth_image(10, 12)
    unary_before, image_before = unary.copy(), image.copy()
    dense_crf(unary, image)
    assert np.array_equal(unary, unary_before) and np.array_equal(image, image_before)


# ---------------------------------------------------------------------------- argument checks


def _good():
    rng = np.random.default_rng(0)
    unary = rng.standard_normal((3, 4, 5)).astype(np.float32)
    image = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return unary, image, {}


def _with_unary(value):
    return lambda u, i, kw: (value(u), i, kw)


def _with_image(value):
    return lambda u, i, kw: (u, value(i), kw)


def _with(**changes):
    return lambda u, i, kw: (u, i, {**kw, **changes})


def _nan_at_one_pixel(u):
    u = u.copy()
    u[1, 2, 3] = np.nan
    return u


def _inf_at_one_pixel(u):
    u = u.copy()
    u[0, 0, 0] = -np.inf
    return u


BAD_INPUTS = {
    "unary float64": (_with_unary(lambda u: u.astype(np.float64)), "unary"),
    "unary int": (_with_unary(lambda u: u.astype(np.int32)), "unary"),
    "unary a list": (_with_unary(lambda u: u.tolist()), "unary"),
    "unary rank 2": (_with_unary(lambda u: u[0]), "unary"),
    "unary rank 4": (_with_unary(lambda u: u[None]), "unary"),
    "unary L=0": (_with_unary(lambda u: u[:0]), "unary"),
    "unary L past the kernels' 65536": (lambda u, i, kw: (np.zeros((65537, 1, 1), np.float32), i[:1, :1], kw),
                                        r"unary must have at most 65536 labels \(L, its first axis\)"),
    "unary H=0": (lambda u, i, kw: (u[:, :0], i[:0], kw), "unary"),
    "unary W=0": (lambda u, i, kw: (u[:, :, :0], i[:, :0], kw), "unary"),
    "unary NaN": (_with_unary(_nan_at_one_pixel), "unary"),
    "unary inf": (_with_unary(_inf_at_one_pixel), "unary"),
    "unary masked": (_with_unary(lambda u: np.ma.masked_less(u, 0)), "unary must not be a masked array"),
    "image masked": (_with_image(lambda i: np.ma.masked_equal(i, 0)), "image must not be a masked array"),
    "image float": (_with_image(lambda i: i.astype(np.float32)), "image"),
    "image rank 2": (_with_image(lambda i: i[..., 0]), "image"),
    "image 4 channels": (_with_image(lambda i: np.concatenate([i, i[..., :1]], axis=2)), "image"),
    "image channels first": (_with_image(lambda i: np.ascontiguousarray(i.transpose(2, 0, 1))), "image"),
    "image too short": (_with_image(lambda i: i[:3]), "image"),
    "image too narrow": (_with_image(lambda i: i[:, :4]), "image"),
    "image transposed": (_with_image(lambda i: np.ascontiguousarray(i.transpose(1, 0, 2))), "image"),
    "image missing for bilateral": (_with_image(lambda i: None), "image must be given when bilateral is not None"),
    "spatial theta 0": (_with(spatial=(0.0, 3.0)), r"spatial\[0\] \(theta_gamma\)"),
    "spatial theta negative": (_with(spatial=(-3.0, 3.0)), r"spatial\[0\] \(theta_gamma\)"),
    "spatial theta NaN": (_with(spatial=(float("nan"), 3.0)), r"spatial\[0\] \(theta_gamma\)"),
    "spatial theta inf": (_with(spatial=(float("inf"), 3.0)), r"spatial\[0\] \(theta_gamma\)"),
    "spatial weight NaN": (_with(spatial=(3.0, float("nan"))), r"spatial\[1\] \(weight\)"),
    "spatial weight a string": (_with(spatial=(3.0, "3")), r"spatial\[1\] \(weight\)"),
    "spatial too short": (_with(spatial=(3.0,)), "spatial"),
    "spatial too long": (_with(spatial=(3.0, 3.0, 3.0)), "spatial"),
    "spatial a number": (_with(spatial=3.0), "spatial"),
    "bilateral theta_xy 0": (_with(bilateral=(0.0, 13.0, 10.0)), r"bilateral\[0\] \(theta_alpha\)"),
    "bilateral theta_xy NaN": (_with(bilateral=(float("nan"), 13.0, 10.0)), r"bilateral\[0\] \(theta_alpha\)"),
    "bilateral theta_rgb 0": (_with(bilateral=(80.0, 0.0, 10.0)), r"bilateral\[1\] \(theta_beta\)"),
    "bilateral theta_rgb negative": (_with(bilateral=(80.0, -13.0, 10.0)), r"bilateral\[1\] \(theta_beta\)"),
    "bilateral theta_rgb NaN": (_with(bilateral=(80.0, float("nan"), 10.0)), r"bilateral\[1\] \(theta_beta\)"),
    "bilateral weight NaN": (_with(bilateral=(80.0, 13.0, float("nan"))), r"bilateral\[2\] \(weight\)"),
    "bilateral theta_rgb 0 in float32": (_with(bilateral=(80.0, 1e-46, 10.0)), r"bilateral\[1\] \(theta_beta\)"),
    "bilateral theta_xy inf in float32": (_with(bilateral=(1e39, 13.0, 10.0)), r"bilateral\[0\] \(theta_alpha\)"),
    "spatial weight inf in float32": (_with(spatial=(3.0, 1e39)), r"spatial\[1\] \(weight\)"),
    "bilateral theta_xy an int beyond float64": (_with(bilateral=(10**400, 13.0, 10.0)),
                                                 r"bilateral\[0\] \(theta_alpha\)"),
    "bilateral too short": (_with(bilateral=(80.0, 13.0)), "bilateral"),
    "bilateral too long": (_with(bilateral=(80.0, 13.0, 10.0, 1.0)), "bilateral"),
    "iterations negative": (_with(iterations=-1), "iterations"),
    "iterations 2.5": (_with(iterations=2.5), "iterations"),
    "iterations True": (_with(iterations=True), "iterations"),
    "iterations a string": (_with(iterations="5"), "iterations"),
    "iterations beyond 32 bits": (_with(iterations=2**31), "iterations"),
    "normalization unknown": (_with(normalization="before"), "normalization"),
    "normalization None": (_with(normalization=None), "normalization"),
    "normalization a list": (_with(normalization=["after"]), "normalization"),
    "device gpu": (_with(device="gpu"), "device"),
    "device cuda:99": (_with(device="cuda:99"),
                       r"device='cuda:99' but the native library sees \d+ CUDA|built without CUDA"),
    "device cuda:x": (_with(device="cuda:x"), "device"),
    "device cuda:": (_with(device="cuda:"), "device"),
    "device cuda:²": (_with(device="cuda:²"), "device"),
    "threads 0": (_with(threads=0), "threads"),
    "threads -1": (_with(threads=-1), "threads"),
    "threads 1.5": (_with(threads=1.5), "threads"),
    "threads True": (_with(threads=True), "threads"),
    "threads beyond 32 bits": (_with(threads=2**31), "threads"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_a_value_error_naming_the_argument(case):
    change, name = BAD_INPUTS[case]
    unary, image, kwargs = change(*_good())
    with pytest.raises(InvalidArgumentError, match=name) as raised:
        dense_crf(unary, image, **kwargs)
    assert isinstance(raised.value, ValueError)


@pytest.mark.skipif(not _native.cuda_compiled(), reason="needs a library with CUDA kernels to count the devices")
def test_the_first_device_index_past_the_last_gpu_is_refused(smooth_image, smooth_unary):
    past = _native.cuda_device_count()  # cuda:0 on a machine without a GPU
    with pytest.raises(InvalidArgumentError, match=f"device='cuda:{past}' but the native library sees {past} CUDA"):
        dense_crf(smooth_unary(2, 6, 7), smooth_image(6, 7), device=f"cuda:{past}")


def test_finite_inputs_whose_logits_overflow_float32_raise_rather_than_return_nan():
    unary = np.where(np.random.default_rng(0).random((2, 8, 12)) < 0.5, -3e38, 3e38).astype(np.float32)
    with pytest.raises(InvalidArgumentError, match="overflowed float32"):
        dense_crf(unary, None, spatial=(3.0, 1e38), bilateral=None)


def test_image_may_be_none_when_there_is_no_bilateral_kernel(smooth_image, smooth_unary):
    unary = smooth_unary(3, 10, 12)
    without_image = dense_crf(unary, None, bilateral=None)
    with_image = dense_crf(unary, smooth_image(10, 12), bilateral=None)
    assert np.array_equal(without_image, with_image)  # the spatial kernel never reads the image
    assert_the_crf_changed_q(without_image, unary)


def test_no_kernels_at_all_return_the_softmax_of_the_unary(smooth_unary):
    unary = smooth_unary(4, 6, 7)
    q = dense_crf(unary, None, spatial=None, bilateral=None, iterations=3)
    assert np.abs(q - softmax(unary)).max() <= 1e-6


# ---------------------------------------------------------------------------- lattice key range

_KEY_RANGE_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from dynseg.sdk import dense_crf
    from dynseg.sdk.errors import LatticeRangeError
    height, width = {height}, {width}
    unary = np.zeros((2, height, width), np.float32)
    if "{image}" == "gradient":
        yy, xx = np.mgrid[0:height, 0:width]
        image = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    else:  # two flat colours, left and right
        image = np.full((height, width, 3), 100, np.uint8)
        image[:, width // 2:] = 200
    try:
        dense_crf(unary, image, spatial={spatial}, bilateral={bilateral}, threads={threads})
    except LatticeRangeError as error:  # an InvalidArgumentError
        print("LatticeRangeError:", error)
    else:
        print("no error")
    """
)

KEY_RANGE_CASES = {
    "bilateral theta_rgb 1e-7 on a gradient": dict(
        height=48, width=64, image="gradient", spatial=None, bilateral=(80.0, 1e-7, 10.0)),
    "bilateral theta_rgb 1e-7 on two flat colours": dict(
        height=48, width=64, image="two-colour", spatial=None, bilateral=(80.0, 1e-7, 10.0)),
    "bilateral theta_xy 1e-6": dict(
        height=48, width=64, image="gradient", spatial=None, bilateral=(1e-6, 13.0, 10.0)),
    "spatial theta 1e-6 on 1000x1000": dict(
        height=1000, width=1000, image="gradient", spatial=(1e-6, 3.0), bilateral=None),
    # features up to 1.5e8: far beyond float32's exact integers (2**24), the lattice is meaningless
    "spatial theta 1e-6 on 150x150": dict(
        height=150, width=150, image="gradient", spatial=(1e-6, 3.0), bilateral=None),
    # features up to 1.7e6: inside 2^22 / d, but the elevated coordinates sum 2d of them
    "spatial theta 1e-3 on 1x1000": dict(
        height=1, width=1000, image="gradient", spatial=(1e-3, 3.0), bilateral=None),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(KEY_RANGE_CASES))
def test_features_too_wide_for_the_lattice_keys_raise_a_value_error_and_never_crash(case, threads):
    # Each case runs in a child process: a test that the library never crashes has to outlive a crash.
    script = _KEY_RANGE_SCRIPT.format(threads=threads, **KEY_RANGE_CASES[case])
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"crashed with exit status {child.returncode}: {child.stderr[-2000:]}"
    assert child.stdout.startswith("LatticeRangeError:"), child.stdout
    assert "lattice" in child.stdout and "theta" in child.stdout, child.stdout
    assert "spatial[0] is the spatial kernel's theta_xy" in child.stdout, child.stdout  # the caller's names


# Each child restores Python's Ctrl-C handler first: a test run started as a background job of a
# non-interactive shell ignores SIGINT, and its children inherit that.
_ENDLESS_CALL = textwrap.dedent("""
    import signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import numpy as np
    from dynseg.sdk import dense_crf
    unary = np.zeros((2, 64, 64), np.float32)
    print("calling", flush=True)
    try:
        dense_crf(unary, None, bilateral=None, iterations=2**31 - 1)  # hours of mean field
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        print(dense_crf(unary[:, :8, :8], None, bilateral=None, iterations=2).shape, flush=True)  # usable again
        sys.exit(3)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, as Ctrl-C does on POSIX")
def test_ctrl_c_stops_a_long_call_at_its_next_iteration():
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-c", _ENDLESS_CALL], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout.readline().strip() == "calling"
        time.sleep(1.0)  # into the library: a signal before the call would interrupt Python, not the library
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)  # the call alone would take hours
    finally:
        process.kill()
    assert process.returncode == 3, output
    assert output.split() == ["interrupted", "(2,", "8,", "8)"]


_INTERRUPTED_WAIT = textwrap.dedent("""
    import os, signal, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from dynseg.sdk import _native
    returned = []

    def slow_call():  # stands in for a library call: Ctrl-C arrives while the main thread waits for it
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)
        returned.append(True)
        return 0

    try:
        _native._cpu_call(_native._INTERRUPTIBLE_FROM, slow_call)
    except KeyboardInterrupt:
        print("interrupted after the call returned:", returned == [True], flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, as Ctrl-C does on POSIX")
def test_ctrl_c_is_raised_only_once_the_call_it_cancels_has_returned():
    # Until then the call writes into the caller's arrays and the thread's workspace; CPython 3.11's
    # Thread.join, interrupted, can report a running thread as stopped.
    child = subprocess.run([sys.executable, "-c", _INTERRUPTED_WAIT], capture_output=True, text=True, timeout=120)
    assert child.stdout.strip() == "interrupted after the call returned: True", child.stdout + child.stderr


_FORKED_CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    from dynseg.sdk import dense_crf
    unary = np.random.default_rng(0).normal(size=(3, 96, 96)).astype(np.float32)
    expected = dense_crf(unary, None, bilateral=None, threads=2)  # the pool's threads start
    child = os.fork()
    if child == 0:  # its copy of the pool has no threads: the child must neither hang nor lose them
        same = np.array_equal(dense_crf(unary, None, bilateral=None, threads=2), expected)
        print("child", same, flush=True)
        sys.exit(0)  # a normal exit, with its atexit work and static destructors
    _, status = os.waitpid(child, 0)
    print("parent", os.waitstatus_to_exitcode(status), flush=True)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the pool starts threads only with 2 CPUs or more")
def test_a_forked_child_runs_the_crf_on_threads_and_exits():
    child = subprocess.run([sys.executable, "-c", _FORKED_CHILD], capture_output=True, text=True, timeout=120)
    assert child.stdout.split() == ["child", "True", "parent", "0"], child.stdout + child.stderr


def test_a_long_call_runs_directly_where_no_helper_thread_can_start(monkeypatch):
    import threading

    unary = np.random.default_rng(0).normal(size=(2, 512, 512)).astype(np.float32)  # 2^22 labels x pixels x T
    expected = dense_crf(unary, None, bilateral=None, iterations=8)

    def refuse(thread):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert np.array_equal(dense_crf(unary, None, bilateral=None, iterations=8), expected)


_NO_THREADS = "#include <errno.h>\nint pthread_create(void* t, const void* a, void* (*f)(void*), void* x) { return EAGAIN; }\n"

_SEVERAL_THREADS_WITHOUT_THREADS = textwrap.dedent("""
    import numpy as np
    from dynseg.sdk import dense_crf
    unary = np.random.default_rng(0).normal(size=(3, 512, 512)).astype(np.float32)
    image = np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    q = dense_crf(unary, image, iterations=6, threads=2)  # over 2^22 labels x pixels x iterations: a helper thread
    np.save(__import__("sys").argv[1], q)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="preloads a C library that refuses every thread")
def test_where_no_thread_can_start_a_call_on_several_threads_runs_on_the_callers_alone(tmp_path, c_library):
    import os

    environment = {**os.environ, "LD_PRELOAD": str(c_library("no_threads", _NO_THREADS)), "OMP_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", _SEVERAL_THREADS_WITHOUT_THREADS, str(tmp_path / "q.npy")],
                           env=environment, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    unary = np.random.default_rng(0).normal(size=(3, 512, 512)).astype(np.float32)
    image = np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    assert np.array_equal(np.load(tmp_path / "q.npy"), dense_crf(unary, image, iterations=6, threads=2))


def _softmax(unary: np.ndarray) -> np.ndarray:
    e = np.exp(unary - unary.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_kernels_of_weight_zero_leave_the_softmax_of_the_unary(normalization, smooth_image, smooth_unary):
    image, unary = smooth_image(20, 27), smooth_unary(4, 20, 27)
    q = dense_crf(unary, image, iterations=4, spatial=(3.0, 0.0), bilateral=(80.0, 13.0, 0.0),
                  normalization=normalization)
    np.testing.assert_allclose(q, _softmax(unary), atol=1e-6, rtol=0)


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_negative_kernel_weights_are_pydensecrfs_negative_compat(normalization, smooth_image, smooth_unary,
                                                                 pydensecrf_q):
    image, unary = smooth_image(20, 27), smooth_unary(3, 20, 27)
    spatial, bilateral = (3.0, -2.0), (30.0, 13.0, -4.0)
    q = dense_crf(unary, image, iterations=3, spatial=spatial, bilateral=bilateral, normalization=normalization)
    expected = pydensecrf_q(unary, image, 3, spatial, bilateral, normalization)
    assert np.abs(q - _softmax(unary)).max() > 1e-2  # the kernels did act
    assert np.abs(q - expected).max() <= 1e-5


class _GpuUnary:
    """Only the `__cuda_array_interface__` of a (2, 4, 4) float32 GPU array: no memory behind it, so no
    call may get as far as the device."""

    __cuda_array_interface__ = {"shape": (2, 4, 4), "typestr": "<f4", "data": (4096, False), "strides": None,
                                "version": 3}


@pytest.mark.skipif(_native.cuda_device_count() > 0, reason="this machine has a GPU")
def test_dense_crf_cuda_without_a_gpu_names_itself_not_a_device_argument_it_lacks():
    with pytest.raises(InvalidArgumentError, match=r"^dense_crf_cuda needs (a GPU, but the native library sees 0 "
                                                   r"CUDA device|the CUDA kernels, but this dynseg native library)"):
        dense_crf_cuda(_GpuUnary(), None, bilateral=None)


class _Interface:
    def __init__(self, interface):
        self._interface = interface

    @property
    def __cuda_array_interface__(self):
        if isinstance(self._interface, Exception):
            raise self._interface
        return self._interface


@pytest.mark.parametrize("interface, message", [
    ({**_GpuUnary.__cuda_array_interface__, "strides": 5}, "malformed __cuda_array_interface__"),
    ({**_GpuUnary.__cuda_array_interface__, "strides": (4, 4)}, "must be C-contiguous, got strides"),
    (TypeError("no interface for you"), "unary: no interface for you"),
    ({**_GpuUnary.__cuda_array_interface__, "data": (4096,)}, "malformed __cuda_array_interface__"),
])
def test_a_malformed_cuda_array_interface_is_named(interface, message):
    with pytest.raises(InvalidArgumentError, match=message):
        _native.DeviceArray.of(_Interface(interface), "unary")


def test_a_unary_off_a_4_byte_boundary_reaches_the_kernels_aligned(smooth_image, smooth_unary):
    # a float32 view of a byte buffer at an odd offset: the kernels' float loads assume alignment
    unary, image = smooth_unary(3, 9, 11), smooth_image(9, 11)
    buffer = np.zeros(unary.nbytes + 1, np.uint8)
    misaligned = buffer[1:].view(np.float32).reshape(unary.shape)
    misaligned[...] = unary
    assert not misaligned.flags.aligned
    np.testing.assert_array_equal(dense_crf(misaligned, image), dense_crf(unary, image))
    with pytest.raises(NativeError, match="contiguous, aligned float32"):
        _native._pointer(misaligned)


@pytest.mark.parametrize("stream", [-1, 2**64, True, 1.0, "0"])
def test_a_stream_that_is_no_address_is_named_before_any_gpu_is_asked_for(stream):
    # ctypes would have wrapped 2**64 to 0, the legacy default stream, without a word
    with pytest.raises(InvalidArgumentError, match="stream must be a cudaStream_t address"):
        dense_crf_cuda(_GpuUnary(), None, bilateral=None, stream=stream)


@pytest.mark.parametrize("shape, message", [
    ((-2, 3), r"^shape\[0\] must be a non-negative int, got -2$"),  # else a 1-byte buffer posing as its shape
    ((2.5, 3), r"^shape\[0\] must be a non-negative int, got 2.5$"),  # else silently (2, 3)
    ((2, "3"), r"^shape\[1\] must be a non-negative int, got '3'$"),
    (6, r"^shape must be a tuple of ints, got int$"),
    # numpy's int64 product wraps these to 0 and to a negative: a 1-byte buffer posing as the shape
    ((2**31, 2**31, 4), r"holds 73786976294838206464 bytes of float32, more than an address space"),
    ((2**62, 3), r"more than an address space"),
])
def test_a_cuda_array_of_a_bad_shape_is_refused_before_any_allocation(shape, message):
    with pytest.raises(InvalidArgumentError, match=message):
        CudaArray(shape)


def test_a_call_a_signal_handler_makes_during_a_long_call_gets_a_workspace_of_its_own():
    # the handler runs on the main thread while the long call computes on a helper thread in this
    # thread's workspace: sharing it, both results came back wrong, with no error
    import signal

    from dynseg.sdk import _native

    rng = np.random.default_rng(0)
    first, second = (rng.normal(size=(8, 300, 300)).astype(np.float32) for _ in range(2))
    image = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    expected = [dense_crf(unary, image, iterations=10) for unary in (first, second)]
    inner: list[np.ndarray] = []
    began: list[bool] = []

    def handler(signum, frame):  # a periodic refresh, say, that segments too (once: it fires again meanwhile)
        computing = any(not done.is_set() for done in _native._local.__dict__.get("calls_in_flight", []))
        if computing and not began:
            began.append(True)
            inner.append(dense_crf(second, image, iterations=10))

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
    try:
        outer = dense_crf(first, image, iterations=10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert inner, "the handler never ran while the call computed"
    np.testing.assert_array_equal(outer, expected[0])
    np.testing.assert_array_equal(inner[0], expected[1])
