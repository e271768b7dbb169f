"""The CUDA kernels against the CPU kernels: parity, determinism, gradients, the zero-copy entry, and
errors. The GPU tests skip, saying why, where the library has no CUDA kernels or the machine no GPU;
the tests of what a machine without a GPU must say run everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dynseg.sdk import _native, dense_crf, dense_crf_cuda
from dynseg.sdk.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[2]


def _gpu_missing() -> str | None:
    """Why these tests cannot run here: the SDK's own check of device 0, or None."""
    try:
        _native.check_cuda_device(0)
    except InvalidArgumentError as error:
        return str(error)
    return None


needs_gpu = pytest.mark.skipif(
    _gpu_missing() is not None,
    reason=f"{_gpu_missing()}; CI machines have none: scripts/gpu_check.sh runs these on a lent GPU")


# ---- what every machine checks -------------------------------------------------------------------


def test_unknown_device_is_named(field_unary):
    with pytest.raises(InvalidArgumentError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        dense_crf(field_unary(2, 8, 8), None, bilateral=None, device="gpu")


@pytest.mark.skipif(_gpu_missing() is None, reason="this machine has a usable GPU")
def test_cuda_without_a_gpu_says_why(field_unary):
    # built without CUDA, or no GPU: either way the message says which
    reason = r"device='cuda' needs the CUDA kernels, but this dynseg native library was built without CUDA|" \
             r"device='cuda:0' but the native library sees 0 CUDA device\(s\) \(no GPU or no NVIDIA driver"
    with pytest.raises(InvalidArgumentError, match=reason):
        dense_crf(field_unary(2, 8, 8), None, bilateral=None, device="cuda")


def test_zero_copy_entry_rejects_host_arrays(field_unary):
    with pytest.raises(InvalidArgumentError, match="unary must be a GPU array exposing __cuda_array_interface__"):
        dense_crf_cuda(field_unary(2, 8, 8), None, bilateral=None)


# ---- on a GPU --------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("labels", [1, 2, 21, 101, 256])
@pytest.mark.parametrize("size", [(33, 47), (64, 64), (97, 131)])
def test_cuda_matches_cpu_kernel(labels, size, smooth_image, field_unary):
    height, width = size
    seed = labels * 1000 + height
    image = smooth_image(height, width, seed=seed)
    unary = field_unary(labels, height, width, seed=seed)
    for normalization in ("after", "symmetric"):
        cpu = dense_crf(unary, image, normalization=normalization)
        gpu = dense_crf(unary, image, normalization=normalization, device="cuda")
        assert np.isfinite(gpu).all()
        assert np.abs(gpu - cpu).max() <= 1e-5, (normalization, np.abs(gpu - cpu).max())


@needs_gpu
@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_cuda_matches_cpu_kernel_on_noise(normalization, field_unary):
    # Colour noise with a small theta_beta: nearly every entry has a vertex of its own, so a 16×16
    # pixel tile holds far more distinct vertices than the kernels stage in shared memory. A modest
    # weight: with w = 10 on noise, rounding differences grow about 4× per iteration (5e-7 after
    # one, 6e-5 after five, in the CUDA emulator), a property of the model, not of the kernels.
    image = np.random.default_rng(2).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    unary = field_unary(21, 45, 70, seed=2)
    kernels = dict(spatial=(3.0, 3.0), bilateral=(20.0, 2.0, 3.0), normalization=normalization)
    cpu = dense_crf(unary, image, **kernels)
    gpu = dense_crf(unary, image, device="cuda", **kernels)
    assert np.abs(gpu - cpu).max() <= 1e-5


@needs_gpu
@pytest.mark.parametrize("kernels", [dict(bilateral=None), dict(spatial=None)], ids=["spatial only", "bilateral only"])
def test_cuda_matches_cpu_kernel_with_one_kernel(kernels, smooth_image, field_unary):
    image = smooth_image(50, 61, seed=4)
    unary = field_unary(6, 50, 61, seed=4)
    cpu = dense_crf(unary, image, **kernels)
    gpu = dense_crf(unary, image, device="cuda", **kernels)
    assert np.abs(gpu - cpu).max() <= 1e-5


@needs_gpu
def test_cuda_is_bitwise_deterministic(photo, field_unary):
    image = photo("coffee")
    unary = field_unary(21, *image.shape[:2], seed=7)
    first = dense_crf(unary, image, device="cuda")
    for _ in range(3):
        assert np.array_equal(dense_crf(unary, image, device="cuda"), first)


@needs_gpu
def test_cuda_key_range_error_names_the_kernel(field_unary):
    unary = field_unary(2, 16, 16)
    image = np.full((16, 16, 3), 200, np.uint8)
    image[::2] = 0
    with pytest.raises(InvalidArgumentError, match="kernels\\[1\\]"):
        dense_crf(unary, image, bilateral=(1.0, 1e-30, 1.0), device="cuda")


try:  # the torch op's tests need torch; the numpy API's above and below do not
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (the torch op and zero-copy tests)")


@needs_gpu
@needs_torch
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nvcc") is None, reason="needs cmake and nvcc")
def test_a_library_built_for_another_gpu_names_both_architectures(tmp_path):
    # SASS runs only on its own major architecture: sm_80 code cannot run on a Hopper, nor sm_90 on an Ampere
    major, minor = torch.cuda.get_device_capability(0)
    other = "80-real" if major >= 9 else "90-real"
    build = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), "-DDYNSEG_NATIVE_ARCH=OFF",
         f"-DDYNSEG_CUDA_ARCHITECTURES={other}"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    build = subprocess.run(["cmake", "--build", str(tmp_path / "build"), "-j", str(os.cpu_count() or 2)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    library = next((tmp_path / "build").rglob("libdynseg_crf.so"))
    call = ("import numpy as np\nfrom dynseg.sdk import dense_crf\n"
            "dense_crf(np.zeros((2, 8, 8), np.float32), None, bilateral=None, device='cuda')\n")
    run = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, DYNSEG_LIBRARY=str(library)))
    assert run.returncode != 0
    # the runtime names the missing image one of two ways, by version
    expected = (rf"CUDA device 0 \(compute capability {major}\.{minor}\) cannot run this library's CUDA kernels, "
                rf"which were built for {other} \(cudaError(NoKernelImageForDevice|InvalidDeviceFunction)\): "
                rf"reinstall dynseg with its architecture, e\.g\. pip install \. -C "
                rf"cmake\.define\.DYNSEG_CUDA_ARCHITECTURES={major}{minor}-real")
    assert re.search(expected, run.stderr), run.stderr


def _problem_tensors(labels: int, height: int, width: int, seed: int, device: str):
    """A general problem: matrix kernel weights, a full compatibility, a bilateral kernel."""
    generator = np.random.default_rng(seed)
    unary = generator.normal(0, 2, (labels, height, width)).astype(np.float32)
    image = (generator.uniform(0, 255, (3, height, width))).astype(np.float32)
    w_spatial = generator.normal(0, 1, (labels, labels)).astype(np.float32)
    w_bilateral = generator.normal(0, 1, (labels, labels)).astype(np.float32)
    compat = generator.normal(0, 1, (labels, labels)).astype(np.float32)
    as_tensor = lambda a: torch.tensor(a, device=device, requires_grad=a is not image)
    return [as_tensor(a) for a in (unary, image, w_spatial, w_bilateral, compat)]


@needs_gpu
@needs_torch
@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("labels", [3, 21])
def test_torch_op_forward_and_gradients_match_cpu(labels, normalization):
    from dynseg.trainer.crf.native import mean_field_native

    results = {}
    for device in ("cpu", "cuda"):
        unary, image, w_spatial, w_bilateral, compat = _problem_tensors(labels, 29, 41, seed=labels, device=device)
        logits = mean_field_native(unary, image, [(3.0, 0.0, w_spatial), (20.0, 30.0, w_bilateral)], compat=compat,
                                   normalization=normalization, iterations=3)
        upstream = torch.tensor(np.random.default_rng(5).normal(size=logits.shape).astype(np.float32), device=device)
        (logits * upstream).sum().backward()
        results[device] = [t.detach().cpu().numpy() for t in
                           (logits, unary.grad, w_spatial.grad, w_bilateral.grad, compat.grad)]
    for name, cpu, gpu in zip(("logits", "unary", "w_spatial", "w_bilateral", "compat"), results["cpu"], results["cuda"]):
        scale = max(1.0, float(np.abs(cpu).max()))
        assert np.abs(gpu - cpu).max() <= 1e-4 * scale, (name, np.abs(gpu - cpu).max(), scale)


@needs_gpu
@needs_torch
def test_the_semantic_crf_with_detections_matches_cpu_values_and_gradients():
    # one call each way on the GPU, the detection potential's gradient (w_x, w_y) included
    from dynseg.trainer.crf.native import DetectionPotential, mean_field_native_with_detections

    results = {}
    for device in ("cpu", "cuda"):
        unary, image, w_spatial, w_bilateral, compat = _problem_tensors(21, 45, 61, seed=4, device=device)
        w_x, w_y = (torch.tensor(v, device=device, requires_grad=True) for v in (1.3, 0.8))
        boxes = torch.tensor([[0, 0, 60, 44], [3, 5, 30, 20], [40, 10, 60, 40], [7, 7, 7, 7]], dtype=torch.float32,
                             device=device)
        detections = DetectionPotential(boxes, torch.tensor([3, 7, 12, 20], device=device),
                                torch.tensor([0.9, 0.5, 0.7, 0.2], device=device), w_x, w_y, score_ceiling=1.0,
                                epsilon=1e-4)
        logits, scores = mean_field_native_with_detections(
            unary, image, [(3.0, 0.0, w_spatial), (20.0, 30.0, w_bilateral)], detections, compat=compat, iterations=5)
        upstream = torch.tensor(np.random.default_rng(5).normal(size=logits.shape).astype(np.float32), device=device)
        ((logits * upstream).sum() + (scores * torch.linspace(-1, 1, 4, device=device)).sum()).backward()
        results[device] = [t.detach().cpu().numpy() for t in (logits, scores, unary.grad, w_spatial.grad,
                                                               w_bilateral.grad, compat.grad, w_x.grad, w_y.grad)]
    names = ("logits", "scores", "unary", "w_spatial", "w_bilateral", "compat", "w_x", "w_y")
    for name, cpu, gpu in zip(names, results["cpu"], results["cuda"]):
        scale = max(1.0, float(np.abs(cpu).max()))
        assert np.abs(gpu - cpu).max() <= 1e-4 * scale, (name, np.abs(gpu - cpu).max(), scale)


@needs_gpu
@needs_torch
@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("labels", [2, 21, 40, 46341])
def test_torch_op_gradients_match_cpu_with_potts_and_scalar_weights(labels, normalization):
    # The common model (Potts, scalar weights), gradients included, with rows of one label tile
    # (L <= 32), of two (L = 40), and more labels than L x L sums could index with 32 bits, which
    # Potts never forms (on a 2x3 image; emulated, that case takes minutes, so only a GPU runs it).
    from dynseg.trainer.crf.native import mean_field_native

    height, width = (2, 3) if labels > 46340 else (37, 53)
    results = {}
    for device in ("cpu", "cuda"):
        generator = np.random.default_rng(labels)
        unary = torch.tensor(generator.normal(0, 2, (labels, height, width)).astype(np.float32), device=device,
                             requires_grad=True)
        image = torch.tensor(generator.uniform(0, 255, (3, height, width)).astype(np.float32), device=device)
        w_spatial = torch.tensor(3.0, device=device, requires_grad=True)
        w_bilateral = torch.tensor(10.0, device=device, requires_grad=True)
        logits = mean_field_native(unary, image, [(3.0, 0.0, w_spatial), (30.0, 13.0, w_bilateral)],
                                   normalization=normalization, iterations=4)
        upstream = torch.tensor(generator.normal(size=logits.shape).astype(np.float32), device=device)
        (logits * upstream).sum().backward()
        results[device] = [t.detach().cpu().numpy() for t in (logits, unary.grad, w_spatial.grad, w_bilateral.grad)]
    for name, cpu, gpu in zip(("logits", "unary", "w_spatial", "w_bilateral"), results["cpu"], results["cuda"]):
        scale = max(1.0, float(np.abs(cpu).max()))
        assert np.abs(gpu - cpu).max() <= 1e-4 * scale, (name, np.abs(gpu - cpu).max(), scale)


@needs_gpu
@needs_torch
def test_torch_op_on_cuda_is_deterministic_with_gradients():
    from dynseg.trainer.crf.native import mean_field_native

    outputs = []
    for _ in range(2):
        unary, image, w_spatial, w_bilateral, compat = _problem_tensors(21, 48, 64, seed=3, device="cuda")
        logits = mean_field_native(unary, image, [(3.0, 0.0, w_spatial), (20.0, 30.0, w_bilateral)], compat=compat)
        logits.square().sum().backward()
        outputs.append([t.detach().cpu().numpy() for t in (logits, unary.grad, w_spatial.grad, compat.grad)])
    for first, second in zip(*outputs):
        assert np.array_equal(first, second)


def _workspace_size(labels: int, height: int, width: int, channels: int, detections: int) -> int:
    """The CUDA forward workspace of a semantic CRF node (two kernels, Potts, the detection potential)."""
    ones = np.ones(1, np.float32)
    potential = None
    if detections:
        boxes = np.tile(np.array([[0, 0, 3, 3]], np.float32), (detections, 1))
        potential = _native.DetectionPotential(
            boxes=boxes, labels=np.ones(detections, np.int64), scores=np.full(detections, 0.5, np.float32),
            detection_x=ones, detection_y=ones, score_ceiling=1.0, epsilon=1e-4,
            recalibrated=np.zeros(detections, np.float32))
    problem = _native.Problem(
        labels, height, width, np.zeros((channels, height, width), np.float32),
        [_native.Kernel(3.0, 0.0, ones), _native.Kernel(80.0, 13.0, ones)], compat=None, normalization="after",
        iterations=5, output=_native.Output.LOGITS, threads=0, detection_potential=potential)
    return problem.workspace_size_cuda(_native.Pass.FORWARD)


@needs_gpu
def test_the_cuda_workspace_never_shrinks_as_a_problem_grows():
    # A TensorRT engine sizes the plugin's workspace for its profile's largest shapes and hands that
    # buffer to every smaller call: growing any one dimension must never lower the requirement.
    base = {"labels": 3, "height": 33, "width": 47, "channels": 3, "detections": 2}
    sweeps = {"labels": [2, 3, 4, 21, 32, 33, 64, 101, 256], "height": [1, 2, 17, 33, 64, 255, 512],
              "width": [1, 3, 47, 64, 257, 1024], "channels": [1, 2, 3, 5], "detections": [0, 1, 2, 9, 100, 1000]}
    for name, values in sweeps.items():
        sizes = [_workspace_size(**(base | {name: value})) for value in values]
        assert sizes == sorted(sizes), (name, values, sizes)


@needs_gpu
@needs_torch
def test_torch_compile_on_cuda_gives_the_eager_values_and_gradients():
    from dynseg.trainer.crf.native import mean_field_native

    def loss(unary, image, w_spatial, w_bilateral, compat):
        logits = mean_field_native(unary, image, [(3.0, 0.0, w_spatial), (20.0, 30.0, w_bilateral)], compat=compat)
        return logits.square().sum()

    results = []
    for function in (loss, torch.compile(loss, backend="aot_eager")):
        tensors = _problem_tensors(21, 48, 64, seed=3, device="cuda")
        value = function(*tensors)
        value.backward()
        results.append([value.detach(), *(t.grad for t in tensors if t.requires_grad)])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)


@needs_gpu
@needs_torch
def test_zero_copy_entry_matches_numpy_api(photo, field_unary):
    image = photo("chelsea")
    height, width = image.shape[:2]
    unary = np.ascontiguousarray(field_unary(5, height, width, seed=11))
    expected = dense_crf(unary, image)
    unary_gpu = torch.tensor(unary, device="cuda")
    image_gpu = torch.tensor(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32), device="cuda")
    q = dense_crf_cuda(unary_gpu, image_gpu, stream=torch.cuda.current_stream().cuda_stream)
    got = torch.as_tensor(q, device="cuda").cpu().numpy()
    assert np.abs(got - expected).max() <= 1e-5
    out = torch.empty_like(unary_gpu)
    assert dense_crf_cuda(unary_gpu, image_gpu, out=out) is out
    assert np.abs(out.cpu().numpy() - expected).max() <= 1e-5


@needs_gpu
@pytest.mark.parametrize("labels, height, width, count", [(2, 33, 47, 1), (21, 97, 131, 10), (5, 64, 64, 40)])
def test_cuda_detection_potential_matches_cpu(labels, height, width, count, smooth_image, field_unary):
    """The semantic CRF with its detection potential: logits and recalibrated scores on the GPU equal the
    CPU kernel's (one library call each), and repeat bit for bit."""
    rng = np.random.default_rng(labels + count)
    image = np.ascontiguousarray(smooth_image(height, width, seed=count).transpose(2, 0, 1), dtype=np.float32)
    unary = np.ascontiguousarray(3.0 * field_unary(labels, height, width, seed=count), dtype=np.float32)
    x1, y1 = rng.integers(0, width, count), rng.integers(0, height, count)
    boxes = np.stack([x1, y1, np.minimum(width - 1, x1 + rng.integers(0, width, count)),
                      np.minimum(height - 1, y1 + rng.integers(0, height, count))], axis=1).astype(np.float32)
    weights = (np.eye(labels) * 4.0 + rng.uniform(0, 0.3, (labels, labels))).astype(np.float32)

    def run(device: int | None) -> tuple[np.ndarray, np.ndarray]:
        recalibrated = np.full(count, np.nan, np.float32)
        detections = _native.DetectionPotential(
            boxes=boxes, labels=rng_labels, scores=scores, detection_x=np.array([1.3], np.float32),
            detection_y=np.array([0.8], np.float32), score_ceiling=1.0, epsilon=1e-4, recalibrated=recalibrated)
        problem = _native.Problem(
            labels, height, width, image, [_native.Kernel(3.0, 0.0, weights), _native.Kernel(20.0, 13.0, weights)],
            compat=(-np.eye(labels)).astype(np.float32), normalization="after", iterations=5,
            output=_native.Output.LOGITS, threads=0, detection_potential=detections)
        logits = problem.forward(unary) if device is None else problem.forward_from_host(unary, device)
        return logits, recalibrated

    rng_labels = rng.integers(1, labels, count).astype(np.int64)
    scores = rng.uniform(0.05, 1.0, count).astype(np.float32)
    cpu_logits, cpu_scores = run(None)
    gpu_logits, gpu_scores = run(0)
    assert np.abs(gpu_logits - cpu_logits).max() <= 1e-5 * np.abs(cpu_logits).max()
    assert np.abs(gpu_scores - cpu_scores).max() <= 1e-5
    again = run(0)
    assert np.array_equal(again[0], gpu_logits) and np.array_equal(again[1], gpu_scores)
