"""dynseg.sdk: what applications embed. Imports with numpy alone (no torch).

Front door: `Segmenter` (an exported model or a checkpoint; image and detections in, a
`SegmentationResult` of `Instance`s out), `dense_crf` (the numpy dense CRF on the native kernels, CPU
or GPU), `dense_crf_cuda` (the same on arrays already in GPU memory), `free_scratch` (the calling
thread's CRF scratch memory, freed now), and the error and warning types.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._native import free_scratch
from .crf import dense_crf, dense_crf_cuda
from .errors import BackendError, DetectionsDroppedWarning, DynsegError, InvalidArgumentError, NativeError
from .results import Instance, SegmentationResult
from .segmenter import Segmenter

try:
    __version__ = version("dynseg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Segmenter",
    "dense_crf",
    "dense_crf_cuda",
    "free_scratch",
    "SegmentationResult",
    "Instance",
    "DynsegError",
    "InvalidArgumentError",
    "NativeError",
    "BackendError",
    "DetectionsDroppedWarning",
    "__version__",
]
