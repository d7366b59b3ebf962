"""Alignment during training: the numbers `misalign train` logs at the end of each epoch, and the
per-epoch curves the report reads back from a run's log.csv (docs/methods.md, "Alignment during
training").

log.csv (detector/train.py) has one row per optimizer step. The last row of each epoch also holds
ALIGNMENT_COLUMNS, measured over the positive anchors (those the loss trains as positives) of that
epoch's last ALIGNMENT_BATCHES (10) batches, on the training images as augmented:

- `align_spearman`: Spearman ρ between each positive anchor's probability of its ground truth's
  class and the IoU of its decoded box with that ground truth (the objectness target);
- `obj_iou_mae`: mean |obj − IoU| over the same anchors, for models with an objectness/IoU branch;
  NaN without one.

Other rows leave both empty. A log.csv written before these columns existed still gives the loss
curves. The report finds a dump's log.csv next to the checkpoint its meta.json `checkpoint` names.

Public API:
- ALIGNMENT_COLUMNS; LOG_COLUMNS (what the curves need of log.csv)
- alignment_metrics(cls_prob, iou, obj_prob=None) -> {"align_spearman", "obj_iou_mae"}
- training_log_path(meta) -> Path | None
- read_training_curves(path) -> TrainingCurves (per-epoch frame, or None and why)
- training_curves(meta) -> TrainingCurves | None (None: the dump records no checkpoint)
- training_frame(curves_by_detector) -> DataFrame (tables/training.csv)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from misalign.correlation import per_gt_spearman_columns

ALIGNMENT_COLUMNS = ("align_spearman", "obj_iou_mae")
# They are measured on the positive anchors of each epoch's last ALIGNMENT_BATCHES batches: the loss
# has already matched them, so this costs no extra forward pass, and the last batches see the weights
# the epoch ends with. 10 batches of the CPU recipe are 80 images, some 4,000 positives.
ALIGNMENT_BATCHES = 10
LOG_COLUMNS = ("step", "epoch", "loss")
NOT_LOSS_COLUMNS = ("step", "epoch", "lr", "images_per_s", *ALIGNMENT_COLUMNS)  # log.csv columns that are no loss term


def spearman(x, y) -> float:
    """Spearman ρ of x and y (misalign's midranks, as the per-level audit); NaN with < 2 rows or a constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return float("nan")
    table = per_gt_spearman_columns([x], y, np.zeros(len(x), np.int64), min_count=2)[0]
    return float(table["spearman"].iloc[0])


def alignment_metrics(cls_prob, iou, obj_prob=None) -> dict[str, float]:
    """log.csv's alignment columns from the positive anchors' [P] class probability of the true class,
    IoU of the decoded box and (branch models) objectness probability; NaN where undefined."""
    cls_prob, iou = np.asarray(cls_prob, np.float64), np.asarray(iou, np.float64)
    mae = float("nan")
    if obj_prob is not None and len(iou):
        obj_prob = np.asarray(obj_prob, np.float64)
        finite = np.isfinite(obj_prob)
        if finite.any():
            mae = float(np.abs(obj_prob[finite] - iou[finite]).mean())
    return {"align_spearman": spearman(cls_prob, iou), "obj_iou_mae": mae}


def training_log_path(meta: dict) -> Path | None:
    """RUN/log.csv beside the checkpoint meta.json names (whether or not it exists); None without one."""
    checkpoint = meta.get("checkpoint")
    if not isinstance(checkpoint, str) or not checkpoint:
        return None
    return Path(checkpoint).parent / "log.csv"


@dataclass
class TrainingCurves:
    """One run's per-epoch curves from its log.csv."""

    path: Path  # the log.csv looked at
    epochs: pd.DataFrame | None  # epoch, step (its last), each loss term's mean over the epoch, ALIGNMENT_COLUMNS
    loss_terms: list[str]  # loss columns of `epochs`, `loss` (their sum) last
    has_alignment: bool  # log.csv has ALIGNMENT_COLUMNS
    note: str | None = None  # why there are no curves, or no alignment curves

    @property
    def available(self) -> bool:
        return self.epochs is not None and len(self.epochs) > 0


def read_training_curves(path) -> TrainingCurves:
    """log.csv's steps -> one row per epoch: loss terms averaged over the epoch's steps, the alignment
    columns as logged on its last step (NaN when not logged). Never raises for a bad file: the curves
    are then None with a note."""
    path = Path(path)
    empty = TrainingCurves(path=path, epochs=None, loss_terms=[], has_alignment=False)
    if not path.is_file():
        empty.note = f"no log.csv at {path}"
        return empty
    try:
        log = pd.read_csv(path)
    except (OSError, ValueError) as error:  # pandas' ParserError and EmptyDataError are ValueErrors
        empty.note = f"{path}: unreadable ({error})"
        return empty
    missing = [c for c in LOG_COLUMNS if c not in log.columns]
    if missing:
        empty.note = f"{path}: no {', '.join(missing)} column"
        return empty
    terms = [c for c in log.columns if c not in NOT_LOSS_COLUMNS and c != "loss"] + ["loss"]
    numeric = log[["step", "epoch", *terms]].apply(pd.to_numeric, errors="coerce")
    grouped = numeric.groupby("epoch", sort=True)
    epochs = grouped[terms].mean()
    epochs.insert(0, "step", grouped["step"].max())
    has_alignment = all(c in log.columns for c in ALIGNMENT_COLUMNS)
    for column in ALIGNMENT_COLUMNS:
        # the last step of an epoch carries its value; other steps are empty
        values = pd.to_numeric(log[column], errors="coerce") if column in log.columns else pd.Series(np.nan, log.index)
        last = values.groupby(numeric["epoch"]).agg(lambda s: s.dropna().iloc[-1] if s.notna().any() else np.nan)
        epochs[column] = last.reindex(epochs.index).to_numpy(np.float64)
    epochs = epochs.reset_index()
    epochs["epoch"] = epochs["epoch"].astype(np.int64)
    epochs["step"] = epochs["step"].astype(np.int64)
    note = None if has_alignment else (f"{path} has no {' or '.join(ALIGNMENT_COLUMNS)} column (written before "
                                       "they were logged): loss curves only")
    return TrainingCurves(path=path, epochs=epochs, loss_terms=terms, has_alignment=has_alignment, note=note)


def training_curves(meta: dict) -> TrainingCurves | None:
    """The curves of the run whose checkpoint the dump was made from; None when meta.json names none."""
    path = training_log_path(meta)
    return None if path is None else read_training_curves(path)


def training_frame(curves_by_detector: dict[str, TrainingCurves | None]) -> pd.DataFrame:
    """tables/training.csv: one row per (detector, epoch): step, loss terms (epoch means), alignment columns."""
    frames = [curves.epochs.assign(detector=name) for name, curves in curves_by_detector.items()
              if curves is not None and curves.available]
    if not frames:
        return pd.DataFrame(columns=["detector", "epoch", "step", "loss", *ALIGNMENT_COLUMNS])
    frame = pd.concat(frames, ignore_index=True)
    first = ["detector", "epoch", "step"]
    terms = [c for c in frame.columns if c not in (*first, "loss", *ALIGNMENT_COLUMNS)]
    return frame[[*first, *terms, "loss", *ALIGNMENT_COLUMNS]]
