"""The TensorRT engines' parts that run without TensorRT: the TensorRT-specific ONNX copy, the
optimisation profile, the sidecar and its checks (dynseg.sdk.tensorrt_engine, re-exported by
dynseg.export.engine), build_engine's error without TensorRT; and the plugin's headers-only compile
check where TensorRT's headers are at hand."""

from __future__ import annotations

import gc
import importlib.util
import json
import shutil
import subprocess
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dynseg.export import engine
from dynseg.export.engine import EngineError, EngineMismatchError, Profile, make_profile
from dynseg.sdk import InvalidArgumentError, tensorrt_engine

ROOT = Path(__file__).resolve().parents[2]
ATTRIBUTES = dict(iterations=5, theta_spatial=3.0, theta_bilateral_xy=80.0, theta_bilateral_rgb=13.0,
                  normalization="after", detection_potential=1, score_ceiling=1.0, epsilon=0.01)


def _crf(name: str, unary: str, logits: str, scores_out: str) -> onnx.NodeProto:
    inputs = [unary, "rgb", "w_s", "w_b", "compat", "boxes", "labels", "scores", "dx", "dy"]
    return helper.make_node("MeanFieldCRF", inputs, [logits, scores_out], name=name, domain="dynseg", **ATTRIBUTES)


def _model(with_function: bool = False) -> onnx.ModelProto:
    """A small graph shaped like an exported dynseg model: two CRF nodes around standard ops, dynamic
    H, W and D, and the metadata export_onnx writes."""
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 3, "height", "width"]),
        helper.make_tensor_value_info("boxes", f, ["detections", 4]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["detections"]),
        helper.make_tensor_value_info("scores", f, ["detections"]),
    ]
    outputs = [helper.make_tensor_value_info("instance_logits", f, [1, "labels", "height", "width"]),
               helper.make_tensor_value_info("semantic_probabilities", f, [1, 4, "height", "width"])]
    scalar = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.float32), name)  # noqa: E731
    initializers = [scalar("w_s", 3.0), scalar("w_b", 5.0), numpy_helper.from_array(np.zeros(0, np.float32), "compat"),
                    scalar("dx", 1.0), scalar("dy", 1.0),
                    numpy_helper.from_array(np.zeros((1, 4, 1, 1), np.float32), "head")]
    nodes = [
        helper.make_node("Cast", ["image"], ["rgb"], to=f),
        helper.make_node("Conv", ["rgb", "head"], ["semantic"]),
        _crf("semantic_crf", "semantic", "semantic_logits", "recalibrated"),
        helper.make_node("Identity", ["semantic_logits"], ["unary"]),
        _crf("instance_crf", "unary", "instance_logits", "instance_scores"),
        helper.make_node("Softmax", ["semantic_logits"], ["semantic_probabilities"], axis=1),
    ]
    graph = helper.make_graph(nodes, "dynseg", inputs, outputs, initializers)
    functions = []
    if with_function:  # a function body for the op, as some exporters write
        body = [helper.make_node("Identity", ["unary"], ["logits"]), helper.make_node("Identity", ["scores"], ["out"])]
        functions.append(helper.make_function("dynseg", "MeanFieldCRF", ["unary", "image", "spatial_weight",
                                              "bilateral_weight", "compatibility", "boxes", "labels", "scores",
                                              "detection_x", "detection_y"], ["logits", "out"], body,
                                              [helper.make_opsetid("", 17)]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("dynseg", 1)],
                              functions=functions)
    for key, value in {"dynseg_version": "0.1.0", "dynseg_op_version": "1",
                       "class_names": json.dumps(["cat", "cup", "person"]),
                       "preprocessing": json.dumps({"input": "RGB uint8 (1, 3, H, W)", "mean": [0.5] * 3,
                                                    "std": [0.25] * 3, "scale": 255.0}),
                       "max_detections": "100"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


def _strip_plugin_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        kept = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
        del node.attribute[:]
        node.attribute.extend(kept)
    return copy


# ---- the TensorRT-specific ONNX copy --------------------------------------------------------------------

def test_the_tensorrt_copy_marks_every_crf_node_with_the_plugin_namespace_and_version():
    copy = engine.tensorrt_model(_model())
    onnx.checker.check_model(copy)
    crf = [n for n in copy.graph.node if n.op_type == "MeanFieldCRF"]
    assert len(crf) == 2 == engine.crf_node_count(copy)
    for node in crf:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["plugin_namespace"] == b"dynseg"
        assert attributes["plugin_version"] == b"1"
        assert node.domain == "dynseg"
        for name, value in ATTRIBUTES.items():  # the op's own attributes are untouched
            got = attributes[name]
            assert (got.decode() if isinstance(got, bytes) else got) == pytest.approx(value)


def test_the_tensorrt_copy_changes_nothing_else():
    model = _model()
    copy = engine.tensorrt_model(model)
    assert _strip_plugin_attributes(copy) == model
    assert model.graph.node[2].attribute[-1].name != "plugin_version"  # the input was not modified


def test_the_tensorrt_copy_drops_the_ops_function_bodies_and_is_idempotent():
    model = _model(with_function=True)
    assert len(model.functions) == 1
    copy = engine.tensorrt_model(model)
    assert len(copy.functions) == 0
    again = engine.tensorrt_model(copy)
    assert again == copy
    names = [a.name for a in again.graph.node[2].attribute]
    assert names.count("plugin_namespace") == names.count("plugin_version") == 1


def test_a_model_without_crf_nodes_or_of_another_op_version_is_refused():
    model = _model()
    del model.graph.node[2:]
    assert len(engine.tensorrt_model(model).graph.node) == 2  # a network exported without CRFs
    del model.metadata_props[:]
    with pytest.raises(InvalidArgumentError, match="no dynseg::MeanFieldCRF node and no dynseg metadata"):
        engine.tensorrt_model(model)
    model = _model()
    model.metadata_props[1].value = "2"
    with pytest.raises(InvalidArgumentError, match="version 2"):
        engine.tensorrt_model(model)


@pytest.mark.parametrize("attribute, message", [
    (helper.make_attribute("normalisation", "symmetric"), "unknown attribute 'normalisation'"),
    (helper.make_attribute("iterations", 2**32 + 5), "iterations must be an int in 0..2147483647"),
])
def test_an_attribute_tensorrts_parser_would_drop_or_narrow_is_refused_as_the_sdk_refuses_it(attribute, message):
    """The parser passes the plugin only the fields its creator lists, ints narrowed to int32: a typo
    would build an engine with the default, 2**32 + 5 iterations would run 5."""
    model = _model()
    node = model.graph.node[2]
    kept = [a for a in node.attribute if a.name != attribute.name]
    del node.attribute[:]
    node.attribute.extend([*kept, attribute])
    with pytest.raises(InvalidArgumentError, match=message):
        engine.tensorrt_model(model)


# ---- the plugin library's TensorRT version ----------------------------------------------------------------

@pytest.fixture
def stand_in_plugin(c_library) -> Path:
    """A library exporting what the plugin exports for the version check, as built for TensorRT 10."""
    return c_library("stand_in", "int dynseg_tensorrt_headers_major(void) { return 10; }\n")


def test_a_plugin_library_built_for_another_tensorrt_major_version_is_refused_before_loading(stand_in_plugin,
                                                                                            c_library):
    """TensorRT does not check it, and the interfaces of 10 and 11 differ in layout: a crash, not an error."""
    library = stand_in_plugin
    tensorrt_engine.check_plugin_major_version(library, "10.16.0.72")
    with pytest.raises(EngineError, match=r"built against TensorRT 10's headers, and this is TensorRT 11\.1\.0"):
        tensorrt_engine.check_plugin_major_version(library, "11.1.0")
    other = c_library("other", "int something_else(void) { return 0; }\n")
    with pytest.raises(EngineError, match="is not a dynseg TensorRT plugin library"):
        tensorrt_engine.check_plugin_major_version(other, "10.16.0.72")


# ---- the optimisation profile ------------------------------------------------------------------------------

def test_a_profile_gives_every_input_its_min_opt_and_max_shapes():
    profile = make_profile((1, 10, 100), ((32, 48), (480, 640), (1024, 1024)))
    shapes = profile.shapes()
    assert shapes["image"] == ((1, 3, 32, 48), (1, 3, 480, 640), (1, 3, 1024, 1024))
    assert shapes["boxes"] == ((1, 4), (10, 4), (100, 4))
    assert shapes["labels"] == shapes["scores"] == ((1,), (10,), (100,))
    assert Profile.from_json(json.loads(json.dumps(profile.to_json()))) == profile
    assert profile.admits(1, 32, 48) and profile.admits(100, 1024, 1024)
    assert not profile.admits(101, 100, 100) and not profile.admits(5, 31, 100)


def test_the_default_profile_admits_sizes_and_detection_counts_only_within_its_range():
    profile = make_profile()
    assert profile.sizes == ((32, 32), (480, 640), (1024, 1024)) and profile.detections == (1, 10, 100)
    for detections, height, width in [(1, 32, 32), (100, 1024, 1024), (5, 32, 1024), (5, 1024, 32)]:
        assert profile.admits(detections, height, width), (detections, height, width)
    for detections, height, width in [(5, 100, 1025), (5, 1025, 100), (5, 100, 31), (5, 31, 100), (0, 100, 100),
                                      (101, 100, 100)]:
        assert not profile.admits(detections, height, width), (detections, height, width)


def test_a_profile_takes_images_up_to_the_cuda_kernels_pixel_limit_and_not_one_pixel_more():
    # (2^31 - 1) // (6 * 32) = 11184810 = 3 x 3728270 pixels: the largest RGB image the kernels index
    sizes = lambda width: ((1, 1), (3, 64), (3, width))  # noqa: E731
    assert make_profile((0, 0, 0), sizes(3728270)).sizes[2] == (3, 3728270)
    with pytest.raises(InvalidArgumentError, match=r"maximum image size 3x3728271 \(11184813 pixels\) is too large"):
        make_profile((0, 0, 0), sizes(3728271))


@pytest.mark.parametrize("detections, sizes, message", [
    ((1, 10), engine.DEFAULT_ENGINE_SIZES, r"detections must be three ints \(min, opt, max\), got \(1, 10\)"),
    ((1.0, 10, 100), engine.DEFAULT_ENGINE_SIZES,
     r"detections must be three ints \(min, opt, max\), got \(1.0, 10, 100\)"),
    ((-1, 10, 100), engine.DEFAULT_ENGINE_SIZES, "the minimum detection count must be >= 0, got -1"),
    ((10, 1, 100), engine.DEFAULT_ENGINE_SIZES, r"detections must satisfy min <= opt <= max, got \(10, 1, 100\)"),
    ((1, 10, 100), ((32, 32), (480, 640)), r"sizes must be three \(H, W\) pairs of ints \(min, opt, max\), got "
                                           r"\(\(32, 32\), \(480, 640\)\)"),
    ((1, 10, 100), ((0, 32), (480, 640), (1024, 1024)), "the minimum image size must be at least 1x1, got 0x32"),
    ((1, 10, 100), ((32, 0), (480, 640), (1024, 1024)), "the minimum image size must be at least 1x1, got 32x0"),
    ((1, 10, 100), ((32, 32), (480, 0), (1024, 1024)), "the optimum image size must be at least 1x1, got 480x0"),
    ((1, 10, 100), ((32, 32), (480, 640), (1024, 0)), "the maximum image size must be at least 1x1, got 1024x0"),
    ((1, 10, 100), ((32, 32), (480, 640), (400, 1024)),
     r"the image height must satisfy min <= opt <= max, got \(32, 480, 400\)"),
    ((1, 10, 100), ((32, 700), (480, 640), (1024, 1024)),
     r"the image width must satisfy min <= opt <= max, got \(700, 640, 1024\)"),
    ((1, 10, 100), ((32, 32), (480, 640), (4096, 4096)),
     r"the maximum image size 4096x4096 \(16777216 pixels\) is too large for the CUDA kernels"),
    ((1, 10, 1000), ((32, 32), (480, 640), (3000, 3000)),
     r"3000x3000 pixels with up to 1001 labels is too large for the CUDA kernels \(pixels x labels"),
])
def test_a_bad_profile_is_refused_with_the_offending_value(detections, sizes, message):
    with pytest.raises(InvalidArgumentError, match=message):
        make_profile(detections, sizes)


def test_the_profiles_label_limit_is_the_cuda_kernels():
    # 2048x4096 pixels: 252 labels fit 32-bit indices, 253 round up to 256 rows and do not (docs/crf.md §6)
    sizes = ((32, 32), (480, 640), (2048, 4096))
    assert make_profile((1, 10, 251), sizes).detections == (1, 10, 251)
    with pytest.raises(InvalidArgumentError, match="up to 253 labels"):
        make_profile((1, 10, 252), sizes)


def test_a_profile_beyond_the_models_max_detections_is_refused():
    with pytest.raises(InvalidArgumentError, match="max_detections = 50"):
        make_profile((1, 10, 100), engine.DEFAULT_ENGINE_SIZES, max_detections=50)


# ---- the sidecar ---------------------------------------------------------------------------------------------

@pytest.fixture()
def built(tmp_path):
    """A plan file (stand-in bytes), a plugin library (stand-in bytes) and the sidecar written for them."""
    plan = tmp_path / "model.engine"
    plan.write_bytes(b"plan bytes")
    library = tmp_path / tensorrt_engine.PLUGIN_LIBRARY
    library.write_bytes(b"plugin bytes")
    metadata = {entry.key: entry.value for entry in _model().metadata_props}
    sidecar = engine.write_sidecar(plan, tensorrt_version="10.16.0.72", compute_capability="9.0",
                                   plugin_library=library, profile=make_profile(), model_metadata=metadata,
                                   fp16=False)
    return plan, library, sidecar


def test_the_sidecar_sits_beside_the_plan_and_round_trips(built):
    plan, library, sidecar = built
    assert sidecar == tmp_sidecar(plan) and sidecar.name == "model.engine.json"
    assert plan.read_bytes() == b"plan bytes"  # nothing prepended to the plan
    data = tensorrt_engine.read_sidecar(plan)
    assert data == tensorrt_engine.read_sidecar(sidecar)
    assert data["tensorrt_version"] == "10.16.0.72" and data["compute_capability"] == "9.0"
    assert data["plugin_library"] == {"name": library.name, "sha256": engine.sha256(library)}
    assert data["class_names"] == ["cat", "cup", "person"]
    assert data["training_data"] is None  # the model of `_model()` was exported without the record
    assert data["preprocessing"]["scale"] == 255.0
    assert data["dynseg_version"] == "0.1.0" and data["dynseg_op_version"] == "1"
    assert data["max_detections"] == 100 and data["precision"] == "fp32" and data["score_ceiling"] == 1.0
    assert Profile.from_json(data["profile"]) == make_profile()
    tensorrt_engine.check_sidecar(data, tensorrt_version="10.16.0.72", compute_capability="9.0",
                         plugin_sha256=engine.sha256(library), plan=plan)


@pytest.mark.parametrize("ceiling", [0, -1.0, "1", None, float("nan"), True])
def test_a_sidecars_score_ceiling_must_be_a_positive_number(built, ceiling):
    plan, _, sidecar = built
    sidecar.write_text(json.dumps(json.loads(sidecar.read_text()) | {"score_ceiling": ceiling}))
    with pytest.raises(EngineError, match="score_ceiling must be a finite number > 0"):
        tensorrt_engine.read_sidecar(plan)
    sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "score_ceiling"}))
    assert "score_ceiling" not in tensorrt_engine.read_sidecar(plan)  # an older sidecar's: the backend reads 1


def tmp_sidecar(plan: Path) -> Path:
    return plan.parent / (plan.name + ".json")


@pytest.mark.parametrize("field, value, message", [
    ("tensorrt_version", "10.13.3.9", "built with TensorRT 10.16.0.72, but TensorRT 10.13.3.9 is running"),
    ("compute_capability", "8.9", "compute capability 9.0, but this GPU is 8.9"),
    ("plugin_sha256", "0" * 64, "another plugin library"),
])
def test_a_sidecar_mismatch_says_what_differs_and_what_to_rebuild(built, field, value, message):
    plan, library, _ = built
    running = {"tensorrt_version": "10.16.0.72", "compute_capability": "9.0", "plugin_sha256": engine.sha256(library)}
    running[field] = value
    with pytest.raises(EngineMismatchError, match=message) as error:
        tensorrt_engine.check_sidecar(tensorrt_engine.read_sidecar(plan), **running)
    assert "rebuild" in str(error.value)


def test_a_sidecar_of_another_crf_op_version_or_plan_is_refused(built, tmp_path):
    plan, library, _ = built
    running = {"tensorrt_version": "10.16.0.72", "compute_capability": "9.0", "plugin_sha256": engine.sha256(library)}
    sidecar = tensorrt_engine.read_sidecar(plan) | {"dynseg_op_version": "0"}
    with pytest.raises(EngineMismatchError, match=f"its CRF op is version 0, this plugin implements "
                                                  f"{tensorrt_engine.PLUGIN_VERSION}: re-export the model"):
        tensorrt_engine.check_sidecar(sidecar, **running)
    other = tmp_path / "other.engine"
    other.write_bytes(plan.read_bytes() + b"!")
    with pytest.raises(EngineMismatchError, match="is not the plan this sidecar describes"):
        tensorrt_engine.check_sidecar(tensorrt_engine.read_sidecar(plan), plan=other, **running)


def test_the_sidecar_carries_what_the_network_was_trained_on_for_dynseg_eval(built):
    pytest.importorskip("torch")  # the record's checks are the trainer's
    from dynseg.sdk.commands.evaluate import training_data_of

    plan, library, _ = built
    metadata = {entry.key: entry.value for entry in _model().metadata_props}
    record = {"dataset": "voc", "seed": 4, "image_size": [96, 120], "split": "train"}
    engine.write_sidecar(plan, tensorrt_version="10.16.0.72", compute_capability="9.0", plugin_library=library,
                         profile=make_profile(), model_metadata={**metadata, "training_data": json.dumps(record)},
                         fp16=False)
    assert training_data_of(plan) == record
    engine.write_sidecar(plan, tensorrt_version="10.16.0.72", compute_capability="9.0", plugin_library=library,
                         profile=make_profile(), fp16=False,
                         model_metadata={**metadata, "training_data": json.dumps({**record, "seed": -4})})
    with pytest.raises(InvalidArgumentError, match=r"model.engine: training_data: seed -4.*export it again"):
        training_data_of(plan)


def test_a_replaced_plan_or_every_mismatch_at_once_is_reported(built):
    plan, library, _ = built
    data = tensorrt_engine.read_sidecar(plan)
    plan.write_bytes(b"another plan")
    with pytest.raises(EngineMismatchError, match="not the plan this sidecar describes"):
        tensorrt_engine.check_sidecar(data, tensorrt_version="10.16.0.72", compute_capability="9.0",
                             plugin_sha256=engine.sha256(library), plan=plan)
    with pytest.raises(EngineMismatchError) as error:
        tensorrt_engine.check_sidecar(data, tensorrt_version="11.1.0.106", compute_capability="8.0", plugin_sha256="x")
    assert str(error.value).count("rebuild") >= 3


def test_a_missing_or_malformed_sidecar_is_an_engine_error(built, tmp_path):
    plan, _, sidecar = built
    good = json.loads(sidecar.read_text())
    broken_profile = {"sizes": good["profile"]["sizes"]}  # no detections
    cases = [("plan_sha256", None, "lacks plan_sha256"), ("profile", broken_profile, "its profile is malformed"),
             ("plugin_library", tensorrt_engine.PLUGIN_LIBRARY, "plugin_library must be"),
             ("class_names", "cup", "class_names must be")]
    for field, value, message in cases:
        data = {k: v for k, v in good.items() if k != field}
        if value is not None:
            data[field] = value
        sidecar.write_text(json.dumps(data))
        with pytest.raises(EngineError, match=message):
            tensorrt_engine.read_sidecar(plan)
    for damaged in (b"{", b"\xff\xfe", b"[" * 100_000):  # cut short, not UTF-8, nested past Python's recursion
        sidecar.write_bytes(damaged)
        with pytest.raises(EngineError, match="not valid UTF-8 JSON"):
            tensorrt_engine.read_sidecar(plan)
    sidecar.write_text(json.dumps({**good, "format": str(good["format"])}))
    with pytest.raises(EngineError, match=f"has sidecar format '{good['format']}', this dynseg reads {good['format']}"):
        tensorrt_engine.read_sidecar(plan)
    with pytest.raises(EngineError, match="is missing"):
        tensorrt_engine.read_sidecar(tmp_path / "other.engine")


@pytest.mark.parametrize("names", [[1, 2, 3], ["cat", 2, "person"], [["cat", "cup"], "person"], ["cat", None],
                                   ["cat", {"name": "cup"}], {"cat": 1}, [], ["", "person"]],
                         ids=["ints", "one int", "nested", "null", "an object in the list", "an object", "empty",
                              "an empty name"])
def test_a_sidecar_whose_class_names_are_not_a_list_of_names_is_refused_by_name(built, names):
    plan, _, sidecar = built
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "class_names": names}))
    with pytest.raises(EngineError, match=r"model\.engine\.json: class_names must be a non-empty list of names, got"):
        tensorrt_engine.read_sidecar(plan)


# ---- registering the plugin with TensorRT ---------------------------------------------------------------------


class DocumentedRegistry:
    """TensorRT's IPluginRegistry as its headers document load_library and get_creator (NvInferRuntime.h,
    10.16 and 11.1): loading a library whose creators are already registered fails and returns None. And
    as its users report it: a creator asked for and missing is logged as an error ("getPluginCreator
    could not find plugin")."""

    def __init__(self, creators):
        self.library_creators, self.registered, self.loads, self.errors = set(creators), set(), 0, []

    def load_library(self, path):
        self.loads += 1
        if self.registered & self.library_creators:
            self.errors.append(f"{path}: its creators are already registered")
            return None
        self.registered |= self.library_creators
        return object()

    def get_creator(self, name, version, namespace=""):
        if (name, version, namespace) in self.registered:
            return object()
        self.errors.append(f"could not find plugin {name} version {version}")
        return None


CREATOR = ("MeanFieldCRF", "1", "dynseg")


@pytest.fixture
def fresh_process(monkeypatch):
    """register_plugin's memory of TensorRT's global registry as a new process has it."""
    monkeypatch.setattr(tensorrt_engine, "_loaded_globally", set())


def test_the_plugin_is_loaded_into_tensorrts_global_registry_once_a_process(stand_in_plugin, fresh_process):
    registry = DocumentedRegistry({CREATOR})
    for _ in range(3):  # three backends: a second load_library would have failed
        tensorrt_engine.register_plugin(registry, stand_in_plugin, "10.16.0.72", process_wide=True)
    assert registry.loads == 1 and registry.errors == []  # TensorRT logged no error on the way


def test_a_builders_registry_gets_the_library_each_build_and_is_not_held(stand_in_plugin, fresh_process):
    """builder.get_plugin_registry()'s Python object keeps its builder alive: remembering it leaked every
    builder of the process, and a builder's registry is new with each builder anyway."""
    for _ in range(2):  # two builds
        registry = DocumentedRegistry({CREATOR})
        tensorrt_engine.register_plugin(registry, stand_in_plugin, "10.16.0.72", process_wide=False)
        assert registry.loads == 1 and registry.errors == []
        held = weakref.ref(registry)
        del registry
        gc.collect()
        assert held() is None


def test_a_plugin_library_built_for_another_major_version_is_refused_before_loading(stand_in_plugin, fresh_process):
    for process_wide in (True, False):
        registry = DocumentedRegistry({CREATOR})
        with pytest.raises(EngineError, match="built against TensorRT 10's headers"):
            tensorrt_engine.register_plugin(registry, stand_in_plugin, "11.1.0", process_wide=process_wide)
        assert registry.loads == 0


@pytest.mark.parametrize("process_wide", [True, False])
def test_a_plugin_library_the_application_loaded_first_is_found_after_the_refused_load(stand_in_plugin, fresh_process,
                                                                                       process_wide):
    registry = DocumentedRegistry({CREATOR})
    registry.load_library(str(stand_in_plugin))
    tensorrt_engine.register_plugin(registry, stand_in_plugin, "10.16.0.72", process_wide=process_wide)  # no error
    assert registry.loads == 2 and len(registry.errors) == 1  # TensorRT's, for the refused load
    tensorrt_engine.register_plugin(registry, stand_in_plugin, "10.16.0.72", process_wide=process_wide)
    assert registry.loads == (2 if process_wide else 3)  # the global registry's known from then on


def test_a_library_without_dynsegs_creator_is_named(stand_in_plugin, fresh_process):
    registry = DocumentedRegistry({("SomethingElse", "1", "")})
    with pytest.raises(EngineError, match=r"registered no dynseg::MeanFieldCRF version 1 \(see TensorRT's log and "
                                          r"stderr above\)"):
        tensorrt_engine.register_plugin(registry, stand_in_plugin, "10.16.0.72", process_wide=True)


# ---- build_engine without TensorRT ---------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_says_how_to_install_it(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(_model(), str(source))
    with pytest.raises(EngineError, match="TensorRT's Python package is not installed.*pypi.nvidia.com"):
        engine.build_engine(source, tmp_path / "model.engine")
    assert not (tmp_path / "model.engine").exists()


def test_build_engine_checks_the_profile_before_anything_else(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(_model(), str(source))
    with pytest.raises(InvalidArgumentError, match="max_detections = 100"):
        engine.build_engine(source, tmp_path / "model.engine", detections=(1, 10, 200))
    with pytest.raises(InvalidArgumentError, match="workspace"):
        engine.build_engine(source, tmp_path / "model.engine", workspace=0)


def test_a_missing_plugin_library_lists_the_paths_searched(tmp_path, monkeypatch):
    monkeypatch.setenv(tensorrt_engine.PLUGIN_LIBRARY_ENV, str(tmp_path / "nowhere.so"))
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")])
    if (Path(tensorrt_engine.__file__).resolve().parents[1] / "plugins" / tensorrt_engine.PLUGIN_LIBRARY).is_file():
        pytest.skip("the plugin library is installed here")
    with pytest.raises(EngineError, match=r"searched: [^,]*nowhere.so\)"):  # the variable names the one place
        tensorrt_engine.plugin_library_path()
    monkeypatch.delenv(tensorrt_engine.PLUGIN_LIBRARY_ENV)
    with pytest.raises(EngineError, match=f"{tmp_path / 'site' / 'dynseg' / 'plugins'}"):
        tensorrt_engine.plugin_library_path()


def test_the_plugin_library_is_found_where_an_editable_install_builds_it(tmp_path, monkeypatch):
    monkeypatch.delenv(tensorrt_engine.PLUGIN_LIBRARY_ENV, raising=False)
    built = tmp_path / "site" / "dynseg" / "plugins" / tensorrt_engine.PLUGIN_LIBRARY  # site-packages, not the sources
    built.parent.mkdir(parents=True)
    built.write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")])
    if (Path(tensorrt_engine.__file__).resolve().parents[1] / "plugins" / tensorrt_engine.PLUGIN_LIBRARY).is_file():
        pytest.skip("the plugin library is installed in the sources here")
    assert tensorrt_engine.plugin_library_path() == built


# ---- the plugin's compile check against TensorRT's headers ----------------------------------------------------

@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nvcc") is None, reason="needs cmake and nvcc")
def test_the_plugin_compiles_without_warnings_against_tensorrt_headers(tensorrt_headers, tmp_path):
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DDYNSEG_TENSORRT_HEADERS={tensorrt_headers}",
         "-DDYNSEG_NATIVE_ARCH=OFF", "-DDYNSEG_CUDA_ARCHITECTURES=90-real"],
        capture_output=True, text=True,
    )
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    build = subprocess.run(["cmake", "--build", str(tmp_path), "--target", "dynseg_crf_tensorrt_check", "-j", "2"],
                           capture_output=True, text=True)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]


# ---- the plugin itself: needs TensorRT's libraries and the built plugin --------------------------------

def _plugin_library_or_none():
    try:
        return tensorrt_engine.plugin_library_path()
    except EngineError:
        return None


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or _plugin_library_or_none() is None,
                    reason="needs TensorRT's Python package and the built plugin library (TensorRT_ROOT at build "
                           "time); CI machines have neither")
def test_the_plugin_creator_is_registered_and_takes_every_attribute():
    # TensorRT's Python IPluginV3OneRuntime.get_fields_to_serialize is a documentation stub (pyPlugin.cpp
    # binds pluginDoc::getFieldsToSerialize, which returns nullptr) and never reaches the C++ plugin: the
    # fields' round trip is the C++ harness's (tests/cuda_emulation) and the engine round trip's
    # (tests/sdk/test_tensorrt_backend.py). Here: registration through register_plugin (load_library
    # returns None when the creator is already registered in this process), the creator's field list,
    # and a plugin built from the node's attributes.
    import numpy as np
    import tensorrt as trt

    registry = trt.get_plugin_registry()
    tensorrt_engine.register_plugin(registry, _plugin_library_or_none(), trt.__version__, process_wide=True)
    creator = registry.get_creator("MeanFieldCRF", "1", "dynseg")
    assert creator is not None
    attributes = [
        trt.PluginField("iterations", np.array([4], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("theta_spatial", np.array([2.5], np.float32), trt.PluginFieldType.FLOAT32),
        trt.PluginField("theta_bilateral_xy", np.array([60.0], np.float32), trt.PluginFieldType.FLOAT32),
        trt.PluginField("theta_bilateral_rgb", np.array([7.0], np.float32), trt.PluginFieldType.FLOAT32),
        trt.PluginField("normalization", np.array(list(b"symmetric"), np.int8), trt.PluginFieldType.CHAR),
        trt.PluginField("detection_potential", np.array([1], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("score_ceiling", np.array([0.9], np.float32), trt.PluginFieldType.FLOAT32),
        trt.PluginField("epsilon", np.array([1e-3], np.float32), trt.PluginFieldType.FLOAT32),
    ]
    assert {a.name for a in attributes} <= {f.name for f in creator.field_names}
    plugin = creator.create_plugin("crf", trt.PluginFieldCollection(attributes), trt.TensorRTPhase.BUILD)
    assert plugin is not None
    core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    assert (core.plugin_namespace, core.plugin_name, core.plugin_version) == ("dynseg", "MeanFieldCRF", "1")


@pytest.mark.parametrize("change, message", [
    (lambda tmp: {"onnx_path": tmp / "missing.onnx"}, "missing.onnx does not exist"),
    (lambda tmp: {"onnx_path": tmp}, "is a directory"),
    (lambda tmp: {"onnx_path": _write(tmp / "empty.onnx", b"")}, "empty.onnx is empty"),
    (lambda tmp: {"onnx_path": _write(tmp / "junk.onnx", b"\x01\x02junk")}, "junk.onnx is not a readable ONNX model"),
    (lambda tmp: {"detections": "many"}, "detections must be three ints"),
    (lambda tmp: {"sizes": (32, 32, 64)}, r"sizes must be three \(H, W\) pairs"),
    (lambda tmp: {"fp16": "yes"}, "fp16 must be True or False"),
    (lambda tmp: {"out_path": tmp / "model.onnx"}, "out_path must be a .engine or .plan file"),
    (lambda tmp: {"onnx_path": _copy(tmp / "model.onnx", tmp / "model.trt.onnx")},
     "would overwrite the export .*model.trt.onnx it is built from"),
    (lambda tmp: {"out_path": tmp / "nowhere" / "model.engine"}, "its folder .*nowhere does not exist"),
    (lambda tmp: {"out_path": _folder(tmp / "folder.engine")}, "folder.engine is a folder"),
    (lambda tmp: {"onnx_path": None}, "onnx_path must be a str or os.PathLike of one, got NoneType"),
    (lambda tmp: {"out_path": tmp / "model\x00.engine"}, "out_path .* holds a NUL byte"),
    # what the sidecar records, checked before the build rather than after its minutes
    (lambda tmp: {"onnx_path": _without_metadata(tmp / "bare.onnx", "preprocessing")},
     "the model's metadata lacks valid .*preprocessing.*'preprocessing'"),
])
def test_build_engine_names_a_bad_argument_or_file_before_it_needs_tensorrt(tmp_path, change, message):
    source = tmp_path / "model.onnx"
    onnx.save(_model(), str(source))
    arguments = {"onnx_path": source, "out_path": tmp_path / "model.engine", **change(tmp_path)}
    with pytest.raises(InvalidArgumentError, match=message):
        engine.build_engine(**arguments)
    assert source.read_bytes() == _model().SerializeToString() or not source.exists()


def test_a_rebuild_that_fails_after_its_plan_leaves_no_sidecar_of_the_old_plan(tmp_path, monkeypatch):
    # TensorRT's part stands in (none here): what is under test is which files a rebuild leaves
    source, library = tmp_path / "model.onnx", tmp_path / tensorrt_engine.PLUGIN_LIBRARY
    onnx.save(_model(), str(source))
    library.write_bytes(b"plugin bytes")
    monkeypatch.setattr(engine, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.16.0.72"))
    monkeypatch.setattr(engine, "compute_capability", lambda: "9.0")
    monkeypatch.setattr(engine, "_build_plan", lambda *arguments: b"first plan")
    plan = engine.build_engine(source, tmp_path / "model.engine", plugin_library=library)
    assert tensorrt_engine.read_sidecar(plan)["plan_sha256"] == engine.sha256(plan)

    def full_disk(*arguments, **keywords):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine, "_build_plan", lambda *arguments: b"second plan")
    monkeypatch.setattr(engine, "write_sidecar", full_disk)
    with pytest.raises(OSError, match="No space left"):
        engine.build_engine(source, plan, plugin_library=library)
    assert plan.read_bytes() == b"second plan" and not tmp_sidecar(plan).exists()
    with pytest.raises(EngineError, match="model.engine.json is missing"):
        tensorrt_engine.read_sidecar(plan)


def _stand_in_build(monkeypatch, tensorrt_version: str = "10.16.0.72", fp16_flag: bool = True) -> None:
    """build_engine's TensorRT part stood in (none here): a TensorRT of that version, with or without the FP16
    builder flag, a GPU of compute capability 9.0 and a plan of stand-in bytes."""
    flags = types.SimpleNamespace(TF32=0, **({"FP16": 1} if fp16_flag else {}))
    trt = types.SimpleNamespace(__version__=tensorrt_version, BuilderFlag=flags)
    monkeypatch.setattr(engine, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(engine, "compute_capability", lambda: "9.0")
    monkeypatch.setattr(engine, "_build_plan", lambda *arguments: b"plan")


def test_fp16_on_a_tensorrt_without_the_flag_is_refused_before_the_gpu_query_and_the_parse(tmp_path, monkeypatch):
    source, library = tmp_path / "model.onnx", tmp_path / tensorrt_engine.PLUGIN_LIBRARY
    onnx.save(_model(), str(source))
    library.write_bytes(b"plugin bytes")
    _stand_in_build(monkeypatch, "11.1.0", fp16_flag=False)

    def unreachable(*arguments):
        raise AssertionError("build_engine went past the fp16 check")

    monkeypatch.setattr(engine, "compute_capability", unreachable)
    with pytest.raises(InvalidArgumentError, match=r"fp16=True needs TensorRT 10's FP16 builder flag, which TensorRT "
                                                   r"11\.1\.0 does not have .*build with fp16=False"):
        engine.build_engine(source, tmp_path / "model.engine", fp16=True, plugin_library=library)
    assert not (tmp_path / "model.trt.onnx").exists()
    _stand_in_build(monkeypatch, "10.16.0.72")  # where the flag exists, fp16 goes on to the build
    plan = engine.build_engine(source, tmp_path / "model.engine", fp16=True, plugin_library=library)
    assert tensorrt_engine.read_sidecar(plan)["precision"] == "fp16"


def test_the_sidecars_score_ceiling_counts_crf_nodes_inside_subgraphs(tmp_path, monkeypatch):
    # as tensorrt_model and the plugin-layer count do: a CRF in an If's branch is a plugin layer all the same
    model = _model()
    graph = model.graph
    semantic = graph.node[2]  # the semantic CRF: into the If's then-branch, with a ceiling of 0.5
    semantic.output[:] = ["branch_logits", "branch_scores"]
    next(a for a in semantic.attribute if a.name == "score_ceiling").f = 0.5
    instance = graph.node[4]  # the top-level instance CRF: without the detection potential
    next(a for a in instance.attribute if a.name == "detection_potential").i = 0
    f = TensorProto.FLOAT
    branch = helper.make_graph([semantic], "then", [], [helper.make_tensor_value_info("branch_logits", f, None)])
    other = helper.make_graph([helper.make_node("Identity", ["semantic"], ["other_logits"])], "else", [],
                              [helper.make_tensor_value_info("other_logits", f, None)])
    choose = helper.make_node("If", ["always"], ["semantic_logits"], then_branch=branch, else_branch=other)
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]  # copies, kept past the del
    nodes[2] = choose
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.append(numpy_helper.from_array(np.array(True), "always"))
    onnx.checker.check_model(model)
    source, library = tmp_path / "model.onnx", tmp_path / tensorrt_engine.PLUGIN_LIBRARY
    onnx.save(model, str(source))
    library.write_bytes(b"plugin bytes")
    _stand_in_build(monkeypatch)
    plan = engine.build_engine(source, tmp_path / "model.engine", plugin_library=library)
    assert tensorrt_engine.read_sidecar(plan)["score_ceiling"] == 0.5


def test_the_default_profile_takes_at_most_the_exports_max_detections(tmp_path):
    assert engine.default_detections(5) == (1, 5, 5) and engine.default_detections(100) == (1, 10, 100)
    assert engine.default_detections(1) == (1, 1, 1)
    if importlib.util.find_spec("tensorrt") is None:  # and build_engine takes it: past the profile's check
        model = _model()
        next(entry for entry in model.metadata_props if entry.key == "max_detections").value = "5"
        onnx.save(model, str(tmp_path / "model.onnx"))
        with pytest.raises(EngineError, match="TensorRT's Python package is not installed"):
            engine.build_engine(tmp_path / "model.onnx", tmp_path / "model.engine")


def _without_metadata(path: Path, key: str) -> Path:
    model = _model()
    kept = [entry for entry in model.metadata_props if entry.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(path))
    return path


def _copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    return target


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
