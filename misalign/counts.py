"""Threshold counts, proportions and NMS survival: the paper's Table 1 and Figure 2 (docs/methods.md).

Conditions are strict `>` on `cls_score` ('cls') or on the same-category `iou` ('iou') and compare
in the column's dtype (float32), as `df.cls_score > 0.6` does. Keys are written `cls>0.05`, ...,
`iou>0.9` (threshold as `f"{t:g}"`). Stages: 'anchors' and 'raw' come from raw_counts.parquet
(and images.parquet's num_anchors / num_pos_anchors), 'pre_nms' is every row of
candidates.parquet, 'post_nms' its kept rows.

Public API (all return DataFrames or dicts; nothing is drawn here):
- CONDITIONS: [(key, quantity, threshold)] in Table 1 order; condition_key(quantity, t) -> str
- CONDITION_KEYS (and CLS_/IOU_CONDITION_KEYS), STAGE_ORDER, STAGE_TITLES: the conditions and stage labels
  the report shows, defined here only
- image_positions(images, image_ids, what) -> [N] int64 (InputError for unknown ids)
- candidate_stage_counts(candidates, positions, num_images, pre_nms) -> {(stage, condition): [I]} (adds up over batches)
- per_image_counts(ledger, candidate_counts=None) -> wide DataFrame, index image_id, columns (stage, condition)
- stage_totals(per_image, pre_nms=True) -> {"counts", "survival", "proportions"} of metrics.json
- table1(per_image, num_images=10) -> DataFrame rows (stage, condition), columns image ids + 'all'
- per_image_proportions(per_image, image_ids=None) -> long DataFrame for Figure 2
- score_iou_histogram(candidates, column, kept_only=False, bins=50) -> (counts [bins, bins], edges)
- score_iou_histograms(candidates, columns, bins=50) -> {column: {stage: counts}} (adds up over batches)
- quadrant_tallies(candidates, column) -> {stage: {quadrant: n}} (adds up); quadrant_frame(tallies) -> DataFrame
- quadrant_counts(candidates, column="cls_score", iou_thresh=0.5, score_thresh=0.5) -> DataFrame
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from misalign.errors import InputError
from misalign.ledger import searchsorted_runs
from misalign.truth import CLS_THRESHOLDS, IOU_THRESHOLDS, POSITIVE_IOU

log = logging.getLogger(__name__)

QUANTITY_COLUMNS = {"cls": "cls_score", "iou": "iou"}  # candidates column behind each quantity
THRESHOLDS = {"cls": CLS_THRESHOLDS, "iou": IOU_THRESHOLDS}
STAGE_ORDER = ("anchors", "raw", "pre_nms", "post_nms")
ROWS = "rows"  # pseudo-condition: the number of boxes of the stage (anchors: num_anchors)
CROWD = "crowd"  # pseudo-condition: candidates COCOeval ignores on a crowd region (the `crowd` column)


def condition_key(quantity: str, threshold: float) -> str:
    """'cls>0.05', 'iou>0.5', ...: the key of a Table 1 condition."""
    return f"{quantity}>{threshold:g}"


CONDITIONS = [(condition_key(q, t), q, t) for q in ("cls", "iou") for t in THRESHOLDS[q]]
POSITIVE = condition_key("iou", POSITIVE_IOU)  # the anchors stage's Positive_NUM: 'iou>0.5'
CONDITION_KEYS = tuple(key for key, _, _ in CONDITIONS)  # 'cls>0.05', ..., 'iou>0.9': Table 1's eleven
CLS_CONDITION_KEYS = tuple(key for key, q, _ in CONDITIONS if q == "cls")
IOU_CONDITION_KEYS = tuple(key for key, q, _ in CONDITIONS if q == "iou")
# Stage headings of the tables (Table 1 summed over images, the quadrant tables, the figures).
STAGE_TITLES = {"anchors": "positive anchors", "raw": "raw (all anchors' boxes)", "pre_nms": "before NMS",
                "post_nms": "after NMS"}
# Per-detector Table 1 headings: its anchors block lists 'rows' (every anchor) beside 'iou>0.5', so it
# is headed 'anchors', not 'positive anchors'.
TABLE1_STAGE_TITLES = {**STAGE_TITLES, "anchors": "anchors", "raw": "raw (every anchor's box)"}


def image_positions(images: pd.DataFrame, image_ids: np.ndarray, what: str) -> np.ndarray:
    """[N] int64 position in `images` (images.parquet rows) of each of `image_ids`; InputError if unknown."""
    known = images["image_id"].to_numpy(np.int64)
    order = np.argsort(known, kind="stable")
    image_ids = np.asarray(image_ids, dtype=np.int64)
    pos = np.clip(searchsorted_runs(known, image_ids, sorter=order), 0, max(len(known) - 1, 0))
    found = order[pos] if len(known) else np.zeros(len(image_ids), np.int64)
    bad = (known[found] != image_ids) if len(known) else np.ones(len(image_ids), bool)
    if np.any(bad):
        row = int(np.argmax(bad))
        raise InputError(f"{what}: row {row}: image_id {image_ids[row]} is not in images.parquet")
    return found.astype(np.int64)


def _counts_above(values: np.ndarray, positions: np.ndarray, num_images: int, thresholds) -> np.ndarray:
    """[I, T] int64: per image, how many `values` are > each (ascending) threshold, in their dtype."""
    thresholds = np.asarray(thresholds, dtype=values.dtype)
    exceeded = np.searchsorted(thresholds, values, side="left")  # [N] number of thresholds < value
    exceeded[np.isnan(values)] = 0
    num_t = len(thresholds)
    hist = np.bincount(positions * (num_t + 1) + exceeded, minlength=num_images * (num_t + 1))
    hist = hist.reshape(num_images, num_t + 1)  # [I, T+1] rows exceeding exactly k thresholds
    return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:].astype(np.int64)


def _candidate_stage(candidates: pd.DataFrame, positions: np.ndarray, num_images: int, rows: np.ndarray | None):
    """{(stage_condition): [I]} for the candidate rows selected by `rows` (None: all)."""
    columns = {}
    pos = positions if rows is None else positions[rows]
    columns[ROWS] = np.bincount(pos, minlength=num_images).astype(np.int64)
    if "crowd" in candidates.columns:
        crowd = candidates["crowd"].to_numpy(bool)
        crowd = crowd if rows is None else crowd[rows]
        columns[CROWD] = np.bincount(pos[crowd], minlength=num_images).astype(np.int64)
    for quantity, column in QUANTITY_COLUMNS.items():
        values = candidates[column].to_numpy()
        values = values if rows is None else values[rows]
        counts = _counts_above(values, pos, num_images, THRESHOLDS[quantity])
        for k, t in enumerate(THRESHOLDS[quantity]):
            columns[condition_key(quantity, t)] = counts[:, k]
    return columns


def _raw_stages(ledger, num_images: int) -> dict:
    """{(stage, condition): [I]} from raw_counts.parquet and images.parquet's anchor columns.

    Positive anchors are ('anchors', 'iou>0.5'): the raw_counts row, or images.parquet's
    num_pos_anchors (the same count) where raw_counts has none.
    """
    columns = {}
    images = ledger.images
    raw = ledger.raw_counts
    if len(raw):
        pos = image_positions(images, raw["image_id"].to_numpy(), "raw_counts.parquet")
        keys = [condition_key(q, t) for q, t in zip(raw["quantity"], raw["threshold"])]
        frame = pd.DataFrame({"pos": pos, "stage": raw["stage"].to_numpy(), "cond": keys,
                              "count": raw["count"].to_numpy(np.int64)})
        wide = frame.pivot_table(index="pos", columns=["stage", "cond"], values="count", aggfunc="sum")
        if len(wide) < num_images:
            log.warning("raw_counts.parquet covers %d of %d images; the others count as 0", len(wide), num_images)
        wide = wide.reindex(np.arange(num_images)).fillna(0).astype(np.int64)
        for stage in ("anchors", "raw"):
            for key, _, _ in CONDITIONS:
                if (stage, key) in wide.columns:
                    columns[(stage, key)] = wide[(stage, key)].to_numpy()
    for key, column in ((ROWS, "num_anchors"), (POSITIVE, "num_pos_anchors")):
        values = images[column].to_numpy(np.int64)
        if len(values) and np.all(values >= 0) and ("anchors", key) not in columns:  # -1: unknown (imports)
            columns[("anchors", key)] = values
    return columns


def candidate_stage_counts(candidates: pd.DataFrame, positions: np.ndarray, num_images: int,
                           pre_nms: bool = True) -> dict:
    """{(stage, condition): [I] int64} of the candidate stages ('pre_nms' unless post-NMS only,
    'post_nms': the kept rows) for `candidates` whose images sit at `positions` in images.parquet.

    Counts add up: the counts of a ledger are the sum of its row batches' (misalign.scan).
    """
    kept = np.flatnonzero(candidates["kept"].to_numpy())
    stages = (("pre_nms", None), ("post_nms", kept)) if pre_nms else (("post_nms", kept),)
    return {(stage, key): values for stage, rows in stages
            for key, values in _candidate_stage(candidates, positions, num_images, rows).items()}


def per_image_counts(ledger, candidate_counts: dict | None = None) -> pd.DataFrame:
    """Per-image counts of every stage and condition (the full Table 1).

    Index: image_id in images.parquet order. Columns (stage, condition): ('anchors', 'rows') =
    num_anchors when known, ('anchors', 'iou>t') and ('raw', 'cls>t' / 'iou>t') from
    raw_counts.parquet when present (('anchors', 'iou>0.5') = num_pos_anchors otherwise),
    ('pre_nms', ...) and ('post_nms', ...) from candidates: 'rows' (boxes of the stage), 'crowd'
    (rows COCOeval ignores, when the column is there) and the eleven conditions; no 'pre_nms'
    columns for a post-NMS-only ledger. The candidate stages are `candidate_counts` when given
    (`candidate_stage_counts` summed over the ledger's row batches), else counted from
    ledger.candidates (columns image_id, cls_score, iou, kept, and crowd).
    """
    images = ledger.images
    num_images = len(images)
    columns = _raw_stages(ledger, num_images)
    if candidate_counts is None:
        candidates = ledger.candidates
        positions = image_positions(images, candidates["image_id"].to_numpy(), "candidates.parquet")
        candidate_counts = candidate_stage_counts(candidates, positions, num_images, ledger.pre_nms)
    columns.update(candidate_counts)
    frame = pd.DataFrame(columns, index=pd.Index(images["image_id"].to_numpy(np.int64), name="image_id"))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["stage", "condition"])
    return frame


def _stage_dict(totals: pd.Series, stage: str) -> dict[str, int]:
    return {key: int(totals[(stage, key)]) for key, _, _ in CONDITIONS if (stage, key) in totals.index}


def stage_totals(per_image: pd.DataFrame, pre_nms: bool = True) -> dict:
    """metrics.json's "counts", "survival", "proportions" and "crowd" from `per_image_counts`.

    "crowd" counts, per candidate stage, the rows COCOeval ignores on crowd regions (left out of
    the correlation pools; their IoU-0 would otherwise make them bad boxes).

    pre_nms=False (a post-NMS-only ledger) leaves the pre_nms counts, their proportions and the
    survival rates empty: there is no pre-NMS stage to count. A stage without boxes has no
    proportions. Survival is post/pre for every condition with a non-zero pre-NMS count.
    """
    totals = per_image.sum(axis=0)
    counts = {stage: _stage_dict(totals, stage) for stage in ("raw", "anchors", "pre_nms", "post_nms")}
    if not pre_nms:
        counts["pre_nms"] = {}
    crowd = {stage: int(totals[(stage, CROWD)]) for stage in ("pre_nms", "post_nms")
             if (stage, CROWD) in totals.index and (pre_nms or stage == "post_nms")}
    survival = {key: counts["post_nms"][key] / n for key, n in counts["pre_nms"].items() if n > 0}
    proportions = {}
    for stage in ("pre_nms", "post_nms"):
        size = int(totals.get((stage, ROWS), 0))
        proportions[stage] = {key: n / size for key, n in counts[stage].items()} if size else {}
    return {"counts": counts, "survival": survival, "proportions": proportions, "crowd": crowd}


def table1(per_image: pd.DataFrame, num_images: int = 10, image_ids=None) -> pd.DataFrame:
    """Table 1: rows (stage, condition) in the paper's order, columns the chosen images and 'all'.

    image_ids: the images to show (default: the first `num_images` of images.parquet). 'all' sums
    over every image of the ledger. Stages without data (e.g. raw for an import) are left out.
    """
    shown = per_image.index[:num_images] if image_ids is None else pd.Index(image_ids)
    order = [(s, c) for s in STAGE_ORDER for c in (ROWS, CROWD, *[k for k, _, _ in CONDITIONS])]
    order = [key for key in order if key in per_image.columns]
    table = per_image.loc[shown, order].T
    table.columns = [str(i) for i in shown]
    table["all"] = per_image[order].sum(axis=0).to_numpy()
    table.index = pd.MultiIndex.from_tuples(order, names=["stage", "condition"])
    return table


def per_image_proportions(per_image: pd.DataFrame, image_ids=None) -> pd.DataFrame:
    """Figure 2 per image: one row per (image, condition).

    Columns: image_id, condition, pre_nms_count, post_nms_count, pre_nms (proportion of the image's
    pre-NMS boxes), post_nms (proportion of its kept boxes), survival (post / pre count). NaN where
    a denominator is 0, and in the pre-NMS columns of a post-NMS-only ledger.
    """
    frame = per_image if image_ids is None else per_image.loc[list(image_ids)]
    keys = [k for k, _, _ in CONDITIONS]
    post = frame["post_nms"]
    pre = frame["pre_nms"] if "pre_nms" in frame.columns.get_level_values(0) else post * np.nan  # post-NMS only
    with np.errstate(invalid="ignore", divide="ignore"):
        long = pd.DataFrame({
            "image_id": np.repeat(frame.index.to_numpy(), len(keys)),
            "condition": np.tile(keys, len(frame)),
            "pre_nms_count": pre[keys].to_numpy().reshape(-1),
            "post_nms_count": post[keys].to_numpy().reshape(-1),
            "pre_nms": (pre[keys].to_numpy() / pre[[ROWS]].to_numpy()).reshape(-1),
            "post_nms": (post[keys].to_numpy() / post[[ROWS]].to_numpy()).reshape(-1),
            "survival": (post[keys].to_numpy() / pre[keys].to_numpy()).reshape(-1),
        })
    return long


def score_iou_histogram(candidates: pd.DataFrame, column: str, kept_only: bool = False, bins: int = 50):
    """2-D histogram of `column` (x) against `iou` (y) on [0, 1]^2, for Figure 1's density panels.

    Returns (counts [bins, bins] int64 indexed [x_bin, y_bin], edges [bins + 1]). Rows with NaN
    scores are left out; scores above 1 (CL-NMS adds a closeness term to the probability) count in
    the top bin, so every box is counted.
    """
    stage = "post_nms" if kept_only else "pre_nms"
    return score_iou_histograms(candidates, [column], bins)[column][stage], np.linspace(0.0, 1.0, bins + 1)


def score_iou_histograms(candidates: pd.DataFrame, columns, bins: int = 50) -> dict:
    """{column: {"pre_nms": every row's, "post_nms": the kept rows'}} `score_iou_histogram` counts.

    The IoU bins and the kept mask are computed once for all columns, each column's bins once for
    both stages (a streamed report histograms every row of the ledger).
    """
    iy = uniform_bin_index(candidates["iou"].to_numpy(), bins)
    kept = candidates["kept"].to_numpy(bool)
    result = {}
    for column in columns:
        x = candidates[column].to_numpy()
        cell = uniform_bin_index(np.minimum(x, np.asarray(1.0, x.dtype)), bins) * bins + iy
        cell[(cell < 0) | (iy < 0)] = -1
        pre = np.bincount(cell + 1, minlength=bins * bins + 1)[1:]  # cell -1 (outside) lands in slot 0
        post = np.bincount(cell[kept] + 1, minlength=bins * bins + 1)[1:]
        result[column] = {"pre_nms": pre.reshape(bins, bins).astype(np.int64),
                          "post_nms": post.reshape(bins, bins).astype(np.int64)}
    return result


def uniform_bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    """[N] intp bin of each value among the edges np.linspace(0, 1, bins + 1), as np.histogram2d
    bins it (the last bin closed); -1 outside [0, 1] or NaN.

    The bin is floor(value * bins), corrected by one where rounding put it across an edge: the same
    answer as a search of the edges, at a fraction of its cost.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    v = values.astype(np.float64, copy=False)
    inside = (v >= 0.0) & (v <= 1.0)  # False for NaN
    k = np.multiply(v, bins, where=inside, out=np.zeros(len(v))).astype(np.intp)
    np.minimum(k, bins - 1, out=k)
    k -= v < edges[k]
    k += (v >= edges[k + 1]) & (k < bins - 1)
    k[~inside] = -1
    return k


def quadrant_tallies(candidates: pd.DataFrame, column: str = "cls_score", iou_thresh: float = 0.5,
                     score_thresh: float = 0.5) -> dict[str, dict[str, int]]:
    """{stage: {quadrant: boxes}} of Figure 1's quadrants, 'pre_nms' (every row) and 'post_nms' (kept).

    Quadrants: 'iou>0.5 & cls>0.5', 'iou>0.5 & cls<=0.5' (the paper's finding: well localised but
    low score), ... Tallies of row batches add up (misalign.scan); `quadrant_frame` shows them.
    """
    name = column.replace("_score", "")
    i_key, s_key = f"iou>{iou_thresh:g}", f"{name}>{score_thresh:g}"
    i_not, s_not = f"iou<={iou_thresh:g}", f"{name}<={score_thresh:g}"
    s = candidates[column].to_numpy()
    good = candidates["iou"].to_numpy() > np.asarray(iou_thresh, candidates["iou"].dtype)
    high = s > np.asarray(score_thresh, s.dtype)
    kept = candidates["kept"].to_numpy(bool)
    tallies = {}
    for stage, rows in (("pre_nms", np.ones(len(s), bool)), ("post_nms", kept)):
        masks = {f"{i_key} & {s_key}": good & high, f"{i_key} & {s_not}": good & ~high,
                 f"{i_not} & {s_key}": ~good & high, f"{i_not} & {s_not}": ~good & ~high}
        tallies[stage] = {key: int(np.count_nonzero(mask & rows)) for key, mask in masks.items()}
    return tallies


def quadrant_frame(tallies: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Rows 'pre_nms', 'post_nms': the quadrant counts of `quadrant_tallies` and, as 'frac <quadrant>',
    their fractions of the stage (NaN for a stage without boxes)."""
    rows = {}
    for stage, row in tallies.items():
        size = sum(row.values())
        rows[stage] = {**row, **{f"frac {key}": (n / size if size else np.nan) for key, n in row.items()}}
    return pd.DataFrame.from_dict(rows, orient="index")


def quadrant_counts(candidates: pd.DataFrame, column: str = "cls_score", iou_thresh: float = 0.5,
                    score_thresh: float = 0.5) -> pd.DataFrame:
    """Boxes in each quadrant of Figure 1, before and after NMS: `quadrant_frame` of `quadrant_tallies`."""
    return quadrant_frame(quadrant_tallies(candidates, column, iou_thresh, score_thresh))
