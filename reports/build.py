"""`misalign report`: read the dumps, ask `misalign` for every number, write the report folder.

    write_report(["dumps/base", "dumps/conf"], "reports/cmp", before_after_nms=True) -> Path

The folder (DESIGN.md §3.4) holds index.html (self-contained), metrics.json (misalign's
`metrics_document`, unchanged), tables/*.csv and figures/*.png. It is written into a temporary
folder that replaces `out` only once everything is written (`misalign.io.atomic_dir`).

Each dump is read once and analysed by `misalign.metrics.analyze`; what the figures need (2-D
histograms over the whole split, the rows of the few images drawn one by one) is taken from it
before the next dump is read, so memory holds one ledger at a time.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from misalign.errors import InputError

from . import figures as F
from .html import (CONDITIONS, Figure, Table, coco_frame, correlation_frame, counts_total_frame, fmt_count,
                   fmt_float, fmt_percent, meta_json_text, proportions_frame, render_page)

log = logging.getLogger(__name__)

HIST_BINS = 50  # Figure 1 density: bins per axis on [0, 1]
MANY_DETECTORS = 3  # above this, overlays and per-quantity rows crowd: views get one row per detector


@dataclass
class ReportConfig:
    names: list[str] | None = None  # detector names in dump order; default the dump folder names
    gt: str | None = None  # ground-truth COCO JSON; default the dumps' meta.json dataset.ann
    before_after_nms: bool = False  # add the paper's Figure 1, Table 1 and Figure 2
    min_iou: float = 0.5  # correlation pool: candidates with iou >= min_iou
    num_images: int = 6  # images shown one by one (Table 1 columns, Figure 1 scatters, Figure 2)
    bootstrap: int = 200  # bootstrap resamples of images for the 95% CIs (0: no CIs)
    seed: int = 0  # bootstrap seed (same seed and B for every dump: paired differences)
    rescore: bool = False  # counterfactual rescoring: re-run NMS under other rankings (metrics.json 'rescoring')
    alphas: object = None  # α grid of --rescore: '0,0.1,...' or numbers; default misalign.rescore.DEFAULT_ALPHAS
    rescore_thresh: object = None  # --rescore-thresh T in [0, 1): a ranking's pool is its rows with score > T; None: the dump's pool


@dataclass
class DumpView:
    """What the page needs from one analysed dump, once its ledger has been let go."""

    name: str
    folder: Path
    meta: dict
    analysis: object  # misalign.metrics.Analysis
    pre_nms: bool  # holds the pre-NMS pool (false: post-NMS-only, e.g. an imported results file)
    has_obj: bool  # obj_score is not all NaN
    score_is_cls: bool  # score == cls_score on every row (NMS ranked by the class probability)
    score_above_one: bool  # some score > 1 (CL-NMS): the score panels draw those on their top edge
    has_raw: bool  # raw_counts / anchors stages present
    histograms: dict = field(default_factory=dict)  # score column -> {"pre_nms": [b, b] | None, "post_nms": [b, b]}
    quadrants: dict = field(default_factory=dict)  # score column -> misalign.counts.quadrant_counts frame
    shown_ids: np.ndarray | None = None  # [N] image ids shown one by one (the first dump's first N with gt)
    shown_rows: pd.DataFrame | None = None  # candidates of the shown images (Figure 1 scatters)
    rescoring: object = None  # misalign.rescore.RescoreResult (--rescore); None when not rescored
    rescore_note: str | None = None  # why it could not be rescored (post-NMS only, no nms_thresh)


# ---------------------------------------------------------------------------------------------
# inputs


def _detector_names(dumps: list[Path], names) -> list[str]:
    if names:
        names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
        if len(names) != len(dumps):
            raise InputError(f"--names: {len(names)} name(s) for {len(dumps)} dump(s)")
        if any(not n for n in names):
            raise InputError("--names: empty detector name")
    else:
        names = [d.resolve().name for d in dumps]
        if len(set(names)) < len(names):  # same folder name in different places: add the parent
            names = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in dumps]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"--names: detector name {dup!r} appears twice; give distinct names with --names")
    return names


def _check_options(config: ReportConfig, dumps) -> None:
    if not dumps:
        raise InputError("DUMP: give at least one dump folder")
    if not 0.0 <= config.min_iou <= 1.0:
        raise InputError(f"--min-iou: {config.min_iou} is outside [0, 1]")
    if config.num_images < 1:
        raise InputError(f"--images: {config.num_images} must be at least 1")
    if config.bootstrap < 0:
        raise InputError(f"--bootstrap: {config.bootstrap} must be 0 or more")
    if config.alphas is not None and not config.rescore:
        raise InputError("--alphas: only used with --rescore")
    if config.rescore_thresh is not None and not config.rescore:
        raise InputError("--rescore-thresh: only used with --rescore")
    if config.rescore:
        from misalign.rescore import DEFAULT_ALPHAS, parse_alphas, parse_rescore_thresh

        config.alphas = DEFAULT_ALPHAS if config.alphas is None else parse_alphas(config.alphas)
        config.rescore_thresh = parse_rescore_thresh(config.rescore_thresh)


def _dataset(meta: dict) -> dict:
    return meta.get("dataset") or {}


def check_same_dataset(folders, metas, image_sets, gt_given: bool) -> None:
    """InputError (one line) unless every dump is of the same dataset split and the same images."""
    ref_folder, ref = folders[0], _dataset(metas[0])
    for folder, meta, images in zip(folders[1:], metas[1:], image_sets[1:]):
        ds = _dataset(meta)
        if ref.get("split") and ds.get("split") and ref["split"] != ds["split"]:
            raise InputError(f"{folder}: split {ds['split']!r} differs from {ref_folder}'s {ref['split']!r}: "
                             "dumps of different datasets or splits cannot be compared")
        if not gt_given and ref.get("ann") and ds.get("ann") and Path(ref["ann"]).resolve() != Path(ds["ann"]).resolve():
            raise InputError(f"{folder}: ground truth {ds['ann']} differs from {ref_folder}'s {ref['ann']}: dumps of "
                             "different datasets cannot be compared (give --gt FILE if they are the same)")
        if not np.array_equal(images, image_sets[0]):
            raise InputError(f"{folder}: its {len(images)} images differ from {ref_folder}'s {len(image_sets[0])}: "
                             "dumps of different datasets or splits cannot be compared")


def _ground_truth_path(config: ReportConfig, folders, metas) -> Path:
    if config.gt:
        path = Path(config.gt)
        if not path.is_file():
            raise InputError(f"--gt: {path}: file not found")
        return path
    for folder, meta in zip(folders, metas):
        ann = _dataset(meta).get("ann")
        if ann:
            if not Path(ann).is_file():
                raise InputError(f"{folder / 'meta.json'}: ground truth {ann} (dataset.ann) not found; give it with --gt FILE")
            return Path(ann)
    raise InputError(f"{folders[0] / 'meta.json'}: names no ground truth (dataset.ann); give it with --gt FILE")


# ---------------------------------------------------------------------------------------------
# analysis (misalign computes, this only collects)


def images_to_show(images: pd.DataFrame, num_images: int) -> np.ndarray:
    """[<= num_images] ids of the images shown one by one: the first ones with ground truth.

    An image without any object has nothing to misalign, so it would show an empty panel; images
    without ground truth fill in only when too few have some.
    """
    with_gt = images["num_gt"].to_numpy() > 0
    order = np.concatenate([np.flatnonzero(with_gt), np.flatnonzero(~with_gt)])[:num_images]
    return images["image_id"].to_numpy(np.int64)[np.sort(order)]


def _view(ledger, analysis, name: str, shown_ids) -> DumpView:
    """The figure inputs of one analysed ledger: histograms, quadrant counts, rows of shown images."""
    from misalign import counts

    cands = ledger.candidates
    has_obj = bool(np.isfinite(cands["obj_score"].to_numpy()).any()) if len(cands) else False
    score_is_cls = bool(np.array_equal(cands["score"].to_numpy(), cands["cls_score"].to_numpy()))
    columns = ["cls_score", "score"] + (["obj_score"] if has_obj else [])
    score_above_one = bool((cands["score"].to_numpy() > 1).any())
    histograms, quadrants = {}, {}
    for col in columns:
        pre = counts.score_iou_histogram(cands, col, kept_only=False, bins=HIST_BINS)[0] if ledger.pre_nms else None
        post, _ = counts.score_iou_histogram(cands, col, kept_only=True, bins=HIST_BINS)
        histograms[col] = {"pre_nms": pre, "post_nms": post}
        quadrants[col] = counts.quadrant_counts(cands, col)
    shown = cands[np.isin(cands["image_id"].to_numpy(), np.asarray(shown_ids, np.int64))]
    # The panels are the unit square; a score above 1 (CL-NMS) is drawn on the top edge, as the histograms count it.
    shown = shown.assign(score=np.minimum(shown["score"].to_numpy(), 1.0))
    has_raw = len(ledger.raw_counts) > 0 or bool((ledger.images["num_pos_anchors"] >= 0).all())
    return DumpView(name=name, folder=Path(ledger.folder), meta=ledger.meta, analysis=analysis,
                    pre_nms=ledger.pre_nms, has_obj=has_obj, score_is_cls=score_is_cls,
                    score_above_one=score_above_one, has_raw=has_raw,
                    histograms=histograms, quadrants=quadrants, shown_ids=np.asarray(shown_ids, np.int64),
                    shown_rows=shown[["image_id", "iou", "kept", "cls_score", "obj_score", "score"]].copy())


def analyse_dumps(dumps, config: ReportConfig) -> tuple[list[DumpView], Path]:
    """Validate and analyse every dump (one at a time); returns their views and the gt path."""
    from misalign.ledger import read_images, read_ledger, read_meta, validate_ledger
    from misalign.metrics import (ANALYSIS_COLUMNS, STREAMED_ANALYSIS_COLUMNS, analyze, check_ground_truth,
                                  load_ground_truth)

    folders = [Path(d) for d in dumps]
    names = _detector_names(folders, config.names)
    for folder in folders:
        validate_ledger(folder)
    metas = [read_meta(f) for f in folders]
    image_tables = [read_images(f) for f in folders]
    image_sets = [np.sort(t["image_id"].to_numpy(np.int64)) for t in image_tables]
    check_same_dataset(folders, metas, image_sets, gt_given=bool(config.gt))
    gt_path = _ground_truth_path(config, folders, metas)
    coco_gt = load_ground_truth(gt_path)
    shown_ids = images_to_show(image_tables[0], config.num_images)
    views = []
    for folder, name in zip(folders, names):
        # rescoring re-runs NMS on every box; otherwise only the kept rows' boxes are read (for AP)
        ledger = read_ledger(folder, columns=ANALYSIS_COLUMNS if config.rescore else STREAMED_ANALYSIS_COLUMNS)
        check_ground_truth(ledger, coco_gt, str(gt_path))
        log.info("analysing %s (%d candidates)", name, len(ledger.candidates))
        analysis = analyze(ledger, coco_gt, name=name, min_iou=config.min_iou, bootstrap=config.bootstrap,
                           seed=config.seed)
        rescoring, note = _rescore(ledger, analysis, coco_gt, config) if config.rescore else (None, None)
        views.append(_view(ledger, analysis, name, shown_ids))
        views[-1].rescoring, views[-1].rescore_note = rescoring, note
        del ledger
    return views, gt_path


def _rescore(ledger, analysis, coco_gt, config):
    """(misalign.rescore result, None), or (None, why not) for a dump that cannot be rescored; adds
    metrics.json's `rescoring`, `ap_lost_to_misalignment` and `ap_gap_to_oracle_ranking` to the analysis
    either way."""
    from misalign.rescore import rescore, unavailable_metrics, unavailable_reason

    reason = unavailable_reason(ledger.meta)
    result = None if reason else rescore(ledger, coco_gt, alphas=config.alphas, rescore_thresh=config.rescore_thresh,
                                         actual_ap=analysis.metrics["ap"])
    analysis.metrics.update(result.metrics() if result else unavailable_metrics())
    return result, reason


# ---------------------------------------------------------------------------------------------
# page content


def _json_safe(value):
    """NaN/inf -> None everywhere (metrics.json must be strict JSON)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "detector"


def _interval_text(lo, hi, digits=3, percent=False) -> str | None:
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    if percent:
        return f"[{100 * lo:.{digits}f}%, {100 * hi:.{digits}f}%]"
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _with_ci(frame: pd.DataFrame, value: str, lo: str, hi: str, label: str, digits=3, percent=False) -> pd.Series:
    """'0.412 [0.398, 0.430]' strings for the page (the CSV keeps the numbers)."""
    def text(row):
        v = row[value]
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        main = f"{100 * v:.{digits}f}%" if percent else f"{v:.{digits}f}"
        ci = _interval_text(row.get(lo), row.get(hi), digits, percent)
        return f"{main} {ci}" if ci else main
    return frame.apply(text, axis=1).rename(label)


def summary_table(views, palette, rescore: bool = False) -> Table:
    from misalign.metrics import summary_table as misalign_summary

    frame = misalign_summary({v.name: v.analysis for v in views}, column="score")
    shown = pd.DataFrame({"detector": frame["detector"]})
    for key in ("AP", "AP50", "AP75"):
        shown[key] = frame[key]
    if rescore:  # AP(oracle_nms) - AP(actual), AP(oracle) - AP(actual); None where the dump could not be rescored
        for key in ("ap_lost_to_misalignment", "ap_gap_to_oracle_ranking"):
            frame[key] = [v.analysis.metrics.get(key) for v in views]
        shown["AP lost to misalignment"] = frame["ap_lost_to_misalignment"]
    shown["ρ(score, IoU) [95% CI]"] = _with_ci(frame, "spearman", "spearman_lo", "spearman_hi", "")
    shown["divergence [95% CI]"] = _with_ci(frame, "divergence", "divergence_lo", "divergence_hi", "")
    shown["survival iou>0.5 [95% CI]"] = _with_ci(frame, "survival iou>0.5", "survival iou>0.5 lo",
                                                    "survival iou>0.5 hi", "", digits=1, percent=True)
    shown["survival cls>0.5 [95% CI]"] = _with_ci(frame, "survival cls>0.5", "survival cls>0.5 lo",
                                                    "survival cls>0.5 hi", "", digits=1, percent=True)
    engines = sorted({f"{e['name']} {e['version']}" for e in (v.analysis.metrics["ap_engine"] for v in views)})
    table = Table("summary", shown, (
        f"One row per detector: COCO AP of its kept boxes (COCOeval by {', '.join(engines)}); Spearman ρ between its NMS ranking score and IoU "
        "over candidates with IoU ≥ min_iou, and the divergence, with 95% bootstrap CIs over images; the share "
        "of boxes with IoU > 0.5 (and with cls > 0.5) that survive NMS.",
        "Higher AP and ρ, lower divergence are better; a survival of IoU>0.5 boxes far below that of cls>0.5 boxes "
        "is the paper's finding: NMS keeps confident boxes, not well-localised ones."),
        formats={k: fmt_float(3) for k in ("AP", "AP50", "AP75", "AP lost to misalignment")}, colors=palette)
    if rescore:
        table.explain = (table.explain[0] + " AP lost to misalignment: AP when NMS keeps the best-localised box of "
                         "each cluster, with the cluster's best detector score (IoU-guided NMS by the true IoU, "
                         "oracle_nms), minus the detector's own AP, from the counterfactual rescoring below; "
                         "tables/summary.csv also has ap_gap_to_oracle_ranking (the upper bound that also fixes "
                         "classification).", table.explain[1])
    table.csv = frame
    return table


def differences_table(views, palette) -> Table | None:
    from misalign.metrics import compare

    if len(views) < 2:
        return None
    frame = compare({v.name: v.analysis for v in views})
    paired = "Paired = both dumps hold the same images and used the same seed and B, so each resample drew the same " \
             "images for both; a CI that excludes 0 is a difference beyond resampling noise (AP has no CI)."
    if len(views) > MANY_DETECTORS:
        table = Table("differences", _differences_wide(frame), (
            f"Each detector against the reference {views[0].name} (the first dump), one row per detector: each cell is "
            "delta = detector − reference of that quantity with its 95% percentile bootstrap CI; – where the quantity "
            "does not apply. tables/differences.csv has the values themselves.", paired), left=("paired",),
            colors=palette)
        table.csv = frame
        return table
    shown = frame[["detector", "reference", "quantity", "value", "reference_value", "delta"]].copy()
    shown["95% CI of delta"] = [_interval_text(lo, hi) or "–" for lo, hi in zip(frame["ci95_lo"], frame["ci95_hi"])]
    shown["paired"] = frame["paired"].map({True: "yes", False: "no"})
    table = Table("differences", shown, (
        f"Each detector against the reference {views[0].name} (the first dump): delta = detector − reference "
        "for AP, Spearman ρ and divergence of each score column, and survival rates, with percentile bootstrap CIs.",
        paired),
        formats={"value": fmt_float(3), "reference_value": fmt_float(3), "delta": fmt_float(3, signed=True)},
        left=("reference", "quantity", "paired"), colors=palette)
    table.csv = frame
    return table


def _differences_wide(frame: pd.DataFrame) -> pd.DataFrame:
    """compare()'s long rows as one row per detector, one column per quantity: '+0.025 [0.01, 0.04]'."""
    def cell(row) -> str:
        ci = _interval_text(row["ci95_lo"], row["ci95_hi"])
        return f"{row['delta']:+.3f}" + (f" {ci}" if ci else "")

    cells = frame.assign(cell=frame.apply(cell, axis=1))
    wide = cells.pivot(index="detector", columns="quantity", values="cell")
    wide = wide.reindex(index=frame["detector"].unique(), columns=frame["quantity"].unique()).fillna("–")
    wide = wide.rename(columns=lambda q: f"Δ {q}").reset_index().rename_axis(columns=None)
    paired = frame.groupby("detector", sort=False)["paired"].all()
    return wide.assign(paired=wide["detector"].map(paired).map({True: "yes", False: "no"}))


def coco_table(metrics, names, palette) -> Table:
    frame = coco_frame(metrics, names)
    return Table("coco_ap", frame, (
        "pycocotools' twelve COCOeval bbox numbers (maxDets 1/10/100) of each detector's kept boxes ranked by score, "
        "over every image of the dump; −1 means the split has no ground truth of that size.",
        "AP averages IoU thresholds 0.5:0.95; AP50/AP75 at one threshold; s/m/l: small/medium/large objects; "
        "ARk: recall with at most k detections per image."),
        formats={c: fmt_float(3) for c in frame.columns[1:]}, colors=palette)


def correlation_table(metrics, names, palette) -> Table:
    frame = correlation_frame(metrics, names)
    shown = frame[["detector", "score column", "spearman"]].copy()
    shown["95% CI of ρ"] = [_interval_text(lo, hi) or "–" for lo, hi in zip(frame["spearman_ci_lo"], frame["spearman_ci_hi"])]
    for col in ("kendall", "pearson", "spearman_per_gt", "divergence", "n", "n_gt"):
        shown[col] = frame[col]
    table = Table("correlation", shown, (
        "Per detector and score column: Spearman ρ (with its bootstrap CI), Kendall τ-b and Pearson r between the "
        "score and IoU over the pool; mean per-gt Spearman and the divergence; n pool rows, n_gt boxes with ≥ 3 rows.",
        "ρ near 1: the score ranks boxes like IoU does; near 0: NMS's ranking ignores localisation quality."),
        formats={**{c: fmt_float(3) for c in ("spearman", "kendall", "pearson", "spearman_per_gt", "divergence")},
                 "n": fmt_count, "n_gt": fmt_count}, left=("score column",), colors=palette)
    table.csv = frame
    return table


def table1_tables(views, config, palette) -> list[Table]:
    tables = []
    for v in views:
        frame = v.analysis.table1(image_ids=v.shown_ids)
        csv = frame.reset_index()
        shown = csv.copy()
        shown["stage"] = shown["stage"].map(dict(STAGE_NAMES)).fillna(shown["stage"])
        shown = shown.rename(columns={c: f"image {c}" for c in shown.columns[2:-1]})
        table = Table(f"table1_{_slug(v.name)}", shown, (
            f"Table 1 for {v.name}: per image (the first {config.num_images} of images.parquet) and summed over all "
            "images ('all'), how many boxes meet each condition at each stage; 'rows' is the stage's size.",
            "Positive anchors: anchors with IoU > 0.5 to a ground truth; raw: every anchor's decoded box; before NMS: "
            "the candidates that entered NMS; after NMS: the kept detections. Conditions are strict '>'. IoU rule: the "
            "anchors and raw rows take a box's best IoU with a ground truth of any category (an anchor has no class "
            "yet); the before- and after-NMS rows its IoU with one of its own category (the ledger's iou). 'crowd': "
            "boxes COCOeval ignores on a crowd region of their category (left out of the correlations)."),
            formats={c: fmt_count for c in shown.columns[2:]}, left=("condition",), groups="stage")
        table.detector, table.num_shown = v.name, len(v.shown_ids)
        table.csv = csv
        tables.append(table)
    return tables


STAGE_NAMES = (("anchors", "anchors"), ("raw", "raw (every anchor's box)"), ("pre_nms", "before NMS"),
               ("post_nms", "after NMS"))


def table1_total_table(metrics, names, palette) -> Table:
    frame = counts_total_frame(metrics, names)
    return Table("table1_all", frame, (
        "Table 1 summed over every image, one column per detector: positive anchors, raw boxes of all anchors, "
        "candidates before NMS and kept boxes after NMS meeting each threshold (metrics.json 'counts').",
        "Compare down a column to see what NMS removes; across a row to compare detectors at the same stage."),
        formats={n: fmt_count for n in names}, left=("condition",), groups="stage")


def proportions_table(metrics, names, palette) -> Table:
    frame = proportions_frame(metrics, names)
    return Table("proportions", frame, (
        "Figure 2 in numbers: share of each stage's boxes meeting each condition before and after NMS, and the "
        "survival rate (after-NMS count / before-NMS count) per condition.",
        "If NMS were blind to localisation, the iou>t proportions would not drop after NMS; the paper reports "
        "~20% fewer IoU>0.5 boxes in proportion after NMS, and hardly any change for cls>0.5."),
        formats={c: fmt_percent(2) for c in CONDITIONS}, left=("quantity",), colors=palette)


def quadrant_table(views, column, palette) -> Table:
    """Boxes per quadrant of the score-IoU plane (misalign.counts.quadrant_counts), per detector and stage."""
    rows, shown_rows = [], []
    for v in views:
        frame = v.quadrants.get(column)
        if frame is None:
            continue
        for stage, row in frame.iterrows():
            if stage == "pre_nms" and not v.pre_nms:
                continue
            record = {"detector": v.name, "stage": stage, **row.to_dict()}
            rows.append(record)
            quads = [k for k in row.index if not k.startswith("frac ")]
            shown_rows.append({"detector": v.name, "stage": F.STAGE_LABELS[stage],
                               **{k: f"{int(row[k]):,} ({100 * row['frac ' + k]:.1f}%)" for k in quads}})
    short = F.SHORT[column]
    table = Table(f"quadrants_{column}", pd.DataFrame(shown_rows), (
        f"Boxes in each quadrant of the {short}–IoU plane before and after NMS: count (share of the stage).",
        f"'iou>0.5 & {short}<=0.5' is the paper's misaligned quadrant (well localised, low score); if its share "
        "drops through NMS, NMS is throwing away well-localised boxes."),
        left=("stage",), colors=palette)
    table.csv = pd.DataFrame(rows)
    return table


# ---------------------------------------------------------------------------------------------
# figures


def _figure(key, fig, explain, alt) -> Figure:
    return Figure(key=key, png=F.figure_png(fig), explain=explain, alt=alt)


def figure1_groups(views, config, palette, shown_ids) -> tuple[list[dict], list[str]]:
    groups, notes = [], []
    post_only = {v.name for v in views if not v.pre_nms}
    no_obj = [v.name for v in views if not v.has_obj]
    columns = ["cls_score"]
    if any(v.has_obj for v in views):
        columns.append("obj_score")
        if no_obj:
            notes.append(f"{', '.join(no_obj)}: no object-confidence branch (obj_score is NaN throughout), so no "
                         "obj_score panels for them.")
    else:
        notes.append("No dump has an object-confidence branch (obj_score is NaN throughout): the obj_score panels "
                     "are left out.")
    if all(v.score_is_cls for v in views):
        notes.append("score equals cls_score in every dump (NMS ranked by the class probability): the score panels "
                     "would repeat the cls_score panels and are left out.")
    else:
        columns.append("score")
    for col in columns:
        frames = {v.name: v.shown_rows for v in views if col != "obj_score" or v.has_obj}
        hists = {v.name: v.histograms[col] for v in views if col in v.histograms}
        figs = [
            per_image_figure(frames, shown_ids, col, palette, post_only, config.seed),
            _figure(f"figure1_{col}_density", F.figure_score_iou_density(hists, np.linspace(0, 1, HIST_BINS + 1), col,
                                                                          palette), (
                f"The same over every image of the split as a 2-D histogram ({HIST_BINS}×{HIST_BINS} cells, log colour "
                "scale): before NMS (top) and after NMS (bottom), one column per detector.",
                "Mass in the shaded corner = misaligned boxes; a cloud that rises to the right means the score follows "
                "localisation quality. Compare top and bottom to see which boxes NMS keeps."),
                f"{col} vs IoU density"),
        ]
        groups.append({"title": f"{col} against IoU", "notes": [], "figures": figs,
                       "table": quadrant_table(views, col, palette)})
    above_one = [v.name for v in views if v.score_above_one]
    if above_one and "score" in columns:
        notes.append(f"{', '.join(above_one)}: the NMS score exceeds 1 (CL-NMS adds a closeness term of up to its "
                     "weight to the probability); the score panels draw those boxes on their top edge (score = 1).")
    if post_only:
        notes.append(f"{', '.join(sorted(post_only))}: post-NMS only (meta.json pre_nms false, e.g. imported COCO "
                     "results): no before-NMS panels, no pre-NMS rows in Table 1, no Figure 2 or survival rates.")
    return groups, notes


def per_image_figure(frames, shown_ids, col, palette, post_only, seed) -> Figure:
    """Figure 1 per image: detectors overlaid (the paper's layout) up to MANY_DETECTORS of them; beyond
    that one row per detector, on the first MANY_DETECTORS images, kept boxes over the grey pool."""
    short = F.SHORT[col]
    why = (f"Dashed lines mark 0.5; points in the shaded corner are well localised (IoU > 0.5) but scored "
           f"{short} < 0.5 — boxes NMS tends to discard in favour of higher-scored, worse boxes.")
    if len(frames) <= MANY_DETECTORS:
        figure = F.figure_score_iou_images(frames, shown_ids, col, palette, post_only=post_only, seed=seed)
        what = (f"{col} against IoU for each candidate of {len(shown_ids)} images (the first of the split with ground "
                f"truth), before NMS (top) and after NMS (bottom); one colour per detector, like the paper's Figure 1.")
    else:
        shown_ids = list(shown_ids)[:MANY_DETECTORS]
        figure = F.figure_score_iou_images_by_detector(frames, shown_ids, col, palette, post_only=post_only, seed=seed)
        what = (f"{col} against IoU for each candidate of {len(shown_ids)} images (the first of the split with ground "
                f"truth), one row per detector ({len(frames)} are too many to overlay): every candidate before NMS in "
                "grey, the boxes NMS kept in the detector's colour.")
    return _figure(f"figure1_{col}_images", figure, (what, why), f"{col} vs IoU per image")


def figure2_figures(views, metrics, palette, config) -> list[Figure]:
    with_pre = [v for v in views if v.pre_nms]
    if not with_pre:
        return []
    names = [v.name for v in with_pre]
    proportions = {n: metrics["detectors"][n]["proportions"] for n in names}
    survival = {n: metrics["detectors"][n]["survival"] for n in names}
    per_image = {v.name: v.analysis.per_image_proportions(v.shown_ids) for v in with_pre}
    return [
        _figure("figure2_proportions", F.figure_proportions(proportions, survival, palette), (
            "Left: share of boxes meeting each condition before NMS (solid) and after NMS (dashed), over the whole "
            "split. Right: survival rate of each condition, i.e. kept boxes / pre-NMS boxes meeting it.",
            "The paper's headline: the iou>0.5 share drops through NMS while the cls>0.5 share does not — NMS "
            "selects by score, so well-localised low-score boxes are suppressed."),
            "proportions before and after NMS"),
        _figure("figure2_per_image", F.figure_proportions_per_image(per_image, palette), (
            f"Per image (the first {config.num_images}), share of boxes with cls > 0.5 (circles) and IoU > 0.5 "
            "(triangles) before NMS (solid) and after NMS (dashed), like the paper's Figure 2.",
            "A dashed triangle line below the solid one means NMS lowered the share of well-localised boxes in that "
            "image."),
            "proportions per image"),
    ]


def correlation_figure(metrics, names, palette) -> Figure:
    corr = {n: metrics["detectors"][n]["correlation"] for n in names}
    return _figure("correlation", F.figure_correlation(corr, palette), (
        "Left: Spearman ρ between each score column and IoU with its 95% bootstrap CI (over images), per detector. "
        "Right: divergence = (1 − mean per-gt Spearman ρ)/2 over ground-truth boxes with ≥ 3 candidates.",
        "ρ towards 1 and divergence towards 0 mean the score ranks a box's candidates by localisation quality; "
        "divergence 0.5 means the ranking is unrelated to IoU."),
        "correlation and divergence")


def ap_figure(metrics, names, palette) -> Figure:
    ap = {n: metrics["detectors"][n]["ap"] for n in names}
    return _figure("coco_ap", F.figure_ap(ap, palette), (
        "COCO AP (%) of each detector at a glance: overall, at IoU 0.5 and 0.75, and by object size.",
        "Bars are the numbers of the table above ×100."), "COCO AP")


# ---------------------------------------------------------------------------------------------
# counterfactual rescoring (misalign.rescore)

RANKING_LABELS = {"cls*obj": "cls·obj", "oracle_nms": "oracle_nms (IoU-guided NMS, cluster's best score)",
                  "oracle": "oracle (true IoU as ranking and score: upper bound)",
                  "actual": "actual (the dump's own output)"}


def rescoring_frame(views) -> pd.DataFrame:
    """Rows (detector, ranking): AP, AP50, AP75 (metrics.json 'rescoring', then 'actual' = its 'ap'),
    delta_AP = AP - actual AP (oracle_nms's is the AP lost to misalignment, oracle's the gap to the oracle
    ranking), kept boxes."""
    rows = []
    for v in views:
        result = v.rescoring
        for ranking, ap in [*result.rankings.items(), ("actual", result.actual)]:
            rows.append({"detector": v.name, "ranking": ranking, **ap, "delta_AP": ap["AP"] - result.actual["AP"],
                         "kept": result.num_kept.get(ranking, v.meta.get("num_kept"))})
    return pd.DataFrame(rows, columns=["detector", "ranking", "AP", "AP50", "AP75", "delta_AP", "kept"])


def rescoring_table(views, palette) -> Table:
    frame = rescoring_frame(views)
    shown = frame.assign(ranking=frame["ranking"].map(lambda r: RANKING_LABELS.get(r, r)))
    shown = shown.rename(columns={"delta_AP": "AP − actual AP", "kept": "kept boxes"})
    table = Table("rescoring", shown, (
        "Per detector (one block each, like the paper's Tables 4 and 5): COCO AP, AP50 and AP75 after re-running NMS "
        "on its pre-NMS pool ranked by each score, with the dump's own NMS threshold and max detections; "
        "alpha=a ranks by obj^a·cls^(1−a); oracle_nms keeps the best-localised box of each cluster and gives it the "
        "cluster's best detector score; oracle ranks and scores by the true IoU; the last row is the dump's actual "
        "output.",
        "The oracle_nms row's 'AP − actual AP' is the AP lost to misalignment (NMS selection only); the oracle row's "
        "is an upper bound that also fixes classification (every false positive scores 0), not misalignment. α rows "
        "above the cls row mean object confidence leads NMS to better-localised boxes than the class probability "
        "alone."),
        formats={**{k: fmt_float(3) for k in ("AP", "AP50", "AP75")}, "AP − actual AP": fmt_float(3, signed=True),
                 "kept boxes": fmt_count},
        left=("ranking",), groups="detector", colors=palette)
    table.csv = frame
    return table


def rescoring_figure(views, palette) -> Figure | None:
    # Only detectors with an α sweep: the others' cls and oracle rows are in the table.
    sweeps = {v.name: v.rescoring.rankings for v in views
              if any(key.startswith("alpha=") for key in v.rescoring.rankings)}
    if not sweeps:
        return None
    return _figure("rescoring", F.figure_rescoring(sweeps, palette), (
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


def rescoring_section(views, config, palette) -> dict | None:
    """The 'Counterfactual rescoring' section: notes on what could not be computed, the table, the α plot."""
    if not config.rescore:
        return None
    notes, obj_missing = [], {}  # obj_missing: why obj rankings were skipped -> the dumps it applies to
    for v in views:
        if v.rescoring is None:
            notes.append(f"{v.name}: not rescored, {v.rescore_note}.")
            continue
        if v.rescoring.skipped:
            obj_missing.setdefault(next(iter(v.rescoring.skipped.values())), []).append(v.name)
        if v.rescoring.settings.get("max_det_source") == "default":
            notes.append(f"{v.name}: meta.json records no max_det; NMS survivors were cut at "
                         f"{v.rescoring.settings['max_det']} per image (COCO's maxDets).")
    for reason, names in obj_missing.items():  # one note per reason: a zoo has many models without the branch
        notes.append(f"{', '.join(names)}: {reason}, so only the cls, oracle_nms and oracle rankings are "
                     "computed (no obj, cls·obj or α rows, no curve in the plot).")
    rescored = [v for v in views if v.rescoring is not None]
    section = {"notes": notes, "table": None, "figure": None, "alphas": ", ".join(f"{a:g}" for a in config.alphas),
               "thresh": None if config.rescore_thresh is None else f"{config.rescore_thresh:g}"}
    if not rescored:
        notes.append("No dump could be rescored, so this section has no table and no plot.")
        return section
    section["table"] = rescoring_table(rescored, palette)
    section["figure"] = rescoring_figure(rescored, palette)
    if section["figure"] is None:
        notes.append("No rescored dump has obj_score, so there is no α sweep to plot.")
    return section


# ---------------------------------------------------------------------------------------------
# provenance


def provenance_table(views, config, gt_path, palette) -> Table:
    rows = []
    for v in views:
        pp = v.meta.get("postprocess") or {}
        det = v.meta.get("detector") or {}
        rows.append({
            "detector": v.name, "dump": str(v.folder), "model": det.get("name") if isinstance(det, dict) else det,
            "split": _dataset(v.meta).get("split"), "pre-NMS pool": "yes" if v.pre_nms else "no (post-NMS only)",
            "obj_score": "yes" if v.has_obj else "no",
            "score_thresh": pp.get("score_thresh"), "topk": pp.get("topk"), "nms_thresh": pp.get("nms_thresh"),
            "max_det": pp.get("max_det"), "score formula": pp.get("score_formula"), "alpha": pp.get("alpha"),
            "images": v.meta.get("num_images"), "candidates": v.meta.get("num_candidates"),
            "kept": v.meta.get("num_kept"), "AP backend": v.analysis.settings.get("ap_backend"),
            "min_iou": config.min_iou, "bootstrap B": config.bootstrap, "seed": config.seed,
            "created": v.meta.get("created"), "checkpoint sha256": (v.meta.get("checkpoint_sha256") or "–")[:12],
        })
    frame = pd.DataFrame(rows)
    text_cols = ("dump", "model", "split", "pre-NMS pool", "obj_score", "score formula", "AP backend", "created",
                 "checkpoint sha256")
    return Table("provenance", frame, (
        "Where each detector's numbers come from: the dump folder, its model, split and post-processing settings "
        "(from meta.json), its size, and the report's own parameters.",
        f"Ground truth: {gt_path}. Expand a dump below for its full meta.json."),
        formats={"images": fmt_count, "candidates": fmt_count, "kept": fmt_count, "alpha": lambda v: f"{v:g}",
                 "score_thresh": lambda v: f"{v:g}", "nms_thresh": lambda v: f"{v:g}", "min_iou": lambda v: f"{v:g}"},
        left=text_cols, colors=palette)


# ---------------------------------------------------------------------------------------------
# the report


BOOTSTRAP_METHOD_TEXT = {
    "exact": "exact replicates: Spearman ρ of each resample, its rows repeated as often as their image was drawn",
    "linear": "linearised replicates: for each resample, ρ plus the sum over images of (times drawn − 1) × the "
              "derivative of ρ with respect to that image's weight, the first-order term of the exact replicate "
              "(Efron's linear bootstrap), used on pools of more than 20 M rows × resamples; on a COCO-sized pool "
              "it differs from the exact replicate by under 1% of the replicates' spread",
}


def bootstrap_method_text(views) -> str:
    """How the Spearman replicates were computed, for the page (per detector when they differ)."""
    used = {v.name: v.analysis.settings.get("bootstrap_method") or [] for v in views}
    kinds = sorted({m for methods in used.values() for m in methods})
    if not kinds:
        return "no replicates"
    if len(kinds) == 1:
        return BOOTSTRAP_METHOD_TEXT[kinds[0]]
    return "; ".join(f"{kind} for {', '.join(n for n, m in used.items() if kind in m)}: {BOOTSTRAP_METHOD_TEXT[kind]}"
                     for kind in kinds)


def build_context(views, metrics, config, gt_path) -> dict:
    import datetime as dt

    from misalign import __version__

    names = [v.name for v in views]
    palette = F.detector_palette(names)
    shown_ids = views[0].shown_ids.tolist()
    global_notes, correlation_notes = [], []
    if config.bootstrap == 0:
        global_notes.append("--bootstrap 0: no bootstrap resamples, so no confidence intervals (shown as –).")
    post_only = [v.name for v in views if not v.pre_nms]
    if post_only:
        correlation_notes.append(f"{', '.join(post_only)}: post-NMS only — correlations are over its kept boxes (the only "
                                 "pool it has), so they are not comparable with the pre-NMS pools of the others.")
    before_after = None
    if config.before_after_nms:
        groups, notes = figure1_groups(views, config, palette, shown_ids)
        no_raw = [v.name for v in views if not v.has_raw]
        if no_raw:
            notes.append(f"{', '.join(no_raw)}: no raw_counts and no anchor counts in the dump: Table 1's positive-anchor "
                         "and raw rows are absent for them.")
        fig2 = figure2_figures(views, metrics, palette, config)
        if not fig2:
            notes.append("No dump has a pre-NMS stage: Figure 2 (proportions before/after NMS) and survival rates "
                         "cannot be drawn.")
        before_after = {
            "notes": notes, "figure1": groups,
            "table1_total": table1_total_table(metrics, names, palette),
            "table1": table1_tables(views, config, palette),
            "figure2": fig2,
            "proportions": proportions_table(metrics, names, palette) if fig2 else None,
        }
    gt_label = str(gt_path)
    return {
        "version": __version__, "names": names, "palette": palette,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "gt_label": gt_label, "num_images": len(views[0].analysis.image_ids),
        "dumps": {v.name: str(v.folder) for v in views},
        "global_notes": global_notes,
        "summary": summary_table(views, palette, config.rescore),
        "differences": differences_table(views, palette),
        "before_after": before_after,
        "correlation": {"notes": correlation_notes, "figure": correlation_figure(metrics, names, palette),
                        "table": correlation_table(metrics, names, palette)},
        "rescoring": rescoring_section(views, config, palette),
        "coco": {"table": coco_table(metrics, names, palette), "figure": ap_figure(metrics, names, palette)},
        "provenance": {"table": provenance_table(views, config, gt_path, palette),
                       "meta": [{"name": v.name, "path": str(v.folder), "json": meta_json_text(v.meta)} for v in views]},
        "params": {"min_iou": config.min_iou, "bootstrap": config.bootstrap, "seed": config.seed,
                   "num_images": config.num_images, "before_after": config.before_after_nms,
                   "min_candidates": views[0].analysis.settings.get("min_count", 3), "rescore": config.rescore,
                   "bootstrap_method_text": bootstrap_method_text(views),
                   "rescore_thresh": None if config.rescore_thresh is None else f"{config.rescore_thresh:g}"},
    }


def _collect(context) -> tuple[list[Figure], list[Table]]:
    figures, tables = [], []

    def walk(value):
        if isinstance(value, Figure):
            figures.append(value)
        elif isinstance(value, Table):
            tables.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(context)
    return figures, tables


def write_report(dumps, out, **options) -> Path:
    """Analyse `dumps` (ledger folders) and write the report folder `out`; returns out/index.html.

    options: the ReportConfig fields (names, gt, before_after_nms, min_iou, num_images, bootstrap,
    seed, rescore, alphas, rescore_thresh). InputError (one line) for bad input; `out` is replaced only when the report
    is complete.
    """
    from misalign.io import atomic_dir
    from misalign.metrics import metrics_document

    config = ReportConfig(**options)
    dumps = [Path(d) for d in dumps]
    _check_options(config, dumps)
    views, gt_path = analyse_dumps(dumps, config)
    metrics = _json_safe(metrics_document({v.name: v.analysis for v in views}))
    context = build_context(views, metrics, config, gt_path)
    html = render_page(context)
    figures, tables = _collect(context)
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "figures").mkdir()
        (tmp / "tables").mkdir()
        for fig in figures:
            (tmp / "figures" / f"{fig.key}.png").write_bytes(fig.png)
        for table in tables:
            frame = getattr(table, "csv", None)
            (frame if frame is not None else table.frame).to_csv(tmp / "tables" / f"{table.key}.csv", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        (tmp / "index.html").write_text(html, encoding="utf-8")
    return out / "index.html"
