"""The network's parts on hand-made cases, and the whole network for any number of detections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynseg.sdk import InvalidArgumentError
from dynseg.trainer.loss import IGNORE, instance_loss, matched_ground_truth, semantic_loss
from dynseg.trainer.model.instance import InstanceCRF, aspect_groups
from dynseg.trainer.model import (
    InstanceConfig, InstanceUnaries, ModelConfig, SemanticCRF, SemanticCRFConfig, build_model, require_valid_detections,
)

H, W = 40, 48


def image_with_two_objects() -> torch.Tensor:
    image = torch.full((3, H, W), 30.0)
    image[:, 8:24, 6:20] = torch.tensor([220.0, 40.0, 40.0]).view(3, 1, 1)
    image[:, 14:34, 26:44] = torch.tensor([40.0, 200.0, 60.0]).view(3, 1, 1)
    return image


def small_model(**changes) -> torch.nn.Module:
    config = ModelConfig(backbone="resnet18", class_names=("red", "green"),
                         instance=InstanceConfig(templates_per_group=4, template_size=16), **changes)
    torch.manual_seed(0)
    return build_model(config)


# ------------------------------------------------------------------------ semantic CRF, detection potential


def test_a_confident_detection_pulls_its_box_towards_its_class():
    unary = torch.zeros(3, H, W)  # undecided between background and the two classes
    image = image_with_two_objects()
    crf = SemanticCRF(num_classes=2, config=SemanticCRFConfig(iterations=2, weight_spatial=0.0, weight_bilateral=0.0,
                                                               detection_x=2.0))
    box = torch.tensor([[6.0, 8.0, 19.0, 23.0]])
    with torch.no_grad():
        with_detection, recalibrated = crf(unary, image, box, torch.tensor([1]), torch.tensor([0.9]))
        without, _ = crf(unary, image, box[:0], torch.tensor([], dtype=torch.int64), torch.tensor([]))
    q_with = torch.softmax(with_detection, 0)
    q_without = torch.softmax(without, 0)
    inside = (slice(None), slice(8, 24), slice(6, 20))
    assert (q_with[1][inside[1:]] > q_without[1][inside[1:]] + 0.1).all()  # class 1 gains in the box
    assert torch.allclose(q_with[:, 0, 0], q_without[:, 0, 0])  # nothing changes outside it
    assert recalibrated.shape == (1,) and 0.0 < float(recalibrated[0]) < 1.0


def test_pixels_that_disagree_with_a_detection_lower_its_recalibrated_score():
    image = image_with_two_objects()
    crf = SemanticCRF(num_classes=2, config=SemanticCRFConfig(iterations=1, detection_y=5.0))
    box = torch.tensor([[6.0, 8.0, 19.0, 23.0]])
    agreeing = torch.zeros(3, H, W)
    agreeing[1] = 5.0  # every pixel says class 1
    disagreeing = torch.zeros(3, H, W)
    disagreeing[2] = 5.0  # every pixel says class 2
    with torch.no_grad():
        _, score_agreeing = crf(agreeing, image, box, torch.tensor([1]), torch.tensor([0.7]))
        _, score_disagreeing = crf(disagreeing, image, box, torch.tensor([1]), torch.tensor([0.7]))
    assert float(score_agreeing) > 0.9 > 0.1 > float(score_disagreeing)


# ------------------------------------------------------------------------ instance unaries


def test_the_shape_term_picks_the_template_that_matches_the_object():
    unaries = InstanceUnaries(config=InstanceConfig(box_term=False, global_term=False, template_groups=1,
                                                    templates_per_group=2, template_size=8))
    with torch.no_grad():
        unaries.templates.zero_()
        unaries.templates[0, 0, :, :4] = 1.0  # left half
        unaries.templates[0, 1, :, 4:] = 1.0  # right half
    q_sem = torch.zeros(2, 16, 16)
    q_sem[0] = 1.0
    q_sem[1, :, 8:] = 1.0  # the object fills the right half of the box
    q_sem[0, :, 8:] = 0.0
    box = torch.tensor([[0.0, 0.0, 15.0, 15.0]])
    chosen = unaries._best_templates(q_sem[torch.tensor([1])], box)[0]
    assert chosen[:, 12:].min() > 0.9 and chosen[:, :3].max() < 0.1


def test_templates_initialise_from_training_masks_by_aspect_ratio():
    unaries = InstanceUnaries(config=InstanceConfig(template_groups=2, templates_per_group=1, template_size=8))
    tall, wide = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    tall[0:10, 5:10] = True  # the top half of a 5 x 20 box
    wide[5:10, 0:10] = True  # the left half of a 20 x 5 box
    boxes = [np.array([5, 0, 9, 19]), np.array([0, 5, 19, 9])]
    unaries.initialise_templates([tall, wide], boxes)
    groups = [int(aspect_groups(torch.tensor(box[None], dtype=torch.float32), 2)) for box in boxes]
    assert groups == [1, 0]  # the tall group, then the wide one
    tall_template, wide_template = unaries.templates[1, 0], unaries.templates[0, 0]
    # each group's template is its own shape (one mask each: the k-means centre is that crop), not a mix
    top_half, left_half = torch.zeros(8, 8), torch.zeros(8, 8)
    top_half[:4], left_half[:, :4] = 1.0, 1.0
    torch.testing.assert_close(tall_template.detach(), top_half, atol=1e-6, rtol=0)
    torch.testing.assert_close(wide_template.detach(), left_half, atol=1e-6, rtol=0)


def test_a_template_is_cropped_to_its_inclusive_box_last_row_and_column_included():
    unaries = InstanceUnaries(config=InstanceConfig(template_groups=2, templates_per_group=1, template_size=8))
    edge = np.zeros((20, 20), bool)
    edge[0:10, 9] = True  # the box's last column alone
    box = np.array([0, 0, 9, 9])
    unaries.initialise_templates([edge], [box])
    template = unaries.templates[int(aspect_groups(torch.tensor(box[None], dtype=torch.float32), 2)), 0]
    assert (template[:, -1] == 1).all() and (template[:, :-1] == 0).all()
    thin = np.zeros((20, 20), bool)
    thin[:, 5] = True  # a box one pixel wide
    unaries.initialise_templates([thin], [np.array([5, 0, 5, 19])])
    assert torch.equal(unaries.templates[1, 0], torch.ones(8, 8))


def _resized(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with corners aligned, pixel by pixel (F.interpolate(..., align_corners=True))."""
    rows, columns = values.shape
    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            sy = y * (rows - 1) / (height - 1) if height > 1 else 0.0
            sx = x * (columns - 1) / (width - 1) if width > 1 else 0.0
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, rows - 1), min(x0 + 1, columns - 1)
            fy, fx = sy - y0, sx - x0
            out[y, x] = (values[y0, x0] * (1 - fy) * (1 - fx) + values[y0, x1] * (1 - fy) * fx
                         + values[y1, x0] * fy * (1 - fx) + values[y1, x1] * fy * fx)
    return out


def test_the_instance_unaries_are_algorithm_section_5_term_by_term():
    """U_k = ln max(w1 s_k Q(c_k) [inside B_k] + w2 Q(c_k) + w3 Q(c_k) t*_k [inside B_k], eps), background
    ln max(w2 Q(0), eps), t*_k the template of B_k's aspect group (height/width, 5 equal bins of the log
    ratio over [1/4, 4]) with the largest <T, Q(c_k) cropped and resized to T> / ||T||, resized to B_k:
    overlapping boxes, boxes on the border, a one-pixel-wide box, a class with Q ~ 0, unequal weights."""
    height, width, size, groups, per_group = 9, 11, 6, 5, 3
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(4, height, width) * 2, 0)
    q[2] = 1e-30
    q = q / q.sum(0, keepdim=True)
    boxes = torch.tensor([[1.0, 1.0, 6.0, 5.0], [4.0, 3.0, 10.0, 8.0], [0.0, 0.0, 0.0, 8.0], [2.0, 2.0, 7.0, 7.0]])
    labels, scores = torch.tensor([1, 1, 3, 2]), torch.tensor([0.9, 0.4, 0.7, 0.95])
    config = InstanceConfig(template_groups=groups, templates_per_group=per_group, template_size=size)
    unaries = InstanceUnaries(config=config)
    w1, w2, w3 = 0.7, 1.3, 0.5
    with torch.no_grad():
        unaries.templates.uniform_(0, 1)
        unaries.term_weights.copy_(torch.tensor([w1, w2, w3]))
        u = unaries(q, boxes, labels, scores).double().numpy()
    qn, templates = q.double().numpy(), unaries.templates.detach().double().numpy()
    expected = np.zeros((len(boxes) + 1, height, width))
    expected[0] = w2 * qn[0]
    for k, ((x1, y1, x2, y2), c, s) in enumerate(zip(boxes.int().tolist(), labels.tolist(), scores.tolist())):
        inside = np.zeros((height, width))
        inside[y1:y2 + 1, x1:x2 + 1] = 1
        ratio = np.clip(np.log((y2 - y1 + 1) / (x2 - x1 + 1)), -np.log(4), np.log(4))
        group = min(int((ratio + np.log(4)) / (2 * np.log(4)) * groups), groups - 1)
        crop = _resized(qn[c, y1:y2 + 1, x1:x2 + 1], size, size)
        best = max(templates[group], key=lambda t: (t * crop).sum() / np.linalg.norm(t))
        shape = np.zeros((height, width))
        shape[y1:y2 + 1, x1:x2 + 1] = _resized(best, y2 - y1 + 1, x2 - x1 + 1)
        expected[k + 1] = w1 * s * qn[c] * inside + w2 * qn[c] + w3 * qn[c] * shape
    np.testing.assert_allclose(u, np.log(np.maximum(expected, config.epsilon)), rtol=0, atol=1e-5)
    assert np.all(u[4] == np.float32(np.log(config.epsilon)))  # class 2 has no evidence: the eps clamp


def test_the_crfs_defaults_are_the_released_codes():
    """docs/algorithm.md §3: the instance CRF's and the semantic CRF's kernels and iterations, and the
    semantic CRF's starting parameters (W diagonal, mu = -I, detection weights 1)."""
    instance = InstanceConfig()
    assert (instance.iterations, instance.theta_spatial, instance.theta_bilateral_xy, instance.theta_bilateral_rgb,
            instance.weight_spatial, instance.weight_bilateral) == (3, 3.0, 49.0, 5.0, 3.0, 4.0)
    semantic = SemanticCRFConfig()
    assert (semantic.iterations, semantic.theta_spatial, semantic.theta_bilateral_xy, semantic.theta_bilateral_rgb,
            semantic.weight_spatial, semantic.weight_bilateral) == (5, 3.0, 160.0, 3.0, 3.0, 5.0)
    crf = SemanticCRF(num_classes=2, config=semantic)
    assert torch.equal(crf.spatial_weight, 3.0 * torch.eye(3)) and torch.equal(crf.bilateral_weight, 5.0 * torch.eye(3))
    assert torch.equal(crf.compatibility, -torch.eye(3))
    assert float(crf.detection_x.detach()) == float(crf.detection_y.detach()) == 1.0


def test_unaries_have_one_label_per_detection_plus_background():
    unaries = InstanceUnaries()
    q_sem = torch.softmax(torch.randn(3, H, W), 0)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 12.0], [20.0, 5.0, 40.0, 30.0]])
    u = unaries(q_sem, boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.5]))
    assert u.shape == (3, H, W) and torch.isfinite(u).all()


# ------------------------------------------------------------------------ the whole network


@pytest.mark.parametrize("detections", [0, 1, 2, 37])
def test_the_network_takes_any_number_of_detections(detections):
    model = small_model().eval()
    generator = torch.Generator().manual_seed(detections)
    x1y1 = torch.rand(detections, 2, generator=generator) * torch.tensor([W - 10.0, H - 10.0])
    boxes = torch.cat([x1y1, x1y1 + 4 + torch.rand(detections, 2, generator=generator) * 6], dim=1)
    labels = torch.randint(1, 3, (detections,), generator=generator)
    scores = torch.rand(detections, generator=generator)
    with torch.no_grad():
        out = model(image_with_two_objects(), boxes, labels, scores)
    assert out.semantic_logits.shape == (3, H, W)
    assert out.instance_logits.shape == (detections + 1, H, W) and torch.isfinite(out.instance_logits).all()
    assert out.semantic_probabilities.shape == (3, H, W)
    torch.testing.assert_close(out.semantic_probabilities.sum(0), torch.ones(H, W))
    assert out.recalibrated_scores.shape == (detections,)


def test_the_instance_unaries_take_the_semantic_crfs_recalibrated_scores():
    model = small_model().eval()  # the detection potential is on by default
    boxes = torch.tensor([[6.0, 8.0, 19.0, 23.0], [26.0, 14.0, 43.0, 33.0]])
    labels, scores, image = torch.tensor([1, 2]), torch.tensor([0.6, 0.5]), image_with_two_objects()
    with torch.no_grad():
        out = model(image, boxes, labels, scores)
        expected = model.instance_crf(model.instance_unaries(out.semantic_probabilities, boxes, labels,
                                                             out.recalibrated_scores), image)
        with_input_scores = model.instance_crf(model.instance_unaries(out.semantic_probabilities, boxes, labels,
                                                                      scores), image)
    assert not torch.allclose(out.recalibrated_scores, scores)  # else the check below could not tell them apart
    torch.testing.assert_close(out.instance_logits, expected)
    assert not torch.allclose(with_input_scores, expected)


def test_the_backbone_sees_the_image_normalised_by_the_configured_mean_and_std_of_0_to_1_rgb():
    model = small_model().eval()
    seen = []
    model.semantic.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    mean, std = torch.tensor(model.config.mean), torch.tensor(model.config.std)
    image = (mean * 255.0).view(3, 1, 1).expand(3, H, W).clone()  # the mean colour: normalised to 0
    image[:, 0, 0] = (mean + std) * 255.0  # one standard deviation above it: 1
    with torch.no_grad():
        model.semantic_unary(image[None])
    normalised = seen[0][0]
    torch.testing.assert_close(normalised[:, 1:, 1:], torch.zeros(3, H - 1, W - 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised[:, 0, 0], torch.ones(3), atol=1e-5, rtol=0)


def test_gradients_reach_the_backbone_end_to_end_and_not_when_it_is_frozen():
    model = small_model().eval()  # batch-norm statistics frozen, as in stage 2; gradients still flow
    boxes = torch.tensor([[6.0, 8.0, 19.0, 23.0], [26.0, 14.0, 43.0, 33.0]])
    out = model(image_with_two_objects(), boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.8]))
    out.instance_logits[1].sum().backward()
    assert model.semantic.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.instance_crf.bilateral_weight.grad.abs() > 0 and model.instance_crf.spatial_weight.grad.abs() > 0
    model.zero_grad(set_to_none=True)
    for parameter in model.semantic.parameters():  # piecewise: the semantic part is frozen
        parameter.requires_grad_(False)
    out = model(image_with_two_objects(), boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.8]))
    out.instance_logits[1].sum().backward()
    assert model.semantic.backbone.conv1.weight.grad is None
    assert model.instance_unaries.term_weights.grad.abs().sum() > 0


def test_the_configuration_round_trips_through_json():
    config = ModelConfig(backbone="resnet50", class_names=("a", "b", "c"), semantic_crf=None)
    assert ModelConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "boxes, labels, scores, message",
    [
        ([[5.0, 5.0, 2.0, 9.0]], [1], [0.5], "inverted"),
        ([[60.0, 50.0, 70.0, 60.0]], [1], [0.5], "outside"),
        ([[1.0, 1.0, 5.0, 5.0]], [3], [0.5], "labels"),
        ([[1.0, 1.0, 5.0, 5.0]], [0], [0.5], "labels"),
        ([[1.0, 1.0, 5.0, 5.0]], [1], [float("nan")], "scores"),
        ([[1.0, 1.0, 5.0, 5.0]], [1, 2], [0.5], "labels must have shape"),
        ([[1.0, 1.0, 5.0]], [1], [0.5], "boxes"),
    ],
)
def test_bad_detections_raise_clear_errors(boxes, labels, scores, message):
    with pytest.raises(ValueError, match=message):
        require_valid_detections(torch.tensor(boxes), torch.tensor(labels), torch.tensor(scores), height=H, width=W,
                                 num_classes=2)


def test_the_network_refuses_scores_above_its_score_ceiling_as_deployment_does():
    for semantic_crf, ceiling in ((SemanticCRFConfig(score_ceiling=2.0), 2.0), (None, 1.0),
                                  (SemanticCRFConfig(detection_potential=False, score_ceiling=2.0), 1.0)):
        config = ModelConfig(class_names=("a", "b"), semantic_crf=semantic_crf)
        assert config.score_ceiling == ceiling
        boxes, labels = torch.tensor([[1.0, 1.0, 5.0, 5.0]]), torch.tensor([1])
        require_valid_detections(boxes, labels, torch.tensor([ceiling]), height=H, width=W, num_classes=2,
                                 score_ceiling=config.score_ceiling)
        with pytest.raises(InvalidArgumentError, match=f"scores must be at most {ceiling:g}, the model's score "
                                                       "ceiling"):
            require_valid_detections(boxes, labels, torch.tensor([ceiling * 1.5]), height=H, width=W, num_classes=2,
                                     score_ceiling=config.score_ceiling)


def test_boxes_reaching_outside_the_image_are_floored_and_clipped_to_it():
    boxes, labels, scores = require_valid_detections(torch.tensor([[-5.0, 2.5, 60.0, 9.7]]),
                                                     torch.tensor([1], dtype=torch.int32),
                                                     torch.tensor([0.5], dtype=torch.float64), height=H, width=W,
                                                     num_classes=2)
    assert boxes.tolist() == [[0.0, 2.0, W - 1.0, 9.0]]
    assert (boxes.dtype, labels.dtype, scores.dtype) == (torch.float32, torch.int64, torch.float32)


def test_a_box_whose_first_column_floors_into_the_image_is_not_outside_it():
    edge = W - 0.5  # floors to the last column, as the box's pixels are judged
    boxes, _, _ = require_valid_detections(torch.tensor([[edge, 1.0, edge, 4.0]]), torch.tensor([1]),
                                           torch.tensor([0.5]), height=H, width=W, num_classes=2)
    assert boxes.tolist() == [[W - 1.0, 1.0, W - 1.0, 4.0]]
    with pytest.raises(ValueError, match="wholly outside"):
        require_valid_detections(torch.tensor([[float(W), 1.0, W + 2.0, 4.0]]), torch.tensor([1]), torch.tensor([0.5]),
                                 height=H, width=W, num_classes=2)


# ------------------------------------------------------------------------ the matched-ground-truth loss


def _scores(boxes: torch.Tensor) -> torch.Tensor:
    """Scores that rank the detections in their order, as training's detections come."""
    return torch.linspace(0.9, 0.5, len(boxes))


def two_instance_case():
    logits = torch.full((3, 10, 10), -5.0)
    logits[0] = 0.0
    logits[1, 0:5, 0:5] = 5.0  # detection 1 predicts the top-left square
    logits[2, 5:10, 5:10] = 5.0  # detection 2 the bottom-right one
    gt = torch.zeros(2, 10, 10, dtype=torch.bool)
    gt[0, 5:10, 5:10] = True
    gt[1, 0:4, 0:5] = True
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 9.0, 9.0]])
    return logits, boxes, gt


def test_the_loss_does_not_depend_on_the_order_of_ground_truth_instances():
    logits, boxes, gt = two_instance_case()
    labels = torch.tensor([1, 1])
    forward = instance_loss(logits, boxes, labels, _scores(boxes), gt, torch.tensor([1, 1]))
    backward = instance_loss(logits, boxes, labels, _scores(boxes), gt.flip(0), torch.tensor([1, 1]))
    assert torch.equal(forward, backward)
    target = matched_ground_truth(logits, boxes, labels, _scores(boxes), gt, torch.tensor([1, 1]))
    assert (target[0:4, 0:5] == 1).all() and (target[5:, 5:] == 2).all() and target[9, 0] == 0


def test_the_instance_loss_is_the_mean_cross_entropy_against_the_matched_ground_truth_over_pixels_not_ignored():
    logits, boxes, gt = two_instance_case()
    labels, void = torch.tensor([1, 1]), torch.zeros(10, 10, dtype=torch.bool)
    void[9, 0] = True
    target = torch.zeros(10, 10, dtype=torch.long)  # the matching worked out by hand: detection 1 explains
    target[0:4, 0:5], target[5:, 5:] = 1, 2  # gt 1 (the top-left rows), detection 2 gt 0
    log_q = torch.log_softmax(logits.double(), dim=0)
    expected = -log_q.gather(0, target[None])[0][~void].mean()  # the void pixel counts nowhere
    loss = instance_loss(logits, boxes, labels, _scores(boxes), gt, torch.tensor([1, 1]), void)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    moved = gt.clone()
    moved[1] = False
    moved[1, 0:5, 0:5] = True  # one more row of the ground truth under detection 1's segment
    assert instance_loss(logits, boxes, labels, _scores(boxes), moved, torch.tensor([1, 1]), void).item() < loss.item()


def test_instances_of_another_class_or_unexplained_are_ignored():
    logits, boxes, gt = two_instance_case()
    target = matched_ground_truth(logits, boxes, torch.tensor([1, 1]), _scores(boxes), gt, torch.tensor([1, 2]))
    assert (target[5:, 5:] == 2).all()
    assert (target[0:4, 0:5] == IGNORE).all()  # class 2 has no detection of its class
    void = torch.zeros(10, 10, dtype=torch.bool)
    void[9, 0] = True
    target = matched_ground_truth(logits, boxes, torch.tensor([1, 1]), _scores(boxes), gt, torch.tensor([1, 1]), void)
    assert target[9, 0] == IGNORE


def test_a_ground_truth_instance_wholly_in_void_takes_no_detection_from_one_that_can_be_seen():
    # an untrained network predicts background everywhere, so the boxes decide; the void instance's box
    # (columns 1..3) overlaps the detection's (0..3) more than the visible one's (column 0) does
    logits = torch.zeros(2, 6, 8)
    logits[0] = 1.0
    gt = torch.zeros(2, 6, 8, dtype=torch.bool)
    gt[0, :, 0] = True  # visible
    gt[1, :, 1:4] = True  # wholly void
    target = matched_ground_truth(logits, torch.tensor([[0.0, 0.0, 3.0, 5.0]]), torch.tensor([1]),
                                  torch.tensor([0.9]), gt, torch.tensor([1, 1]), gt[1].clone())
    assert (target[gt[0]] == 1).all() and (target[gt[1]] == IGNORE).all()


def test_segment_overlap_decides_the_matching_and_boxes_only_match_what_it_leaves():
    # one detection whose segment covers both instances, IoU 0.5 with the first and 0.4999 with the
    # second, and whose box sits on the second: the paper matches by segment IoU, so the first wins
    width = 10_000
    logits = torch.zeros(2, 1, width)
    logits[1] = 5.0
    gt = torch.zeros(2, 1, width, dtype=torch.bool)
    gt[0, 0, :5000] = True
    gt[1, 0, 5000:9999] = True
    target = matched_ground_truth(logits, torch.tensor([[5000.0, 0.0, 9998.0, 0.0]]), torch.tensor([1]),
                                  torch.tensor([0.9]), gt, torch.tensor([1, 1]))
    assert target[0, 0] == 1 and target[0, 9000] == IGNORE
    # an untrained network's empty segments: the boxes match detections to instances
    logits, boxes, gt = two_instance_case()
    logits[1:] = -10.0  # every pixel is background
    target = matched_ground_truth(logits, boxes, torch.tensor([1, 1]), _scores(boxes), gt, torch.tensor([1, 1]))
    assert (target[0:4, 0:5] == 1).all() and (target[5:, 5:] == 2).all()


def test_void_pixels_count_in_neither_segment_of_the_matching_as_in_the_matching_iou_metric():
    # one instance in row 0, row 1 void; detection 1 holds 6 of its pixels and all of row 1, detection 2
    # the other 4: without void detection 1's IoU is 0.6, with it 6/20 = 0.3 < detection 2's 0.4
    gt = torch.zeros(1, 2, 10, dtype=torch.bool)
    gt[0, 0] = True
    void = torch.zeros(2, 10, dtype=torch.bool)
    void[1] = True
    segment = torch.full((2, 10), 1)
    segment[0, 6:] = 2
    logits = 5.0 * F.one_hot(segment, 3).permute(2, 0, 1).float()
    boxes = torch.tensor([[0.0, 0.0, 9.0, 1.0], [6.0, 0.0, 9.0, 0.0]])
    target = matched_ground_truth(logits, boxes, torch.tensor([1, 1]), _scores(boxes), gt, torch.tensor([1]), void)
    assert target[0].tolist() == [1] * 10 and (target[1] == IGNORE).all()


@pytest.mark.parametrize("make, message", [
    (lambda: InstanceConfig(iterations=-1), r"InstanceConfig.iterations must be an int in 0\.\.2147483647"),
    # the CRF node's range; a larger count would run (or trace, in an export) for ever rather than fail
    (lambda: SemanticCRFConfig(iterations=2**31), r"SemanticCRFConfig.iterations must be an int in 0\.\.2147483647"),
    (lambda: InstanceConfig(template_groups=0), "InstanceConfig.template_groups must be an int >= 1"),
    (lambda: InstanceConfig(epsilon=2.0), r"InstanceConfig.epsilon must be a finite number in \(0, 1\)"),
    (lambda: InstanceConfig(theta_spatial=0.0), "InstanceConfig.theta_spatial must be a finite number > 0, got 0.0"),
    (lambda: InstanceConfig(box_term=1), "InstanceConfig.box_term must be True or False"),
    (lambda: SemanticCRFConfig(score_ceiling=0.0), "SemanticCRFConfig.score_ceiling"),
    (lambda: SemanticCRFConfig(epsilon=1.0), r"SemanticCRFConfig.epsilon must be a finite number in \[0, 1\)"),
    (lambda: SemanticCRFConfig(weight_bilateral=float("nan")),
     "SemanticCRFConfig.weight_bilateral must be a finite number, got nan"),
    # the network computes in float32 and the CRF node stores float32 attributes: 1e-300 is 0 there
    (lambda: InstanceConfig(theta_bilateral_rgb=1e-300),
     "InstanceConfig.theta_bilateral_rgb must be a finite number > 0 once rounded to float32, got 1e-300"),
    (lambda: SemanticCRFConfig(score_ceiling=1e39), "SemanticCRFConfig.score_ceiling must be a finite number > 0 "
                                                    "once rounded to float32, got 1e[+]39"),
    (lambda: SemanticCRFConfig(epsilon=1 - 1e-9), r"SemanticCRFConfig.epsilon must be a finite number in \[0, 1\) "
                                                  "once rounded to float32"),
    (lambda: ModelConfig(class_names=("car", "bus", "car")), "ModelConfig.class_names must name each class once, "
                                                             "got car more than once"),
    (lambda: ModelConfig(class_names="person"), "ModelConfig.class_names must be a non-empty tuple"),
    (lambda: ModelConfig(class_names=()), "ModelConfig.class_names"),
    (lambda: ModelConfig(backbone="resnet34"), "ModelConfig.backbone must be 'resnet18' or"),
    (lambda: ModelConfig(std=(0.2, 0.0, 0.2)), "ModelConfig.std must be 3 finite positive numbers"),
    (lambda: ModelConfig(instance=None), "ModelConfig.instance must be an InstanceConfig, got NoneType"),
    (lambda: ModelConfig(semantic_crf={"iterations": 2}), "ModelConfig.semantic_crf must be a SemanticCRFConfig or "
                                                          "None, got dict"),
    (lambda: build_model({"backbone": "resnet18"}), "config must be a ModelConfig, got dict"),
])
def test_a_config_field_out_of_range_is_named_when_the_config_is_made(make, message):
    with pytest.raises(InvalidArgumentError, match=message):
        make()


def _instance_targets(**changed):
    targets = dict(instance_logits=torch.zeros(3, 8, 8), boxes=torch.zeros(2, 4),
                   labels=torch.ones(2, dtype=torch.long), scores=torch.full((2,), 0.5),
                   gt_masks=torch.zeros(1, 8, 8, dtype=torch.bool), gt_labels=torch.ones(1, dtype=torch.long), void=None)
    return {**targets, **changed}


@pytest.mark.parametrize("changed, message", [
    (dict(instance_logits=np.zeros((3, 8, 8))), "instance_logits must be a torch.Tensor, got ndarray"),
    (dict(instance_logits=torch.zeros(8, 8)), r"instance_logits must be \(D\+1, H, W\), got shape \(8, 8\)"),
    (dict(boxes=torch.zeros(3, 4)), r"boxes must be \(D, 4\) with the instance logits' D = 2, H, W = 8, 8, got "
                                    r"torch.float32 of shape \(3, 4\)"),
    (dict(labels=torch.ones(1, dtype=torch.long)), r"labels must be \(D,\)"),
    (dict(scores=torch.ones(3)), r"scores must be \(D,\)"),
    (dict(gt_masks=torch.zeros(1, 8, 8)), r"gt_masks must be \(M, H, W\) bool .* got torch.float32"),
    (dict(gt_masks=torch.zeros(1, 4, 8, dtype=torch.bool)), r"gt_masks must be .* of shape \(1, 4, 8\)"),
    (dict(gt_labels=torch.ones(2, dtype=torch.long)), r"gt_labels must be \(M,\)"),
    (dict(void=torch.zeros(8, 8, dtype=torch.uint8)), r"void must be \(H, W\) bool"),
])
def test_the_instance_loss_names_a_target_that_does_not_fit_the_logits(changed, message):
    with pytest.raises(InvalidArgumentError, match=message):
        instance_loss(**_instance_targets(**changed))
    assert instance_loss(**_instance_targets()).item() > 0  # the unchanged targets are accepted


def test_box_iou_counts_inclusive_pixels():
    from dynseg.trainer.boxes import box_iou

    t = lambda rows: torch.tensor(rows, dtype=torch.float32)
    assert box_iou(t([[0, 0, 0, 0]]), t([[0, 0, 0, 0]])).item() == 1.0  # one pixel, itself
    assert abs(box_iou(t([[0, 0, 1, 1]]), t([[1, 1, 2, 2]])).item() - 1 / 7) < 1e-7  # 1 shared of 4+4-1


def test_the_loss_matches_the_ground_truth_to_the_segments_deployment_outputs_ties_included():
    from dynseg.sdk.results import instance_winners

    # two class-1 detections tie exactly over the object (columns 3..6), as outside their boxes, where
    # only the global term speaks; a third lies within the tolerance of the background over columns 7..9
    logits = torch.full((4, 1, 10), -1.0)
    logits[1:3, 0, 3:7] = 0.0
    logits[0, 0, 7:] = 0.0
    logits[3, 0, 7:] = 9e-6
    gt = torch.zeros(1, 1, 10, dtype=torch.bool)
    gt[0, 0, 3:7] = True
    boxes = torch.tensor([[3.0, 0.0, 6.0, 0.0], [3.0, 0.0, 6.0, 0.0], [7.0, 0.0, 9.0, 0.0]])
    for scores, owner in ((torch.tensor([0.3, 0.9, 0.5]), 2), (torch.tensor([0.9, 0.3, 0.5]), 1)):
        target = matched_ground_truth(logits, boxes, torch.tensor([1, 1, 1]), scores, gt, torch.tensor([1]))
        deployed = instance_winners(logits.numpy(), scores.numpy())
        assert (target[0, 3:7] == owner).all() and (deployed[0, 3:7] == owner).all()  # the higher score
        assert (deployed[0, 7:] == 0).all()  # background: detection 3 wins no segment to match


def test_a_one_pixel_wide_detection_is_matched_by_its_box():
    logits = torch.zeros(2, 10, 10)
    logits[0] = 1.0  # untrained: background wins everywhere, the segment pass matches nothing
    gt = torch.zeros(1, 10, 10, dtype=torch.bool)
    gt[0, 2:8, 3] = True  # a one-pixel-wide instance in column 3
    target = matched_ground_truth(logits, torch.tensor([[3.0, 2.0, 3.0, 7.0]]), torch.tensor([1]),
                                  torch.tensor([0.9]), gt, torch.tensor([1]))
    assert (target[2:8, 3] == 1).all() and not (target == IGNORE).any()


def test_matching_is_by_iou_not_by_overlap():
    # the segment (columns 85..109) shares 15 pixels with a large instance (0..99, IoU 15/110) and 10
    # with a small one (100..109, IoU 10/25): overlap would pick the large one, IoU picks the small one
    logits = torch.zeros(2, 1, 200)
    logits[1, 0, 85:110] = 5.0
    gt = torch.zeros(2, 1, 200, dtype=torch.bool)
    gt[0, 0, 0:100] = True
    gt[1, 0, 100:110] = True
    target = matched_ground_truth(logits, torch.tensor([[85.0, 0.0, 109.0, 0.0]]), torch.tensor([1]),
                                  torch.tensor([0.9]), gt, torch.tensor([1, 1]))
    assert (target[0, 100:110] == 1).all() and (target[0, 0:100] == IGNORE).all()


def test_an_empty_ground_truth_mask_is_left_unmatched_not_an_error():
    logits, boxes, gt = two_instance_case()
    logits[1:] = -10.0  # every pixel is background: only the box pass matches
    gt = torch.cat([gt, torch.zeros(1, 10, 10, dtype=torch.bool)])  # e.g. an instance wholly in void
    target = matched_ground_truth(logits, boxes, torch.tensor([1, 1]), _scores(boxes), gt, torch.tensor([1, 1, 1]))
    assert (target[0:4, 0:5] == 1).all() and (target[5:, 5:] == 2).all()


def test_the_semantic_loss_of_an_all_void_batch_is_zero_with_a_gradient_not_nan():
    from dynseg.trainer.data import VOID

    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    loss = semantic_loss(logits, torch.full((2, 4, 5), VOID))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    targets = torch.full((2, 4, 5), VOID)
    targets[0, 0, 0] = 1  # one labelled pixel: its cross-entropy alone
    assert torch.isclose(semantic_loss(logits, targets), F.cross_entropy(logits[:1, :, 0, 0], torch.tensor([1])))


def test_an_empty_mask_has_no_box():
    from dynseg.trainer.boxes import mask_boxes

    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1:3, 2] = True
    with pytest.raises(ValueError, match=r"masks\[1\] is empty"):
        mask_boxes(masks)
    assert mask_boxes(masks[:1]).tolist() == [[2, 1, 2, 2]]


def test_the_matching_maximises_the_total_iou_of_the_pairs():
    # one row of 20 pixels; detection 1's segment is columns 1..9, detection 2's 12..19; instance A is
    # columns 2..3, instance B 5..13 (all of one class). IoUs: d1-A 2/9, d1-B 5/13, d2-A 0, d2-B 2/15.
    # Maximum total IoU: d1-B alone (0.385 > 2/9 + 2/15 = 0.356); A is left, and d2's box does not touch
    # it, so A is ignored. (Summing inter / (|P| + |G|) would pick d1-A and d2-B instead.)
    segment = torch.zeros(1, 20, dtype=torch.long)
    segment[0, 1:10] = 1
    segment[0, 12:20] = 2
    logits = 5.0 * F.one_hot(segment, 3).permute(2, 0, 1).float()
    gt = torch.zeros(2, 1, 20, dtype=torch.bool)
    gt[0, 0, 2:4] = True
    gt[1, 0, 5:14] = True
    boxes = torch.tensor([[1.0, 0.0, 9.0, 0.0], [12.0, 0.0, 19.0, 0.0]])
    target = matched_ground_truth(logits, boxes, torch.tensor([1, 1]), _scores(boxes), gt, torch.tensor([1, 1]))
    assert (target[0, 5:14] == 1).all()
    assert (target[0, 2:4] == IGNORE).all()


def test_void_pixels_of_a_ground_truth_mask_count_in_neither_segment_of_the_matching():
    # one instance on rows 0 and 1, row 1 void. Detection 1: 6 of row 0 plus 6 stray pixels of row 2;
    # detection 2: the other 4 of row 0. Void out of both sides: IoU 6/16 = 0.375 < 4/10 = 0.4, so
    # detection 2 takes the instance. Void left in the instance would give 6/26 = 0.23 > 4/20 = 0.2.
    gt = torch.zeros(1, 3, 10, dtype=torch.bool)
    gt[0, 0:2] = True
    void = torch.zeros(3, 10, dtype=torch.bool)
    void[1] = True
    segment = torch.zeros(3, 10, dtype=torch.long)
    segment[0, :6] = 1
    segment[2, :6] = 1
    segment[0, 6:] = 2
    logits = 5.0 * F.one_hot(segment, 3).permute(2, 0, 1).float()
    boxes = torch.tensor([[0.0, 0.0, 5.0, 2.0], [6.0, 0.0, 9.0, 0.0]])
    target = matched_ground_truth(logits, boxes, torch.tensor([1, 1]), _scores(boxes), gt, torch.tensor([1]), void)
    assert (target[0] == 2).all() and (target[1] == IGNORE).all()


def test_with_no_detections_the_instance_crf_returns_the_unary_as_the_crf_node_does():
    generator = torch.Generator().manual_seed(0)
    unary = torch.randn(1, 12, 15, generator=generator)  # background only: D = 0
    image = torch.rand(3, 12, 15, generator=generator) * 255
    crf = InstanceCRF(config=InstanceConfig())
    assert torch.equal(crf(unary, image), unary)


class _Ramp(torch.nn.Module):
    """A stand-in backbone whose coarse (B, 3, 5, 7) logits hold x + k for label k."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ramp = torch.arange(7, dtype=torch.float32).view(1, 1, 1, 7).expand(images.shape[0], 3, 5, 7)
        return ramp + torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1)


def test_the_semantic_unary_is_upsampled_with_corners_aligned():
    # with corners aligned the coarse ramp 0..6 spans the image's W columns exactly, its ends on the first
    # and last column (align_corners=False would leave flat borders)
    config = ModelConfig(backbone="resnet18", class_names=("red", "green"),
                         instance=InstanceConfig(templates_per_group=4, template_size=16))
    torch.manual_seed(0)
    model = build_model(config).eval()
    model.semantic = _Ramp()
    with torch.no_grad():
        logits = model.semantic_unary(torch.zeros(1, 3, H, W))[0]  # (3, H, W)
    expected = torch.arange(W, dtype=torch.float32) * 6 / (W - 1)
    for k in range(3):
        torch.testing.assert_close(logits[k], (expected + k).expand(H, W), atol=1e-5, rtol=0)
