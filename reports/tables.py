"""The report's tables: misalign.compare's frames (what tables/*.csv hold), formatted for the page.

Every function here rearranges or formats numbers it is given; none computes one. A `Table` keeps
the page's frame (`frame`: text such as '0.412 [0.398, 0.430]') and the CSV's (`csv`: the numbers,
from `CompareResult.tables`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from misalign.counts import CONDITION_KEYS, TABLE1_STAGE_TITLES
from misalign.training import ALIGNMENT_BATCHES

from . import figures as F




@dataclass
class Table:
    key: str  # CSV stem under tables/ and the HTML id
    frame: pd.DataFrame  # what the page shows (before `formats`)
    explain: tuple[str, str]  # two lines: what it shows, how to read it
    formats: dict = field(default_factory=dict)  # column -> format function for the page
    left: tuple = ()  # columns aligned left (text)
    colors: dict = field(default_factory=dict)  # first-cell value -> swatch colour
    groups: str | None = None  # column whose changes start a group row (not shown as a column)
    detector: str | None = None  # Table 1 per detector: its name
    num_shown: int = 0  # Table 1 per detector: images shown one by one

    def context(self) -> dict:
        """The dict the template's `table` macro reads."""
        columns = [c for c in self.frame.columns if c != self.groups]
        rows, current = [], object()
        for record in self.frame.to_dict("records"):
            if self.groups is not None and record[self.groups] != current:
                current = record[self.groups]
                rows.append({"group": current})
            cells = [_cell(record[c], self.formats.get(c)) for c in columns]
            rows.append({"cells": cells, "color": self.colors.get(record[columns[0]])})
        return {"key": self.key, "columns": columns, "rows": rows, "left": set(self.left) | {columns[0]},
                "explain": self.explain, "detector": self.detector, "num_shown": self.num_shown}


def _cell(value, fmt) -> dict:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"text": "–", "cls": ""}
    if fmt is not None:
        text = fmt(value)
        cls = "neg" if getattr(fmt, "signed", False) and value < 0 else ("pos" if getattr(fmt, "signed", False) and value > 0 else "")
        if hasattr(fmt, "css"):  # a format that marks some values (e.g. a flagged level)
            cls = fmt.css(value)
        return {"text": text, "cls": cls}
    if isinstance(value, (float, np.floating)):
        return {"text": f"{value:.3f}", "cls": ""}
    if isinstance(value, (int, np.integer)):
        return {"text": f"{value:,}", "cls": ""}
    return {"text": str(value), "cls": ""}


def fmt_float(digits: int = 3, signed: bool = False):
    def fmt(v):
        return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    fmt.signed = signed
    return fmt


def fmt_percent(digits: int = 1, signed: bool = False):
    def fmt(v):
        return f"{100 * v:+.{digits}f}%" if signed else f"{100 * v:.{digits}f}%"
    fmt.signed = signed
    return fmt


def fmt_count(v) -> str:
    return f"{int(v):,}"


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


# ---------------------------------------------------------------------------------------------
# one function per table; `result` is a misalign.compare.CompareResult


def summary_table(result, palette) -> Table:
    frame = result.tables["summary"]
    rescore = result.settings.rescore
    shown = pd.DataFrame({"detector": frame["detector"]})
    for key in ("AP", "AP50", "AP75"):
        shown[key] = frame[key]
    if rescore:
        shown["AP lost to misalignment"] = frame["ap_lost_to_misalignment"]
    shown["ρ(score, IoU) [95% CI]"] = _with_ci(frame, "spearman", "spearman_lo", "spearman_hi", "")
    shown["divergence [95% CI]"] = _with_ci(frame, "divergence", "divergence_lo", "divergence_hi", "")
    shown["survival iou>0.5 [95% CI]"] = _with_ci(frame, "survival iou>0.5", "survival iou>0.5 lo",
                                                    "survival iou>0.5 hi", "", digits=1, percent=True)
    shown["survival cls>0.5 [95% CI]"] = _with_ci(frame, "survival cls>0.5", "survival cls>0.5 lo",
                                                    "survival cls>0.5 hi", "", digits=1, percent=True)
    engines = sorted({f"{e['name']} {e['version']}" for e in (d.analysis.metrics["ap_engine"] for d in result.detectors)})
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
    return table


def differences_table(result, palette) -> Table | None:
    frame = result.tables.get("differences")
    if frame is None:
        return None
    reference = result.names[0]
    paired = "Paired = both dumps hold the same images and used the same seed and B, so each resample drew the same " \
             "images for both; a CI that excludes 0 is a difference beyond resampling noise (AP has no CI)."
    if len(result.detectors) > F.MANY_DETECTORS:
        return Table("differences", _differences_wide(frame), (
            f"Each detector against the reference {reference} (the first dump), one row per detector: each cell is "
            "delta = detector − reference of that quantity with its 95% percentile bootstrap CI; – where the quantity "
            "does not apply. tables/differences.csv has the values themselves.", paired), left=("paired",),
            colors=palette)
    shown = frame[["detector", "reference", "quantity", "value", "reference_value", "delta"]].copy()
    shown["95% CI of delta"] = [_interval_text(lo, hi) or "–" for lo, hi in zip(frame["ci95_lo"], frame["ci95_hi"])]
    shown["paired"] = frame["paired"].map({True: "yes", False: "no"})
    return Table("differences", shown, (
        f"Each detector against the reference {reference} (the first dump): delta = detector − reference "
        "for AP, Spearman ρ and divergence of each score column, and survival rates, with percentile bootstrap CIs.",
        paired),
        formats={"value": fmt_float(3), "reference_value": fmt_float(3), "delta": fmt_float(3, signed=True)},
        left=("reference", "quantity", "paired"), colors=palette)


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


def coco_table(result, palette) -> Table:
    frame = result.tables["coco_ap"]
    return Table("coco_ap", frame, (
        "pycocotools' twelve COCOeval bbox numbers (maxDets 1/10/100) of each detector's kept boxes ranked by score, "
        "over every image of the dump; −1 means the split has no ground truth of that size.",
        "AP averages IoU thresholds 0.5:0.95; AP50/AP75 at one threshold; s/m/l: small/medium/large objects; "
        "ARk: recall with at most k detections per image."),
        formats={c: fmt_float(3) for c in frame.columns[1:]}, colors=palette)


def correlation_table(result, palette) -> Table:
    frame = result.tables["correlation"]
    shown = frame[["detector", "score column", "spearman"]].copy()
    shown["95% CI of ρ"] = [_interval_text(lo, hi) or "–" for lo, hi in zip(frame["spearman_ci_lo"], frame["spearman_ci_hi"])]
    for col in ("kendall", "pearson", "spearman_per_gt", "divergence", "n", "n_gt"):
        shown[col] = frame[col]
    return Table("correlation", shown, (
        "Per detector and score column: Spearman ρ (with its bootstrap CI), Kendall τ-b and Pearson r between the "
        "score and IoU over the pool; mean per-gt Spearman and the divergence; n pool rows, n_gt boxes with ≥ 3 rows.",
        "ρ near 1: the score ranks boxes like IoU does; near 0: NMS's ranking ignores localisation quality."),
        formats={**{c: fmt_float(3) for c in ("spearman", "kendall", "pearson", "spearman_per_gt", "divergence")},
                 "n": fmt_count, "n_gt": fmt_count}, left=("score column",), colors=palette)


def table1_tables(result, palette) -> list[Table]:
    from misalign.compare import slug

    tables = []
    for d in result.detectors:
        key = f"table1_{slug(d.name)}"
        shown = result.tables[key].copy()
        shown["stage"] = shown["stage"].map(TABLE1_STAGE_TITLES).fillna(shown["stage"])
        shown = shown.rename(columns={c: f"image {c}" for c in shown.columns[2:-1]})
        table = Table(key, shown, (
            f"Table 1 for {d.name}: per image (the first {result.settings.num_images} of images.parquet) and summed "
            "over all images ('all'), how many boxes meet each condition at each stage; 'rows' is the stage's size.",
            "Positive anchors: anchors with IoU > 0.5 to a ground truth; raw: every anchor's decoded box; before NMS: "
            "the candidates that entered NMS; after NMS: the kept detections. Conditions are strict '>'. IoU rule: the "
            "anchors and raw rows take a box's best IoU with a ground truth of any category (an anchor has no class "
            "yet); the before- and after-NMS rows its IoU with one of its own category (the ledger's iou). 'crowd': "
            "boxes COCOeval ignores on a crowd region of their category (left out of the correlations)."),
            formats={c: fmt_count for c in shown.columns[2:]}, left=("condition",), groups="stage")
        table.detector, table.num_shown = d.name, len(d.shown_ids)
        tables.append(table)
    return tables


def table1_total_table(result, palette) -> Table:
    return Table("table1_all", result.tables["table1_all"], (
        "Table 1 summed over every image, one column per detector: positive anchors, raw boxes of all anchors, "
        "candidates before NMS and kept boxes after NMS meeting each threshold (metrics.json 'counts').",
        "Compare down a column to see what NMS removes; across a row to compare detectors at the same stage."),
        formats={n: fmt_count for n in result.names}, left=("condition",), groups="stage")


def proportions_table(result, palette) -> Table:
    return Table("proportions", result.tables["proportions"], (
        "Figure 2 in numbers: share of each stage's boxes meeting each condition before and after NMS, and the "
        "survival rate (after-NMS count / before-NMS count) per condition.",
        "If NMS were blind to localisation, the iou>t proportions would not drop after NMS; the paper reports "
        "~20% fewer IoU>0.5 boxes in proportion after NMS, and hardly any change for cls>0.5."),
        formats={c: fmt_percent(2) for c in CONDITION_KEYS}, left=("quantity",), colors=palette)


def quadrant_table(result, column, palette) -> Table:
    """Boxes per quadrant of the score-IoU plane (misalign.counts.quadrant_counts), per detector and stage."""
    frame = result.tables[f"quadrants_{column}"]
    quads = [k for k in frame.columns if k not in ("detector", "stage") and not k.startswith("frac ")]
    shown = pd.DataFrame([{"detector": row["detector"], "stage": F.STAGE_LABELS[row["stage"]],
                           **{k: f"{int(row[k]):,} ({100 * row['frac ' + k]:.1f}%)" for k in quads}}
                          for row in frame.to_dict("records")])
    short = F.SHORT[column]
    return Table(f"quadrants_{column}", shown, (
        f"Boxes in each quadrant of the {short}–IoU plane before and after NMS: count (share of the stage).",
        f"'iou>0.5 & {short}<=0.5' is the paper's misaligned quadrant (well localised, low score); if its share "
        "drops through NMS, NMS is throwing away well-localised boxes."),
        left=("stage",), colors=palette)


RANKING_LABELS = {"cls*obj": "cls·obj", "oracle_nms": "oracle_nms (IoU-guided NMS, cluster's best score)",
                  "oracle": "oracle (true IoU as ranking and score: upper bound)",
                  "actual": "actual (the dump's own output)"}


def rescoring_table(result, palette) -> Table:
    frame = result.tables["rescoring"]
    shown = frame.assign(ranking=frame["ranking"].map(lambda r: RANKING_LABELS.get(r, r)))
    shown = shown.rename(columns={"delta_AP": "AP − actual AP", "kept": "kept boxes"})
    return Table("rescoring", shown, (
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


def fmt_flag(flagged) -> str:
    return "⚠ score ≠ formula" if flagged else ""


fmt_flag.css = lambda flagged: "neg" if flagged else ""


def levels_table(result, palette) -> Table:
    """Per detector and FPN level (tables/levels.csv): candidates, kept, ρ(score, IoU), formula share, flag."""
    frame = result.tables["levels"]
    shown = frame.rename(columns={"n": "candidates", "spearman": "ρ(score, IoU)", "formula": "dump's formula",
                                  "formula_share": "score = formula", "flagged": "flag"})
    return Table("levels", shown, (
        "Per detector and FPN level (P3 = stride 8 … P7 = stride 128; 'unknown' for ledgers without levels): its "
        f"candidates before NMS, how many were kept, the Spearman ρ between score and IoU over its candidates with "
        f"IoU ≥ min_iou ({result.settings.min_iou:g}), and the share of its candidates whose score equals the dump's "
        "own score formula (meta.json postprocess) applied to their cls_score and obj_score, within 8 float32 ulps.",
        "A share below 100% means the level was scored by another rule than the one the dump records (flagged): with "
        "conf_skip_p7, the original RetinaNet-Conf code's rule, the levels with at most top-k anchors rank by "
        "cls^(1−α) without the obj factor, a share of 0%. – : no formula misalign can apply (imports, other "
        "frameworks) or fewer than 2 pool rows."),
        formats={"candidates": fmt_count, "kept": fmt_count, "ρ(score, IoU)": fmt_float(3),
                 "score = formula": fmt_percent(1), "flag": fmt_flag},
        left=("level", "dump's formula", "flag"), colors=palette)


def training_table(result, palette) -> Table | None:
    """The last logged epoch of each dump's training run (tables/training.csv has every epoch)."""
    frame = result.tables["training"]
    if not len(frame):
        return None
    last = frame.groupby("detector", sort=False).tail(1)
    shown = last[["detector", "epoch", "step", "loss", "align_spearman", "obj_iou_mae"]].rename(
        columns={"epoch": "epochs", "step": "steps", "loss": "loss (last epoch's mean)",
                 "align_spearman": "ρ(cls of true class, IoU)", "obj_iou_mae": "mean |obj − IoU|"})
    return Table("training", shown, (
        "Each dump's training run at its last epoch: epochs and optimizer steps, the epoch's mean loss, and the "
        f"alignment logged at its end (over the positive anchors of its last {ALIGNMENT_BATCHES} batches).",
        "– : not logged (a log.csv written before these columns existed, or no objectness branch for the error). "
        "tables/training.csv has every epoch."),
        formats={"epochs": fmt_count, "steps": fmt_count, "loss (last epoch's mean)": fmt_float(4),
                 "ρ(cls of true class, IoU)": fmt_float(3), "mean |obj − IoU|": fmt_float(3)}, colors=palette)


def provenance_table(result, palette) -> Table:
    text_cols = ("dump", "model", "split", "pre-NMS pool", "obj_score", "score formula", "AP backend", "created",
                 "checkpoint sha256")
    return Table("provenance", result.tables["provenance"], (
        "Where each detector's numbers come from: the dump folder, its model, split and post-processing settings "
        "(from meta.json), its size, and the report's own parameters.",
        f"Ground truth: {result.gt_path}. Expand a dump below for its full meta.json."),
        formats={"images": fmt_count, "candidates": fmt_count, "kept": fmt_count, "alpha": lambda v: f"{v:g}",
                 "score_thresh": lambda v: f"{v:g}", "nms_thresh": lambda v: f"{v:g}", "min_iou": lambda v: f"{v:g}"},
        left=text_cols, colors=palette)


def suppression_table(result, palette) -> Table:
    """metrics.json `suppression` per detector (tables/suppression.csv)."""
    frame = result.tables["suppression"].rename(columns={"mean_iou_gap": "mean IoU gap"})
    return Table("suppression", frame, (
        "Per detector: ground truths whose best candidate has IoU ≥ 0.5 (eligible), those among them whose best "
        "candidate NMS suppressed while the best kept box is ≥ 0.1 IoU worse (losses), their share (rate), and the "
        "mean of best IoU − best kept IoU over the losses (metrics.json 'suppression').",
        "A high rate means NMS often keeps a worse box of an object the detector had found well: the score ranked "
        "the better box below it. – : a post-NMS-only dump records no suppressed box."),
        formats={"losses": fmt_count, "eligible": fmt_count, "rate": fmt_percent(1), "mean IoU gap": fmt_float(3)},
        colors=palette)


def _suppressor_text(row) -> str | None:
    if row["best_fate"] != "suppressed":
        return None
    return "the kept box" if row["suppressed_by_kept"] else f"another box (cand {row['suppressed_by']})"


def gallery_table(result, palette) -> Table:
    """The gallery's cases (tables/gallery.csv): a group per ground truth, a row per detector."""
    frame = result.tables["gallery"]
    shown = pd.DataFrame({
        "case": [f"#{r + 1} · gt {g}{f' ({c})' if c else ''} · image {i}"
                 for r, g, c, i in zip(frame["rank"], frame["gt_id"], frame["category"], frame["image_id"])],
        "detector": frame["detector"], "best IoU": frame["best_any"],
        "kept score": frame["kept_score"], "kept IoU": frame["kept_iou"],
        "suppressed score": frame["suppressed_score"], "suppressed IoU": frame["suppressed_iou"],
        "gap": frame["gap"], "loss": frame["loss"].map({True: "yes", False: "no"}),
        "best box": frame["best_fate"], "suppressed by": [_suppressor_text(r) for r in frame.to_dict("records")],
    })
    return Table("gallery", shown, (
        "The gallery's ground truths, one group each: per detector the IoU of its best candidate, the score and IoU "
        "of the box NMS kept (the kept candidate with the highest IoU) and of the better box it suppressed, the gap "
        "(best IoU − best kept IoU) and whether it is a loss.",
        "'best box': what became of the best candidate (kept; suppressed by NMS; cut by max_det after surviving NMS; "
        "none with IoU ≥ 0.5); 'suppressed by': the box whose survival suppressed it."),
        formats={c: fmt_float(3) for c in ("best IoU", "kept score", "kept IoU", "suppressed score", "suppressed IoU",
                                           "gap")},
        left=("loss", "best box", "suppressed by"), colors=palette, groups="case")
