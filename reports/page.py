"""`misalign report`: ask `misalign.compare` for every number, render the page, write the report folder.

    write_report(["dumps/base", "dumps/conf"], "reports/cmp", before_after_nms=True) -> Path

The folder holds index.html (self-contained), metrics.json and tables/*.csv (written by
`CompareResult.write`, unchanged) and figures/*.png. It is written into a temporary folder that
replaces `out` only once everything is written (`misalign.io.atomic_dir`). The page is one HTML
file rendered from `templates/report.html.j2`: inline CSS, figures as base64 PNG data URIs, no
script, no network. The notes here turn misalign's flags into sentences; no number is made here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from misalign.compare import CompareSettings
from misalign.training import ALIGNMENT_COLUMNS

from . import errors as E
from . import figures as F
from . import gallery as G
from . import tables as T
from .figures import Figure
from .tables import Table

log = logging.getLogger(__name__)


@dataclass
class ReportConfig(CompareSettings):
    """The report's options: misalign.compare's settings (names, gt, before_after_nms, min_iou,
    num_images, bootstrap, seed, rescore, alphas, rescore_thresh); the report adds none."""


# ---------------------------------------------------------------------------------------------
# sections


def before_after_section(result, palette) -> dict | None:
    """Figure 1 (per score column, with its quadrant table), Table 1, Figure 2 and their notes."""
    if not result.settings.before_after_nms:
        return None
    notes, columns = [], result.figure1_columns
    if "obj_score" in columns and result.without_obj:
        notes.append(f"{', '.join(result.without_obj)}: no object-confidence branch (obj_score is NaN throughout), so "
                     "no obj_score panels for them.")
    if "obj_score" not in columns:
        notes.append("No dump has an object-confidence branch (obj_score is NaN throughout): the obj_score panels "
                     "are left out.")
    if result.score_is_cls_everywhere:
        notes.append("score equals cls_score in every dump (NMS ranked by the class probability): the score panels "
                     "would repeat the cls_score panels and are left out.")
    groups = [{"title": f"{col} against IoU", "notes": [], "figures": F.figure1_figures(result, col, palette),
               "table": T.quadrant_table(result, col, palette)} for col in columns]
    if result.score_above_one and "score" in columns:
        notes.append(f"{', '.join(result.score_above_one)}: the NMS score exceeds 1 (CL-NMS adds a closeness term of "
                     "up to its weight to the probability); the score panels draw those boxes on their top edge "
                     "(score = 1).")
    if result.post_nms_only:
        notes.append(f"{', '.join(sorted(result.post_nms_only))}: post-NMS only (meta.json pre_nms false, e.g. imported "
                     "COCO results): no before-NMS panels, no pre-NMS rows in Table 1, no Figure 2 or survival rates.")
    if result.without_raw:
        notes.append(f"{', '.join(result.without_raw)}: no raw_counts and no anchor counts in the dump: Table 1's "
                     "positive-anchor and raw rows are absent for them.")
    fig2 = F.figure2_figures(result, palette)
    if not fig2:
        notes.append("No dump has a pre-NMS stage: Figure 2 (proportions before/after NMS) and survival rates "
                     "cannot be drawn.")
    return {
        "notes": notes, "figure1": groups,
        "table1_total": T.table1_total_table(result, palette),
        "table1": T.table1_tables(result, palette),
        "figure2": fig2,
        "proportions": T.proportions_table(result, palette) if fig2 else None,
    }


def rescoring_section(result, palette) -> dict | None:
    """The 'Counterfactual rescoring' section: notes on what could not be computed, the table, the α plot."""
    settings = result.settings
    if not settings.rescore:
        return None
    not_rescored, max_det = result.not_rescored, result.max_det_defaulted
    notes = []
    for name in result.names:  # in dump order
        if name in not_rescored:
            notes.append(f"{name}: not rescored, {not_rescored[name]}.")
        elif name in max_det:
            notes.append(f"{name}: meta.json records no max_det; NMS survivors were cut at {max_det[name]} per image "
                         "(COCO's maxDets).")
    for reason, names in result.obj_rankings_skipped.items():  # one note per reason: a zoo has many models without the branch
        notes.append(f"{', '.join(names)}: {reason}, so only the cls, oracle_nms and oracle rankings are "
                     "computed (no obj, cls·obj or α rows, no curve in the plot).")
    section = {"notes": notes, "table": None, "figure": None, "alphas": ", ".join(f"{a:g}" for a in settings.alphas),
               "thresh": None if settings.rescore_thresh is None else f"{settings.rescore_thresh:g}"}
    if not result.rescored:
        notes.append("No dump could be rescored, so this section has no table and no plot.")
        return section
    section["table"] = T.rescoring_table(result, palette)
    section["figure"] = F.rescoring_section_figure(result, palette)
    if section["figure"] is None:
        notes.append("No rescored dump has obj_score, so there is no α sweep to plot.")
    return section


def gallery_section(result, palette) -> dict:
    """The 'Suppression losses' section: the metrics table, the gallery of crops, its cases table, notes."""
    notes = []
    if result.post_nms_only:
        notes.append(f"{', '.join(result.post_nms_only)}: post-NMS only (meta.json pre_nms false): no suppressed box "
                     "is recorded, so no suppression losses (– in the table, null in metrics.json) and no gallery panels.")
    with_cases = [d for d in result.detectors if d.gallery is not None]
    cases = with_cases[0].gallery if with_cases else None
    if cases is not None and not len(cases):
        notes.append(f"{with_cases[0].name} has no suppression loss: the gallery, made of its worst ones, is empty.")
    figure = G.gallery_section_figure(result, palette)
    if cases is not None and len(cases) and figure is None:
        unrecorded = [d.name for d in with_cases if d.gallery["image_file"].isna().all()]
        if unrecorded:
            notes.append(f"{', '.join(unrecorded)}: meta.json records no image folder (dataset.images), as for a ledger "
                         "made elsewhere, so the gallery has no image crops; its cases are in the table below.")
        else:
            notes.append(f"The image files are not found (first: {cases['image_file'].iloc[0]}), so the gallery has no "
                         "image crops; its cases are in the table below.")
    return {"notes": notes, "table": T.suppression_table(result, palette), "figure": figure,
            "cases": T.gallery_table(result, palette) if cases is not None and len(cases) else None,
            "reference": with_cases[0].name if with_cases else None}


def levels_section(result, palette) -> dict:
    """The per-level audit: notes on flagged levels and on what the dumps do not record, and the table."""
    notes = []
    for name, labels in result.flagged_levels.items():
        d = next(d for d in result.detectors if d.name == name)
        post = d.meta.get("postprocess") or {}
        why = (" meta.json postprocess.conf_skip_p7 is true: the original RetinaNet-Conf code's rule, under which "
               "a level with at most top-k anchors ranks by cls^(1−α) without the obj factor."
               if post.get("conf_skip_p7") else " These levels were scored by another rule than the one recorded.")
        notes.append(f"{name}: on {', '.join(labels)} the score is not the dump's own formula "
                     f"({post.get('score_formula')!s}) on some or all rows (flagged in the table).{why}")
    no_formula = [d.name for d in result.detectors if not _has_formula(d)]
    if no_formula:
        notes.append(f"{', '.join(no_formula)}: meta.json records no score formula misalign can apply (alpha, or "
                     "score_formula 'cls'), so the formula share is –.")
    unknown = [n for n in result.names if "unknown" in (result.metrics["detectors"][n].get("per_level") or {})]
    if unknown:
        notes.append(f"{', '.join(unknown)}: the ledger does not record FPN levels (level −1, e.g. imports): "
                     "its candidates form one 'unknown' row.")
    return {"notes": notes, "table": T.levels_table(result, palette)}


def _has_formula(detector) -> bool:
    from misalign.levels import score_formula

    return score_formula(detector.meta) is not None


def training_section(result, palette) -> dict:
    """Training curves from each dump's checkpoint folder (log.csv), with notes on the dumps without them."""
    notes = []
    no_checkpoint = [d.name for d in result.detectors if d.training is None]
    if no_checkpoint:
        notes.append(f"{', '.join(no_checkpoint)}: meta.json names no checkpoint, so there is no log.csv to read.")
    old = [d.name for d in result.detectors if d.training is not None and d.training.available
           and not d.training.has_alignment]
    if old:  # a zoo trained before the columns existed: one note, not one per run
        notes.append(f"{', '.join(old)}: log.csv has no {' or '.join(ALIGNMENT_COLUMNS)} column (written before they "
                     "were logged): loss curves only.")
    for d in result.detectors:
        if d.training is not None and not d.training.available:
            notes.append(f"{d.name}: {d.training.note}: no training curves.")
    figure = F.training_section_figure(result, palette)
    if figure is None:
        notes.append("No dump has a readable log.csv beside its checkpoint: no training curves.")
    return {"notes": notes, "figure": figure, "table": T.training_table(result, palette)}


BOOTSTRAP_METHOD_TEXT = {
    "exact": "exact replicates: Spearman ρ of each resample, its rows repeated as often as their image was drawn",
    "linear": "linearised replicates: for each resample, ρ plus the sum over images of (times drawn − 1) × the "
              "derivative of ρ with respect to that image's weight, the first-order term of the exact replicate "
              "(Efron's linear bootstrap), used on pools of more than 20 M rows × resamples; on a COCO-sized pool "
              "it differs from the exact replicate by under 1% of the replicates' spread",
}


def bootstrap_method_text(result) -> str:
    """How the Spearman replicates were computed, for the page (per detector when they differ)."""
    used = {d.name: d.analysis.settings.get("bootstrap_method") or [] for d in result.detectors}
    kinds = sorted({m for methods in used.values() for m in methods})
    if not kinds:
        return "no replicates"
    if len(kinds) == 1:
        return BOOTSTRAP_METHOD_TEXT[kinds[0]]
    return "; ".join(f"{kind} for {', '.join(n for n, m in used.items() if kind in m)}: {BOOTSTRAP_METHOD_TEXT[kind]}"
                     for kind in kinds)


def meta_json_text(meta: dict) -> str:
    return json.dumps(meta, indent=2, sort_keys=False, default=str)


def build_context(result) -> dict:
    """The template's context: plain values, Figure and Table objects."""
    import datetime as dt

    from misalign import __version__

    settings, names = result.settings, result.names
    palette = F.detector_palette(names)
    first = result.detectors[0]
    global_notes, correlation_notes = [], []
    if settings.bootstrap == 0:
        global_notes.append("--bootstrap 0: no bootstrap resamples, so no confidence intervals (shown as –).")
    if result.post_nms_only:
        correlation_notes.append(f"{', '.join(result.post_nms_only)}: post-NMS only — correlations are over its kept "
                                 "boxes (the only pool it has), so they are not comparable with the pre-NMS pools of "
                                 "the others.")
    return {
        "version": __version__, "names": names, "palette": palette,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "gt_label": str(result.gt_path), "num_images": len(first.analysis.image_ids),
        "dumps": {d.name: str(d.folder) for d in result.detectors},
        "global_notes": global_notes,
        "summary": T.summary_table(result, palette),
        "differences": T.differences_table(result, palette),
        "before_after": before_after_section(result, palette),
        "correlation": {"notes": correlation_notes, "figure": F.correlation_section_figure(result, palette),
                        "table": T.correlation_table(result, palette)},
        "rescoring": rescoring_section(result, palette),
        "gallery": gallery_section(result, palette),
        "errors": E.errors_section(result, palette),
        "calibration": E.calibration_section(result, palette),
        "levels": levels_section(result, palette),
        "training": training_section(result, palette),
        "coco": {"table": T.coco_table(result, palette), "figure": F.ap_section_figure(result, palette)},
        "provenance": {"table": T.provenance_table(result, palette),
                       "meta": [{"name": d.name, "path": str(d.folder), "json": meta_json_text(d.meta)}
                                for d in result.detectors]},
        "params": {"min_iou": settings.min_iou, "bootstrap": settings.bootstrap, "seed": settings.seed,
                   "num_images": settings.num_images, "before_after": settings.before_after_nms,
                   "min_candidates": first.analysis.settings.get("min_count", 3), "rescore": settings.rescore,
                   "bootstrap_method_text": bootstrap_method_text(result),
                   "rescore_thresh": None if settings.rescore_thresh is None else f"{settings.rescore_thresh:g}"},
    }


# ---------------------------------------------------------------------------------------------
# the page


def template_environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
    )


def figure_context(fig: Figure) -> dict:
    width, height = fig.size
    # shown at most 1280 px wide; the PNG keeps its full resolution for zooming
    scale = min(1.0, 1280 / width)
    return {"key": fig.key, "data": fig.data, "explain": fig.explain, "alt": fig.alt or fig.key,
            "width": int(width * scale), "height": int(height * scale)}


def render_page(context: dict) -> str:
    """The HTML page for a context of plain values, Figure and Table objects."""
    def convert(value):
        if isinstance(value, Figure):
            return figure_context(value)
        if isinstance(value, Table):
            return value.context()
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return template_environment().get_template("report.html.j2").render(**convert(context))


def _figures(context) -> list[Figure]:
    found = []

    def walk(value):
        if isinstance(value, Figure):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(context)
    return found


def write_report(dumps, out, **options) -> Path:
    """Analyse `dumps` (ledger folders) and write the report folder `out`; returns out/index.html.

    options: the ReportConfig fields (names, gt, before_after_nms, min_iou, num_images, bootstrap,
    seed, rescore, alphas, rescore_thresh). InputError (one line) for bad input; `out` is replaced only when the report
    is complete.
    """
    from misalign.compare import compare
    from misalign.io import atomic_dir

    result = compare(dumps, **asdict(ReportConfig(**options)))
    context = build_context(result)
    F.render_figures(_figures(context))
    html = render_page(context)
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "figures").mkdir()
        result.write(tmp)
        for fig in _figures(context):
            (tmp / "figures" / f"{fig.key}.png").write_bytes(fig.png)
        (tmp / "index.html").write_text(html, encoding="utf-8")
    return out / "index.html"
