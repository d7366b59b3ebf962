"""The report's figures (matplotlib, Agg backend). Each function takes what `misalign` computed
(candidate rows with the ledger's columns, or the dicts of metrics.json) and returns a Figure.

Nothing here computes a metric: figures only bin and draw. Large inputs are binned
(`np.histogram2d`) or sampled, never drawn point by point, so a COCO-sized ledger (millions of
candidates) draws in about a second.

Axes conventions, shared by every figure: IoU (0-1, with the same-category ground truth) on x,
a score (a probability, 0-1) on y; dashed lines at 0.5 on both axes; the paper's quadrant
"IoU > 0.5 but score < 0.5" shaded red; one colour per detector (`detector_palette`).
"""

from __future__ import annotations

import base64
import logging
import io
import math
import multiprocessing
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger(__name__)

from misalign.counts import STAGE_TITLES  # noqa: E402
from misalign.training import ALIGNMENT_BATCHES  # noqa: E402

DPI = 120  # PNG resolution: sharp on screen, small files
MAX_COLS = 4  # panels per row before wrapping (keeps figures readable with 10 detectors)
QUADRANT_COLOR = "#d62728"

SCORE_LABELS = {
    "cls_score": "cls_score (class probability, 0–1)",
    "obj_score": "obj_score (object confidence, 0–1)",
    "score": "score (NMS ranking score, 0–1)",
}
SHORT = {"cls_score": "cls", "obj_score": "obj", "score": "score"}
STAGE_LABELS = STAGE_TITLES  # stage -> heading, misalign's

plt.rcParams.update({
    "font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
})


def detector_palette(names) -> dict[str, str]:
    """One fixed colour per detector, in the order given (colour-blind safe up to 10)."""
    import seaborn as sns

    names = list(names)
    colors = sns.color_palette("colorblind", 10) if len(names) <= 10 else sns.color_palette("husl", len(names))
    return {name: matplotlib.colors.to_hex(colors[i]) for i, name in enumerate(names)}


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (tight layout, DPI); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    plt.close(fig)
    return buf.getvalue()


LEGEND_BAND = 0.42  # inches reserved above grid figures for their one-row legend


def _grid(num_panels: int, rows_per_block: int, width=2.35, height=2.05, max_cols: int = MAX_COLS,
          gap_w=0.5, gap_h=0.72, left=0.62, right=0.2, bottom=0.5):
    """Axes for `num_panels` panel-columns wrapped at `max_cols`, each `rows_per_block` tall.

    Sizes are in inches (axes `width` x `height`, gaps between them, outer margins); the layout is
    fixed here rather than by tight_layout, which would draw every figure one extra time.
    Returns the figure and a list, per panel, of its `rows_per_block` axes (top to bottom).
    """
    num_panels = max(num_panels, 1)
    ncols = min(num_panels, max_cols)
    nrows = math.ceil(num_panels / ncols) * rows_per_block
    top = LEGEND_BAND + 0.3  # legend band + the first row's titles
    fig_w = left + ncols * width + (ncols - 1) * gap_w + right
    fig_h = top + nrows * height + (nrows - 1) * gap_h + bottom
    fig, axes = plt.subplots(nrows, ncols, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=left / fig_w, right=1 - right / fig_w, bottom=bottom / fig_h, top=1 - top / fig_h,
                        wspace=gap_w / width, hspace=gap_h / height)
    fig.fixed_layout = True
    panels = []
    for p in range(num_panels):
        b, c = divmod(p, ncols)
        panels.append([axes[b * rows_per_block + r][c] for r in range(rows_per_block)])
    for p in range(num_panels, nrows // rows_per_block * ncols):  # unused cells of the last block
        b, c = divmod(p, ncols)
        for r in range(rows_per_block):
            axes[b * rows_per_block + r][c].set_visible(False)
    return fig, panels


def _decorate_score_iou(ax, score_col: str, show_quadrant_label: bool = False) -> None:
    """0.5 lines on both axes, the shaded quadrant IoU > 0.5 & score < 0.5, unit-square limits.

    The lines and the quadrant's outline are drawn above the data so a dense histogram cannot hide them.
    """
    label = f"IoU > 0.5 but {SHORT.get(score_col, score_col)} < 0.5" if show_quadrant_label else None
    ax.add_patch(Rectangle((0.5, 0.0), 0.5, 0.5, facecolor=QUADRANT_COLOR, alpha=0.09, lw=0, zorder=0))
    ax.add_patch(Rectangle((0.5, 0.0), 0.5, 0.5, fill=False, edgecolor=QUADRANT_COLOR, lw=1.0, alpha=0.8, zorder=4,
                           label=label))
    ax.axvline(0.5, color="0.25", lw=0.8, ls="--", zorder=5)
    ax.axhline(0.5, color="0.25", lw=0.8, ls="--", zorder=5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1])


def _grow_top(fig, extra: float) -> None:
    """Add `extra` inches above the axes of a fixed-layout figure (axes keep their size in inches)."""
    old_h = fig.get_figheight()
    pars = fig.subplotpars
    top_in, bottom_in = (1 - pars.top) * old_h, pars.bottom * old_h
    new_h = old_h + extra
    fig.set_figheight(new_h)
    fig.subplots_adjust(top=1 - (top_in + extra) / new_h, bottom=bottom_in / new_h)


def _finish(fig, handles=(), labels=(), ncol=None):
    """One legend for the whole figure, in a band above the panels; tight layout unless `_grid`
    already fixed the layout (saving then takes a single draw)."""
    fixed = getattr(fig, "fixed_layout", False)
    if handles:
        ncol = ncol or min(len(labels), 6)
        band = 0.3 * math.ceil(len(labels) / ncol) + 0.12  # inches
        has_markers = any(isinstance(h, Line2D) and h.get_linestyle() in ("None", "") for h in handles)
        fig.legend(list(handles), list(labels), loc="upper center", bbox_to_anchor=(0.5, 1.0), frameon=False,
                   ncol=ncol, markerscale=2.0 if has_markers else 1.0)
        if fixed and band > LEGEND_BAND:  # a taller legend: grow the figure, keep the axes' size in inches
            _grow_top(fig, band - LEGEND_BAND)
        if not fixed:
            fig.tight_layout(rect=(0, 0, 1, 1 - band / fig.get_figheight()))
    elif not fixed:
        fig.tight_layout()
    return fig


def _sample(frame: pd.DataFrame, max_points: int, seed: int) -> pd.DataFrame:
    if len(frame) <= max_points:
        return frame
    return frame.sample(n=max_points, random_state=seed)


def figure_score_iou_images(frames: dict, image_ids, score_col: str, palette: dict, *,
                            post_only=(), max_points: int = 1500, seed: int = 0, max_cols: int = 3):
    """Figure 1, per image: `score_col` against IoU, before (top) and after (bottom) NMS.

    frames: detector name -> candidate rows (columns image_id, iou, kept and `score_col`; only
    the chosen images are needed). One panel pair per image in `image_ids`, wrapped at `max_cols`;
    detectors overlaid in their palette colour; at most `max_points` points per detector and panel
    (uniform sample). Detectors in `post_only` have no pre-NMS stage: only their kept rows are drawn.
    """
    image_ids = list(image_ids)
    fig, panels = _grid(len(image_ids), 2, max_cols=max_cols)
    drawn = []
    for p, image_id in enumerate(image_ids):
        top, bottom = panels[p]
        for name, frame in frames.items():
            if score_col not in frame or frame[score_col].isna().all():
                continue
            if name not in drawn:
                drawn.append(name)
            rows = frame[frame["image_id"] == image_id]
            for ax, stage_rows in ((top, rows), (bottom, rows[rows["kept"]])):
                if ax is top and name in post_only:
                    continue
                shown = _sample(stage_rows, max_points, seed)
                ax.scatter(shown["iou"], shown[score_col], s=7, alpha=0.55, color=palette[name], lw=0, rasterized=True)
        for ax, stage in ((top, "pre_nms"), (bottom, "post_nms")):
            _decorate_score_iou(ax, score_col)
            ax.set_title(f"image {image_id} · {STAGE_LABELS[stage]}")
            ax.set_xlabel("IoU with ground truth")
            if p % max_cols == 0:
                ax.set_ylabel(SCORE_LABELS.get(score_col, score_col))
    handles = [Line2D([], [], ls="", marker="o", ms=4, color=palette[n]) for n in drawn]
    handles.append(Patch(facecolor=QUADRANT_COLOR, alpha=0.25, edgecolor=QUADRANT_COLOR))
    labels = drawn + [f"IoU > 0.5 but {SHORT.get(score_col, score_col)} < 0.5"]
    return _finish(fig, handles, labels)


PRE_NMS_GREY = "0.8"


def figure_score_iou_images_by_detector(frames: dict, image_ids, score_col: str, palette: dict, *,
                                        post_only=(), max_points: int = 1500, seed: int = 0):
    """Figure 1 for many detectors: one row of panels per detector, one column per image.

    Each panel shows that detector's candidates on that image: every pre-NMS candidate in grey, the
    kept ones on top in the detector's colour, so which boxes NMS kept reads at a glance without
    overlaying detectors. Arguments as `figure_score_iou_images`; `post_only` detectors have no grey.
    """
    image_ids = list(image_ids)
    names = [n for n, f in frames.items() if score_col in f and not f[score_col].isna().all()]
    fig, panels = _grid(len(image_ids), len(names), max_cols=len(image_ids), height=1.85)
    for c, image_id in enumerate(image_ids):
        for ax, name in zip(panels[c], names):
            rows = frames[name][frames[name]["image_id"] == image_id]
            if name not in post_only:
                pre = _sample(rows, max_points, seed)
                ax.scatter(pre["iou"], pre[score_col], s=6, alpha=0.5, color=PRE_NMS_GREY, lw=0, rasterized=True)
            kept = rows[rows["kept"]]
            # dark rims: kept boxes stand out from the grey pool even in a grey palette colour
            ax.scatter(kept["iou"], kept[score_col], s=11, alpha=0.95, color=palette[name], edgecolors="0.1", lw=0.35,
                       rasterized=True)
            _decorate_score_iou(ax, score_col)
            ax.set_title(f"{name} · image {image_id}", color=palette[name], fontsize=8.5)
            ax.set_xlabel("IoU with ground truth")
            if c == 0:
                ax.set_ylabel(SHORT.get(score_col, score_col))
    handles = [Line2D([], [], ls="", marker="o", ms=4, color=PRE_NMS_GREY),
               Line2D([], [], ls="", marker="o", ms=4, color="0.45", mec="0.1", mew=0.5),
               Patch(facecolor=QUADRANT_COLOR, alpha=0.25, edgecolor=QUADRANT_COLOR)]
    labels = ["before NMS (every candidate)", "kept by NMS (detector colour)",
              f"IoU > 0.5 but {SHORT.get(score_col, score_col)} < 0.5"]
    return _finish(fig, handles, labels)


def _detector_cmap(color: str):
    return LinearSegmentedColormap.from_list("det", ["#ffffff", color, "#000000"], N=256)


def figure_score_iou_density(histograms: dict, edges: np.ndarray, score_col: str, palette: dict):
    """Figure 1 over the whole split: 2-D histogram of `score_col` against IoU (log colour scale).

    histograms: detector -> {"pre_nms": counts or None, "post_nms": counts}, counts [bins, bins]
    indexed [score bin, IoU bin] (misalign.counts.score_iou_histogram); None = the dump has no such
    stage. edges [bins + 1] on [0, 1]. One column per detector (wrapped at MAX_COLS), rows before /
    after NMS, colour map in the detector's colour.
    """
    names = list(histograms)
    fig, panels = _grid(len(names), 2, width=2.9, gap_w=1.0, right=1.0)
    for p, name in enumerate(names):
        for ax, stage in zip(panels[p], ("pre_nms", "post_nms")):
            counts = histograms[name].get(stage)
            _decorate_score_iou(ax, score_col)
            ax.set_xlabel("IoU with ground truth")
            if p % MAX_COLS == 0:
                ax.set_ylabel(SCORE_LABELS.get(score_col, score_col))
            if counts is None:
                ax.set_title(f"{name} · {STAGE_LABELS[stage]}", color=palette[name])
                ax.text(0.5, 0.5, "no pre-NMS stage\nin this dump", ha="center", va="center", color="0.4",
                        transform=ax.transAxes)
                continue
            counts = np.asarray(counts, dtype=np.float64)
            mesh = ax.pcolormesh(edges, edges, np.ma.masked_equal(counts, 0), cmap=_detector_cmap(palette[name]),
                                 norm=LogNorm(vmin=1, vmax=max(counts.max(), 2.0)), rasterized=True)
            fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.02).set_label("boxes per cell", fontsize=7.5)
            ax.set_title(f"{name} · {STAGE_LABELS[stage]} (n={int(counts.sum()):,})", color=palette[name])
    return _finish(fig, [Patch(facecolor=QUADRANT_COLOR, alpha=0.25, edgecolor=QUADRANT_COLOR)],
                   [f"IoU > 0.5 but {SHORT.get(score_col, score_col)} < 0.5 (the paper's misaligned quadrant)"])


def figure_proportions(proportions: dict, survival: dict, palette: dict):
    """Figure 2 overall: share of boxes meeting each condition before (solid) and after (dashed)
    NMS - cls conditions and IoU conditions in separate panels, each on its own scale - and the
    survival rate (after / before count) of each condition.

    proportions: detector -> {"pre_nms": {cond: p}, "post_nms": {cond: p}} (metrics.json's
    `proportions`); survival: detector -> {cond: r}. Conditions in metrics.json order.
    """
    fig, (ax_c, ax_i, ax_s) = plt.subplots(1, 3, figsize=(13.5, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.5]})
    names = list(proportions)
    conditions = list(dict.fromkeys(c for n in names for c in proportions[n].get("pre_nms", {})))
    for ax, prefix in ((ax_c, "cls"), (ax_i, "iou")):
        # cls>0.05 is (about) the score threshold: ~100% in both stages, it would flatten the others
        conds = [c for c in conditions if c.startswith(prefix) and c != "cls>0.05"]
        x = np.arange(len(conds))
        for name in names:
            for stage, ls, marker in (("pre_nms", "-", "o"), ("post_nms", "--", "s")):
                values = [100.0 * proportions[name].get(stage, {}).get(c, np.nan) for c in conds]
                ax.plot(x, values, ls=ls, marker=marker, ms=4, color=palette[name])
        ax.set_xticks(x, conds, rotation=45, ha="right")
        ax.set_ylabel("boxes meeting the condition (% of stage)")
        ax.set_title(f"{prefix} conditions: share of boxes" + (" (cls>0.05: see table)" if prefix == "cls" else ""))
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    x = np.arange(len(conditions))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [100.0 * survival[name].get(c, np.nan) for c in conditions]
        ax_s.bar(x - 0.4 + width * (i + 0.5), values, width=width, color=palette[name])
    ax_s.set_xticks(x, conditions, rotation=45, ha="right")
    ax_s.set_ylabel("kept after NMS (% of pre-NMS boxes)")
    ax_s.set_title("survival rate = after-NMS count / before-NMS count")
    ax_s.grid(axis="y", alpha=0.3)
    handles = [Patch(color=palette[n]) for n in names]
    handles += [Line2D([], [], color="0.3", ls="-", marker="o", ms=4), Line2D([], [], color="0.3", ls="--", marker="s", ms=4)]
    return _finish(fig, handles, names + ["before NMS", "after NMS"], ncol=min(len(names) + 2, 8))


def figure_proportions_per_image(per_image: dict, palette: dict, conditions=("cls>0.5", "iou>0.5")):
    """Figure 2 per image, as in the paper: proportion of cls>0.5 and iou>0.5 boxes in each image,
    before (solid) and after (dashed) NMS; one panel per detector.

    per_image: detector -> DataFrame with columns image_id, condition, pre_nms, post_nms
    (proportions 0-1; misalign's Analysis.per_image_proportions) for the chosen images.
    """
    names = list(per_image)
    fig, panels = _grid(len(names), 1, width=3.3, height=2.1, gap_w=0.75, bottom=0.75, gap_h=1.0)
    markers = {"cls": "o", "iou": "^"}
    for p, name in enumerate(names):
        ax = panels[p][0]
        frame = per_image[name]
        image_ids = list(dict.fromkeys(frame["image_id"].tolist()))
        x = np.arange(len(image_ids))
        for cond in conditions:
            sel = frame[frame["condition"] == cond].set_index("image_id").reindex(image_ids)
            for stage, ls in (("pre_nms", "-"), ("post_nms", "--")):
                ax.plot(x, 100.0 * sel[stage].to_numpy(np.float64), ls=ls, marker=markers[cond[:3]], ms=4,
                        color=palette[name], alpha=1.0 if cond.startswith("iou") else 0.55)
        ax.set_xticks(x, [str(i) for i in image_ids], rotation=45, ha="right")
        ax.set_xlabel("image id")
        if p % MAX_COLS == 0:
            ax.set_ylabel("boxes meeting it (% of stage)")
        ax.set_title(name, color=palette[name])
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], color="0.3", ls=ls, marker=markers[c[:3]], ms=4) for c in conditions
               for ls in ("-", "--")]
    labels = [f"{c} {STAGE_LABELS[s]}" for c in conditions for s in ("pre_nms", "post_nms")]
    return _finish(fig, handles, labels)


def figure_correlation(correlation: dict, palette: dict):
    """Spearman ρ (score column vs IoU) with its 95% bootstrap CI, and the divergence, per detector.

    correlation: detector -> metrics.json `correlation` dict ({score column: {...}}).
    """
    names = list(correlation)
    columns = [c for c in ("cls_score", "obj_score", "score") if any(c in correlation[n] for n in names)]
    fig, (ax_r, ax_d) = plt.subplots(1, 2, figsize=(11.5, 0.9 + 0.55 * max(len(columns), 1) * max(1, len(names) / 2.5)))
    step = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        for j, col in enumerate(columns):
            stats = correlation[name].get(col)
            if stats is None:
                continue
            y = j - 0.4 + step * (i + 0.5)
            rho = stats.get("spearman")
            lo, hi = [np.nan if v is None else v for v in (stats.get("ci95", {}).get("spearman") or [None, None])]
            if rho is not None and np.isfinite(rho):
                err = [[max(rho - lo, 0)], [max(hi - rho, 0)]] if np.isfinite([lo, hi]).all() else None
                ax_r.errorbar(rho, y, xerr=err, fmt="o", color=palette[name], ms=5, capsize=3)
            div = stats.get("divergence")
            if div is not None and np.isfinite(div):
                ax_d.barh(y, div, height=step * 0.9, color=palette[name])
    for ax in (ax_r, ax_d):
        ax.set_yticks(np.arange(len(columns)), [SHORT[c] for c in columns])
        ax.set_ylim(len(columns) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
    ax_r.axvline(0, color="0.4", lw=0.8)
    ax_r.set_xlim(-1, 1)
    ax_r.set_xlabel("Spearman ρ between score and IoU (−1…1; 95% bootstrap CI)")
    ax_r.set_title("rank correlation over candidates with IoU ≥ min_iou")
    ax_d.set_xlim(0, 1)
    ax_d.axvline(0.5, color="0.4", lw=0.8, ls=":")
    ax_d.set_xlabel("divergence (0 aligned · 0.5 unrelated · 1 reversed)")
    ax_d.set_title("ranking divergence per ground-truth box")
    return _finish(fig, [Patch(color=palette[n]) for n in names], names, ncol=min(len(names), 8))


def figure_ap(ap: dict, palette: dict, keys=("AP", "AP50", "AP75", "APs", "APm", "APl")):
    """COCO AP of every detector, grouped bars (AP in %, pycocotools' numbers)."""
    names = list(ap)
    fig, ax = plt.subplots(figsize=(6.5, 2.5))
    x = np.arange(len(keys))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [100.0 * max(ap[name].get(k, np.nan), 0.0) if ap[name].get(k, -1) >= 0 else np.nan for k in keys]
        ax.bar(x - 0.4 + width * (i + 0.5), values, width=width, color=palette[name], label=name)
    ax.set_xticks(x, keys)
    ax.set_ylabel("COCO AP (%)")
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, [Patch(color=palette[n]) for n in names], names, ncol=min(len(names), 5))


TRAINING_PANELS = (
    ("loss", "training loss (mean over the epoch's steps)", None),
    ("align_spearman", "ρ(class prob. of the true class, IoU)", (-1, 1)),
    ("obj_iou_mae", "mean |obj − IoU| (branch models)", (0, None)),
)


def figure_training(curves: dict, palette: dict):
    """Per-epoch training curves, detectors overlaid: loss, align_spearman and obj_iou_mae against epoch.

    curves: detector -> misalign.training per-epoch frame (epoch, loss, align_spearman, obj_iou_mae).
    A panel whose column no detector logged is left out; NaN epochs leave gaps.
    """
    panels = [(col, title, limits) for col, title, limits in TRAINING_PANELS
              if any(col in f and f[col].notna().any() for f in curves.values())]
    names = list(curves)
    # wide enough for the one-row legend of up to 8 names even with the loss panel alone
    width = max(3.9 * len(panels) + 0.6, 1.3 + 1.45 * min(len(names), 8))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.0), squeeze=False)
    for ax, (col, title, limits) in zip(axes[0], panels):
        for name, frame in curves.items():
            if col in frame and frame[col].notna().any():
                ax.plot(frame["epoch"], frame[col], color=palette[name], lw=1.5, marker="o", ms=3)
        if limits is not None:
            ax.set_ylim(bottom=limits[0], top=limits[1])
        if col == "align_spearman":
            ax.axhline(0, color="0.4", lw=0.8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return _finish(fig, [Patch(color=palette[n]) for n in names], names, ncol=min(len(names), 8))


RESCORE_LINES = (("cls", "--", "cls alone"), ("cls*obj", "-.", "cls·obj"),
                 ("oracle_nms", ":", "oracle_nms (IoU-guided NMS)"),
                 ("oracle", (0, (1, 4)), "oracle (true IoU as score: upper bound)"))
# The oracles (the oracle ranking often ~2x the AP) and obj alone (class-agnostic, often far below) would
# squash the α curves into a flat band; the axis fits the curves and the cls lines, and those show as edge
# markers when off it: (ranking, x of the first detector's marker, filled).
OFF_SCALE_RANKINGS = ("oracle_nms", "oracle", "obj")
OFF_SCALE_MARKERS = (("oracle_nms", 0.0, True), ("oracle", 0.5, True), ("obj", 1.0, False))


def _sweep_limits(rescoring: dict, key: str) -> tuple[float, float]:
    """y-limits that fit every α sweep, cls and cls·obj value of `key`, padded."""
    values = [v[key] for rankings in rescoring.values() for name, v in rankings.items() if name not in OFF_SCALE_RANKINGS]
    lo, hi = min(values), max(values)
    pad = max(0.01, 0.15 * (hi - lo))
    return lo - pad, hi + pad


def figure_rescoring(rescoring: dict, palette: dict, keys=("AP", "AP50", "AP75")):
    """The α sweep of counterfactual rescoring: one panel per COCO number, α on x.

    rescoring: detector -> metrics.json `rescoring` dict ({ranking: {"AP", "AP50", "AP75"}}). Per
    detector: its `alpha=a` rankings as a solid line, `obj` as a hollow marker at α = 1 (obj^1·cls^0),
    and `cls`, `cls*obj`, `oracle_nms`, `oracle` as horizontal lines (RESCORE_LINES) in its colour. The
    y-axis fits the sweeps and the cls lines; an oracle_nms, oracle or obj value off it is a triangle on
    the top or bottom edge (oracle_nms at the left, oracle in the middle, obj at α = 1).
    """
    names = list(rescoring)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys) + 0.5, 2.9), squeeze=False)
    for ax, key in zip(axes[0], keys):
        lo, hi = _sweep_limits(rescoring, key)
        for i, name in enumerate(names):
            rankings, color = rescoring[name], palette[name]
            sweep = sorted((float(k.split("=", 1)[1]), v[key]) for k, v in rankings.items() if k.startswith("alpha="))
            if sweep:
                ax.plot(*zip(*sweep), color=color, lw=1.6, marker="o", ms=3.5, zorder=3)
            for ranking, style, _ in RESCORE_LINES:
                if ranking in rankings and lo <= rankings[ranking][key] <= hi:
                    ax.axhline(rankings[ranking][key], color=color, ls=style, lw=1.1, zorder=2)
            if "obj" in rankings and lo <= rankings["obj"][key] <= hi:
                ax.plot([1.0], [rankings["obj"][key]], ls="none", marker="o", ms=5, mfc="white", mec=color, zorder=3)
            # off the scale: a triangle on the edge it lies beyond, one slot per detector so none hide another
            for ranking, x0, filled in OFF_SCALE_MARKERS:
                value = rankings.get(ranking, {}).get(key)
                if value is not None and not lo <= value <= hi:
                    above, x = value > hi, x0 + (0.02 * i if x0 < 1.0 else -0.02 * i)
                    ax.plot([x], [hi if above else lo], ls="none", marker="^" if above else "v", ms=6, color=color,
                            mfc=color if filled else "white", clip_on=False, zorder=4)
        ax.set_ylim(lo, hi)
        ax.set_xlim(-0.04, 1.04)
        ax.set_xticks(np.linspace(0, 1, 6))
        ax.set_xlabel(r"$\alpha$ in obj$^{\alpha}$ · cls$^{1-\alpha}$")
        ax.set_ylabel(f"COCO {key} (0–1)")
        ax.set_title(f"{key} after NMS re-ranked")
        ax.grid(alpha=0.3)
    grey = "0.35"
    handles = [Patch(color=palette[n]) for n in names] + [
        Line2D([], [], color=grey, lw=1.6, marker="o", ms=3.5),
        Line2D([], [], color=grey, ls="none", marker="o", ms=5, mfc="white", mec=grey),
        *(Line2D([], [], color=grey, ls=style, lw=1.1) for _, style, _ in RESCORE_LINES),
        Line2D([], [], color=grey, ls="none", marker="^", ms=6)]
    labels = [*names, r"obj$^{\alpha}$·cls$^{1-\alpha}$", "obj alone (α = 1)",
              *(label for _, _, label in RESCORE_LINES), "off scale (value in the table)"]
    return _finish(fig, handles, labels, ncol=min(len(labels), 5))  # two legend rows: the long oracle labels fit


# ---------------------------------------------------------------------------------------------
# the report's figures: a drawing above, its PNG and its two-line caption; `result` is a
# misalign.compare.CompareResult


@dataclass
class Figure:
    key: str  # file stem under figures/ and the HTML id
    draw: Callable = field(repr=False)  # () -> the matplotlib figure; drawn once, when `png` is first read
    explain: tuple[str, str]  # two lines: what it shows, how to read it
    alt: str = ""  # alt text
    drawn: bytes | None = field(default=None, repr=False)  # the PNG, once drawn

    @property
    def png(self) -> bytes:
        """The PNG file (drawn now unless `render_figures` drew it already)."""
        if self.drawn is None:
            self.drawn = figure_png(self.draw())
        return self.drawn

    @property
    def data(self) -> str:
        return base64.b64encode(self.png).decode("ascii")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, read from the PNG header."""
        width, height = struct.unpack(">II", self.png[16:24])
        return width, height


MANY_DETECTORS = 3  # above this, overlays and per-quantity rows crowd: views get one row per detector


def _figure(key, draw, explain, alt) -> Figure:
    """A Figure drawn later by `draw()` (a partial of one of the functions above)."""
    return Figure(key=key, draw=draw, explain=explain, alt=alt)


_PENDING: list[Figure] = []  # what the forked renderers draw: inherited by fork, never pickled


def _draw_pending(index: int) -> bytes:
    return _PENDING[index].png


def render_figures(figures) -> None:
    """Draw every figure not drawn yet: in forked processes, one figure at a time each, where the
    machine has more than one core (matplotlib draws in one thread, holding the GIL; the figures
    are independent), else (or when no process can be started) here in order. Only the PNG bytes
    come back."""
    global _PENDING
    pending = [f for f in figures if f.drawn is None]
    workers = min(len(pending), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if workers > 1 and sys.platform.startswith("linux"):  # fork: the figures' data is not copied or pickled
        _PENDING = pending
        try:
            pool = multiprocessing.get_context("fork").Pool(workers)
        except OSError as error:  # no process to be had (a container's process limit): drawn here instead
            log.info("figures drawn in this process: %s", error)
        else:
            with pool:
                for figure, png in zip(pending, pool.map(_draw_pending, range(len(pending)), chunksize=1)):
                    figure.drawn = png
        finally:
            _PENDING = []
    for figure in pending:
        figure.png  # noqa: B018 (draws what is left, in order)


def figure1_figures(result, col: str, palette) -> list[Figure]:
    """Figure 1 for one score column: the shown images' scatters and the whole split's density."""
    frames = {d.name: d.shown_rows for d in result.detectors if col != "obj_score" or d.has_obj}
    hists = {d.name: d.histograms[col] for d in result.detectors if col in d.histograms}
    bins = len(result.hist_edges) - 1
    return [
        per_image_figure(result, frames, col, palette),
        _figure(f"figure1_{col}_density", partial(figure_score_iou_density, hists, result.hist_edges, col, palette), (
            f"The same over every image of the split as a 2-D histogram ({bins}×{bins} cells, log colour "
            "scale): before NMS (top) and after NMS (bottom), one column per detector.",
            "Mass in the shaded corner = misaligned boxes; a cloud that rises to the right means the score follows "
            "localisation quality. Compare top and bottom to see which boxes NMS keeps."),
            f"{col} vs IoU density"),
    ]


def per_image_figure(result, frames, col, palette) -> Figure:
    """Figure 1 per image: detectors overlaid (the paper's layout) up to MANY_DETECTORS of them; beyond
    that one row per detector, on the first MANY_DETECTORS images, kept boxes over the grey pool."""
    short = SHORT[col]
    shown_ids, post_only, seed = result.shown_ids.tolist(), set(result.post_nms_only), result.settings.seed
    why = (f"Dashed lines mark 0.5; points in the shaded corner are well localised (IoU > 0.5) but scored "
           f"{short} < 0.5 — boxes NMS tends to discard in favour of higher-scored, worse boxes.")
    if len(frames) <= MANY_DETECTORS:
        draw = partial(figure_score_iou_images, frames, shown_ids, col, palette, post_only=post_only, seed=seed)
        what = (f"{col} against IoU for each candidate of {len(shown_ids)} images (the first of the split with ground "
                f"truth), before NMS (top) and after NMS (bottom); one colour per detector, like the paper's Figure 1.")
    else:
        shown_ids = list(shown_ids)[:MANY_DETECTORS]
        draw = partial(figure_score_iou_images_by_detector, frames, shown_ids, col, palette, post_only=post_only,
                       seed=seed)
        what = (f"{col} against IoU for each candidate of {len(shown_ids)} images (the first of the split with ground "
                f"truth), one row per detector ({len(frames)} are too many to overlay): every candidate before NMS in "
                "grey, the boxes NMS kept in the detector's colour.")
    return _figure(f"figure1_{col}_images", draw, (what, why), f"{col} vs IoU per image")


def figure2_figures(result, palette) -> list[Figure]:
    with_pre = [d for d in result.detectors if d.pre_nms]
    if not with_pre:
        return []
    detectors = result.metrics["detectors"]
    proportions = {d.name: detectors[d.name]["proportions"] for d in with_pre}
    survival = {d.name: detectors[d.name]["survival"] for d in with_pre}
    per_image = {d.name: d.per_image_proportions for d in with_pre}
    return [
        _figure("figure2_proportions", partial(figure_proportions, proportions, survival, palette), (
            "Left: share of boxes meeting each condition before NMS (solid) and after NMS (dashed), over the whole "
            "split. Right: survival rate of each condition, i.e. kept boxes / pre-NMS boxes meeting it.",
            "The paper's headline: the iou>0.5 share drops through NMS while the cls>0.5 share does not — NMS "
            "selects by score, so well-localised low-score boxes are suppressed."),
            "proportions before and after NMS"),
        _figure("figure2_per_image", partial(figure_proportions_per_image, per_image, palette), (
            f"Per image (the first {result.settings.num_images}), share of boxes with cls > 0.5 (circles) and IoU > 0.5 "
            "(triangles) before NMS (solid) and after NMS (dashed), like the paper's Figure 2.",
            "A dashed triangle line below the solid one means NMS lowered the share of well-localised boxes in that "
            "image."),
            "proportions per image"),
    ]


def correlation_section_figure(result, palette) -> Figure:
    corr = {n: result.metrics["detectors"][n]["correlation"] for n in result.names}
    return _figure("correlation", partial(figure_correlation, corr, palette), (
        "Left: Spearman ρ between each score column and IoU with its 95% bootstrap CI (over images), per detector. "
        "Right: divergence = (1 − mean per-gt Spearman ρ)/2 over ground-truth boxes with ≥ 3 candidates.",
        "ρ towards 1 and divergence towards 0 mean the score ranks a box's candidates by localisation quality; "
        "divergence 0.5 means the ranking is unrelated to IoU."),
        "correlation and divergence")


def ap_section_figure(result, palette) -> Figure:
    ap = {n: result.metrics["detectors"][n]["ap"] for n in result.names}
    return _figure("coco_ap", partial(figure_ap, ap, palette), (
        "COCO AP (%) of each detector at a glance: overall, at IoU 0.5 and 0.75, and by object size.",
        "Bars are the numbers of the table above ×100."), "COCO AP")


def training_section_figure(result, palette) -> Figure | None:
    """The training curves of the dumps whose checkpoint folder holds a readable log.csv; None without any."""
    curves = {d.name: d.training.epochs for d in result.detectors if d.training is not None and d.training.available}
    if not curves:
        return None
    return _figure("training", partial(figure_training, curves, palette), (
        "Per epoch of each dump's training run (its checkpoint's log.csv): the loss averaged over the epoch's steps; "
        "the Spearman ρ between the class probability of the true class and the IoU of the decoded box over the "
        f"positive anchors of the epoch's last {ALIGNMENT_BATCHES} batches; and, for models with an objectness or IoU branch, the mean "
        "absolute difference between that branch's probability and the same IoU.",
        "A ρ that rises during training means the classifier learns to score well-localised anchors higher; an "
        "obj-vs-IoU error that falls means the branch learns to predict localisation quality. Runs logged before "
        "these columns existed show their loss only."), "training curves")


def rescoring_section_figure(result, palette) -> Figure | None:
    # Only detectors with an α sweep: the others' cls and oracle rows are in the table.
    sweeps = result.sweeps
    if not sweeps:
        return None
    return _figure("rescoring", partial(figure_rescoring, sweeps, palette), (
        "COCO AP, AP50 and AP75 after NMS ranked by obj^α·cls^(1−α), against α (solid, one colour per "
        "detector with an object-confidence branch; the hollow marker at α = 1 is obj alone); horizontal lines: "
        "cls alone (dashed), cls·obj (dash-dot), oracle_nms, IoU-guided NMS by true IoU keeping the cluster's best "
        "score (dotted), and the oracle, true IoU as ranking and score (loosely dotted). The axis fits the curves: "
        "an oracle_nms, oracle or obj-alone value beyond it is a triangle on that edge (oracle_nms filled, at the "
        "left; oracle filled, at the middle; obj hollow, at the right).",
        "A curve above the dashed cls line means object confidence helps NMS keep well-localised boxes; "
        "oracle_nms's distance above the curves is AP that a better choice of box within each cluster would "
        "recover; the oracle also ranks every false positive last, an upper bound beyond misalignment."),
        "AP against alpha")
