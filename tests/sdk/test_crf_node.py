"""The SDK's executor of dynseg::MeanFieldCRF nodes (sdk/crf_node.py): inputs of the wrong shape are
named before a pointer reaches the library, and the L = 1 and no-detection cases follow docs/ops.md."""

from __future__ import annotations

import numpy as np
import pytest

from dynseg.sdk import InvalidArgumentError
from dynseg.sdk.crf_node import CrfAttributes, run_node

NODE = {"iterations": 3, "theta_spatial": 3.0, "theta_bilateral_xy": 20.0, "theta_bilateral_rgb": 13.0,
        "normalization": "after", "detection_potential": 1, "score_ceiling": 1.0, "epsilon": 1e-4}
ATTRIBUTES = CrfAttributes.parse(NODE)


def node_inputs(labels: int = 3, detections: int = 2, height: int = 12, width: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.normal(size=(1, labels, height, width)).astype(np.float32),
        rng.uniform(0, 255, (1, 3, height, width)).astype(np.float32),
        np.float32(3.0), np.eye(labels, dtype=np.float32) * 5, -np.eye(labels, dtype=np.float32),
        np.tile(np.array([[1, 2, 8, 9]], np.float32), (detections, 1)), np.ones(detections, np.int64),
        np.full(detections, 0.7, np.float32), np.float32(1.0), np.float32(1.0),
    ]


@pytest.mark.parametrize("index, value, message", [
    (0, np.zeros((3, 12, 16), np.float32), r"unary must be \(1, L, H, W\)"),
    (1, np.zeros((1, 3, 12, 15), np.float32), r"image must be \(1, C, 12, 16\)"),
    (3, np.eye(2, dtype=np.float32), r"bilateral_weight must be a scalar or \(3, 3\)"),
    (4, np.zeros(3, np.float32), r"compatibility must be \(3, 3\) or empty"),
    (5, np.zeros((2, 5), np.float32), "boxes, labels and scores must be"),
    (7, np.zeros(3, np.float32), "boxes, labels and scores must be"),
    (8, np.zeros(2, np.float32), "detection_x and detection_y must be scalars"),
    (9, np.zeros(2, np.float32), r"detection_x and detection_y must be scalars, got \(\), \(2,\)"),
    (9, np.zeros((1, 2), np.float32), r"detection_x and detection_y must be scalars, got \(\), \(1, 2\)"),
    (9, np.zeros(0, np.float32), r"detection_x and detection_y must be scalars, got \(\), \(0,\)"),
    (2, np.eye(2, dtype=np.float32), r"spatial_weight must be a scalar or \(3, 3\)"),
    (6, np.ones(3, np.int64), "boxes, labels and scores must be"),
])
def test_inputs_of_the_wrong_shape_are_named(index, value, message):
    inputs = node_inputs()
    inputs[index] = value
    with pytest.raises(InvalidArgumentError, match=message):
        run_node(inputs, ATTRIBUTES)


@pytest.mark.parametrize("index, value, message", [
    (6, np.array([1.5, 1.0]), "labels must be int64, got float64"),
    (6, np.array([2**64 - 1, 1], np.uint64), "labels must be int64, got uint64"),
    (0, np.zeros((1, 3, 12, 16)), "unary must be float32, got float64"),
])
def test_inputs_of_the_wrong_dtype_are_named_not_cast(index, value, message):
    inputs = node_inputs()
    inputs[index] = value
    with pytest.raises(InvalidArgumentError, match=message):
        run_node(inputs, ATTRIBUTES)


def test_one_label_is_the_identity():
    inputs = node_inputs(labels=1)
    inputs[3], inputs[4] = np.float32(5.0), np.zeros(0, np.float32)
    logits, scores = run_node(inputs, ATTRIBUTES)
    assert np.array_equal(logits, inputs[0]) and np.array_equal(scores, inputs[7])


def test_no_iteration_is_the_identity_whatever_the_detections_hold():
    # as the PyTorch reference and the TensorRT plugin: a box outside the image is not even looked at
    inputs = node_inputs()
    inputs[5] = np.tile(np.array([[100, 100, 120, 120]], np.float32), (2, 1))
    logits, scores = run_node(inputs, CrfAttributes.parse({**NODE, "iterations": 0}))
    assert np.array_equal(logits, inputs[0]) and np.array_equal(scores, inputs[7])


def test_detections_recalibrate_the_scores_and_move_the_logits():
    with_term = run_node(node_inputs(), ATTRIBUTES)
    without = run_node(node_inputs(), CrfAttributes.parse({**NODE, "detection_potential": 0}))
    assert np.array_equal(without[1], node_inputs()[7])  # the scores pass through
    assert not np.array_equal(with_term[1], without[1]) and (0 < with_term[1]).all() and (with_term[1] < 1).all()
    assert np.abs(with_term[0] - without[0]).max() > 1e-3


@pytest.mark.parametrize("change, message", [
    ({"iterations": None}, "iterations are missing"),
    ({"theta_spatial": None, "theta_bilateral_rgb": None}, "theta_spatial, theta_bilateral_rgb are missing"),
    ({"iteratons": 7}, "unknown attribute 'iteratons'"),
    ({"iterations": 2.9}, "iterations must be of type int, got 2.9"),
    ({"iterations": -8}, r"iterations must be an int in 0\.\.2147483647, got -8"),
    ({"iterations": 2**40}, r"iterations must be an int in 0\.\.2147483647"),
    ({"theta_spatial": "3"}, "theta_spatial must be of type float"),
    ({"theta_bilateral_xy": 0.0}, "theta_bilateral_xy must be finite and > 0"),
    ({"normalization": "bogus"}, "normalization must be 'after' or 'symmetric', got 'bogus'"),
    ({"detection_potential": 7}, "detection_potential must be 0 or 1, got 7"),
    ({"detection_potential": 0.5}, "detection_potential must be of type int"),
    ({"epsilon": [1.0, 2.0]}, "epsilon must be of type float"),
    ({"score_ceiling": 0.0}, "score_ceiling must be finite and > 0"),
    ({"epsilon": 1.0}, r"epsilon must be in \[0, 1\)"),
])
def test_a_bad_attribute_is_named_with_its_node(change, message):
    node = {name: value for name, value in {**NODE, **change}.items() if value is not None}
    with pytest.raises(InvalidArgumentError, match=f"node 'crf': .*{message}"):
        CrfAttributes.parse(node, node="node 'crf'")


@pytest.mark.parametrize("change, message", [
    ({"theta_spatial": 1e-46}, "theta_spatial must be finite and > 0 as a float32, got 1e-46"),  # 0 in float32
    ({"theta_bilateral_rgb": 1e39}, "theta_bilateral_rgb must be finite and > 0 as a float32"),  # inf in float32
    ({"detection_potential": 1, "epsilon": 0.99999999}, r"epsilon must be in \[0, 1\) as a float32"),  # 1.0
    ({"detection_potential": 1, "score_ceiling": 1e-46}, "score_ceiling must be finite and > 0 as a float32"),
])
def test_attributes_are_checked_as_the_float32_the_node_and_the_kernels_hold(change, message):
    # before, parse passed these (in float64) and the kernel library refused them naming its own fields
    with pytest.raises(InvalidArgumentError, match=f"node 'crf': attribute {message}"):
        CrfAttributes.parse({**NODE, **change}, node="node 'crf'")
    with pytest.raises(InvalidArgumentError, match=f"^MeanFieldCRF: attribute {message}"):  # as export.ops makes them
        CrfAttributes(**{**NODE, **change})
    rounded = CrfAttributes(**{**NODE, "theta_spatial": 0.1})
    assert rounded.theta_spatial == float(np.float32(0.1))
    assert rounded == CrfAttributes.parse({**NODE, "theta_spatial": 0.1})


def test_optional_attributes_take_the_documented_defaults():
    required = {name: NODE[name] for name in ("iterations", "theta_spatial", "theta_bilateral_xy", "theta_bilateral_rgb")}
    assert CrfAttributes.parse(required) == CrfAttributes(3, 3.0, 20.0, 13.0, "after", 0, 1.0, 0.0)
    # TensorRT's routing attributes (on export.engine's copy of a model) are not the op's own
    assert CrfAttributes.parse({**required, "plugin_namespace": "dynseg", "plugin_version": "1"}).iterations == 3
    # without the potential, its parameters are not used and not checked (as in the TensorRT plugin)
    assert not CrfAttributes.parse({**required, "detection_potential": 0, "epsilon": 5.0}).detection_potential


def test_without_the_potential_its_unread_parameters_make_no_difference():
    # a network's config holds epsilon 1e-4, its node the float32 nearest: `dynseg validate` found them different
    made = CrfAttributes(**{**NODE, "detection_potential": 0, "score_ceiling": 0.3, "epsilon": 1e-4})
    read = CrfAttributes.parse({**NODE, "detection_potential": 0, "score_ceiling": float(np.float32(0.3)),
                                "epsilon": float(np.float32(1e-4))})
    assert made == read == CrfAttributes(**{**NODE, "detection_potential": 0})


@pytest.mark.parametrize("name", ["iterations", "detection_potential"])
def test_a_bool_is_not_an_int_attribute(name):
    node = {"iterations": 3, "theta_spatial": 3.0, "theta_bilateral_xy": 20.0, "theta_bilateral_rgb": 13.0}
    with pytest.raises(InvalidArgumentError, match=f"{name} must be of type int"):
        CrfAttributes.parse({**node, name: True})


def test_the_node_matches_semantic_mean_field_with_asymmetric_compat_and_distinct_x_y():
    torch = pytest.importorskip("torch")
    # the reference writes the detection terms out in torch: the node's x and y cannot trade places unseen
    from dynseg.trainer.model.semantic_crf import SemanticCRFConfig, semantic_mean_field_reference

    rng = np.random.default_rng(3)
    L, H, W, T = 4, 20, 24, 4
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([xx * 10.0, yy * 12.0, (xx + yy) * 5.0]).astype(np.float32)  # (3, H, W) smooth
    unary = (3.0 * np.sin(np.arange(L)[:, None, None] + xx / 5.0 - yy / 7.0)).astype(np.float32)  # (L, H, W)
    spatial = (np.eye(L) * 3 + rng.uniform(0, 0.3, (L, L))).astype(np.float32)
    bilateral = (np.eye(L) * 5 + rng.uniform(0, 0.3, (L, L))).astype(np.float32)
    compat = (-np.eye(L) + rng.uniform(-0.4, 0.4, (L, L))).astype(np.float32)  # asymmetric
    boxes = np.array([[2, 3, 15, 17], [8, 1, 23, 12]], np.float32)
    labels, scores = np.array([1, 3], np.int64), np.array([0.9, 0.4], np.float32)
    dx, dy = 0.6, 1.9
    inputs = [unary[None], image[None], spatial, bilateral, compat, boxes, labels, scores, np.float32(dx),
              np.float32(dy)]
    attributes = CrfAttributes.parse({"iterations": T, "theta_spatial": 3.0, "theta_bilateral_xy": 20.0,
                                      "theta_bilateral_rgb": 13.0, "detection_potential": 1,
                                      "score_ceiling": 1.0, "epsilon": 1e-4})
    logits, recalibrated = run_node(inputs, attributes)
    config = SemanticCRFConfig(iterations=T, theta_spatial=3.0, theta_bilateral_xy=20.0, theta_bilateral_rgb=13.0,
                               score_ceiling=1.0, epsilon=1e-4)
    t = torch.from_numpy
    with torch.no_grad():
        expected, expected_scores = semantic_mean_field_reference(
            t(unary), t(image), t(boxes), t(labels), t(scores), spatial_weight=t(spatial),
            bilateral_weight=t(bilateral), compatibility=t(compat), detection_x=torch.tensor(dx),
            detection_y=torch.tensor(dy), config=config,
        )
    scale = np.abs(expected.numpy()).max()
    assert np.abs(logits[0] - expected.numpy()).max() <= 1e-5 * scale
    np.testing.assert_allclose(recalibrated, expected_scores.numpy(), rtol=0, atol=1e-5)


def test_scores_so_large_that_the_logits_overflow_are_named():
    inputs = node_inputs()
    inputs[7] = np.array([3e38, 3e38], np.float32)  # finite, but the two boxes' terms overflow together
    named = r"the logits overflowed float32 .* or the detection scores \(largest \|score\| 3e\+38\)"
    with pytest.raises(InvalidArgumentError, match=named):
        run_node(inputs, ATTRIBUTES)


@pytest.mark.parametrize("threads, message", [(1.5, "threads must be an int in 0..2147483647, got 1.5"),
                                              (True, "threads must be an int in 0..2147483647, got True"),
                                              (-1, "threads must be an int in 0..2147483647, got -1")])
def test_a_thread_count_that_is_no_count_is_named(threads, message):
    with pytest.raises(InvalidArgumentError, match=message):
        run_node(node_inputs(), ATTRIBUTES, threads)
