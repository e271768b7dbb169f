"""The CUDA entry points against the CPU ones in one library, case by case, printing a line each and
exiting non-zero on any mismatch. Meant for a library whose CUDA kernels are emulated on the CPU
(emulator.py): device memory is host memory there, so one Problem on numpy arrays serves both.

    DYNSEG_LIBRARY=emulated.so python tests/cuda_emulation/parity.py
"""

from __future__ import annotations

import sys

import numpy as np

from dynseg.sdk import _native as n
from dynseg.sdk.errors import DynsegError

rng = np.random.default_rng(1)


def on_device(array: np.ndarray) -> n.DeviceArray:
    return n.DeviceArray(array.ctypes.data, array.shape, array.dtype)


def workspace(problem: n.Problem, pass_: int) -> tuple[np.ndarray, int]:
    nbytes = problem.workspace_size_cuda(pass_)
    return np.full(nbytes + 256, 0xCD, np.uint8), nbytes  # not zero, as device memory is not


def forward_cuda(problem: n.Problem, unary: np.ndarray) -> np.ndarray:
    out = np.full_like(unary, np.nan)
    buffer, nbytes = workspace(problem, n.Pass.FORWARD)
    problem.forward_cuda(on_device(unary), on_device(out), buffer.ctypes.data, nbytes, 0)
    return out


def backward_cuda(
    problem: n.Problem, unary: np.ndarray, grad: np.ndarray, weights: list[np.ndarray], compat: np.ndarray | None
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
    grad_unary = np.full_like(unary, np.nan)
    grad_weights = [np.full_like(w, np.nan) for w in weights]
    grad_compat = None if compat is None else np.full_like(compat, np.nan)
    buffer, nbytes = workspace(problem, n.Pass.BACKWARD)
    problem.backward_cuda(on_device(unary), on_device(grad), on_device(grad_unary), [on_device(g) for g in grad_weights],
                          None if compat is None else on_device(grad_compat), buffer.ctypes.data, nbytes, 0)
    return grad_unary, grad_weights, grad_compat


def colour_ramps(height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([(ys * 7) % 256, (xs * 5) % 256, ((xs + ys) * 3) % 256], -1).astype(np.uint8)


def make_problem(
    labels: int, image: np.ndarray, kernels: list[tuple[float, float, np.ndarray]], compat: np.ndarray | None = None,
    normalization: str = "after", output: n.Output = n.Output.PROBABILITIES, iterations: int = 3,
) -> n.Problem:
    """`iterations` (three) of mean field on `image` (H, W, C) with (theta_xy, theta_color, weight) kernels."""
    height, width = image.shape[:2]
    planar = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    return n.Problem(labels, height, width, planar, [n.Kernel(*k) for k in kernels], compat=compat,
                     normalization=normalization, iterations=iterations, output=output, threads=0)


failures = 0


def check(name: str, expected: np.ndarray, got: np.ndarray, tolerance: float) -> None:
    global failures
    difference = float(np.abs(expected - got).max())
    ok = bool(np.isfinite(got).all()) and difference <= tolerance * max(1.0, float(np.abs(expected).max()))
    failures += not ok
    print(f"{'ok' if ok else 'MISMATCH'}  {name}: max |difference| {difference:.1e}", flush=True)


def scalar(value: float) -> np.ndarray:
    return np.array([value], np.float32)


def detection_backward() -> None:
    """The gradient through the detection potential: matrix weights, a full compatibility, five boxes
    (one of 320 pixels, more than a block's threads, overlapping the others), three iterations."""
    labels, height, width = 5, 16, 20
    local = np.random.default_rng(7)
    unary = local.normal(0, 3, (labels, height, width)).astype(np.float32)
    grad = local.normal(0, 1, unary.shape).astype(np.float32)
    image = np.ascontiguousarray(colour_ramps(height, width).transpose(2, 0, 1), dtype=np.float32)
    weights = [(np.eye(labels) * s + local.uniform(0, 0.3, (labels, labels))).astype(np.float32) for s in (3.0, 5.0)]
    compat = (-np.eye(labels) + local.uniform(-0.1, 0.1, (labels, labels))).astype(np.float32)
    boxes = np.array([[0, 0, 19, 15], [2, 3, 9, 8], [5, 5, 5, 5], [10, 0, 19, 4], [1, 9, 14, 15]], np.float32)
    classes, scores = np.array([1, 2, 4, 1, 3], np.int64), np.array([0.6, 0.9, 0.3, 0.0, 0.75], np.float32)
    grad_scores = np.array([0.5, -1.0, 2.0, 0.3, -0.7], np.float32)
    results = []
    for on_gpu in (False, True):
        recalibrated = np.full(5, np.nan, np.float32)
        grad_x, grad_y = np.full(1, np.nan, np.float32), np.full(1, np.nan, np.float32)
        detections = n.DetectionPotential(
            boxes=boxes, labels=classes, scores=scores, detection_x=scalar(1.3), detection_y=scalar(0.8),
            score_ceiling=1.0, epsilon=1e-4, recalibrated=recalibrated, grad_recalibrated=grad_scores,
            grad_detection_x=grad_x, grad_detection_y=grad_y)
        kernels = [n.Kernel(3.0, 0.0, weights[0]), n.Kernel(20.0, 13.0, weights[1])]
        problem = n.Problem(labels, height, width, image, kernels, compat=compat, normalization="symmetric",
                            iterations=3, output=n.Output.LOGITS, threads=0, detection_potential=detections)
        if on_gpu:
            gradients = backward_cuda(problem, unary, grad, weights, compat)
        else:
            gradients = problem.backward(unary, grad, [True, True], True)
        results.append((*gradients, grad_x, grad_y, recalibrated))
    (cpu_unary, cpu_weights, cpu_compat, cpu_x, cpu_y, cpu_scores), (gpu_unary, gpu_weights, gpu_compat, gpu_x, gpu_y,
                                                                      gpu_scores) = results
    check("detection potential backward: unary", cpu_unary, gpu_unary, 1e-4)
    check("  weights", np.stack(cpu_weights), np.stack(gpu_weights), 1e-4)
    check("  compatibility", cpu_compat, gpu_compat, 1e-4)
    check("  w_x", cpu_x, gpu_x, 1e-4)
    check("  w_y", cpu_y, gpu_y, 1e-4)
    check("  recalibrated scores", cpu_scores, gpu_scores, 1e-5)


def main() -> int:
    global failures
    if not n.cuda_compiled():
        sys.exit("parity.py: this library has no CUDA entry points")
    densecrf = [(3.0, 0.0, scalar(3.0)), (20.0, 13.0, scalar(10.0))]
    # the common model (Potts, scalar weights), one label tile or two, both normalisations and outputs;
    # 47x50 has more pixels than one sweep of the emulated grid (8 blocks of 256 threads)
    for labels, (height, width), normalization, output in [
        (1, (19, 23), "after", n.Output.PROBABILITIES),
        (21, (21, 37), "symmetric", n.Output.LOGITS),
        (40, (17, 18), "after", n.Output.PROBABILITIES),
        (2, (47, 50), "after", n.Output.PROBABILITIES),
    ]:
        unary = rng.normal(0, 2, (labels, height, width)).astype(np.float32)
        problem = make_problem(labels, colour_ramps(height, width), densecrf, normalization=normalization, output=output)
        check(f"Potts L={labels} {height}x{width} {normalization}", problem.forward(unary), forward_cuda(problem, unary), 1e-5)
    # a gentle gradient under densecrf's wide bilateral kernel: most entries belong to vertices of more
    # than 64 entries, which the splat sums in whole chunks before adding them up per vertex
    ys, xs = np.mgrid[0:40, 0:50]
    gentle = np.stack([100 + xs, 120 + 0 * xs, 90 + ys], -1).astype(np.uint8)
    unary = rng.normal(0, 2, (21, 40, 50)).astype(np.float32)
    problem = make_problem(21, gentle, [(3.0, 0.0, scalar(3.0)), (80.0, 13.0, scalar(10.0))])
    check("large vertices (chunked splat)", problem.forward(unary), forward_cuda(problem, unary), 1e-5)
    # colour noise with a small theta_beta: a vertex for nearly every entry, so the hash table fills
    # (a modest weight: on noise a strong one amplifies rounding differences each iteration)
    noise = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    unary = rng.normal(0, 2, (21, 40, 40)).astype(np.float32)
    problem = make_problem(21, noise, [(3.0, 0.0, scalar(3.0)), (20.0, 2.0, scalar(3.0))])
    first = forward_cuda(problem, unary)
    check("colour noise", problem.forward(unary), first, 1e-5)
    check("colour noise, run again: the same bits", first, forward_cuda(problem, unary), 0.0)
    unary = rng.normal(0, 2, (6, 22, 35)).astype(np.float32)
    problem = make_problem(6, colour_ramps(22, 35), densecrf[:1])
    check("spatial kernel alone", problem.forward(unary), forward_cuda(problem, unary), 1e-5)
    # the general model and the gradients
    labels, height, width = 5, 18, 27
    unary = rng.normal(0, 2, (labels, height, width)).astype(np.float32)
    weights = [rng.normal(0, 1, (labels, labels)).astype(np.float32) for _ in range(2)]
    compat = rng.normal(0, 1, (labels, labels)).astype(np.float32)
    grad = rng.normal(size=unary.shape).astype(np.float32)
    problem = make_problem(labels, colour_ramps(height, width), [(3.0, 0.0, weights[0]), (20.0, 30.0, weights[1])],
                           compat=compat, normalization="symmetric", output=n.Output.LOGITS)
    check("matrix weights, full compatibility", problem.forward(unary), forward_cuda(problem, unary), 1e-4)
    expected = problem.backward(unary, grad, [True, True], True)
    got = backward_cuda(problem, unary, grad, weights, compat)
    check("  its gradient: unary", expected[0], got[0], 1e-4)
    check("  its gradient: weights", np.stack(expected[1]), np.stack(got[1]), 1e-4)
    check("  its gradient: compatibility", expected[2], got[2], 1e-4)
    labels = 21
    unary = rng.normal(0, 2, (labels, height, width)).astype(np.float32)
    grad = rng.normal(size=unary.shape).astype(np.float32)
    problem = make_problem(labels, colour_ramps(height, width), densecrf, output=n.Output.LOGITS)
    expected = problem.backward(unary, grad, [True, True], False)
    got = backward_cuda(problem, unary, grad, [densecrf[0][2], densecrf[1][2]], None)
    check("Potts gradient: unary", expected[0], got[0], 1e-4)
    check("Potts gradient: weights", np.concatenate(expected[1]), np.concatenate(got[1]), 1e-4)
    # a diagonal compatibility with scalar weights: P's diagonal alone gives both parameter gradients
    compat = rng.uniform(-2, 0, labels).astype(np.float32)
    problem = make_problem(labels, colour_ramps(height, width), densecrf, compat=compat, output=n.Output.LOGITS)
    expected = problem.backward(unary, grad, [True, True], True)
    got = backward_cuda(problem, unary, grad, [densecrf[0][2], densecrf[1][2]], compat)
    check("diagonal compatibility gradient: unary", expected[0], got[0], 1e-4)
    check("  weights", np.concatenate(expected[1]), np.concatenate(got[1]), 1e-4)
    check("  compatibility", expected[2], got[2], 1e-4)
    # one pixel: the L x L parameter sums dominate the backward workspace only where a matrix reads them
    sizes = {(kind, labels): n.Problem(labels, 1, 1, None, [n.Kernel(3.0, 0.0, weight)], compat=None,
                                       normalization="after", iterations=1, output=n.Output.LOGITS, threads=0)
             .workspace_size_cuda(n.Pass.BACKWARD)
             for labels in (1024, 2048)
             for kind, weight in (("scalar", scalar(3.0)), ("matrix", np.eye(labels, dtype=np.float32)))}
    ok = (sizes["scalar", 2048] < 2.5 * sizes["scalar", 1024] and sizes["matrix", 2048] > 3.5 * sizes["matrix", 1024]
          and sizes["scalar", 2048] < sizes["matrix", 2048] / 100)
    print(f"{'ok' if ok else 'MISMATCH'}  backward workspace, one pixel, L 1024 -> 2048: {sizes}")
    failures += not ok
    # the detection potential, through the host-array entry (its copies are the emulator's too)
    labels, count = 6, 5
    unary = rng.normal(0, 3, (labels, height, width)).astype(np.float32)
    x1, y1 = rng.integers(0, width, count), rng.integers(0, height, count)
    boxes = np.stack([x1, y1, np.minimum(width - 1, x1 + 9), np.minimum(height - 1, y1 + 7)], 1).astype(np.float32)
    detection_labels = rng.integers(1, labels, count).astype(np.int64)
    scores = rng.uniform(0.05, 1.0, count).astype(np.float32)
    weights = (np.eye(labels) * 4.0 + rng.uniform(0, 0.3, (labels, labels))).astype(np.float32)
    results = []
    for on_gpu in (False, True):
        recalibrated = np.full(count, np.nan, np.float32)
        detections = n.DetectionPotential(boxes=boxes, labels=detection_labels, scores=scores,
                                  detection_x=np.array([1.3], np.float32), detection_y=np.array([0.8], np.float32),
                                  score_ceiling=1.0, epsilon=1e-4, recalibrated=recalibrated)
        image = np.ascontiguousarray(colour_ramps(height, width).transpose(2, 0, 1), dtype=np.float32)
        problem = n.Problem(labels, height, width, image, [n.Kernel(3.0, 0.0, weights), n.Kernel(20.0, 13.0, weights)],
                            compat=(-np.eye(labels)).astype(np.float32), normalization="after", iterations=3,
                            output=n.Output.LOGITS, threads=0, detection_potential=detections)
        logits = problem.forward_from_host(unary, 0) if on_gpu else problem.forward(unary)
        results.append((logits, recalibrated))
    check("detection potential: logits", results[0][0], results[1][0], 1e-5)
    check("detection potential: recalibrated scores", results[0][1], results[1][1], 1e-5)
    # a lattice that cannot be built: an error on both, the CUDA one naming the kernel. Its entries
    # stand in as keys, so its neighbour lookups ask for arbitrary keys (the table's empty mark too)
    stripes = np.full((16, 16, 3), 200, np.uint8)
    stripes[::2] = 0
    problem = make_problem(2, stripes, [densecrf[0], (1.0, 1e-30, densecrf[1][2])])
    unary = rng.normal(0, 2, (2, 16, 16)).astype(np.float32)
    out = np.zeros_like(unary)  # the CUDA output must come back NaN, not zeros
    buffer, nbytes = workspace(problem, n.Pass.FORWARD)
    errors = []
    for run in (lambda: problem.forward(unary),
                lambda: problem.forward_cuda(on_device(unary), on_device(out), buffer.ctypes.data, nbytes, 0)):
        try:
            run()
            errors.append("no error")
        except DynsegError as error:
            errors.append(str(error))
    ok = all("out of range" in e for e in errors) and "kernels[1]" in errors[1] and bool(np.isnan(out).all())
    print(f"{'ok' if ok else 'MISMATCH'}  unbuildable lattice, NaN out {np.isnan(out).all()}: {' | '.join(errors)}")
    failures += not ok
    # with the detection potential, the recalibrated scores come back NaN as the logits do
    recalibrated = np.zeros(1, np.float32)
    potential = n.DetectionPotential(boxes=np.array([[1, 1, 8, 8]], np.float32), labels=np.array([1], np.int64),
                                     scores=np.array([0.7], np.float32), detection_x=np.array([1.0], np.float32),
                                     detection_y=np.array([1.0], np.float32), score_ceiling=1.0, epsilon=1e-4,
                                     recalibrated=recalibrated)
    planar = np.ascontiguousarray(stripes.transpose(2, 0, 1), dtype=np.float32)
    failing = n.Problem(2, 16, 16, planar, [n.Kernel(1.0, 1e-30, np.ones(1, np.float32))], compat=None,
                        normalization="after", iterations=2, output=n.Output.LOGITS, threads=0,
                        detection_potential=potential)
    logits = np.zeros_like(unary)
    buffer, nbytes = workspace(failing, n.Pass.FORWARD)
    try:
        failing.forward_cuda(on_device(unary), on_device(logits), buffer.ctypes.data, nbytes, 0)
    except DynsegError:
        pass
    ok = bool(np.isnan(logits).all() and np.isnan(recalibrated).all())
    print(f"{'ok' if ok else 'MISMATCH'}  unbuildable lattice with detections: NaN logits {np.isnan(logits).all()}, "
          f"NaN scores {np.isnan(recalibrated).all()}")
    failures += not ok
    # bad detections in device memory, which the CPU call refuses: a negative score and a label out of
    # range make their own scores and the logits inside their boxes NaN, and leave the rest finite
    bad_scores = np.array([0.7, -0.5, 0.6], np.float32)
    bad_labels = np.array([1, 1, 7], np.int64)
    bad_boxes = np.array([[0, 0, 3, 3], [6, 0, 9, 3], [0, 10, 3, 13]], np.float32)
    recalibrated = np.zeros(3, np.float32)
    potential = n.DetectionPotential(boxes=bad_boxes, labels=bad_labels, scores=bad_scores,
                                     detection_x=np.array([1.0], np.float32), detection_y=np.array([1.0], np.float32),
                                     score_ceiling=1.0, epsilon=1e-4, recalibrated=recalibrated)
    problem = n.Problem(2, 16, 16, None, [n.Kernel(3.0, 0.0, np.ones(1, np.float32))], compat=None,
                        normalization="after", iterations=1, output=n.Output.LOGITS, threads=0,
                        detection_potential=potential)
    unary = rng.normal(0, 2, (2, 16, 16)).astype(np.float32)
    logits = np.zeros_like(unary)
    buffer, nbytes = workspace(problem, n.Pass.FORWARD)
    inside = np.zeros((16, 16), bool)
    inside[0:4, 6:10] = inside[10:14, 0:4] = True
    refused, reported = [], []
    try:
        problem.forward(unary)
    except DynsegError as error:
        refused.append(str(error))
    try:  # the CUDA call cannot refuse them first, but reports the NaN it wrote after the fact
        problem.forward_cuda(on_device(unary), on_device(logits), buffer.ctypes.data, nbytes, 0)
    except DynsegError as error:
        reported.append(str(error))
    ok = (np.isnan(recalibrated).tolist() == [False, True, True] and bool(np.isnan(logits[:, inside]).all())
          and bool(np.isfinite(logits[:, ~inside]).all()) and len(refused) == 1 and "scores[1]" in refused[0]
          and len(reported) == 1 and "NaN or infinity" in reported[0] and "negative detection score" in reported[0])
    print(f"{'ok' if ok else 'MISMATCH'}  negative score and label out of range: NaN scores "
          f"{np.isnan(recalibrated).tolist()}, NaN in their boxes {np.isnan(logits[:, inside]).all()}; CPU: {refused}; "
          f"CUDA: {reported}")
    failures += not ok
    # a NaN in the device unary, and finite inputs that overflow float32 (forward, then backward): the
    # CPU calls refuse them, the CUDA calls report the results they wrote as NaN or infinity
    unary = rng.normal(0, 2, (2, 16, 16)).astype(np.float32)
    with_nan = unary.copy()
    with_nan[1, 5, 7] = np.nan
    # (name, unary, weight, grad_logits for a backward pass, whether the host-array call runs it too)
    cases = [("a NaN in the unary, forward", with_nan, scalar(3.0), None, False),
             ("an overflow, forward", unary * 1e37, scalar(3e38), None, True),
             ("an overflow, backward", unary, scalar(3.0), np.full_like(unary, 3e38), False)]
    for name, values, weight, grad_logits, from_host in cases:
        # two kernels of that weight: their messages add up past float32's largest value
        problem = n.Problem(2, 16, 16, None, [n.Kernel(3.0, 0.0, weight), n.Kernel(5.0, 0.0, weight)], compat=None,
                            normalization="after", iterations=2, output=n.Output.LOGITS, threads=0)
        errors = []
        for run in ((lambda: problem.forward(values)) if grad_logits is None else
                    (lambda: problem.backward(values, grad_logits, [True, True], False)),
                    (lambda: forward_cuda(problem, values)) if grad_logits is None else
                    (lambda: backward_cuda(problem, values, grad_logits, [weight, weight], None))):
            try:
                run()
                errors.append("no error")
            except DynsegError as error:
                errors.append(str(error))
        ok = "no error" not in errors[0] and "NaN or infinity" in errors[1]
        if from_host:  # the host-array call names it as the CPU call does
            try:
                problem.forward_from_host(values, 0)
                errors.append("no error")
            except DynsegError as error:
                errors.append(str(error))
            ok = ok and errors[2] == errors[0]
        print(f"{'ok' if ok else 'MISMATCH'}  {name}: {' | '.join(errors)}")
        failures += not ok
    # a NaN in the device image: reported as an input that made the results NaN, not as lattice keys too
    # wide for 63 bits (its coordinates once clamped to -2^30 widened every key)
    for channels in (1, 3):
        image = np.ascontiguousarray(colour_ramps(8, 9).transpose(2, 0, 1)[:channels], dtype=np.float32)
        image[0, 3, 4] = np.nan
        problem = n.Problem(2, 8, 9, image, [n.Kernel(20.0, 13.0, scalar(3.0))], compat=None, normalization="after",
                            iterations=1, output=n.Output.LOGITS, threads=0)
        try:
            forward_cuda(problem, rng.normal(0, 1, (2, 8, 9)).astype(np.float32))
            reported = "no error"
        except DynsegError as error:
            reported = str(error)
        ok = "NaN or infinity" in reported and "non-finite value" in reported
        print(f"{'ok' if ok else 'MISMATCH'}  a NaN in the device image, {channels} channel(s): {reported[:90]}")
        failures += not ok

    # The zero-copy entry (sdk.crf.dense_crf_cuda) on CudaArrays, three calls with different weights:
    # each as dense_crf computes it, on one workspace and one weights buffer that the thread keeps.
    from dynseg.sdk import dense_crf
    from dynseg.sdk.crf import CudaArray, dense_crf_cuda

    unary = rng.normal(0, 2, (4, 30, 41)).astype(np.float32)
    image = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    device_unary, device_image = CudaArray(unary.shape), CudaArray((3, 30, 41))
    n.copy_to_device(device_unary.__cuda_array_interface__["data"][0], unary)
    n.copy_to_device(device_image.__cuda_array_interface__["data"][0], image.transpose(2, 0, 1).astype(np.float32))
    buffers = []
    for weight in (10.0, 4.0, 7.0):
        q = dense_crf_cuda(device_unary, device_image, bilateral=(80.0, 13.0, weight))
        got = np.empty_like(unary)
        n.copy_from_device(got, q.__cuda_array_interface__["data"][0])
        check(f"dense_crf_cuda, bilateral weight {weight}", dense_crf(unary, image, bilateral=(80.0, 13.0, weight)),
              got, 1e-5)
        buffers.append(sorted((key, id(buffer)) for key, buffer in n._local.cuda_buffers.items()))
    ok = buffers[0] == buffers[1] == buffers[2] and len(buffers[0]) == 2
    print(f"{'ok' if ok else 'MISMATCH'}  dense_crf_cuda keeps its workspace and weights buffers: {buffers[0]}")
    failures += not ok

    # Edges that mutation testing of the CUDA kernels found no case above reaching, one iteration each.
    # A flat image under a wide kernel: every vertex, the first two (pixel 0's) included, owns whole
    # chunks, which place_chunks lays out after those of the vertices before it
    unary = rng.normal(0, 2, (3, 16, 16)).astype(np.float32)
    problem = make_problem(3, np.full((16, 16, 3), 120, np.uint8), [(80.0, 13.0, scalar(5.0))], iterations=1)
    check("flat image: every vertex in whole chunks", problem.forward(unary), forward_cuda(problem, unary), 1e-5)
    # a 5x4 spatial lattice whose packed keys fill their coordinates' bit fields: a neighbour below a
    # coordinate's low end would borrow from the next coordinate's bits and alias a vertex that exists
    unary = rng.normal(0, 2, (2, 5, 4)).astype(np.float32)
    problem = n.Problem(2, 5, 4, None, [n.Kernel(1.5, 0.0, scalar(3.0))], compat=None, normalization="after",
                        iterations=1, output=n.Output.LOGITS, threads=0)
    check("5x4 spatial lattice: no neighbour below the key range", problem.forward(unary), forward_cuda(problem, unary),
          1e-5)
    # one grey channel (d = 3) and 13 channels (d = 15): the embedding's unstaged path, for a d other
    # than 2 and 5; the 13 channels' keys take exactly the 63 bits a key may have (the C++ tests' bound)
    unary = rng.normal(0, 2, (3, 19, 23)).astype(np.float32)
    problem = make_problem(3, colour_ramps(19, 23)[..., 2:], [(5.0, 10.0, scalar(5.0))], iterations=1)
    check("one colour channel", problem.forward(unary), forward_cuda(problem, unary), 1e-5)
    ys, xs = np.mgrid[0:4, 0:5]
    thirteen = np.stack([10.0 * c + xs + 2 * ys for c in range(13)], -1).astype(np.float32)
    unary = rng.normal(0, 2, (3, 4, 5)).astype(np.float32)
    problem = make_problem(3, thirteen, [(1e4, 5e4, scalar(3.0))], output=n.Output.LOGITS, iterations=1)
    check("13 colour channels, 63-bit keys", problem.forward(unary), forward_cuda(problem, unary), 1e-5)
    # Potts with scalar and matrix weights mixed: the kernels filter one at a time, the matrix message
    # adds to the first kernel's (not to U) and the last kernel's slice adds to both
    labels, height, width = 5, 9, 11
    unary = rng.normal(0, 2, (labels, height, width)).astype(np.float32)
    matrix = rng.normal(0, 1, (labels, labels)).astype(np.float32)
    problem = make_problem(labels, colour_ramps(height, width),
                           [(3.0, 0.0, scalar(2.0)), (20.0, 30.0, matrix), (10.0, 20.0, scalar(1.5))],
                           output=n.Output.LOGITS, iterations=1)
    check("Potts, scalar and matrix weights mixed", problem.forward(unary), forward_cuda(problem, unary), 1e-5)
    # the gradients of a matrix weight under a diagonal compatibility, on 391 pixels: two pixel chunks
    # of 196 for the parameter sums, the last one short
    labels, height, width = 5, 17, 23
    unary = rng.normal(0, 2, (labels, height, width)).astype(np.float32)
    grad = rng.normal(size=unary.shape).astype(np.float32)
    kernels = [(20.0, 30.0, rng.normal(0, 1, (labels, labels)).astype(np.float32)), (3.0, 0.0, scalar(2.0))]
    compat = rng.uniform(-2, 0, labels).astype(np.float32)
    problem = make_problem(labels, colour_ramps(height, width), kernels, compat=compat, output=n.Output.LOGITS,
                           iterations=1)
    expected = problem.backward(unary, grad, [True, True], True)
    got = backward_cuda(problem, unary, grad, [k[2] for k in kernels], compat)
    check("matrix weight, diagonal compatibility, short last chunk: unary", expected[0], got[0], 1e-4)
    check("  weights", np.concatenate([w.ravel() for w in expected[1]]), np.concatenate([w.ravel() for w in got[1]]),
          1e-4)
    check("  compatibility", expected[2], got[2], 1e-4)
    # a scalar weight under a full compatibility of 12 labels: P's 144 entries, more than half a
    # block, in the scalar weight's reduction tree
    labels = 12
    unary = rng.normal(0, 2, (labels, 8, 9)).astype(np.float32)
    grad = rng.normal(size=unary.shape).astype(np.float32)
    compat = rng.normal(0, 1, (labels, labels)).astype(np.float32)
    problem = make_problem(labels, colour_ramps(8, 9), [densecrf[1]], compat=compat, output=n.Output.LOGITS,
                           iterations=1)
    expected = problem.backward(unary, grad, [True], True)
    got = backward_cuda(problem, unary, grad, [densecrf[1][2]], compat)
    check("scalar weight, full compatibility, 12 labels: unary", expected[0], got[0], 1e-4)
    check("  weight", expected[1][0], got[1][0], 1e-4)
    check("  compatibility", expected[2], got[2], 1e-4)
    # a box of 320 pixels, more than the block's threads, whose Q sum takes the whole reduction tree
    results = []
    for on_gpu in (False, True):
        recalibrated = np.full(2, np.nan, np.float32)
        detections = n.DetectionPotential(boxes=np.array([[0, 0, 19, 15], [2, 3, 9, 8]], np.float32),
                                          labels=np.array([1, 2], np.int64), scores=np.array([0.6, 0.9], np.float32),
                                          detection_x=np.array([1.3], np.float32),
                                          detection_y=np.array([0.8], np.float32), score_ceiling=1.0, epsilon=1e-4,
                                          recalibrated=recalibrated)
        problem = n.Problem(3, 16, 20, None, [n.Kernel(3.0, 0.0, scalar(3.0))], compat=None, normalization="after",
                            iterations=1, output=n.Output.LOGITS, threads=0, detection_potential=detections)
        unary = np.random.default_rng(3).normal(0, 3, (3, 16, 20)).astype(np.float32)
        results.append((problem.forward_from_host(unary, 0) if on_gpu else problem.forward(unary), recalibrated))
    check("a box larger than a block: logits", results[0][0], results[1][0], 1e-5)
    check("  recalibrated scores", results[0][1], results[1][1], 1e-5)
    detection_backward()
    print("all match" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
