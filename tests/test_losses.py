"""Losses and assignment: hand-worked cases and torchvision's Matcher/BoxCoder as references."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from detector.losses import (
    LossSettings,
    assign_anchors,
    detection_losses,
    iou_targets,
    normalise_loss,
    objectness_loss,
    paired_box_iou,
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
