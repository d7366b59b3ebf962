"""Anchor assignment and the training losses, batched over the images of a step.

Assignment is torchvision's `Matcher` (one call per image, its IoU matrix needs the image's own
ground truth), optionally extended by the DC paper's IoU-classification-aware rule; everything after
it works on [B, A] tensors with no per-image or per-anchor loop. Besides RetinaNet's focal + L1
losses: the objectness-loss options of RetinaNet-Conf's Table 2, DR loss, the quality focal loss and
class-weighted box loss of our `harmonized` reading, and the DC loss (docs/methods.md has the formulas).
Boxes are x1, y1, x2, y2 in pixels of the batched (resized) images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou, sigmoid_focal_loss

LOSS_NORMS = ("batch", "per_image")
# Objectness losses of the RetinaNet-Conf paper's Table 2 (all on the positives; ce_w adds the negatives).
OBJ_LOSSES = ("ce", "ce_w", "l1", "smooth_l1", "l2", "gfocal")
# Classification losses: RetinaNet's focal loss, DR loss, and the soft-label focal loss of `harmonized`.
CLS_LOSSES = ("focal", "dr", "quality_focal")
DR_REDUCTIONS = ("image", "batch")
# How the DC loss scales the centre offset before squaring it (see `dc_coefficient`).
DC_CENTER_NORMS = ("gt_wh", "gt_diag", "none")

# DR loss constants (Qian et al.; docs/methods.md): temperatures of the two distributions, the margin,
# and the smoothing L and scale tau of the logistic loss.
DR_POS_LAMBDA = 1.0
DR_NEG_LAMBDA = 0.1 / math.log(3.5)
DR_MARGIN = 0.5
DR_L = 6.0
DR_TAU = 4.0
DC_EPS = 1e-6  # epsilon of the DC coefficient's denominator (formula 1)


@dataclass(frozen=True)
class LossSettings:
    focal_alpha: float = 0.25  # weight of positives in focal loss
    focal_gamma: float = 2.0  # focusing exponent of focal loss
    loss_norm: str = "batch"  # "batch": / positives of the batch; "per_image": per image, then mean
    obj_loss: str = "ce"  # objectness loss, one of OBJ_LOSSES
    obj_loss_weight: float = 1.0  # weight of the objectness loss in the total
    detach_iou_target: bool = True  # stop the gradient through the IoU target into the regression
    obj_neg_weight: float = 1e-4  # obj_loss "ce_w": weight of each negative anchor's BCE (target 0)
    obj_gfocal_gamma: float = 2.0  # obj_loss "gfocal": exponent of |y − p|
    obj_smooth_l1_beta: float = 1.0  # obj_loss "smooth_l1": quadratic below |y − p| = beta
    cls_loss: str = "focal"  # one of CLS_LOSSES
    dr_reduction: str = "image"  # DR loss: "image" (mean of per-image losses) | "batch" (pooled)
    box_weight_by_cls: bool = False  # weight each positive's box loss by its normalised class probability
    dc_loss: bool = False  # DC loss: reweight positives' classification loss by the localisation quality
    dc_center_norm: str = "gt_wh"  # one of DC_CENTER_NORMS


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


@dataclass(frozen=True)
class IacSettings:
    """IoU-classification-aware assignment (DC paper, formulas 4–5)."""

    alpha: float = 0.5  # weight of the class probability in s = alpha · p + (1 − alpha) · inter / min area
    score_thresh: float = 0.75  # anchors with s >= this become positives even below fg_iou_thresh


def intersection_over_min_area(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection / area of the smaller box: [N, 4], [M, 4] xyxy -> [N, M] (0 where both are empty)."""
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)  # [N, M]
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)  # [N]
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)  # [M]
    min_area = torch.min(area1[:, None], area2[None, :])  # [N, M]
    return torch.where(min_area > 0, inter / min_area.clamp(min=1e-12), torch.zeros_like(inter))


def iac_scores(gt_boxes: Tensor, gt_labels: Tensor, anchors: Tensor, cls_prob: Tensor, alpha: float) -> Tensor:
    """IoU-classification-aware score of every (gt, anchor) pair (formula 4) -> [G, A].

    s = alpha · p + (1 − alpha) · area(gt ∩ anchor) / min(area(gt), area(anchor)), where p is the
    anchor's current (detached) probability of the gt's class. gt_boxes [G, 4], gt_labels [G],
    anchors [A, 4] xyxy in pixels, cls_prob [A, C].
    """
    prob = cls_prob[:, gt_labels].T  # [G, A]
    return alpha * prob + (1.0 - alpha) * intersection_over_min_area(gt_boxes, anchors)


def promote_by_iac(matched_idxs: Tensor, scores: Tensor, score_thresh: float) -> Tensor:
    """Formula 5 on top of the IoU matcher: matched_idxs [A] (-1 negative, -2 ignored), scores [G, A] -> [A].

    An anchor that is not already positive by IoU becomes a positive of the gt with its highest
    score when that score is >= score_thresh; IoU positives keep their gt.
    """
    best_score, best_gt = scores.max(dim=0)  # [A], [A]
    promote = (matched_idxs < 0) & (best_score >= score_thresh)
    return torch.where(promote, best_gt, matched_idxs)


def assign_anchors(
    anchors: Tensor,
    targets: list[dict[str, Tensor]],
    matcher: det_utils.Matcher,
    *,
    cls_prob: Tensor | None = None,
    iac: IacSettings | None = None,
) -> Assignment:
    """Match the anchors [A, 4] (shared by all images of the batch) to each image's `boxes` [G, 4].

    With `iac` (and the detached class probabilities `cls_prob` [B, A, C]) the IoU matcher's
    labels are extended by the IoU-classification-aware rule (`promote_by_iac`).
    """
    matched = []
    for i, target in enumerate(targets):
        if target["boxes"].numel() == 0:
            matched.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device))
            continue
        image_matched = matcher(box_iou(target["boxes"], anchors))  # [A]
        if iac is not None:
            scores = iac_scores(target["boxes"], target["labels"], anchors, cls_prob[i], iac.alpha)  # [G, A]
            image_matched = promote_by_iac(image_matched, scores, iac.score_thresh)
        matched.append(image_matched)
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


def positive_alignment(head_outputs: dict[str, Tensor], anchors: Tensor, assignment: Assignment,
                       box_coder: det_utils.BoxCoder) -> dict[str, Tensor]:
    """What log.csv's alignment columns are measured on (misalign.training), per positive anchor [P], detached.

    `cls_prob`: the probability of its ground truth's class; `iou`: IoU of its decoded box with that
    ground truth (`iou_targets`, the objectness target); `obj_prob`: its objectness probability, NaN
    without a branch.
    """
    a = assignment
    with torch.no_grad():
        cls_logits = head_outputs["cls_logits"][a.pos_image, a.pos_anchor, a.pos_gt_labels].float()  # [P]
        deltas = head_outputs["bbox_deltas"][a.pos_image, a.pos_anchor].float()  # [P, 4]
        iou = iou_targets(deltas, anchors[a.pos_anchor], a.pos_gt_boxes, box_coder)
        if "obj_logits" in head_outputs:
            obj_prob = torch.sigmoid(head_outputs["obj_logits"][a.pos_image, a.pos_anchor].float())
        else:
            obj_prob = torch.full_like(iou, float("nan"))
    return {"cls_prob": torch.sigmoid(cls_logits), "iou": iou, "obj_prob": obj_prob}


def quality_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """Element-wise |y − p|^gamma · BCE(p, y) with p = sigmoid(logits), soft targets y in [0, 1].

    Generalized Focal Loss's quality focal loss (the RetinaNet-Conf paper's "GFocal", eq. 13):
    zero when p = y, focal-like down-weighting of pairs already close to their target. Any shape.
    """
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (torch.sigmoid(logits) - targets).abs().pow(gamma) * bce


def objectness_loss(
    pos_logits: Tensor, pos_targets: Tensor, kind: str = "ce", *, gfocal_gamma: float = 2.0, smooth_l1_beta: float = 1.0
) -> Tensor:
    """Element-wise objectness loss of the positive anchors: logits [P], targets y in [0, 1] [P] -> [P].

    p = sigmoid(logit). "ce" and "ce_w": BCE(p, y) (RetinaNet-Conf eq. 9; ce_w's negatives are
    added by `negative_objectness_loss`); "l1": |p − y|; "smooth_l1": 0.5 (p − y)² / beta below
    beta, |p − y| − 0.5 beta above; "l2": (p − y)²; "gfocal": |y − p|^gfocal_gamma · BCE(p, y).
    """
    if kind in ("ce", "ce_w"):
        return F.binary_cross_entropy_with_logits(pos_logits, pos_targets, reduction="none")
    if kind == "gfocal":
        return quality_focal_loss(pos_logits, pos_targets, gfocal_gamma)
    prob = torch.sigmoid(pos_logits)
    if kind == "l1":
        return (prob - pos_targets).abs()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(prob, pos_targets, beta=smooth_l1_beta, reduction="none")
    if kind == "l2":
        return (prob - pos_targets).square()
    raise ValueError(f"unknown objectness loss {kind!r}")


def negative_objectness_loss(obj_logits: Tensor, matched_idxs: Tensor) -> Tensor:
    """BCE against target 0 summed over each image's negative anchors: [B, A], [B, A] -> [B].

    Negatives are the anchors below the background threshold (-1); ignored anchors (-2) are left out.
    """
    negative = matched_idxs == det_utils.Matcher.BELOW_LOW_THRESHOLD  # [B, A]
    return (F.softplus(obj_logits) * negative).sum(dim=1)  # softplus(x) = BCE(sigmoid(x), 0)


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


# --- DR loss ------------------------------------------------------------------------------------


def _softmax_weighted_mean(values: Tensor, weight_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, Σ softmax(weight_logits) · values over the masked entries: [G, N] x3 -> ([G], has_any [G]).

    Rows without a masked entry give 0 (and has_any False).
    """
    z = torch.where(mask, weight_logits, torch.full_like(weight_logits, -math.inf))  # [G, N]
    lse = torch.logsumexp(z, dim=1, keepdim=True)  # [G, 1]; -inf for empty rows
    has_any = mask.any(dim=1)
    lse = torch.where(has_any[:, None], lse, torch.zeros_like(lse))
    weights = torch.exp(z - lse)  # [G, N], 0 off the mask
    return (weights * values).sum(dim=1), has_any


def dr_loss(cls_logits: Tensor, pos_mask: Tensor, neg_mask: Tensor, reduction: str = "image") -> Tensor:
    """Distributional-ranking loss (Qian et al. 2020) of a batch: cls_logits, pos_mask, neg_mask [B, A, C] -> scalar.

    p = sigmoid(logits). Per group (an image, or the whole batch with reduction "batch"):
    E⁻ = Σ softmax(p⁻ / λ⁻) · p⁻ over the negative pairs, E⁺ = Σ softmax(−p⁺ / λ⁺) · p⁺ over the
    positive pairs, loss = (τ / L) · log(1 + exp(L · (E⁻ − E⁺ + margin))). A group without
    positive pairs uses E⁺ = 1 (as the public code does: only its negatives are pushed down).
    "image" returns the mean over images; no division by the number of positives.
    """
    prob = torch.sigmoid(cls_logits.float())
    num_groups = prob.shape[0] if reduction == "image" else 1
    prob, pos_mask, neg_mask = (x.reshape(num_groups, -1) for x in (prob, pos_mask, neg_mask))  # [G, N]
    neg_mean, _ = _softmax_weighted_mean(prob, prob / DR_NEG_LAMBDA, neg_mask)  # [G]
    pos_mean, has_pos = _softmax_weighted_mean(prob, -prob / DR_POS_LAMBDA, pos_mask)  # [G]
    pos_mean = torch.where(has_pos, pos_mean, torch.ones_like(pos_mean))
    loss = (DR_TAU / DR_L) * F.softplus(DR_L * (neg_mean - pos_mean + DR_MARGIN))  # [G]
    return loss.mean()


# --- DC loss and mutual-labelling weights -------------------------------------------------------


def _centre_and_size(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """[N, 4] xyxy -> centres [N, 2], sizes (w, h) [N, 2]."""
    return (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]


def dc_coefficient(pred_boxes: Tensor, gt_boxes: Tensor, center_norm: str = "gt_wh") -> Tensor:
    """Dynamic coefficient λ of each positive (DC paper, formula 1): [P, 4], [P, 4] xyxy -> [P].

    λ = 1 / (sigmoid(d²) + tanh(|w/h − ŵ/ĥ|) + ε), d² the squared distance between the predicted
    and the gt centre, its components divided by the gt's width and height ("gt_wh"), by the gt's
    diagonal ("gt_diag") or left in pixels ("none"). λ lies in (0.5, 2]: 2 for a perfect box.
    """
    pred_centre, pred_size = _centre_and_size(pred_boxes)
    gt_centre, gt_size = _centre_and_size(gt_boxes)
    offset = pred_centre - gt_centre  # [P, 2]
    if center_norm == "gt_wh":
        offset = offset / gt_size.clamp(min=1e-6)
    elif center_norm == "gt_diag":
        offset = offset / gt_size.norm(dim=1, keepdim=True).clamp(min=1e-6)
    sq_dist = offset.square().sum(dim=1)  # [P]
    pred_ratio = pred_size[:, 0] / pred_size[:, 1].clamp(min=1e-6)
    gt_ratio = gt_size[:, 0] / gt_size[:, 1].clamp(min=1e-6)
    return 1.0 / (torch.sigmoid(sq_dist) + torch.tanh((pred_ratio - gt_ratio).abs()) + DC_EPS)


def dc_normalise(coefficient: Tensor, pos_cls_loss: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Formula 2: λ' = λ · Σ L_cls / Σ λ · L_cls, the sums over the positives of each group.

    coefficient, pos_cls_loss, group (group index of each positive) [P] -> [P]. The weighted
    positives' loss of each group then sums to its unweighted loss: λ' only redistributes it.
    A group whose positives have zero loss keeps λ' = 1.
    """
    plain = _sum_per_image(pos_cls_loss, group, num_groups)  # [G]
    weighted = _sum_per_image(coefficient * pos_cls_loss, group, num_groups)  # [G]
    scale = torch.where(weighted > 0, plain / weighted.clamp(min=1e-12), torch.zeros_like(plain))
    return torch.where(weighted[group] > 0, coefficient * scale[group], torch.ones_like(coefficient))


def mean_normalised(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """values [P] divided by the mean of their group's values -> [P] (each group then averages 1)."""
    total = _sum_per_image(values, group, num_groups)  # [G]
    count = _sum_per_image(torch.ones_like(values), group, num_groups)  # [G]
    mean = total / count.clamp(min=1)
    return values / mean[group].clamp(min=1e-12)


# --- all losses of a step ----------------------------------------------------------------------


def _classification_per_anchor(cls_logits: Tensor, cls_targets: Tensor, settings: LossSettings) -> Tensor:
    """Focal (one-hot targets) or quality focal (soft targets) loss summed over classes: [B, A, C] -> [B, A]."""
    if settings.cls_loss == "quality_focal":
        return quality_focal_loss(cls_logits, cls_targets, settings.focal_gamma).sum(dim=2)
    focal = sigmoid_focal_loss(
        cls_logits, cls_targets, alpha=settings.focal_alpha, gamma=settings.focal_gamma, reduction="none"
    )  # [B, A, C]
    return focal.sum(dim=2)


def _group_of_positives(a: Assignment, mode: str) -> tuple[Tensor, int]:
    """Group index [P] of every positive for a normalisation over the batch (one group) or per image."""
    if mode == "batch":
        return torch.zeros_like(a.pos_image), 1
    return a.pos_image, a.matched_idxs.shape[0]


def detection_losses(
    head_outputs: dict[str, Tensor],
    anchors: Tensor,
    assignment: Assignment,
    box_coder: det_utils.BoxCoder,
    settings: LossSettings,
) -> dict[str, Tensor]:
    """Classification loss, L1 loss on encoded deltas and (with a branch) the objectness loss.

    head_outputs: `cls_logits` [B, A, C], `bbox_deltas` [B, A, 4], optional `obj_logits` [B, A];
    anchors [A, 4] shared by the batch. Returns `classification`, `bbox_regression` and, with
    `obj_logits`, `objectness` (already multiplied by `obj_loss_weight`), each a scalar.
    The classification loss is focal loss, DR loss or quality focal loss (`settings.cls_loss`),
    optionally reweighted on the positives by the DC coefficient; the box loss of each positive is
    optionally weighted by its normalised class probability (`box_weight_by_cls`).
    """
    cls_logits = head_outputs["cls_logits"].float()  # [B, A, C]
    bbox_deltas = head_outputs["bbox_deltas"].float()  # [B, A, 4]
    num_images = cls_logits.shape[0]
    a = assignment
    num_pos = a.num_pos_per_image  # [B]
    group, num_groups = _group_of_positives(a, settings.loss_norm)

    pos_anchors = anchors[a.pos_anchor]  # [P, 4]
    pos_deltas = bbox_deltas[a.pos_image, a.pos_anchor]  # [P, 4]
    target_deltas = box_coder.encode_single(a.pos_gt_boxes, pos_anchors)  # [P, 4]
    pos_iou = iou_targets(pos_deltas.detach(), pos_anchors, a.pos_gt_boxes, box_coder)  # [P], no gradient

    # Classification: targets 1 (or the IoU of the predicted box) on positives, ignored anchors (-2) left out.
    valid = a.matched_idxs != det_utils.Matcher.BETWEEN_THRESHOLDS  # [B, A]
    cls_targets = torch.zeros_like(cls_logits)
    soft = settings.cls_loss == "quality_focal"
    cls_targets[a.pos_image, a.pos_anchor, a.pos_gt_labels] = pos_iou if soft else 1.0
    if settings.cls_loss == "dr":
        classification = dr_loss(cls_logits, cls_targets > 0, valid[..., None] & (cls_targets == 0), settings.dr_reduction)
    else:
        # Sum over classes before masking: the mask then costs one pass over [B, A], not [B, A, C].
        cls_per_anchor = _classification_per_anchor(cls_logits, cls_targets, settings) * valid  # [B, A]
        if settings.dc_loss:
            cls_per_anchor = _apply_dc(cls_per_anchor, pos_deltas, pos_anchors, a, box_coder, settings, group, num_groups)
        classification = normalise_loss(cls_per_anchor.sum(dim=1), num_pos, settings.loss_norm)

    # Box regression: L1 between predicted and target deltas of the positives.
    box_per_pos = (pos_deltas - target_deltas).abs().sum(dim=1)  # [P]
    if settings.box_weight_by_cls:
        pos_prob = torch.sigmoid(cls_logits.detach()[a.pos_image, a.pos_anchor, a.pos_gt_labels])  # [P]
        box_per_pos = box_per_pos * mean_normalised(pos_prob, group, num_groups)
    box_sum = _sum_per_image(box_per_pos, a.pos_image, num_images)

    losses = {
        "classification": classification,
        "bbox_regression": normalise_loss(box_sum, num_pos, settings.loss_norm),
    }
    if "obj_logits" in head_outputs:
        losses["objectness"] = _objectness(head_outputs["obj_logits"].float(), pos_deltas, pos_anchors, a, box_coder, settings)
    return losses


def _apply_dc(cls_per_anchor: Tensor, pos_deltas: Tensor, pos_anchors: Tensor, a: Assignment,
              box_coder: det_utils.BoxCoder, settings: LossSettings, group: Tensor, num_groups: int) -> Tensor:
    """Multiply the classification loss [B, A] of each positive anchor by its normalised DC coefficient λ'.

    λ' is a weight: computed from the detached predicted boxes and losses, no gradient through it.
    """
    pred_boxes = box_coder.decode_single(pos_deltas.detach(), pos_anchors)  # [P, 4]
    coefficient = dc_coefficient(pred_boxes, a.pos_gt_boxes, settings.dc_center_norm)  # [P]
    pos_loss = cls_per_anchor[a.pos_image, a.pos_anchor]  # [P]
    scale = dc_normalise(coefficient, pos_loss.detach(), group, num_groups)  # [P]
    weights = torch.ones_like(cls_per_anchor)
    weights[a.pos_image, a.pos_anchor] = scale
    return cls_per_anchor * weights


def _objectness(obj_logits: Tensor, pos_deltas: Tensor, pos_anchors: Tensor, a: Assignment,
                box_coder: det_utils.BoxCoder, settings: LossSettings) -> Tensor:
    """The weighted objectness loss: obj_logits [B, A] -> scalar, normalised like the other losses."""
    num_images = obj_logits.shape[0]
    pos_logits = obj_logits[a.pos_image, a.pos_anchor]  # [P]
    deltas_for_target = pos_deltas.detach() if settings.detach_iou_target else pos_deltas
    targets = iou_targets(deltas_for_target, pos_anchors, a.pos_gt_boxes, box_coder)  # [P]
    per_pos = objectness_loss(pos_logits, targets, settings.obj_loss, gfocal_gamma=settings.obj_gfocal_gamma,
                              smooth_l1_beta=settings.obj_smooth_l1_beta)  # [P]
    obj_sum = _sum_per_image(per_pos, a.pos_image, num_images)  # [B]
    if settings.obj_loss == "ce_w":
        # Negatives join with a small weight, under the same normaliser (the number of positives).
        obj_sum = obj_sum + settings.obj_neg_weight * negative_objectness_loss(obj_logits, a.matched_idxs)
    return settings.obj_loss_weight * normalise_loss(obj_sum, a.num_pos_per_image, settings.loss_norm)
