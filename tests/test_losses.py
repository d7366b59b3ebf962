"""Losses and assignment: hand-worked cases and torchvision's Matcher/BoxCoder as references."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from detector.losses import (
    IacSettings,
    LossSettings,
    assign_anchors,
    dc_coefficient,
    dc_normalise,
    detection_losses,
    dr_loss,
    iac_scores,
    intersection_over_min_area,
    iou_targets,
    mean_normalised,
    normalise_loss,
    objectness_loss,
    paired_box_iou,
    quality_focal_loss,
)

BOX_CODER = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
MATCHER = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)

# One ground truth [0, 0, 10, 10] of class 1 and four anchors whose IoU with it is worked out:
ANCHORS = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],  # IoU 1            -> positive
        [20.0, 20.0, 30.0, 30.0],  # IoU 0            -> negative
        [5.0, 0.0, 15.0, 10.0],  # 50 / 150 = 0.333 -> negative (< 0.4)
        [0.0, 0.0, 10.0, 22.0],  # 100 / 220 = 0.455 -> ignored (between 0.4 and 0.5)
    ]
)
GT = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}


def _head_outputs(num_images=1, num_anchors=4, num_classes=2, obj=True):
    out = {
        "cls_logits": torch.zeros(num_images, num_anchors, num_classes),
        "bbox_deltas": torch.zeros(num_images, num_anchors, 4),
    }
    if obj:
        out["obj_logits"] = torch.zeros(num_images, num_anchors)
    return out


def test_paired_box_iou_by_hand():
    boxes1 = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 2, 2]])
    boxes2 = torch.tensor([[1.0, 0, 11, 10], [-5, 0, 15, 10], [5, 5, 6, 6]])
    # 90 / 110; 100 / 200; disjoint
    torch.testing.assert_close(paired_box_iou(boxes1, boxes2), torch.tensor([90 / 110, 0.5, 0.0]))
    torch.testing.assert_close(paired_box_iou(boxes1, boxes2), box_iou(boxes1, boxes2).diagonal())


def test_iou_target_is_iou_of_decoded_prediction_with_its_gt():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    gt = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    # dx = 0.1 moves the centre by 0.1 * width = 1 px: box [1, 0, 11, 10], IoU 90 / 110.
    # dw = ln 2 doubles the width about the centre x = 5: box [-5, 0, 15, 10], IoU 100 / 200.
    deltas = torch.tensor([[0.1, 0, 0, 0], [0, 0, math.log(2.0), 0]])
    torch.testing.assert_close(iou_targets(deltas, anchors, gt, BOX_CODER), torch.tensor([90 / 110, 0.5]))


def test_assignment_of_the_worked_anchors():
    a = assign_anchors(ANCHORS, [GT], MATCHER)
    assert a.matched_idxs.tolist() == [[0, -1, -1, -2]]
    assert a.pos_anchor.tolist() == [0] and a.pos_image.tolist() == [0]
    assert a.pos_gt_labels.tolist() == [1]
    assert a.num_pos_per_image.tolist() == [1.0]


def test_assignment_matches_torchvision_matcher_per_image():
    torch.manual_seed(0)
    anchors = torch.rand(300, 2) * 100
    anchors = torch.cat([anchors, anchors + 5 + torch.rand(300, 2) * 30], dim=1)
    targets = []
    for num_gt in (4, 0, 7):
        xy = torch.rand(num_gt, 2) * 100
        targets.append({"boxes": torch.cat([xy, xy + 8 + torch.rand(num_gt, 2) * 30], 1), "labels": torch.randint(0, 5, (num_gt,))})
    a = assign_anchors(anchors, targets, MATCHER)
    for i, target in enumerate(targets):
        expected = MATCHER(box_iou(target["boxes"], anchors)) if len(target["boxes"]) else torch.full((300,), -1)
        assert torch.equal(a.matched_idxs[i], expected)
        sel = a.pos_image == i
        gt_idx = expected[a.pos_anchor[sel]]
        assert torch.equal(a.pos_gt_boxes[sel], target["boxes"][gt_idx])
        assert torch.equal(a.pos_gt_labels[sel], target["labels"][gt_idx])
    assert a.num_pos_per_image[1] == 0 and a.num_pos_per_image[0] > 0


def test_losses_of_the_worked_case():
    out = _head_outputs()
    out["bbox_deltas"][0, 0] = torch.tensor([0.1, 0.0, 0.0, 0.0])  # predicted box [1, 0, 11, 10]
    out["obj_logits"][0, 0] = 1.0
    losses = detection_losses(out, ANCHORS, assign_anchors(ANCHORS, [GT], MATCHER), BOX_CODER, LossSettings())
    # Focal loss at p = 0.5: positive pair 0.25 * 0.5^2 * ln 2, each negative pair 0.75 * 0.5^2 * ln 2.
    # Anchor 0 has one positive and one negative pair, anchors 1 and 2 two negative pairs each,
    # anchor 3 is ignored: (0.0625 + 5 * 0.1875) * ln 2 = ln 2, over 1 positive.
    assert losses["classification"].item() == pytest.approx(math.log(2.0), abs=1e-6)
    # The gt's encoding w.r.t. anchor 0 is all zeros, so L1 = |0.1| over 1 positive.
    assert losses["bbox_regression"].item() == pytest.approx(0.1, abs=1e-6)
    # BCE(logit 1, target 90/110) = softplus(1) - target * 1 = 1.313262 - 0.818182.
    assert losses["objectness"].item() == pytest.approx(1.3132617 - 90 / 110, abs=1e-5)


def test_no_objectness_loss_without_branch_and_empty_image():
    out = _head_outputs(obj=False)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = detection_losses(out, ANCHORS, assign_anchors(ANCHORS, [empty], MATCHER), BOX_CODER, LossSettings())
    assert set(losses) == {"classification", "bbox_regression"}
    # All 4 anchors negative, 2 classes, normaliser max(1, 0) = 1.
    assert losses["classification"].item() == pytest.approx(8 * 0.1875 * math.log(2.0), abs=1e-6)
    assert losses["bbox_regression"].item() == 0.0


def test_normalise_loss_batch_and_per_image_by_hand():
    sums, num_pos = torch.tensor([2.0, 9.0]), torch.tensor([1.0, 3.0])
    assert normalise_loss(sums, num_pos, "batch").item() == pytest.approx(11 / 4)
    assert normalise_loss(sums, num_pos, "per_image").item() == pytest.approx((2 / 1 + 9 / 3) / 2)
    assert normalise_loss(torch.tensor([0.5]), torch.tensor([0.0]), "batch").item() == pytest.approx(0.5)


def test_batched_losses_equal_single_image_losses_recombined():
    torch.manual_seed(1)
    anchors = torch.rand(200, 2) * 60
    anchors = torch.cat([anchors, anchors + 10 + torch.rand(200, 2) * 20], dim=1)
    targets = [{"boxes": anchors[[3, 50]] + 1.0, "labels": torch.tensor([0, 2])},
               {"boxes": anchors[[7, 90, 120]] - 1.0, "labels": torch.tensor([1, 1, 0])}]
    out = {"cls_logits": torch.randn(2, 200, 3), "bbox_deltas": torch.randn(2, 200, 4) * 0.1, "obj_logits": torch.randn(2, 200)}
    singles, num_pos = [], []
    for i in range(2):
        a = assign_anchors(anchors, [targets[i]], MATCHER)
        one = {k: v[i : i + 1] for k, v in out.items()}
        singles.append(detection_losses(one, anchors, a, BOX_CODER, LossSettings(loss_norm="per_image")))
        num_pos.append(max(1.0, a.num_pos_per_image.item()))
    assignment = assign_anchors(anchors, targets, MATCHER)
    per_image = detection_losses(out, anchors, assignment, BOX_CODER, LossSettings(loss_norm="per_image"))
    batch = detection_losses(out, anchors, assignment, BOX_CODER, LossSettings(loss_norm="batch"))
    assert num_pos[0] != num_pos[1]  # otherwise the two normalisations coincide
    for key in ("classification", "bbox_regression", "objectness"):
        mean = (singles[0][key] + singles[1][key]) / 2
        pooled = (singles[0][key] * num_pos[0] + singles[1][key] * num_pos[1]) / sum(num_pos)
        torch.testing.assert_close(per_image[key], mean)
        torch.testing.assert_close(batch[key], pooled)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_iou_target_controls_gradient_into_regression(detach):
    out = _head_outputs()
    out["bbox_deltas"][0, 0] = torch.tensor([0.1, 0.0, 0.0, 0.0])
    out["bbox_deltas"].requires_grad_(True)
    out["obj_logits"][0, 0] = 1.0  # d BCE / d target = -logit: non-zero
    out["obj_logits"].requires_grad_(True)
    settings = LossSettings(detach_iou_target=detach)
    losses = detection_losses(out, ANCHORS, assign_anchors(ANCHORS, [GT], MATCHER), BOX_CODER, settings)
    grad, obj_grad = torch.autograd.grad(
        losses["objectness"], [out["bbox_deltas"], out["obj_logits"]], allow_unused=True, materialize_grads=True
    )
    assert obj_grad.abs().sum() > 0
    if detach:
        assert grad.abs().sum() == 0
    else:
        # d loss / d dx = -logit * d IoU / d dx; the box is [10 dx, 0, 10 + 10 dx, 10], so
        # IoU = (1 - dx) / (1 + dx) and d IoU / d dx = -2 / (1 + dx)^2 = -2 / 1.21.
        assert grad[0, 0, 0].item() == pytest.approx(2 / 1.21, rel=1e-4)


def test_objectness_loss_ce_is_bce_with_logits_and_unknown_kind_fails():
    logits, targets = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.3, 0.9, 0.1])
    expected = [-(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))
                for x, t in zip(logits.tolist(), targets.tolist())]
    torch.testing.assert_close(objectness_loss(logits, targets, "ce"), torch.tensor(expected))
    torch.testing.assert_close(objectness_loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets, reduction="none"))
    with pytest.raises(ValueError):
        objectness_loss(logits, targets, "nope")


# --- objectness-loss options (RetinaNet-Conf Table 2) ------------------------------------------

# Logits 0, ln 3, -ln 4 are probabilities 0.5, 0.75, 0.2; targets 0.3, 0.9, 0.6: |p - y| = 0.2, 0.15, 0.4.
OBJ_LOGITS = torch.tensor([0.0, math.log(3.0), -math.log(4.0)])
OBJ_TARGETS = torch.tensor([0.3, 0.9, 0.6])
# BCE(p, y) = -(y ln p + (1 - y) ln(1 - p)):
#   p 0.5:  ln 2                                  = 0.693147
#   p 0.75: 0.9 * 0.287682 + 0.1 * 1.386294       = 0.397543
#   p 0.2:  0.6 * 1.609438 + 0.4 * 0.223144       = 1.054920
OBJ_BCE = [0.693147, 0.397543, 1.054920]


@pytest.mark.parametrize(
    "kind, options, expected",
    [
        ("ce", {}, OBJ_BCE),
        ("ce_w", {}, OBJ_BCE),  # the positives' part; the negatives are added in detection_losses
        ("l1", {}, [0.2, 0.15, 0.4]),
        ("l2", {}, [0.04, 0.0225, 0.16]),
        # beta 1 (default): every |p - y| <= 1 is in the quadratic part, 0.5 d^2.
        ("smooth_l1", {}, [0.02, 0.01125, 0.08]),
        # beta 0.25: 0.5 d^2 / 0.25 = 2 d^2 for 0.2 and 0.15; 0.4 - 0.5 * 0.25 = 0.275 for 0.4.
        ("smooth_l1", {"smooth_l1_beta": 0.25}, [0.08, 0.045, 0.275]),
        # gamma 2: d^2 * BCE = 0.04 * 0.693147, 0.0225 * 0.397543, 0.16 * 1.054920.
        ("gfocal", {}, [0.027726, 0.008945, 0.168787]),
        # gamma 1: d * BCE = 0.2 * 0.693147, 0.15 * 0.397543, 0.4 * 1.054920.
        ("gfocal", {"gfocal_gamma": 1.0}, [0.138629, 0.059631, 0.421968]),
    ],
)
def test_objectness_losses_by_hand(kind, options, expected):
    out = objectness_loss(OBJ_LOGITS, OBJ_TARGETS, kind, **options)
    torch.testing.assert_close(out, torch.tensor(expected), atol=2e-6, rtol=0)


def test_objectness_losses_are_zero_at_the_target_except_bce():
    logits = torch.tensor([-1.0, 0.5])
    targets = torch.sigmoid(logits)
    for kind in ("l1", "l2", "smooth_l1", "gfocal"):
        assert objectness_loss(logits, targets, kind).abs().max().item() < 1e-6
    # BCE at p = y is the entropy of y, not 0 (its gradient is 0 there).
    assert objectness_loss(logits, targets, "ce").min().item() > 0.5


def test_ce_w_adds_weighted_negatives_under_the_positives_normaliser():
    out = _head_outputs()
    out["bbox_deltas"][0, 0] = torch.tensor([0.1, 0.0, 0.0, 0.0])  # IoU target 90 / 110
    out["obj_logits"][0] = torch.tensor([1.0, 0.0, math.log(3.0), 5.0])
    assignment = assign_anchors(ANCHORS, [GT], MATCHER)  # anchor 0 positive, 1 and 2 negative, 3 ignored
    losses = detection_losses(out, ANCHORS, assignment, BOX_CODER, LossSettings(obj_loss="ce_w", obj_neg_weight=0.1))
    # Positive: BCE(logit 1, 90/110) = 1.3132617 - 0.8181818. Negatives (target 0): softplus(0) = ln 2 and
    # softplus(ln 3) = ln 4; the ignored anchor (logit 5) does not count. Sum over 1 positive:
    expected = (1.3132617 - 90 / 110) + 0.1 * (math.log(2.0) + math.log(4.0))
    assert losses["objectness"].item() == pytest.approx(expected, abs=1e-5)
    plain = detection_losses(out, ANCHORS, assignment, BOX_CODER, LossSettings(obj_loss="ce"))
    assert plain["objectness"].item() == pytest.approx(1.3132617 - 90 / 110, abs=1e-5)


@pytest.mark.parametrize("kind", ["l1", "smooth_l1", "l2", "gfocal"])
def test_positive_only_objectness_losses_in_detection_losses(kind):
    out = _head_outputs()
    out["bbox_deltas"][0, 0] = torch.tensor([0.1, 0.0, 0.0, 0.0])
    out["obj_logits"][0] = torch.tensor([1.0, 3.0, 3.0, 3.0])  # negatives' logits must not matter
    losses = detection_losses(out, ANCHORS, assign_anchors(ANCHORS, [GT], MATCHER), BOX_CODER, LossSettings(obj_loss=kind))
    expected = objectness_loss(torch.tensor([1.0]), torch.tensor([90 / 110]), kind)
    torch.testing.assert_close(losses["objectness"], expected[0])


# --- DR loss ----------------------------------------------------------------------------------


def _dr_case():
    """One image, 3 anchors, 2 classes. Anchor 0 is a positive of class 1 (p 0.8), its class 0 has
    p 0.2; anchor 1 is negative (p 0.3, 0.1); anchor 2 is ignored (p 0.9, 0.9: must not count)."""
    prob = torch.tensor([[[0.2, 0.8], [0.3, 0.1], [0.9, 0.9]]])
    pos = torch.zeros(1, 3, 2, dtype=torch.bool)
    pos[0, 0, 1] = True
    valid = torch.tensor([[True, True, False]])
    return prob.logit(), pos, valid[..., None] & ~pos


def test_dr_loss_by_hand():
    logits, pos, neg = _dr_case()
    # λ⁻ = 0.1 / ln 3.5, so the negatives' weights exp(p / λ⁻) are 3.5^(10 p): 3.5^2 = 12.25 (p 0.2),
    # 3.5^3 = 42.875 (p 0.3), 3.5^1 = 3.5 (p 0.1). E⁻ = (12.25 * 0.2 + 42.875 * 0.3 + 3.5 * 0.1) / 58.625
    # = 15.6625 / 58.625 = 0.267164. One positive: E⁺ = 0.8.
    # Loss = (4 / 6) * ln(1 + exp(6 * (0.267164 - 0.8 + 0.5))) = (2 / 3) * ln(1 + exp(-0.197015)) = 0.399656.
    assert dr_loss(logits, pos, neg).item() == pytest.approx(0.3996558, abs=1e-5)


def test_dr_loss_positive_distribution_and_image_without_positives():
    logits, pos, neg = _dr_case()
    # A second positive pair, p 0.6 (the ignored anchor's class 0 made positive): λ⁺ = 1, weights
    # exp(-p): E⁺ = (0.8 e^-0.8 + 0.6 e^-0.6) / (e^-0.8 + e^-0.6) = 0.690033, below the mean 0.7:
    # the softmax of -p leans on the worse positive.
    logits[0, 2, 0] = torch.tensor(0.6).logit()
    pos[0, 2, 0] = True
    assert dr_loss(logits, pos, neg).item() == pytest.approx(0.6340506, abs=1e-5)
    # No positives: E⁺ = 1, loss = (2 / 3) ln(1 + exp(6 * (0.267164 - 0.5))) = 0.147339.
    assert dr_loss(logits, torch.zeros_like(pos), neg).item() == pytest.approx(0.1473391, abs=1e-5)


def test_dr_loss_reductions_per_image_mean_and_pooled_batch():
    logits, pos, neg = _dr_case()
    flat = torch.zeros(1, 3, 2)  # every p = 0.5: E⁻ = E⁺ = 0.5, loss (2 / 3) ln(1 + e^3) = 2.032392
    both_logits, both_pos, both_neg = torch.cat([logits, flat]), torch.cat([pos, pos]), torch.cat([neg, neg])
    assert dr_loss(flat, pos, neg).item() == pytest.approx(2.0323916, abs=1e-5)
    assert dr_loss(both_logits, both_pos, both_neg, "image").item() == pytest.approx((0.3996558 + 2.0323916) / 2, abs=1e-5)
    # Pooled: negatives {0.2, 0.3, 0.1, 0.5, 0.5, 0.5}, weights 3.5^(10 p); positives {0.8, 0.5}.
    lam = 0.1 / math.log(3.5)
    negs, poss = [0.2, 0.3, 0.1, 0.5, 0.5, 0.5], [0.8, 0.5]
    e_neg = sum(p * math.exp(p / lam) for p in negs) / sum(math.exp(p / lam) for p in negs)
    e_pos = sum(p * math.exp(-p) for p in poss) / sum(math.exp(-p) for p in poss)
    pooled = (4 / 6) * math.log1p(math.exp(6 * (e_neg - e_pos + 0.5)))
    assert dr_loss(both_logits, both_pos, both_neg, "batch").item() == pytest.approx(pooled, abs=1e-5)


def test_dr_loss_is_stable_for_extreme_logits_and_has_gradients():
    logits = torch.tensor([[[30.0, -30.0], [-30.0, 30.0]]], requires_grad=True)
    pos = torch.tensor([[[True, False], [False, False]]])
    loss = dr_loss(logits, pos, ~pos)
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(logits.grad).all())
    # E⁻ ≈ 1 (the negative with p ≈ 1 dominates), E⁺ ≈ 1: (2 / 3) ln(1 + e^3) again.
    assert loss.item() == pytest.approx(2.0323916, abs=1e-4)


def test_dr_classification_loss_in_detection_losses_leaves_out_ignored_anchors():
    out = _head_outputs(obj=False)  # all p = 0.5
    out["cls_logits"][0, 3] = 10.0  # the ignored anchor: would raise E⁻ if it counted
    losses = detection_losses(out, ANCHORS, assign_anchors(ANCHORS, [GT], MATCHER), BOX_CODER, LossSettings(cls_loss="dr"))
    # Every counted p = 0.5: (4 / 6) ln(1 + e^3); not divided by the number of positives.
    assert losses["classification"].item() == pytest.approx((4 / 6) * math.log1p(math.exp(3.0)), abs=1e-5)


# --- quality focal loss and class-probability box weights (harmonized) -------------------------


def test_quality_focal_soft_targets_in_detection_losses():
    out = _head_outputs(obj=False)  # all p = 0.5; BCE(0.5, y) = ln 2 for every y
    out["bbox_deltas"][0, 0] = torch.tensor([0.1, 0.0, 0.0, 0.0])  # predicted IoU 90 / 110
    settings = LossSettings(cls_loss="quality_focal")
    losses = detection_losses(out, ANCHORS, assign_anchors(ANCHORS, [GT], MATCHER), BOX_CODER, settings)
    # Positive pair (anchor 0, class 1): target 0.818182, |y - p|^2 = 0.318182^2 = 0.101240.
    # Five other counted pairs with target 0: 0.5^2 = 0.25 each. Ignored anchor 3 left out.
    expected = ((90 / 110 - 0.5) ** 2 + 5 * 0.25) * math.log(2.0)
    assert losses["classification"].item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(quality_focal_loss(torch.zeros(2), torch.tensor([0.5, 1.0])),
                               torch.tensor([0.0, 0.25 * math.log(2.0)]))


# Two ground truths matched exactly by anchors 0 and 1; anchor 2 is a negative.
ANCHORS2 = torch.tensor([[0.0, 0.0, 10.0, 20.0], [30.0, 30.0, 50.0, 40.0], [60.0, 60.0, 70.0, 70.0]])
GT2 = {"boxes": ANCHORS2[:2].clone(), "labels": torch.tensor([0, 1])}


def _two_positive_outputs():
    out = _head_outputs(num_anchors=3, obj=False)
    out["bbox_deltas"][0, 0] = torch.tensor([0.1, 0.0, 0.0, 0.0])  # box [1, 0, 11, 20]: L1 0.1
    out["bbox_deltas"][0, 1] = torch.tensor([0.0, 0.0, 0.3, 0.0])  # width 20 e^0.3 about x = 40: L1 0.3
    return out


def test_box_loss_weighted_by_normalised_class_probability():
    out = _two_positive_outputs()
    out["cls_logits"][0, 0, 0] = torch.tensor(0.8).logit()  # anchor 0's gt class 0: p 0.8
    out["cls_logits"][0, 1, 1] = torch.tensor(0.2).logit()  # anchor 1's gt class 1: p 0.2
    assignment = assign_anchors(ANCHORS2, [GT2], MATCHER)
    plain = detection_losses(out, ANCHORS2, assignment, BOX_CODER, LossSettings())
    weighted = detection_losses(out, ANCHORS2, assignment, BOX_CODER, LossSettings(box_weight_by_cls=True))
    assert plain["bbox_regression"].item() == pytest.approx((0.1 + 0.3) / 2, abs=1e-6)
    # Weights p / mean(p) = 0.8 / 0.5, 0.2 / 0.5 = 1.6, 0.4: (1.6 * 0.1 + 0.4 * 0.3) / 2 positives.
    assert weighted["bbox_regression"].item() == pytest.approx((1.6 * 0.1 + 0.4 * 0.3) / 2, abs=1e-6)
    torch.testing.assert_close(mean_normalised(torch.tensor([0.8, 0.2, 0.3]), torch.tensor([0, 0, 1]), 2),
                               torch.tensor([1.6, 0.4, 1.0]))


# --- DC loss ----------------------------------------------------------------------------------


def test_dc_coefficient_by_hand():
    gt = torch.tensor([[0.0, 0.0, 10.0, 20.0]] * 3)  # centre (5, 10), w / h = 0.5, diagonal sqrt(500)
    pred = torch.tensor([[1.0, 0.0, 11.0, 20.0], [0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 20.0, 20.0]])
    eps = 1e-6
    # Box 0: centre off by (1, 0) px, same aspect ratio. gt_wh: (1 / 10)^2 = 0.01 -> 1 / sigmoid(0.01);
    # gt_diag: 1 / 500 = 0.002; none: 1 px^2 -> 1 / sigmoid(1) = 1 / 0.731059.
    # Box 1: perfect -> 1 / (0.5 + eps) = 2: the largest coefficient.
    # Box 2: centre (10, 10), offset (5 / 10)^2 = 0.25; w / h 1 vs 0.5 -> 1 / (sigmoid(0.25) + tanh(0.5)).
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = {
        "gt_wh": [1 / (sig(0.01) + eps), 1 / (0.5 + eps), 1 / (sig(0.25) + math.tanh(0.5) + eps)],
        "gt_diag": [1 / (sig(0.002) + eps), 1 / (0.5 + eps), 1 / (sig(25 / 500) + math.tanh(0.5) + eps)],
        "none": [1 / (sig(1.0) + eps), 1 / (0.5 + eps), 1 / (sig(25.0) + math.tanh(0.5) + eps)],
    }
    for norm, values in expected.items():
        torch.testing.assert_close(dc_coefficient(pred, gt, norm), torch.tensor(values), atol=1e-6, rtol=0)
    assert dc_coefficient(pred, gt)[2].item() == pytest.approx(1 / (0.562177 + 0.462117), abs=1e-5)  # 0.976283


def test_dc_normalisation_keeps_each_groups_loss_and_redistributes_it():
    coefficient, loss = torch.tensor([2.0, 1.0, 1.5, 0.5]), torch.tensor([1.0, 3.0, 2.0, 0.0])
    # Group 0 (positives 0, 1): ΣL = 4, Σ λL = 2 + 3 = 5 -> λ' = λ * 4 / 5 = 1.6, 0.8; Σ λ'L = 1.6 + 2.4 = 4.
    # Group 1 (positives 2, 3): ΣL = 2, Σ λL = 3 -> λ' = 1.5 * 2 / 3 = 1.0, 0.5 * 2 / 3 = 0.3333.
    out = dc_normalise(coefficient, loss, torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(out, torch.tensor([1.6, 0.8, 1.0, 1 / 3]))
    # One group over all four: ΣL = 6, Σ λL = 2 + 3 + 3 + 0 = 8 -> λ * 0.75.
    torch.testing.assert_close(dc_normalise(coefficient, loss, torch.zeros(4, dtype=torch.int64), 1), coefficient * 0.75)
    # A group whose positives have no loss keeps weight 1.
    torch.testing.assert_close(dc_normalise(coefficient[:1], torch.zeros(1), torch.zeros(1, dtype=torch.int64), 1), torch.ones(1))


def test_dc_loss_keeps_the_total_and_scales_each_positives_gradient_by_its_coefficient():
    assignment = assign_anchors(ANCHORS2, [GT2], MATCHER)
    grads = {}
    for dc in (False, True):
        out = _two_positive_outputs()
        out["cls_logits"].requires_grad_(True)
        losses = detection_losses(out, ANCHORS2, assignment, BOX_CODER, LossSettings(dc_loss=dc))
        grads[dc] = (losses["classification"], torch.autograd.grad(losses["classification"], out["cls_logits"])[0])
    # All p = 0.5: both positive anchors have the same focal loss L, so λ' = 2 λ_i / (λ_0 + λ_1) and
    # Σ λ' L = Σ L: the loss value is unchanged, only its split between the positives moves.
    assert grads[True][0].item() == pytest.approx(grads[False][0].item(), abs=1e-6)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    lam0 = 1 / (sig(0.01) + 1e-6)  # anchor 0: centre 1 px off on a 10 px wide gt
    lam1 = 1 / (0.5 + math.tanh(abs(20 * math.exp(0.3) / 10 - 2.0)) + 1e-6)  # anchor 1: wider, same centre
    for anchor, lam in ((0, lam0), (1, lam1)):
        torch.testing.assert_close(grads[True][1][0, anchor], grads[False][1][0, anchor] * 2 * lam / (lam0 + lam1))
    torch.testing.assert_close(grads[True][1][0, 2], grads[False][1][0, 2])  # negatives untouched


# --- IoU-classification-aware assignment -------------------------------------------------------


def test_intersection_over_min_area_by_hand():
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    anchors = torch.tensor([[5.0, 5.0, 15.0, 15.0], [10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    # Inside: 100 / 100; corner overlap 10 x 10 over min(400, 400); disjoint.
    torch.testing.assert_close(intersection_over_min_area(gt, anchors), torch.tensor([[1.0, 0.25, 0.0]]))


def test_iac_labels_on_hand_made_anchors():
    gt = {"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 60.0, 60.0]]), "labels": torch.tensor([0, 1])}
    anchors = torch.tensor([
        [0.0, 0.0, 20.0, 20.0],  # 0: IoU 1 with gt 0                             -> positive by IoU
        [5.0, 5.0, 15.0, 15.0],  # 1: inside gt 0, IoU 0.25; p 0.6: s = 0.3 + 0.5 = 0.8  -> promoted
        [10.0, 10.0, 30.0, 30.0],  # 2: IoU 100/700; IoMin 0.25, p 0.9: s = 0.45 + 0.125 = 0.575 -> negative
        [0.0, 0.0, 20.0, 9.0],  # 3: inside, IoU 180/400 = 0.45 (ignored); p 0.5: s = 0.75 -> promoted (>=)
        [0.0, 0.0, 20.0, 9.0],  # 4: same box, p 0.4: s = 0.7                      -> stays ignored
        [5.0, 5.0, 15.0, 15.0],  # 5: as anchor 1 but p(class 0) 0.1, p(class 1) 0.99: s = 0.55 -> negative
        [45.0, 45.0, 55.0, 55.0],  # 6: inside gt 1, IoU 0.25; p(class 1) 0.8: s = 0.9 -> promoted to gt 1
        [40.0, 40.0, 60.0, 60.0],  # 7: IoU 1 with gt 1                             -> positive by IoU
    ])
    cls_prob = torch.tensor([[0.5, 0.5], [0.6, 0.2], [0.9, 0.1], [0.5, 0.1], [0.4, 0.1], [0.1, 0.99], [0.1, 0.8], [0.5, 0.5]])
    plain = assign_anchors(anchors, [gt], MATCHER)
    assert plain.matched_idxs.tolist() == [[0, -1, -1, -2, -2, -1, -1, 1]]
    iac = assign_anchors(anchors, [gt], MATCHER, cls_prob=cls_prob[None], iac=IacSettings(alpha=0.5, score_thresh=0.75))
    assert iac.matched_idxs.tolist() == [[0, 0, -1, 0, -2, -1, 1, 1]]
    assert iac.pos_anchor.tolist() == [0, 1, 3, 6, 7] and iac.pos_gt_labels.tolist() == [0, 0, 0, 1, 1]
    scores = iac_scores(gt["boxes"], gt["labels"], anchors, cls_prob, 0.5)  # [G, A]
    torch.testing.assert_close(scores[0, :3], torch.tensor([0.75, 0.8, 0.575]))  # anchor 0: 0.25 + 0.5
    # alpha 0: geometry alone; IoMin 1 for anchors 1, 3-6 inside a gt -> all of them promoted.
    geometry = assign_anchors(anchors, [gt], MATCHER, cls_prob=cls_prob[None], iac=IacSettings(alpha=0.0, score_thresh=0.75))
    assert geometry.matched_idxs.tolist() == [[0, 0, -1, 0, 0, 0, 1, 1]]
