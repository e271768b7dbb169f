"""The ctypes boundary to the native CRF library (plugins/include/dynseg_crf.h).

Owns: loading the library lazily, the ctypes mirrors of the C structs, checking every array's
dtype, shape and contiguity before a pointer crosses over, per-thread workspaces, and turning the
library's status codes into exceptions (all through `_check`).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dynseg.plugins import library_path

from .errors import InvalidArgumentError, NativeError

OK, INVALID_ARGUMENT, WORKSPACE_TOO_SMALL, KEY_RANGE = 0, 1, 2, 3
NORMALIZATION = {"after": 0, "symmetric": 1}
WEIGHT_SCALAR, WEIGHT_MATRIX = 0, 1
COMPAT_POTTS, COMPAT_DIAGONAL, COMPAT_FULL = 0, 1, 2
OUTPUT_LOGITS, OUTPUT_PROBABILITIES = 0, 1
PASS_FORWARD, PASS_BACKWARD = 0, 1

_f32p = ctypes.POINTER(ctypes.c_float)


class _Kernel(ctypes.Structure):
    _fields_ = [
        ("theta_xy", ctypes.c_float),
        ("theta_color", ctypes.c_float),
        ("weight_kind", ctypes.c_int32),
        ("weight", _f32p),
    ]


class _Problem(ctypes.Structure):
    _fields_ = [
        ("labels", ctypes.c_int64),
        ("height", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("image_channels", ctypes.c_int64),
        ("image", _f32p),
        ("num_kernels", ctypes.c_int32),
        ("kernels", ctypes.POINTER(_Kernel)),
        ("compat_kind", ctypes.c_int32),
        ("compat", _f32p),
        ("normalization", ctypes.c_int32),
        ("iterations", ctypes.c_int32),
        ("output", ctypes.c_int32),
        ("threads", ctypes.c_int32),
    ]


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The loaded native library (loaded on first use, once per process)."""
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(str(library_path()))
            lib.dynseg_version.restype = ctypes.c_char_p
            lib.dynseg_last_error.restype = ctypes.c_char_p
            lib.dynseg_abi_version.restype = ctypes.c_int32
            lib.dynseg_max_threads.restype = ctypes.c_int32
            problem = ctypes.POINTER(_Problem)
            lib.dynseg_crf_workspace_size.argtypes = [problem, ctypes.c_int32, ctypes.POINTER(ctypes.c_size_t)]
            lib.dynseg_crf_forward.argtypes = [problem, _f32p, _f32p, ctypes.c_void_p, ctypes.c_size_t]
            lib.dynseg_crf_backward.argtypes = [
                problem, _f32p, _f32p, _f32p, ctypes.POINTER(_f32p), _f32p, ctypes.c_void_p, ctypes.c_size_t
            ]
            lib.dynseg_lattice_filter.argtypes = [
                problem, ctypes.c_int32, ctypes.c_int64, _f32p, _f32p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t
            ]
            if lib.dynseg_abi_version() != 1:
                raise NativeError(f"{library_path()} speaks C ABI {lib.dynseg_abi_version()}, this dynseg needs 1")
            _lib = lib
    return _lib


def native_version() -> str:
    """The version string compiled into the native library."""
    return library().dynseg_version().decode()


def max_threads() -> int:
    """How many threads a call with threads=None uses."""
    return int(library().dynseg_max_threads())


def _check(status: int) -> None:
    if status == OK:
        return
    message = library().dynseg_last_error().decode(errors="replace")
    if status in (INVALID_ARGUMENT, KEY_RANGE):
        raise InvalidArgumentError(message)
    raise NativeError(f"dynseg native library failed (status {status}): {message}")


def _pointer(array: np.ndarray | None) -> ctypes.POINTER(ctypes.c_float) | None:
    if array is None:
        return None
    if array.dtype != np.float32 or not array.flags.c_contiguous:
        raise NativeError("internal: arrays handed to the native library must be contiguous float32")
    return array.ctypes.data_as(_f32p)


@dataclass(frozen=True)
class Kernel:
    """One Gaussian kernel: spatial (theta_color=0) or bilateral; weight: a scalar (label-agnostic)
    or an (L, L) matrix as a float32 array."""

    theta_xy: float
    theta_color: float
    weight: np.ndarray


class Problem:
    """A validated CRF problem as the C struct, keeping the arrays it points into alive."""

    def __init__(
        self,
        labels: int,
        height: int,
        width: int,
        image: np.ndarray | None,
        kernels: Sequence[Kernel],
        *,
        compat: np.ndarray | None,
        normalization: str,
        iterations: int,
        output: int,
        threads: int,
    ):
        self._keep = [image, compat, *[k.weight for k in kernels]]
        c_kernels = (_Kernel * max(len(kernels), 1))()
        for slot, k in zip(c_kernels, kernels):
            slot.theta_xy = k.theta_xy
            slot.theta_color = k.theta_color
            slot.weight_kind = WEIGHT_SCALAR if k.weight.size == 1 else WEIGHT_MATRIX
            slot.weight = _pointer(k.weight)
        self._kernels = c_kernels
        compat_kind = COMPAT_POTTS if compat is None else COMPAT_DIAGONAL if compat.ndim == 1 else COMPAT_FULL
        self.struct = _Problem(
            labels=labels,
            height=height,
            width=width,
            image_channels=0 if image is None else image.shape[0],
            image=_pointer(image),
            num_kernels=len(kernels),
            kernels=c_kernels,
            compat_kind=compat_kind,
            compat=_pointer(compat),
            normalization=NORMALIZATION[normalization],
            iterations=iterations,
            output=output,
            threads=threads,
        )

    def workspace(self, pass_: int) -> np.ndarray:
        size = ctypes.c_size_t()
        _check(library().dynseg_crf_workspace_size(ctypes.byref(self.struct), pass_, ctypes.byref(size)))
        return _workspace(size.value)

    def forward(self, unary: np.ndarray) -> np.ndarray:
        out = np.empty_like(unary)
        ws = self.workspace(PASS_FORWARD)
        _check(library().dynseg_crf_forward(ctypes.byref(self.struct), _pointer(unary), _pointer(out),
                                            ws.ctypes.data, ws.nbytes))
        return out

    def backward(
        self, unary: np.ndarray, grad_logits: np.ndarray, want_weights: Sequence[bool], want_compat: bool
    ) -> tuple[np.ndarray, list[np.ndarray | None], np.ndarray | None]:
        grad_unary = np.empty_like(unary)
        grad_weights = [np.empty_like(w) if want else None for w, want in zip(self._keep[2:], want_weights)]
        grad_compat = np.empty_like(self._keep[1]) if want_compat and self._keep[1] is not None else None
        pointers = (_f32p * max(len(grad_weights), 1))(*[_pointer(g) for g in grad_weights])
        ws = self.workspace(PASS_BACKWARD)
        _check(library().dynseg_crf_backward(
            ctypes.byref(self.struct), _pointer(unary), _pointer(grad_logits), _pointer(grad_unary), pointers,
            _pointer(grad_compat), ws.ctypes.data, ws.nbytes,
        ))
        return grad_unary, grad_weights, grad_compat

    def filter(self, kernel: int, values: np.ndarray, transpose: bool) -> np.ndarray:
        out = np.empty_like(values)
        ws = self.workspace(PASS_FORWARD)
        _check(library().dynseg_lattice_filter(ctypes.byref(self.struct), kernel, values.shape[0], _pointer(values),
                                               _pointer(out), int(transpose), ws.ctypes.data, ws.nbytes))
        return out


_local = threading.local()


def _workspace(nbytes: int) -> np.ndarray:
    """A per-thread scratch buffer, grown on demand and reused across calls. The worst-case size is
    large but mostly untouched: the pages the kernels never reach are never committed."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = np.empty(nbytes, dtype=np.uint8)
        _local.buffer = buffer
    return buffer
