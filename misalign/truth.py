"""Truth columns of the ledger: how well each box is really localised, and the raw threshold counts.

Everything is per image, NumPy, boxes x1, y1, x2, y2 in original-image pixels, COCO IoU (no "+1",
`misalign.boxes.box_iou`). Crowd ground truth is ignored everywhere (it is neither a match nor a
positive). Threshold counts are strict `>` and compare in the values' own dtype, as
`values > 0.6` does in NumPy 2 (a float32 score of float32(0.6) is not > 0.6).

Public API:
- match_truth(pred_boxes, pred_category, gt_boxes, gt_category, gt_ids, gt_iscrowd) -> (iou, gt_id, iou_any)
- crowd_ignored(pred_boxes, pred_category, iou, gt_boxes, gt_category, gt_iscrowd) -> [N] bool
- truth_columns(pred_boxes, pred_category, gt_boxes, gt_category, gt_ids, gt_iscrowd) -> {iou, gt_id, iou_any, crowd}
- max_iou_any(boxes, gt_boxes, gt_iscrowd) -> [N] float32
- count_positive_anchors(anchors, gt_boxes, gt_iscrowd) -> int (IoU > POSITIVE_IOU)
- threshold_counts(values, thresholds) -> [T] int64
- raw_counts_rows(image_id, raw_cls, raw_iou, anchor_iou=None) -> DataFrame (RAW_COUNT_SCHEMA columns)
- raw_counts_frame(image_id, values) -> the same rows from counts already taken, in RAW_COUNT_LAYOUT order
- positive_anchors(values) -> int: num_pos_anchors from such counts
- CLS_THRESHOLDS, IOU_THRESHOLDS: the paper's Table 1 thresholds; RAW_COUNT_LAYOUT, RAW_COUNT_WIDTH
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from misalign.boxes import box_area, box_iou

CLS_THRESHOLDS = (0.05, 0.5, 0.6, 0.7, 0.8, 0.9)  # Table 1: cls > t
IOU_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # Table 1: IoU > t
POSITIVE_IOU = 0.5  # a positive anchor has IoU > 0.5 with a gt box (the paper's Positive_NUM)
CROWD_IOU = 0.5  # the COCOeval IoU threshold at which `crowd` marks the boxes it would ignore
# raw_counts.parquet's rows of one image, in order: (values counted, stage, quantity, thresholds). A
# producer that counts elsewhere (the dump counts on the model's device) returns counts in this order.
RAW_COUNT_LAYOUT = (("raw_cls", "raw", "cls", CLS_THRESHOLDS), ("raw_iou", "raw", "iou", IOU_THRESHOLDS),
                    ("anchor_iou", "anchors", "iou", IOU_THRESHOLDS))
RAW_COUNT_WIDTH = sum(len(thresholds) for *_, thresholds in RAW_COUNT_LAYOUT)


def match_truth(pred_boxes, pred_category, gt_boxes, gt_category, gt_ids, gt_iscrowd):
    """Truth columns of N predictions of one image against its M ground-truth boxes.

    pred_boxes [N, 4] xyxy, pred_category [N] (dataset ids), gt_boxes [M, 4] xyxy, gt_category [M],
    gt_ids [M] annotation ids, gt_iscrowd [M] (crowd boxes are ignored).
    Returns
    - iou [N] float32: max IoU with a non-crowd gt of the same category, 0 if none overlaps;
    - gt_id [N] int64: annotation id of that gt; -1 when iou is 0. Ties go to the lowest gt index;
    - iou_any [N] float32: max IoU with a non-crowd gt of any category, 0 if none.
    """
    pred_category = np.asarray(pred_category).reshape(-1)
    usable = ~np.asarray(gt_iscrowd, dtype=bool).reshape(-1)  # [M]
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)[usable]
    gt_category = np.asarray(gt_category).reshape(-1)[usable]
    gt_ids = np.asarray(gt_ids, dtype=np.int64).reshape(-1)[usable]
    num = len(pred_category)
    if len(gt_ids) == 0 or num == 0:
        return np.zeros(num, np.float32), np.full(num, -1, np.int64), np.zeros(num, np.float32)
    pairwise = box_iou(pred_boxes, gt_boxes)  # [N, M']
    same = np.where(pred_category[:, None] == gt_category[None, :], pairwise, 0.0)  # [N, M']
    best = same.argmax(axis=1)  # [N]; argmax returns the first of equal maxima
    iou = same[np.arange(num), best]
    gt_id = np.where(iou > 0, gt_ids[best], -1)
    return iou.astype(np.float32), gt_id.astype(np.int64), pairwise.max(axis=1).astype(np.float32)


def crowd_ignored(pred_boxes, pred_category, iou, gt_boxes, gt_category, gt_iscrowd) -> np.ndarray:
    """[N] bool: the predictions COCOeval ignores at IoU CROWD_IOU instead of counting them as false.

    COCOeval matches a detection to a crowd region of its category when it matches no ordinary
    ground truth and covers the region by intersection / (the detection's own area) >= the
    threshold; such a detection is neither a true nor a false positive. Here "matches no ordinary
    ground truth" is `iou` < CROWD_IOU (the same-category IoU of `match_truth`), ignoring which
    higher-scored box COCOeval's greedy matching may have given that ground truth to.
    pred_boxes [N, 4] xyxy, pred_category [N], iou [N]; gt_boxes [M, 4], gt_category [M], gt_iscrowd [M].
    """
    pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    crowd = np.asarray(gt_iscrowd, dtype=bool).reshape(-1)
    result = np.zeros(len(pred_boxes), bool)
    if not crowd.any() or not len(pred_boxes):
        return result
    regions = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)[crowd]  # [R, 4]
    same = np.asarray(pred_category).reshape(-1)[:, None] == np.asarray(gt_category).reshape(-1)[crowd][None, :]
    top_left = np.maximum(pred_boxes[:, None, :2], regions[None, :, :2])  # [N, R, 2]
    wh = np.clip(np.minimum(pred_boxes[:, None, 2:], regions[None, :, 2:]) - top_left, 0, None)
    own_area = box_area(pred_boxes)[:, None]  # [N, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        cover = np.where(own_area > 0, wh[..., 0] * wh[..., 1] / own_area, 0.0)  # [N, R]
    covered = (np.where(same, cover, 0.0) >= CROWD_IOU).any(axis=1)
    return covered & (np.asarray(iou).reshape(-1) < np.float32(CROWD_IOU))


def max_iou_any(boxes, gt_boxes, gt_iscrowd) -> np.ndarray:
    """[N] float32: each box's max IoU with any non-crowd gt box (0 if there is none)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)[~np.asarray(gt_iscrowd, dtype=bool).reshape(-1)]
    if len(gt_boxes) == 0:
        return np.zeros(len(boxes), np.float32)
    return box_iou(boxes, gt_boxes).max(axis=1).astype(np.float32)


def count_positive_anchors(anchors, gt_boxes, gt_iscrowd) -> int:
    """Anchors [A, 4] xyxy with IoU > POSITIVE_IOU to some non-crowd gt: the paper's Positive_NUM.

    Strict `>` on the float32 IoU, exactly the raw_counts 'anchors' / 'iou' > 0.5 count. (Training's
    assigner takes IoU >= 0.5 plus low-quality matches as foreground; this count is the paper's.)
    """
    return int(threshold_counts(max_iou_any(anchors, gt_boxes, gt_iscrowd), [POSITIVE_IOU])[0])


def threshold_counts(values, thresholds) -> np.ndarray:
    """[T] int64: how many of `values` [N] are > each threshold (NaN counts nowhere).

    Compared in the values' dtype (float32 scores against float32(t)), like `values > t` in NumPy 2.
    """
    values = np.asarray(values).reshape(-1)
    dtype = values.dtype if values.dtype.kind == "f" else np.float64
    thresholds = np.asarray(thresholds, dtype=dtype)
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values.astype(np.float64)
    ordered = np.sort(values)
    return (len(ordered) - np.searchsorted(ordered, thresholds, side="right")).astype(np.int64)


def raw_counts_rows(image_id: int, raw_cls, raw_iou, anchor_iou=None) -> pd.DataFrame:
    """One image's raw_counts rows (long format: image_id, stage, quantity, threshold, count).

    raw_cls [A]: each anchor's max class probability; raw_iou [A]: max IoU of each anchor's
    decoded box with any non-crowd gt; anchor_iou [A]: the same for the anchor box itself
    (None: no 'anchors' stage). Stage 'raw' gets cls > CLS_THRESHOLDS and iou > IOU_THRESHOLDS,
    stage 'anchors' iou > IOU_THRESHOLDS.
    """
    values = {"raw_cls": raw_cls, "raw_iou": raw_iou, "anchor_iou": anchor_iou}
    layout = [part for part in RAW_COUNT_LAYOUT if values[part[0]] is not None]
    counts = [threshold_counts(values[source], thresholds) for source, _, _, thresholds in layout]
    return _counts_frame(image_id, layout, np.concatenate(counts))


def raw_counts_frame(image_id: int, values) -> pd.DataFrame:
    """raw_counts_rows' rows from counts taken elsewhere: values [RAW_COUNT_WIDTH] in RAW_COUNT_LAYOUT order."""
    values = np.asarray(values).reshape(-1)
    if len(values) != RAW_COUNT_WIDTH:
        raise ValueError(f"raw_counts_frame: {len(values)} counts, expected {RAW_COUNT_WIDTH}")
    return _counts_frame(image_id, RAW_COUNT_LAYOUT, values)


def positive_anchors(values) -> int:
    """num_pos_anchors (anchors with IoU > POSITIVE_IOU) from counts in RAW_COUNT_LAYOUT order."""
    start = 0
    for source, _, _, thresholds in RAW_COUNT_LAYOUT:
        if source == "anchor_iou":
            return int(np.asarray(values).reshape(-1)[start + thresholds.index(POSITIVE_IOU)])
        start += len(thresholds)
    raise AssertionError("RAW_COUNT_LAYOUT has no anchor_iou counts")


def _counts_frame(image_id: int, layout, counts: np.ndarray) -> pd.DataFrame:
    stage = [name for _, name, _, thresholds in layout for _ in thresholds]
    quantity = [what for _, _, what, thresholds in layout for _ in thresholds]
    threshold = [t for *_, thresholds in layout for t in thresholds]
    return pd.DataFrame({
        "image_id": np.full(len(stage), image_id, np.int64),
        "stage": stage,
        "quantity": quantity,
        "threshold": np.asarray(threshold, np.float64),
        "count": np.asarray(counts, np.int64),
    })


def truth_columns(pred_boxes, pred_category, gt_boxes, gt_category, gt_ids, gt_iscrowd) -> dict[str, np.ndarray]:
    """The ledger's truth columns of N predictions of one image: iou, gt_id, iou_any (`match_truth`)
    and crowd (`crowd_ignored`); arguments as `match_truth`'s."""
    iou, gt_id, iou_any = match_truth(pred_boxes, pred_category, gt_boxes, gt_category, gt_ids, gt_iscrowd)
    crowd = crowd_ignored(pred_boxes, pred_category, iou, gt_boxes, gt_category, gt_iscrowd)
    return {"iou": iou, "gt_id": gt_id, "iou_any": iou_any, "crowd": crowd}
