"""The ctypes boundary to the native CRF library (plugins/include/dynseg_crf.h).

Owns: loading the library lazily, the ctypes mirrors of the C structs, checking every array's
dtype, shape and contiguity before a pointer crosses over, per-thread workspaces, turning the
library's status codes into exceptions (all through `_check`), and letting Ctrl-C stop a long CPU
call (`_cpu_call`). Arrays are numpy arrays for the CPU calls and `DeviceArray`s (addresses of GPU
memory) for the CUDA calls: `DeviceArray.of` checks a GPU array's dtype, shape and contiguity as
`_pointer` checks a numpy array's. Also owns the library's CUDA helpers for callers without a CUDA
binding of their own (the onnxruntime and TensorRT backends, `dense_crf_cuda`): the current device
(`set_cuda_device`, `current_cuda_device`), copies (`copy_to_device`, `copy_from_device`,
`copy_on_device`), device memory and streams freed with their objects (`CudaBuffer`, `CudaStream`), and
each thread's stream and device scratch per device (`cuda_stream`, `cuda_workspace`).
Private to dynseg rather than to dynseg.sdk: the trainer's torch op (dynseg.trainer.crf.native) and
its evaluation bind the library through it too.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import platform
import signal
import sys
import threading
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dynseg.plugins import library_path

from .checks import INT32_MAX, is_int
from .errors import InvalidArgumentError, LatticeRangeError, NativeError

ABI_VERSION = 6
NORMALIZATION = {"after": 0, "symmetric": 1}
MAX_LABELS = 65536  # DYNSEG_MAX_LABELS: the most labels a problem takes
ADDRESS_MAX = 2**64 - 1  # ctypes would wrap a larger address silently


# The C enums of dynseg_crf.h, value for value.
class Status(IntEnum):
    OK = 0
    INVALID_ARGUMENT = 1
    WORKSPACE_TOO_SMALL = 2
    KEY_RANGE = 3
    INTERNAL = 4
    NOT_SUPPORTED = 5
    CUDA_ERROR = 6
    CANCELLED = 7


class WeightKind(IntEnum):
    SCALAR = 0
    MATRIX = 1


class CompatKind(IntEnum):
    POTTS = 0
    DIAGONAL = 1
    FULL = 2


class Output(IntEnum):
    LOGITS = 0
    PROBABILITIES = 1


class Pass(IntEnum):
    FORWARD = 0
    BACKWARD = 1


_f32p = ctypes.POINTER(ctypes.c_float)


def _c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """Whether `strides` lay `shape` out row-major without gaps, as numpy judges it: the stride of an axis
    of size 1 is never used, so a producer may give any (the CUDA array interface lets it)."""
    if len(strides) != len(shape):
        return False
    if 0 in shape:
        return True
    expected = itemsize
    for size, stride in reversed(list(zip(shape, strides))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


@dataclass(frozen=True)
class DeviceArray:
    """A C-contiguous array of `dtype` in GPU memory, known by its address. Made by `of` from anything
    with a `__cuda_array_interface__` (torch CUDA tensors, CuPy arrays, `sdk.crf.CudaArray`), or
    directly by a caller whose memory is contiguous by construction (onnxruntime's OrtValues)."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype = np.dtype(np.float32)

    @classmethod
    def of(cls, array: object, name: str, *, dtype: type = np.float32, shape: tuple[int, ...] | None = None,
           written: bool = False) -> DeviceArray:
        """The view of `array` after checking it is a GPU array of `dtype`, C-contiguous, unmasked,
        given `shape` of that shape, and writable when the library will write it (`written`);
        InvalidArgumentError naming `name` otherwise."""
        try:
            interface = getattr(array, "__cuda_array_interface__", None)
        except (RuntimeError, TypeError) as error:  # torch refuses a tensor that requires grad
            raise InvalidArgumentError(f"{name}: {error}") from None
        if not isinstance(interface, dict):
            raise InvalidArgumentError(
                f"{name} must be a GPU array exposing __cuda_array_interface__ (a torch CUDA tensor, a CuPy "
                f"array), got {type(array).__name__}"
            )
        try:
            found = tuple(interface["shape"])
            found_dtype = np.dtype(interface["typestr"])
            pointer, read_only = interface["data"]
            strides = None if interface.get("strides") is None else tuple(interface["strides"])
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidArgumentError(f"{name} has a malformed __cuda_array_interface__ ({error!r}): it needs shape, "
                                       "typestr and data (pointer, read-only flag), and strides None or a tuple") \
                from None
        if not all(is_int(n) and n >= 0 for n in found):
            raise InvalidArgumentError(f"{name}'s __cuda_array_interface__ has shape {found}: sizes must be ints >= 0")
        found = tuple(int(n) for n in found)
        if not is_int(pointer) or not 0 <= pointer <= ADDRESS_MAX:
            raise InvalidArgumentError(f"{name}'s __cuda_array_interface__ has data pointer {pointer!r}: an address "
                                       "must be an int in 0..2**64-1")
        pointer = int(pointer)
        if found_dtype != np.dtype(dtype):
            raise InvalidArgumentError(f"{name} must be {np.dtype(dtype)}, got {found_dtype}")
        if interface.get("mask") is not None:
            raise InvalidArgumentError(f"{name} must not be a masked array")
        if written and read_only:
            raise InvalidArgumentError(f"{name} is read-only, and the result is written into it")
        if strides is not None and not _c_contiguous(found, strides, np.dtype(dtype).itemsize):
            raise InvalidArgumentError(f"{name} must be C-contiguous, got strides {strides} for shape {found}")
        if shape is not None and found != shape:
            raise InvalidArgumentError(f"{name} must have shape {shape}, got {found}")
        return cls(pointer, found, np.dtype(dtype))

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # exact: numpy's int64 product wraps for huge shapes

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _Kernel(ctypes.Structure):
    _fields_ = [
        ("theta_xy", ctypes.c_float),
        ("theta_color", ctypes.c_float),
        ("weight_kind", ctypes.c_int32),
        ("weight", _f32p),
    ]


class _Detections(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_int64),
        ("boxes", _f32p),
        ("labels", ctypes.POINTER(ctypes.c_int64)),
        ("scores", _f32p),
        ("detection_x", _f32p),
        ("detection_y", _f32p),
        ("score_ceiling", ctypes.c_float),
        ("epsilon", ctypes.c_float),
        ("recalibrated", _f32p),
        ("grad_recalibrated", _f32p),
        ("grad_detection_x", _f32p),
        ("grad_detection_y", _f32p),
    ]


class _Problem(ctypes.Structure):
    _fields_ = [
        ("num_labels", ctypes.c_int64),
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
        ("detections", ctypes.POINTER(_Detections)),
    ]


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The loaded native library (loaded on first use, once per process)."""
    global _lib
    with _lock:
        if _lib is None:
            lib, path = _load()
            if not hasattr(lib, "dynseg_abi_version"):
                raise NativeError(f"{path} is not dynseg's native library: it has no dynseg_abi_version")
            lib.dynseg_abi_version.restype = ctypes.c_int32
            # before any other symbol: another ABI's library may lack them (returning a constant, it
            # runs on any CPU)
            if lib.dynseg_abi_version() != ABI_VERSION:
                raise NativeError(
                    f"{path} speaks C ABI {lib.dynseg_abi_version()}, this dynseg needs {ABI_VERSION}: "
                    "rebuild it with `pip install --force-reinstall --no-deps .` from the dynseg source tree"
                )
            _refuse_a_foreign_cpu(lib, path)
            _declare_signatures(lib)
            _lib = lib
    return _lib


def _declare_signatures(lib: ctypes.CDLL) -> None:
    """Tells ctypes every entry point's argument and result types (the C ABI's, plugins/include)."""
    lib.dynseg_version.restype = ctypes.c_char_p
    lib.dynseg_last_error.restype = ctypes.c_char_p
    lib.dynseg_max_threads.restype = ctypes.c_int32
    lib.dynseg_set_cancel_flag.argtypes = [ctypes.POINTER(ctypes.c_int32)]
    lib.dynseg_set_cancel_flag.restype = None
    problem = ctypes.POINTER(_Problem)
    lib.dynseg_crf_workspace_size.argtypes = [problem, ctypes.c_int32, ctypes.POINTER(ctypes.c_size_t)]
    lib.dynseg_crf_forward.argtypes = [problem, _f32p, _f32p, ctypes.c_void_p, ctypes.c_size_t]
    lib.dynseg_crf_backward.argtypes = [
        problem, _f32p, _f32p, _f32p, ctypes.POINTER(_f32p), _f32p, ctypes.c_void_p, ctypes.c_size_t
    ]
    lib.dynseg_lattice_filter.argtypes = [
        problem, ctypes.c_int32, ctypes.c_int64, _f32p, _f32p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t
    ]
    lib.dynseg_cuda_compiled.restype = ctypes.c_int32
    lib.dynseg_cuda_build.restype = ctypes.c_char_p
    lib.dynseg_cuda_device_count.restype = ctypes.c_int32
    lib.dynseg_crf_workspace_size_cuda.argtypes = lib.dynseg_crf_workspace_size.argtypes
    lib.dynseg_crf_forward_cuda.argtypes = [
        problem, _f32p, _f32p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p
    ]
    lib.dynseg_crf_backward_cuda.argtypes = [
        problem, _f32p, _f32p, _f32p, ctypes.POINTER(_f32p), _f32p, ctypes.c_void_p, ctypes.c_size_t,
        ctypes.c_void_p,
    ]
    lib.dynseg_crf_check_cuda.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.dynseg_crf_forward_cuda_from_host.argtypes = [problem, _f32p, _f32p, ctypes.c_int32]
    lib.dynseg_cuda_set_device.argtypes = [ctypes.c_int32]
    lib.dynseg_cuda_get_device.argtypes = [ctypes.POINTER(ctypes.c_int32)]
    lib.dynseg_cuda_malloc.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    lib.dynseg_cuda_free.argtypes = [ctypes.c_void_p]
    lib.dynseg_cuda_memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.dynseg_cuda_stream_create.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.dynseg_cuda_stream_synchronize.argtypes = [ctypes.c_void_p]
    lib.dynseg_cuda_stream_destroy.argtypes = [ctypes.c_void_p]


def _load() -> tuple[ctypes.CDLL, Path]:
    """The library file, loaded; NativeError where there is none, or none that loads (the loader's
    reason: not a shared library, a missing dependency)."""
    try:
        path = library_path()
    except FileNotFoundError as error:
        raise NativeError(str(error)) from error
    try:
        return ctypes.CDLL(str(path)), path
    except OSError as error:
        raise NativeError(f"dynseg's native library {path} does not load: {error}") from error


def _refuse_a_foreign_cpu(lib: ctypes.CDLL, path: Path) -> None:
    """NativeError when the library's kernels use instructions this CPU lacks: asked right after the ABI
    version, before any kernel runs, as the first one would otherwise end the process with an illegal
    instruction."""
    lib.dynseg_cpu_missing.restype = ctypes.c_char_p
    missing = lib.dynseg_cpu_missing().decode()
    if missing:
        raise NativeError(
            f"{path} was compiled for a CPU with {missing}, which this CPU lacks: it was built on "
            "another machine, for that machine's CPU (-march=native, the default). Rebuild it here with "
            "`pip install --force-reinstall --no-deps .` from the dynseg source tree, or build one for any "
            "x86-64 CPU by adding -C cmake.define.DYNSEG_NATIVE_ARCH=OFF")


def native_version() -> str:
    """The version string compiled into the native library."""
    return library().dynseg_version().decode()


def max_threads() -> int:
    """How many threads a call uses that leaves the count to the library (threads=0 here, None in
    `dense_crf` and the torch op)."""
    return int(library().dynseg_max_threads())


def cuda_compiled() -> bool:
    """Whether the native library was built with its CUDA kernels."""
    return bool(library().dynseg_cuda_compiled())


def cuda_build() -> str:
    """What the CUDA kernels were built for: the CUDA runtime and the GPU architectures ("" without CUDA)."""
    return library().dynseg_cuda_build().decode()


def cuda_device_count() -> int:
    """CUDA devices the native library can use (0 without CUDA in the build, a driver or a GPU)."""
    return int(library().dynseg_cuda_device_count())


def check_cuda_device(device: int, caller: str | None = None) -> None:
    """Raises a clear error unless CUDA device `device` is usable by the native library: one naming the
    `device` argument, or `caller` (a function that takes no such argument, as dense_crf_cuda)."""
    if not cuda_compiled():
        wants = caller or "device='cuda'"
        raise InvalidArgumentError(
            f"{wants} needs the CUDA kernels, but this dynseg native "
            "library was built without CUDA (no nvcc at install time, one older than CUDA 11.8, or DYNSEG_CUDA=OFF): "
            "install the CUDA toolkit 11.8 or newer and reinstall dynseg"
        )
    count = cuda_device_count()
    if not 0 <= device < count:
        why = ""
        if count == 0:
            reason = (library().dynseg_last_error() or b"").decode("utf-8", "replace")
            # the library says what the CUDA runtime reported, where it failed to count (a message about
            # anything else is a stale one of an earlier call)
            detail = f"; {reason}" if reason.startswith("cudaGetDeviceCount failed") else ""
            why = f" (no GPU or no NVIDIA driver on this machine{detail})"
        asked = f"{caller} needs a GPU," if caller else f"device='cuda:{device}'"
        raise InvalidArgumentError(f"{asked} but the native library sees {count} CUDA device(s){why}")


def _check(status: int) -> None:
    if status == Status.OK:
        return
    message = library().dynseg_last_error().decode(errors="replace")
    if status == Status.KEY_RANGE:
        raise LatticeRangeError(message)
    if status == Status.INVALID_ARGUMENT:
        raise InvalidArgumentError(message)
    try:
        name = Status(status).name
    except ValueError:  # a newer library's status
        name = f"status {status}"
    raise NativeError(f"dynseg native library failed ({name}): {message}")


# Calls of less work than this (labels x pixels x iterations) end within tens of milliseconds, before
# a Ctrl-C would seem ignored, and run directly: a helper thread costs about 0.2 ms a call.
_INTERRUPTIBLE_FROM = 1 << 22


def _cpu_call(work: int, function: Callable[..., int], *arguments: object) -> None:
    """Makes one of the library's CPU compute calls and checks its status, so that Ctrl-C can stop it.

    Python raises KeyboardInterrupt only on the main thread, between bytecodes: never inside a C call.
    So on the main thread a call of `work` (labels x pixels x iterations) from _INTERRUPTIBLE_FROM runs
    on a helper thread while the main one waits. Meanwhile Ctrl-C (where Python's default handler has
    it) only sets the call's cancel flag, the library stops before its next mean-field iteration, and
    KeyboardInterrupt is raised once the helper has returned: until then it writes into the caller's
    arrays and this thread's workspace. An exception a program's own signal handler raises in the wait
    sets the flag as well, and goes on once the helper has returned (one raised inside Thread.start
    leaves the helper to finish on its own; its workspace stays its until then). Other calls run
    directly."""
    lib = library()
    if work < _INTERRUPTIBLE_FROM or threading.current_thread() is not threading.main_thread():
        _check(function(*arguments))
        return
    flag = ctypes.c_int32(0)
    failure: list[BaseException] = []
    returned = threading.Event()
    # until the helper returns, this thread's workspace is its: a call a signal handler makes meanwhile,
    # or one after an exception escaped Thread.start below, takes a buffer of its own (`_workspace`)
    _local.__dict__.setdefault("calls_in_flight", []).append(returned)
    ctrl_c: list[bool] = []

    def call() -> None:
        lib.dynseg_set_cancel_flag(ctypes.byref(flag))
        try:
            _check(function(*arguments))  # here: the error message is this thread's
        except BaseException as error:
            failure.append(error)
        finally:
            lib.dynseg_set_cancel_flag(None)
            returned.set()

    def on_ctrl_c(signum: int, frame: object) -> None:  # raises nothing: it may run inside Thread.start
        flag.value = 1
        ctrl_c.append(True)

    deferred = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if deferred:
        signal.signal(signal.SIGINT, on_ctrl_c)
    interrupted: BaseException | None = None
    try:
        try:
            threading.Thread(target=call, name="dynseg-crf-call").start()
        except RuntimeError:  # no thread to be had (a process at its limit): the call is then uninterruptible
            call()
        # Not Thread.join: CPython 3.11's join, interrupted, can mark a thread that is still running as
        # stopped (its bpo-45274 handling).
        while not returned.is_set():
            try:
                returned.wait()
            except BaseException as error:  # what a signal handler of the program raised
                flag.value = 1
                interrupted = interrupted or error
    finally:
        if deferred:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted is not None:
        raise interrupted  # the call's own outcome, cancelled, is moot
    if ctrl_c:
        raise KeyboardInterrupt
    if failure:
        raise failure[0]


_C_TYPES: dict[np.dtype, type[ctypes.c_float | ctypes.c_int64]] = {
    np.dtype(np.float32): ctypes.c_float, np.dtype(np.int64): ctypes.c_int64,
}


def _pointer(array: np.ndarray | DeviceArray | None, dtype: type = np.float32):
    """A ctypes pointer to a contiguous array of `dtype` (float32 unless said), or NULL for None."""
    c_type = ctypes.POINTER(_C_TYPES[np.dtype(dtype)])
    if array is None:
        return None
    if isinstance(array, DeviceArray):
        if array.dtype != dtype:
            raise NativeError(f"internal: a {array.dtype} device array where the library reads {np.dtype(dtype)}")
        return ctypes.cast(ctypes.c_void_p(array.pointer), c_type)
    if array.dtype != dtype or not array.flags.c_contiguous or not array.flags.aligned:
        raise NativeError(f"internal: arrays handed to the native library must be contiguous, aligned "
                          f"{np.dtype(dtype)}")
    return array.ctypes.data_as(c_type)


@dataclass(frozen=True)
class Kernel:
    """One Gaussian kernel: spatial (theta_color=0) or bilateral; weight: a scalar (label-agnostic)
    or an (L, L) matrix as a float32 array."""

    theta_xy: float
    theta_color: float
    weight: np.ndarray | DeviceArray


@dataclass(frozen=True)
class DetectionPotential:
    """The detection potential (dynseg_detections): boxes (D, 4) float32, labels (D,) int64, scores (D,)
    float32, detection_x and detection_y float32 of one value each ((1,) or 0-d), and `recalibrated` (D,)
    float32 that the call fills with Q(Y_d = 1). For a backward call: `grad_recalibrated` (D,), dLoss/d
    recalibrated (None: zero), and `grad_detection_x`, `grad_detection_y` of one value each that it fills
    with the gradients of w_x and w_y (None: not wanted). numpy arrays for the CPU calls, DeviceArrays
    for the CUDA ones."""

    boxes: np.ndarray | DeviceArray
    labels: np.ndarray | DeviceArray
    scores: np.ndarray | DeviceArray
    detection_x: np.ndarray | DeviceArray
    detection_y: np.ndarray | DeviceArray
    score_ceiling: float
    epsilon: float
    recalibrated: np.ndarray | DeviceArray
    grad_recalibrated: np.ndarray | DeviceArray | None = None
    grad_detection_x: np.ndarray | DeviceArray | None = None
    grad_detection_y: np.ndarray | DeviceArray | None = None

    def __post_init__(self) -> None:
        if len(self.boxes.shape) != 2 or self.boxes.shape[1] != 4:
            raise InvalidArgumentError(f"detection potential: boxes must be (D, 4), got {tuple(self.boxes.shape)}")
        count = self.boxes.shape[0]
        expected = {"labels": (count,), "scores": (count,), "recalibrated": (count,), "grad_recalibrated": (count,)}
        for name, shape in expected.items():
            array = getattr(self, name)
            if array is not None and tuple(array.shape) != shape:
                raise InvalidArgumentError(f"detection potential: {name} must be {shape}, got {tuple(array.shape)}")
        for name in ("detection_x", "detection_y", "grad_detection_x", "grad_detection_y"):
            # () or (1,): onnxruntime hands over either
            if getattr(self, name) is not None and int(np.prod(getattr(self, name).shape)) != 1:
                raise InvalidArgumentError(f"detection potential: {name} must hold one value, got shape "
                                           f"{tuple(getattr(self, name).shape)}")

    def struct(self) -> _Detections:
        return _Detections(
            count=self.boxes.shape[0],
            boxes=_pointer(self.boxes),
            labels=_pointer(self.labels, np.int64),
            scores=_pointer(self.scores),
            detection_x=_pointer(self.detection_x),
            detection_y=_pointer(self.detection_y),
            score_ceiling=self.score_ceiling,
            epsilon=self.epsilon,
            recalibrated=_pointer(self.recalibrated),
            grad_recalibrated=_pointer(self.grad_recalibrated),
            grad_detection_x=_pointer(self.grad_detection_x),
            grad_detection_y=_pointer(self.grad_detection_y),
        )


class Problem:
    """A validated CRF problem as the C struct, keeping the arrays it points into alive."""

    def __init__(
        self,
        num_labels: int,
        height: int,
        width: int,
        image: np.ndarray | DeviceArray | None,
        kernels: Sequence[Kernel],
        *,
        compat: np.ndarray | DeviceArray | None,
        normalization: str,
        iterations: int,
        output: Output,
        threads: int,
        detection_potential: DetectionPotential | None = None,
    ):
        for name, value in (("iterations", iterations), ("threads", threads)):
            if not is_int(value) or not 0 <= value <= INT32_MAX:  # ctypes would wrap a larger value silently
                raise InvalidArgumentError(f"{name} must be an int in 0..{INT32_MAX}, got {value!r}")
        # The library reads as many values as these sizes say: every caller's arrays are checked here.
        if image is not None and (len(image.shape) != 3 or tuple(image.shape[1:]) != (height, width)):
            raise InvalidArgumentError(f"image must be (C, {height}, {width}) planes to match the unary, got "
                                       f"{tuple(image.shape)}")
        if not isinstance(normalization, str) or normalization not in NORMALIZATION:
            raise InvalidArgumentError(f"normalization must be 'after' or 'symmetric', got {normalization!r}")
        for index, kernel in enumerate(kernels):
            if int(np.prod(kernel.weight.shape)) != 1 and tuple(kernel.weight.shape) != (num_labels, num_labels):
                raise InvalidArgumentError(f"kernels[{index}] weight must be a scalar or ({num_labels}, {num_labels}), "
                                           f"got {tuple(kernel.weight.shape)}")
        if compat is not None and tuple(compat.shape) not in ((num_labels,), (num_labels, num_labels)):
            raise InvalidArgumentError(f"compat must be ({num_labels},) or ({num_labels}, {num_labels}), got "
                                       f"{tuple(compat.shape)}")
        self.shape = (num_labels, height, width)
        # The C structs below point into these arrays and structs: they live as long as the problem.
        self._image, self._compat, self._weights = image, compat, [k.weight for k in kernels]
        self._potential = detection_potential
        self._potential_struct = detection_potential.struct() if detection_potential is not None else None
        c_kernels = (_Kernel * max(len(kernels), 1))()
        for slot, k in zip(c_kernels, kernels):
            slot.theta_xy = k.theta_xy
            slot.theta_color = k.theta_color
            slot.weight_kind = WeightKind.SCALAR if k.weight.size == 1 else WeightKind.MATRIX
            slot.weight = _pointer(k.weight)
        self._kernels = c_kernels
        compat_kind = (CompatKind.POTTS if compat is None else CompatKind.DIAGONAL if compat.ndim == 1
                       else CompatKind.FULL)
        self.struct = _Problem(
            num_labels=num_labels,
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
            # the C field's name: the detection potential's inputs (the instance CRF's detections are its labels)
            detections=None if self._potential_struct is None else ctypes.pointer(self._potential_struct),
        )

    def host_workspace(self, pass_: Pass) -> np.ndarray:
        """This thread's host scratch buffer, grown to what `pass_` of this problem needs on the CPU."""
        size = ctypes.c_size_t()
        _check(library().dynseg_crf_workspace_size(ctypes.byref(self.struct), pass_, ctypes.byref(size)))
        return _workspace(size.value)

    def _check_planes(self, name: str, array: np.ndarray | DeviceArray, channels: int | None = None) -> None:
        """The library reads and writes (L, H, W) planes (C of them for `filter`) through every array."""
        expected = self.shape if channels is None else (channels, *self.shape[1:])
        if tuple(array.shape) != expected:
            raise InvalidArgumentError(f"{name} must be {expected} planes for this problem, got {tuple(array.shape)}")

    def _check_one_per_kernel(self, name: str, entries: Sequence[object]) -> None:
        """The library reads one gradient pointer per kernel."""
        if len(entries) != len(self._weights):
            raise InvalidArgumentError(f"{name} must have one entry per kernel ({len(self._weights)}), got "
                                       f"{len(entries)}")

    def _work(self) -> int:
        """Labels x pixels x iterations: what `_cpu_call` tells a long call by."""
        return int(np.prod(self.shape)) * max(int(self.struct.iterations), 1)

    def forward(self, unary: np.ndarray) -> np.ndarray:
        """Q (or the logits, as the problem's output says) for planar (L, H, W) float32 `unary`."""
        self._check_planes("unary", unary)
        out = np.empty_like(unary)
        ws = self.host_workspace(Pass.FORWARD)
        _cpu_call(self._work(), library().dynseg_crf_forward, ctypes.byref(self.struct), _pointer(unary), _pointer(out),
                  ws.ctypes.data, ws.nbytes)
        return out

    def backward(
        self, unary: np.ndarray, grad_logits: np.ndarray, want_weights: Sequence[bool], want_compat: bool
    ) -> tuple[np.ndarray, list[np.ndarray | None], np.ndarray | None]:
        """The gradients of the unary, of the wanted kernel weights and of compat, from (L, H, W) planes."""
        self._check_planes("unary", unary)
        self._check_planes("grad_logits", grad_logits)
        self._check_one_per_kernel("want_weights", want_weights)
        grad_unary = np.empty_like(unary)
        grad_weights = [np.empty_like(w) if want else None for w, want in zip(self._weights, want_weights)]
        grad_compat = np.empty_like(self._compat) if want_compat and self._compat is not None else None
        pointers = (_f32p * max(len(grad_weights), 1))(*[_pointer(g) for g in grad_weights])
        ws = self.host_workspace(Pass.BACKWARD)
        _cpu_call(2 * self._work(), library().dynseg_crf_backward, ctypes.byref(self.struct), _pointer(unary),
                  _pointer(grad_logits), _pointer(grad_unary), pointers, _pointer(grad_compat), ws.ctypes.data,
                  ws.nbytes)
        return grad_unary, grad_weights, grad_compat

    def filter(self, kernel: int, values: np.ndarray, transpose: bool) -> np.ndarray:
        """Kernel `kernel`'s lattice filter (its transpose when asked) of (C, H, W) `values`: a test hook
        for the adjoint (tests/plugins)."""
        if not is_int(kernel) or not 0 <= kernel <= INT32_MAX:  # ctypes would wrap 2**32 to kernel 0
            raise InvalidArgumentError(f"kernel must be an int in 0..{INT32_MAX}, got {kernel!r}")
        if len(values.shape) != 3:
            raise InvalidArgumentError(f"values must be (C, H, W) planes, got {tuple(values.shape)}")
        self._check_planes("values", values, values.shape[0])
        out = np.empty_like(values)
        ws = self.host_workspace(Pass.FORWARD)
        _cpu_call(int(np.prod(values.shape)), library().dynseg_lattice_filter, ctypes.byref(self.struct), kernel,
                  values.shape[0], _pointer(values), _pointer(out), int(transpose), ws.ctypes.data, ws.nbytes)
        return out

    # ---- CUDA: every array a DeviceArray on the current device; stream a cudaStream_t address ----

    def workspace_size_cuda(self, pass_: Pass) -> int:
        """The bytes of device workspace `pass_` of this problem needs on the GPU (the caller provides it)."""
        size = ctypes.c_size_t()
        _check(library().dynseg_crf_workspace_size_cuda(ctypes.byref(self.struct), pass_, ctypes.byref(size)))
        return size.value

    def forward_cuda(self, unary: DeviceArray, out: DeviceArray, workspace: int, nbytes: int, stream: int) -> None:
        """Enqueues the forward pass on `stream`, then waits for it and reports a lattice failure."""
        self._check_planes("unary", unary)
        self._check_planes("out", out)
        _check(library().dynseg_crf_forward_cuda(ctypes.byref(self.struct), _pointer(unary), _pointer(out),
                                                 workspace, nbytes, stream))
        check_cuda(workspace, stream)

    def backward_cuda(
        self, unary: DeviceArray, grad_logits: DeviceArray, grad_unary: DeviceArray,
        grad_weights: Sequence[DeviceArray | None], grad_compat: DeviceArray | None,
        workspace: int, nbytes: int, stream: int,
    ) -> None:
        for name, array in (("unary", unary), ("grad_logits", grad_logits), ("grad_unary", grad_unary)):
            self._check_planes(name, array)
        self._check_one_per_kernel("grad_weights", grad_weights)
        pointers = (_f32p * max(len(grad_weights), 1))(*[_pointer(g) for g in grad_weights])
        _check(library().dynseg_crf_backward_cuda(
            ctypes.byref(self.struct), _pointer(unary), _pointer(grad_logits), _pointer(grad_unary), pointers,
            _pointer(grad_compat), workspace, nbytes, stream,
        ))
        check_cuda(workspace, stream)

    def forward_from_host(self, unary: np.ndarray, device: int) -> np.ndarray:
        """The forward pass on CUDA device `device` for host arrays (copies in and out; synchronous)."""
        self._check_planes("unary", unary)
        out = np.empty_like(unary)
        _check(library().dynseg_crf_forward_cuda_from_host(ctypes.byref(self.struct), _pointer(unary),
                                                           _pointer(out), device))
        return out


def check_cuda(workspace: int, stream: int) -> None:
    """Waits for `stream` and raises if the last CUDA call on `workspace` failed."""
    _check(library().dynseg_crf_check_cuda(workspace, stream))


def set_cuda_device(device: int) -> None:
    """Makes CUDA device `device` the calling thread's current one (for the CUDA calls that follow)."""
    _check(library().dynseg_cuda_set_device(device))


def current_cuda_device() -> int:
    """The calling thread's current CUDA device."""
    device = ctypes.c_int32()
    _check(library().dynseg_cuda_get_device(ctypes.byref(device)))
    return device.value


def copy_on_device(destination: int, source: int, nbytes: int) -> None:
    """Copies nbytes between two device addresses (synchronous)."""
    if nbytes:
        _check(library().dynseg_cuda_memcpy(destination, source, nbytes))


def copy_to_device(pointer: int, array: np.ndarray) -> None:
    """Copies a host array into device memory at `pointer` (synchronous)."""
    array = np.ascontiguousarray(array)
    _check(library().dynseg_cuda_memcpy(pointer, array.ctypes.data, array.nbytes))


def copy_from_device(array: np.ndarray, pointer: int) -> None:
    """Fills a C-contiguous host array from device memory at `pointer` (synchronous)."""
    if not array.flags.c_contiguous:
        raise NativeError("internal: copy_from_device needs a C-contiguous array")
    _check(library().dynseg_cuda_memcpy(array.ctypes.data, pointer, array.nbytes))


class CudaBuffer:
    """Device memory from the native library, freed with the object (for callers without an allocator)."""

    def __init__(self, nbytes: int):
        if not 0 <= nbytes <= ADDRESS_MAX:  # ctypes would wrap it into a size the library allocates
            raise NativeError(f"internal: a device buffer of {nbytes} bytes")
        pointer = ctypes.c_void_p()
        _check(library().dynseg_cuda_malloc(max(int(nbytes), 1), ctypes.byref(pointer)))
        self.pointer = int(pointer.value or 0)
        self.nbytes = int(nbytes)

    def __del__(self) -> None:
        if getattr(self, "pointer", 0) and _lib is not None:
            _lib.dynseg_cuda_free(self.pointer)
            self.pointer = 0


class CudaStream:
    """A non-blocking CUDA stream from the native library, destroyed with the object."""

    def __init__(self) -> None:
        handle = ctypes.c_void_p()
        _check(library().dynseg_cuda_stream_create(ctypes.byref(handle)))
        self.handle = int(handle.value or 0)

    def synchronize(self) -> None:
        _check(library().dynseg_cuda_stream_synchronize(self.handle))

    def __del__(self) -> None:
        if getattr(self, "handle", 0) and _lib is not None:
            _lib.dynseg_cuda_stream_destroy(self.handle)
            self.handle = 0


_local = threading.local()


# A thread's scratch buffer is replaced by one of the size a call needs when that call needs less than
# this fraction of it: one large image does not hold its memory for the rest of the thread's life, and
# calls of similar sizes (the two CRFs of an image, a video's frames) keep reusing one buffer.
_SHRINK_BELOW = 0.25


def _fits(held: int, nbytes: int) -> bool:
    return _SHRINK_BELOW * held <= nbytes <= held


def cuda_workspace(nbytes: int, device: int, purpose: str = "workspace") -> CudaBuffer:
    """This thread's device scratch buffer for `purpose` on `device` (current), reused across calls of
    similar sizes. Unlike host memory, device memory is committed whole: it holds the problem's worst case."""
    buffers = _local.__dict__.setdefault("cuda_buffers", {})
    buffer = buffers.get((device, purpose))
    if buffer is None or not _fits(buffer.nbytes, nbytes):
        buffers.pop((device, purpose), None)  # free the old one first
        buffer = buffers[(device, purpose)] = CudaBuffer(nbytes)
    return buffer


def cuda_stream(device: int) -> CudaStream:
    """This thread's CUDA stream on `device` (created on first use while `device` is current)."""
    streams = _local.__dict__.setdefault("cuda_streams", {})
    if device not in streams:
        streams[device] = CudaStream()
    return streams[device]


def _workspace(nbytes: int) -> np.ndarray:
    """This thread's host scratch buffer, reused across calls of similar sizes; a buffer of the call's own
    while a call on a helper thread (`_cpu_call`) still computes in it."""
    in_flight = _local.__dict__.get("calls_in_flight", [])
    in_flight[:] = [returned for returned in in_flight if not returned.is_set()]
    if in_flight:
        return _reserve(nbytes)
    buffer: np.ndarray | None = getattr(_local, "buffer", None)
    if buffer is None or not _fits(buffer.nbytes, nbytes):
        _local.buffer = None  # free the old one first
        buffer = _local.buffer = _reserve(nbytes)
    return buffer


def free_scratch() -> None:
    """Frees the calling thread's CRF scratch buffers (host memory, and device memory on every GPU
    the thread ran the CRF on); the thread's next call allocates afresh."""
    _local.__dict__.pop("buffer", None)
    _local.__dict__.pop("cuda_buffers", None)


# Python's mmap names MAP_NORESERVE from 3.12; Linux's value on x86-64 and arm64 before that.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE",
                         0x4000 if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64") else 0)


def _reserve(nbytes: int) -> np.ndarray:
    """nbytes of zeroed memory, reserved without being committed. The workspace's worst case is far
    larger than what the kernels touch (40 GiB for a 3000x4000 photo, of which about 7 are used), and
    Linux's default overcommit heuristic refuses a plain allocation larger than RAM and swap together;
    MAP_NORESERVE asks for address space alone, and a page is committed when the kernels first touch it."""
    try:
        if hasattr(mmap, "MAP_ANONYMOUS"):
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
            return np.frombuffer(mmap.mmap(-1, max(nbytes, 1), flags=flags), dtype=np.uint8)
        return np.empty(nbytes, dtype=np.uint8)
    except (MemoryError, OSError, OverflowError) as error:
        raise NativeError(f"could not reserve the CRF's workspace of {nbytes / 2**30:.1f} GiB for its worst case "
                          f"({error}): use a smaller image") from None
