"""Small forward and backward calls through the CUDA entry points that reach every path of the kernels,
for compute-sanitizer to watch: spatial and bilateral lattices; matrix and scalar weights; full,
diagonal and Potts compatibilities; both normalisations; rows of at most 32 labels and longer ones
(two label tiles, the long-row softmax); the detection potential, with and without kernels, forward
and backward; logits and probabilities out. Needs numpy and the native library only, so the sanitizer has little else
to trace. Exits non-zero if a result is not finite. Every device buffer it makes is freed when main
returns, so memcheck's leak check reports only what the library itself left allocated.

    compute-sanitizer --tool memcheck --leak-check full --error-exitcode 1 python scripts/cuda_smoke.py
"""

from __future__ import annotations

import sys

import numpy as np

from dynseg.sdk import _native, dense_crf


def device_copy(array: np.ndarray) -> tuple[_native.CudaBuffer, _native.DeviceArray]:
    """A float32 or int64 array's copy in device memory."""
    array = np.ascontiguousarray(array)
    buffer = _native.CudaBuffer(array.nbytes)
    _native.copy_to_device(buffer.pointer, array)
    return buffer, _native.DeviceArray(buffer.pointer, array.shape, array.dtype)


def main() -> int:
    rng = np.random.default_rng(0)
    labels, height, width = 5, 19, 23
    unary = rng.normal(0, 2, (labels, height, width)).astype(np.float32)
    image = rng.uniform(0, 255, (height, width, 3)).astype(np.uint8)
    q = dense_crf(unary, image, device="cuda")

    keep = []
    def on_device(array):
        buffer, handle = device_copy(array)
        keep.append(buffer)
        return handle

    planar = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    weights = [rng.normal(0, 1, (labels, labels)).astype(np.float32) for _ in range(2)]
    compat = rng.normal(0, 1, (labels, labels)).astype(np.float32)
    problem = _native.Problem(
        labels, height, width, on_device(planar),
        [_native.Kernel(3.0, 0.0, on_device(weights[0])), _native.Kernel(20.0, 30.0, on_device(weights[1]))],
        compat=on_device(compat), normalization="symmetric", iterations=2, output=_native.Output.LOGITS, threads=0,
    )
    d_unary, d_grad = on_device(unary), on_device(rng.normal(size=unary.shape).astype(np.float32))
    grad_unary = on_device(np.zeros_like(unary))
    grad_weights = [on_device(np.zeros_like(w)) for w in weights]
    grad_compat = on_device(np.zeros_like(compat))
    nbytes = problem.workspace_size_cuda(_native.Pass.BACKWARD)
    workspace = _native.CudaBuffer(nbytes)
    problem.backward_cuda(d_unary, d_grad, grad_unary, grad_weights, grad_compat, workspace.pointer, nbytes, 0)
    result = np.empty_like(unary)
    _native.copy_from_device(result, grad_unary.pointer)

    # the common model's backward: Potts, scalar weights
    scalars = [on_device(np.array([3.0], np.float32)), on_device(np.array([10.0], np.float32))]
    potts = _native.Problem(
        labels, height, width, on_device(planar),
        [_native.Kernel(3.0, 0.0, scalars[0]), _native.Kernel(20.0, 30.0, scalars[1])],
        compat=None, normalization="after", iterations=2, output=_native.Output.LOGITS, threads=0,
    )
    nbytes = potts.workspace_size_cuda(_native.Pass.BACKWARD)
    workspace = _native.CudaBuffer(nbytes)
    potts.backward_cuda(d_unary, d_grad, grad_unary, [None, None], None, workspace.pointer, nbytes, 0)
    potts_result = np.empty_like(unary)
    _native.copy_from_device(potts_result, grad_unary.pointer)
    result = np.concatenate([result, potts_result])

    # 40 labels (two label tiles, the long-row softmax), a diagonal compatibility and the detection
    # potential, with both kernels and with none; logits, then probabilities
    many = 40
    long_unary = rng.normal(0, 2, (many, height, width)).astype(np.float32)
    boxes = np.array([[2, 3, 15, 17], [0, 0, width - 1, height - 1], [10, 5, 10, 5]], np.float32)
    both = [_native.Kernel(3.0, 0.0, np.array([3.0], np.float32)),
            _native.Kernel(20.0, 30.0, np.eye(many, dtype=np.float32) * 5.0)]
    for kernels, output in ((both, _native.Output.LOGITS), ([], _native.Output.PROBABILITIES)):
        detections = _native.DetectionPotential(
            boxes=boxes, labels=np.array([1, 7, 39], np.int64), scores=np.array([0.9, 0.4, 0.2], np.float32),
            detection_x=np.array([1.3], np.float32), detection_y=np.array([0.8], np.float32), score_ceiling=1.0,
            epsilon=1e-4, recalibrated=np.zeros(3, np.float32))
        problem = _native.Problem(
            many, height, width, planar, kernels,
            compat=rng.uniform(-1.5, -0.5, many).astype(np.float32), normalization="after", iterations=2,
            output=output, threads=0, detection_potential=detections)
        out = problem.forward_from_host(long_unary, 0)
        result = np.concatenate([result.ravel(), out.ravel(), detections.recalibrated])
    # the detection potential's backward, on device arrays
    gradients = [on_device(np.zeros(shape, np.float32)) for shape in ((3,), (1,), (1,), unary.shape)]
    detections = _native.DetectionPotential(
        boxes=on_device(boxes), labels=on_device(np.array([1, 4, 2], np.int64)),
        scores=on_device(np.array([0.9, 0.4, 0.2], np.float32)), detection_x=on_device(np.array([1.3], np.float32)),
        detection_y=on_device(np.array([0.8], np.float32)), score_ceiling=1.0, epsilon=1e-4, recalibrated=gradients[0],
        grad_recalibrated=on_device(np.array([1.0, -0.5, 0.25], np.float32)), grad_detection_x=gradients[1],
        grad_detection_y=gradients[2])
    problem = _native.Problem(
        labels, height, width, on_device(planar),
        [_native.Kernel(3.0, 0.0, on_device(weights[0])), _native.Kernel(20.0, 30.0, on_device(weights[1]))],
        compat=on_device(compat), normalization="after", iterations=3, output=_native.Output.LOGITS, threads=0,
        detection_potential=detections)
    nbytes = problem.workspace_size_cuda(_native.Pass.BACKWARD)
    workspace = _native.CudaBuffer(nbytes)
    problem.backward_cuda(d_unary, d_grad, gradients[3], [None, None], None, workspace.pointer, nbytes, 0)
    for gradient in gradients:
        host = np.empty(gradient.shape, np.float32)
        _native.copy_from_device(host, gradient.pointer)
        result = np.concatenate([result.ravel(), host.ravel()])
    finite = bool(np.isfinite(q).all()), bool(np.isfinite(result).all())
    print(f"cuda smoke: dense_crf finite {finite[0]}, the other calls' results finite {finite[1]}")
    _native.free_scratch()
    return 0 if all(finite) else 1


if __name__ == "__main__":
    sys.exit(main())
