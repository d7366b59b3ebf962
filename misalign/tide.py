"""The errors of one dump: TIDE's split (Bolya et al. 2020) plus the AP that NMS's suppressions cost.

TIDE's six ΔAP (Cls, Loc, Both, Dupe, Bkg, Miss, at its thresholds t_f = 0.5, t_b = 0.1) come from
hotcoco through misalign.cocoeval.diagnose_detections; this module adds the seventh, NMS, and puts
them together. All are in COCO AP50 units: hotcoco's split starts from COCOeval's AP50 and the NMS
counterfactual is scored by misalign.cocoeval.evaluate_detections, whose AP50 is the same number
(docs/methods.md, "Errors").

NMS. A suppression loss (`suppression_losses`) is a non-crowd ground-truth box g whose best
candidate, by `iou`, reaches IoU >= 0.5, beats every kept candidate of g by >= 0.1 IoU, and was
suppressed by NMS (`suppressed_by` >= 0). The counterfactual (`nms_replacements`) gives each loss
its best candidate: the kept box of g with the highest IoU has its box replaced by the suppressed
best one and keeps its own score and category; when g has no kept candidate, the box that
suppressed the best one takes its place if that box was kept, and nothing changes otherwise. A kept
box is replaced once at most. ΔAP(NMS) = AP50(replaced) − AP50(actual), not clipped at 0.

Only numpy and pandas; no torch (tests/test_boundaries.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from misalign.cocoeval import TIDE_KEYS

ERROR_KEYS = (*TIDE_KEYS, "NMS")  # metrics.json errors, in this order
AP_BOX_COLUMNS = ("x1", "y1", "w", "h")  # what COCOeval reads of a box


@dataclass
class ErrorSplit:
    """One dump's errors: metrics.json `errors` and what the report's bar chart and errors.csv show."""

    delta_ap: dict  # ERROR_KEYS -> ΔAP (AP50 units); NMS None without a pre-NMS pool
    counts: dict = field(default_factory=dict)  # TIDE_KEYS -> errors of that type; NMS -> suppression losses
    ap50: float | None = None  # the AP50 every ΔAP is measured from
    nms_replaced: int | None = None  # kept boxes whose box the NMS counterfactual replaced
    nms_ap: float | None = None  # the same counterfactual in COCO AP (AP@[.5:.95]): AP(replaced) − AP
    nms_note: str | None = None  # why NMS is None

    def metrics(self) -> dict:
        """metrics.json `errors`: ERROR_KEYS -> ΔAP."""
        return {key: self.delta_ap.get(key) for key in ERROR_KEYS}

    def counterfactual_metrics(self) -> dict:
        """metrics.json `nms_counterfactual`: the NMS row's details."""
        return {"losses": self.counts.get("NMS"), "replaced": self.nms_replaced, "delta_AP50": self.delta_ap.get("NMS"),
                "delta_AP": self.nms_ap}


def suppression_losses(table: pd.DataFrame, cand_id: np.ndarray) -> pd.DataFrame:
    """The suppression losses (misalign.suppression's definition and ties), with row positions.

    table: misalign.suppression.per_gt_table of the candidates whose `cand_id` [N] is given (any
    subset holding every row with iou >= 0.5 or kept). Returns, one row per lost ground truth by
    gt_id: gt_id, best_row (row of its best candidate), best_iou, best_kept_iou (0 without a kept
    candidate), kept_row (its kept candidate with the highest IoU, -1 if none) and suppressor_row
    (the row of the best candidate's `suppressed_by`; -1 when that row is not among the candidates,
    which then holds no kept row: a suppressor cut by max-detections with iou < 0.5).
    """
    lost = table[table["loss"].to_numpy(bool)]
    kept_cand = lost["kept_cand_id"].to_numpy(np.int64)
    kept_row = np.full(len(lost), -1, np.int64)
    kept_row[kept_cand >= 0] = _rows_of(cand_id, kept_cand[kept_cand >= 0])
    return pd.DataFrame({
        "gt_id": lost["gt_id"].to_numpy(np.int64), "best_row": _rows_of(cand_id, lost["best_cand_id"].to_numpy(np.int64)),
        "best_iou": lost["best_any"].to_numpy(np.float64), "best_kept_iou": lost["best_kept"].to_numpy(np.float64),
        "kept_row": kept_row, "suppressor_row": _rows_of(cand_id, lost["best_suppressed_by"].to_numpy(np.int64)),
    })


def _rows_of(cand_id: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """[K] row positions of the cand_ids `wanted` in `cand_id` [N]; -1 for one that is not there."""
    order = np.argsort(cand_id, kind="stable")
    pos = np.clip(np.searchsorted(cand_id[order], wanted), 0, max(len(cand_id) - 1, 0))
    rows = order[pos] if len(cand_id) else np.zeros(len(wanted), np.int64)
    return np.where((cand_id[rows] == wanted) if len(cand_id) else False, rows, -1).astype(np.int64)


def nms_replacements(losses: pd.DataFrame, kept: np.ndarray) -> pd.DataFrame:
    """The NMS counterfactual's edits (module doc): target_row (a kept row) takes source_row's box.

    losses: `suppression_losses`; kept: [N] the ledger's `kept`. A loss with a kept candidate edits
    that one; one without edits the suppressor of its best candidate if it is kept (rule
    'suppressor'), after every own edit and only on a row no other loss edits: among losses
    competing for one suppressor, the one with the highest best IoU (then the lower gt_id) wins.
    """
    own = losses[losses["kept_row"] >= 0]
    suppressor = losses["suppressor_row"].to_numpy(np.int64)
    by_suppressor = losses[(losses["kept_row"] < 0) & (suppressor >= 0) & kept[np.maximum(suppressor, 0)]]
    by_suppressor = by_suppressor[~by_suppressor["suppressor_row"].isin(own["kept_row"])]
    by_suppressor = by_suppressor.sort_values(["best_iou", "gt_id"], ascending=[False, True], kind="stable")
    by_suppressor = by_suppressor.drop_duplicates("suppressor_row", keep="first")
    frame = pd.concat([
        pd.DataFrame({"gt_id": own["gt_id"], "target_row": own["kept_row"], "source_row": own["best_row"],
                      "rule": "own"}),
        pd.DataFrame({"gt_id": by_suppressor["gt_id"], "target_row": by_suppressor["suppressor_row"],
                      "source_row": by_suppressor["best_row"], "rule": "suppressor"}),
    ], ignore_index=True)
    return frame.astype({"gt_id": np.int64, "target_row": np.int64, "source_row": np.int64})


def replaced_detections(detections: np.ndarray, kept_rows: np.ndarray, replacements: pd.DataFrame,
                        source_boxes: np.ndarray) -> np.ndarray:
    """The detector's output with the NMS counterfactual's boxes: a copy of `detections`.

    detections: [K, 7] image_id, x, y, w, h, score, category_id of the kept rows (row order);
    kept_rows: [K] their row positions in the ledger, ascending; replacements: `nms_replacements`;
    source_boxes: [R, 4] x, y, w, h of each replacement's source row. Score and category stay.
    """
    out = np.array(detections, dtype=np.float64, copy=True)
    at = np.searchsorted(kept_rows, replacements["target_row"].to_numpy(np.int64))
    out[at, 1:5] = source_boxes
    return out


def error_split(diagnosis, ap: dict, nms_ap: dict | None = None, num_losses: int | None = None,
                num_replaced: int | None = None, nms_note: str | None = None) -> ErrorSplit:
    """TIDE's split (a misalign.cocoeval.Diagnosis) and the NMS counterfactual as one ErrorSplit.

    ap: the dump's COCOeval stats (metrics.json `ap`) from misalign.cocoeval.evaluate_detections, the
    engine that scored the counterfactual's `nms_ap`; its AP50 is the split's own starting AP
    (`diagnosis.ap50`) to the last bits. nms_ap None: no NMS row (post-NMS only).
    """
    delta = dict(diagnosis.tide)
    delta["NMS"] = None if nms_ap is None else float(nms_ap["AP50"] - ap["AP50"])
    counts = {**diagnosis.counts, "NMS": num_losses}
    return ErrorSplit(delta_ap=delta, counts=counts, ap50=float(ap["AP50"]), nms_replaced=num_replaced,
                      nms_ap=None if nms_ap is None else float(nms_ap["AP"] - ap["AP"]), nms_note=nms_note)
