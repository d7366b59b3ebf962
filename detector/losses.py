"""Anchor assignment and the training losses, batched over the images of a step.

Assignment is torchvision's `Matcher` (one call per image, its IoU matrix needs the image's own
ground truth); everything after it works on [B, A] tensors with no per-image or per-anchor loop.
Boxes are x1, y1, x2, y2 in pixels of the batched (resized) images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou, sigmoid_focal_loss

LOSS_NORMS = ("batch", "per_image")
OBJ_LOSSES = ("ce",)


@dataclass(frozen=True)
class LossSettings:
    focal_alpha: float = 0.25  # weight of positives in focal loss
    focal_gamma: float = 2.0  # focusing exponent of focal loss
    loss_norm: str = "batch"  # "batch": / positives of the batch; "per_image": per image, then mean
    obj_loss: str = "ce"  # objectness loss, one of OBJ_LOSSES
    obj_loss_weight: float = 1.0  # weight of the objectness loss in the total
    detach_iou_target: bool = True  # stop the gradient through the IoU target into the regression


@dataclass
class Assignment:
    """Which ground truth each anchor of each image learns from.

    matched_idxs [B, A] int64: index into that image's gt boxes, -1 background, -2 ignored
        (IoU between bg and fg thresholds), as torchvision's Matcher returns.
    pos_image, pos_anchor [P]: image and anchor index of every positive (foreground) anchor.
    pos_gt_boxes [P, 4]: the ground-truth box of each positive. pos_gt_labels [P]: its class.
    """

    matched_idxs: Tensor
    pos_image: Tensor
    pos_anchor: Tensor
    pos_gt_boxes: Tensor
    pos_gt_labels: Tensor

    @property
    def num_pos_per_image(self) -> Tensor:
        """[B] positives per image (float, for normalising)."""
        num_images = self.matched_idxs.shape[0]
        return torch.bincount(self.pos_image, minlength=num_images).to(torch.float32)


def assign_anchors(anchors: Tensor, targets: list[dict[str, Tensor]], matcher: det_utils.Matcher) -> Assignment:
    """Match the anchors [A, 4] (shared by all images of the batch) to each image's `boxes` [G, 4]."""
    matched = []
    for target in targets:
        if target["boxes"].numel() == 0:
            matched.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device))
        else:
            matched.append(matcher(box_iou(target["boxes"], anchors)))  # [A]
    matched_idxs = torch.stack(matched)  # [B, A]

    pos_image, pos_anchor = torch.nonzero(matched_idxs >= 0, as_tuple=True)  # [P], [P]
    # Index the batch's concatenated ground truth: offset of each image + index within it.
    num_gt = torch.tensor([len(t["boxes"]) for t in targets], device=anchors.device)
    gt_offset = torch.cumsum(num_gt, 0) - num_gt  # [B]
    flat_gt = gt_offset[pos_image] + matched_idxs[pos_image, pos_anchor]  # [P]
    gt_boxes = torch.cat([t["boxes"] for t in targets])  # [sum G, 4]
    gt_labels = torch.cat([t["labels"] for t in targets])  # [sum G]
    return Assignment(matched_idxs, pos_image, pos_anchor, gt_boxes[flat_gt], gt_labels[flat_gt])


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of boxes1[i] with boxes2[i]: [N, 4], [N, 4] xyxy -> [N] (0 for empty unions)."""
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    union = area1 + area2 - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def iou_targets(pos_deltas: Tensor, pos_anchors: Tensor, pos_gt_boxes: Tensor, box_coder: det_utils.BoxCoder) -> Tensor:
    """Objectness target of each positive anchor: IoU(decoded predicted box, its ground truth) -> [P].

    The predicted box is decoded from the regression output without clipping to the image.
    """
    pred_boxes = box_coder.decode_single(pos_deltas, pos_anchors)  # [P, 4]
    return paired_box_iou(pred_boxes, pos_gt_boxes)


def objectness_loss(pos_logits: Tensor, pos_targets: Tensor, kind: str = "ce") -> Tensor:
    """Element-wise objectness loss of the positive anchors: logits [P], targets in [0, 1] [P] -> [P].

    "ce": binary cross-entropy with logits against the soft IoU target (RetinaNet-Conf eq. 9).
    Variants that also train on negatives (the paper's Table 2) add their terms beside this one.
    """
    if kind == "ce":
        return F.binary_cross_entropy_with_logits(pos_logits, pos_targets, reduction="none")
    raise ValueError(f"unknown objectness loss {kind!r}")


def normalise_loss(sum_per_image: Tensor, num_pos_per_image: Tensor, mode: str) -> Tensor:
    """Turn per-image loss sums [B] into one loss.

    "batch" (MMDetection): total over the batch / max(1, positives in the batch).
    "per_image" (torchvision): mean over images of sum / max(1, positives of that image).
    """
    if mode == "batch":
        return sum_per_image.sum() / num_pos_per_image.sum().clamp(min=1)
    return (sum_per_image / num_pos_per_image.clamp(min=1)).mean()


def _sum_per_image(values: Tensor, image_idx: Tensor, num_images: int) -> Tensor:
    """Sum `values` [P] into their images: -> [B]."""
    return torch.zeros(num_images, dtype=values.dtype, device=values.device).index_add(0, image_idx, values)


def detection_losses(
    head_outputs: dict[str, Tensor],
    anchors: Tensor,
    assignment: Assignment,
    box_coder: det_utils.BoxCoder,
    settings: LossSettings,
) -> dict[str, Tensor]:
    """Focal classification loss, L1 loss on encoded deltas and (with a branch) the objectness loss.

    head_outputs: `cls_logits` [B, A, C], `bbox_deltas` [B, A, 4], optional `obj_logits` [B, A];
    anchors [A, 4] shared by the batch. Returns `classification`, `bbox_regression` and, with
    `obj_logits`, `objectness` (already multiplied by `obj_loss_weight`), each a scalar.
    """
    cls_logits = head_outputs["cls_logits"].float()  # [B, A, C]
    bbox_deltas = head_outputs["bbox_deltas"].float()  # [B, A, 4]
    num_images = cls_logits.shape[0]
    a = assignment
    num_pos = a.num_pos_per_image  # [B]

    # Classification: one-hot targets on positives, ignored anchors (-2) left out.
    cls_targets = torch.zeros_like(cls_logits)
    cls_targets[a.pos_image, a.pos_anchor, a.pos_gt_labels] = 1.0
    valid = a.matched_idxs != det_utils.Matcher.BETWEEN_THRESHOLDS  # [B, A]
    focal = sigmoid_focal_loss(
        cls_logits, cls_targets, alpha=settings.focal_alpha, gamma=settings.focal_gamma, reduction="none"
    )  # [B, A, C]
    # Sum over classes before masking: the mask then costs one pass over [B, A], not [B, A, C].
    cls_sum = (focal.sum(dim=2) * valid).sum(dim=1)  # [B]

    # Box regression: L1 between predicted and target deltas of the positives.
    pos_anchors = anchors[a.pos_anchor]  # [P, 4]
    pos_deltas = bbox_deltas[a.pos_image, a.pos_anchor]  # [P, 4]
    target_deltas = box_coder.encode_single(a.pos_gt_boxes, pos_anchors)  # [P, 4]
    box_sum = _sum_per_image((pos_deltas - target_deltas).abs().sum(dim=1), a.pos_image, num_images)

    losses = {
        "classification": normalise_loss(cls_sum, num_pos, settings.loss_norm),
        "bbox_regression": normalise_loss(box_sum, num_pos, settings.loss_norm),
    }
    if "obj_logits" in head_outputs:
        pos_logits = head_outputs["obj_logits"].float()[a.pos_image, a.pos_anchor]  # [P]
        deltas_for_target = pos_deltas.detach() if settings.detach_iou_target else pos_deltas
        targets = iou_targets(deltas_for_target, pos_anchors, a.pos_gt_boxes, box_coder)  # [P]
        obj_sum = _sum_per_image(objectness_loss(pos_logits, targets, settings.obj_loss), a.pos_image, num_images)
        losses["objectness"] = settings.obj_loss_weight * normalise_loss(obj_sum, num_pos, settings.loss_norm)
    return losses
