"""One streaming pass over candidates.parquet: the tallies over every row, and the rows worth keeping.

    scan = scan_candidates(folder, images, pre_nms=True, retain_iou=0.5, shown_ids=ids)
    scan.counts        # Table 1's candidate stages per image (misalign.counts.candidate_stage_counts)
    scan.histograms    # score column -> {"pre_nms", "post_nms"} 2-D score-IoU histograms (Figure 1)
    scan.quadrants     # score column -> misalign.counts.quadrant_tallies
    scan.levels        # ledger level -> misalign.levels.level_tallies (with a `level` column)
    scan.retained      # the rows any later analysis ranks or draws, with their columns

A COCO pre-NMS ledger holds 2,000-4,000 candidates an image (10-20 M rows at COCO val). Most of
them are only counted: Table 1, the histograms, the quadrants and the flags add up over row
batches, and so do the per-level counts. What needs the rows themselves is small: the correlation pools (iou >= min_iou), the
kept rows (AP), and every row of the few images drawn one by one. So candidates.parquet is read
one row group at a time, the tallies are summed and only those rows are kept; memory grows with
the pools, not with the ledger (docs/architecture.md, "memory").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from misalign import counts, levels
from misalign.ledger import (CANDIDATES, CHECKED_COLUMNS, CandidateChecker, Ledger, candidate_batches,
                             check_raw_counts, known_images, read_images, read_meta, read_raw_counts, stored_sizes)

HIST_BINS = 50  # Figure 1 density: bins per axis on [0, 1]
HIST_COLUMNS = ("cls_score", "obj_score", "score")  # the score columns Figure 1 can draw against IoU
# Rows tallied at once: a dump writes a row group per forward pass (a few images, ~10^4 rows), so
# row groups are gathered up to this many rows; each batch costs ~40 numpy passes, and ~250 k rows
# make that overhead negligible while a column of the batch (1 MB) still sits in the CPU's cache.
BATCH_ROWS = 1 << 18


@dataclass
class CandidateScan:
    """The tallies of every candidate row and the retained rows (see the module doc)."""

    counts: dict  # (stage, condition) -> [I] int64, images in images.parquet order
    histograms: dict  # column -> {"pre_nms": [b, b] int64, "post_nms": [b, b] int64}
    quadrants: dict  # column -> {stage: {quadrant: n}}
    levels: dict  # ledger level -> [n, kept, rows scored by the formula] (misalign.levels.level_tallies)
    retained: pd.DataFrame  # rows with iou >= retain_iou, kept rows, rows of the shown images
    num_rows: int = 0
    has_obj: bool = False  # some obj_score is finite
    score_is_cls: bool = True  # score == cls_score on every row
    score_above_one: bool = False  # some score > 1 (CL-NMS)

    @property
    def score_columns(self) -> list[str]:
        """The score columns to correlate: cls_score, obj_score where some row has one, score."""
        return ["cls_score"] + (["obj_score"] if self.has_obj else []) + ["score"]


def _add(total: dict, part: dict) -> None:
    """total += part, key by key, for dicts of arrays or of nested dicts of ints."""
    for key, value in part.items():
        if isinstance(value, dict):
            _add(total.setdefault(key, {}), value)
        elif key in total:
            total[key] = total[key] + value
        else:
            total[key] = value


def _tally(batch: pd.DataFrame, positions: np.ndarray, num_images: int, pre_nms: bool, formula) -> dict:
    """The additive tallies of one row batch."""
    return {"counts": counts.candidate_stage_counts(batch, positions, num_images, pre_nms),
            "histograms": counts.score_iou_histograms(batch, HIST_COLUMNS, HIST_BINS),
            "quadrants": {column: counts.quadrant_tallies(batch, column) for column in HIST_COLUMNS},
            "levels": levels.level_tallies(batch, formula) if "level" in batch.columns else {}}


def _batches(folder, columns):
    """pyarrow Tables of `columns`, one chunk each: row groups gathered, or sliced, to BATCH_ROWS rows
    or a little more (the last one may be fewer), read in a worker thread while the caller tallies
    the previous batch (pyarrow decodes without the GIL)."""
    def gather():
        gathered, rows = [], 0
        for table in candidate_batches(folder, columns):
            for start in range(0, table.num_rows, BATCH_ROWS):  # a large row group in slices (no copy)
                gathered.append(table.slice(start, BATCH_ROWS))
                rows += gathered[-1].num_rows
                if rows >= BATCH_ROWS:
                    yield pa.concat_tables(gathered).combine_chunks()
                    gathered, rows = [], 0
        if gathered:
            yield pa.concat_tables(gathered).combine_chunks()

    with ThreadPoolExecutor(1) as reader:
        tables = gather()
        pending = reader.submit(next, tables, None)
        while (table := pending.result()) is not None:
            pending = reader.submit(next, tables, None)
            yield table


def scan_candidates(folder, images: pd.DataFrame, *, pre_nms: bool, columns, retain_iou: float,
                    shown_ids=(), formula=None, checker=None) -> CandidateScan:
    """Read `folder`'s candidates (`columns`, which include image_id, cls_score, obj_score, score,
    kept, iou and crowd) row group by row group into a CandidateScan.

    Retained: rows with iou >= retain_iou, kept rows and the rows of `shown_ids`; formula: the
    dump's misalign.levels.ScoreFormula (None: not known) the level tallies check; checker: a
    misalign.ledger.CandidateChecker that checks every batch's rows in the same pass (its columns are
    read too; `finish` is the caller's); the histograms
    and quadrants of a post-NMS-only ledger have no pre-NMS stage (None).
    """
    shown_ids = np.asarray(shown_ids, np.int64)
    num_images = len(images)
    total: dict = {}
    retained, num_rows = [], 0
    has_obj, score_is_cls, score_above_one = False, True, False
    read = list(columns) if checker is None else [*columns, *(c for c in (*CHECKED_COLUMNS, *checker.sizes)
                                                               if c not in columns)]
    for table in _batches(folder, read):
        batch = table.to_pandas(split_blocks=True)  # one chunk per column: no copy
        if checker is not None:
            checker.add(batch)
        positions = counts.image_positions(images, batch["image_id"].to_numpy(), "candidates.parquet")
        _add(total, _tally(batch, positions, num_images, pre_nms, formula))
        score, cls = batch["score"].to_numpy(), batch["cls_score"].to_numpy()
        has_obj |= bool(np.isfinite(batch["obj_score"].to_numpy()).any())
        score_is_cls &= bool(np.array_equal(score, cls))
        score_above_one |= bool((score > 1).any())
        iou = batch["iou"].to_numpy()
        keep = ((iou >= np.asarray(retain_iou, iou.dtype)) | batch["kept"].to_numpy(bool)
                | np.isin(batch["image_id"].to_numpy(), shown_ids))
        # kept as Arrow, made one DataFrame at the end: no second copy of every retained row at once
        retained.append(table.select(list(columns)).filter(pa.array(keep)))
        num_rows += len(batch)
        del batch, table
    if retained:
        table = pa.concat_tables(retained)
        retained.clear()  # the table holds the only references: to_pandas frees each column as it goes
        frame = table.to_pandas(self_destruct=True, split_blocks=True)
        del table
    else:
        frame = pd.DataFrame({c: pd.Series(dtype=np.float32) for c in columns})
    histograms = total.get("histograms") or {c: {s: np.zeros((HIST_BINS, HIST_BINS), np.int64)
                                                 for s in ("pre_nms", "post_nms")} for c in HIST_COLUMNS}
    quadrants = total.get("quadrants") or {c: counts.quadrant_tallies(frame.iloc[:0], c) for c in HIST_COLUMNS}
    if not pre_nms:
        for column in HIST_COLUMNS:
            histograms[column]["pre_nms"] = None
            quadrants[column].pop("pre_nms", None)
    candidate_counts = total.get("counts") or counts.candidate_stage_counts(
        frame.iloc[:0], np.zeros(0, np.int64), num_images, pre_nms)
    return CandidateScan(counts=candidate_counts, histograms=histograms, quadrants=quadrants,
                         levels=total.get("levels") or {}, retained=frame,
                         num_rows=num_rows, has_obj=has_obj, score_is_cls=score_is_cls,
                         score_above_one=score_above_one)


def read_scanned(folder, columns, *, retain_iou: float, shown_ids=(), meta=None, images=None,
                 validate: bool = False) -> tuple[Ledger, CandidateScan]:
    """The ledger in `folder` with only its retained candidate rows in memory, and the scan of all of
    them (`meta`, `images`: already read, to read them once). validate: also the row checks of
    misalign.ledger.validate_ledger (candidates in the scan's own pass, then raw_counts.parquet);
    the caller has checked the files and schemas (validate_ledger(..., check_content=False))."""
    folder = Path(folder)
    meta = read_meta(folder) if meta is None else meta
    images = read_images(folder) if images is None else images
    pre_nms = bool(meta.get("pre_nms", True))
    checker = None
    if validate:
        known = known_images(folder)
        checker = CandidateChecker(folder / CANDIDATES, known, stored_sizes(folder / CANDIDATES))
    scan = scan_candidates(folder, images, pre_nms=pre_nms, columns=columns, retain_iou=retain_iou,
                           shown_ids=shown_ids, formula=levels.score_formula(meta), checker=checker)
    if validate:
        checker.finish()
        check_raw_counts(folder, known)
    ledger = Ledger(folder=folder, meta=meta, candidates=scan.retained, images=images,
                    raw_counts=read_raw_counts(folder))
    return ledger, scan
