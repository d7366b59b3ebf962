"""From head outputs to candidates, NMS survivors and detections — one code path for eval and ledger.

For one image: per FPN level, every (anchor, class) pair gets a ranking score (the class
probability, or the joint obj^e · cls^(1−e) score of a branch model); pairs with score >
`score_thresh` enter, at most `topk` per level (`conf_skip_p7`: the original RetinaNet-Conf code's
rule instead, see `_select_level_original`); their boxes are decoded and clipped; class-wise NMS
(torchvision's `batched_nms`) picks survivors; the `max_det` best survivors are the detections.
With CL-balanced NMS (`cl_nms`) NMS chooses its survivors by a second score, the detector's score
plus the box's closeness to its NMS cluster's weighted centre (`cl_nms_score`); that score only
chooses, it does not rank: the detections, their order and the ledger's `score` keep the detector's
own score.
Boxes are x1, y1, x2, y2 in pixels of the resized (network input) image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

log = logging.getLogger(__name__)

# Losers processed per block when looking for their suppressor (bounds the [L, S] IoU matrix).
_SUPPRESSOR_BLOCK = 2048


@dataclass(frozen=True)
class PostprocessSettings:
    score_thresh: float = 0.05  # a pair enters NMS only with score > score_thresh
    topk: int = 1000  # at most this many pairs per FPN level enter NMS (conf_skip_p7: anchors, all their classes)
    nms_thresh: float = 0.5  # NMS drops a box whose IoU with a better one of its class is > this
    max_det: int = 100  # detections kept per image after NMS
    obj_exponent: float | None = None  # e in obj^e · cls^(1−e); None: rank by cls alone
    # Original RetinaNet-Conf code (MMDetection v1): a level with more than topk anchors ranks by
    # obj^e · cls^(1−e) and keeps its top-k anchors (all classes); the others keep every anchor at cls^(1−e).
    conf_skip_p7: bool = False
    cl_nms: bool = False  # CL-balanced NMS: rank by score + centre-closeness term (`cl_nms_scores`)
    cl_nms_weight: float = 1.0  # β: the closeness term of a box centred exactly on its cluster's centre
    cl_nms_temperature: float = 1.0  # T in the cluster centre's softmax(score / T) weights


def joint_score(cls_prob: Tensor, obj_prob: Tensor, obj_exponent: float) -> Tensor:
    """obj^e · cls^(1−e): cls_prob [A, C], obj_prob [A] -> [A, C]."""
    return obj_prob.unsqueeze(-1).pow(obj_exponent) * cls_prob.pow(1.0 - obj_exponent)


def _select_level(score: Tensor, settings: PostprocessSettings) -> tuple[Tensor, Tensor]:
    """Pairs of one level entering NMS: score [A_l, C] -> (flat indices [K_l], their scores [K_l])."""
    flat = score.flatten()  # [A_l * C]
    flat_idx = torch.nonzero(flat > settings.score_thresh).squeeze(1)
    top_scores, order = flat[flat_idx].topk(min(settings.topk, flat_idx.numel()))
    return flat_idx[order], top_scores


def _select_level_original(cls_prob: Tensor, obj_prob: Tensor, settings: PostprocessSettings) -> tuple[Tensor, Tensor]:
    """`_select_level` as the original RetinaNet-Conf code does it (`conf_skip_p7`).

    Every pair's score is cls^(1−e). Only on a level with more than `topk` anchors are the scores
    multiplied by obj^e and the level cut to its `topk` anchors with the best max-over-classes score
    (MMDetection's nms_pre: top-k over anchors, every class of a chosen anchor kept). A smaller level
    keeps all its anchors and no obj factor: at 600×1000 that is P7, on small images more levels.
    Then score > score_thresh per pair. Returns (flat indices [K_l] into [A_l, C], scores [K_l]),
    score-descending.
    """
    e = settings.obj_exponent
    score = cls_prob.pow(1.0 - e)  # [A_l, C]
    anchors = torch.arange(score.shape[0], device=score.device)  # [A_l]
    if score.shape[0] > settings.topk:
        score = obj_prob.unsqueeze(-1).pow(e) * score  # = joint_score, bit for bit
        anchors = score.max(dim=1).values.topk(settings.topk).indices  # [topk]
    num_classes = score.shape[1]
    flat = (anchors.unsqueeze(1) * num_classes + torch.arange(num_classes, device=score.device)).flatten()
    flat_scores = score.flatten()[flat]
    passed = flat_scores > settings.score_thresh
    flat, flat_scores = flat[passed], flat_scores[passed]
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    return flat[order], flat_scores[order]


def select_candidates(
    cls_logits: Tensor,
    obj_logits: Tensor | None,
    num_anchors_per_level: list[int],
    settings: PostprocessSettings,
) -> dict[str, Tensor]:
    """The (anchor, class) pairs of one image that enter NMS.

    cls_logits [A, C], obj_logits [A] or None. Returns `anchor_idx`, `labels`, `level`, `score`,
    `cls_score`, `obj_score` (NaN without a branch), each [K], levels in order, score-descending
    within a level.
    """
    num_classes = cls_logits.shape[1]
    keys = ("anchor_idx", "labels", "level", "score", "cls_score", "obj_score")
    parts: dict[str, list[Tensor]] = {k: [] for k in keys}
    # One sigmoid over all anchors, so the probabilities equal the ledger's raw ones bit for bit.
    cls_prob_all = torch.sigmoid(cls_logits.float())  # [A, C]
    obj_prob_all = None if obj_logits is None else torch.sigmoid(obj_logits.float())  # [A]
    start = 0
    for level, num_anchors in enumerate(num_anchors_per_level):
        cls_prob = cls_prob_all[start : start + num_anchors]  # [A_l, C]
        obj_prob = None if obj_prob_all is None else obj_prob_all[start : start + num_anchors]
        if obj_prob is None or settings.obj_exponent is None:
            flat_idx, top_scores = _select_level(cls_prob, settings)
        elif settings.conf_skip_p7:
            flat_idx, top_scores = _select_level_original(cls_prob, obj_prob, settings)
        else:
            flat_idx, top_scores = _select_level(joint_score(cls_prob, obj_prob, settings.obj_exponent), settings)
        anchor_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")  # [K_l]
        labels = flat_idx % num_classes
        parts["anchor_idx"].append(anchor_idx + start)
        parts["labels"].append(labels)
        parts["level"].append(torch.full_like(labels, level))
        parts["score"].append(top_scores)
        parts["cls_score"].append(cls_prob[anchor_idx, labels])
        no_obj = torch.full_like(top_scores, float("nan"))
        parts["obj_score"].append(no_obj if obj_prob is None else obj_prob[anchor_idx])
        start += num_anchors
    return {k: torch.cat(v) for k, v in parts.items()}


def nms_clusters(boxes: Tensor, scores: Tensor, labels: Tensor, nms_thresh: float) -> Tensor:
    """Cluster of each candidate under class-wise greedy NMS: [K, 4], [K], [K] -> [K] candidate indices.

    A survivor heads its own cluster; every other box belongs to the survivor that suppresses it.
    Candidates must be sorted by score descending (index order = score order).
    """
    survivors = torch.sort(batched_nms(boxes, scores, labels, nms_thresh)).values
    suppressed_by = find_suppressors(boxes, scores, labels, survivors, nms_thresh)
    own = torch.arange(len(scores), device=scores.device)
    return torch.where(suppressed_by >= 0, suppressed_by, own)


def cluster_centres(boxes: Tensor, scores: Tensor, cluster: Tensor, temperature: float = 1.0) -> Tensor:
    """Formula 6: each cluster's centre, the softmax(score / T)-weighted mean of its boxes' centres.

    boxes [K, 4] xyxy, scores [K], cluster [K] (index of each box's cluster, in 0..K-1) ->
    [K, 2] the centre of the cluster each box belongs to.
    """
    logits = scores / temperature  # [K]
    top = torch.full_like(logits, -torch.inf).scatter_reduce(0, cluster, logits, "amax")  # [K] per cluster
    weights = torch.exp(logits - top[cluster])  # [K], stable: at most 1
    total = torch.zeros_like(weights).index_add(0, cluster, weights)  # [K]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # [K, 2]
    weighted = torch.zeros_like(centres).index_add(0, cluster, centres * weights[:, None])  # [K, 2]
    return weighted[cluster] / total[cluster, None]


def cl_nms_scores(boxes: Tensor, scores: Tensor, labels: Tensor, settings: PostprocessSettings) -> Tensor:
    """Formula 7: the CL-balanced NMS score s = score + dis(centre, cluster centre) -> [K].

    Clusters are those of greedy NMS on `scores` (`nms_clusters`); dis = β · max(0, 1 − d / r),
    d the distance from the box's centre to its cluster's centre (`cluster_centres`), r half the
    box's diagonal. A box on the centre gains β, one a half-diagonal away or further gains 0.
    boxes [K, 4] xyxy, scores [K], labels [K], sorted by score descending.
    """
    cluster = nms_clusters(boxes, scores, labels, settings.nms_thresh)
    centre = cluster_centres(boxes, scores, cluster, settings.cl_nms_temperature)  # [K, 2]
    own_centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half_diag = (boxes[:, 2:] - boxes[:, :2]).norm(dim=1).clamp(min=1e-6) / 2  # [K]
    closeness = (1 - (own_centre - centre).norm(dim=1) / half_diag).clamp(min=0)  # [K]
    return scores + settings.cl_nms_weight * closeness


def postprocess_image(
    cls_logits: Tensor,
    bbox_deltas: Tensor,
    obj_logits: Tensor | None,
    anchors: Tensor,
    num_anchors_per_level: list[int],
    image_size: tuple[int, int],
    box_coder: det_utils.BoxCoder,
    settings: PostprocessSettings,
) -> dict[str, Tensor]:
    """Candidates of one image, sorted by score (descending, ties by level and index), with NMS result.

    cls_logits [A, C], bbox_deltas [A, 4], obj_logits [A] or None, anchors [A, 4], image_size (h, w)
    of the resized image. Returns the fields of `select_candidates` plus `boxes` [K, 4] (decoded,
    clipped), `cl_nms_score` [K] (`cl_nms_scores`; NaN without CL-NMS), `survivors` [S] (candidate
    indices kept by NMS, ascending = score-descending) and `kept` [K] bool (the first `max_det`
    survivors). The detections are the kept rows, in order. With `settings.cl_nms`, NMS chooses the
    survivors by `cl_nms_score`; the entering, the max_det cut and `score` are the detector's own.
    """
    cand = select_candidates(cls_logits, obj_logits, num_anchors_per_level, settings)
    order = torch.sort(cand["score"], descending=True, stable=True).indices
    cand = {k: v[order] for k, v in cand.items()}
    idx = cand["anchor_idx"]
    boxes = box_coder.decode_single(bbox_deltas[idx].float(), anchors[idx])  # [K, 4]
    cand["boxes"] = clip_boxes_to_image(boxes, image_size)
    if settings.cl_nms:
        cand["cl_nms_score"] = cl_nms_scores(cand["boxes"], cand["score"], cand["labels"], settings)
    else:
        cand["cl_nms_score"] = torch.full_like(cand["score"], float("nan"))
    nms_score = cand["cl_nms_score"] if settings.cl_nms else cand["score"]
    survivors = batched_nms(cand["boxes"], nms_score, cand["labels"], settings.nms_thresh)
    # Candidates are in score order, so ascending indices rank the survivors by the detector's score.
    survivors = torch.sort(survivors).values
    kept = torch.zeros_like(cand["score"], dtype=torch.bool)
    kept[survivors[: settings.max_det]] = True
    cand["survivors"] = survivors
    cand["kept"] = kept
    return cand


def find_suppressors(boxes: Tensor, scores: Tensor, labels: Tensor, survivors: Tensor, nms_thresh: float) -> Tensor:
    """Which NMS survivor suppressed each candidate (greedy NMS's suppressor); -1 for survivors.

    boxes [K, 4] xyxy, scores [K], labels [K], survivors [S] candidate indices sorted by score
    descending. For a suppressed candidate: the highest-scoring survivor of the same class with
    IoU > nms_thresh and score ≥ its own. Returns int64 [K] of candidate indices.
    """
    suppressed_by = torch.full_like(labels, -1, dtype=torch.int64)
    is_survivor = torch.zeros_like(labels, dtype=torch.bool)
    is_survivor[survivors] = True
    losers = torch.nonzero(~is_survivor).squeeze(1)
    # Only a survivor of the same class can suppress, so match class by class: the IoU matrices
    # are [L_c, S_c] instead of [L, S], about num_classes times less work.
    for label in torch.unique(labels[losers]):
        class_losers = losers[labels[losers] == label]
        class_survivors = survivors[labels[survivors] == label]
        if class_survivors.numel() == 0:
            continue
        for block in class_losers.split(_SUPPRESSOR_BLOCK):
            first = _first_suppressor(boxes[block], scores[block], boxes[class_survivors], scores[class_survivors], nms_thresh)
            suppressed_by[block] = class_survivors[first]
    return suppressed_by


def _pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[L, 4], [S, 4] -> [L, S]: torchvision's `box_iou` bit for bit, one coordinate at a time (no
    [L, S, 2] temporaries: about half the time of the suppressor search, the dump's largest cost)."""
    if boxes1.dtype in (torch.float16, torch.bfloat16):  # box_iou's _upcast
        boxes1, boxes2 = boxes1.float(), boxes2.float()
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter = torch.minimum(boxes1[:, None, 2], boxes2[None, :, 2]).sub_(torch.maximum(boxes1[:, None, 0], boxes2[None, :, 0]))
    inter.clamp_(min=0)
    height = torch.minimum(boxes1[:, None, 3], boxes2[None, :, 3]).sub_(torch.maximum(boxes1[:, None, 1], boxes2[None, :, 1]))
    inter.mul_(height.clamp_(min=0))
    union = (area1[:, None] + area2[None, :]).sub_(inter)
    return inter.div_(union)


def _first_suppressor(loser_boxes: Tensor, loser_scores: Tensor, survivor_boxes: Tensor, survivor_scores: Tensor,
                      nms_thresh: float) -> Tensor:
    """[L] index into the survivors (score-descending, one class) of each loser's suppressor."""
    iou = _pairwise_iou(loser_boxes, survivor_boxes)  # [L, S]
    eligible = survivor_scores[None, :] >= loser_scores[:, None]  # [L, S]
    overlaps = eligible & (iou > nms_thresh)
    first = overlaps.to(torch.uint8).argmax(dim=1)  # first True = highest-scoring survivor
    found = overlaps.any(dim=1)
    if not bool(found.all()):
        # Only when NMS's IoU and box_iou round differently at exactly the threshold: fall back
        # to the eligible survivor with the largest overlap.
        log.debug("%d suppressed boxes matched by largest overlap", int((~found).sum()))
        nearest = torch.where(eligible, iou, torch.full_like(iou, -1.0)).argmax(dim=1)
        first = torch.where(found, first, nearest)
    return first
