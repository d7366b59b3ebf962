"""The report's 'Errors' and 'Calibration' sections: figures, tables and notes from what
misalign.compare computed (DetectorResult.errors, .calibration; tables errors.csv, calibration.csv,
obj_vs_iou.csv). Nothing here computes a number: the drawings bin nothing, they plot the bins
misalign.calibration made.
"""

from __future__ import annotations

from functools import partial

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from misalign.calibration import DECE_IOU, LAECE_IOU, NUM_BINS, OBJ_IOU_EDGES, SCORE_COLUMNS
from misalign.tide import ERROR_KEYS

from . import figures as F
from .tables import Table, fmt_count, fmt_float

ERROR_TITLES = {"Cls": "Cls: right box, wrong class", "Loc": "Loc: right class, IoU in [0.1, 0.5)",
                "Both": "Both: wrong class and IoU in [0.1, 0.5)", "Dupe": "Dupe: a duplicate of a true positive",
                "Bkg": "Bkg: background (IoU < 0.1 with every box)", "Miss": "Miss: an object never detected",
                "NMS": "NMS: the best candidate was suppressed"}


# --- drawings ------------------------------------------------------------------------------------


def figure_errors(errors: dict, palette: dict):
    """Grouped bars: ΔAP50 (points) of each error type per detector; NMS apart, after a rule.

    errors: detector -> metrics.json `errors` ({Cls, ..., NMS: ΔAP or None}).
    """
    names = list(errors)
    fig, ax = plt.subplots(figsize=(min(11.0, max(6.5, 0.22 * len(ERROR_KEYS) * max(len(names), 3))), 3.4))
    x = np.arange(len(ERROR_KEYS), dtype=float)
    x[-1] += 0.5  # NMS is another oracle, not a seventh share of the split
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [np.nan if errors[name].get(k) is None else 100.0 * errors[name][k] for k in ERROR_KEYS]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), values, width=width, color=palette[name])
        bars[-1].set_hatch("//")
        bars[-1].set_edgecolor("white")
    ax.axvline((x[-2] + x[-1]) / 2, color="0.5", lw=0.8, ls=":")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_xticks(x, ERROR_KEYS)
    ax.set_ylabel("ΔAP50 if fixed (points)")
    ax.grid(axis="y", alpha=0.3)
    return F._finish(fig, [Patch(color=palette[n]) for n in names], names, ncol=min(len(names), 8))


def figure_reliability(reliabilities: dict, numbers: dict, palette: dict):
    """Reliability diagrams: one row per detector, one panel per score column (misalign.calibration bins).

    reliabilities: detector -> {column: Reliability}; numbers: detector -> metrics.json `calibration`.
    Bars: precision at IoU 0.5 per bin (D-ECE's target) at the bin's mean score; line: mean IoU·TP at
    0.1 per bin, categories pooled (LaECE's target); diagonal: perfect calibration.
    """
    names = list(reliabilities)
    columns = [c for c in SCORE_COLUMNS if any(c in numbers[n] for n in names)]
    fig, panels = F._grid(len(names) * len(columns), 1, width=2.5, height=2.1, max_cols=len(columns), gap_h=0.78)
    width = 1.0 / NUM_BINS
    centers = (np.arange(NUM_BINS) + 0.5) * width
    for i, name in enumerate(names):
        for j, column in enumerate(columns):
            ax = panels[i * len(columns) + j][0]
            ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls="--")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{name} · {F.SHORT[column]}", color=palette[name])
            rel, entry = reliabilities[name].get(column), numbers[name].get(column)
            if rel is None or entry is None:
                ax.text(0.5, 0.5, "not computed", ha="center", va="center", color="0.4", transform=ax.transAxes)
                continue
            full = rel.count > 0
            ax.bar(centers[full], rel.precision[full], width=width * 0.92, color=palette[name], alpha=0.75)
            ax.plot(rel.mean_score[full], rel.precision[full], ls="none", marker="o", ms=2.5, color="0.15")
            iou_full = np.isfinite(rel.iou_precision)
            ax.plot(centers[iou_full], rel.iou_precision[iou_full], color="0.15", lw=1.1)
            ax.text(0.03, 0.97, f"D-ECE {entry['d_ece']:.3f}\nLaECE {entry['la_ece']:.3f}", va="top", ha="left",
                    fontsize=7.5, transform=ax.transAxes)
            if i == len(names) - 1:
                ax.set_xlabel(f"{F.SHORT[column]} (bin of width {width:g})")
            if j == 0:
                ax.set_ylabel("precision / IoU·TP")
    handles = [Patch(color="0.55", alpha=0.75), Line2D([], [], color="0.15", ls="none", marker="o", ms=3),
               Line2D([], [], color="0.15", lw=1.1), Line2D([], [], color="0.5", lw=0.8, ls="--")]
    labels = [f"precision at IoU ≥ {DECE_IOU:g} (D-ECE)", "at the bin's mean score",
              f"mean IoU·TP at IoU ≥ {LAECE_IOU:g}, classes pooled (LaECE)", "calibrated"]
    return F._finish(fig, handles, labels, ncol=4)


def figure_obj_vs_iou(bins: dict, palette: dict):
    """obj_score against IoU per IoU bin: mean (line), interquartile band, per branch model.

    bins: detector -> misalign.calibration.obj_vs_iou's per-bin frame.
    """
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot([0.5, 1], [0.5, 1], color="0.5", lw=0.8, ls="--")
    for name, frame in bins.items():
        x = frame["mean_iou"].to_numpy(np.float64)
        ax.fill_between(x, frame["q25"], frame["q75"], color=palette[name], alpha=0.15, lw=0)
        ax.plot(x, frame["mean"], color=palette[name], lw=1.5, marker="o", ms=3)
    ax.set_xlim(OBJ_IOU_EDGES[0], 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("IoU with the ground truth (bins of 0.05, at their mean IoU)")
    ax.set_ylabel("obj_score")
    ax.grid(alpha=0.3)
    handles = [Patch(color=palette[n]) for n in bins] + [Line2D([], [], color="0.5", lw=0.8, ls="--")]
    return F._finish(fig, handles, [*bins, "obj = IoU"], ncol=min(len(bins) + 1, 6))


# --- the sections --------------------------------------------------------------------------------


def errors_section(result, palette) -> dict:
    """The 'Errors' section: the bar chart, the table and the notes."""
    errors = {n: result.metrics["detectors"][n]["errors"] for n in result.names}
    notes = [f"{d.name}: no NMS row, {d.errors.nms_note}." for d in result.detectors if d.errors.nms_note]
    figure = F._figure("errors", partial(figure_errors, errors, palette), (
        "ΔAP50 (points) that fixing each error type would gain, per detector: TIDE's six types (Bolya et al. "
        "2020, at its thresholds, fixed one type at a time), then NMS (hatched): every suppression loss given its "
        "best candidate.",
        "A tall Loc bar with a tall NMS bar means boxes that were well localised existed before NMS and were "
        "suppressed; the split's bars do not add up to 1 − AP50, and NMS overlaps Loc and Miss."),
        "TIDE errors and NMS")
    frame = result.tables["errors"]
    shown = frame[["detector", "AP50", *ERROR_KEYS]].copy()
    for key in ERROR_KEYS:
        shown[f"n {key}"] = frame[f"n {key}"]
    shown["NMS replaced"] = frame["NMS replaced"]
    shown["NMS ΔAP (COCO AP)"] = frame["NMS AP"]
    table = Table("errors", shown.rename(columns={"n NMS": "n NMS (losses)"}), (
        "ΔAP50 of each error type (TIDE) and of NMS; n: errors of each type (n NMS: suppression losses); NMS "
        "replaced: kept boxes the counterfactual changed; NMS ΔAP (COCO AP): the same counterfactual in "
        "AP@[.5:.95].",
        "AP50 units throughout, as TIDE's: a loss whose kept box already matched at IoU ≥ 0.5 gains no AP50, "
        "only COCO AP (last column; the rescoring section's oracle_nms is the like-for-like COCO AP oracle)."),
        formats={"AP50": fmt_float(3), **{k: fmt_float(4, signed=True) for k in ERROR_KEYS},
                 **{f"n {k}": fmt_count for k in ERROR_KEYS}, "n NMS (losses)": fmt_count,
                 "NMS replaced": fmt_count, "NMS ΔAP (COCO AP)": fmt_float(4, signed=True)},
        colors=palette)
    return {"figure": figure, "table": table, "notes": notes}


def calibration_section(result, palette) -> dict:
    """The 'Calibration' section: reliability diagrams, the table, obj vs IoU, notes."""
    detectors = result.detectors
    numbers = {d.name: result.metrics["detectors"][d.name]["calibration"] for d in detectors}
    notes = []
    for column in SCORE_COLUMNS:
        reasons = {}
        for d in detectors:
            if column in d.calibration.notes:
                reasons.setdefault(d.calibration.notes[column], []).append(d.name)
        for reason, names in reasons.items():
            notes.append(f"{', '.join(names)}: no {column} calibration, {reason}.")
    reliability = F._figure("calibration", partial(
        figure_reliability, {d.name: d.calibration.reliability for d in detectors}, numbers, palette), (
        f"Reliability diagrams of the kept boxes, one row per detector, one panel per score column: bars are the "
        f"precision (matched at IoU ≥ {DECE_IOU:g}) of the boxes in each of {NUM_BINS} equal-width score bins, dots "
        f"the bin's mean score, the line the mean IoU·TP (matched at IoU ≥ {LAECE_IOU:g}) with classes pooled.",
        "Bars below the diagonal: over-confident; D-ECE is the box-weighted gap between dot and bar top; LaECE "
        "the same gap to the IoU·TP line, per category, averaged over categories."),
        "reliability diagrams")
    frame = result.tables["calibration"]
    table = Table("calibration", frame.drop(columns=["note"]), (
        "D-ECE and LaECE of each score column over the kept boxes; obj_vs_iou: mean |obj_score − IoU| (mae) and "
        "mean obj_score − IoU (bias) over the pre-NMS candidates with IoU ≥ 0.5 (n of them).",
        "0 is perfect calibration; a score column that ranks well (the correlation section) can still be "
        "miscalibrated, and the other way round."),
        formats={"d_ece": fmt_float(4), "la_ece": fmt_float(4), "kept boxes": fmt_count,
                 "obj_vs_iou mae": fmt_float(4), "obj_vs_iou bias": fmt_float(4, signed=True),
                 "obj_vs_iou n": fmt_count},
        left=("score column",), colors=palette)
    branch = {d.name: d.calibration.obj_bins for d in detectors if d.calibration.obj_bins is not None}
    obj_figure = None
    if branch:
        obj_figure = F._figure("obj_vs_iou", partial(figure_obj_vs_iou, branch, palette), (
            "obj_score of the pre-NMS candidates with IoU ≥ 0.5 by IoU bin (width 0.05): mean (line, at the bin's "
            "mean IoU) and interquartile range (band), per detector with an object-confidence branch.",
            "An IoU branch that predicts IoU follows the dashed diagonal; a flat line means it ranks candidates "
            "by something else."), "obj_score against IoU")
    else:
        notes.append("No dump has an object-confidence branch (obj_score is NaN throughout): no obj vs IoU figure.")
    return {"figure": reliability, "table": table, "obj_figure": obj_figure, "notes": notes,
            "num_bins": NUM_BINS, "dece_iou": DECE_IOU, "laece_iou": LAECE_IOU}
