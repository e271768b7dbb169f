"""The SDK's TensorRT backend. What runs everywhere: the errors of a missing engine, sidecar or
TensorRT. What needs TensorRT and a GPU (skipped, saying which is missing): an engine built from a
fresh export agrees with PyTorch within issue 4's tolerances at D = 1, the profile's opt and its max,
at several sizes, and a saved engine reloads."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from dynseg.sdk import DynsegError, InvalidArgumentError, Segmenter, _native, samples
from dynseg.sdk.commands import parity

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAVE_GPU = _native.cuda_compiled() and _native.cuda_device_count() > 0


@pytest.mark.parametrize("name", ["model.engine", "model.plan"])
def test_the_tensorrt_backend_runs_on_a_gpu_only(tmp_path, name):
    (tmp_path / name).write_bytes(b"a plan")  # either suffix picks the tensorrt backend
    with pytest.raises(InvalidArgumentError, match="device='cuda'"):
        Segmenter(tmp_path / name)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_missing_engine_is_named_before_the_device(tmp_path, device):
    with pytest.raises(InvalidArgumentError, match="missing.engine does not exist"):
        Segmenter(tmp_path / "missing.engine", device=device)


@pytest.mark.parametrize("backend", ["auto", "onnxruntime", "torch", "tensorrt"])
def test_a_path_the_system_cannot_look_at_is_named_whatever_the_backend(tmp_path, backend):
    # is_dir() and exists() raise on a name too long rather than answer False
    with pytest.raises(InvalidArgumentError, match="cannot be opened: File name too long"):
        Segmenter(tmp_path / ("a" * 5000 + ".onnx"), backend)


def test_an_onnx_model_given_to_the_tensorrt_backend_is_named_as_such(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(InvalidArgumentError, match="is an ONNX model, not a TensorRT engine"):
        Segmenter(tmp_path / "model.onnx", backend="tensorrt", device="cuda")


def test_an_engine_without_its_sidecar_says_to_rebuild(tmp_path):
    plan = tmp_path / "model.engine"
    plan.write_bytes(b"a plan without its sidecar")
    with pytest.raises(DynsegError, match="sidecar JSON"):
        Segmenter(plan, device="cuda")


@pytest.mark.skipif(HAVE_TENSORRT, reason="the message for a machine without TensorRT's Python package")
def test_an_engine_where_tensorrt_is_missing_says_how_to_install_it_before_looking_for_the_plugin(tmp_path,
                                                                                                   monkeypatch):
    from dynseg.export.engine import write_sidecar
    from dynseg.sdk.tensorrt_engine import make_profile

    plan = tmp_path / "model.engine"
    plan.write_bytes(b"a plan")
    library = tmp_path / "libdynseg_crf_tensorrt.so"
    library.write_bytes(b"a plugin")
    profile = make_profile((1, 1, 1), ((64, 64), (64, 64), (64, 64)))
    write_sidecar(plan, tensorrt_version="10.16.0.72", compute_capability="9.0", plugin_library=library,
                  profile=profile, model_metadata={"class_names": '["cup"]', "preprocessing": "{}",
                                                  "dynseg_version": "0.1.0", "dynseg_op_version": "1"}, fp16=False)
    monkeypatch.setenv("DYNSEG_TENSORRT_PLUGIN", str(tmp_path / "nowhere.so"))  # no plugin library either
    with pytest.raises(DynsegError, match="TensorRT's Python package is not installed"):
        Segmenter(plan, device="cuda")


needs_tensorrt = pytest.mark.skipif(not (HAVE_TENSORRT and HAVE_GPU),
                                    reason="needs TensorRT's Python package and a GPU with dynseg's CUDA kernels; "
                                           "CI machines have neither")


@pytest.fixture(scope="module")
def engine(tmp_path_factory, learned_looking_network):
    pytest.importorskip("torch")
    from dynseg.export.engine import build_engine
    from dynseg.export.onnx import export_onnx
    from dynseg.trainer.checkpoint import save_checkpoint

    network = learned_looking_network()
    directory = tmp_path_factory.mktemp("engine")
    save_checkpoint(directory / "checkpoint", network)
    onnx_path = export_onnx(network, directory / "model.onnx", max_detections=20)
    plan = build_engine(onnx_path, directory / "model.engine", detections=(1, 5, 20),
                        sizes=((64, 64), (200, 300), (320, 480)))
    return directory / "checkpoint", plan


@needs_tensorrt
@pytest.mark.parametrize("detections, size", [(0, (64, 64)), (1, (64, 64)), (5, (200, 300)), (20, (320, 480)),
                                              (7, (151, 233))])
def test_tensorrt_matches_pytorch_across_the_profile(engine, detections, size):
    checkpoint, plan = engine
    photo = samples.load("chelsea")  # 300x451: tiled, so that the profile's largest size is exactly met
    tiles = (-(-size[0] // photo.shape[0]), -(-size[1] // photo.shape[1]), 1)
    image = np.ascontiguousarray(np.tile(photo, tiles)[: size[0], : size[1]])
    assert image.shape[:2] == size
    rng = np.random.default_rng(detections)
    height, width = size
    x1, y1 = rng.integers(0, width - 2, detections), rng.integers(0, height - 2, detections)
    x2 = np.minimum(width - 1, x1 + rng.integers(1, width // 2, detections))
    y2 = np.minimum(height - 1, y1 + rng.integers(1, height // 2, detections))
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    labels, scores = rng.integers(1, 4, detections), rng.uniform(0.05, 1.0, detections).astype(np.float32)
    segmenters = Segmenter(plan, device="cuda"), Segmenter(checkpoint, backend="torch")
    (candidate, candidate_outputs), (expected, reference_outputs) = (
        s.segment_with_outputs(image, boxes, labels, scores) for s in segmenters)
    report = parity.compare(f"D={detections}", candidate_outputs, reference_outputs, candidate, expected)
    assert report, [str(check) for check in report.checks]


@needs_tensorrt
def test_a_saved_engine_reloads_and_gives_the_same_result(engine):
    _, plan = engine
    image = np.ascontiguousarray(samples.load("coffee")[:200, :300])
    boxes, labels, scores = np.array([[10, 20, 150, 180]], np.float32), [2], [0.8]
    first = Segmenter(plan, device="cuda").segment(image, boxes, labels, scores)
    again = Segmenter(plan, device="cuda").segment(image, boxes, labels, scores)
    assert np.array_equal(first.instance_map, again.instance_map)
