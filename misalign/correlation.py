"""Score-IoU correlation and divergence, with bootstrap confidence intervals over images (docs/methods.md).

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
- Ranking(values) / ranking(values): one array sorted once (midranks, ties, dense ranks), shared by
  the rank statistics below, which take an array or its Ranking
- kendall_tau(x, y) -> float (scipy's tau-b); pearson(x, y) -> float (scipy's r)
- group_midranks(codes, values=None, dense=None) -> [n] midranks within groups
- per_gt_spearman(x, y, gt_id, image_id=None, min_count=3) -> DataFrame (gt_id, image_id, n, spearman)
- per_gt_spearman_columns(xs, y, gt_id, image_id=None, min_count=3) -> [DataFrame] (y ranked once)
- weighted_spearman(x, y, weights) -> float (Spearman of the data with row i repeated weights[i] times)
- RankedPool(x, y, image_pos, num_images).spearman(counts) / .replicates(count_matrix)
- spearman_influence(xs, y, image_pos, num_images) -> (rho [K], d rho / d image weight [I, K])
- linear_replicates(rho, grad, count_matrix) -> [B, K] first-order bootstrap replicates
- bootstrap_counts(num_images, num_resamples, seed) -> [B, I] int32
- percentile_ci(replicates, level=0.95) -> [lo, hi] (None when undefined)
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats


def pool_mask(candidates: pd.DataFrame, column: str, min_iou: float = 0.5) -> np.ndarray:
    """[N] bool: the rows of a correlation pool: iou >= min_iou, a finite `column`, and not `crowd`.

    Crowd rows (COCOeval ignores them) are neither good nor bad boxes, so they stay out even when
    min_iou lets IoU-0 rows in.
    """
    iou = candidates["iou"].to_numpy()
    mask = (iou >= np.asarray(min_iou, iou.dtype)) & np.isfinite(candidates[column].to_numpy())
    if "crowd" in candidates.columns:
        mask &= ~candidates["crowd"].to_numpy(bool)
    return mask


def correlation_pool(candidates: pd.DataFrame, column: str, min_iou: float = 0.5):
    """The rows of `pool_mask`: (x float64, y float64, image_id int64, gt_id int64)."""
    iou = candidates["iou"].to_numpy()
    x = candidates[column].to_numpy()
    rows = np.flatnonzero(pool_mask(candidates, column, min_iou))
    return (x[rows].astype(np.float64), iou[rows].astype(np.float64),
            candidates["image_id"].to_numpy(np.int64)[rows], candidates["gt_id"].to_numpy(np.int64)[rows])


def kendall_tau(x, y) -> float:
    """Kendall's tau-b of x and y (arrays or Rankings): scipy.stats.kendalltau on their dense ranks,
    which have the same order and ties (so the same statistic), with the pairs in y's order (the
    statistic does not depend on the pairs' order): scipy's own sorts then run on integers, the
    first one over sorted data. NaN when undefined."""
    if len(x) < 2:
        return np.nan
    x, y = ranking(x), ranking(y)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns NaN
        return float(stats.kendalltau(x.dense[y.order], y.group).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r of x and y (scipy.stats.pearsonr); NaN when undefined."""
    if len(x) < 2:
        return np.nan
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns NaN
        return float(stats.pearsonr(x, y).statistic)


def group_midranks(codes: np.ndarray, values=None, *, dense=None) -> np.ndarray:
    """[n] float64: the midrank (from 1, ties averaged) of each value among the rows of its group.

    codes [n] non-negative integer group codes; values [n], or instead `dense`, their dense ranks
    (`Ranking.dense`, or a subset of it: the same order and ties, with the value sort already done).
    """
    dense = Ranking(values).dense if dense is None else np.asarray(dense, np.int64)
    n = len(dense)
    if n == 0:
        return np.zeros(0)
    key = np.asarray(codes, dtype=np.int64) * (int(dense.max()) + 1) + dense  # group-major, then value
    order = np.argsort(key, kind="stable")
    k, c = key[order], np.asarray(codes)[order]
    position = np.arange(n)
    new_group = np.r_[True, c[1:] != c[:-1]]
    new_run = np.r_[True, k[1:] != k[:-1]]  # runs of equal (group, value)
    group_start = np.maximum.accumulate(np.where(new_group, position, 0))
    run_start = position[new_run]
    run_end = np.r_[run_start[1:], n] - 1
    run = np.cumsum(new_run) - 1
    ranks = np.empty(n)
    ranks[order] = (run_start + run_end)[run] / 2 + 1 - group_start
    return ranks


def per_gt_spearman(x, y, gt_id, image_id=None, min_count: int = 3) -> pd.DataFrame:
    """Spearman rho within each ground-truth box's rows, for boxes with >= min_count rows.

    Returns one row per such box, sorted by gt_id: gt_id, image_id (of its rows; -1 if not given),
    n, spearman (NaN where all x or all y of the box are tied). Rows with gt_id -1 are ignored.
    """
    return per_gt_spearman_columns([x], y, gt_id, image_id, min_count)[0]


def per_gt_spearman_columns(xs, y, gt_id, image_id=None, min_count: int = 3) -> list[pd.DataFrame]:
    """`per_gt_spearman` of each score array of `xs` [n] against the same y [n] (each array or its
    Ranking; y ranked once)."""
    gt_id = np.asarray(gt_id, dtype=np.int64)
    image_id = np.full(len(gt_id), -1, np.int64) if image_id is None else np.asarray(image_id, np.int64)
    matched = np.flatnonzero(gt_id >= 0)
    _, codes, sizes = np.unique(gt_id[matched], return_inverse=True, return_counts=True)
    rows = matched[sizes[codes.reshape(-1)] >= min_count]
    ids, first, codes = np.unique(gt_id[rows], return_index=True, return_inverse=True)
    codes = codes.reshape(-1)
    n = np.bincount(codes, minlength=len(ids)).astype(np.float64)
    centre = (n[codes] + 1) / 2  # the mean midrank of a group of n rows
    ry = group_midranks(codes, dense=ranking(y).dense[rows]) - centre
    syy = np.bincount(codes, ry * ry, minlength=len(ids))
    tables = []
    for x in xs:
        rx = group_midranks(codes, dense=ranking(x).dense[rows]) - centre
        sxy = np.bincount(codes, rx * ry, minlength=len(ids))
        sxx = np.bincount(codes, rx * rx, minlength=len(ids))
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.where((sxx > 0) & (syy > 0), sxy / np.sqrt(sxx * syy), np.nan)
        tables.append(pd.DataFrame({"gt_id": ids.astype(np.int64), "image_id": image_id[rows][first],
                                    "n": n.astype(np.int64), "spearman": np.clip(rho, -1.0, 1.0)}))
    return tables


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


class _Order:
    """One variable sorted once: the image of each sorted row and the tie groups of equal values."""

    def __init__(self, values: np.ndarray, image_pos: np.ndarray, num_images: int):
        self.order = np.argsort(values, kind="stable")  # [n]
        self.image_pos = image_pos[self.order]  # [n] intp: image of each sorted row
        ordered = values[self.order]
        n = len(values)
        new_group = np.r_[True, ordered[1:] != ordered[:-1]] if n else np.zeros(0, bool)
        starts = np.flatnonzero(new_group)
        ends = np.r_[starts[1:], n] - 1  # inclusive
        tied = ends > starts
        self.group_start = starts[tied]  # [G] first sorted position of each group of equal values
        self.group_end = ends[tied]  # [G] its last position
        sizes = self.group_end - self.group_start + 1
        self.tied_group = np.repeat(np.arange(len(sizes)), sizes)  # [T] group of each tied row
        self.tied_pos = np.arange(len(self.tied_group)) - np.repeat(np.cumsum(sizes) - sizes, sizes) \
            + np.repeat(self.group_start, sizes)  # [T] sorted position of each tied row
        untied = np.ones(n, bool)
        untied[self.tied_pos] = False
        self.untied_per_image = np.bincount(self.image_pos[untied], minlength=num_images).astype(np.float64)

    def ranks(self, counts: np.ndarray, w: np.ndarray, r2: np.ndarray) -> float:
        """Fill w [n] (row weights) and r2 [n] (twice the weighted midranks) in sorted order.

        Integer arithmetic throughout (exact, and NumPy's integer cumsum is several times faster
        than its float one). Returns sum of t^3 - t over the tie groups of the repeated data, where
        a row of weight w alone is a group of w copies.
        """
        np.take(counts, self.image_pos, out=w)
        np.cumsum(w, out=r2)  # rows of weight w occupy ranks r2 - w + 1 .. r2
        c = counts.astype(np.float64)
        ties = float(np.dot(c ** 3 - c, self.untied_per_image))
        if len(self.group_start):
            before = np.where(self.group_start > 0, r2[self.group_start - 1], 0).astype(np.int64)
            after = r2[self.group_end].astype(np.int64)
            group_w = (after - before).astype(np.float64)
            ties += float(np.sum(group_w ** 3 - group_w))
            group_mid2 = before + after + 1  # twice the midrank of the whole group
        r2 *= 2
        r2 -= w
        r2 += 1
        if len(self.group_start):
            r2[self.tied_pos] = group_mid2[self.tied_group]
        return ties


class RankedPool:
    """Spearman rho of (x, y) under reweighting of whole images, from orderings prepared once.

    xs: one or more score arrays [n] sharing the rows of y [n]; image_pos [n] the image position
    (0..num_images-1) of each row. `spearman(c)` with c [num_images] the number of times each image
    was drawn returns, per score array, scipy's spearmanr on the resample where every row of image i
    appears c[i] times: the weighted Pearson correlation of weighted midranks. The sums of squared
    centred ranks come in closed form from the tie sizes; only the cross term needs every row:
    per resample and score array one gather of weights, one integer cumulative sum in its order,
    one gather into y's order and one dot product - about ten passes over the rows.
    """

    def __init__(self, xs, y, image_pos, num_images: int):
        xs = [np.asarray(x, dtype=np.float64) for x in (xs if isinstance(xs, (list, tuple)) else [xs])]
        image_pos = np.asarray(image_pos, dtype=np.intp)
        self.num_images = int(num_images)
        self.n = len(image_pos)
        if self.n >= 2**28:
            raise ValueError("RankedPool: too many rows for 32-bit ranks")
        self.y = _Order(np.asarray(y, dtype=np.float64), image_pos, self.num_images)
        y_position = np.empty(self.n, np.intp)
        y_position[self.y.order] = np.arange(self.n)
        self.xs = [_Order(x, image_pos, self.num_images) for x in xs]
        self.x_to_y = [y_position[x.order] for x in self.xs]  # [n] y-sorted position of each x-sorted row
        self.rows_per_image = np.bincount(image_pos, minlength=self.num_images).astype(np.float64)
        self._int = [np.empty(self.n, np.int32) for _ in range(5)]
        self._float = [np.empty(self.n) for _ in range(2)]

    def __len__(self) -> int:
        return self.n

    def spearman(self, counts) -> np.ndarray:
        """[K] Spearman rho per score array for the resample drawing image i counts[i] times (NaN: undefined)."""
        counts = np.asarray(counts, dtype=np.int32)
        total = float(np.dot(counts.astype(np.float64), self.rows_per_image))  # rows of the resample
        result = np.full(len(self.xs), np.nan)
        if total * max(int(counts.max(initial=0)), 1) >= 2**29:
            raise ValueError("RankedPool: resample too large for 32-bit ranks")
        wy, ry2 = self._int[0], self._int[1]
        syy = (total**3 - total - self.y.ranks(counts, wy, ry2)) / 12
        for k, (order, x_to_y) in enumerate(zip(self.xs, self.x_to_y)):
            wx, rx2, aligned = self._int[2], self._int[3], self._int[4]
            sxx = (total**3 - total - order.ranks(counts, wx, rx2)) / 12
            if sxx <= 0 or syy <= 0:
                continue
            rx2 *= wx  # w * 2 r_x, exact in int32 (< 2**29 by the check above)
            np.take(ry2, x_to_y, out=aligned)
            a, b = self._float
            np.copyto(a, rx2, casting="unsafe")
            np.copyto(b, aligned, casting="unsafe")
            # einsum, not np.dot: a multi-threaded BLAS dot crawls on a busy machine
            cross = np.einsum("i,i->", a, b) / 4 - total * ((total + 1) / 2) ** 2  # sum w (rx - m)(ry - m)
            result[k] = np.clip(cross / np.sqrt(sxx * syy), -1.0, 1.0)
        return result

    def replicates(self, count_matrix: np.ndarray) -> np.ndarray:
        """[B, K] Spearman rho of each resample (rows of count_matrix [B, num_images])."""
        return np.array([self.spearman(c) for c in count_matrix], dtype=np.float64).reshape(len(count_matrix), -1)


class Ranking:
    """One array sorted once, for every rank statistic of the pool that reads it (Spearman, its
    influence, the per-group midranks, Kendall): build it once per column and pass it instead of
    the array.

    order [n]: the rows by ascending value (any order within ties: they share a group); group [n]:
    the tie group of each sorted row (groups numbered in ascending value); starts, sizes [G]: each
    group's first sorted position and size. 32-bit where they fit: a pool of millions of rows holds
    several Rankings at once.
    """

    def __init__(self, values):
        values = np.asarray(values, dtype=np.float64)
        n = len(values)
        index = np.int32 if n < 2**31 else np.int64
        self.order = np.argsort(values)
        ordered = values[self.order]
        new = np.empty(n, bool)
        new[:1] = True
        np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
        del ordered
        self.group = np.cumsum(new, dtype=index)
        self.group -= 1
        self.starts = np.flatnonzero(new).astype(index)
        self.sizes = np.diff(self.starts, append=index(n))

    def __len__(self) -> int:
        return len(self.order)

    def per_row(self, per_group: np.ndarray) -> np.ndarray:
        """[n] the value of each row's tie group, from per_group [G]."""
        out = np.empty(len(self.order), per_group.dtype)
        out[self.order] = per_group[self.group]
        return out

    @property
    def midranks(self) -> np.ndarray:
        """[n] float64 rank of each row from 1, ties averaged (scipy.stats.rankdata)."""
        return self.per_row(self.starts + (self.sizes + 1.0) / 2)

    @property
    def ties(self) -> np.ndarray:
        """[n] float64 size of each row's tie group."""
        return self.per_row(self.sizes.astype(np.float64))

    @property
    def dense(self) -> np.ndarray:
        """[n] integer dense rank of each row (0 for the smallest value): the same order and ties as the values."""
        out = np.empty(len(self.order), self.group.dtype)
        out[self.order] = self.group
        return out


def ranking(values) -> Ranking:
    """`values` as a Ranking (itself when it is one already)."""
    return values if isinstance(values, Ranking) else Ranking(values)


def _above_plus_half_tied(ranked: Ranking, values: np.ndarray) -> np.ndarray:
    """[n]: for each row l, the sum of `values` over rows ranked above l in `ranked`, plus half the
    sum over the rows tied with l (l included)."""
    sums = np.bincount(ranked.group, values[ranked.order])  # [G] per tie group
    above = sums.sum() - np.cumsum(sums)  # [G] over the groups above
    return ranked.per_row(above + sums / 2)


def spearman_influence(xs, y, image_pos, num_images: int):
    """Spearman rho of each score array with y, and its derivative with respect to each image's weight.

    xs: one or more score arrays [n] sharing the rows of y [n] (each array or its Ranking); image_pos
    [n] the image (0..num_images-1) of each row. Spearman under integer image weights c (rows of
    image i repeated c[i] times) is a rational function of c (weighted midranks, see RankedPool); it extends to real weights as
    `weighted_spearman` computes it. Returns (rho [K] at c = 1, which equals scipy's spearmanr, and
    grad [num_images, K] = d rho / d c[i] at c = 1; NaN where rho is undefined).

    With rx, ry the centred midranks and t the tie-group size of a row:
        S_xy = sum w rx ry,  S_xx = (W^3 - W - sum_groups (t^3 - t)) / 12
        d S_xx / d w_l = (W^2 - t_l^2) / 4
        d S_xy / d w_l = rx_l ry_l + sum_{x_i > x_l} ry_i + 1/2 sum_{x_i = x_l} ry_i  (+ the same with x, y swapped)
    (the d m / d w terms vanish because centred ranks sum to 0), and d rho = d S_xy / sqrt(S_xx S_yy)
    - rho / 2 (d S_xx / S_xx + d S_yy / S_yy). O(n log n) once, for any number of resamples.
    """
    xs = xs if isinstance(xs, (list, tuple)) else [xs]
    image_pos = np.asarray(image_pos, dtype=np.intp)
    n = len(image_pos)
    rho = np.full(len(xs), np.nan)
    grad = np.full((num_images, len(xs)), np.nan)
    if n < 2:
        return rho, grad
    centre = (n + 1) / 2
    y = ranking(y)
    ry = y.midranks - centre
    syy = float(np.dot(ry, ry))
    ty = y.ties
    dsyy = (n * n - ty * ty) / 4  # [n]
    for k, x in enumerate(xs):
        x = ranking(x)
        rx, tx = x.midranks - centre, x.ties
        sxx = float(np.dot(rx, rx))
        if sxx <= 0 or syy <= 0:
            continue
        sxy = float(np.dot(rx, ry))
        rho[k] = r = float(np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0))
        dsxy = rx * ry + _above_plus_half_tied(x, ry) + _above_plus_half_tied(y, rx)
        dsxx = (n * n - tx * tx) / 4
        drho = dsxy / np.sqrt(sxx * syy) - r / 2 * (dsxx / sxx + dsyy / syy)  # [n] per row weight
        grad[:, k] = np.bincount(image_pos, drho, minlength=num_images)
    return rho, grad


def linear_replicates(rho: np.ndarray, grad: np.ndarray, count_matrix: np.ndarray) -> np.ndarray:
    """[B, K] first-order bootstrap replicates rho + (c_b - 1) . grad for resamples c_b [B, I].

    The linear term of the exact replicate's Taylor expansion around c = 1 (Efron's linear /
    infinitesimal-jackknife bootstrap), for the same resample counts as the exact replicates.
    """
    deltas = np.asarray(count_matrix, dtype=np.float64) - 1.0  # [B, I]
    return np.clip(rho[None, :] + np.einsum("bi,ik->bk", deltas, grad), -1.0, 1.0)


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
