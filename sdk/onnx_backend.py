"""The onnxruntime backend: runs an exported dynseg graph with onnxruntime for the standard ONNX and
the native kernel library for each dynseg::MeanFieldCRF node.

onnxruntime cannot run our custom op without a compiled custom-op library (its C headers are not
available to the build), so the graph is partitioned once, at load time, at the custom nodes: the
standard nodes between two CRF nodes become one onnxruntime session each, and a call runs the
sessions and the CRF nodes in the graph's topological order, passing tensors by name. An export of
the whole network (docs/ops.md) runs as five steps: a session for the backbone and the semantic head
(the semantic unary); the semantic CRF's node ("/semantic_crf/MeanFieldCRF": mean field with the
detection potential, which also recalibrates the detections' scores); a session for the instance
unaries (the box, global and shape terms); the instance CRF's node ("/instance_crf/MeanFieldCRF",
one label per detection plus background); and a session that forms the outputs. Sessions are
built once; dynamic H, W and D never rebuild them. Safe to call from several threads at once
(onnxruntime's sessions are, and each call makes its own I/O bindings and keeps its tensors to itself).

Tensors stay where the device puts them: every value of a call is an onnxruntime OrtValue on the
backend's device, handed from session to session through I/O binding. On "cpu" the CRF nodes read
and write them as numpy arrays; on "cuda:N" the sessions run on onnxruntime's CUDA execution provider
(the onnxruntime-gpu package) and the CRF nodes run the library's CUDA kernels on the same device
memory, so an image crosses to the host only as the two outputs. The image goes in as raw 0..255
RGB (`graph.graph_inputs`): the graph itself normalises it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_state
from onnx import helper, numpy_helper, shape_inference

from . import _native
from .crf_node import CrfAttributes, CrfInputs, run_node, run_node_cuda, score_ceiling_of
from .errors import BackendError, DynsegError, InvalidArgumentError, LatticeRangeError, one_line
from .graph import OUTPUTS, crf_nodes, graph_inputs, is_crf_node, protobuf_memory, read_export
from .inputs import cuda_index


# What onnxruntime raises: the RuntimeError of its Python layer, and its C++ layer's exceptions (Fail, EPFail,
# RuntimeException, ...), which derive from Exception alone.
_ORT_ERRORS: tuple[type[Exception], ...] = (RuntimeError, *(
    kind for kind in vars(ort_state).values() if isinstance(kind, type) and issubclass(kind, Exception)))

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


@contextmanager
def _onnxruntime(doing: str) -> Iterator[None]:
    """onnxruntime's exceptions inside, as a BackendError that says what it was `doing`."""
    try:
        yield
    except DynsegError:  # dynseg's own, from the CRF nodes or the device: already clear
        raise
    except _ORT_ERRORS as error:
        raise BackendError(f"onnxruntime could not {doing}: {one_line(error, limit=600)}") from error


@dataclass
class _Session:
    """Standard nodes run by onnxruntime: what they read and what the later steps need from them."""

    session: ort.InferenceSession
    inputs: list[str]
    outputs: list[str]


@dataclass
class _CrfNode:
    """A dynseg::MeanFieldCRF node, run by the native kernels: its name in the graph (which says whose CRF
    it is), its tensors' names, its attributes, and its constant inputs (the CRF's weights), on the
    session's device."""

    name: str
    inputs: list[str]
    outputs: list[str]
    attributes: CrfAttributes
    constants: dict[str, ort.OrtValue]  # its inputs that are initializers


@dataclass(frozen=True)
class _Placement:
    """Where a backend's tensors live: onnxruntime's device type and id, and its providers."""

    device_type: str  # "cpu" or "cuda"
    device_id: int

    @staticmethod
    def of(device: str) -> _Placement:
        index = cuda_index(device)
        if index is None:
            return _Placement("cpu", 0)
        placement = _Placement("cuda", index)
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise InvalidArgumentError(
                f"device {device!r} with the onnxruntime backend needs onnxruntime's CUDA execution provider, "
                f"but this onnxruntime {ort.__version__} offers {available}: install onnxruntime-gpu in place of "
                "onnxruntime"
            )
        _native.check_cuda_device(placement.device_id)
        return placement

    @property
    def providers(self) -> list:
        if self.device_type == "cpu":
            return ["CPUExecutionProvider"]
        # no TF32: the exported model must compute what the fp32 network computes (the parity checks).
        # HEURISTIC: the EP's default, EXHAUSTIVE, benchmarks every convolution's algorithms again for each
        # new input shape, and photos come in many sizes.
        return [("CUDAExecutionProvider", {"device_id": self.device_id, "use_tf32": 0,
                                           "cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"]

    def run_options(self) -> ort.RunOptions:
        """What a call's session runs are given: onnxruntime logs nothing of its own (a failed run reaches the
        caller as a BackendError quoting it), and on the CPU the arena hands its unused memory back after
        the run (onnxruntime keeps an arena's peak otherwise, so one large image would hold its memory for
        the Segmenter's life)."""
        options = ort.RunOptions()
        options.log_severity_level = 4  # fatal only
        if self.device_type == "cpu":
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return options

    def put(self, array: np.ndarray) -> ort.OrtValue:
        """A host array as an OrtValue on this device (on the CPU, without a copy)."""
        array = np.ascontiguousarray(array)
        if self.device_type == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(array, "cpu", 0)
        # Not ortvalue_from_numpy: its upload is a cudaMemcpy from pageable memory, which may return before
        # the data has landed, and the sessions' and the CRF's streams are non-blocking; the native copy waits.
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype.type, "cuda", self.device_id)
        if array.nbytes:
            _native.copy_to_device(value.data_ptr(), array)
        return value

    def empty(self, shape: tuple[int, ...]) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, self.device_type, self.device_id)

    def host(self, value: ort.OrtValue) -> np.ndarray:
        """An OrtValue of this device as a host array (on the CPU, without a copy)."""
        if self.device_type == "cpu":
            return np.asarray(_OrtValueMemory(value)) if value.data_ptr() else value.numpy()  # empty: no address
        return np.array(value.numpy())  # a copy: numpy() of a device value may not own what it returns


class _OrtValueMemory:
    """A CPU OrtValue's memory as numpy sees it, without a copy, on every onnxruntime: the interface is
    built from the OrtValue's own address (before onnxruntime 1.19, numpy() returned a *copy*, whose
    address dangles as soon as that copy is collected), and an array over this object keeps the
    OrtValue alive as its base (the outputs are tens of MB at D = 50)."""

    def __init__(self, value: ort.OrtValue):
        self.value = value
        dtype = np.dtype(_ORT_TYPES[value.data_type()])
        self.__array_interface__ = {"version": 3, "shape": tuple(value.shape()), "typestr": dtype.str,
                                    "data": (int(value.data_ptr()), False)}


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, the CRF nodes' outputs included: shape inference cannot see through
    a custom op, so they are declared float32 in `model` (the backend's own copy) before it runs."""
    for node in crf_nodes(model.graph):
        model.graph.value_info.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                      for name in node.output)
    inferred = shape_inference.infer_shapes(model)
    return {info.name: info.type.tensor_type.elem_type
            for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}


_Part = list[onnx.NodeProto] | onnx.NodeProto  # a run of standard nodes, or one CRF node


def _cut_at_crf_nodes(graph: onnx.GraphProto) -> list[_Part]:
    """The graph's nodes in order, cut at the CRF nodes into parts."""
    parts: list[_Part] = []
    standard_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if is_crf_node(node):  # read_export refused every other op of the domain
            parts += [standard_nodes, node]
            standard_nodes = []
        else:
            standard_nodes.append(node)
    return [*parts, standard_nodes]


def _needed_after(parts: list[_Part], graph: onnx.GraphProto) -> list[set[str]]:
    """For each part, the tensors a later part or the graph's outputs read: what it must hand on."""
    needed_after: list[set[str]] = []
    needed = {o.name for o in graph.output}
    for part in reversed(parts):
        needed_after.append(set(needed))
        for node in [part] if isinstance(part, onnx.NodeProto) else part:
            needed.update(node.input)
    return needed_after[::-1]


def _session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # our partitions are valid; spare users onnxruntime's notes
    # The sessions take turns with the CRF kernels on the same cores: pool threads left spin-waiting after a
    # run (onnxruntime's default) take those cores from the CRF and the next session.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:  # each session's own pool: the sessions run one after another
        # capped at the cores, as the CRF kernels cap it: onnxruntime starts every thread it is asked for
        options.intra_op_num_threads, options.inter_op_num_threads = min(threads, _native.max_threads()), 1
    return options


def _partition(model: onnx.ModelProto, placement: _Placement, threads: int | None) -> list[_Session | _CrfNode]:
    """The steps a call runs, in order, one per part of the graph: an onnxruntime session for each run
    of standard nodes (those whose outputs nothing later reads are left out) and the CRF nodes between
    them."""
    graph = model.graph
    types = _element_types(model)
    initializers = {t.name: t for t in graph.initializer}
    parts = _cut_at_crf_nodes(graph)
    options = _session_options(threads)
    steps: list[_Session | _CrfNode] = []
    for index, (part, needed) in enumerate(zip(parts, _needed_after(parts, graph))):
        if isinstance(part, onnx.NodeProto):
            constants = {n: placement.put(numpy_helper.to_array(initializers[n])) for n in part.input
                         if n in initializers}
            steps.append(_CrfNode(part.name, list(part.input), list(part.output), CrfAttributes.of_node(part),
                                  constants))
            continue
        produced = {name for node in part for name in node.output}
        consumed = [name for node in part for name in node.input if name]
        inputs = list(dict.fromkeys(n for n in consumed if n not in produced and n not in initializers))
        outputs = [n for n in dict.fromkeys(name for node in part for name in node.output) if n in needed]
        if not outputs:
            continue
        # Inputs and outputs are declared without shapes. Declaring the full model's inferred ones lets
        # onnxruntime fuse a few more nodes (366 to 333 in a resnet18 export's first part) but timed within 1%
        # on the CPU, and moved the instance logits by up to 5e-6.
        part_graph = helper.make_graph(
            part, f"dynseg_part_{index}",
            [helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None) for n in inputs],
            [helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None) for n in outputs],
            initializer=[initializers[n] for n in dict.fromkeys(consumed) if n in initializers],
        )
        opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
        part_model = helper.make_model(part_graph, opset_imports=opsets, ir_version=model.ir_version)
        # No fallback: onnxruntime would print a banner to stdout and retry on the CPU alone, hiding why the
        # GPU failed (older onnxruntime ignores the option and still does, though the check below refuses it).
        session = ort.InferenceSession(part_model.SerializeToString(), sess_options=options,
                                       providers=placement.providers, enable_fallback=0)
        if placement.device_type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise InvalidArgumentError("device 'cuda': onnxruntime could not start its CUDA execution provider "
                                       "(see its log for why: CUDA or cuDNN libraries missing or mismatched)")
        steps.append(_Session(session, inputs, outputs))
    return steps


def _native_view(value: ort.OrtValue, name: str, dtype: type) -> _native.DeviceArray:
    """A CUDA OrtValue as the native library's view of it, after checking its device and dtype."""
    if value.device_name().lower() != "cuda":
        raise InvalidArgumentError(f"the CRF input {name!r} is on {value.device_name()}, not on the GPU")
    if _ORT_TYPES.get(value.data_type()) is not dtype:
        raise InvalidArgumentError(f"the CRF input {name!r} is {value.data_type()}, the op needs {np.dtype(dtype)}")
    return _native.DeviceArray(int(value.data_ptr()), tuple(value.shape()), np.dtype(dtype))  # OrtValues are dense


def _mean_field(step: _CrfNode, inputs: list[ort.OrtValue], placement: _Placement,
               threads: int | None) -> list[ort.OrtValue]:
    """One CRF node's mean field on the OrtValues of its inputs, on the backend's device (on the CPU with
    `threads` threads, None: every core). Returns the node's two outputs: the logits (1, L, H, W) and the
    detection scores (D,), recalibrated where the node adds the detection potential."""
    values = [placement.host(value) for value in inputs] if placement.device_type == "cpu" else None
    try:
        if values is not None:
            logits, detection_scores = run_node(values, step.attributes, threads or 0)
            return [placement.put(logits), placement.put(detection_scores)]
        views = _cuda_views(step, inputs)
        node_inputs = CrfInputs.of(views)
        logits, detection_scores = placement.empty(node_inputs.unary.shape), placement.empty(node_inputs.scores.shape)
        run_node_cuda(views, step.attributes, _native_view(logits, step.outputs[0], np.float32),
                      _native_view(detection_scores, step.outputs[1], np.float32), placement.device_id)
        return [logits, detection_scores]
    except LatticeRangeError as error:  # the image's size or colours, not what the network computed
        raise LatticeRangeError(f"the model's CRF node {step.name} cannot take this image: {error}") from error
    except InvalidArgumentError as error:  # its inputs are the network's: say so, or "unary" means nothing
        # (on the GPU the library's message names the possible causes itself: its inputs stay there; the
        # weights were found finite at load, by read_export)
        finite = values is None or np.isfinite(values[0]).all()
        cause = "" if finite else " (the network's output holds NaN or infinity)"
        raise InvalidArgumentError(f"the model's CRF node {step.name} refused what the network computed from this "
                                   f"image and its detections: {error}{cause}") from error


def _cuda_views(step: _CrfNode, inputs: list[ort.OrtValue]) -> list[_native.DeviceArray]:
    """A CRF node's inputs on the GPU as the native library's views of their memory, each checked to
    be a CUDA OrtValue of the op's dtype (a 0-d one, such as an Identity's output, as it is)."""
    return [_native_view(value, name, CrfInputs.dtype(input_name))
            for input_name, name, value in zip(CrfInputs._fields, step.inputs, inputs)]


class OnnxRuntimeBackend:
    """An exported dynseg graph, partitioned and ready to run; see the module docstring."""

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None):
        self._placement = _Placement.of(device)
        self._threads = threads
        self.path = Path(path)
        export = read_export(self.path)
        self.class_names: tuple[str, ...] = export.class_names
        self.max_detections = export.max_detections
        self.weights_fingerprint: str | None = export.weights_fingerprint
        with _onnxruntime(f"load {self.path}"), protobuf_memory(self.path):
            self._steps = _partition(export.model, self._placement, threads)
        self.score_ceiling = score_ceiling_of(step.attributes for step in self._steps if isinstance(step, _CrfNode))

    def run(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, *,
            timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """image (H, W, 3) uint8 RGB; boxes (D, 4) float32 checked; labels (D,) int64; scores (D,)
        float32. Returns the graph's outputs by name, batch axes dropped. timings, if given, gains the
        seconds spent in onnxruntime ("network") and in the CRF nodes ("crf")."""
        place = self._placement
        values: dict[str, ort.OrtValue] = {
            name: place.put(array) for name, array in graph_inputs(image, boxes, labels, scores).items()
        }
        run_options = place.run_options()
        doing = f"run {self.path} on a {image.shape[0]}x{image.shape[1]} image with {len(boxes)} detections"
        for step in self._steps:
            start = time.perf_counter()
            if isinstance(step, _CrfNode):
                inputs = [step.constants[n] if n in step.constants else values[n] for n in step.inputs]
                outputs = _mean_field(step, inputs, place, self._threads)
            else:
                with _onnxruntime(doing):
                    binding = step.session.io_binding()
                    for name in step.inputs:
                        binding.bind_ortvalue_input(name, values[name])
                    for name in step.outputs:
                        binding.bind_output(name, place.device_type, place.device_id)
                    step.session.run_with_iobinding(binding, run_options)
                    outputs = binding.get_outputs()
            values.update(zip(step.outputs, outputs))
            if timings is not None:
                kind = "crf" if isinstance(step, _CrfNode) else "network"
                timings[kind] = timings.get(kind, 0.0) + time.perf_counter() - start
        return {name: place.host(values[name])[0] for name in OUTPUTS}  # each output's batch axis is 1
