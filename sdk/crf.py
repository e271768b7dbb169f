"""The public numpy dense CRF: a fast drop-in for pydensecrf on the native kernel library.

Owns the user-facing checks of `dense_crf` and `dense_crf_cuda` (every bad input is a ValueError
naming the argument) and the translation of their densecrf-style parameters into a native `Problem`.
The checks of densecrf's parameters and arrays live here, so the torch front ends of dynseg.trainer.crf
share them: `gaussian_kernels` and `check_image_shape`; the iteration, normalisation and thread
counts are `checks`' own. `_native.Problem` guards the ctypes boundary itself. The maths and the
lattice are described in docs/crf.md; the readable PyTorch definition is dynseg.trainer.crf.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from . import _native
from .errors import InvalidArgumentError, LatticeRangeError
from .checks import (Normalization, check_iterations, check_normalization, check_threads, finite_float32, int_in,
                     positive_in_float32, refuse_masked)
from .inputs import cuda_index

__all__ = ["CudaArray", "dense_crf", "dense_crf_cuda", "gaussian_kernels"]


def _number(name: str, value: object, *, positive: bool) -> float:
    number = finite_float32(value)
    if number is None or (positive and not positive_in_float32(number)):
        raise InvalidArgumentError(
            f"{name} must be {'a positive' if positive else 'a'} finite float32 number, got {value!r}")
    return number


def gaussian_kernels(
    spatial: tuple[float, float] | None, bilateral: tuple[float, float, float] | None, *, has_image: bool
) -> list[tuple[float, float, float]]:
    """Checks densecrf-style kernel parameters and returns (theta_xy, theta_color, weight) per kernel,
    spatial first (theta_color = 0), then bilateral, which needs an image (`has_image`). Shared by the
    numpy and torch front ends."""
    kernels = []
    if spatial is not None:
        if not isinstance(spatial, (tuple, list)) or len(spatial) != 2:
            raise InvalidArgumentError(f"spatial must be (theta_gamma, weight) or None, got {spatial!r}")
        kernels.append((_number("spatial[0] (theta_gamma)", spatial[0], positive=True), 0.0,
                        _number("spatial[1] (weight)", spatial[1], positive=False)))
    if bilateral is not None:
        if not isinstance(bilateral, (tuple, list)) or len(bilateral) != 3:
            raise InvalidArgumentError(
                f"bilateral must be (theta_alpha, theta_beta, weight) or None, got {bilateral!r}")
        kernels.append((_number("bilateral[0] (theta_alpha)", bilateral[0], positive=True),
                        _number("bilateral[1] (theta_beta)", bilateral[1], positive=True),
                        _number("bilateral[2] (weight)", bilateral[2], positive=False)))
        if not has_image:
            raise InvalidArgumentError("image must be given when bilateral is not None")
    return kernels


def _check_unary_shape(shape: tuple[int, ...]) -> None:
    """(L, H, W) with every axis >= 1 and L within the library's label count: host and device unaries."""
    if len(shape) != 3:
        raise InvalidArgumentError(f"unary must have shape (L, H, W), got shape {shape}")
    if min(shape) < 1:
        raise InvalidArgumentError(f"unary must have L, H, W >= 1, got shape {shape}")
    if shape[0] > _native.MAX_LABELS:
        raise InvalidArgumentError(f"unary must have at most {_native.MAX_LABELS} labels (L, its first axis), "
                                   f"got shape {shape}")


def check_image_shape(shape: tuple[int, ...], height: int, width: int) -> None:
    """An RGB image's (H, W, 3) matching the unary's (L, H, W): host, device and torch images."""
    if tuple(shape) != (height, width, 3):
        raise InvalidArgumentError(f"image must have shape (H, W, 3) = ({height}, {width}, 3) to match unary, "
                                   f"got {tuple(shape)}")


def _check_unary(unary: object) -> np.ndarray:
    if not isinstance(unary, np.ndarray):
        raise InvalidArgumentError(f"unary must be a numpy array, got {type(unary).__name__}")
    refuse_masked("unary", unary)
    if unary.dtype != np.float32:
        raise InvalidArgumentError(f"unary must be float32 logits, got dtype {unary.dtype}")
    _check_unary_shape(unary.shape)
    # finiteness is checked by the native library, which scans the values anyway; a float32 view of a
    # byte buffer may sit off a 4-byte boundary, which the kernels' float loads assume: copied then
    return np.require(unary, requirements=["C", "A"])


def _check_image(image: object, height: int, width: int) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, the native library's planar layout."""
    if image is None:
        return None
    if not isinstance(image, np.ndarray):
        raise InvalidArgumentError(f"image must be a numpy array, got {type(image).__name__}")
    refuse_masked("image", image)
    if image.dtype != np.uint8:
        raise InvalidArgumentError(f"image must be uint8 RGB, got dtype {image.dtype}")
    check_image_shape(image.shape, height, width)
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def _densecrf_problem(
    num_labels: int, height: int, width: int, image: np.ndarray | _native.DeviceArray | None,
    kernels: list[tuple[float, float, float]], normalization: str, iterations: int, threads: int,
    weights: Sequence[np.ndarray | _native.DeviceArray] | None = None,
) -> _native.Problem:
    """The native problem of densecrf's model: label-agnostic Potts kernels, probabilities out. The
    kernels' weights are read from `weights` (one value each; device arrays for a CUDA call), else
    from host copies of the kernels' own."""
    if weights is None:
        weights = [np.array([weight], dtype=np.float32) for _, _, weight in kernels]
    return _native.Problem(
        num_labels, height, width, image,
        [_native.Kernel(theta_xy, theta_color, weight) for (theta_xy, theta_color, _), weight in zip(kernels, weights)],
        compat=None,
        normalization=normalization,
        iterations=iterations,
        output=_native.Output.PROBABILITIES,
        threads=threads,
    )


@contextmanager
def _thetas_named_as_given() -> Iterator[None]:
    """The library's message names a kernel's theta_xy and theta_color; the caller gave them as
    `spatial` and `bilateral` entries: say which are which."""
    try:
        yield
    except LatticeRangeError as error:
        raise LatticeRangeError(f"{error} (spatial[0] is the spatial kernel's theta_xy; bilateral[0] and "
                                "bilateral[1] are the bilateral kernel's theta_xy and theta_color)") from None


def dense_crf(
    unary: np.ndarray,
    image: np.ndarray | None,
    *,
    iterations: int = 5,
    spatial: tuple[float, float] | None = (3.0, 3.0),
    bilateral: tuple[float, float, float] | None = (80.0, 13.0, 10.0),
    normalization: Normalization = "after",
    device: str = "cpu",
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
        device: "cpu", or "cuda" / "cuda:N" to run on a GPU (numpy in and out: the arrays are copied
            to the device and back; see `dense_crf_cuda` for arrays already on the GPU).
        threads: None for every core; 1 forces one thread. Results are identical for any count
            (ignored on a GPU).

    Returns:
        Q: float32 (L, H, W) label probabilities after `iterations` updates.

    Raises:
        ValueError (InvalidArgumentError): naming the argument and the problem.

    Its time grows with H·W·L·iterations. On the main thread, Ctrl-C stops a long CPU call before its
    next mean-field iteration (docs/crf.md §2); on a GPU the call runs to its end.
    """
    unary = _check_unary(unary)
    num_labels, height, width = unary.shape
    iterations = check_iterations(iterations)
    normalization = check_normalization(normalization)
    n_threads = check_threads(threads)
    kernels = gaussian_kernels(spatial, bilateral, has_image=image is not None)
    planar_image = _check_image(image, height, width)
    index = cuda_index(device)
    problem = _densecrf_problem(num_labels, height, width, planar_image, kernels, normalization, iterations,
                                n_threads if index is None else 0)
    # the library refuses a result that finite inputs overflowed on the way, rather than return its NaN
    with _thetas_named_as_given():
        if index is None:
            return problem.forward(unary)
        _native.check_cuda_device(index)
        return problem.forward_from_host(unary, index)


class CudaArray:
    """A float32 array in GPU memory that `dense_crf_cuda` allocated; hand it to torch.as_tensor(...,
    device="cuda") or cupy.asarray through its `__cuda_array_interface__` (no copy). Keep it alive
    while they use it: the memory is freed with this object."""

    def __init__(self, shape: tuple[int, ...]):
        if not isinstance(shape, (tuple, list)):
            raise InvalidArgumentError(f"shape must be a tuple of ints, got {type(shape).__name__}")
        self.shape = tuple(int_in(f"shape[{axis}]", n, 0) for axis, n in enumerate(shape))
        nbytes = 4 * math.prod(self.shape)  # exact: numpy's int64 product wraps for huge shapes
        if nbytes > _native.ADDRESS_MAX:
            raise InvalidArgumentError(f"shape {self.shape} holds {nbytes} bytes of float32, more than an address "
                                       "space")
        self._buffer = _native.CudaBuffer(nbytes)

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": "<f4", "data": (self._buffer.pointer, False), "strides": None,
                "version": 3}


def dense_crf_cuda(
    unary: object,
    image: object | None,
    *,
    out: object | None = None,
    iterations: int = 5,
    spatial: tuple[float, float] | None = (3.0, 3.0),
    bilateral: tuple[float, float, float] | None = (80.0, 13.0, 10.0),
    normalization: Normalization = "after",
    stream: int = 0,
) -> object:
    """`dense_crf` on arrays already in GPU memory, without copies (zero-copy through
    `__cuda_array_interface__`: torch CUDA tensors, CuPy arrays, `CudaArray`).

    Runs on the current CUDA device, which must hold the arrays, and on `stream` (a cudaStream_t
    address; 0 = the legacy default stream; torch: torch.cuda.current_stream().cuda_stream), which must
    be the stream that wrote them or one ordered after it: dynseg does not wait on the stream an
    array's `__cuda_array_interface__` names (version 3's "stream"). Returns
    after the stream has finished the call (it checks the lattices were built). The calling thread
    keeps its device workspace for its next calls on that device (`free_scratch` frees it).

    Args:
        unary: float32 (L, H, W) logits, C-contiguous.
        image: float32 (C, H, W) planar colour (0..255 units, the native layout), or None when
            `bilateral` is None.
        out: float32 (L, H, W) for Q, or None to allocate a `CudaArray`.
        iterations, spatial, bilateral, normalization: as `dense_crf`.

    Returns:
        `out`, or a new `CudaArray`, holding Q (L, H, W).
    """
    unary_array = _native.DeviceArray.of(unary, "unary")
    _check_unary_shape(unary_array.shape)
    num_labels, height, width = unary_array.shape
    iterations = check_iterations(iterations)
    normalization = check_normalization(normalization)
    kernels = gaussian_kernels(spatial, bilateral, has_image=image is not None)
    image_array = None
    if image is not None:
        image_array = _native.DeviceArray.of(image, "image")
        if image_array.ndim != 3 or image_array.shape[1:] != (height, width):
            raise InvalidArgumentError(f"image must have shape (C, {height}, {width}), got {image_array.shape}")
    stream = int_in("stream", stream, 0, _native.ADDRESS_MAX, rule="a cudaStream_t address (an int >= 0)")
    _native.check_cuda_device(0, caller="dense_crf_cuda")  # a usable GPU at all, before asking which is current
    device = _native.current_cuda_device()
    result = CudaArray(unary_array.shape) if out is None else out
    out_array = _native.DeviceArray.of(result, "out", shape=unary_array.shape, written=True)
    # The CUDA calls read every array from device memory, the kernels' weights too: one small buffer
    # for them, and this thread's workspace on this device, both kept for the thread's next calls.
    weights = _native.cuda_workspace(4 * len(kernels), device, purpose="weights")
    _native.copy_to_device(weights.pointer, np.array([weight for _, _, weight in kernels], dtype=np.float32))
    on_device = [_native.DeviceArray(weights.pointer + 4 * k, (1,)) for k in range(len(kernels))]
    problem = _densecrf_problem(num_labels, height, width, image_array, kernels, normalization, iterations, 0,
                                weights=on_device)
    nbytes = problem.workspace_size_cuda(_native.Pass.FORWARD)
    workspace = _native.cuda_workspace(nbytes, device)
    with _thetas_named_as_given():
        problem.forward_cuda(unary_array, out_array, workspace.pointer, nbytes, stream)
    return result
