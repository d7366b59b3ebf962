"""The ledger: a dump folder holding every candidate box a detector considered (docs/ledger.md).

Files of a ledger folder:
- `candidates.parquet` (CANDIDATE_SCHEMA): one row per (anchor, class) pair that entered NMS.
- `images.parquet` (IMAGE_SCHEMA): one row per image of the split.
- `raw_counts.parquet` (RAW_COUNT_SCHEMA): long-format threshold counts over all anchors.
- `meta.json`: provenance and settings (META_KEYS).
- `detections.json`: the kept rows in COCO results format, for other tools.
- `raw.parquet` (RAW_SCHEMA, optional): every anchor's decoded box for the first N images.

Conventions: boxes are x1, y1, x2, y2 in pixels of the original image; IoU is COCO's (no "+1");
threshold conditions are strict `>`. `suppressed_by` is the `cand_id` of the NMS survivor that
suppressed the row (the highest-scoring survivor of the same class overlapping it by more than the
NMS threshold); it is -1 for every survivor of NMS, whether max-detections then kept it or cut it.
A survivor that suppressed others may itself have been cut by max-detections (`kept` false).

Public API:
- CANDIDATE_SCHEMA, IMAGE_SCHEMA, RAW_COUNT_SCHEMA, RAW_SCHEMA, SCHEMA_VERSION, META_KEYS, LEDGER_FILES
- LedgerWriter(folder): streaming writer (add_images, add_candidates, add_raw_counts, add_raw, close)
- validate_ledger(folder, check_content=True) -> None (InputError naming the file and the problem)
- read_meta, read_candidates, read_images, read_raw_counts, read_raw -> dict / DataFrame
- read_ledger(folder, columns=None) -> Ledger (candidates, images, raw_counts, meta)
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from misalign import __version__
from misalign.errors import InputError
from misalign.io import write_json_atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # meta.json "schema_version"; bumped when a column changes meaning or type
# Version history: 1 had float32 boxes and no w, h, crowd, cl_nms_score columns (still read: see
# LEGACY_CANDIDATE_COLUMNS).

_F32, _F64, _I64 = pa.float32(), pa.float64(), pa.int64()

CANDIDATE_SCHEMA = pa.schema([
    ("cand_id", _I64),  # unique in the dump
    ("image_id", _I64),
    ("category_id", _I64),  # the dataset's category id
    ("x1", _F64), ("y1", _F64), ("x2", _F64), ("y2", _F64),  # original-image pixels
    # COCO's [x, y, w, h] is (x1, y1, w, h): w, h as the detector gave them (a COCO results file's own
    # numbers; x2 - x1 for a box given by its corners). pycocotools takes its areas and IoUs from w, h,
    # and x1 + w (exactly x2) as the far edge: w = x2 - x1 recomputed would differ in the last bit.
    ("w", _F64), ("h", _F64),
    ("cls_score", _F32),  # sigmoid class probability
    ("obj_score", _F32),  # object-confidence / IoU-branch probability; NaN where none
    ("score", _F32),  # what NMS ranked by
    ("level", pa.int8()),  # FPN level, 0 = P3; -1 unknown
    ("anchor_idx", pa.int32()),  # index into the image's concatenated anchors; -1 unknown
    ("kept", pa.bool_()),  # in the final output (after NMS and max-detections)
    ("suppressed_by", _I64),  # cand_id of the NMS survivor that suppressed it; -1 if it survived NMS
    ("iou", _F32),  # max IoU with a non-crowd gt of the same category; 0 if none
    ("gt_id", _I64),  # annotation id of that gt; -1 when iou is 0
    ("iou_any", _F32),  # max IoU with a non-crowd gt of any category
    ("crowd", pa.bool_()),  # COCOeval ignores it at IoU 0.5 (matches a crowd region of its category, no gt)
    ("cl_nms_score", _F32),  # the CL-balanced NMS selection score; NaN without CL-NMS
])

IMAGE_SCHEMA = pa.schema([
    ("image_id", _I64),
    ("file_name", pa.string()),
    ("width", _I64), ("height", _I64),  # original image size in pixels
    ("num_gt", _I64),  # non-crowd ground-truth boxes (the ones `iou` is measured against)
    ("num_anchors", _I64),  # anchors of the image; -1 unknown (imports)
    ("num_pos_anchors", _I64),  # anchors with IoU > 0.5 to a non-crowd gt (Positive_NUM); -1 unknown
])

RAW_COUNT_SCHEMA = pa.schema([
    ("image_id", _I64),
    ("stage", pa.string()),  # 'raw' (decoded box of every anchor) or 'anchors' (the anchor boxes)
    ("quantity", pa.string()),  # 'cls' (max class probability) or 'iou' (max IoU, any non-crowd gt)
    ("threshold", pa.float64()),
    ("count", _I64),  # anchors of the image with quantity > threshold
])

RAW_SCHEMA = pa.schema([  # raw.parquet: every anchor of the first N images (optional file)
    ("image_id", _I64),
    ("anchor_idx", pa.int32()),
    ("level", pa.int8()),  # -1 unknown
    ("x1", _F32), ("y1", _F32), ("x2", _F32), ("y2", _F32),  # the anchor's decoded box
    ("category_id", _I64),  # argmax class, dataset id
    ("cls_score", _F32),  # max class probability
    ("obj_score", _F32),  # NaN where the detector has no branch
    ("iou", _F32),  # max IoU with a non-crowd gt of `category_id`; 0 if none
    ("gt_id", _I64),  # -1 when iou is 0
    ("iou_any", _F32),  # max IoU with any non-crowd gt (raw_counts' 'raw'/'iou' quantity)
    ("anchor_x1", _F32), ("anchor_y1", _F32), ("anchor_x2", _F32), ("anchor_y2", _F32),  # NaN unknown
    ("anchor_iou", _F32),  # the anchor box's max IoU with any non-crowd gt; NaN unknown
])

# Values the writer fills in for optional columns the caller leaves out.
_CANDIDATE_DEFAULTS = {"obj_score": np.nan, "level": -1, "anchor_idx": -1, "crowd": False, "cl_nms_score": np.nan}
# Columns a schema-1 ledger (or another tool's writer) may lack, read as: w = x2 - x1, h = y2 - y1,
# crowd false, cl_nms_score NaN. Its float32 boxes are read as float64.
LEGACY_CANDIDATE_COLUMNS = ("w", "h", "crowd", "cl_nms_score")
_WIDENED = {"x1", "y1", "x2", "y2"}  # float64 columns that schema 1 wrote as float32
_IMAGE_DEFAULTS = {"num_anchors": -1, "num_pos_anchors": -1}
_RAW_DEFAULTS = {"level": -1, "obj_score": np.nan, "anchor_x1": np.nan, "anchor_y1": np.nan,
                 "anchor_x2": np.nan, "anchor_y2": np.nan, "anchor_iou": np.nan}

CANDIDATES, IMAGES, RAW_COUNTS, RAW, META, DETECTIONS = (
    "candidates.parquet", "images.parquet", "raw_counts.parquet", "raw.parquet", "meta.json", "detections.json")
LEDGER_FILES = (CANDIDATES, IMAGES, RAW_COUNTS, META)  # required; detections.json and raw.parquet are not
_SCHEMAS = {CANDIDATES: CANDIDATE_SCHEMA, IMAGES: IMAGE_SCHEMA, RAW_COUNTS: RAW_COUNT_SCHEMA, RAW: RAW_SCHEMA}

# meta.json keys. The writer fills the starred ones; the rest come from the caller (dump / import).
META_KEYS = {
    "schema_version": "* int, SCHEMA_VERSION of the files",
    "created": "* ISO 8601 UTC time the ledger was closed",
    "package_version": "* misalign version that wrote it",
    "num_images": "* rows of images.parquet",
    "num_candidates": "* rows of candidates.parquet",
    "num_kept": "* kept rows (= entries of detections.json)",
    "pre_nms": "bool: candidates hold the pre-NMS pool (false: kept boxes only, e.g. a COCO results import); default true",
    "detector": "{name, config}: detector name and its config dict (null when unknown)",
    "checkpoint_sha256": "hash of the checkpoint file, null for imports",
    "dataset": "{ann, images, split}: ground-truth annotation file (absolute path), image folder, split name",
    "postprocess": "{score_thresh, topk, nms_thresh, max_det, score_formula, alpha}: null where unknown",
}
STAGES = {"raw": ("cls", "iou"), "anchors": ("iou",)}  # raw_counts: stage -> its quantities


# --- writing -------------------------------------------------------------------------------------


class LedgerWriter:
    """Streams a ledger into `folder` (normally the temporary folder of `misalign.io.atomic_dir`).

    Each `add_*` call appends one Parquet row group, so a dump never holds the whole ledger. Frames
    are cast to the schema dtypes; a missing required column raises ValueError (a caller bug).

    Candidates contract: do NOT pass `cand_id`; the writer numbers rows 0, 1, 2, ... in the order
    they arrive. `suppressed_by` is given per image: the position of the suppressing row among that
    image's rows in the same frame (0-based, -1 for none), exactly the index the model's postprocess
    produces. An image's rows must be contiguous and come in one call. Kept rows become
    detections.json entries (ordered by image, then score descending).
    first_cand_id: the number of the first row (one part of a ledger written in parts starts where
    its numbering says, docs/ledger.md).
    Usage: `with LedgerWriter(tmp) as w: ...; w.close(meta)` (leaving the block without close() on
    an exception just releases the files).
    """

    def __init__(self, folder, first_cand_id: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._first_cand_id = int(first_cand_id)
        self._rows = {CANDIDATES: 0, IMAGES: 0, RAW_COUNTS: 0, RAW: 0}
        self._num_kept = 0
        self._candidate_images: set[int] = set()
        self._detections = open(self.folder / DETECTIONS, "w")
        self._detections.write("[")
        self._closed = False

    def __enter__(self) -> "LedgerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._closed:
            self.abort()

    def add_images(self, frame: pd.DataFrame) -> None:
        """Append image rows (IMAGE_SCHEMA; num_anchors/num_pos_anchors default to -1)."""
        self._append(IMAGES, _to_table(frame, IMAGE_SCHEMA, _IMAGE_DEFAULTS, IMAGES))

    def add_raw_counts(self, frame: pd.DataFrame) -> None:
        """Append long-format count rows (RAW_COUNT_SCHEMA), e.g. from `truth.raw_counts_rows`."""
        self._append(RAW_COUNTS, _to_table(frame, RAW_COUNT_SCHEMA, {}, RAW_COUNTS))

    def add_raw(self, frame: pd.DataFrame) -> None:
        """Append per-anchor rows to raw.parquet (RAW_SCHEMA; anchor_*, obj_score default NaN)."""
        self._append(RAW, _to_table(frame, RAW_SCHEMA, _RAW_DEFAULTS, RAW))

    def add_candidates(self, frame: pd.DataFrame) -> np.ndarray:
        """Append candidate rows of whole images; returns their new cand_ids [N] int64.

        `frame` has every CANDIDATE_SCHEMA column but `cand_id` (optional: obj_score NaN, level -1,
        anchor_idx -1, crowd false, cl_nms_score NaN, w and h x2 - x1 and y2 - y1) and
        `suppressed_by` as a per-image row position (see the class doc).
        """
        if "cand_id" in frame.columns:
            raise ValueError("add_candidates: the writer assigns cand_id; pass suppressed_by as a per-image row position")
        num = len(frame)
        image_ids = np.asarray(frame["image_id"], dtype=np.int64) if "image_id" in frame.columns else None
        if image_ids is None:
            raise ValueError(f"{CANDIDATES}: missing column(s) image_id")
        starts, sizes = _image_runs(image_ids)
        if num and len(np.unique(image_ids[starts])) != len(starts):
            raise ValueError("add_candidates: the rows of an image must be contiguous")
        new_images = set(image_ids[starts].tolist())
        if new_images & self._candidate_images:
            raise ValueError("add_candidates: an image's candidates must come in one call")
        self._candidate_images |= new_images

        base = self._first_cand_id + self._rows[CANDIDATES]
        cand_id = base + np.arange(num, dtype=np.int64)
        first = np.repeat(starts, sizes)  # [N] position of each row's image start
        size = np.repeat(sizes, sizes)  # [N] rows of each row's image
        local = np.asarray(frame["suppressed_by"], dtype=np.int64) if "suppressed_by" in frame.columns else None
        if local is None:
            raise ValueError(f"{CANDIDATES}: missing column(s) suppressed_by")
        if np.any((local < -1) | (local >= size)):
            raise ValueError("add_candidates: suppressed_by must be -1 or a row position within the same image")
        columns = {name: frame[name] for name in frame.columns}
        for size, (lo, hi) in (("w", ("x1", "x2")), ("h", ("y1", "y2"))):
            if size not in columns and lo in columns and hi in columns:  # corners given: exact in float64
                columns[size] = np.asarray(frame[hi], np.float64) - np.asarray(frame[lo], np.float64)
        columns["cand_id"] = cand_id
        columns["suppressed_by"] = np.where(local >= 0, base + first + local, -1)
        table = _to_table(columns, CANDIDATE_SCHEMA, _CANDIDATE_DEFAULTS, CANDIDATES)
        self._append(CANDIDATES, table)
        self._write_detections(table, np.repeat(np.arange(len(starts)), sizes))
        return cand_id

    def close(self, meta: dict) -> dict:
        """Finish every file and write meta.json (`meta` plus the writer's keys); returns that dict."""
        self._detections.write("\n]\n")
        self._detections.close()
        for name in (CANDIDATES, IMAGES, RAW_COUNTS):
            if name not in self._writers:  # nothing appended: an empty file with the right schema
                self._writers[name] = pq.ParquetWriter(self.folder / name, _SCHEMAS[name])
        for writer in self._writers.values():
            writer.close()
        full = {
            "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "package_version": __version__,
            "pre_nms": True,
            **meta,
            "num_images": self._rows[IMAGES],
            "num_candidates": self._rows[CANDIDATES],
            "num_kept": self._num_kept,
        }
        write_json_atomic(self.folder / META, full)
        self._closed = True
        return full

    def abort(self) -> None:
        """Release the open files without finishing them (the caller discards the folder)."""
        self._detections.close()
        for writer in self._writers.values():
            writer.close()
        self._closed = True

    def _append(self, name: str, table: pa.Table) -> None:
        if name not in self._writers:
            self._writers[name] = pq.ParquetWriter(self.folder / name, _SCHEMAS[name])
        if table.num_rows:
            self._writers[name].write_table(table, row_group_size=table.num_rows)
            self._rows[name] += table.num_rows

    def _write_detections(self, table: pa.Table, run: np.ndarray) -> None:
        """Append the kept rows of `table` to detections.json: by image run, score descending."""
        kept = table.column("kept").to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(kept)
        if not len(rows):
            return
        score = table.column("score").to_numpy()[rows]
        rows = rows[np.lexsort((-score, run[rows]))]
        col = {name: table.column(name).to_numpy()[rows]
               for name in ("image_id", "category_id", "x1", "y1", "w", "h", "score")}
        # repr of a float64 round-trips exactly, so pycocotools reads back the ledger's own numbers
        parts = [
            f'{{"image_id": {i}, "category_id": {c}, "bbox": [{x!r}, {y!r}, {w!r}, {h!r}], "score": {s!r}}}'
            for i, c, x, y, w, h, s in zip(*(col[n].tolist() for n in ("image_id", "category_id", "x1", "y1", "w", "h")),
                                           col["score"].astype(np.float64).tolist())
        ]
        self._detections.write(("," if self._num_kept else "") + "\n" + ",\n".join(parts))
        self._num_kept += len(parts)


def images_frame(infos: list[dict], gt_by_image: dict, anchor_counts: dict | None = None) -> pd.DataFrame:
    """images.parquet rows: one per COCO image info ({id, file_name, width, height}), in the order given.

    gt_by_image: misalign.coco.ground_truth_by_image (num_gt counts its non-crowd boxes);
    anchor_counts: image id -> (num_anchors, num_pos_anchors), None: unknown (-1, e.g. an import).
    """
    ids = [int(info["id"]) for info in infos]
    unknown = (-1, -1)
    return pd.DataFrame({
        "image_id": np.asarray(ids, np.int64),
        "file_name": [info["file_name"] for info in infos],
        "width": np.asarray([int(info["width"]) for info in infos], np.int64),
        "height": np.asarray([int(info["height"]) for info in infos], np.int64),
        "num_gt": np.asarray([int((~gt_by_image[i]["iscrowd"].astype(bool)).sum()) for i in ids], np.int64),
        "num_anchors": np.asarray([(anchor_counts or {}).get(i, unknown)[0] for i in ids], np.int64),
        "num_pos_anchors": np.asarray([(anchor_counts or {}).get(i, unknown)[1] for i in ids], np.int64),
    })


def _image_runs(image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start position [R] and length [R] of each run of equal consecutive image ids."""
    if not len(image_ids):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.r_[0, np.flatnonzero(image_ids[1:] != image_ids[:-1]) + 1]
    return starts, np.diff(np.r_[starts, len(image_ids)])


def _to_table(columns, schema: pa.Schema, defaults: dict, name: str) -> pa.Table:
    """A pyarrow Table with exactly `schema` from a DataFrame or dict of columns (ValueError if unfit)."""
    available = set(columns.columns if isinstance(columns, pd.DataFrame) else columns)
    missing = [f.name for f in schema if f.name not in available and f.name not in defaults]
    if missing:
        raise ValueError(f"{name}: missing column(s) {', '.join(missing)}")
    num = len(columns) if isinstance(columns, pd.DataFrame) else len(next(iter(columns.values()), []))
    arrays = []
    for field in schema:
        values = columns[field.name] if field.name in available else np.full(num, defaults[field.name])
        arrays.append(_to_arrow(values, field, name))
    return pa.Table.from_arrays(arrays, schema=schema)


def _to_arrow(values, field: pa.Field, name: str) -> pa.Array:
    if pa.types.is_string(field.type):
        return pa.array(np.asarray(values, dtype=object).astype(str), type=field.type)
    target = np.dtype(field.type.to_pandas_dtype())
    array = np.asarray(values)
    if target.kind in "iub":
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                raise ValueError(f"{name}: column {field.name} must hold integers")
        cast = array.astype(target)
        if array.dtype.kind != "b" and np.any(cast.astype(np.int64) != array.astype(np.int64)):
            raise ValueError(f"{name}: column {field.name} has values outside {target}")
        return pa.array(cast)
    return pa.array(array.astype(target))


# --- reading -------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """A ledger read into memory: candidates (the requested columns), images, raw_counts, meta."""

    folder: Path
    meta: dict
    candidates: pd.DataFrame
    images: pd.DataFrame
    raw_counts: pd.DataFrame

    @property
    def name(self) -> str:
        """The detector's default name: the dump folder's name."""
        return self.folder.name

    @property
    def pre_nms(self) -> bool:
        """Whether candidates hold the pre-NMS pool (false for a COCO results import)."""
        return bool(self.meta.get("pre_nms", True))


def read_meta(folder) -> dict:
    """meta.json of the ledger in `folder` as a dict (InputError if missing or not a JSON object)."""
    path = Path(folder) / META
    if not path.is_file():
        raise InputError(f"{path}: missing (not a ledger folder?)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object")
    version = meta.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise InputError(f"{path}: schema_version {version!r} is not one this misalign reads (<= {SCHEMA_VERSION})")
    return meta


def read_candidates(folder, columns=None, kept_only: bool = False, where=None) -> pd.DataFrame:
    """candidates.parquet as a DataFrame with only `columns` (default all), schema dtypes.

    The candidates may be one Parquet file or a folder `candidates.parquet/` of Parquet parts
    (read in file-name order). kept_only: only the kept rows, filtered row group by row group so
    that the other rows are never held in memory. where: likewise, only the rows it selects: a
    function of one row group (a pyarrow Table of `columns`) returning a boolean mask, e.g.
    `lambda t: pc.is_in(t["cand_id"], value_set=ids)` (the columns it reads must be in `columns`). A schema-1 file is read as schema 2: float32
    boxes become float64, and the columns it lacks (LEGACY_CANDIDATE_COLUMNS) are derived:
    w = x2 - x1, h = y2 - y1, crowd false, cl_nms_score NaN.
    """
    path = Path(folder) / CANDIDATES
    columns = list(CANDIDATE_SCHEMA.names if columns is None else columns)
    present = set(_parquet_schema(path).names) if path.exists() else set(CANDIDATE_SCHEMA.names)
    absent = [c for c in columns if c in LEGACY_CANDIDATE_COLUMNS and c not in present]
    corners = {"w": ("x1", "x2"), "h": ("y1", "y2")}
    needed = {edge for c in absent if c in corners for edge in corners[c]}
    stored = [c for c in columns if c not in absent] + sorted(needed - set(columns))
    frame = _read_table(path, CANDIDATE_SCHEMA, stored, kept_only=kept_only, where=where)
    for column in absent:
        if column in corners:
            lo, hi = corners[column]
            frame[column] = frame[hi].to_numpy(np.float64) - frame[lo].to_numpy(np.float64)
        else:
            frame[column] = _CANDIDATE_DEFAULTS[column]
            frame[column] = frame[column].astype(CANDIDATE_SCHEMA.field(column).type.to_pandas_dtype())
    return frame[columns]


def read_candidate_rows(folder, cand_ids, columns) -> pd.DataFrame:
    """The rows of candidates.parquet whose `cand_id` is in `cand_ids` (-1 entries ignored), in file
    order, with `cand_id` and `columns` as `read_candidates` gives them: a few rows of a large pool
    (the boxes the gallery draws, those the NMS counterfactual gives back), filtered row group by row
    group without holding the others."""
    ids = np.asarray(cand_ids, np.int64)
    wanted = pa.array(np.unique(ids[ids >= 0]), pa.int64())
    columns = ["cand_id", *[c for c in columns if c != "cand_id"]]
    return read_candidates(folder, columns, where=lambda t: pc.is_in(t["cand_id"], value_set=wanted))



def kept_rows(ledger: "Ledger", columns) -> pd.DataFrame:
    """The kept rows of `ledger` with `columns`, in file order: from its candidates in memory when
    they hold the columns (misalign.scan keeps every kept row), else read, kept rows only."""
    cands = ledger.candidates
    if all(c in cands.columns for c in columns):
        return cands.loc[cands["kept"].to_numpy(bool), list(columns)]
    return read_candidates(ledger.folder, list(columns), kept_only=True)


def rows_by_cand_id(ledger: "Ledger", cand_ids, columns) -> pd.DataFrame:
    """cand_id and `columns` of the candidates `cand_ids` (-1 ignored), in file order: from memory when
    the candidates there hold the columns and every one of these rows, else read (read_candidate_rows)."""
    cands = ledger.candidates
    ids = np.asarray(cand_ids, np.int64)
    ids = ids[ids >= 0]
    columns = ["cand_id", *[c for c in columns if c != "cand_id"]]
    if all(c in cands.columns for c in columns):
        rows = cands[np.isin(cands["cand_id"].to_numpy(np.int64), ids)]
        if len(rows) == len(np.unique(ids)):
            return rows[columns].reset_index(drop=True)
    return read_candidate_rows(ledger.folder, ids, columns)

def candidate_batches(folder, columns):
    """Yield pyarrow Tables of candidates.parquet's `columns`, one per row group (of every part), as
    `read_candidates` gives them: a schema-1 file's float32 boxes widened to float64 and the columns
    it lacks derived (LEGACY_CANDIDATE_COLUMNS). For readers that stream the candidates (misalign.scan)."""
    path = Path(folder) / CANDIDATES
    columns = list(columns)
    present = set(_parquet_schema(path).names)
    absent = [c for c in columns if c in LEGACY_CANDIDATE_COLUMNS and c not in present]
    corners = {"w": ("x1", "x2"), "h": ("y1", "y2")}
    stored = [c for c in columns if c not in absent]
    stored += sorted({edge for c in absent if c in corners for edge in corners[c]} - set(stored))
    _check_schema(path, CANDIDATE_SCHEMA, stored)
    for table in iter_batches(path, stored):
        arrays = {name: table.column(name) for name in stored}
        for name in stored:
            if CANDIDATE_SCHEMA.field(name).type == _F64 and arrays[name].type != _F64:
                arrays[name] = arrays[name].cast(_F64)  # a schema-1 float32 box, exactly
        for name in absent:
            if name in corners:
                lo, hi = corners[name]
                arrays[name] = pa.chunked_array([pc.subtract(arrays[hi], arrays[lo])])
            else:
                field = CANDIDATE_SCHEMA.field(name)
                arrays[name] = pa.chunked_array([pa.array(np.full(table.num_rows, _CANDIDATE_DEFAULTS[name],
                                                                  field.type.to_pandas_dtype()), field.type)])
        yield pa.table({name: arrays[name] for name in columns})


def read_images(folder) -> pd.DataFrame:
    """images.parquet as a DataFrame (IMAGE_SCHEMA)."""
    return _read_table(Path(folder) / IMAGES, IMAGE_SCHEMA, None)


def read_raw_counts(folder) -> pd.DataFrame:
    """raw_counts.parquet as a DataFrame (RAW_COUNT_SCHEMA; stage and quantity as str)."""
    return _read_table(Path(folder) / RAW_COUNTS, RAW_COUNT_SCHEMA, None)


def read_raw(folder, columns=None) -> pd.DataFrame | None:
    """raw.parquet (per-anchor rows of the first N images) or None when the dump has none."""
    path = Path(folder) / RAW
    return _read_table(path, RAW_SCHEMA, columns) if path.exists() else None


def read_ledger(folder, columns=None) -> Ledger:
    """The ledger in `folder`: meta, images, raw_counts and candidates (only `columns`, default all).

    Checks that the files exist and have the requested columns with the right dtypes (InputError);
    the row-level checks are `validate_ledger`'s.
    """
    folder = Path(folder)
    _check_folder(folder)
    return Ledger(folder=folder, meta=read_meta(folder), candidates=read_candidates(folder, columns),
                  images=read_images(folder), raw_counts=read_raw_counts(folder))


def parquet_parts(path: Path) -> list[Path]:
    """The Parquet files behind `path`: the file itself, or the parts of a folder of Parquet files
    (`*.parquet` in name order; InputError if it holds none)."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(p for p in path.glob("*.parquet") if p.is_file())
        if not parts:
            raise InputError(f"{path}: a folder without Parquet parts (*.parquet)")
        return parts
    return [path]


def iter_batches(path: Path, columns, kept_only: bool = False, where=None):
    """Yield pyarrow Tables of `columns`, one per row group of every part of `path`, in order.

    kept_only: each row group filtered to its rows with `kept` true (read alongside, then dropped).
    where: each row group filtered to the rows where `where(table)` (a boolean mask) is true.
    (Reading whole row groups is ~3x faster than pyarrow's iter_batches or read_table here.)"""
    columns = list(columns)
    read = columns + (["kept"] if kept_only and "kept" not in columns else [])
    for part in parquet_parts(path):
        file = pq.ParquetFile(part)
        for group in range(file.num_row_groups):
            table = file.read_row_group(group, columns=read)
            if kept_only:
                table = table.filter(table.column("kept")).select(columns)
            if where is not None:
                table = table.filter(where(table))
            yield table


def _read_arrow(path: Path, columns, kept_only: bool = False, where=None) -> pa.Table:
    tables = list(iter_batches(path, columns, kept_only, where))
    if not tables:
        return pq.read_table(parquet_parts(path)[0], columns=columns).slice(0, 0)
    return pa.concat_tables(tables).combine_chunks()


def _read_table(path: Path, schema: pa.Schema, columns, kept_only: bool = False, where=None) -> pd.DataFrame:
    columns = list(schema.names if columns is None else columns)
    _check_schema(path, schema, columns)
    table = _read_arrow(path, columns, kept_only, where)
    frame = table.to_pandas(self_destruct=True)
    for field in schema:  # strings as plain object/str columns whatever the writer used
        if field.name in frame.columns and pa.types.is_string(field.type):
            frame[field.name] = frame[field.name].astype(str)
        elif field.name in frame.columns and field.type == _F64 and frame[field.name].dtype != np.float64:
            frame[field.name] = frame[field.name].astype(np.float64)  # a schema-1 float32 box, exactly
    return frame


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise InputError(f"{folder}: not a ledger folder ({'no such folder' if not folder.exists() else 'not a folder'})")
    present = [name for name in LEDGER_FILES if (folder / name).is_file() or (name == CANDIDATES and (folder / name).is_dir())]
    if not present:
        raise InputError(f"{folder}: not a ledger folder (none of {', '.join(LEDGER_FILES)})")
    for name in LEDGER_FILES:
        if name not in present:
            raise InputError(f"{folder / name}: missing (a ledger folder has {', '.join(LEDGER_FILES)})")


def _same_type(actual: pa.DataType, expected: pa.DataType, column: str = "") -> bool:
    if column in _WIDENED and actual == _F32:  # schema 1's boxes
        return True
    if pa.types.is_string(expected):  # any string encoding will do
        if pa.types.is_dictionary(actual):
            actual = actual.value_type
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return actual == expected


def _parquet_schema(path: Path) -> pa.Schema:
    """The schema of a Parquet file, or of the first part of a folder of parts (InputError if a
    part's schema differs from it)."""
    schemas = []
    for part in parquet_parts(path):
        try:
            schemas.append(pq.read_schema(part))
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"{part}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
        if not schemas[-1].equals(schemas[0]):
            raise InputError(f"{part}: its columns differ from those of {parquet_parts(path)[0].name}")
    return schemas[0]


def _check_schema(path: Path, schema: pa.Schema, columns) -> None:
    """InputError naming `path` if it is not Parquet or lacks `columns` with `schema`'s dtypes."""
    if not path.exists():
        raise InputError(f"{path}: missing")
    actual = _parquet_schema(path)
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise ValueError(f"{path.name}: no such ledger column(s) {', '.join(unknown)}")
    missing = [c for c in columns if c not in actual.names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    for column in columns:
        expected = schema.field(column).type
        found = actual.field(column).type
        if not _same_type(found, expected, column):
            raise InputError(f"{path}: column {column} is {found}, expected {expected}")


# --- validation ----------------------------------------------------------------------------------


def validate_ledger(folder, check_content: bool = True) -> None:
    """Check the ledger in `folder` against the contract; InputError with one line on the first problem.

    Always: the folder and its files exist, meta.json is a JSON object of a known schema_version,
    every Parquet file has every column with the schema's dtype. With `check_content` also the
    rows: unique image_id / cand_id, candidates and raw counts of known images, finite boxes with
    x2 >= x1 and y2 >= y1, finite scores, iou and iou_any in [0, 1] with iou <= iou_any,
    kept rows with suppressed_by -1, and every other suppressed_by naming a cand_id of the same
    image that survived NMS (its own suppressed_by is -1).
    """
    folder = Path(folder)
    _check_folder(folder)
    read_meta(folder)
    for name, schema in _SCHEMAS.items():
        if name != RAW or (folder / name).exists():
            columns = schema.names
            if name == CANDIDATES:  # a schema-1 ledger lacks these; read_candidates derives them
                present = set(_parquet_schema(folder / name).names)
                columns = [c for c in columns if c not in LEGACY_CANDIDATE_COLUMNS or c in present]
            _check_schema(folder / name, schema, columns)
    if not check_content:
        return
    known = known_images(folder)
    _check_candidates(folder / CANDIDATES, known)
    check_raw_counts(folder, known)


def _first_bad(path: Path, bad: np.ndarray, problem: str, ids: np.ndarray | None = None) -> None:
    """InputError naming the first row where `bad` holds."""
    if np.any(bad):
        row = int(np.argmax(bad))
        where = f"row {row}" + (f" (cand_id {ids[row]})" if ids is not None else "")
        raise InputError(f"{path}: {where}: {problem}")


def _check_unique(path: Path, values: np.ndarray, column: str) -> None:
    order = np.argsort(values, kind="stable")
    dup = np.flatnonzero(values[order][1:] == values[order][:-1])
    if len(dup):
        row = int(order[dup[0] + 1])
        raise InputError(f"{path}: row {row}: duplicate {column} {values[row]}")


def searchsorted_runs(sorted_values: np.ndarray, values: np.ndarray, sorter=None) -> np.ndarray:
    """np.searchsorted(sorted_values, values, sorter=sorter), searched once per run of equal values:
    ledger rows come grouped by image, so an image_id lookup costs one comparison per row."""
    values = np.asarray(values)
    if not len(values):
        return np.zeros(0, np.intp)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    found = np.searchsorted(sorted_values, values[starts], sorter=sorter)
    return np.repeat(found, np.diff(np.r_[starts, len(values)]))


def _check_known(path: Path, values: np.ndarray, known_sorted: np.ndarray, column: str, offset: int = 0) -> np.ndarray:
    """[N] position of each value in known_sorted; InputError naming the first row of an unknown one."""
    pos = np.clip(searchsorted_runs(known_sorted, values), 0, max(len(known_sorted) - 1, 0))
    bad = (known_sorted[pos] != values) if len(known_sorted) else np.ones(len(values), bool)
    if np.any(bad):
        row = int(np.argmax(bad))
        raise InputError(f"{path}: row {offset + row}: {column} {values[row]} is not in images.parquet")
    return pos


CHECKED_COLUMNS = ("cand_id", "image_id", "x1", "y1", "x2", "y2", "cls_score", "score", "kept", "suppressed_by",
                   "iou", "iou_any")  # what the row checks of candidates.parquet read (w, h too where stored)


class CandidateChecker:
    """The row checks of candidates.parquet, batch by batch: `add` each batch (dict or DataFrame of
    CHECKED_COLUMNS and the stored w, h) in file order, then `finish`; InputError (one line, the row in
    the whole file) on the first problem. Row-local rules run on each batch; the NMS references are
    checked at the end from compact arrays (cand_id, image of each row, suppressed_by). A reader that
    streams the candidates anyway (misalign.scan) checks them in its own pass."""

    def __init__(self, path: Path, known_images: np.ndarray, sizes=()):
        self.path, self.known_images, self.sizes = Path(path), known_images, list(sizes)
        self.ids, self.images, self.sup, self.offset = [], [], [], 0

    def add(self, batch) -> None:
        col = {name: np.asarray(batch[name]) for name in (*CHECKED_COLUMNS, *self.sizes)}
        ids = col["cand_id"]
        bad_at = _first_bad_row(col, self.sizes)
        if bad_at is not None:  # name the row in the whole file, not the batch
            row, problem = bad_at
            raise InputError(f"{self.path}: row {self.offset + row} (cand_id {ids[row]}): {problem}")
        images = _check_known(self.path, col["image_id"], self.known_images, "image_id", self.offset)
        self.ids.append(ids)
        self.images.append(images.astype(np.int32))  # compact
        self.sup.append(col["suppressed_by"])
        self.offset += len(ids)

    def finish(self) -> None:
        path = self.path

        def join(name: str) -> np.ndarray:  # one array at a time: the parts are freed as it is joined
            parts = getattr(self, name)
            setattr(self, name, [])
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)

        ids, images, sup = join("ids"), join("images"), join("sup")
        ascending = bool(np.all(ids[1:] > ids[:-1]))  # the writer's numbering: no sort needed
        if not ascending:
            _check_unique(path, ids, "cand_id")
        rows = np.flatnonzero(sup >= 0)
        if not len(rows):
            return
        # A suppressor must be a survivor (suppressed_by -1): search the few survivors, not every row.
        survivors = np.flatnonzero(sup == -1)
        named = sup[rows]
        target, found = np.zeros(len(rows), np.intp), np.zeros(len(rows), bool)  # [S] row named, and a survivor?
        if len(survivors):
            order = None if ascending else np.argsort(ids[survivors])
            pos = np.minimum(np.searchsorted(ids[survivors], named, sorter=order), len(survivors) - 1)
            target = survivors[pos if order is None else order[pos]]
            found = ids[target] == named
        bad = np.zeros(len(ids), bool)
        if not found.all():  # the error path: which of the two problems, at its first row
            bad[rows[~np.isin(named, ids)]] = True
            _first_bad(path, bad, "suppressed_by names no cand_id of the ledger", ids)
            bad[rows[~found]] = True
            _first_bad(path, bad, "suppressed_by names a candidate that did not survive NMS", ids)
        bad[rows[images[target] != images[rows]]] = True
        _first_bad(path, bad, "suppressed_by names a candidate of another image", ids)


def stored_sizes(path: Path) -> list[str]:
    """w, h where candidates.parquet stores them (a schema-1 file does not)."""
    return [c for c in ("w", "h") if c in _parquet_schema(path).names]


def _check_candidates(path: Path, known_images: np.ndarray) -> None:
    """The row checks of candidates.parquet (CandidateChecker), reading its batches."""
    sizes = stored_sizes(path)
    checker = CandidateChecker(path, known_images, sizes)
    for batch in iter_batches(path, [*CHECKED_COLUMNS, *sizes]):
        checker.add({name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names})
    checker.finish()


def known_images(folder) -> np.ndarray:
    """The sorted image ids of images.parquet (InputError if one appears twice)."""
    images = pq.read_table(Path(folder) / IMAGES, columns=["image_id"]).column("image_id").to_numpy()
    _check_unique(Path(folder) / IMAGES, images, "image_id")
    return np.sort(images)


def check_raw_counts(folder, known: np.ndarray) -> None:
    """raw_counts.parquet's rows: known images, known stage/quantity pairs, no negative count."""
    folder = Path(folder)
    raw_counts = read_raw_counts(folder)
    _check_known(folder / RAW_COUNTS, raw_counts["image_id"].to_numpy(), known, "image_id")
    pairs = raw_counts[["stage", "quantity"]]
    allowed = pd.MultiIndex.from_tuples([(stage, q) for stage, quantities in STAGES.items() for q in quantities])
    unknown = ~pd.MultiIndex.from_frame(pairs).isin(allowed)
    if unknown.any():
        row = int(np.argmax(unknown))
        stage, quantity = pairs.iloc[row]
        raise InputError(f"{folder / RAW_COUNTS}: row {row}: stage {stage!r} / quantity {quantity!r} "
                         f"is not one of {STAGES}")
    _first_bad(folder / RAW_COUNTS, raw_counts["count"].to_numpy() < 0, "count is negative")


def _first_bad_row(col: dict, sizes) -> tuple[int, str] | None:
    """(row, problem) of the first row of one batch that breaks a row-local rule, or None."""
    checks = [(~np.isfinite(col[name]), f"{name} is not finite") for name in ("x1", "y1", "x2", "y2", *sizes,
                                                                              "cls_score", "score")]
    checks += [(col[name] < 0, f"{name} is negative") for name in sizes]
    checks += [(col["x2"] < col["x1"], "inverted box (x2 < x1)"), (col["y2"] < col["y1"], "inverted box (y2 < y1)")]
    checks += [(~((col[name] >= 0) & (col[name] <= 1)), f"{name} is outside [0, 1]") for name in ("iou", "iou_any")]
    checks += [(col["iou"] > col["iou_any"] + 1e-6, "iou exceeds iou_any"),
               (col["kept"] & (col["suppressed_by"] != -1), "kept but suppressed_by is not -1"),
               (col["suppressed_by"] < -1, "suppressed_by is below -1")]
    for bad, problem in checks:  # the first rule broken, at its first row (as the whole-file checks did)
        if np.any(bad):
            return int(np.argmax(bad)), problem
    return None
