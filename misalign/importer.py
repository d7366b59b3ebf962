"""`misalign import`: a ledger from another detector's predictions (docs/ledger.md).

Inputs, chosen by the file's suffix:
- `.json`: COCO results (a list of {image_id, category_id, bbox [x, y, w, h], score}). These are
  final detections, so every row is kept, `suppressed_by` is -1, `cls_score` = `score`,
  `obj_score` NaN, `level` / `anchor_idx` -1, and meta.json says `pre_nms: false`. No NMS or
  max-detections is applied to them.
- `.parquet` / `.csv`: a table with image_id, category_id, a box (x1 y1 x2 y2 in pixels, or COCO
  `bbox` [x, y, w, h] - a list, or its JSON text in a CSV - or x y w h) and score; optionally
  cls_score (default: score), obj_score (default NaN), kept, level, anchor_idx.
  Without `kept` the table is the pre-NMS pool: misalign runs greedy per-class NMS
  (torchvision.ops.nms, IoU > nms_thresh suppresses) per image, keeps the best `max_det` survivors
  by score, and sets `suppressed_by` to the highest-scoring survivor of the same class that
  overlaps the box by more than nms_thresh. With `kept` the detector's own decision is taken as
  is and `suppressed_by` is inferred: the highest-scoring kept box of the same class, scored at
  least as high, overlapping it by more than nms_thresh; -1 where there is none (the detector's
  NMS may differ from ours). A table without `kept` is a pre-NMS pool whatever NMS then does (it
  may suppress nothing); a table whose `kept` column is true on every row counts as post-NMS only.
Boxes are kept as float64, and a box given as [x, y, w, h] keeps its own w and h (the ledger's `w`,
`h`), so AP from the ledger equals pycocotools' on the original file bit for bit.
Truth columns (iou, gt_id, iou_any, crowd) come from the ground truth (misalign.truth.truth_columns);
images.parquet lists every image of the ground truth with num_anchors and num_pos_anchors -1
(unknown); raw_counts.parquet is empty. The ledger is written atomically.

torch is needed only for the NMS of a table without `kept` (misalign.nms, imported there); everything
else runs without it. Bad input raises InputError naming the file and the first offending row (rows
counted from 0, as `results[i]` / `df.iloc[i]`).

Public API: import_predictions(gt_path, predictions_path, out, *, name=None, nms_thresh=0.5, max_det=100) -> Path;
read_predictions(path, gt) -> (DataFrame, format). The NMS with attribution is misalign.nms.nms_with_attribution.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from misalign.boxes import nms_suppressors
from misalign.coco import ground_truth_by_image, load_coco_json
from misalign.errors import InputError
from misalign.io import atomic_dir
from misalign.ledger import LedgerWriter, images_frame
from misalign.truth import truth_columns

log = logging.getLogger(__name__)

IMAGES_PER_CHUNK = 256  # images per Parquet row group written
_BOX_COLUMNS = ("x1", "y1", "x2", "y2")


# --- reading and checking the predictions --------------------------------------------------------


def _read_json_results(path: Path) -> pd.DataFrame:
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(results, list):
        raise InputError(f"{path}: not a COCO results file (expected a JSON list of detections)")
    for row, item in enumerate(results):
        if not isinstance(item, dict):
            raise InputError(f"{path}: row {row}: expected an object with image_id, category_id, bbox, score")
    required = ("image_id", "category_id", "bbox", "score")
    frame = pd.DataFrame(results) if results else pd.DataFrame({key: [] for key in required})
    _require(path, frame, required)
    missing = [(int(np.argmax(frame[k].isna().to_numpy())), k) for k in required if frame[k].isna().any()]
    if missing:
        row, key = min(missing)
        raise InputError(f"{path}: row {row}: no {key}")
    frame = frame.assign(**_boxes_from_bbox(path, frame["bbox"]))
    return frame.drop(columns=["bbox"])


def _boxes_from_bbox(path: Path, bbox: pd.Series) -> dict[str, np.ndarray]:
    """x1..y2 from a column of [x, y, w, h] lists (or their JSON text)."""
    values = []
    for row, item in enumerate(bbox.tolist()):
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except json.JSONDecodeError:
                item = None
        if isinstance(item, np.ndarray):
            item = item.tolist()
        if not (isinstance(item, (list, tuple)) and len(item) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)):
            raise InputError(f"{path}: row {row}: bbox must be [x, y, w, h] (got {item!r})")
        values.append(item)
    xywh = np.asarray(values, dtype=np.float64).reshape(-1, 4)
    return {"x1": xywh[:, 0], "y1": xywh[:, 1], "x2": xywh[:, 0] + xywh[:, 2], "y2": xywh[:, 1] + xywh[:, 3],
            "_w": xywh[:, 2], "_h": xywh[:, 3]}


def _read_table(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read ({str(err).splitlines()[0]})") from None
    _require(path, frame, ("image_id", "category_id", "score"))
    if all(c in frame.columns for c in _BOX_COLUMNS):
        return frame
    if "bbox" in frame.columns:
        return frame.assign(**_boxes_from_bbox(path, frame["bbox"])).drop(columns=["bbox"])
    if all(c in frame.columns for c in ("x", "y", "w", "h")):
        x, y = frame["x"].to_numpy(np.float64), frame["y"].to_numpy(np.float64)
        w, h = frame["w"].to_numpy(np.float64), frame["h"].to_numpy(np.float64)
        return frame.assign(x1=x, y1=y, x2=x + w, y2=y + h, _w=w, _h=h)
    raise InputError(f"{path}: missing box columns (x1 y1 x2 y2, bbox, or x y w h)")


def _require(path: Path, frame: pd.DataFrame, columns) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")


def _numeric(path: Path, frame: pd.DataFrame, column: str) -> np.ndarray:
    try:
        return pd.to_numeric(frame[column], errors="raise").to_numpy(np.float64)
    except (ValueError, TypeError):
        bad = pd.to_numeric(frame[column], errors="coerce").isna() & frame[column].notna()
        row = int(np.argmax(bad.to_numpy()))
        raise InputError(f"{path}: row {row}: {column} is not a number ({frame[column].iloc[row]!r})") from None


def _first_problem(checks) -> tuple[int, str] | None:
    """(row, message) of the lowest row any check flags; checks: [(bad mask, message(row))]."""
    best = None
    for bad, message in checks:
        if np.any(bad):
            row = int(np.argmax(bad))
            if best is None or row < best[0]:
                best = (row, message(row))
    return best


def read_predictions(path, gt: dict, gt_name: str = "gt") -> tuple[pd.DataFrame, str]:
    """The predictions in `path` as a checked table and its format ('coco-results' or 'table').

    Returns columns image_id, category_id (int64), x1..y2, w, h, score, cls_score, obj_score (float64),
    and kept (bool) / level / anchor_idx when the input has them, in input order. gt: the COCO dict
    the ids must exist in. InputError on the first offending row.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: predictions file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        frame, fmt = _read_json_results(path), "coco-results"
    elif suffix in (".parquet", ".csv"):
        frame, fmt = _read_table(path), "table"
    else:
        raise InputError(f"{path}: unsupported predictions format (expected .json, .parquet or .csv)")

    values = {c: _numeric(path, frame, c) for c in ("image_id", "category_id", "score", *_BOX_COLUMNS)}
    for optional in ("cls_score", "obj_score", "level", "anchor_idx"):
        if optional in frame.columns:
            values[optional] = _numeric(path, frame, optional)
    gt_images = np.asarray(sorted(image["id"] for image in gt["images"]), np.int64)
    gt_cats = np.asarray(sorted(cat["id"] for cat in gt["categories"]), np.int64)
    image_id, category_id = values["image_id"], values["category_id"]
    checks = []
    for column in ("image_id", "category_id"):
        v = values[column]
        checks.append((~np.isfinite(v) | (v != np.round(v)), lambda r, c=column: f"{c} {frame[c].iloc[r]!r} is not an integer id"))
    checks.append((~np.isin(np.nan_to_num(image_id, nan=-1), gt_images),
                   lambda r: f"image_id {_show(image_id[r])} is not in {gt_name}"))
    checks.append((~np.isin(np.nan_to_num(category_id, nan=-1), gt_cats),
                   lambda r: f"category_id {_show(category_id[r])} is not in {gt_name}"))
    for column in ("score", *_BOX_COLUMNS, "cls_score"):
        if column in values:
            checks.append((~np.isfinite(values[column]), lambda r, c=column: f"{c} is {values[c][r]} (not a finite number)"))
    for column in ("level", "anchor_idx"):
        if column in values:
            v = values[column]
            checks.append((~np.isfinite(v) | (v != np.round(v)), lambda r, c=column: f"{c} is not an integer"))
    width = frame["_w"].to_numpy() if "_w" in frame.columns else values["x2"] - values["x1"]
    height = frame["_h"].to_numpy() if "_h" in frame.columns else values["y2"] - values["y1"]
    checks.append((width < 0, lambda r: "inverted box (x2 < x1, or w < 0)"))
    checks.append((height < 0, lambda r: "inverted box (y2 < y1, or h < 0)"))
    if "kept" in frame.columns:
        kept_raw = frame["kept"]
        kept_ok = kept_raw.isin([True, False, 0, 1]).to_numpy() & kept_raw.notna().to_numpy()
        checks.append((~kept_ok, lambda r: f"kept is {kept_raw.iloc[r]!r} (expected true/false or 1/0)"))
    problem = _first_problem(checks)
    if problem is not None:
        raise InputError(f"{path}: row {problem[0]}: {problem[1]}")

    out = pd.DataFrame({"image_id": image_id.astype(np.int64), "category_id": category_id.astype(np.int64)})
    for column in (*_BOX_COLUMNS, "score"):
        out[column] = values[column]
    out["w"], out["h"] = width.astype(np.float64), height.astype(np.float64)  # as given, or x2 - x1
    out["cls_score"] = values.get("cls_score", values["score"])
    out["obj_score"] = values.get("obj_score", np.full(len(out), np.nan))
    for column in ("level", "anchor_idx"):
        if column in values:
            out[column] = values[column].astype(np.int64)
    if "kept" in frame.columns:
        out["kept"] = frame["kept"].to_numpy().astype(bool)
    return out, fmt


def _show(value: float) -> str:
    return str(int(value)) if np.isfinite(value) and value == np.round(value) else repr(value)


# --- the import ----------------------------------------------------------------------------------


def _ledger_columns(preds: pd.DataFrame, fmt: str, gt_by_image: dict, nms_thresh: float, max_det: int):
    """kept, per-image suppressed_by and the truth columns for `preds` sorted by (image, -score)."""
    num = len(preds)
    kept = np.ones(num, bool)
    local_sup = np.full(num, -1, np.int64)
    truth = {"iou": np.zeros(num, np.float32), "gt_id": np.full(num, -1, np.int64),
             "iou_any": np.zeros(num, np.float32), "crowd": np.zeros(num, bool)}
    image_ids = preds["image_id"].to_numpy()
    boxes = preds[list(_BOX_COLUMNS)].to_numpy(np.float64)  # [N, 4] exactly as the ledger stores them
    categories = preds["category_id"].to_numpy()
    scores = preds["score"].to_numpy(np.float32)
    starts = np.r_[0, np.flatnonzero(image_ids[1:] != image_ids[:-1]) + 1] if num else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], num]
    given_kept = preds["kept"].to_numpy() if "kept" in preds.columns else None
    if fmt == "table" and given_kept is None:
        from misalign import nms  # torch: only this NMS needs it

    for s, e in zip(starts, ends):
        b, c = boxes[s:e], categories[s:e]
        if fmt == "table" and given_kept is None:
            kept[s:e], local_sup[s:e] = nms.nms_with_attribution(b, scores[s:e], c, nms_thresh, max_det)
        elif given_kept is not None:
            kept[s:e] = given_kept[s:e]
            # a kept box scored at least as high: rows are ranked, so "ranked before" (ties: row order)
            local_sup[s:e] = nms_suppressors(b, c, kept[s:e], nms_thresh)
        gt = gt_by_image.get(int(image_ids[s]))
        if gt is not None and len(gt["ann_id"]):  # no ground truth: the defaults above (iou 0, gt_id -1)
            for name, values in truth_columns(b, c, gt["boxes"], gt["category_id"], gt["ann_id"], gt["iscrowd"]).items():
                truth[name][s:e] = values
    return kept, local_sup, truth


def import_predictions(gt_path, predictions_path, out, *, name: str | None = None, nms_thresh: float = 0.5,
                       max_det: int = 100) -> Path:
    """Write the ledger of `predictions_path` (see the module doc) into the folder `out`; returns it."""
    gt_path, predictions_path, out = Path(gt_path), Path(predictions_path), Path(out)
    if not 0.0 < nms_thresh <= 1.0:
        raise InputError(f"--nms-thresh: {nms_thresh} is not in (0, 1]")
    if max_det < 1:
        raise InputError(f"--max-det: {max_det} is not a positive number")
    gt = load_coco_json(gt_path)
    preds, fmt = read_predictions(predictions_path, gt, gt_path.name)
    # rank rows within each image: score descending, ties in input order (as a stable NMS sort does)
    order = np.lexsort((-preds["score"].to_numpy(np.float32), preds["image_id"].to_numpy()))
    preds = preds.iloc[order].reset_index(drop=True)
    gt_by_image = ground_truth_by_image(gt)
    kept, local_sup, truth = _ledger_columns(preds, fmt, gt_by_image, nms_thresh, max_det)
    frame = preds.assign(kept=kept, suppressed_by=local_sup, **truth)
    if fmt == "coco-results":
        frame = frame.assign(level=-1, anchor_idx=-1)
    # A pool we ran NMS on is pre-NMS even if NMS suppressed nothing; given decisions that keep
    # every row are a list of final boxes.
    pre_nms = fmt == "table" and ("kept" not in preds.columns or not bool(kept.all()))
    meta = {
        "detector": {"name": name or predictions_path.stem, "config": None},
        "source": {"predictions": str(predictions_path.resolve()), "format": fmt,
                   "nms": ("misalign (torchvision.ops.nms per class)" if fmt == "table" and "kept" not in preds.columns
                           else "given")},
        "checkpoint_sha256": None,
        "dataset": {"ann": str(gt_path.resolve()), "images": None, "split": None},
        "postprocess": {"score_thresh": None, "topk": None, "nms_thresh": nms_thresh,
                        "max_det": max_det if fmt == "table" and "kept" not in preds.columns else None,
                        "score_formula": None, "alpha": None},
        "pre_nms": pre_nms,
    }
    with atomic_dir(out) as tmp, LedgerWriter(tmp) as writer:
        writer.add_images(images_frame(gt["images"], gt_by_image))
        image_ids = frame["image_id"].to_numpy()
        bounds = np.r_[0, np.flatnonzero(image_ids[1:] != image_ids[:-1]) + 1, len(frame)] if len(frame) else [0]
        for k in range(0, len(bounds) - 1, IMAGES_PER_CHUNK):
            lo, hi = bounds[k], bounds[min(k + IMAGES_PER_CHUNK, len(bounds) - 1)]
            writer.add_candidates(frame.iloc[lo:hi])
        writer.close(meta)
    log.info("imported %d predictions (%d kept) of %d images into %s", len(frame), int(kept.sum()),
             len(gt["images"]), out)
    return out
