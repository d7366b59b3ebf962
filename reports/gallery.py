"""The suppression gallery: image crops of the ground truths whose best box NMS suppressed.

Draws misalign.suppression's gallery cases (misalign.compare `DetectorResult.gallery`); computes no
number. Each panel is a crop of the dataset's image around one ground truth with three boxes in
one legend's colours: the ground truth, the box NMS kept (its score and IoU) and the better box it
suppressed (its score and IoU). With several detectors the same ground truths are rows and the
detectors columns, every panel of a row on the same crop, so the boxes compare directly.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from . import figures as F

GT_COLOR, KEPT_COLOR, SUPPRESSED_COLOR = "#2ca02c", "#d62728", "#1f77b4"
BOX_STYLES = {  # case column prefix -> colour, line style, legend label
    "gt": (GT_COLOR, "-", "ground truth"),
    "kept": (KEPT_COLOR, "-", "box NMS kept: score · IoU"),
    "suppressed": (SUPPRESSED_COLOR, (0, (3, 1.6)), "better box it suppressed: score · IoU"),
}
BOX_ZORDER = {"kept": 2, "suppressed": 3, "gt": 4}
EDGES = ("x1", "y1", "x2", "y2")
MARGIN = 0.25  # crop margin around a row's boxes, as a share of their larger side
MIN_MARGIN = 6  # px: a tiny object still shows its surroundings
SINGLE_COLUMNS = 4  # panels per row (as blocks of whole cases; a case of more detectors takes a row alone)
TEXT_BAND = 0.5  # inches under a panel for its two lines of numbers
TITLE_BAND = 0.36  # inches above a panel for its title
NAME_BAND = 0.1  # several detectors: extra inches above a panel's title for the detector's name
CASE_BAND = 0.3  # several detectors: inches above a block of panels for the case's title
MIN_WIDTH = 7.6  # inches: the one-row legend fits
HALO = [patheffects.withStroke(linewidth=3.0, foreground="white")]  # boxes stay visible on any image


def _row_boxes(frames: list[pd.DataFrame], rank: int) -> np.ndarray:
    """[K, 4] every finite box drawn for the case `rank` across the detectors."""
    boxes = []
    for frame in frames:
        row = frame[frame["rank"] == rank].iloc[0]
        for prefix in BOX_STYLES:
            box = np.array([row[f"{prefix}_{e}"] for e in EDGES], np.float64)
            if np.isfinite(box).all():
                boxes.append(box)
    return np.array(boxes).reshape(-1, 4)


def crop_window(boxes: np.ndarray, width: float, height: float) -> tuple[float, float, float, float]:
    """A square (x1, y1, x2, y2) around `boxes` with a margin, shifted (not cut) to stay inside the image."""
    x1, y1 = boxes[:, 0].min(), boxes[:, 1].min()
    x2, y2 = boxes[:, 2].max(), boxes[:, 3].max()
    side = max(x2 - x1, y2 - y1)
    side = min(side + 2 * max(MARGIN * side, MIN_MARGIN), max(width, height))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2

    def place(centre, extent):
        lo = centre - side / 2
        return min(max(lo, 0.0), max(extent - side, 0.0)) if side <= extent else (extent - side) / 2

    left, top = place(cx, width), place(cy, height)
    return left, top, left + side, top + side


def _load_image(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _draw_box(ax, row, prefix) -> None:
    box = [row[f"{prefix}_{e}"] for e in EDGES]
    if not np.isfinite(box).all():
        return
    color, style, _ = BOX_STYLES[prefix]
    # the ground truth on top, thinner: it shows through the dashes of a suppressed box lying on it
    ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, edgecolor=color,
                           linestyle=style, lw=1.3 if prefix == "gt" else 1.8, zorder=BOX_ZORDER[prefix],
                           path_effects=HALO))


def _numbers(row) -> list[tuple[str, str]]:
    """The panel's two lines (text, colour): what NMS kept, and the better box or what became of it."""
    kept = (f"kept {row['kept_score']:.2f} · IoU {row['kept_iou']:.2f}" if row["kept_cand_id"] >= 0
            else "kept: none")
    fate = row["best_fate"]
    if fate == "suppressed":
        second = (f"suppr. {row['suppressed_score']:.2f} · IoU {row['suppressed_iou']:.2f}", SUPPRESSED_COLOR)
    elif fate == "kept":
        second = ("its best box was kept", "0.35")
    elif fate == "cut":
        second = (f"best IoU {row['best_any']:.2f}: cut by max_det", "0.35")
    else:
        second = ("no box with IoU ≥ 0.5", "0.35")
    return [(kept, KEPT_COLOR), second]


def _panel(ax, row, window, image, title, title_color="black") -> None:
    ax.set_facecolor("0.9")
    if image is not None:
        h, w = image.shape[:2]
        ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest", zorder=0)
    else:
        ax.text(0.5, 0.5, "image file\nnot found", transform=ax.transAxes, ha="center", va="center", color="0.4",
                fontsize=8)
    for prefix in ("gt", "kept", "suppressed"):
        _draw_box(ax, row, prefix)
    ax.set_xlim(window[0], window[2])
    ax.set_ylim(window[3], window[1])  # image rows grow downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color("0.6")
    ax.set_title(title, fontsize=8, color=title_color, pad=3)
    for i, (text, color) in enumerate(_numbers(row)):
        ax.text(0.0, -0.05 - 0.115 * i, text, transform=ax.transAxes, ha="left", va="top", fontsize=7.5, color=color)


def _case_label(row) -> str:
    category = f" {row['category']}" if row["category"] else ""
    return f"#{row['rank'] + 1} · gt {row['gt_id']}{category} · image {row['image_id']}"


def _verdict(row) -> str:
    if row["loss"]:
        return f"gap {row['gap']:.2f}: loss"
    return f"gap {row['gap']:.2f}" if row["best_fate"] != "none" else "no box ≥ 0.5"


def figure_gallery(cases: dict[str, pd.DataFrame], palette: dict):
    """The gallery: one block per case (ground truth), a panel per detector in it, blocks wrapped so that
    about SINGLE_COLUMNS panels make a row. Every panel of a block shows the same crop; with several
    detectors each panel is headed by the detector's name in its colour and the block by the case.
    cases: detector -> its gallery frame (misalign.suppression.CASE_COLUMNS), every frame of the same
    ground truths in the same rank order."""
    import matplotlib.pyplot as plt

    names = list(cases)
    frames = [cases[n] for n in names]
    ranks = frames[0]["rank"].tolist()
    several = len(names) > 1
    per_row = max(1, SINGLE_COLUMNS // len(names))  # blocks per row
    block_rows = math.ceil(len(ranks) / per_row)
    panel = 1.75 if len(names) <= SINGLE_COLUMNS else 1.5
    gap_w, block_gap = 0.22, (0.5 if several else 0.22)
    case_band = CASE_BAND if several else 0.0  # the block's title above its panels' names
    name_band = NAME_BAND if several else 0.0
    block_w = len(names) * panel + (len(names) - 1) * gap_w
    content_w = min(per_row, len(ranks)) * (block_w + block_gap) - block_gap + 0.4
    fig_w = max(content_w, MIN_WIDTH)
    left = 0.2 + (fig_w - content_w) / 2  # a narrow gallery is centred under its legend
    row_h = case_band + name_band + TITLE_BAND + panel + TEXT_BAND
    fig_h = F.LEGEND_BAND + block_rows * row_h + 0.1
    fig = plt.figure(figsize=(fig_w, fig_h))
    fig.fixed_layout = True
    images = {}

    def image_of(row):
        path = row["image_file"] if row["image_found"] else None
        if path is not None and path not in images:
            images[path] = _load_image(path)
        return images.get(path)

    for i, rank in enumerate(ranks):
        rows = [f[f["rank"] == rank].iloc[0] for f in frames]
        image = image_of(rows[0])
        h, w = (image.shape[:2] if image is not None else (np.inf, np.inf))
        window = crop_window(_row_boxes(frames, rank), w, h)
        block_row, block_col = divmod(i, per_row)
        x0 = left + block_col * (block_w + block_gap)
        top = F.LEGEND_BAND + block_row * row_h  # inches from the figure's top
        if several:
            fig.text((x0 + block_w / 2) / fig_w, 1 - (top + case_band / 2) / fig_h, _case_label(rows[0]),
                     ha="center", va="center", fontsize=9, fontweight="bold")
        y = 1 - (top + case_band + name_band + TITLE_BAND + panel) / fig_h
        for c, (name, row) in enumerate(zip(names, rows)):
            ax = fig.add_axes(((x0 + c * (panel + gap_w)) / fig_w, y, panel / fig_w, panel / fig_h))
            _panel(ax, row, window, image, _verdict(row) if several else f"{_case_label(row)}\n{_verdict(row)}")
            if several:
                ax.annotate(name, xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, 15), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8.5, fontweight="bold", color=palette.get(name, "black"))
    handles = [Line2D([], [], color=color, ls=style, lw=1.8) for color, style, _ in BOX_STYLES.values()]
    return F._finish(fig, handles, [label for _, _, label in BOX_STYLES.values()], ncol=3)


def gallery_section_figure(result, palette):
    """The report's gallery Figure, or None when it has no case or none of its image files is found."""
    cases = {d.name: d.gallery for d in result.detectors if d.gallery is not None}
    if not cases or not len(next(iter(cases.values()))) or not any(f["image_found"].any() for f in cases.values()):
        return None
    reference = next(iter(cases))
    several = len(cases) > 1
    what = (f"The {len(next(iter(cases.values())))} ground truths of {reference} whose best-localised box NMS "
            "suppressed with the largest IoU gap (best IoU − best kept IoU)"
            + (", one row each, every detector's boxes for the same object side by side (one column each)."
               if several else ".")
            + " Green: the ground truth; red: the box NMS kept (score · IoU); blue dashed: the better box it suppressed.")
    why = ("A loss: some box had IoU ≥ 0.5 and beat the kept one by ≥ 0.1, but scored lower and was suppressed. "
           "A column without the blue box kept its best box, or none of its boxes reached 0.5.")
    return F._figure("gallery", partial(figure_gallery, cases, palette), (what, why), "suppression gallery")
