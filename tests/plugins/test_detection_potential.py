"""The kernel library's detection potential (dynseg_detections in plugins/include/dynseg_crf.h): one
native call of T iterations, forward and backward, against the readable definition
(`semantic_mean_field_reference`: one native mean-field step per iteration plus the detection term in
torch, differentiated by autograd), and the library's validation of the detections."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from dynseg.sdk import InvalidArgumentError, _native
from dynseg.trainer.model.semantic_crf import SemanticCRFConfig, semantic_mean_field, semantic_mean_field_reference

THETAS = (3.0, 20.0, 13.0)  # spatial xy, bilateral xy, bilateral colour


def random_detections(rng: np.random.Generator, count: int, labels: int, height: int, width: int):
    """Integer-valued inclusive boxes inside the image (some one pixel wide, some the whole image),
    labels in 1..L-1, scores in (0, 1]."""
    x1 = rng.integers(0, width, count)
    y1 = rng.integers(0, height, count)
    x2 = np.minimum(width - 1, x1 + rng.integers(0, width, count))
    y2 = np.minimum(height - 1, y1 + rng.integers(0, height, count))
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    if count > 1:
        boxes[1] = (0, 0, width - 1, height - 1)
    return boxes, rng.integers(1, labels, count).astype(np.int64), rng.uniform(0.05, 1.0, count).astype(np.float32)


def native_problem(unary, image, spatial, bilateral, compat, detections, iterations, threads=0):
    labels, height, width = unary.shape
    return _native.Problem(
        labels, height, width, image,
        [_native.Kernel(THETAS[0], 0.0, spatial), _native.Kernel(THETAS[1], THETAS[2], bilateral)],
        compat=compat, normalization="after", iterations=iterations, output=_native.Output.LOGITS, threads=threads,
        detection_potential=detections,
    )


def case(seed: int, labels: int, height: int, width: int, count: int, smooth_image, field_unary):
    rng = np.random.default_rng(seed)
    image = np.ascontiguousarray(smooth_image(height, width, seed=seed).transpose(2, 0, 1), dtype=np.float32)
    unary = np.ascontiguousarray(3.0 * field_unary(labels, height, width, seed=seed), dtype=np.float32)
    spatial = (np.eye(labels) * 3.0 + rng.uniform(0, 0.3, (labels, labels))).astype(np.float32)
    bilateral = (np.eye(labels) * 5.0 + rng.uniform(0, 0.3, (labels, labels))).astype(np.float32)
    compat = (-np.eye(labels) + rng.uniform(-0.1, 0.1, (labels, labels))).astype(np.float32)
    boxes, classes, scores = random_detections(rng, count, labels, height, width)
    weights = (np.float32(rng.uniform(0.5, 2.0)), np.float32(rng.uniform(0.5, 2.0)))
    return image, unary, spatial, bilateral, compat, boxes, classes, scores, weights


def run_native(image, unary, spatial, bilateral, compat, boxes, classes, scores, weights, iterations, threads=0,
               score_ceiling=1.0, epsilon=1e-4):
    recalibrated = np.full(len(scores), np.nan, np.float32)
    detections = _native.DetectionPotential(
        boxes=boxes, labels=classes, scores=scores, detection_x=np.array([weights[0]], np.float32),
        detection_y=np.array([weights[1]], np.float32), score_ceiling=score_ceiling, epsilon=epsilon,
        recalibrated=recalibrated,
    )
    logits = native_problem(unary, image, spatial, bilateral, compat, detections, iterations, threads).forward(unary)
    return logits, recalibrated


def run_reference(image, unary, spatial, bilateral, compat, boxes, classes, scores, weights, iterations,
                  score_ceiling=1.0, epsilon=1e-4):
    config = SemanticCRFConfig(iterations=iterations, theta_spatial=THETAS[0], theta_bilateral_xy=THETAS[1],
                               theta_bilateral_rgb=THETAS[2], score_ceiling=score_ceiling, epsilon=epsilon)
    t = torch.from_numpy
    with torch.no_grad():
        logits, recalibrated = semantic_mean_field_reference(
            t(unary), t(image), t(boxes), t(classes), t(scores), spatial_weight=t(spatial),
            bilateral_weight=t(bilateral), compatibility=t(compat), detection_x=torch.tensor(weights[0]),
            detection_y=torch.tensor(weights[1]), config=config,
        )
    return logits.numpy(), recalibrated.numpy()


@pytest.mark.parametrize(
    "labels, height, width, count, iterations",
    [(2, 17, 23, 1, 1), (5, 40, 31, 3, 5), (21, 64, 48, 7, 5), (9, 33, 47, 20, 3), (4, 1, 30, 2, 2)],
)
def test_one_native_call_matches_the_trainers_iteration_by_iteration_definition(
    labels, height, width, count, iterations, smooth_image, field_unary
):
    arrays = case(labels * 7 + count, labels, height, width, count, smooth_image, field_unary)
    logits, recalibrated = run_native(*arrays, iterations)
    expected_logits, expected_scores = run_reference(*arrays, iterations)
    scale = np.abs(expected_logits).max()
    assert np.abs(logits - expected_logits).max() <= 1e-5 * scale
    np.testing.assert_allclose(recalibrated, expected_scores, rtol=0, atol=1e-5)
    # the potential did something: without it the logits differ by more than rounding
    plain = native_problem(arrays[1], arrays[0], arrays[2], arrays[3], arrays[4], None, iterations).forward(arrays[1])
    assert np.abs(plain - logits).max() > 1e-2


def test_score_ceiling_and_epsilon_reach_the_prior(smooth_image, field_unary):
    arrays = case(3, 4, 24, 24, 3, smooth_image, field_unary)
    logits, recalibrated = run_native(*arrays, 3, score_ceiling=0.5, epsilon=0.25)
    expected_logits, expected_scores = run_reference(*arrays, 3, score_ceiling=0.5, epsilon=0.25)
    assert np.abs(logits - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()
    np.testing.assert_allclose(recalibrated, expected_scores, rtol=0, atol=1e-5)


def test_the_result_is_the_same_bits_for_any_thread_count(smooth_image, field_unary):
    arrays = case(11, 6, 45, 38, 9, smooth_image, field_unary)
    one = run_native(*arrays, 4, threads=1)
    many = run_native(*arrays, 4, threads=0)
    assert np.array_equal(one[0], many[0]) and np.array_equal(one[1], many[1])


def test_zero_iterations_leave_the_unary_and_the_scores(smooth_image, field_unary):
    arrays = case(5, 3, 12, 12, 2, smooth_image, field_unary)
    logits, recalibrated = run_native(*arrays, 0)
    assert np.array_equal(logits, arrays[1])
    assert np.array_equal(recalibrated, arrays[7])


def test_float_box_corners_select_the_pixels_between_them(smooth_image, field_unary):
    """Columns x1 <= x <= x2 of a fractional box are those of the integer box inside it."""
    arrays = list(case(8, 3, 20, 20, 1, smooth_image, field_unary))
    arrays[5] = np.array([[2.5, 3.2, 9.9, 11.0]], np.float32)
    fractional = run_native(*arrays, 2)
    arrays[5] = np.array([[3.0, 4.0, 9.0, 11.0]], np.float32)
    integer = run_native(*arrays, 2)
    assert np.array_equal(fractional[0], integer[0]) and np.array_equal(fractional[1], integer[1])


def test_a_box_reaching_past_the_image_counts_only_its_pixels_inside(smooth_image, field_unary):
    # the part outside is ignored: the potential (n_d above all) is that of the box clipped to the image
    arrays = list(case(9, 3, 14, 17, 2, smooth_image, field_unary))
    arrays[5] = np.array([[-3.0, 5.0, 30.0, 40.0], [6.0, -2.5, 16.0, 13.0]], np.float32)
    past = run_native(*arrays, 2)
    arrays[5] = np.array([[0.0, 5.0, 16.0, 13.0], [6.0, 0.0, 16.0, 13.0]], np.float32)
    inside = run_native(*arrays, 2)
    assert np.array_equal(past[0], inside[0]) and np.array_equal(past[1], inside[1])


def test_without_kernels_the_detection_potential_is_the_whole_message(smooth_image, field_unary):
    # the trainer's definition with zero kernel weights: L^t = U + the detections' pixel terms, from U afresh
    image, unary, spatial, bilateral, compat, boxes, classes, scores, weights = case(
        4, 4, 18, 21, 3, smooth_image, field_unary)
    zero = np.zeros_like(spatial)
    expected_logits, expected_scores = run_reference(image, unary, zero, zero, compat, boxes, classes, scores,
                                                     weights, 3)
    for threads in (1, 0):
        recalibrated = np.full(len(scores), np.nan, np.float32)
        detections = _native.DetectionPotential(
            boxes=boxes, labels=classes, scores=scores, detection_x=np.array([weights[0]], np.float32),
            detection_y=np.array([weights[1]], np.float32), score_ceiling=1.0, epsilon=1e-4,
            recalibrated=recalibrated)
        logits = _native.Problem(4, 18, 21, None, [], compat=None, normalization="after", iterations=3,
                                 output=_native.Output.LOGITS, threads=threads,
                                 detection_potential=detections).forward(unary)
        assert np.abs(logits - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()
        np.testing.assert_allclose(recalibrated, expected_scores, rtol=0, atol=1e-5)


def released_schedule(unary, boxes, classes, scores, weights, iterations, score_ceiling=1.0, epsilon=1e-4):
    """The detection potential without pairwise kernels, transcribed in float64 from the schedule of the
    authors' released code (caffe-tvg's mean-field iteration): iteration t's pixel update reads the belief
    Q(Y_d) iteration t-1 left (the prior (1 - p_d, p_d) first), its Y update reads Q^{t-1}."""
    unary = unary.astype(np.float64)
    w_x, w_y = float(weights[0]), float(weights[1])
    priors = np.minimum(scores.astype(np.float64) / score_ceiling, 1.0 - epsilon)
    beliefs = [(1.0 - p, p) for p in priors]
    logits = unary
    for _ in range(iterations):
        q = np.exp(logits - logits.max(axis=0))
        q /= q.sum(axis=0)
        term = np.zeros_like(unary)
        updated = []
        for (x1, y1, x2, y2), label, score, prior, (q0, q1) in zip(boxes.astype(int), classes, scores, priors,
                                                                    beliefs):
            box = (slice(y1, y2 + 1), slice(x1, x2 + 1))
            x = w_x * score
            term[(slice(None),) + box] -= x * q1
            term[(label,) + box] += x * (q1 - q0)
            agree, pixels = q[(label,) + box].sum(), (y2 - y1 + 1) * (x2 - x1 + 1)
            y = w_y * score / pixels
            a = np.array([(1.0 - prior) - y * agree, prior - y * (pixels - agree)])
            updated.append(tuple(np.exp(a - a.max()) / np.exp(a - a.max()).sum()))
        beliefs = updated
        logits = unary + term
    return logits, np.array([q1 for _, q1 in beliefs]) if iterations else scores


@pytest.mark.parametrize("iterations", [1, 2, 4])
def test_the_pixel_update_reads_the_belief_the_previous_iteration_left(iterations, smooth_image, field_unary):
    image, unary, spatial, bilateral, compat, boxes, classes, scores, weights = case(
        12, 5, 22, 19, 4, smooth_image, field_unary)
    recalibrated = np.full(len(scores), np.nan, np.float32)
    detections = _native.DetectionPotential(
        boxes=boxes, labels=classes, scores=scores, detection_x=np.array([weights[0]], np.float32),
        detection_y=np.array([weights[1]], np.float32), score_ceiling=1.0, epsilon=1e-4, recalibrated=recalibrated)
    logits = _native.Problem(5, 22, 19, None, [], compat=None, normalization="after", iterations=iterations,
                             output=_native.Output.LOGITS, threads=0, detection_potential=detections).forward(unary)
    expected_logits, expected_scores = released_schedule(unary, boxes, classes, scores, weights, iterations)
    assert np.abs(logits - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()
    np.testing.assert_allclose(recalibrated, expected_scores, rtol=0, atol=1e-5)


def test_one_thread_with_potts_and_scalar_weights_keeps_the_detection_potential(smooth_image, field_unary):
    # what one thread streams when there are no detections: the potential must take it off that path
    image, unary, _, _, _, boxes, classes, scores, weights = case(6, 5, 24, 30, 4, smooth_image, field_unary)
    spatial, bilateral = np.array([3.0], np.float32), np.array([5.0], np.float32)
    results = [run_native(image, unary, spatial, bilateral, None, boxes, classes, scores, weights, 3, threads=threads)
               for threads in (1, 0)]
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
    plain = native_problem(unary, image, spatial, bilateral, None, None, 3, threads=1).forward(unary)
    assert np.abs(plain - results[0][0]).max() > 1e-2


def bad(arrays, field: str, value):
    arrays = list(arrays)
    index = {"boxes": 5, "labels": 6, "scores": 7}[field]
    arrays[index] = value
    return arrays


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("boxes", np.array([[30.0, 0.0, 40.0, 5.0], [0, 0, 1, 1]], np.float32), r"boxes\[0\].*holds no pixel"),
        ("boxes", np.array([[0.0, 0.0, 5.0, 5.0], [4.0, 4.0, 2.0, 8.0]], np.float32), r"boxes\[1\].*holds no pixel"),
        ("boxes", np.array([[0.0, np.nan, 5.0, 5.0], [0, 0, 1, 1]], np.float32), r"boxes\[0\] holds a non-finite"),
        ("boxes", np.array([[0.2, 0.0, 0.8, 5.0], [0, 0, 1, 1]], np.float32), r"boxes\[0\].*holds no pixel"),
        ("labels", np.array([1, 3], np.int64), r"labels\[1\] must be in 0\.\.2, got 3"),
        ("labels", np.array([-1, 1], np.int64), r"labels\[0\] must be in 0\.\.2"),
        ("scores", np.array([0.5, np.inf], np.float32), r"scores\[1\] must be finite and >= 0, got inf"),
        ("scores", np.array([-0.25, 0.5], np.float32), r"scores\[0\] must be finite and >= 0, got -0.25"),
    ],
)
def test_bad_detections_are_named(field, value, message, smooth_image, field_unary):
    arrays = case(2, 3, 16, 16, 2, smooth_image, field_unary)
    with pytest.raises(InvalidArgumentError, match=message):
        run_native(*bad(arrays, field, value), 2)


@pytest.mark.parametrize("height, width", [(1, 2**24 + 4), (2**24 + 4, 1)])
def test_a_box_beyond_the_last_pixel_of_a_side_longer_than_float32_counts_is_outside(height, width):
    # float32(2**24 + 3), the last pixel's index, rounds up to 2**24 + 4: the span must not reach it
    beyond = np.float32(max(height, width) - 0.5)
    box = [beyond, 0, 1e9, 0] if width > 1 else [0, beyond, 0, 1e9]
    potential = _native.DetectionPotential(
        boxes=np.array([box], np.float32), labels=np.array([0]), scores=np.array([0.9], np.float32),
        detection_x=np.ones(1, np.float32), detection_y=np.ones(1, np.float32), score_ceiling=1.0, epsilon=0.1,
        recalibrated=np.zeros(1, np.float32))
    problem = _native.Problem(1, height, width, None, [], compat=None, normalization="after", iterations=1,
                              output=_native.Output.LOGITS, threads=1, detection_potential=potential)
    with pytest.raises(InvalidArgumentError, match=r"boxes\[0\] = .* holds no pixel of the"):
        problem.forward(np.zeros((1, height, width), np.float32))


@pytest.mark.parametrize(
    "settings, message",
    [({"score_ceiling": 0.0}, "score_ceiling must be finite and > 0"),
     ({"score_ceiling": float("inf")}, "score_ceiling must be finite and > 0, got inf"),
     ({"epsilon": 1.0}, r"epsilon must be in \[0, 1\)"), ({"epsilon": -0.1}, r"epsilon must be in \[0, 1\)")],
)
def test_bad_constants_are_named(settings, message, smooth_image, field_unary):
    arrays = case(2, 3, 16, 16, 2, smooth_image, field_unary)
    with pytest.raises(InvalidArgumentError, match=message):
        run_native(*arrays, 2, **settings)


def test_a_detection_count_past_the_limit_is_refused_before_any_box_is_read():
    # 2**29 detections: their 4 box values each would overflow 32-bit entry indices. The one box there is NaN,
    # so a library that read it anyway would say that instead
    boxes = np.full((1, 4), np.nan, np.float32)
    labels, scores, weight = np.zeros(1, np.int64), np.ones(1, np.float32), np.ones(1, np.float32)
    detections = _native._Detections(
        count=2**29, boxes=boxes.ctypes.data_as(_native._f32p),
        labels=labels.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), scores=scores.ctypes.data_as(_native._f32p),
        detection_x=weight.ctypes.data_as(_native._f32p), detection_y=weight.ctypes.data_as(_native._f32p),
        score_ceiling=1.0, epsilon=0.1, recalibrated=None)
    problem = _native._Problem(num_labels=2, height=4, width=5, image_channels=0, image=None, num_kernels=0,
                               kernels=None, compat_kind=_native.CompatKind.POTTS, compat=None, normalization=0,
                               iterations=1, output=_native.Output.LOGITS, threads=1,
                               detections=ctypes.pointer(detections))
    size = ctypes.c_size_t()
    status = _native.library().dynseg_crf_workspace_size(ctypes.byref(problem), _native.Pass.FORWARD,
                                                         ctypes.byref(size))
    assert status == _native.Status.INVALID_ARGUMENT
    assert _native.library().dynseg_last_error().decode() == "detections->count must be in 0..536870911, got 536870912"


def test_no_detections_is_no_potential_whatever_its_constants(smooth_image, field_unary):
    # a zero-filled dynseg_detections (count 0) is what a C caller without detections may pass
    image, unary, spatial, bilateral, compat, *_ = case(2, 3, 16, 16, 2, smooth_image, field_unary)
    empty = _native.DetectionPotential(
        boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64), scores=np.zeros(0, np.float32),
        detection_x=np.zeros(1, np.float32), detection_y=np.zeros(1, np.float32), score_ceiling=0.0, epsilon=0.0,
        recalibrated=np.zeros(0, np.float32))
    without = native_problem(unary, image, spatial, bilateral, compat, None, 2).forward(unary)
    np.testing.assert_array_equal(native_problem(unary, image, spatial, bilateral, compat, empty, 2).forward(unary),
                                  without)


@pytest.mark.parametrize("weights", [(np.nan, 1.0), (1.0, np.inf)], ids=["detection_x", "detection_y"])
def test_non_finite_weights_are_named(weights, smooth_image, field_unary):
    arrays = list(case(2, 3, 16, 16, 2, smooth_image, field_unary))
    arrays[8] = tuple(np.float32(w) for w in weights)
    with pytest.raises(InvalidArgumentError, match="detection_x and detection_y must be finite"):
        run_native(*arrays, 2)


def semantic_gradients(function, arrays, iterations, grad_logits, grad_scores, normalization="after"):
    """The semantic CRF's outputs and the gradients of <grad_logits, logits> + <grad_scores, scores> with
    respect to the unary, both weight matrices, the compatibility, w_x and w_y."""
    image, unary, spatial, bilateral, compat, boxes, classes, scores, weights = arrays
    config = SemanticCRFConfig(iterations=iterations, theta_spatial=THETAS[0], theta_bilateral_xy=THETAS[1],
                               theta_bilateral_rgb=THETAS[2])
    t = torch.from_numpy
    leaves = [t(unary.copy()), t(spatial.copy()), t(bilateral.copy()), t(compat.copy()), torch.tensor(weights[0]),
              torch.tensor(weights[1])]
    for leaf in leaves:
        leaf.requires_grad_()
    logits, recalibrated = function(
        leaves[0], t(image), t(boxes), t(classes), t(scores), spatial_weight=leaves[1], bilateral_weight=leaves[2],
        compatibility=leaves[3], detection_x=leaves[4], detection_y=leaves[5], config=config,
        normalization=normalization)
    ((logits * t(grad_logits)).sum() + (recalibrated * t(grad_scores)).sum()).backward()
    untouched = lambda leaf: np.zeros(leaf.shape, np.float32)  # what autograd leaves without a path (T = 0)
    return [logits.detach().numpy(), recalibrated.detach().numpy()] + [
        untouched(leaf) if leaf.grad is None else leaf.grad.numpy() for leaf in leaves]


@pytest.mark.parametrize(
    "labels, height, width, count, iterations, normalization",
    [(2, 17, 23, 1, 1, "after"), (5, 40, 31, 3, 5, "after"), (9, 33, 47, 12, 3, "symmetric"),
     (4, 1, 30, 2, 2, "after"), (3, 20, 20, 4, 0, "after")],
)
def test_the_library_differentiates_the_detection_potential_as_autograd_does_the_loop(
    labels, height, width, count, iterations, normalization, smooth_image, field_unary
):
    arrays = case(labels * 5 + count, labels, height, width, count, smooth_image, field_unary)
    rng = np.random.default_rng(count)
    grad_logits = rng.normal(0, 1, arrays[1].shape).astype(np.float32)
    grad_scores = rng.normal(0, 1, count).astype(np.float32)
    native = semantic_gradients(semantic_mean_field, arrays, iterations, grad_logits, grad_scores, normalization)
    reference = semantic_gradients(semantic_mean_field_reference, arrays, iterations, grad_logits, grad_scores,
                                   normalization)
    names = ["logits", "recalibrated", "unary", "spatial weight", "bilateral weight", "compatibility", "w_x", "w_y"]
    for name, got, expected in zip(names, native, reference):
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(got - expected).max() <= 2e-5 * scale, name
    if iterations:  # the gradients are not trivially zero, and the scores' gradient reaches w_y
        assert min(float(np.abs(reference[6])), float(np.abs(reference[7]))) > 1e-4
    else:
        assert np.array_equal(native[2], grad_logits) and native[6] == 0 and native[7] == 0


def test_the_backward_is_the_same_bits_for_any_thread_count(smooth_image, field_unary):
    image, unary, spatial, bilateral, compat, boxes, classes, scores, weights = case(
        11, 6, 45, 38, 9, smooth_image, field_unary)
    grad = np.random.default_rng(0).normal(0, 1, unary.shape).astype(np.float32)
    results = []
    for threads in (1, 0):
        grad_x, grad_y = np.full(1, np.nan, np.float32), np.full(1, np.nan, np.float32)
        detections = _native.DetectionPotential(
            boxes=boxes, labels=classes, scores=scores, detection_x=np.array([weights[0]], np.float32),
            detection_y=np.array([weights[1]], np.float32), score_ceiling=1.0, epsilon=1e-4,
            recalibrated=np.empty(len(scores), np.float32), grad_recalibrated=np.linspace(-1, 1, len(scores),
                                                                                       dtype=np.float32),
            grad_detection_x=grad_x, grad_detection_y=grad_y)
        problem = native_problem(unary, image, spatial, bilateral, compat, detections, 4, threads)
        grad_unary, grad_weights, grad_compat = problem.backward(unary, grad, [True, True], True)
        results.append([grad_unary, *grad_weights, grad_compat, grad_x, grad_y])
    for one, many in zip(*results):
        assert np.array_equal(one, many)


def test_the_backward_names_a_non_finite_score_gradient(smooth_image, field_unary):
    image, unary, spatial, bilateral, compat, boxes, classes, scores, weights = case(
        2, 3, 16, 16, 2, smooth_image, field_unary)
    detections = _native.DetectionPotential(
        boxes=boxes, labels=classes, scores=scores, detection_x=np.array([weights[0]], np.float32),
        detection_y=np.array([weights[1]], np.float32), score_ceiling=1.0, epsilon=1e-4,
        recalibrated=np.empty(2, np.float32), grad_recalibrated=np.array([0.5, np.nan], np.float32))
    problem = native_problem(unary, image, spatial, bilateral, compat, detections, 2)
    with pytest.raises(InvalidArgumentError, match="grad_recalibrated holds a non-finite value"):
        problem.backward(unary, np.ones_like(unary), [True, True], True)


def test_a_backward_whose_kept_beliefs_would_overflow_the_workspace_size_is_refused():
    # (iterations + 1) x D beliefs of 16 bytes: 2^29 - 1 detections over 2^31 - 1 iterations pass 2^63
    boxes, labels, scores, weight = (np.zeros((1, 4), np.float32), np.zeros(1, np.int64), np.ones(1, np.float32),
                                     np.ones(1, np.float32))
    detections = _native._Detections(
        count=2**29 - 1, boxes=boxes.ctypes.data_as(_native._f32p),
        labels=labels.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), scores=scores.ctypes.data_as(_native._f32p),
        detection_x=weight.ctypes.data_as(_native._f32p), detection_y=weight.ctypes.data_as(_native._f32p),
        score_ceiling=1.0, epsilon=0.1)
    problem = _native._Problem(num_labels=2, height=4, width=5, image_channels=0, image=None, num_kernels=0,
                               kernels=None, compat_kind=_native.CompatKind.POTTS, compat=None, normalization=0,
                               iterations=2**31 - 1, output=_native.Output.LOGITS, threads=1,
                               detections=ctypes.pointer(detections))
    size = ctypes.c_size_t()
    status = _native.library().dynseg_crf_workspace_size(ctypes.byref(problem), _native.Pass.BACKWARD,
                                                         ctypes.byref(size))
    assert status == _native.Status.INVALID_ARGUMENT
    assert _native.library().dynseg_last_error().decode() == (
        "detections->count x (iterations + 1) overflows: 536870911 x 2147483648")


@pytest.mark.parametrize("field, bad", [
    ("boxes", np.zeros((2, 3), np.float32)), ("labels", np.zeros(3, np.int64)), ("scores", np.zeros(1, np.float32)),
    ("recalibrated", np.zeros(3, np.float32)), ("detection_x", np.zeros(2, np.float32)),
    ("grad_recalibrated", np.zeros(1, np.float32)), ("grad_detection_y", np.zeros(2, np.float32)),
])
def test_the_detection_arrays_must_agree_with_the_box_count_before_a_pointer_crosses(field, bad):
    arrays = dict(boxes=np.zeros((2, 4), np.float32), labels=np.ones(2, np.int64), scores=np.ones(2, np.float32),
                  detection_x=np.ones(1, np.float32), detection_y=np.ones(1, np.float32),
                  recalibrated=np.zeros(2, np.float32))
    arrays[field] = bad
    with pytest.raises(InvalidArgumentError, match=f"detection potential: {field} must"):
        _native.DetectionPotential(**arrays, score_ceiling=1.0, epsilon=1e-4)


def test_a_detection_weight_of_shape_0d_is_one_value_as_onnxruntime_hands_it_over():
    # the exported graph's detection_y reaches the CRF node as an Identity's 0-d output
    arrays = dict(boxes=np.zeros((2, 4), np.float32), labels=np.ones(2, np.int64), scores=np.ones(2, np.float32),
                  detection_x=np.ones((), np.float32), detection_y=_native.DeviceArray(64, ()),
                  recalibrated=np.zeros(2, np.float32))
    struct = _native.DetectionPotential(**arrays, score_ceiling=1.0, epsilon=1e-4).struct()
    assert ctypes.cast(struct.detection_y, ctypes.c_void_p).value == 64  # the one value at the device address


def test_the_library_reads_a_0d_detection_weight_as_the_value_it_holds(smooth_image, field_unary):
    image, unary, spatial, bilateral, compat, boxes, classes, scores, weights = case(
        3, 4, 20, 26, 3, smooth_image, field_unary)
    results = []
    for shape in ((), (1,)):
        recalibrated = np.full(len(scores), np.nan, np.float32)
        detections = _native.DetectionPotential(
            boxes=boxes, labels=classes, scores=scores, detection_x=np.full(shape, weights[0], np.float32),
            detection_y=np.full(shape, weights[1], np.float32), score_ceiling=1.0, epsilon=1e-4,
            recalibrated=recalibrated,
        )
        logits = native_problem(unary, image, spatial, bilateral, compat, detections, 3).forward(unary)
        results.append((logits, recalibrated))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    # and that value is the weight the trainer's definition applies
    expected_logits, expected_scores = run_reference(image, unary, spatial, bilateral, compat, boxes, classes, scores,
                                                     weights, 3)
    assert np.abs(results[0][0] - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()
    np.testing.assert_allclose(results[0][1], expected_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("count", [0, 2])
def test_the_torch_op_gives_w_x_and_w_y_the_gradients_autograd_asks_for(count):
    # no detection: w_x's gradient is 0, not whatever memory held; a weight without requires_grad gets none
    from dynseg.trainer.crf import DetectionPotential, mean_field_native_with_detections

    unary = torch.linspace(-2, 2, 3 * 10 * 12).reshape(3, 10, 12).requires_grad_()
    w_x, w_y = torch.tensor(1.2, requires_grad=True), torch.tensor(0.9)
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [3.0, 2.0, 11.0, 9.0]])[:count]
    detections = DetectionPotential(boxes, torch.tensor([1, 2])[:count], torch.tensor([0.8, 0.5])[:count], w_x, w_y,
                            score_ceiling=1.0, epsilon=1e-4)
    logits, scores = mean_field_native_with_detections(unary, None, [(3.0, 0.0, 2.0)], detections, iterations=3)
    assert scores.shape == (count,)
    (logits.square().sum() + scores.sum()).backward()
    assert w_y.grad is None
    assert (float(w_x.grad) == 0.0) == (count == 0)


@pytest.mark.parametrize("field, value, message", [
    ("labels", torch.tensor([1.0]), "detections.labels must be integers, got torch.float32"),
    ("labels", torch.tensor([True]), "detections.labels must hold real numbers, got torch.bool"),
    ("scores", torch.tensor([0.5 + 1j]), "detections.scores must hold real numbers, got torch.complex64"),
    ("boxes", [[0.0, 0.0, 3.0, 3.0]], "detections.boxes must be a tensor, got list"),
    ("epsilon", float("nan"), "detections.epsilon must be a finite float32 number, got nan"),
])
def test_the_torch_front_end_names_a_bad_detection_field(field, value, message):
    from dataclasses import replace

    from dynseg.trainer.crf import DetectionPotential, mean_field_native_with_detections

    detections = DetectionPotential(torch.tensor([[0.0, 0.0, 3.0, 3.0]]), torch.tensor([1]), torch.tensor([0.5]),
                            torch.tensor(1.0), torch.tensor(1.0), score_ceiling=1.0, epsilon=1e-4)
    with pytest.raises(InvalidArgumentError, match=message):
        mean_field_native_with_detections(torch.zeros(2, 6, 6), None, [(3.0, 0.0, 1.0)],
                                          replace(detections, **{field: value}))
