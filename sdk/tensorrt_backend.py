"""The TensorRT backend: a plan `dynseg export --format engine` built, run on its own CUDA stream with
dynseg's MeanFieldCRF plugin (docs/tensorrt.md).

Owns loading (TensorRT imported on use, the plugin library through the plugin registry, the sidecar
checked against the running TensorRT, GPU and plugin before the plan is deserialised) and a call:
input shapes set for the call's D and image size, device buffers kept per thread and grown only when
a call needs more, one execution context per thread (contexts are not shared between threads, so
one Segmenter serves concurrent calls). Device memory, copies and the stream come from the native
library (dynseg.sdk._native), so the SDK needs no CUDA binding of its own.

An image without detections on an engine whose profile starts at D >= 1 (the default) runs with
`silent_detections`: detections of score 0, which add exactly nothing to the semantic CRF's detection
potential (its terms are proportional to the score), so the semantic probabilities are those of D = 0;
the backend then keeps only the background plane of the instance logits, the shape D = 0 gives. Its
values are not D = 0's (that CRF ran over the silent labels too), and nothing reads them: with one
label, every pixel is background.

Written to TensorRT 10's Python API; it has not run here: no TensorRT can be installed on the
machines this was developed on (docs/tensorrt.md says what was verified).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from . import _native
from .errors import InvalidArgumentError
from .files import check_regular_file
from .graph import OUTPUTS, graph_inputs
from .inputs import cuda_index
from .tensorrt_engine import EngineError


def silent_detections(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` detections that change no semantic output: one-pixel boxes at the origin, class 1, score 0."""
    return np.zeros((count, 4), np.float32), np.ones(count, np.int64), np.zeros(count, np.float32)


class TensorRTBackend:
    """A TensorRT plan with its sidecar JSON; see the module docstring."""

    def __init__(self, path: str | Path, *, device: str = "cuda"):
        from . import tensorrt_engine as engines

        self.path = Path(path)
        check_regular_file(self.path, "engine file")
        if self.path.suffix == ".onnx":
            raise InvalidArgumentError(f"{self.path} is an ONNX model, not a TensorRT engine: build one with "
                                       "`dynseg export --format engine`, or run it with backend 'onnxruntime'")
        index = cuda_index(device)
        if index is None:
            raise InvalidArgumentError("backend 'tensorrt' runs on a GPU: pass device='cuda' (--device cuda)")
        self._device = index
        sidecar = engines.read_sidecar(self.path)
        trt = engines.import_tensorrt()  # first: without TensorRT there is no plugin library to look for either
        library = engines.plugin_library_path()
        _native.check_cuda_device(index)
        _native.set_cuda_device(index)  # the runtime, the engine and the check below are this device's
        engines.check_sidecar(sidecar, **engines.running_environment(library, device=index), plan=self.path)
        self._trt = trt
        self._logger = engines.tensorrt_logger(trt)
        engines.register_plugin(trt.get_plugin_registry(), library, trt.__version__, process_wide=True)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialise {self.path}; rebuild the engine")
        self.class_names: tuple[str, ...] = tuple(sidecar["class_names"])
        self.weights_fingerprint: str | None = sidecar.get("weights_sha256")
        self._profile = engines.Profile.from_json(sidecar["profile"])
        self.max_detections = int(self._profile.detections[2])
        self.score_ceiling = float(sidecar.get("score_ceiling", 1.0))  # 1: a sidecar older than the entry
        self._local = threading.local()

    def _state(self):
        """This thread's execution context, stream and device buffers."""
        _native.set_cuda_device(self._device)  # every thread starts on device 0
        state = getattr(self._local, "state", None)
        if state is None:
            context = self._engine.create_execution_context()
            if context is None:
                raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
            state = self._local.state = {"context": context, "stream": _native.CudaStream(), "buffers": {}}
        return state

    def _buffer(self, state, name: str, nbytes: int) -> int:
        buffer = state["buffers"].get(name)
        if buffer is None or buffer.nbytes < nbytes:
            buffer = state["buffers"][name] = _native.CudaBuffer(max(nbytes, 1))
        return buffer.pointer

    def run(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, *,
            timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """`segmenter.NetworkBackend.run`; the graph runs as one, so `timings` gains nothing."""
        height, width = image.shape[:2]
        silent = len(boxes) == 0 and self._profile.detections[0] > 0  # see the module docstring
        if silent:
            boxes, labels, scores = silent_detections(self._profile.detections[0])
        if not self._profile.admits(len(boxes), height, width):
            raise InvalidArgumentError(
                f"{len(boxes)} detections on a {height}x{width} image are outside the engine's profile "
                f"(D {self._profile.detections[0]}..{self._profile.detections[2]}, sizes {self._profile.sizes[0]} to "
                f"{self._profile.sizes[2]}): rebuild the engine with a wider profile (dynseg export --format engine "
                "--min-detections / --max-detections / --min-size / --max-size)")
        trt = self._trt
        state = self._state()
        context = state["context"]
        for name, array in graph_inputs(image, boxes, labels, scores).items():
            wanted = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            if array.dtype != wanted:  # an engine built from another export, or by another tool
                raise EngineError(f"{self.path} takes {name} as {wanted}, this dynseg passes {array.dtype}: rebuild "
                                  "the engine with `dynseg export --format engine`")
            if not context.set_input_shape(name, array.shape):
                raise InvalidArgumentError(f"TensorRT refused {name} of shape {array.shape} for this engine")
            pointer = self._buffer(state, name, array.nbytes)
            _native.copy_to_device(pointer, array)
            if not context.set_tensor_address(name, pointer):
                raise EngineError(f"TensorRT refused the device address of {name} (see its log above)")
        outputs = {}
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            if self._engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(context.get_tensor_shape(name))
            if min(shape, default=0) < 0:
                raise EngineError(f"TensorRT could not work out the shape of {name}, {shape} (see its log above)")
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            outputs[name] = np.empty(shape, dtype=dtype)
            if not context.set_tensor_address(name, self._buffer(state, name, outputs[name].nbytes)):
                raise EngineError(f"TensorRT refused the device address of {name} (see its log above)")
        if not context.execute_async_v3(state["stream"].handle):
            raise EngineError("TensorRT failed to run the engine (see TensorRT's log above)")
        state["stream"].synchronize()
        for name in OUTPUTS:
            _native.copy_from_device(outputs[name], state["buffers"][name].pointer)
        instance_logits = outputs["instance_logits"][0]  # (D+1, H, W)
        return {"instance_logits": instance_logits[:1] if silent else instance_logits,
                "semantic_probabilities": outputs["semantic_probabilities"][0]}
