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

import io
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, LogNorm  # noqa: E402

DPI = 120  # PNG resolution: sharp on screen, small files
MAX_COLS = 4  # panels per row before wrapping (keeps figures readable with 10 detectors)
QUADRANT_COLOR = "#d62728"

SCORE_LABELS = {
    "cls_score": "cls_score (class probability, 0–1)",
    "obj_score": "obj_score (object confidence, 0–1)",
    "score": "score (NMS ranking score, 0–1)",
}
SHORT = {"cls_score": "cls", "obj_score": "obj", "score": "score"}
STAGE_LABELS = {"pre_nms": "before NMS", "post_nms": "after NMS"}

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
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


def _grid(num_panels: int, rows_per_block: int, width=3.0, height=2.6):
    """Axes for `num_panels` panel-columns wrapped at MAX_COLS, each `rows_per_block` tall.

    Returns the figure and a list, per panel, of its `rows_per_block` axes (top to bottom).
    """
    ncols = min(num_panels, MAX_COLS)
    blocks = math.ceil(num_panels / ncols)
    fig, axes = plt.subplots(blocks * rows_per_block, ncols, figsize=(width * ncols + 0.6, height * blocks * rows_per_block),
                             squeeze=False)
    panels = []
    for p in range(num_panels):
        b, c = divmod(p, ncols)
        panels.append([axes[b * rows_per_block + r][c] for r in range(rows_per_block)])
    for p in range(num_panels, blocks * ncols):  # unused cells of the last block
        b, c = divmod(p, ncols)
        for r in range(rows_per_block):
            axes[b * rows_per_block + r][c].set_visible(False)
    return fig, panels


def _decorate_score_iou(ax, score_col: str, show_quadrant_label: bool = False) -> None:
    """0.5 lines on both axes, the shaded quadrant IoU > 0.5 & score < 0.5, unit-square limits."""
    ax.axvspan(0.5, 1.0, ymin=0.0, ymax=0.5, color=QUADRANT_COLOR, alpha=0.09, lw=0,
               label=f"IoU > 0.5 but {SHORT.get(score_col, score_col)} < 0.5" if show_quadrant_label else None)
    ax.axvline(0.5, color="0.35", lw=0.8, ls="--", zorder=1)
    ax.axhline(0.5, color="0.35", lw=0.8, ls="--", zorder=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1])


def _sample(frame: pd.DataFrame, max_points: int, seed: int) -> pd.DataFrame:
    if len(frame) <= max_points:
        return frame
    return frame.sample(n=max_points, random_state=seed)


def figure_score_iou_images(frames: dict, image_ids, score_col: str, palette: dict, *,
                            max_points: int = 1500, seed: int = 0):
    """Figure 1, per image: `score_col` against IoU, before (top) and after (bottom) NMS.

    frames: detector name -> candidate rows (columns image_id, iou, kept and `score_col`; only
    the chosen images are needed). One panel pair per image in `image_ids`; detectors overlaid in
    their palette colour; at most `max_points` points per detector and panel (uniform sample).
    """
    image_ids = list(image_ids)
    fig, panels = _grid(len(image_ids), 2)
    for p, image_id in enumerate(image_ids):
        top, bottom = panels[p]
        for name, frame in frames.items():
            if score_col not in frame or frame[score_col].isna().all():
                continue
            rows = frame[frame["image_id"] == image_id]
            for ax, stage_rows in ((top, rows), (bottom, rows[rows["kept"]])):
                shown = _sample(stage_rows, max_points, seed)
                ax.scatter(shown["iou"], shown[score_col], s=7, alpha=0.55, color=palette[name], lw=0,
                           label=f"{name} (n={len(stage_rows)})", rasterized=True)
        for ax, stage in ((top, "pre_nms"), (bottom, "post_nms")):
            _decorate_score_iou(ax, score_col, show_quadrant_label=(p == 0 and stage == "pre_nms"))
            ax.set_title(f"image {image_id} · {STAGE_LABELS[stage]}")
            ax.set_xlabel("IoU with ground truth")
            ax.set_ylabel(SCORE_LABELS.get(score_col, score_col))
            ax.legend(loc="upper left", frameon=False, markerscale=1.6, handletextpad=0.2)
    fig.tight_layout()
    return fig


def _detector_cmap(color: str):
    return LinearSegmentedColormap.from_list("det", ["#ffffff", color, "#000000"], N=256)


def figure_score_iou_density(frames: dict, score_col: str, palette: dict, *, bins: int = 50):
    """Figure 1 over the whole split: 2-D histogram of `score_col` against IoU (log colour scale).

    frames: detector name -> candidate rows (columns iou, kept, `score_col`). One column per
    detector (wrapped at MAX_COLS), rows before / after NMS, colour map in the detector's colour.
    Detectors whose `score_col` is all NaN are skipped.
    """
    names = [n for n, f in frames.items() if score_col in f and not f[score_col].isna().all()]
    fig, panels = _grid(len(names), 2, width=3.3)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for p, name in enumerate(names):
        frame = frames[name]
        iou = frame["iou"].to_numpy(np.float64)
        score = frame[score_col].to_numpy(np.float64)
        kept = frame["kept"].to_numpy(bool)
        for ax, mask, stage in ((panels[p][0], None, "pre_nms"), (panels[p][1], kept, "post_nms")):
            x, y = (iou, score) if mask is None else (iou[mask], score[mask])
            counts, _, _ = np.histogram2d(np.clip(x, 0, 1), np.clip(y, 0, 1), bins=[edges, edges])  # [bins, bins]
            shown = np.ma.masked_equal(counts.T, 0)
            vmax = max(counts.max(), 1.0)
            mesh = ax.pcolormesh(edges, edges, shown, cmap=_detector_cmap(palette[name]),
                                 norm=LogNorm(vmin=1, vmax=max(vmax, 1.5)), rasterized=True)
            fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.02).set_label("boxes per cell", fontsize=7.5)
            _decorate_score_iou(ax, score_col, show_quadrant_label=(p == 0 and stage == "pre_nms"))
            ax.set_title(f"{name} · {STAGE_LABELS[stage]} (n={len(x):,})", color=palette[name])
            ax.set_xlabel("IoU with ground truth")
            ax.set_ylabel(SCORE_LABELS.get(score_col, score_col))
            if p == 0 and stage == "pre_nms":
                ax.legend(loc="upper left", frameon=False)
    fig.tight_layout()
    return fig


def figure_proportions(proportions: dict, survival: dict, palette: dict):
    """Figure 2 overall: proportion of boxes meeting each condition before (solid) and after
    (dashed) NMS, and the survival rate (after / before count) of each condition.

    proportions: detector -> {"pre_nms": {cond: p}, "post_nms": {cond: p}} (metrics.json's
    `proportions`); survival: detector -> {cond: r}. Conditions in metrics.json order.
    """
    fig, (ax_p, ax_s) = plt.subplots(1, 2, figsize=(12.5, 3.9))
    names = list(proportions)
    conditions = list(next(iter(proportions.values()))["pre_nms"]) if names else []
    x = np.arange(len(conditions))
    for name in names:
        for stage, ls, marker in (("pre_nms", "-", "o"), ("post_nms", "--", "s")):
            values = [100.0 * proportions[name][stage].get(c, np.nan) for c in conditions]
            ax_p.plot(x, values, ls=ls, marker=marker, ms=4, color=palette[name], label=f"{name} · {STAGE_LABELS[stage]}")
    ax_p.set_xticks(x, conditions, rotation=45, ha="right")
    ax_p.set_ylabel("boxes meeting the condition (% of stage)")
    ax_p.set_title("proportion of boxes per condition, before (solid) / after (dashed) NMS")
    ax_p.set_ylim(bottom=0)
    ax_p.grid(axis="y", alpha=0.3)
    ax_p.legend(frameon=False, ncol=1 if len(names) < 4 else 2)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [100.0 * survival[name].get(c, np.nan) for c in conditions]
        ax_s.bar(x - 0.4 + width * (i + 0.5), values, width=width, color=palette[name], label=name)
    ax_s.set_xticks(x, conditions, rotation=45, ha="right")
    ax_s.set_ylabel("survival through NMS (% of pre-NMS boxes kept)")
    ax_s.set_title("survival rate = after-NMS count / before-NMS count")
    ax_s.grid(axis="y", alpha=0.3)
    ax_s.legend(frameon=False)
    fig.tight_layout()
    return fig


def figure_proportions_per_image(per_image: dict, palette: dict, conditions=("cls>0.5", "iou>0.5")):
    """Figure 2 per image, as in the paper: proportion of cls>0.5 and iou>0.5 boxes per image,
    before (solid) and after (dashed) NMS; one panel per detector.

    per_image: detector -> DataFrame with columns image_id, stage ('pre_nms'/'post_nms'),
    condition, proportion (0-1), for the chosen images.
    """
    names = list(per_image)
    fig, panels = _grid(len(names), 1, width=4.2, height=3.0)
    markers = {"cls": "o", "iou": "^"}
    for p, name in enumerate(names):
        ax = panels[p][0]
        frame = per_image[name]
        image_ids = sorted(frame["image_id"].unique())
        x = np.arange(len(image_ids))
        for cond in conditions:
            for stage, ls in (("pre_nms", "-"), ("post_nms", "--")):
                sel = frame[(frame["condition"] == cond) & (frame["stage"] == stage)].set_index("image_id")
                values = 100.0 * sel["proportion"].reindex(image_ids).to_numpy(np.float64)
                ax.plot(x, values, ls=ls, marker=markers[cond[:3]], ms=4, color=palette[name],
                        alpha=1.0 if cond.startswith("iou") else 0.6, label=f"{cond} {STAGE_LABELS[stage]}")
        ax.set_xticks(x, [str(i) for i in image_ids], rotation=45, ha="right")
        ax.set_xlabel("image id")
        ax.set_ylabel("boxes meeting the condition (%)")
        ax.set_title(name, color=palette[name])
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig


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
            lo, hi = (stats.get("ci95", {}).get("spearman") or [np.nan, np.nan])
            if rho is not None and np.isfinite(rho):
                err = [[max(rho - lo, 0)], [max(hi - rho, 0)]] if np.isfinite([lo, hi]).all() else None
                ax_r.errorbar(rho, y, xerr=err, fmt="o", color=palette[name], ms=5, capsize=3,
                              label=name if j == 0 else None)
            div = stats.get("divergence")
            if div is not None and np.isfinite(div):
                ax_d.barh(y, div, height=step * 0.9, color=palette[name], label=name if j == 0 else None)
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
    ax_d.set_xlabel("divergence = (1 − mean per-gt Spearman ρ) / 2   (0 = aligned, 0.5 = unrelated, 1 = reversed)")
    ax_d.set_title("ranking divergence per ground-truth box")
    handles, labels = ax_r.get_legend_handles_labels()
    if handles:
        ax_r.legend(handles, labels, frameon=False, loc="lower left", fontsize=7.5)
    fig.tight_layout()
    return fig


def figure_ap(ap: dict, palette: dict, keys=("AP", "AP50", "AP75", "APs", "APm", "APl")):
    """COCO AP of every detector, grouped bars (AP in %, pycocotools' numbers)."""
    names = list(ap)
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    x = np.arange(len(keys))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [100.0 * max(ap[name].get(k, np.nan), 0.0) if ap[name].get(k, -1) >= 0 else np.nan for k in keys]
        ax.bar(x - 0.4 + width * (i + 0.5), values, width=width, color=palette[name], label=name)
    ax.set_xticks(x, keys)
    ax.set_ylabel("COCO AP (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=7.5)
    fig.tight_layout()
    return fig
