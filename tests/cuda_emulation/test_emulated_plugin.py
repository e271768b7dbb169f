"""The TensorRT plugin run without TensorRT: tensorrt_harness.cpp calls its interfaces as TensorRT's
builder and runtime do, compiled with the plugin against TensorRT's public headers, on two machines:
"emulated", into the library whose CUDA kernels emulator.py emulates on the CPU (any machine), and
"gpu", linked to the installed library's CUDA kernels, with every tensor in GPU memory (a machine with
a GPU and torch's CUDA: scripts/gpu_check.sh). Its outputs are held to the SDK's executor of the same
node on the CPU kernels (`run_node`), and its refusals to the messages docs/tensorrt.md promises.
Needs TensorRT's headers (the `tensorrt_headers` fixture); TensorRT itself keeps the last word on how
its parser and builder treat the plugin."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from dynseg.sdk.crf_node import CrfAttributes, run_node

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("cuda_emulator", HERE / "emulator.py")
emulator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emulator)

NAMES = ("unary", "image", "spatial_weight", "bilateral_weight", "compatibility", "boxes", "labels", "scores",
         "detection_x", "detection_y")
NODE = {"iterations": 3, "theta_spatial": 3.0, "theta_bilateral_xy": 20.0, "theta_bilateral_rgb": 13.0,
        "normalization": "after", "detection_potential": 1, "score_ceiling": 1.0, "epsilon": 1e-4}


def _field(value: object) -> tuple[str, np.ndarray]:
    """An attribute as the plugin field TensorRT's ONNX parser makes of it (ints narrowed to int32)."""
    if isinstance(value, str):
        return "char", np.frombuffer(value.encode() + b"\0", np.uint8).copy()
    if isinstance(value, np.ndarray):
        return str(value.dtype), value
    return ("int32", np.array([value], np.int32)) if isinstance(value, int) else ("float32", np.array([value], np.float32))


class StandInTensorRT:
    """The harness library through ctypes: create, build, plan and enqueue as TensorRT would; on the
    GPU (gpu=True) enqueue's tensors and workspace live in device memory."""

    def __init__(self, path: Path, gpu: bool = False):
        self.path, self.gpu = path, gpu
        self.lib = ctypes.CDLL(str(path))
        p, i32, i64, s = ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p
        for name, result, args in [
            ("harness_take_log", s, []),
            ("harness_creator_identity", s, []),
            ("harness_create", p, [s, i32, i32, p, p, p, p]),
            ("harness_destroy", None, [p]),
            ("harness_build", i32, [p, p, i64, i64, i64, p, p, p, p, p, p]),
            ("harness_through_plan", p, [p, s]),
            ("harness_serialised_fields", s, [p]),
            ("harness_enqueue", i32, [p, p, i64, p, p, p, p]),
            ("dynseg_version", s, []),  # the kernel library's, which the harness links
            ("dynseg_abi_version", i32, []),
        ]:
            function = getattr(self.lib, name)
            function.restype, function.argtypes = result, args
        self.log()

    def log(self) -> str:
        return self.lib.harness_take_log().decode()

    @property
    def kernel_library(self) -> str:
        """How a plan names the kernel library the plugin runs on: its version and C ABI."""
        return f"{self.lib.dynseg_version().decode()} abi {self.lib.dynseg_abi_version()}"

    def create(self, fields: Mapping[str, object], runtime: bool = False) -> int | None:
        """createPlugin in the build phase, as the ONNX parser calls it (runtime: in the runtime phase, as
        TensorRT calls it with a plan's fields); None when the plugin refuses."""
        typed = [(name, *_field(value)) for name, value in fields.items()]
        strings = lambda values: (ctypes.c_char_p * len(values))(*[v.encode() for v in values])
        names, kinds = strings([t[0] for t in typed]), strings([t[1] for t in typed])
        data = (ctypes.c_void_p * len(typed))(*[d.ctypes.data for _, _, d in typed])
        # a string's length without its terminator, as TensorRT's ONNX parser passes it
        lengths = np.array([d.size - (k == "char") for _, k, d in typed], np.int32)
        return self.lib.harness_create(b"crf", int(runtime), len(typed), names, kinds, data, lengths.ctypes.data)

    def build(self, plugin: int, min_shapes: Sequence[tuple], opt_shapes: Sequence[tuple],
              max_shapes: Sequence[tuple], types: Sequence[str]) -> dict:
        ranks = np.array([len(s) for s in max_shapes], np.int32)
        table = lambda shapes: np.array([list(s) + [0] * (8 - len(s)) for s in shapes], np.int64)
        tables = [table(s) for s in (min_shapes, opt_shapes, max_shapes)]
        type_names = (ctypes.c_char_p * 10)(*[t.encode() for t in types])
        nb_outputs, output_types, source = np.zeros(1, np.int32), np.zeros(2, np.int32), np.zeros(2, np.int32)
        accepted, workspace = np.zeros(12, np.int32), np.zeros(1, np.uint64)
        result = self.lib.harness_build(
            plugin, ranks.ctypes.data, *[t.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)) for t in tables],
            type_names, nb_outputs.ctypes.data, output_types.ctypes.data, source.ctypes.data, accepted.ctypes.data,
            workspace.ctypes.data)
        return {"result": result, "outputs": int(nb_outputs[0]), "output_types": output_types.tolist(),
                "output_source": source.tolist(), "accepted": accepted.tolist(), "workspace": int(workspace[0])}

    def _place(self, array: np.ndarray):
        """The array where the plugin reads and writes it, and its address there."""
        array = np.ascontiguousarray(array)
        if not self.gpu:
            return array, array.ctypes.data
        import torch

        on_gpu = torch.from_numpy(array).cuda()
        return on_gpu, on_gpu.data_ptr()

    def enqueue(self, plugin: int, inputs: Sequence[np.ndarray], workspace_bytes: int) -> tuple[int, list[np.ndarray]]:
        inputs = [np.ascontiguousarray(a) for a in inputs]
        ranks = np.array([a.ndim for a in inputs], np.int32)
        extents = np.array([list(a.shape) + [0] * (8 - a.ndim) for a in inputs], np.int64)
        types = (ctypes.c_char_p * 10)(*[str(a.dtype).encode() for a in inputs])
        placed = [self._place(a) for a in inputs]
        logits, scores = (self._place(np.full(inputs[i].shape, np.nan, np.float32)) for i in (0, 7))
        workspace = self._place(np.zeros(max(workspace_bytes, 1), np.uint8))
        pointers = (ctypes.c_void_p * 10)(*[address for _, address in placed])
        outputs = (ctypes.c_void_p * 2)(logits[1], scores[1])
        result = self.lib.harness_enqueue(plugin, ranks.ctypes.data,
                                          extents.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), types, pointers,
                                          outputs, workspace[1])
        if self.gpu:
            import torch

            torch.cuda.synchronize()
            return result, [logits[0].cpu().numpy(), scores[0].cpu().numpy()]
        return result, [logits[0], scores[0]]


SOURCES = [ROOT / "plugins" / "tensorrt" / "mean_field_crf_plugin.cpp", HERE / "tensorrt_harness.cpp"]


def _gpu_or_none() -> str | None:
    """Why the GPU variant cannot run here, or None when it can."""
    try:
        import torch
    except ImportError:
        return "needs torch"
    from dynseg.sdk import _native

    if not torch.cuda.is_available() or not _native.cuda_compiled() or _native.cuda_device_count() < 1:
        return "needs a GPU, torch's CUDA and dynseg's CUDA kernels"
    if _cuda_root() is None:
        return "needs the CUDA toolkit's include/ and lib64/ (CUDA_HOME)"
    return None


def _cuda_root() -> Path | None:
    """The CUDA toolkit: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda or where nvcc lies."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc := shutil.which("nvcc"):
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    return next((Path(c) for c in candidates if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file()
                 and (Path(c) / "lib64" / "libcudart_static.a").is_file()), None)


def _build_for_gpu(headers: Path, out: Path) -> Path:
    """The plugin and the harness linked to the installed library (its CUDA kernels), as
    plugins/tensorrt/CMakeLists.txt links the plugin: against the static CUDA runtime."""
    from dynseg.plugins import library_path

    library, cuda = library_path(), _cuda_root()
    command = ["g++", "-std=c++17", "-O1", "-fPIC", "-shared", "-w", *map(str, SOURCES),
               f"-I{ROOT / 'plugins' / 'include'}", f"-I{ROOT / 'plugins' / 'tensorrt'}", f"-I{cuda / 'include'}",
               f"-isystem{headers}", str(library), f"-Wl,-rpath,{library.parent}",
               str(cuda / "lib64" / "libcudart_static.a"), "-ldl", "-lrt", "-pthread", "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the harness for the GPU failed:\n{result.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module", params=["emulated", "gpu"])
def tensorrt(request, tensorrt_headers, tmp_path_factory) -> StandInTensorRT:
    folder = tmp_path_factory.mktemp(f"plugin-{tensorrt_headers.name}-{request.param}")
    if request.param == "gpu":
        if (why := _gpu_or_none()) is not None:
            pytest.skip(f"the plugin on a GPU {why}; CI machines have none: scripts/gpu_check.sh runs it on a GPU")
        return StandInTensorRT(_build_for_gpu(tensorrt_headers, folder / "libdynseg_tensorrt_gpu.so"), gpu=True)
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulator needs g++")
    out = emulator.build(ROOT, folder / "libdynseg_tensorrt_emulated.so", extra_sources=SOURCES,
                         include_dirs=[ROOT / "plugins" / "tensorrt", tensorrt_headers])
    return StandInTensorRT(out)


def node_inputs(labels: int = 4, detections: int = 2, height: int = 19, width: int = 27, matrices: bool = False,
                seed: int = 0) -> list[np.ndarray]:
    """A MeanFieldCRF node's ten inputs: smooth logits and colours, Potts with scalar weights or
    (L, L) weights and a full compatibility, and `detections` boxes of labels 1, 2, ..."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    unary = np.stack([np.sin(6 * xx * rng.uniform(-1, 1) + 3 * yy * rng.uniform(-1, 1)) for _ in range(labels)])
    image = np.stack([255 * (0.5 + 0.5 * np.cos(4 * xx * rng.uniform(-1, 1) + 5 * yy)) for _ in range(3)])
    if matrices:
        weights = [rng.uniform(0.5, 4, (labels, labels)).astype(np.float32) for _ in range(2)]
        compatibility = (1 - np.eye(labels) + rng.uniform(0, 0.3, (labels, labels))).astype(np.float32)
    else:
        weights, compatibility = [np.float32(3.0), np.float32(5.0)], np.zeros(0, np.float32)
    corners = rng.integers(0, [width // 2, height // 2], (detections, 2))
    boxes = np.concatenate([corners, corners + rng.integers(3, 9, (detections, 2))], axis=1).astype(np.float32)
    return [
        unary[None].astype(np.float32), image[None].astype(np.float32), *weights, compatibility, boxes,
        1 + np.arange(detections, dtype=np.int64) % max(labels - 1, 1), rng.uniform(0.3, 0.95, detections).astype(np.float32),
        np.float32(1.0), np.float32(2.0),
    ]


def profile(inputs: Sequence[np.ndarray], grow: int = 0) -> list[tuple]:
    """The inputs' shapes with H, W (unary, image) and D (boxes, labels, scores) grown by `grow`: a
    profile's maximum around them."""
    shapes = [a.shape for a in inputs]
    for k in (0, 1):
        batch, planes, height, width = shapes[k]
        shapes[k] = (batch, planes, height + grow, width + grow)
    detections = shapes[5][0] + grow
    shapes[5:8] = [(detections, 4), (detections,), (detections,)]
    return shapes


def build_and_run(tensorrt: StandInTensorRT, fields: Mapping[str, object], inputs: Sequence[np.ndarray],
                  grow: int = 4) -> list[np.ndarray]:
    """The plugin from `fields` through a build for a profile around `inputs`, the plan and one enqueue."""
    types = [str(a.dtype) for a in inputs]
    plugin = tensorrt.create(fields)
    assert plugin, tensorrt.log()
    built = tensorrt.build(plugin, profile(inputs), profile(inputs), profile(inputs, grow), types)
    assert built["result"] == 0, tensorrt.log()
    runtime = tensorrt.lib.harness_through_plan(plugin, b"crf")
    assert runtime, tensorrt.log()
    result, outputs = tensorrt.enqueue(runtime, inputs, built["workspace"])
    tensorrt.lib.harness_destroy(runtime)
    tensorrt.lib.harness_destroy(plugin)
    assert result == 0, tensorrt.log()
    return outputs


def test_the_library_offers_one_creator_named_as_the_onnx_node_routes_it(tensorrt):
    assert tensorrt.lib.harness_creator_identity() == b"dynseg::MeanFieldCRF 1"


@pytest.mark.parametrize("running", ["the headers'", "the next", "8.6.1"])
def test_the_library_serves_only_the_tensorrt_major_version_its_headers_are_from(tensorrt, tmp_path, running):
    """A stand-in libnvinfer loaded with local symbols, as Python's tensorrt module loads the real one,
    reports the running version; the plugin finds it among the process's objects (a fresh process each)."""
    if shutil.which("g++") is None:
        pytest.skip("the stand-in libnvinfer needs g++")
    headers = int(tensorrt.lib.dynseg_tensorrt_headers_major())
    # getInferLibVersion: major * 10000 + minor * 100 + patch since TensorRT 10, major * 1000 + ... before
    major, version, shown = {"the headers'": (headers, headers * 10000 + 203, None),
                             "the next": (headers + 1, (headers + 1) * 10000 + 203, f"{headers + 1}.2.3"),
                             "8.6.1": (8, 8601, "8.6.1")}[running]
    same_major = shown is None
    stub = tmp_path / f"libnvinfer.so.{major}"
    source = f'extern "C" int getInferLibVersion() noexcept {{ return {version}; }}'
    subprocess.run(["g++", "-shared", "-fPIC", "-x", "c++", "-", "-o", str(stub)], input=source, text=True,
                   check=True)
    script = (f"import ctypes; ctypes.CDLL({str(stub)!r}); lib = ctypes.CDLL({str(tensorrt.path)!r}); "
              "lib.harness_creator_identity.restype = ctypes.c_char_p; print(lib.harness_creator_identity().decode())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if same_major:
        assert (result.stdout.strip(), result.stderr) == ("dynseg::MeanFieldCRF 1", "")
    else:
        assert result.stdout.strip() == ""
        assert (f"compiled against TensorRT {headers}'s headers but runs in TensorRT {shown}; "
                "it offers no plugin") in result.stderr


@pytest.mark.parametrize("case, fields, shape", [
    ("semantic: detection potential, Potts", {}, {}),
    ("instance: (L, L) weights, full compatibility, symmetric",
     {"detection_potential": 0, "normalization": "symmetric"}, {"labels": 3, "matrices": True}),
    ("detection potential without detections", {}, {"detections": 0}),
    ("one label: the identity", {}, {"labels": 1}),
    ("no iterations: the identity", {"iterations": 0}, {}),
    ("odd size, many labels", {"detection_potential": 0}, {"labels": 21, "height": 7, "width": 33}),
])
def test_the_plugin_computes_what_the_sdks_node_computes(tensorrt, case, fields, shape):
    inputs = node_inputs(**shape)
    node = {**NODE, **fields}
    logits, scores = build_and_run(tensorrt, node, inputs)
    expected_logits, expected_scores = run_node(inputs, CrfAttributes.parse(node))
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)
    assert tensorrt.log() == ""


def test_the_build_negotiates_float32_linear_tensors_with_int64_labels_and_names_outputs_after_the_inputs(tensorrt):
    inputs = node_inputs()
    plugin = tensorrt.create(NODE)
    shapes = profile(inputs)
    built = tensorrt.build(plugin, shapes, shapes, shapes, [str(a.dtype) for a in inputs])
    assert built["result"] == 0 and built["outputs"] == 2 and built["workspace"] > 0
    assert built["output_types"] == [0, 0]  # DataType::kFLOAT, both
    assert built["output_source"] == [NAMES.index("unary"), NAMES.index("scores")]
    assert built["accepted"] == [1] * 12
    # a wrong input type is named when TensorRT first shows the plugin the network's types
    for index, kind, message in ((0, "float16", "input unary must be float32, got TensorRT DataType 1"),
                                 (6, "int32", "input labels must be int64, got TensorRT DataType 3")):
        tensorrt.log()
        wrong = [str(a.dtype) for a in inputs]
        wrong[index] = kind
        assert tensorrt.build(plugin, shapes, shapes, shapes, wrong)["result"] == -1
        assert tensorrt.log() == f"error: dynseg::MeanFieldCRF (crf): {message}\n"
    tensorrt.lib.harness_destroy(plugin)


def test_a_larger_profile_asks_for_a_workspace_that_covers_its_smaller_shapes(tensorrt):
    inputs = node_inputs()
    plugin = tensorrt.create(NODE)
    types = [str(a.dtype) for a in inputs]
    exact = tensorrt.build(plugin, profile(inputs), profile(inputs), profile(inputs), types)["workspace"]
    larger = tensorrt.build(plugin, profile(inputs), profile(inputs), profile(inputs, 40), types)["workspace"]
    assert larger > exact
    runtime = tensorrt.lib.harness_through_plan(plugin, b"crf")
    assert tensorrt.enqueue(runtime, inputs, larger)[0] == 0
    tensorrt.lib.harness_destroy(runtime)
    tensorrt.lib.harness_destroy(plugin)


def test_the_plan_keeps_the_largest_workspace_its_profiles_reserved(tensorrt):
    inputs = node_inputs()
    plugin = tensorrt.create(NODE)
    types = [str(a.dtype) for a in inputs]
    larger = tensorrt.build(plugin, profile(inputs), profile(inputs), profile(inputs, 40), types)["workspace"]
    tensorrt.build(plugin, profile(inputs), profile(inputs), profile(inputs), types)  # a second, smaller profile
    runtime = tensorrt.lib.harness_through_plan(plugin, b"crf")
    assert f"workspace_bytes 10 {larger}" in tensorrt.lib.harness_serialised_fields(runtime).decode().splitlines()
    tensorrt.lib.harness_destroy(runtime)
    tensorrt.lib.harness_destroy(plugin)


def test_a_plan_whose_workspace_the_kernels_outgrew_fails_the_enqueue_with_the_reason(tensorrt):
    # what a plan built with another libdynseg_crf.so, whose kernels needed less, would meet
    inputs = node_inputs()
    plugin = tensorrt.create({**NODE, "workspace_bytes": np.array([4096], np.int64)}, runtime=True)
    assert tensorrt.enqueue(plugin, inputs, 4096)[0] == -1
    log = tensorrt.log()
    assert "bytes of workspace for these shapes but the engine reserved 4096" in log
    assert "was libdynseg_crf.so changed since the build? Rebuild the engine" in log
    tensorrt.lib.harness_destroy(plugin)


@pytest.mark.parametrize("bound", [np.array([-1], np.int64), np.array([4096], np.int32), np.array([1, 2], np.int64)],
                         ids=["negative", "int32", "two values"])
def test_a_plan_with_a_damaged_workspace_bound_is_refused_naming_the_field(tensorrt, bound):
    # a negative bound used to pass as "no bound", and a mistyped one was ignored
    assert not tensorrt.create({**NODE, "workspace_bytes": bound}, runtime=True)
    assert "the field workspace_bytes must be" in tensorrt.log()


def test_a_plan_built_with_another_kernel_library_is_refused_at_deserialisation(tensorrt):
    assert not tensorrt.create({**NODE, "kernel_library": "0.0.1 abi 1"}, runtime=True)
    assert tensorrt.log() == (f"error: dynseg::MeanFieldCRF (crf): the engine was built with the kernel library "
                              f"0.0.1 abi 1 but this process loaded {tensorrt.kernel_library}: rebuild the engine with the "
                              "installed dynseg\n")
    plugin = tensorrt.create({**NODE, "kernel_library": tensorrt.kernel_library}, runtime=True)
    assert plugin and tensorrt.log() == ""
    tensorrt.lib.harness_destroy(plugin)


def test_a_plan_whose_kernel_library_is_not_a_string_is_refused_naming_the_field(tensorrt):
    # it used to be skipped, and the plan run unchecked
    assert not tensorrt.create({**NODE, "kernel_library": 7}, runtime=True)
    assert tensorrt.log() == ("error: dynseg::MeanFieldCRF (crf): the field kernel_library must be a CHAR string, got "
                              "type 5 and length 1\n")


def test_the_build_records_its_own_plan_fields_never_a_callers(tensorrt):
    # the ONNX parser never passes them; a caller who does is warned, and the plan holds what the build found
    inputs = node_inputs()
    plugin = tensorrt.create({**NODE, "kernel_library": "0.0.1 abi 1", "workspace_bytes": np.array([10**12], np.int64)})
    assert plugin
    assert tensorrt.log() == "".join(f'warning: dynseg::MeanFieldCRF (crf): ignoring the field "{field}", which only a '
                                     "plan carries\n" for field in ("kernel_library", "workspace_bytes"))
    built = tensorrt.build(plugin, profile(inputs), profile(inputs), profile(inputs), [str(a.dtype) for a in inputs])
    runtime = tensorrt.lib.harness_through_plan(plugin, b"crf")
    assert runtime, tensorrt.log()
    serialised = tensorrt.lib.harness_serialised_fields(runtime).decode().splitlines()
    assert serialised[8:] == [f"kernel_library 6 {tensorrt.kernel_library}", f"workspace_bytes 10 {built['workspace']}"]
    for handle in (runtime, plugin):
        tensorrt.lib.harness_destroy(handle)


def test_a_plan_that_recorded_no_workspace_warns_when_shapes_need_one(tensorrt):
    # what a plan would record if TensorRT serialised a copy of the plugin that never saw the profile (which
    # copy it serialises is not verified, docs/tensorrt.md): the kernels' need then goes unchecked
    inputs = node_inputs()
    configured = tensorrt.create(NODE)
    shapes = profile(inputs)
    need = tensorrt.build(configured, shapes, shapes, shapes, [str(a.dtype) for a in inputs])["workspace"]
    tensorrt.lib.harness_destroy(configured)
    for fields, warning in (({"workspace_bytes": np.array([0], np.int64)}, True),
                            ({}, False)):  # a plan of an older plugin, which recorded nothing: as before
        plugin = tensorrt.create({**NODE, **fields}, runtime=True)
        assert tensorrt.enqueue(plugin, inputs, need)[0] == 0
        expected = (f"warning: dynseg::MeanFieldCRF (crf): the plan records a workspace of 0 bytes, yet these shapes "
                    f"need {need}: the kernels' need goes unchecked against the workspace TensorRT reserved\n")
        assert tensorrt.log() == (expected if warning else "")
        tensorrt.lib.harness_destroy(plugin)


@pytest.mark.parametrize("looser", [0, 1])
def test_a_profile_whose_unary_and_image_bounds_differ_builds_for_the_tighter(tensorrt, looser):
    # TensorRT bounds each tensor on its own: the unary, computed in the graph, may get a looser bound
    # than the image (or the other way round); at run time both have the same H, W, within either bound
    inputs = node_inputs()
    plugin = tensorrt.create(NODE)
    types = [str(a.dtype) for a in inputs]
    mixed = profile(inputs, 8)
    mixed[1 - looser] = profile(inputs)[1 - looser]  # one of unary and image bounded at 19x27, the other 27x35
    built = tensorrt.build(plugin, profile(inputs), profile(inputs), mixed, types)
    assert built["result"] == 0, tensorrt.log()
    tight = profile(inputs, 8)
    tight[:2] = profile(inputs)[:2]  # both at 19x27, D as in `mixed`
    assert built["workspace"] == tensorrt.build(plugin, profile(inputs), profile(inputs), tight, types)["workspace"]
    runtime = tensorrt.lib.harness_through_plan(plugin, b"crf")
    inputs[1] = inputs[1][:, :, :18]  # at run time the image must match the unary exactly
    assert tensorrt.enqueue(runtime, inputs, built["workspace"])[0] == -1
    assert "image must have the unary's H, W = 19, 27, got (1, 3, 18, 27)" in tensorrt.log()
    tensorrt.lib.harness_destroy(runtime)
    tensorrt.lib.harness_destroy(plugin)


@pytest.mark.parametrize("index, shape, message", [
    (1, (1, 14, 19, 27), "image must be (1, C, H, W) with H, W >= 1 and 1 <= C <= 13, got (1, 14, 19, 27)"),
    (3, (3, 3), "bilateral_weight must be a scalar or (L, L) = (4, 4), got (3, 3)"),
    (4, (4,), "compatibility must be (L, L) = (4, 4) or empty (Potts), got (4,)"),
    (6, (3,), "labels must be (D,) with the boxes' D = 2, got (3,)"),
])
def test_a_profile_the_kernels_cannot_run_fails_the_build_with_the_reason(tensorrt, index, shape, message):
    inputs = node_inputs()
    plugin = tensorrt.create(NODE)
    shapes = profile(inputs)
    shapes[index] = shape
    built = tensorrt.build(plugin, shapes, shapes, shapes, [str(a.dtype) for a in inputs])
    assert built["result"] == -1
    assert tensorrt.log() == f"error: dynseg::MeanFieldCRF (crf): the profile's maximum shapes: {message}\n"
    tensorrt.lib.harness_destroy(plugin)


def test_a_unary_or_scores_of_another_rank_fails_the_build_naming_the_ranks(tensorrt):
    inputs = node_inputs()
    plugin = tensorrt.create(NODE)
    shapes = profile(inputs)
    shapes[0] = shapes[0][1:]  # (L, H, W)
    assert tensorrt.build(plugin, shapes, shapes, shapes, [str(a.dtype) for a in inputs])["result"] == -1
    assert tensorrt.log() == ("error: dynseg::MeanFieldCRF (crf): unary must have 4 dimensions and scores 1, got 3 "
                              "and 1\n")
    tensorrt.lib.harness_destroy(plugin)


def test_a_runtime_shape_the_kernels_cannot_run_fails_the_enqueue_with_the_reason(tensorrt):
    inputs = node_inputs()
    plugin = tensorrt.create(NODE)
    built = tensorrt.build(plugin, profile(inputs), profile(inputs), profile(inputs), [str(a.dtype) for a in inputs])
    inputs[7] = inputs[7][:1]
    result, _ = tensorrt.enqueue(plugin, inputs, built["workspace"])
    assert result == -1
    assert tensorrt.log() == "error: dynseg::MeanFieldCRF (crf): scores must be (D,) with the boxes' D = 2, got (1,)\n"
    tensorrt.lib.harness_destroy(plugin)


def test_the_attributes_survive_the_plan(tensorrt):
    fields = {"iterations": 4, "theta_spatial": 2.5, "theta_bilateral_xy": 60.0, "theta_bilateral_rgb": 7.0,
              "normalization": "symmetric", "detection_potential": 1, "score_ceiling": 0.875, "epsilon": 0.25,
              "plugin_version": "1", "plugin_namespace": "dynseg"}
    plugin = tensorrt.create(fields)
    runtime = tensorrt.lib.harness_through_plan(plugin, b"crf")
    serialised = tensorrt.lib.harness_serialised_fields(runtime).decode().splitlines()
    assert serialised[:8] == ["iterations 5 4", "theta_spatial 1 2.500000", "theta_bilateral_xy 1 60.000000",
                              "theta_bilateral_rgb 1 7.000000", "normalization 6 symmetric", "detection_potential 5 1",
                              "score_ceiling 1 0.875000", "epsilon 1 0.250000"]
    # the plan-only fields: the kernel library the plan was built with, and the workspace it reserved (unknown: 0)
    assert serialised[8:] == [f"kernel_library 6 {tensorrt.kernel_library}", "workspace_bytes 10 0"]
    assert tensorrt.log() == ""  # the ONNX node's routing fields are expected, not warned about
    for handle in (runtime, plugin):
        tensorrt.lib.harness_destroy(handle)


def test_wider_numbers_are_read_and_unknown_fields_are_warned_about(tensorrt):
    fields = {**NODE, "iterations": np.array([3], np.int64), "theta_spatial": np.array([3.0], np.float64),
              "colour_space": "rgb"}
    plugin = tensorrt.create(fields)
    assert plugin
    assert tensorrt.log() == 'warning: dynseg::MeanFieldCRF (crf): ignoring the unknown field "colour_space"\n'
    tensorrt.lib.harness_destroy(plugin)


@pytest.mark.parametrize("change, message", [
    ({"iterations": None}, "the fields iterations, theta_spatial, theta_bilateral_xy and theta_bilateral_rgb are "
                           "required"),
    ({"iterations": -1}, "iterations must be >= 0, got -1"),
    ({"iterations": 2.0}, 'field "iterations" has type 1 and length 1, which it cannot be read from'),
    ({"iterations": np.array([2**31], np.int64)}, 'field "iterations" holds 2147483648, which does not fit int32'),
    ({"theta_bilateral_rgb": float("nan")}, "theta_bilateral_rgb must be finite and > 0, got nan"),
    ({"normalization": "before"}, 'normalization must be "after" or "symmetric", got "before"'),
    ({"detection_potential": 2}, "detection_potential must be 0 or 1, got 2"),
    ({"epsilon": 1.0}, "epsilon must be in [0, 1), got 1"),
])
def test_bad_fields_create_no_plugin_and_say_why(tensorrt, change, message):
    fields = {k: v for k, v in {**NODE, **change}.items() if v is not None}
    assert not tensorrt.create(fields)
    assert tensorrt.log().startswith(f"error: dynseg::MeanFieldCRF (crf): {message}")
