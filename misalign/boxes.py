"""Box formats and IoU in NumPy, COCO convention (no "+1" on widths).

COCO JSON stores `[x, y, w, h]`; everything inside misalign is `x1, y1, x2, y2` in pixels of the
original image. xywh_to_xyxy and xyxy_to_xywh are the one place where the formats meet; nms_suppressors
attributes each box NMS removed to the survivor that removed it (numpy only: misalign.nms runs the NMS).
"""

from __future__ import annotations

import numpy as np


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] x, y, w, h -> [N, 4] x1, y1, x2, y2 (same dtype)."""
    boxes = np.asarray(boxes)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:4]], axis=1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] x1, y1, x2, y2 -> [N, 4] x, y, w, h (same dtype)."""
    boxes = np.asarray(boxes)
    return np.concatenate([boxes[:, :2], boxes[:, 2:4] - boxes[:, :2]], axis=1)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] xyxy -> [N] area; inverted boxes count as 0."""
    wh = np.clip(boxes[:, 2:4] - boxes[:, :2], 0, None)
    return wh[:, 0] * wh[:, 1]


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """[N, 4], [M, 4] xyxy -> [N, M] IoU in float64. Empty inputs give an empty matrix."""
    boxes1 = np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)
    boxes2 = np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    bottom_right = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    wh = np.clip(bottom_right - top_left, 0, None)
    inter = wh[..., 0] * wh[..., 1]  # [N, M]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms_suppressors(boxes, categories, survivor: np.ndarray, nms_thresh: float) -> np.ndarray:
    """[N] suppressor of each non-survivor: the first survivor (in rank order) of the same category,
    ranked before it, with IoU > nms_thresh; -1 for survivors and where there is none.

    Rows ordered by rank (score descending); boxes [N, 4] xyxy float64; survivor [N] bool.
    """
    result = np.full(len(boxes), -1, np.int64)
    for category in np.unique(categories[~survivor]):
        rows = np.flatnonzero(categories == category)  # rank order
        lost, won = rows[~survivor[rows]], rows[survivor[rows]]
        if not len(won):
            continue
        valid = (box_iou(boxes[lost], boxes[won]) > nms_thresh) & (won[None, :] < lost[:, None])  # [L, W]
        first = valid.argmax(axis=1)  # survivors are in rank order: the first True is the best
        result[lost] = np.where(valid.any(axis=1), won[first], -1)
    return result
