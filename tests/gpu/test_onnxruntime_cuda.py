"""The onnxruntime backend on a GPU: onnxruntime's CUDA execution provider for the standard parts and
the CUDA kernels for the CRF nodes, every tensor of a call in device memory. It must compute what the
CPU path computes (issue 4's tolerances, dynseg validate's comparison). Skipped, saying why, without
onnxruntime-gpu, the CUDA kernels or a GPU; what a machine without them must say is checked everywhere."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from dynseg.export.onnx import export_onnx
from dynseg.sdk import InvalidArgumentError, _native, samples
from dynseg.sdk.commands import parity
from dynseg.sdk.segmenter import Segmenter


def _missing() -> str | None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDA execution provider (onnxruntime-gpu is not installed)"
    try:
        _native.check_cuda_device(0)  # the SDK's own check, with its message
    except InvalidArgumentError as error:
        return str(error)
    return None


needs_cuda = pytest.mark.skipif(_missing() is not None,
                                reason=f"{_missing()}; CI machines have none: scripts/gpu_check.sh runs these on a GPU")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, learned_looking_network):
    return export_onnx(learned_looking_network(), tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.mark.skipif(_missing() is None, reason="this machine runs the onnxruntime CUDA path")
def test_cuda_without_its_requirements_says_what_is_missing(model_path):
    # no CUDA provider in onnxruntime, or no CUDA kernels or GPU for the CRF nodes: the message says which
    reason = (r"needs onnxruntime's CUDA execution provider, but this onnxruntime .* install onnxruntime-gpu|"
              r"built without CUDA|sees 0 CUDA device\(s\)")
    with pytest.raises(InvalidArgumentError, match=reason):
        Segmenter(model_path, backend="onnxruntime", device="cuda")


def test_a_malformed_device_is_named(model_path):
    with pytest.raises(InvalidArgumentError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        Segmenter(model_path, backend="onnxruntime", device="cuda:x")


@needs_cuda
@pytest.mark.parametrize("detections, name", [(0, "coffee"), (3, "chelsea"), (20, "astronaut")])
def test_cuda_path_matches_the_cpu_path(model_path, detections, name):
    image = samples.load(name)
    height, width = image.shape[:2]
    rng = np.random.default_rng(detections)
    x1, y1 = rng.integers(0, width - 2, detections), rng.integers(0, height - 2, detections)
    boxes = np.stack([x1, y1, np.minimum(width - 1, x1 + rng.integers(1, width // 2, detections)),
                      np.minimum(height - 1, y1 + rng.integers(1, height // 2, detections))], axis=1)
    boxes = boxes.astype(np.float32).reshape(-1, 4)
    labels, scores = rng.integers(1, 4, detections), rng.uniform(0.05, 1.0, detections).astype(np.float32)
    (candidate, candidate_outputs), (expected, reference_outputs) = (
        Segmenter(model_path, backend="onnxruntime", device=device).segment_with_outputs(image, boxes, labels, scores)
        for device in ("cuda", "cpu"))
    report = parity.compare(name, candidate_outputs, reference_outputs, candidate, expected)
    assert report, [str(check) for check in report.checks]
