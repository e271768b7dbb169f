"""`Segmenter`: what applications embed. One image and its detections in, a `SegmentationResult` out,
whichever backend runs the network.

Owns the path from a user's call to a backend and back: choosing and loading the backend once, the
input checks (`inputs`), the backend's run, and the shared post-processing (`results.build_result`).
Backends, each a `NetworkBackend`: "onnxruntime" (an exported .onnx; the CRF nodes on the native
kernels), "torch" (a training checkpoint directory, or a network in memory through `of_network`; needs
torch and the trainer, `errors.INSTALL_TRAINER`), "tensorrt" (a TensorRT plan with its sidecar; needs
TensorRT and a GPU). One Segmenter serves concurrent calls: it holds no per-call state.
"""

from __future__ import annotations

import os
import time
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, get_args

import numpy as np
from numpy.typing import ArrayLike

from .errors import InvalidArgumentError
from .checks import check_threads, one_of
from .files import named_path
from .graph import ENGINE_SUFFIXES
from .inputs import ImageLike, check_detections, cuda_index, load_image
from .results import SegmentationResult, build_result

if TYPE_CHECKING:  # the trainer needs torch, which the SDK imports only for the torch backend
    from dynseg.trainer.model import DynamicallyInstantiatedNetwork

Backend = Literal["auto", "onnxruntime", "torch", "tensorrt"]
BACKENDS: tuple[str, ...] = get_args(Backend)


class NetworkBackend(Protocol):
    """What a Segmenter needs of a backend: the model's classes, detection limit and score ceiling, the
    fingerprint of its weights, and one run of the exported graph (docs/ops.md) on checked inputs."""

    class_names: tuple[str, ...]
    max_detections: int
    score_ceiling: float
    weights_fingerprint: str | None

    def run(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, *,
            timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """image (H, W, 3) uint8 RGB; boxes (D, 4) float32, checked; labels (D,) int64; scores (D,)
        float32. Returns instance_logits (D+1, H, W) and semantic_probabilities (K+1, H, W). timings, if
        given, gains the seconds of the stages this backend can tell apart ("network", "crf")."""
        ...


def _backend_for(path: Path, backend: str) -> str:
    if one_of("backend", backend, BACKENDS) != "auto":
        return backend
    if path.is_dir():
        return "torch"
    if path.suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    return "onnxruntime"


class Segmenter:
    """Instance segmentation of images given their detections.

    Args:
        path: an exported model (.onnx), a training checkpoint directory, or a TensorRT engine.
        backend: "auto" picks by path (directory: torch, .engine/.plan: tensorrt, else onnxruntime).
        device: "cpu", "cuda" or "cuda:N" (torch: any; onnxruntime: "cuda" needs onnxruntime-gpu and
            the native library's CUDA kernels, and keeps every tensor on the GPU; tensorrt: "cuda").
        threads: the CPU threads a call may use, onnxruntime backend only: each of its sessions' thread
            pool and the CRF nodes' kernels, at most one per core this process may run on (a larger
            count is capped). None: onnxruntime's default for its sessions (a thread per physical core)
            and every core for the CRF kernels. The torch backend follows torch's
            process-wide setting (torch.set_num_threads); tensorrt computes on the GPU.

    A Segmenter is also a context manager: leaving the block closes it (`close`).
    """

    def __init__(self, path: str | os.PathLike[str], backend: Backend = "auto", device: str = "cpu", *,
                 threads: int | None = None):
        model = named_path(path, "path")
        cuda_index(device)  # a bad device string fails before any backend loads
        if threads is not None:  # None: onnxruntime's default, not check_threads' "every core" (0)
            threads = check_threads(threads)
        try:
            model.stat()
        except (FileNotFoundError, NotADirectoryError):
            pass  # each backend says what it expected there
        except OSError as error:  # a name too long, a folder on the way that may not be searched
            raise InvalidArgumentError(f"path {str(model)!r} cannot be opened: {error.strerror or error}") from None
        self.backend_name = _backend_for(model, backend)
        if threads is not None and self.backend_name != "onnxruntime":
            raise InvalidArgumentError(f"threads applies to the onnxruntime backend, not to {self.backend_name!r} "
                                       "(torch: torch.set_num_threads; tensorrt computes on the GPU)")
        self._backend: NetworkBackend | None
        if self.backend_name == "onnxruntime":
            from .onnx_backend import OnnxRuntimeBackend

            self._backend = OnnxRuntimeBackend(model, device=device, threads=threads)
        elif self.backend_name == "torch":
            from .torch_backend import TorchBackend

            self._backend = TorchBackend(model, device=device)
        else:
            from .tensorrt_backend import TensorRTBackend

            self._backend = TensorRTBackend(model, device=device)
        self._attach(self._backend, model)

    @classmethod
    def of_network(cls, network: DynamicallyInstantiatedNetwork, *, path: str | Path | None = None) -> Segmenter:
        """A Segmenter over a trained network in memory (dynseg.trainer's DynamicallyInstantiatedNetwork), on
        the torch backend and the device of its parameters: what training's held-out evaluation segments
        with. path: the checkpoint it was loaded from, if any, which messages name. Sets the network to
        eval mode."""
        from .torch_backend import TorchBackend

        segmenter = cls.__new__(cls)
        segmenter.backend_name = "torch"
        segmenter._backend = TorchBackend.of_network(network)
        segmenter._attach(segmenter._backend, None if path is None else named_path(path, "path"))
        return segmenter

    def _attach(self, backend: NetworkBackend, path: Path | None) -> None:
        self.path = path
        self.class_names: tuple[str, ...] = backend.class_names
        self.max_detections: int = backend.max_detections
        # s_max: the largest detector score the model takes (its detection potential's; 1 by default)
        self.score_ceiling: float = backend.score_ceiling
        # sha256 of the weights this model runs (dynseg.trainer.checkpoint.weights_fingerprint); None for
        # an export older than the fingerprint
        self.weights_fingerprint: str | None = backend.weights_fingerprint

    def segment(self, image: ImageLike, boxes: ArrayLike, labels: ArrayLike, scores: ArrayLike, *,
                timings: dict[str, float] | None = None) -> SegmentationResult:
        """Segments one image.

        image: (H, W, 3) uint8 RGB, (H, W) grayscale, (H, W, 4) RGBA, a PIL.Image, or a path to an image file.
        boxes: (D, 4) xyxy pixels, inclusive (x2, y2 are the box's last column and row); labels: (D,)
        class ids in 1..K; scores: (D,) detector confidences in 0..score_ceiling (1 unless the model was
        trained otherwise), not logits or percentages; D >= 0 (up to max_detections). Boxes reaching
        outside the image are clipped; inverted and outside ones are dropped with a warning and recorded
        in the result's `dropped`. The detections' order numbers the instances and moves no pixel
        between them: a pixel that detections tie on goes to the background if it ties too, else to the
        highest score, else to the earlier detection (docs/algorithm.md §6).
        timings: if given, gains the seconds the call spent in post-processing ("post") and, on
        onnxruntime, in the network's sessions ("network") and the CRF nodes ("crf"). Calls one after
        another may add to one dict; concurrent calls need one each (an addition is not atomic).
        """
        if timings is not None and not isinstance(timings, dict):
            raise InvalidArgumentError(f"timings must be a dict (or None), got {type(timings).__name__}")
        for key in ("network", "crf", "post"):  # the call adds to them: several calls can share one dict
            value = (timings or {}).get(key, 0.0)
            if not isinstance(value, Real) or isinstance(value, (bool, np.bool_)):
                raise InvalidArgumentError(f"timings[{key!r}] must be a number of seconds to add to, got {value!r}")
        return self._segment(image, boxes, labels, scores, timings)[0]

    def segment_with_outputs(self, image: ImageLike, boxes: ArrayLike, labels: ArrayLike,
                             scores: ArrayLike) -> tuple[SegmentationResult, dict[str, np.ndarray]]:
        """`segment`'s result and the graph's raw outputs it was made from (docs/ops.md: instance_logits
        (D'+1, H, W) over the kept detections, semantic_probabilities (K+1, H, W)), for comparing
        backends (`dynseg validate`)."""
        return self._segment(image, boxes, labels, scores)

    def _segment(self, image: ImageLike, boxes: ArrayLike, labels: ArrayLike, scores: ArrayLike,
                 timings: dict[str, float] | None = None) -> tuple[SegmentationResult, dict[str, np.ndarray]]:
        backend = self._backend  # one read: another thread may close the Segmenter meanwhile
        if backend is None:
            raise InvalidArgumentError(f"{self!r} is closed")
        rgb = load_image(image)
        height, width = rgb.shape[:2]
        detections = check_detections(boxes, labels, scores, height=height, width=width,
                                      num_classes=len(self.class_names), max_detections=self.max_detections,
                                      score_ceiling=self.score_ceiling,
                                      stacklevel=4)  # the warning points at the caller of segment
        outputs = backend.run(rgb, detections.boxes, detections.labels, detections.scores, timings=timings)
        start = time.perf_counter()
        result = build_result(rgb, outputs["instance_logits"], outputs["semantic_probabilities"], detections,
                              self.class_names)
        if timings is not None:
            timings["post"] = timings.get("post", 0.0) + time.perf_counter() - start
        return result, outputs

    def close(self) -> None:
        """Releases the model (sessions, engine, their memory); segment then raises. Closing twice is
        harmless. Each thread's CRF scratch memory is separate: `dynseg.sdk.free_scratch`."""
        self._backend = None

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple:
        # onnxruntime's sessions and TensorRT's engine cannot be pickled: say so rather than fail inside them
        raise TypeError(f"{self!r} cannot be pickled or copied: it holds a loaded model; open one Segmenter per "
                        "process (in a process pool, in each worker's initializer) from the model's path")

    def __repr__(self) -> str:
        where = "a network in memory" if self.path is None else repr(str(self.path))
        return f"Segmenter({where}, backend={self.backend_name!r}, classes={len(self.class_names)})"
