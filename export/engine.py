"""Building TensorRT engines of an exported dynseg model: the TensorRT-specific ONNX copy, the sidecar
JSON written beside the plan, and `build_engine`. What running an engine needs (the profile, reading and
checking the sidecar, the plugin library, TensorRT's import) is `dynseg.sdk.tensorrt_engine`'s, re-exported
here. Imports without TensorRT, so everything but the build itself runs and is tested anywhere.

The CRF nodes run as the plugin of plugins/tensorrt/ (name "MeanFieldCRF", namespace "dynseg", version
"1"), loaded from libdynseg_crf_tensorrt.so. docs/tensorrt.md describes the workflow and its limits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
from onnx import helper

from dynseg.sdk import tensorrt_engine
from dynseg.sdk.crf_node import CrfAttributes, score_ceiling_of
from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.files import named_path, write_text_whole, write_whole
from dynseg.sdk.graph import DOMAIN, ENGINE_SUFFIXES, OP_TYPE, crf_nodes, metadata_of, read_export
from dynseg.sdk.checks import is_int
from dynseg.sdk.tensorrt_engine import (
    DEFAULT_ENGINE_DETECTIONS, DEFAULT_ENGINE_SIZES, PLUGIN_NAMESPACE, PLUGIN_VERSION, SIDECAR_FORMAT, EngineError,
    EngineMismatchError, Profile, check_sidecar, compute_capability, import_tensorrt, make_profile,
    plugin_library_path, read_sidecar, register_plugin, running_environment, sha256, sidecar_path, tensorrt_logger,
)

__all__ = ["tensorrt_model", "write_sidecar", "build_engine", *tensorrt_engine.__all__]


# ---- (a) the TensorRT-specific ONNX copy --------------------------------------------------------------

def tensorrt_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a dynseg model for TensorRT's ONNX parser: each dynseg::MeanFieldCRF node carries
    plugin_namespace = "dynseg" and plugin_version = "1" (how the parser finds the plugin), function
    bodies of the dynseg domain are dropped (the plugin implements the op), and everything else is left
    as it is (a network exported without CRFs has none). Raises InvalidArgumentError for a model with
    neither CRF nodes nor dynseg metadata, of another op version, or with a CRF node whose attributes
    the SDK would refuse (docs/ops.md)."""
    op_version = metadata_of(model).get("dynseg_op_version")
    if op_version is not None and op_version != PLUGIN_VERSION:
        raise InvalidArgumentError(
            f"the model's dynseg::MeanFieldCRF is version {op_version}; this plugin implements version "
            f"{PLUGIN_VERSION}: re-export the model with this dynseg"
        )
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = crf_nodes(copy.graph, subgraphs=True)
    if not nodes and op_version is None:
        raise InvalidArgumentError("the model holds no dynseg::MeanFieldCRF node and no dynseg metadata: is it an "
                                   "ONNX file that `dynseg export` wrote?")
    for node in nodes:
        # TensorRT's parser hands the plugin only the fields its creator lists, ints narrowed to int32: a
        # misspelt or out-of-range attribute would build an engine that computes something else
        CrfAttributes.of_node(node)
        kept = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend([helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
                               helper.make_attribute("plugin_version", PLUGIN_VERSION)])
    functions = [f for f in copy.functions if f.domain != DOMAIN]
    del copy.functions[:]
    copy.functions.extend(functions)
    return copy


def crf_node_count(model: onnx.ModelProto) -> int:
    """How many dynseg::MeanFieldCRF nodes (so plugin layers) the model holds."""
    return len(crf_nodes(model.graph, subgraphs=True))


# ---- (b) the sidecar -----------------------------------------------------------------------------------

def _export_record(model_metadata: Mapping[str, str]) -> dict:
    """What the sidecar records of the export, from its ONNX metadata; InvalidArgumentError where that
    lacks an entry `dynseg export` writes."""
    try:
        return {
            "dynseg_version": model_metadata["dynseg_version"],
            "dynseg_op_version": model_metadata["dynseg_op_version"],
            "class_names": json.loads(model_metadata["class_names"]),
            "preprocessing": json.loads(model_metadata["preprocessing"]),
            # what the network was trained on, for `dynseg eval` (None for an export without the record)
            "training_data": json.loads(model_metadata["training_data"]) if "training_data" in model_metadata
            else None,
            "weights_sha256": model_metadata.get("weights_sha256"),
        }
    except (KeyError, json.JSONDecodeError) as error:
        raise InvalidArgumentError(
            f"the model's metadata lacks valid class_names / preprocessing / versions / training_data ({error}): "
            "is it an ONNX file that `dynseg export` wrote?"
        ) from None


def write_sidecar(plan: str | Path, *, tensorrt_version: str, compute_capability: str, plugin_library: str | Path,
                  profile: Profile, model_metadata: Mapping[str, str], fp16: bool, score_ceiling: float = 1.0) -> Path:
    """Writes the sidecar JSON of `plan` (an existing plan file) and returns its path. Records the
    TensorRT version and GPU compute capability ("major.minor") it was built with, the plugin library's
    file name and sha256, the plan's sha256, the profile, the precision, the model's score ceiling
    (`crf_node.score_ceiling_of(...)` of its CRF nodes: the largest detector score it takes), and from the ONNX
    metadata the dynseg version, op version, class names, preprocessing, max_detections, the weights'
    sha256 and what the network was trained on."""
    plan = Path(plan)
    record = _export_record(model_metadata)
    data = {
        "format": SIDECAR_FORMAT,
        "tensorrt_version": str(tensorrt_version),
        "compute_capability": str(compute_capability),
        "plugin_library": {"name": Path(plugin_library).name, "sha256": sha256(plugin_library)},
        "plan_sha256": sha256(plan),
        "profile": profile.to_json(),
        "precision": "fp16" if fp16 else "fp32",
        "max_detections": profile.detections[2],  # what the engine takes, at most the export's limit
        "score_ceiling": float(score_ceiling),
        **record,
    }
    path = sidecar_path(plan)
    write_text_whole(path, json.dumps(data, indent=2) + "\n")
    return path


# ---- (c) the build -------------------------------------------------------------------------------------

def build_engine(onnx_path: str | Path, out_path: str | Path, *, fp16: bool = False,
                 detections: Sequence[int] | None = None,
                 sizes: Sequence[Sequence[int]] = DEFAULT_ENGINE_SIZES,
                 workspace: int | None = None,
                 plugin_library: str | Path | None = None) -> Path:
    """Builds a TensorRT engine from an ONNX file `dynseg export` wrote; returns out_path.

    Writes <out_path minus its suffix>.trt.onnx (the TensorRT-specific copy), the plan at out_path (TensorRT's
    bytes only) and the sidecar sidecar_path(out_path). detections: (min, opt, max) D (None: 1, 10 and the
    export's max_detections, each at most that); sizes: (min, opt, max)
    image sizes as (H, W); workspace: the builder's workspace pool limit in bytes (None: TensorRT's default,
    the device's memory; the CRF plugin's workspace is sized for the profile's largest shapes and can reach
    gigabytes); plugin_library: the plugin's .so (None: plugin_library_path()). fp16 sets TensorRT 10's FP16
    builder flag (the CRF plugin stays fp32); TensorRT 11 removed that flag, so fp16=True is out of range there.

    Raises InvalidArgumentError for a bad profile, workspace or fp16 (fp16=True on a TensorRT without the
    flag included, raised right after TensorRT's import), or a file that is not a dynseg export
    (read_export), EngineError when TensorRT, the plugin library or a GPU is missing or the build fails."""
    onnx_path, out_path = named_path(onnx_path, "onnx_path"), named_path(out_path, "out_path")
    export = read_export(onnx_path)
    model, metadata = export.model, export.metadata
    _export_record(metadata)  # the sidecar's entries, checked before the build, which takes minutes
    if detections is None:
        detections = default_detections(export.max_detections)
    profile = make_profile(detections, sizes, max_detections=export.max_detections,
                           labels=len(export.class_names) + 1)
    onnx_copy = _check_outputs(onnx_path, out_path)
    if workspace is not None and (not is_int(workspace, numpy=False) or workspace < 1):
        raise InvalidArgumentError(f"workspace must be a positive number of bytes or None, got {workspace!r}")
    if not isinstance(fp16, bool):
        raise InvalidArgumentError(f"fp16 must be True or False, got {fp16!r}")
    trt_model = tensorrt_model(model)
    tensorrt = import_tensorrt()
    if fp16 and not hasattr(tensorrt.BuilderFlag, "FP16"):  # before the GPU query, the copy and the parse
        raise InvalidArgumentError(
            f"fp16=True needs TensorRT 10's FP16 builder flag, which TensorRT {tensorrt.__version__} does not have "
            "(TensorRT 11 removed it: reduced precision must be written into the ONNX types, which this exporter "
            "does not do yet); build with fp16=False"
        )
    library = Path(plugin_library) if plugin_library is not None else plugin_library_path()
    capability = compute_capability()  # a missing driver or GPU named before the build, which takes minutes
    onnx.checker.check_model(trt_model)
    write_whole(onnx_copy, lambda partial: onnx.save(trt_model, str(partial)))  # an interruption leaves no cut copy
    plan = _build_plan(tensorrt, onnx_copy, crf_node_count(trt_model), library, profile, fp16,
                       None if workspace is None else int(workspace))
    # an old sidecar would describe the new plan until the new one is written: a failure in between must
    # leave a plan without a sidecar, which loading names, rather than one with another plan's
    sidecar_path(out_path).unlink(missing_ok=True)
    write_whole(out_path, lambda partial: partial.write_bytes(plan))
    write_sidecar(out_path, tensorrt_version=tensorrt.__version__, compute_capability=capability,
                  plugin_library=library, profile=profile, model_metadata=metadata, fp16=fp16,
                  score_ceiling=score_ceiling_of(CrfAttributes.of_node(node)
                                                 for node in crf_nodes(model.graph, subgraphs=True)))
    return out_path


def default_detections(max_detections: int) -> tuple[int, int, int]:
    """build_engine's profile of D for an export that takes at most `max_detections`: DEFAULT_ENGINE_DETECTIONS'
    minimum and optimum, each at most that, and that as the maximum."""
    low, opt, _ = DEFAULT_ENGINE_DETECTIONS
    return min(low, max_detections), min(opt, max_detections), max_detections


def _check_outputs(onnx_path: Path, out_path: Path) -> Path:
    """The TensorRT copy's path beside `out_path`, after checking that the plan and the copy can be written
    and overwrite neither the export they are built from: before the build, which takes minutes."""
    if out_path.suffix not in ENGINE_SUFFIXES:
        raise InvalidArgumentError(f"out_path must be a .engine or .plan file, got {out_path}")
    onnx_copy = out_path.with_suffix(".trt.onnx")
    if onnx_path.resolve() in (out_path.resolve(), onnx_copy.resolve()):
        raise InvalidArgumentError(f"out_path {out_path} would overwrite the export {onnx_path} it is built from "
                                   f"(with the engine or its TensorRT copy {onnx_copy.name})")
    if out_path.is_dir():
        raise InvalidArgumentError(f"out_path {out_path} is a folder, not a file to write the engine to")
    if not out_path.parent.is_dir():
        raise InvalidArgumentError(f"out_path {out_path}: its folder {out_path.parent} does not exist")
    return onnx_copy


def _build_plan(trt, onnx_copy: Path, expected_plugins: int, library: Path, profile: Profile, fp16: bool,
                workspace: int | None) -> bytes:
    """The TensorRT part of build_engine (needs TensorRT and a GPU; not exercised by the CPU tests)."""
    logger = tensorrt_logger(trt)
    try:
        builder = trt.Builder(logger)
    except TypeError as error:  # pybind11's words for a builder TensorRT could not create (CUDA failed to start)
        raise EngineError(f"TensorRT could not create a builder ({error}); see its log above") from None
    register_plugin(builder.get_plugin_registry(), library, trt.__version__, process_wide=False)
    network = builder.create_network(0)  # explicit batch (the only mode in 10.x; strongly typed in 11.x)
    parser = trt.OnnxParser(network, logger)
    if hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(str(onnx_copy)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_copy}: {errors}")
    _check_plugin_layers(trt, network, expected_plugins)

    config = builder.create_builder_config()
    # fp32 means fp32: TensorRT enables TF32 by default (BuilderFlag::kTF32), which rounds the inputs of
    # float32 convolutions and matrix multiplies to 10-bit mantissas; the template match's argmax could then
    # pick another template than PyTorch does
    config.clear_flag(trt.BuilderFlag.TF32)
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16:  # build_engine refused it where the flag is missing
        config.set_flag(trt.BuilderFlag.FP16)
    optimisation = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.shapes().items():
        optimisation.set_shape(name, low, opt, high)
    if config.add_optimization_profile(optimisation) < 0:
        raise EngineError(f"TensorRT refused the optimisation profile {profile.shapes()} (see its log above)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError("TensorRT failed to build the engine (see the log above)")
    return bytes(serialized)


def _check_plugin_layers(trt, network, expected: int) -> None:
    """The parsed network must hold exactly `expected` plugin layers, all dynseg::MeanFieldCRF version 1
    (IPluginV3): a CRF node imported any other way, or another plugin, is an error."""
    ours, others = 0, []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.PLUGIN_V3:
            layer.__class__ = trt.IPluginV3Layer
            core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
            identity = (core.plugin_namespace, core.plugin_name, core.plugin_version)
            if identity == (PLUGIN_NAMESPACE, OP_TYPE, PLUGIN_VERSION):
                ours += 1
            else:
                others.append(f"{layer.name} ({'::'.join(identity[:2])} v{identity[2]})")
        elif layer.type in (trt.LayerType.PLUGIN, trt.LayerType.PLUGIN_V2):
            others.append(f"{layer.name} (a legacy plugin layer)")
    if ours != expected or others:
        raise EngineError(
            f"the parsed network holds {ours} dynseg::MeanFieldCRF plugin layers, expected {expected}"
            + (f", and unexpected plugin layers {', '.join(others)}" if others else "")
            + ": is the plugin library the one built with this dynseg?"
        )
