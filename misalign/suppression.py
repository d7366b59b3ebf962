"""Suppression losses: ground-truth boxes whose best-localised candidate NMS threw away (docs/methods.md,
"Suppression losses and the gallery").

For every non-crowd ground-truth box g (the ledger's `iou` and `gt_id` are measured against the
non-crowd boxes only, docs/ledger.md): `best_any` is the highest `iou` of the candidates with
`gt_id` g, `best_kept` the highest of its kept candidates (0 if none). g is **eligible** when
best_any >= 0.5, and a **suppression loss** when, besides, best_any - best_kept >= 0.1 and the
candidate reaching best_any was suppressed by NMS (`suppressed_by` >= 0; a box that survived NMS
and was only cut by max-detections is not a suppression).

Ties and choices:
- the candidate reaching best_any: among candidates of g with that IoU, the highest `score` (the
  one NMS visited first), then the lowest `cand_id`;
- the box NMS kept: the kept candidate of g with the highest IoU (the one reaching best_kept), ties
  the same way; none when g has no kept candidate;
- IoUs are the ledger's float32 values; best_any >= 0.5 is compared in float32 (0.5 is exact),
  the gap is their difference in float64 (exact for two float32 numbers) compared with 0.1.

Only a candidate with gt_id g and iou >= 0.5, or a kept one, can matter for g, so the analysis reads
only those rows (`read_pool`, row group by row group) and groups them with one sort: no loop per
row or per ground truth, a few seconds for a COCO-sized 20 M-row ledger. Boxes are read only for
the gallery's few rows (`read_boxes`).

The gallery: the worst losses by gap (ties: the lowest gt id) of the reference detector — the
first pre-NMS dump of a report, as the differences are taken against the first dump — and, for
every other detector, what it did with the same ground truths (its kept box, and its best box if
NMS suppressed it), so the same objects sit side by side.

Public API:
- SUPPRESSION_COLUMNS, MIN_BEST_IOU, MIN_GAP, GALLERY_SIZE, METRIC_KEYS, CASE_COLUMNS
- per_gt_table(candidates) -> DataFrame (one row per ground truth with a candidate that can matter)
- suppression_metrics(table) -> metrics.json `suppression`; unavailable_metrics() for post-NMS-only dumps
- worst_losses(table, size) -> gt ids; gallery_cases(table, gt_ids) -> DataFrame (no boxes yet)
- add_boxes(cases, candidate_boxes, gt_annotations), add_image_files(cases, images, image_folder)
- read_pool(folder), read_boxes(ledger, cand_ids): the ledger reads
- ledger_table(ledger) -> per_gt_table or None; analyse_ledger(ledger, coco_gt, gallery_gt_ids=None, table=None) -> (metrics, cases or None)
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

SUPPRESSION_COLUMNS = ("cand_id", "image_id", "gt_id", "iou", "score", "kept", "suppressed_by")
MIN_BEST_IOU = np.float32(0.5)  # eligible: best_any >= this (float32, like the iou column)
MIN_GAP = 0.1  # loss: best_any - best_kept >= this (float64 difference of the float32 IoUs)
GALLERY_SIZE = 8  # ground truths in the gallery
METRIC_KEYS = ("losses", "eligible", "rate", "mean_iou_gap")
BOX = ("x1", "y1", "x2", "y2")
# What the best candidate of a ground truth became: kept; suppressed by NMS; survived NMS but cut by
# max-detections; or none (no candidate with iou >= MIN_BEST_IOU: the ground truth is not eligible).
FATES = ("kept", "suppressed", "cut", "none")
CASE_COLUMNS = (  # a gallery case, one row per (ground truth, detector); boxes x1, y1, x2, y2 in pixels
    "rank", "gt_id", "image_id", "best_any", "best_kept", "gap", "loss", "best_fate",
    "kept_cand_id", "kept_score", "kept_iou",
    "suppressed_cand_id", "suppressed_score", "suppressed_iou", "suppressed_by", "suppressed_by_kept",
    "category_id", "category", "gt_x1", "gt_y1", "gt_x2", "gt_y2",
    "kept_x1", "kept_y1", "kept_x2", "kept_y2",
    "suppressed_x1", "suppressed_y1", "suppressed_x2", "suppressed_y2",
    "image_file", "image_found")


# ---------------------------------------------------------------------------------------------
# the per-ground-truth table and the metrics


def relevant_mask(gt_id, iou, kept) -> np.ndarray:
    """Rows that can decide a ground truth's best_any (iou >= 0.5) or best_kept (kept), matched to one."""
    return (np.asarray(gt_id) >= 0) & ((np.asarray(iou) >= MIN_BEST_IOU) | np.asarray(kept))


def _best_per_gt(gt_id, iou, score, cand_id) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique gt ids, the row of each one's best candidate): highest iou, then score, then lowest cand_id.

    One integer sort by gt, then per gt the rows equal to its best iou, of those the rows equal to
    their best score, of those the lowest cand_id (cand_ids are unique): a few passes, not a
    four-key lexsort."""
    rows = np.argsort(gt_id, kind="stable")  # candidate rows, by gt
    group = gt_id[rows]
    for key in (iou, score, -np.asarray(cand_id, np.int64)):  # each criterion keeps its groups' best rows
        if not len(rows):
            break
        values = key[rows]
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        best = np.repeat(np.maximum.reduceat(values, starts), np.diff(np.r_[starts, len(rows)]))
        top = values == best
        rows, group = rows[top], group[top]
    return group, rows


def per_gt_table(candidates: pd.DataFrame) -> pd.DataFrame:
    """One row per ground truth with a candidate of iou >= 0.5 or a kept candidate, by gt id.

    candidates: at least SUPPRESSION_COLUMNS (any rows; only the relevant ones are used). Columns:
    gt_id, image_id, best_any (0 when no candidate reaches 0.5: then not eligible), best_cand_id,
    best_score, best_suppressed_by (-1 none), best_kept (0 if none), kept_cand_id (-1 none),
    kept_score (NaN none), gap (float64), eligible, loss, best_fate (FATES).
    """
    gt_id = candidates["gt_id"].to_numpy(np.int64)
    iou = candidates["iou"].to_numpy(np.float32)
    kept = candidates["kept"].to_numpy(bool)
    score = candidates["score"].to_numpy(np.float32)
    cand_id = candidates["cand_id"].to_numpy(np.int64)
    matched = gt_id >= 0
    any_rows = np.flatnonzero(matched & (iou >= MIN_BEST_IOU))
    kept_rows = np.flatnonzero(matched & kept)
    any_gt, any_best = _best_per_gt(gt_id[any_rows], iou[any_rows], score[any_rows], cand_id[any_rows])
    kept_gt, kept_best = _best_per_gt(gt_id[kept_rows], iou[kept_rows], score[kept_rows], cand_id[kept_rows])
    any_best, kept_best = any_rows[any_best], kept_rows[kept_best]
    gts = np.union1d(any_gt, kept_gt)
    in_any, in_kept = np.isin(gts, any_gt), np.isin(gts, kept_gt)

    def spread(values, present, fill, dtype):
        out = np.full(len(gts), fill, dtype)
        out[present] = values
        return out

    best_row = spread(any_best, in_any, -1, np.int64)
    kept_row = spread(kept_best, in_kept, -1, np.int64)
    best_any = spread(iou[any_best], in_any, 0, np.float32)
    best_kept = spread(iou[kept_best], in_kept, 0, np.float32)
    best_sup = spread(candidates["suppressed_by"].to_numpy(np.int64)[any_best], in_any, -1, np.int64)
    image_id = candidates["image_id"].to_numpy(np.int64)[np.where(in_any, best_row, kept_row)]
    gap = best_any.astype(np.float64) - best_kept.astype(np.float64)
    eligible = best_any >= MIN_BEST_IOU
    loss = eligible & (gap >= MIN_GAP) & (best_sup >= 0)
    best_kept_flag = spread(kept[any_best], in_any, False, bool)
    fate = np.select([~in_any, best_kept_flag, best_sup >= 0], ["none", "kept", "suppressed"], "cut")
    return pd.DataFrame({
        "gt_id": gts, "image_id": image_id, "best_any": best_any,
        "best_cand_id": spread(cand_id[any_best], in_any, -1, np.int64),
        "best_score": spread(score[any_best], in_any, np.nan, np.float32), "best_suppressed_by": best_sup,
        "best_kept": best_kept, "kept_cand_id": spread(cand_id[kept_best], in_kept, -1, np.int64),
        "kept_score": spread(score[kept_best], in_kept, np.nan, np.float32),
        "gap": gap, "eligible": eligible, "loss": loss, "best_fate": fate,
    })


def suppression_metrics(table: pd.DataFrame) -> dict:
    """metrics.json `suppression`: losses, eligible, rate = losses / eligible, mean_iou_gap over the losses.

    rate is None without an eligible ground truth, mean_iou_gap None without a loss; the mean is
    math.fsum's correctly rounded sum over the count, so it does not depend on the row order.
    """
    losses = int(table["loss"].sum())
    eligible = int(table["eligible"].sum())
    gaps = table["gap"].to_numpy(np.float64)[table["loss"].to_numpy(bool)]
    return {"losses": losses, "eligible": eligible, "rate": losses / eligible if eligible else None,
            "mean_iou_gap": math.fsum(gaps) / losses if losses else None}


def unavailable_metrics() -> dict:
    """metrics.json `suppression` of a post-NMS-only dump: it records no suppressed box."""
    return dict.fromkeys(METRIC_KEYS)


# ---------------------------------------------------------------------------------------------
# the gallery


def worst_losses(table: pd.DataFrame, size: int = GALLERY_SIZE) -> np.ndarray:
    """The gt ids of the `size` losses with the largest gap (ties: the lowest gt id)."""
    losses = table[table["loss"].to_numpy(bool)]
    order = np.lexsort((losses["gt_id"].to_numpy(), -losses["gap"].to_numpy()))
    return losses["gt_id"].to_numpy(np.int64)[order[:size]]


def gallery_cases(table: pd.DataFrame, gt_ids) -> pd.DataFrame:
    """One row per gt id of `gt_ids` (in that order, `rank` 0, 1, ...): this detector's numbers for it.

    A ground truth absent from `table` (no candidate with iou >= 0.5, none kept) gets best_fate
    'none', best_any and best_kept 0, and no boxes. The suppressed box is the best candidate when NMS
    suppressed it (best_fate 'suppressed'); `suppressed_by_kept` says whether its suppressor is the
    kept box itself. Box, category and image columns are added by add_boxes and add_image_files.
    """
    gt_ids = np.asarray(gt_ids, np.int64)
    rows = table.set_index("gt_id").reindex(gt_ids)
    found = rows["best_fate"].notna().to_numpy()
    suppressed = (rows["best_fate"] == "suppressed").to_numpy()
    kept_cand = rows["kept_cand_id"].fillna(-1).to_numpy(np.int64)
    sup_by = np.where(suppressed, rows["best_suppressed_by"].fillna(-1).to_numpy(np.int64), -1)
    return pd.DataFrame({
        "rank": np.arange(len(gt_ids)), "gt_id": gt_ids,
        "image_id": rows["image_id"].fillna(-1).to_numpy(np.int64),
        "best_any": rows["best_any"].fillna(0).to_numpy(np.float32),
        "best_kept": rows["best_kept"].fillna(0).to_numpy(np.float32),
        "gap": rows["gap"].fillna(0).to_numpy(np.float64), "loss": rows["loss"].eq(True).to_numpy(),
        "best_fate": np.where(found, rows["best_fate"].to_numpy(object), "none"),
        "kept_cand_id": kept_cand, "kept_score": rows["kept_score"].to_numpy(np.float32),
        "kept_iou": np.where(kept_cand >= 0, rows["best_kept"].to_numpy(np.float32), np.nan).astype(np.float32),
        "suppressed_cand_id": np.where(suppressed, rows["best_cand_id"].fillna(-1).to_numpy(np.int64), -1),
        "suppressed_score": np.where(suppressed, rows["best_score"].to_numpy(np.float32), np.nan).astype(np.float32),
        "suppressed_iou": np.where(suppressed, rows["best_any"].to_numpy(np.float32), np.nan).astype(np.float32),
        "suppressed_by": sup_by, "suppressed_by_kept": suppressed & (sup_by == kept_cand),
    })


def _boxes_of(ids: np.ndarray, frame: pd.DataFrame, key: str) -> np.ndarray:
    """[len(ids), 4] x1, y1, x2, y2 of the rows of `frame` whose `key` is each id (NaN where none)."""
    boxes = frame.set_index(key)[list(BOX)].astype(np.float64)
    return boxes.reindex(ids).to_numpy(np.float64)


def add_boxes(cases: pd.DataFrame, candidate_boxes: pd.DataFrame, gt_annotations: pd.DataFrame) -> pd.DataFrame:
    """cases with the boxes of the ground truth, the kept and the suppressed candidate (NaN where none).

    candidate_boxes: cand_id, x1, y1, x2, y2 (read_boxes); gt_annotations: gt_id, category_id,
    category (its name), x1, y1, x2, y2 (from the COCO ground truth; see `gt_annotations`). When the
    detector has no candidate for a ground truth, the case takes its image from the annotation.
    """
    cases = cases.copy()
    gt = gt_annotations.set_index("gt_id").reindex(cases["gt_id"].to_numpy())
    cases["category_id"] = gt["category_id"].fillna(-1).to_numpy(np.int64)
    cases["category"] = gt["category"].fillna("").to_numpy(object)
    cases["image_id"] = np.where(cases["image_id"] >= 0, cases["image_id"], gt["image_id"].fillna(-1)).astype(np.int64)
    for prefix, boxes in (("gt", _boxes_of(cases["gt_id"].to_numpy(), gt_annotations, "gt_id")),
                          ("kept", _boxes_of(cases["kept_cand_id"].to_numpy(), candidate_boxes, "cand_id")),
                          ("suppressed", _boxes_of(cases["suppressed_cand_id"].to_numpy(), candidate_boxes, "cand_id"))):
        for i, edge in enumerate(BOX):
            cases[f"{prefix}_{edge}"] = boxes[:, i]
    return cases


def add_image_files(cases: pd.DataFrame, images: pd.DataFrame, image_folder) -> pd.DataFrame:
    """cases with `image_file` (image_folder / file_name, None without a folder) and `image_found`.

    image_folder: meta.json dataset.images (None for a ledger made without image files, e.g. an import
    or a synthetic ledger); a relative folder is taken as it is, like dataset.ann (from where the report runs).
    """
    cases = cases.copy()
    names = images.set_index("image_id")["file_name"].reindex(cases["image_id"].to_numpy())
    if image_folder:
        files = [None if not isinstance(n, str) else str(Path(image_folder) / n) for n in names]
    else:
        files = [None] * len(cases)
    cases["image_file"] = pd.Series(files, index=cases.index, dtype=object)
    cases["image_found"] = [f is not None and Path(f).is_file() for f in files]
    return cases


def gt_annotations(coco_gt, gt_ids) -> pd.DataFrame:
    """gt_id, image_id, category_id, category, x1, y1, x2, y2 of the annotations `gt_ids` of a COCO object
    (misalign.cocoeval.load_ground_truth: every engine has pycocotools' loadAnns / loadCats)."""
    with contextlib.redirect_stdout(io.StringIO()):  # ultrafast-pycocotools prints as it builds its index
        anns = coco_gt.loadAnns([int(i) for i in gt_ids]) if len(gt_ids) else []
        cats = {int(c["id"]): c.get("name", "") for c in coco_gt.loadCats(coco_gt.getCatIds())}
    bbox = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    return pd.DataFrame({
        "gt_id": np.array([a["id"] for a in anns], np.int64),
        "image_id": np.array([a["image_id"] for a in anns], np.int64),
        "category_id": np.array([a["category_id"] for a in anns], np.int64),
        "category": [cats.get(int(a["category_id"]), "") for a in anns],
        "x1": bbox[:, 0], "y1": bbox[:, 1], "x2": bbox[:, 0] + bbox[:, 2], "y2": bbox[:, 1] + bbox[:, 3],
    })


# ---------------------------------------------------------------------------------------------
# reading a ledger


def _relevant(table):
    """relevant_mask on a pyarrow row group (misalign.ledger.read_candidates' `where`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    matched = pc.greater_equal(table["gt_id"], 0)
    good = pc.greater_equal(table["iou"], pa.scalar(float(MIN_BEST_IOU), pa.float32()))  # float32, like relevant_mask
    return pc.and_(matched, pc.or_(good, table["kept"]))


def read_pool(folder) -> pd.DataFrame:
    """SUPPRESSION_COLUMNS of the rows that can matter (relevant_mask), filtered row group by row group."""
    from misalign.ledger import read_candidates

    return read_candidates(folder, list(SUPPRESSION_COLUMNS), where=_relevant)


def read_boxes(ledger, cand_ids) -> pd.DataFrame:
    """cand_id, x1, y1, x2, y2 of the candidates `cand_ids` (the only boxes the gallery needs)."""
    from misalign.ledger import rows_by_cand_id

    return rows_by_cand_id(ledger, cand_ids, list(BOX))


def ledger_table(ledger) -> pd.DataFrame | None:
    """`per_gt_table` of a ledger: of the candidates in memory when they hold SUPPRESSION_COLUMNS
    (those of misalign.scan hold every row that can matter), else of the pool read for it; None for
    a post-NMS-only ledger (no suppression)."""
    if not ledger.pre_nms:
        return None
    cands = ledger.candidates
    if not all(c in cands.columns for c in SUPPRESSION_COLUMNS):
        cands = read_pool(ledger.folder)
    return per_gt_table(cands)


def analyse_ledger(ledger, coco_gt, gallery_gt_ids=None, table=None) -> tuple[dict, pd.DataFrame | None]:
    """(metrics.json `suppression`, the gallery cases) of one ledger (misalign.ledger.Ledger).

    gallery_gt_ids: the ground truths to show (another detector's worst losses); default this one's
    worst GALLERY_SIZE. table: its `ledger_table`, when already made. A post-NMS-only ledger has no
    suppression: unavailable_metrics() and None.
    """
    table = ledger_table(ledger) if table is None else table
    if table is None:
        return unavailable_metrics(), None
    ids = worst_losses(table) if gallery_gt_ids is None else np.asarray(gallery_gt_ids, np.int64)
    cases = gallery_cases(table, ids)
    boxes = read_boxes(ledger, np.r_[cases["kept_cand_id"], cases["suppressed_cand_id"]])
    cases = add_boxes(cases, boxes, gt_annotations(coco_gt, ids))
    image_folder = (ledger.meta.get("dataset") or {}).get("images")
    return suppression_metrics(table), add_image_files(cases, ledger.images, image_folder)[list(CASE_COLUMNS)]
