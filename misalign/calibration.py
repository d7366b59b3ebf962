"""Calibration of each score column over the kept boxes, and whether the obj branch predicts IoU.

D-ECE (Küppers et al. 2020, confidence-only bins) and LaECE (Oksuz et al. 2023) of `cls_score`,
`obj_score` (where finite on every kept box) and `score` (where a probability: within [0, 1]),
over the detector's output: the kept boxes. Every column is measured against the same targets,
COCOeval's greedy matching of the kept boxes ranked by the detector's `score` (each ground truth
matched once, so a duplicate is a false positive; boxes matched to a crowd region are left out),
taken from misalign.cocoeval.diagnose_detections:

    bins     B = 25 equal-width bins of the score on [0, 1]: [0, 1/25], then (k/25, (k+1)/25]
    D-ECE  = Σ_b |D_b|/|D| · |mean score in b − precision in b|,  TP: matched at IoU ≥ 0.5
    LaECE  = 1/|C| Σ_c Σ_b |D_cb|/|D_c| · |mean score in b − Σ_{i∈D_cb} IoU_i·TP_i / |D_cb||,
             TP: matched at IoU ≥ 0.1 (the paper's TP validation threshold), IoU_i the IoU with
             the matched ground truth, C the categories with at least one kept box.

The bins and the bin edges are those of the LaECE authors' reference code (25 bins for both).

`obj_vs_iou`: over the pre-NMS candidates with iou ≥ 0.5 (the post-NMS-only ledger's kept boxes),
obj_score − iou: its mean absolute value (mae) and mean (bias), and obj_score per IoU bin of
width 0.05 (mean, standard deviation, quartiles). An IoU branch trained to predict IoU has mae and
bias near 0 and a per-bin mean on the diagonal.

Formulas and choices: docs/methods.md ("Calibration"). Only numpy; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

NUM_BINS = 25  # confidence bins of D-ECE, LaECE and the reliability diagrams
DECE_IOU = 0.5  # D-ECE's TP: matched at IoU >= 0.5
LAECE_IOU = 0.1  # LaECE's TP validation threshold (Oksuz et al. 2023)
MATCH_THRESHOLDS = (LAECE_IOU, DECE_IOU)  # what misalign.cocoeval.diagnose_detections is asked to match at
SCORE_COLUMNS = ("cls_score", "obj_score", "score")
OBJ_IOU_EDGES = np.round(np.arange(0.5, 1.0001, 0.05), 2)  # obj_vs_iou's IoU bins: [0.5, 0.55), ..., [0.95, 1.0]
# What obj_vs_iou reads of every candidate (docs/ledger.md)
OBJ_COLUMNS = ["obj_score", "iou"]


def bin_index(scores: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """[N] bin of each score: 0 for [0, 1/B], b for (b/B, (b+1)/B] (the reference code's edges)."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    return np.clip(np.searchsorted(edges, np.asarray(scores, np.float64), side="left") - 1, 0, num_bins - 1)


@dataclass
class Reliability:
    """One score column's reliability diagram, per bin (empty bins have count 0 and NaN means)."""

    count: np.ndarray  # [B] kept boxes in the bin (ignored ones left out)
    mean_score: np.ndarray  # [B]
    precision: np.ndarray  # [B] share matched at IoU >= 0.5 (D-ECE's target)
    iou_precision: np.ndarray  # [B] mean IoU·TP at IoU >= 0.1, categories pooled (LaECE's target; LaECE itself is per category)


def _bin_means(bins: np.ndarray, values: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    count = np.bincount(bins, minlength=num_bins).astype(np.float64)
    total = np.bincount(bins, weights=values, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, total / count


def d_ece(scores, tp, num_bins: int = NUM_BINS) -> float:
    """D-ECE (module doc) of scores [N] in [0, 1] against tp [N] bool; NaN without boxes."""
    scores, tp = np.asarray(scores, np.float64), np.asarray(tp, np.float64)
    if not len(scores):
        return float("nan")
    bins = bin_index(scores, num_bins)
    count, mean_score = _bin_means(bins, scores, num_bins)
    _, precision = _bin_means(bins, tp, num_bins)
    full = count > 0
    return float(np.sum(count[full] / len(scores) * np.abs(mean_score[full] - precision[full])))


def la_ece(scores, iou_tp, categories, num_bins: int = NUM_BINS) -> float:
    """LaECE (module doc): scores [N] in [0, 1], iou_tp [N] = IoU of a TP at 0.1 (0 for a false
    positive), categories [N]; the mean over the categories present. NaN without boxes."""
    scores, iou_tp = np.asarray(scores, np.float64), np.asarray(iou_tp, np.float64)
    categories = np.asarray(categories)
    if not len(scores):
        return float("nan")
    classes, cls = np.unique(categories, return_inverse=True)
    cell = cls * num_bins + bin_index(scores, num_bins)  # (category, bin) as one index
    size = len(classes) * num_bins
    count = np.bincount(cell, minlength=size).astype(np.float64)
    score_sum = np.bincount(cell, weights=scores, minlength=size)
    target_sum = np.bincount(cell, weights=iou_tp, minlength=size)
    per_class = np.bincount(cls, minlength=len(classes)).astype(np.float64)  # |D_c|
    # |D_cb|/|D_c| · |score_sum/|D_cb| − target_sum/|D_cb||  =  |score_sum − target_sum| / |D_c|
    gap = np.abs(score_sum - target_sum) / np.repeat(per_class, num_bins)
    return float(np.mean(gap.reshape(len(classes), num_bins).sum(axis=1)))


def reliability(scores, tp, scores10, iou_tp, num_bins: int = NUM_BINS) -> Reliability:
    """The reliability diagram of one column: per bin, count, mean score and precision (scores, tp
    [N]: D-ECE's rows), and the mean IoU·TP of LaECE's rows (scores10, iou_tp [M]), all categories pooled."""
    bins = bin_index(scores, num_bins)
    count, mean_score = _bin_means(bins, np.asarray(scores, np.float64), num_bins)
    _, precision = _bin_means(bins, np.asarray(tp, np.float64), num_bins)
    _, iou_precision = _bin_means(bin_index(scores10, num_bins), np.asarray(iou_tp, np.float64), num_bins)
    return Reliability(count=count.astype(np.int64), mean_score=mean_score, precision=precision,
                       iou_precision=iou_precision)


def paired_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """[N] COCO IoU of boxes1[i] with boxes2[i], both [N, 4] x, y, w, h (pycocotools' formula)."""
    b1, b2 = np.asarray(boxes1, np.float64), np.asarray(boxes2, np.float64)
    iw = np.minimum(b1[:, 0] + b1[:, 2], b2[:, 0] + b2[:, 2]) - np.maximum(b1[:, 0], b2[:, 0])
    ih = np.minimum(b1[:, 1] + b1[:, 3], b2[:, 1] + b2[:, 3]) - np.maximum(b1[:, 1], b2[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = b1[:, 2] * b1[:, 3] + b2[:, 2] * b2[:, 3] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


@dataclass
class Calibration:
    """One dump's calibration: metrics.json `calibration`, `obj_vs_iou` and the figures' data."""

    columns: dict  # score column -> {"d_ece", "la_ece"} or None (column absent or not a probability)
    reliability: dict = field(default_factory=dict)  # score column -> Reliability (columns with numbers)
    notes: dict = field(default_factory=dict)  # score column -> why it is None
    obj_vs_iou: dict | None = None  # {"mae", "bias", "n"}; None without obj_score
    obj_bins: pd.DataFrame | None = None  # per IoU bin: iou_lo, iou_hi, n, mean_iou, mean, std, q25, median, q75
    obj_pool: str | None = None  # 'pre_nms' or 'post_nms' (the rows obj_vs_iou is over)
    num_boxes: int = 0  # kept boxes measured (not ignored at IoU 0.5)


def _column_problem(values: np.ndarray) -> str | None:
    if not len(values):
        return "no kept boxes"
    if not np.isfinite(values).all():
        return "NaN on some kept boxes" if np.isfinite(values).any() else "absent (NaN throughout)"
    if values.min() < 0 or values.max() > 1:
        return "not a probability: values outside [0, 1] (e.g. a CL-NMS score)"
    return None


def calibration(kept: pd.DataFrame, matches: dict, gt_boxes: tuple, num_bins: int = NUM_BINS) -> Calibration:
    """D-ECE and LaECE of every score column over the kept boxes (module doc).

    kept: the kept rows (category_id, x1, y1, w, h and the SCORE_COLUMNS present) in the order the
    matches were computed in; matches: IoU threshold -> [K] matched annotation id (0 none, -1 ignored),
    misalign.cocoeval.Diagnosis.matches at MATCH_THRESHOLDS; gt_boxes: (annotation ids [G] ascending,
    their boxes [G, 4] x, y, w, h), e.g. misalign.cocoeval.ground_truth_boxes.
    """
    tp50_id, tp10_id = matches[DECE_IOU], matches[LAECE_IOU]
    use50, use10 = tp50_id >= 0, tp10_id >= 0  # crowd-matched boxes are left out, as COCOeval ignores them
    matched10 = np.flatnonzero(tp10_id > 0)
    iou10 = np.zeros(len(kept))
    if len(matched10):
        boxes = kept[["x1", "y1", "w", "h"]].to_numpy(np.float64)[matched10]
        gt_ids, gt_xywh = gt_boxes
        iou10[matched10] = paired_iou(boxes, gt_xywh[np.searchsorted(gt_ids, tp10_id[matched10])])
    categories = kept["category_id"].to_numpy(np.int64)
    result = Calibration(columns={}, num_boxes=int(use50.sum()))
    for column in SCORE_COLUMNS:
        values = kept[column].to_numpy(np.float64) if column in kept.columns else np.full(len(kept), np.nan)
        problem = _column_problem(values)
        if problem:
            result.columns[column], result.notes[column] = None, problem
            continue
        result.columns[column] = {"d_ece": d_ece(values[use50], tp50_id[use50] > 0, num_bins),
                                  "la_ece": la_ece(values[use10], iou10[use10], categories[use10], num_bins)}
        result.reliability[column] = reliability(values[use50], tp50_id[use50] > 0, values[use10], iou10[use10],
                                                 num_bins)
    return result


def obj_vs_iou(obj: np.ndarray, iou: np.ndarray, edges: np.ndarray = OBJ_IOU_EDGES):
    """({"mae", "bias", "n"}, per-bin frame) of obj_score against iou over rows with iou >= edges[0].

    obj, iou: [N] a ledger's columns (iou float32: compared as stored). Rows with NaN obj are left
    out; None and None without any row. Bins [e_k, e_k+1), the last one closed at 1.
    """
    obj, iou = np.asarray(obj, np.float64), np.asarray(iou)
    pool = (iou >= np.float32(edges[0])) & np.isfinite(obj)
    if not pool.any():
        return None, None
    o, y = obj[pool], iou[pool].astype(np.float64)
    error = o - y
    summary = {"mae": float(np.mean(np.abs(error))), "bias": float(np.mean(error)), "n": int(len(o))}
    which = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for k in range(len(edges) - 1):
        v = o[which == k]
        q = np.quantile(v, [0.25, 0.5, 0.75]) if len(v) else [np.nan] * 3
        rows.append({"iou_lo": float(edges[k]), "iou_hi": float(edges[k + 1]), "n": int(len(v)),
                     "mean_iou": float(y[which == k].mean()) if len(v) else np.nan,
                     "mean": float(v.mean()) if len(v) else np.nan, "std": float(v.std()) if len(v) else np.nan,
                     "q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])})
    return summary, pd.DataFrame(rows)
