"""Score-IoU correlation and divergence, with bootstrap confidence intervals over images (DESIGN.md §4).

The pool: pre-NMS candidates with `iou >= min_iou` (default 0.5) and a finite score. Over it:
Spearman rho, Kendall tau-b and Pearson r between a score column and `iou` (scipy.stats). Per
ground-truth box: Spearman rho among the pool rows matched to it (`gt_id`), for boxes with at least
`min_count` (3) such rows; boxes whose rho is undefined (all scores or all IoUs tied) are skipped.
`spearman_per_gt` is the mean of those rho and `divergence = (1 - spearman_per_gt) / 2` (0: ranking
by score is ranking by IoU, 1: reversed). This is misalign's reading of the harmonized-detection
paper's divergence metric, whose exact formula is not published.

Bootstrap over images without copying the ledger: a resample is a vector of counts c[i] (how often
image i was drawn). Each row then carries weight c[image]; Spearman on the resample equals the
weighted Pearson correlation of weighted midranks (a value's rank among the duplicated rows), which
`RankedPool` computes in a few O(n) passes from orderings prepared once.

Public API:
- correlation_pool(candidates, column, min_iou=0.5) -> (x, y, image_id, gt_id) arrays
- rank_correlations(x, y) -> {"spearman", "kendall", "pearson"}
- per_gt_spearman(x, y, gt_id, image_id=None, min_count=3) -> DataFrame (gt_id, image_id, n, spearman)
- weighted_spearman(x, y, weights) -> float (Spearman of the data with row i repeated weights[i] times)
- RankedPool(x, y, image_pos, num_images).spearman(counts) / .replicates(count_matrix)
- bootstrap_counts(num_images, num_resamples, seed) -> [B, I] int32
- percentile_ci(replicates, level=0.95) -> [lo, hi] (None when undefined)
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats


def correlation_pool(candidates: pd.DataFrame, column: str, min_iou: float = 0.5):
    """Rows with iou >= min_iou and a finite `column`: (x float64, y float64, image_id int64, gt_id int64)."""
    iou = candidates["iou"].to_numpy()
    x = candidates[column].to_numpy()
    rows = np.flatnonzero((iou >= np.asarray(min_iou, iou.dtype)) & np.isfinite(x))
    return (x[rows].astype(np.float64), iou[rows].astype(np.float64),
            candidates["image_id"].to_numpy(np.int64)[rows], candidates["gt_id"].to_numpy(np.int64)[rows])


def rank_correlations(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Spearman rho, Kendall tau-b and Pearson r of x and y (scipy.stats); NaN when undefined."""
    if len(x) < 2:
        return {"spearman": np.nan, "kendall": np.nan, "pearson": np.nan}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns NaN
        return {
            "spearman": float(stats.spearmanr(x, y).statistic),
            "kendall": float(stats.kendalltau(x, y).statistic),
            "pearson": float(stats.pearsonr(x, y).statistic),
        }


def per_gt_spearman(x, y, gt_id, image_id=None, min_count: int = 3) -> pd.DataFrame:
    """Spearman rho within each ground-truth box's rows, for boxes with >= min_count rows.

    Returns one row per such box, sorted by gt_id: gt_id, image_id (of its first row; -1 if not
    given), n, spearman (NaN where all x or all y of the box are tied). Rows with gt_id -1 are ignored.
    """
    gt_id = np.asarray(gt_id, dtype=np.int64)
    image_id = np.full(len(gt_id), -1, np.int64) if image_id is None else np.asarray(image_id, np.int64)
    frame = pd.DataFrame({"g": gt_id, "x": x, "y": y, "img": image_id})
    frame = frame[frame["g"] >= 0]
    size = frame.groupby("g")["g"].transform("size").to_numpy()
    frame = frame[size >= min_count]
    if not len(frame):
        return pd.DataFrame({"gt_id": np.zeros(0, np.int64), "image_id": np.zeros(0, np.int64),
                             "n": np.zeros(0, np.int64), "spearman": np.zeros(0)})
    ranks = frame.groupby("g")[["x", "y"]].rank(method="average")  # midranks within each box
    codes, uniques = pd.factorize(frame["g"], sort=True)
    n = np.bincount(codes).astype(np.float64)
    centre = (n[codes] + 1) / 2  # the mean midrank of a group of n rows
    rx = ranks["x"].to_numpy() - centre
    ry = ranks["y"].to_numpy() - centre
    sxy = np.bincount(codes, rx * ry)
    sxx = np.bincount(codes, rx * rx)
    syy = np.bincount(codes, ry * ry)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where((sxx > 0) & (syy > 0), sxy / np.sqrt(sxx * syy), np.nan)
    first_img = frame["img"].to_numpy()[np.unique(codes, return_index=True)[1]]
    return pd.DataFrame({"gt_id": np.asarray(uniques, np.int64), "image_id": first_img,
                         "n": n.astype(np.int64), "spearman": np.clip(rho, -1.0, 1.0)})


def _weighted_midranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each value's midrank in the data where value i appears weights[i] times (ranks from 1)."""
    codes = np.unique(values, return_inverse=True)[1].reshape(-1)
    group = np.bincount(codes, weights=weights)
    mid = np.cumsum(group) - (group - 1) / 2
    return mid[codes]


def weighted_spearman(x, y, weights) -> float:
    """Spearman rho of (x, y) with row i repeated weights[i] times (weights >= 0, integer or not).

    = weighted Pearson correlation of the weighted midranks; NaN when undefined. Reference version
    of what RankedPool does fast; equal to scipy.stats.spearmanr on the explicitly repeated data.
    """
    x, y, w = (np.asarray(a, dtype=np.float64) for a in (x, y, weights))
    total = w.sum()
    if total <= 0:
        return np.nan
    rx = _weighted_midranks(x, w) - (total + 1) / 2
    ry = _weighted_midranks(y, w) - (total + 1) / 2
    sxx, syy = np.dot(w * rx, rx), np.dot(w * ry, ry)
    if sxx <= 0 or syy <= 0:
        return np.nan
    return float(np.clip(np.dot(w * rx, ry) / np.sqrt(sxx * syy), -1.0, 1.0))


class RankedPool:
    """Spearman rho of (x, y) under reweighting of whole images, from orderings prepared once.

    x, y [n] float, image_pos [n] the image position (0..num_images-1) of each row. `spearman(c)`
    with c [num_images] the number of times each image was drawn equals scipy's spearmanr on the
    resample with every row of image i repeated c[i] times. Cost per call: ~8 passes over n.
    """

    def __init__(self, x, y, image_pos, num_images: int):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")  # work in x order: x ranks become running sums
        self.num_images = int(num_images)
        self.image_pos = np.asarray(image_pos, dtype=np.int64)[order].astype(np.int32)
        x_sorted = x[order]
        new_group = np.r_[True, x_sorted[1:] != x_sorted[:-1]] if len(x) else np.zeros(0, bool)
        self.x_starts = np.flatnonzero(new_group)
        self.x_code = (np.cumsum(new_group) - 1).astype(np.int32)  # [n] tie group of x, ascending
        self.x_tied = len(self.x_starts) < len(x)
        y_unique, y_code = np.unique(np.asarray(y, dtype=np.float64)[order], return_inverse=True)
        self.y_code = y_code.reshape(-1).astype(np.int32)
        self.num_y = len(y_unique)

    def __len__(self) -> int:
        return len(self.image_pos)

    def spearman(self, counts) -> float:
        """Spearman rho of the resample drawing image i counts[i] times (NaN when undefined)."""
        w = np.asarray(counts, dtype=np.float64)[self.image_pos]  # [n] row weights
        total = w.sum()
        if total <= 0:
            return np.nan
        centre = (total + 1) / 2
        if self.x_tied:  # tie groups are consecutive in x order
            group_x = np.add.reduceat(w, self.x_starts)
            mid_x = np.cumsum(group_x) - (group_x - 1) / 2 - centre
            sxx = np.dot(group_x, mid_x * mid_x)
            rx = mid_x[self.x_code]
        else:
            rx = np.cumsum(w) - (w - 1) / 2 - centre
            sxx = np.dot(w * rx, rx)
        group_y = np.bincount(self.y_code, weights=w, minlength=self.num_y)
        mid_y = np.cumsum(group_y) - (group_y - 1) / 2 - centre
        syy = np.dot(group_y, mid_y * mid_y)
        if sxx <= 0 or syy <= 0:
            return np.nan
        sxy = np.dot(w * rx, mid_y[self.y_code])
        return float(np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0))

    def replicates(self, count_matrix: np.ndarray) -> np.ndarray:
        """[B] Spearman rho of each resample (rows of count_matrix [B, num_images])."""
        return np.array([self.spearman(c) for c in count_matrix], dtype=np.float64)


def bootstrap_counts(num_images: int, num_resamples: int, seed: int = 0) -> np.ndarray:
    """[B, I] int32: how often each image is drawn in each of B resamples of I images with replacement."""
    rng = np.random.default_rng(seed)
    counts = np.empty((num_resamples, num_images), np.int32)
    for b in range(num_resamples):
        counts[b] = np.bincount(rng.integers(0, num_images, num_images), minlength=num_images)
    return counts


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> list:
    """[lo, hi] percentile interval of the finite replicates; [None, None] if there are none."""
    finite = np.asarray(replicates, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return [None, None]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return [float(lo), float(hi)]
