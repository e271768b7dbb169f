"""dynseg.sdk: what applications embed. Imports with numpy alone (no torch).

Front door: `dense_crf` (the numpy dense CRF on the native kernels, CPU or GPU), `dense_crf_cuda` (the
same on arrays already in GPU memory), the result types of a segmentation (`SegmentationResult`,
`Instance`), and the error and warning types.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .crf import dense_crf, dense_crf_cuda
from .errors import DetectionsDroppedWarning, DynsegError, InvalidArgumentError, NativeError
from .results import Instance, SegmentationResult

try:
    __version__ = version("dynseg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "dense_crf",
    "dense_crf_cuda",
    "SegmentationResult",
    "Instance",
    "DynsegError",
    "InvalidArgumentError",
    "NativeError",
    "DetectionsDroppedWarning",
    "__version__",
]
