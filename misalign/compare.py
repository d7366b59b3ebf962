"""Dumps -> one plain result: the single analysis entry point behind `misalign report`.

    result = compare(["dumps/base", "dumps/conf"], before_after_nms=True, rescore=True)
    result.metrics            # metrics.json (strict JSON: NaN/inf are None)
    result.tables["summary"]  # what tables/summary.csv holds; one DataFrame per CSV
    result.detectors[0]       # one detector's figure data (histograms, shown rows, rescoring sweep)
    result.write(folder)      # metrics.json and tables/*.csv

Every number of the report is made here (or by the misalign modules called from here); `reports`
only draws and formats what this returns. Each dump is read once and analysed by
`misalign.metrics.analyze`; what the figures need (2-D histograms over the whole split, the rows of
the few images drawn one by one) is taken from it before the next dump is read, so memory holds
one ledger at a time. Contracts: the ledger is docs/ledger.md (misalign.ledger), metrics.json is
`misalign.metrics.metrics_document` made strict JSON here; docs/architecture.md maps the packages.
"""

from __future__ import annotations

import json
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import numpy as np
import pandas as pd

from misalign import counts, suppression
from misalign.cocoeval import STAT_KEYS
from misalign.errors import InputError
from misalign.scan import HIST_BINS
from misalign.settings import CompareSettings  # noqa: F401 (re-exported: the settings of compare)

log = logging.getLogger(__name__)

RETAIN_IOU = 0.5  # the rows every analysis of the retained candidates needs: iou >= this, or kept
CONDITIONS = counts.CONDITION_KEYS  # Table 1's eleven, in the paper's order


@dataclass
class DetectorResult:
    """One analysed dump: its analysis and the data its figures draw, once its ledger has been let go."""

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
    shown_rows: pd.DataFrame | None = None  # candidates of the shown images (Figure 1 scatters), score clipped to 1
    per_image_proportions: pd.DataFrame | None = None  # Figure 2 per image (shown images; pre-NMS dumps only)
    rescoring: object = None  # misalign.rescore.RescoreResult; None when not rescored
    rescore_note: str | None = None  # why it could not be rescored (post-NMS only, no nms_thresh)
    gallery: pd.DataFrame | None = None  # misalign.suppression gallery cases (CASE_COLUMNS); None: post-NMS only
    errors: object = None  # misalign.tide.ErrorSplit (the errors bar chart, errors.csv)
    calibration: object = None  # misalign.calibration.Calibration (reliability diagrams, obj vs IoU, calibration.csv)
    training: object = None  # misalign.training.TrainingCurves of its checkpoint's log.csv; None: no checkpoint recorded


@dataclass
class CompareResult:
    """Everything the report shows, as plain data: metrics.json, the CSV tables, figure data, flags."""

    settings: CompareSettings
    detectors: list[DetectorResult]
    gt_path: Path
    metrics: dict  # metrics.json, strict JSON (NaN/inf -> None)
    tables: dict[str, pd.DataFrame]  # CSV stem -> what tables/<stem>.csv holds (full precision)
    figure1_columns: list[str]  # score columns drawn against IoU (Figure 1, quadrant tables)
    hist_edges: np.ndarray  # [HIST_BINS + 1] edges of both axes of every histogram

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.detectors]

    @property
    def shown_ids(self) -> np.ndarray:
        return self.detectors[0].shown_ids

    # --- flags: which dumps lack what (the report turns them into notes) ---

    @property
    def post_nms_only(self) -> list[str]:
        return [d.name for d in self.detectors if not d.pre_nms]

    @property
    def without_obj(self) -> list[str]:
        return [d.name for d in self.detectors if not d.has_obj]

    @property
    def without_raw(self) -> list[str]:
        return [d.name for d in self.detectors if not d.has_raw]

    @property
    def score_above_one(self) -> list[str]:
        return [d.name for d in self.detectors if d.score_above_one]

    @property
    def score_is_cls_everywhere(self) -> bool:
        return all(d.score_is_cls for d in self.detectors)

    @property
    def not_rescored(self) -> dict[str, str]:
        """name -> why it could not be rescored (only when rescoring was asked for)."""
        if not self.settings.rescore:
            return {}
        return {d.name: d.rescore_note for d in self.detectors if d.rescoring is None}

    @property
    def flagged_levels(self) -> dict[str, list[str]]:
        """name -> its FPN levels whose score is not the dump's own formula on some rows (misalign.levels)."""
        from misalign.levels import is_flagged

        flagged = {name: [label for label, entry in (self.metrics["detectors"][name].get("per_level") or {}).items()
                          if is_flagged(entry)] for name in self.names}
        return {name: labels for name, labels in flagged.items() if labels}

    @property
    def rescored(self) -> list[DetectorResult]:
        return [d for d in self.detectors if d.rescoring is not None]

    @property
    def obj_rankings_skipped(self) -> dict[str, list[str]]:
        """Why the obj rankings were skipped -> the rescored dumps it applies to (a zoo shares reasons)."""
        skipped = {}
        for d in self.rescored:
            if d.rescoring.skipped:
                skipped.setdefault(next(iter(d.rescoring.skipped.values())), []).append(d.name)
        return skipped

    @property
    def max_det_defaulted(self) -> dict[str, int]:
        """name -> the max_det NMS survivors were cut at, for rescored dumps whose meta.json records none."""
        return {d.name: d.rescoring.settings["max_det"] for d in self.rescored
                if d.rescoring.settings.get("max_det_source") == "default"}

    @property
    def sweeps(self) -> dict[str, dict]:
        """name -> its rankings' AP, for the rescored dumps with an α sweep (the AP-against-α plot)."""
        return {d.name: d.rescoring.rankings for d in self.rescored
                if any(key.startswith("alpha=") for key in d.rescoring.rankings)}

    def write(self, folder) -> None:
        """metrics.json and tables/*.csv into `folder` (which exists)."""
        folder = Path(folder)
        (folder / "tables").mkdir(exist_ok=True)
        for key, frame in self.tables.items():
            frame.to_csv(folder / "tables" / f"{key}.csv", index=False)
        (folder / "metrics.json").write_text(json.dumps(self.metrics, indent=2, allow_nan=False) + "\n")


def compare(dumps, gt=None, **options) -> CompareResult:
    """Validate and analyse the ledger folders `dumps` (one at a time) into one CompareResult.

    options: the fields of misalign.settings.CompareSettings (names, before_after_nms, min_iou,
    num_images, bootstrap, seed, rescore, alphas, rescore_thresh), with its defaults. InputError
    (one line, naming the report's option) for bad options, dumps of different datasets or images,
    or ground truth that does not match.
    """
    settings = CompareSettings(gt=gt, **options)
    dumps = [Path(d) for d in dumps]
    check_settings(settings, dumps)
    detectors, gt_path = _analyse_dumps(dumps, settings)
    from misalign.metrics import metrics_document

    metrics = json_safe(metrics_document({d.name: d.analysis for d in detectors}))
    columns = figure1_columns(detectors)
    tables = build_tables(detectors, metrics, settings, columns)
    return CompareResult(settings=settings, detectors=detectors, gt_path=gt_path, metrics=metrics, tables=tables,
                         figure1_columns=columns, hist_edges=np.linspace(0, 1, HIST_BINS + 1))


# ---------------------------------------------------------------------------------------------
# inputs


def detector_names(dumps: list[Path], names) -> list[str]:
    """One distinct name per dump: `names` ('a,b' or a list), else the folder names (with parents if needed)."""
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


def check_settings(settings: CompareSettings, dumps) -> None:
    """InputError for a bad option; parses alphas and rescore_thresh in place when rescoring."""
    if not dumps:
        raise InputError("DUMP: give at least one dump folder")
    if not 0.0 <= settings.min_iou <= 1.0:
        raise InputError(f"--min-iou: {settings.min_iou} is outside [0, 1]")
    if settings.num_images < 1:
        raise InputError(f"--images: {settings.num_images} must be at least 1")
    if settings.bootstrap < 0:
        raise InputError(f"--bootstrap: {settings.bootstrap} must be 0 or more")
    if settings.alphas is not None and not settings.rescore:
        raise InputError("--alphas: only used with --rescore")
    if settings.rescore_thresh is not None and not settings.rescore:
        raise InputError("--rescore-thresh: only used with --rescore")
    if settings.rescore:
        from misalign.rescore import DEFAULT_ALPHAS, parse_alphas, parse_rescore_thresh

        settings.alphas = DEFAULT_ALPHAS if settings.alphas is None else parse_alphas(settings.alphas)
        settings.rescore_thresh = parse_rescore_thresh(settings.rescore_thresh)


def dataset_of(meta: dict) -> dict:
    return meta.get("dataset") or {}


def check_same_dataset(folders, metas, image_sets, gt_given: bool) -> None:
    """InputError (one line) unless every dump is of the same dataset split and the same images."""
    ref_folder, ref = folders[0], dataset_of(metas[0])
    for folder, meta, images in zip(folders[1:], metas[1:], image_sets[1:]):
        ds = dataset_of(meta)
        if ref.get("split") and ds.get("split") and ref["split"] != ds["split"]:
            raise InputError(f"{folder}: split {ds['split']!r} differs from {ref_folder}'s {ref['split']!r}: "
                             "dumps of different datasets or splits cannot be compared")
        if not gt_given and ref.get("ann") and ds.get("ann") and Path(ref["ann"]).resolve() != Path(ds["ann"]).resolve():
            raise InputError(f"{folder}: ground truth {ds['ann']} differs from {ref_folder}'s {ref['ann']}: dumps of "
                             "different datasets cannot be compared (give --gt FILE if they are the same)")
        if not np.array_equal(images, image_sets[0]):
            raise InputError(f"{folder}: its {len(images)} images differ from {ref_folder}'s {len(image_sets[0])}: "
                             "dumps of different datasets or splits cannot be compared")


def ground_truth_path(gt, folders, metas) -> Path:
    """`gt` if given, else the first meta.json's dataset.ann; InputError when it is missing."""
    if gt:
        path = Path(gt)
        if not path.is_file():
            raise InputError(f"--gt: {path}: file not found")
        return path
    for folder, meta in zip(folders, metas):
        ann = dataset_of(meta).get("ann")
        if ann:
            if not Path(ann).is_file():
                raise InputError(f"{folder / 'meta.json'}: ground truth {ann} (dataset.ann) not found; give it with --gt FILE")
            return Path(ann)
    raise InputError(f"{folders[0] / 'meta.json'}: names no ground truth (dataset.ann); give it with --gt FILE")


# ---------------------------------------------------------------------------------------------
# analysis


def images_to_show(images: pd.DataFrame, num_images: int) -> np.ndarray:
    """[<= num_images] ids of the images shown one by one: the first ones with ground truth.

    An image without any object has nothing to misalign, so it would show an empty panel; images
    without ground truth fill in only when too few have some.
    """
    with_gt = images["num_gt"].to_numpy() > 0
    order = np.concatenate([np.flatnonzero(with_gt), np.flatnonzero(~with_gt)])[:num_images]
    return images["image_id"].to_numpy(np.int64)[np.sort(order)]


def _detector_result(ledger, scan, analysis, name: str, shown_ids) -> DetectorResult:
    """The figure data of one analysed ledger: histograms, quadrant counts (from the scan), rows of shown images."""
    columns = ["cls_score", "score"] + (["obj_score"] if scan.has_obj else [])
    cands = scan.retained
    shown_ids = np.asarray(shown_ids, np.int64)
    shown = cands[np.isin(cands["image_id"].to_numpy(), shown_ids)]
    # The panels are the unit square; a score above 1 (CL-NMS) is drawn on the top edge, as the histograms count it.
    shown = shown.assign(score=np.minimum(shown["score"].to_numpy(), 1.0))
    has_raw = len(ledger.raw_counts) > 0 or bool((ledger.images["num_pos_anchors"] >= 0).all())
    return DetectorResult(name=name, folder=Path(ledger.folder), meta=ledger.meta, analysis=analysis,
                          pre_nms=ledger.pre_nms, has_obj=scan.has_obj, score_is_cls=scan.score_is_cls,
                          score_above_one=scan.score_above_one, has_raw=has_raw,
                          histograms={c: scan.histograms[c] for c in columns},
                          quadrants={c: counts.quadrant_frame(scan.quadrants[c]) for c in columns},
                          shown_ids=shown_ids,
                          shown_rows=shown[["image_id", "iou", "kept", "cls_score", "obj_score", "score"]].copy(),
                          per_image_proportions=analysis.per_image_proportions(shown_ids) if ledger.pre_nms else None)


def _analyse_dumps(folders: list[Path], settings: CompareSettings) -> tuple[list[DetectorResult], Path]:
    """Validate and analyse every dump (one at a time, streamed: misalign.scan); returns their results
    and the gt path."""
    from misalign.ledger import read_images, read_ledger, read_meta, validate_ledger
    from misalign.calibration import MATCH_THRESHOLDS
    from misalign.cocoeval import diagnose_detections, ground_truth_boxes, hotcoco_ground_truth
    from misalign.ledger import kept_rows
    from misalign.metrics import BOX_COLUMNS, STREAMED_ANALYSIS_COLUMNS, analyze, check_ground_truth, load_ground_truth
    from misalign.rescore import RESCORE_COLUMNS
    from misalign.scan import read_scanned
    from misalign.levels import LEVEL_COLUMNS, level_entries, score_formula
    from misalign.training import training_curves

    names = detector_names(folders, settings.names)
    for folder in folders:  # files and schemas of every dump first; each one's rows in its own scan below
        validate_ledger(folder, check_content=False)
    metas = [read_meta(f) for f in folders]
    image_tables = [read_images(f) for f in folders]
    image_sets = [np.sort(t["image_id"].to_numpy(np.int64)) for t in image_tables]
    check_same_dataset(folders, metas, image_sets, gt_given=bool(settings.gt))
    gt_path = ground_truth_path(settings.gt, folders, metas)
    coco_gt = load_ground_truth(gt_path)
    hot_gt = hotcoco_ground_truth(coco_gt, gt_path)  # TIDE's split and COCO's matching of each kept box
    gt_boxes = ground_truth_boxes(hot_gt)
    shown_ids = images_to_show(image_tables[0], settings.num_images)
    results, gallery_gts = [], None  # the gallery's ground truths: the first pre-NMS dump's worst losses
    columns = [*STREAMED_ANALYSIS_COLUMNS, *(c for c in suppression.SUPPRESSION_COLUMNS
                                              if c not in STREAMED_ANALYSIS_COLUMNS)]
    columns += [c for c in LEVEL_COLUMNS if c not in columns]
    columns += [c for c in BOX_COLUMNS if c not in columns]  # AP, the gallery and the NMS error read retained boxes
    # Work that runs without the GIL (hotcoco, numpy's sorts) goes to side threads while the main
    # thread analyses: on two cores the report then takes the longer of the two, not their sum.
    with ThreadPoolExecutor(2, thread_name_prefix="misalign-side") as side:
        if settings.rescore:  # rescoring's NMS needs torch, seconds to import: load it while the analysis runs
            side.submit(import_module, "misalign.nms")
        for folder, name, meta, images in zip(folders, names, metas, image_tables):
            # every analysis of the retained rows pools iou >= RETAIN_IOU (or the correlation's own floor) or kept rows
            ledger, scan = read_scanned(folder, columns, retain_iou=min(settings.min_iou, RETAIN_IOU),
                                        shown_ids=shown_ids, meta=meta, images=images, validate=True)
            check_ground_truth(ledger, coco_gt, str(gt_path))
            log.info("analysing %s (%d candidates, %d retained)", name, scan.num_rows, len(scan.retained))
            kept = kept_rows(ledger, KEPT_COLUMNS)  # the detector's output, file order
            image_ids = np.sort(images["image_id"].to_numpy(np.int64))
            diagnosis = side.submit(diagnose_detections, hot_gt, _detections(kept), image_ids, MATCH_THRESHOLDS)
            losses = side.submit(suppression.ledger_table, ledger)  # per gt: the suppression losses (None: post-NMS only)
            analysis = analyze(ledger, coco_gt, name=name, min_iou=settings.min_iou, bootstrap=settings.bootstrap,
                               seed=settings.seed, candidate_counts=scan.counts, score_columns=scan.score_columns,
                               workers=side)
            analysis.metrics["per_level"] = level_entries(scan.levels, analysis.level_spearman, score_formula(meta))
            losses = losses.result()
            analysis.metrics["suppression"], gallery = suppression.analyse_ledger(ledger, coco_gt, gallery_gts, losses)
            gallery_gts = gallery["gt_id"] if gallery_gts is None and gallery is not None else gallery_gts
            results.append(_detector_result(ledger, scan, analysis, name, shown_ids))
            results[-1].gallery = gallery
            results[-1].training = training_curves(ledger.meta)
            results[-1].errors, results[-1].calibration = _errors_and_calibration(
                ledger, analysis, coco_gt, kept, diagnosis.result(), gt_boxes, losses)
            del ledger, scan, kept
            if settings.rescore:  # rescoring re-runs NMS on every box: the whole pool, with boxes
                full = read_ledger(folder, columns=list(RESCORE_COLUMNS))
                results[-1].rescoring, results[-1].rescore_note = _rescore(full, analysis, coco_gt, settings)
                del full
    return results, gt_path


def _rescore(ledger, analysis, coco_gt, settings: CompareSettings):
    """(misalign.rescore result, None), or (None, why not) for a dump that cannot be rescored; adds
    metrics.json's `rescoring`, `ap_lost_to_misalignment` and `ap_gap_to_oracle_ranking` to the analysis
    either way."""
    from misalign.rescore import rescore, unavailable_metrics, unavailable_reason

    reason = unavailable_reason(ledger.meta)
    result = None if reason else rescore(ledger, coco_gt, alphas=settings.alphas,
                                         rescore_thresh=settings.rescore_thresh, actual_ap=analysis.metrics["ap"])
    analysis.metrics.update(result.metrics() if result else unavailable_metrics())
    return result, reason


KEPT_COLUMNS = ["image_id", "x1", "y1", "w", "h", "score", "category_id", "cls_score", "obj_score"]


def _detections(kept: pd.DataFrame) -> np.ndarray:
    """[K, 7] the kept rows in misalign.cocoeval.evaluate_detections' layout."""
    return kept[KEPT_COLUMNS[:7]].to_numpy(np.float64)


def _errors_and_calibration(ledger, analysis, coco_gt, kept, diagnosis, gt_boxes, loss_table):
    """(misalign.tide.ErrorSplit, misalign.calibration.Calibration) of one dump; adds metrics.json's
    `errors`, `calibration` and `obj_vs_iou` to the analysis (docs/methods.md, Errors and Calibration).

    kept: its KEPT_COLUMNS rows; diagnosis: misalign.cocoeval.diagnose_detections of them (one
    hotcoco evaluation: TIDE's split and COCO's matching, calibration's targets); gt_boxes:
    misalign.cocoeval.ground_truth_boxes. The NMS counterfactual takes one more AP evaluation, when
    it changes any box. loss_table: misalign.suppression.ledger_table of the ledger (None: post-NMS only).
    """
    from misalign import calibration as C
    from misalign import tide
    from misalign.cocoeval import evaluate_detections
    from misalign.ledger import rows_by_cand_id

    cands, image_ids = ledger.candidates, analysis.image_ids
    detections = _detections(kept)
    ap, nms_ap, losses, replacements, note = analysis.metrics["ap"], None, None, None, None
    if loss_table is not None:
        lost = tide.suppression_losses(loss_table, cands["cand_id"].to_numpy(np.int64))
        edits = tide.nms_replacements(lost, cands["kept"].to_numpy(bool))
        losses, replacements = len(lost), len(edits)
        nms_ap = ap  # no edit: the same output, the same AP
        if len(edits):
            source = cands["cand_id"].to_numpy(np.int64)[edits["source_row"].to_numpy(np.int64)]
            boxes = rows_by_cand_id(ledger, source, list(tide.AP_BOX_COLUMNS)).set_index("cand_id")
            changed = tide.replaced_detections(detections, np.flatnonzero(cands["kept"].to_numpy(bool)), edits,
                                               boxes.loc[source, list(tide.AP_BOX_COLUMNS)].to_numpy(np.float64))
            nms_ap = evaluate_detections(coco_gt, changed, image_ids)
    else:
        note = "post-NMS only: no suppressed candidates to give back"
    errors = tide.error_split(diagnosis, ap, nms_ap, losses, replacements, note)
    calibration = C.calibration(kept, diagnosis.matches, gt_boxes)
    if "obj_score" in cands.columns and np.isfinite(cands["obj_score"].to_numpy()).any():
        calibration.obj_vs_iou, calibration.obj_bins = C.obj_vs_iou(cands["obj_score"].to_numpy(),
                                                                    cands["iou"].to_numpy())
        calibration.obj_pool = "pre_nms" if ledger.pre_nms else "post_nms"
    analysis.metrics.update({"errors": errors.metrics(), "nms_counterfactual": errors.counterfactual_metrics(),
                             "calibration": calibration.columns, "obj_vs_iou": calibration.obj_vs_iou})
    return errors, calibration


def figure1_columns(detectors: list[DetectorResult]) -> list[str]:
    """Score columns drawn against IoU: cls always, obj where some dump has it, score unless it is cls everywhere."""
    columns = ["cls_score"]
    if any(d.has_obj for d in detectors):
        columns.append("obj_score")
    if not all(d.score_is_cls for d in detectors):
        columns.append("score")
    return columns


def json_safe(value):
    """NaN/inf -> None everywhere (metrics.json must be strict JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# tables: what tables/*.csv hold


def slug(name: str) -> str:
    """A detector name as a file stem (Table 1 per detector: table1_<slug>.csv)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "detector"


def _get(d: dict, *keys, default=None):
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def coco_frame(metrics: dict, names: list[str]) -> pd.DataFrame:
    """One row per detector: COCOeval's twelve stats."""
    rows = [{"detector": n, **{k: _get(metrics["detectors"][n], "ap", k) for k in STAT_KEYS}} for n in names]
    return pd.DataFrame(rows, columns=["detector", *STAT_KEYS])


def correlation_frame(metrics: dict, names: list[str]) -> pd.DataFrame:
    """Rows (detector, score column): the correlations of metrics.json with the Spearman CI."""
    rows = []
    for name in names:
        for col, c in (_get(metrics["detectors"][name], "correlation", default={}) or {}).items():
            lo, hi = (_get(c, "ci95", "spearman") or [None, None])
            rows.append({"detector": name, "score column": col, "spearman": c.get("spearman"),
                         "spearman_ci_lo": lo, "spearman_ci_hi": hi, "kendall": c.get("kendall"),
                         "pearson": c.get("pearson"), "spearman_per_gt": c.get("spearman_per_gt"),
                         "divergence": c.get("divergence"), "n": c.get("n"), "n_gt": c.get("n_gt")})
    return pd.DataFrame(rows, columns=["detector", "score column", "spearman", "spearman_ci_lo", "spearman_ci_hi",
                                       "kendall", "pearson", "spearman_per_gt", "divergence", "n", "n_gt"])


def proportions_frame(metrics: dict, names: list[str]) -> pd.DataFrame:
    """Rows detector x {before NMS, after NMS, survival}; columns the eleven conditions."""
    rows = []
    for name in names:
        m = metrics["detectors"][name]
        for what, values in (("proportion before NMS", _get(m, "proportions", "pre_nms")),
                             ("proportion after NMS", _get(m, "proportions", "post_nms")),
                             ("survival (after/before count)", _get(m, "survival"))):
            if values:
                rows.append({"detector": name, "quantity": what, **{c: values.get(c) for c in CONDITIONS}})
    return pd.DataFrame(rows, columns=["detector", "quantity", *CONDITIONS])


def counts_total_frame(metrics: dict, names: list[str]) -> pd.DataFrame:
    """Table 1 summed over images: rows (stage, condition), one column per detector."""
    rows = []
    for stage in counts.STAGE_ORDER:
        conditions = (counts.POSITIVE,) if stage == "anchors" else CONDITIONS
        for cond in conditions:
            values = {n: _get(metrics["detectors"][n], "counts", stage, cond) for n in names}
            if all(v is None for v in values.values()):
                continue
            rows.append({"stage": counts.STAGE_TITLES[stage], "condition": cond, **values})
    return pd.DataFrame(rows, columns=["stage", "condition", *names])


def summary_frame(detectors: list[DetectorResult], rescore: bool) -> pd.DataFrame:
    """misalign.metrics.summary_table of the `score` column, plus the rescoring headline numbers."""
    from misalign.metrics import summary_table

    frame = summary_table({d.name: d.analysis for d in detectors}, column="score")
    if rescore:  # AP(oracle_nms) - AP(actual), AP(oracle) - AP(actual); None where the dump could not be rescored
        for key in ("ap_lost_to_misalignment", "ap_gap_to_oracle_ranking"):
            frame[key] = [d.analysis.metrics.get(key) for d in detectors]
    return frame


def differences_frame(detectors: list[DetectorResult]) -> pd.DataFrame | None:
    """misalign.metrics.compare against the first dump; None for a single dump."""
    from misalign.metrics import compare as differences

    if len(detectors) < 2:
        return None
    return differences({d.name: d.analysis for d in detectors})


def table1_frame(detector: DetectorResult) -> pd.DataFrame:
    """Table 1 of one detector: rows (stage, condition), a column per shown image, then 'all'."""
    return detector.analysis.table1(image_ids=detector.shown_ids).reset_index()


def quadrants_frame(detectors: list[DetectorResult], column: str) -> pd.DataFrame:
    """Rows (detector, stage): boxes per quadrant of the column-IoU plane and their share of the stage."""
    rows = []
    for d in detectors:
        frame = d.quadrants.get(column)
        if frame is None:
            continue
        for stage, row in frame.iterrows():
            if stage == "pre_nms" and not d.pre_nms:
                continue
            rows.append({"detector": d.name, "stage": stage, **row.to_dict()})
    return pd.DataFrame(rows)


def rescoring_frame(detectors: list[DetectorResult]) -> pd.DataFrame:
    """Rows (detector, ranking): AP, AP50, AP75 (metrics.json 'rescoring', then 'actual' = its 'ap'),
    delta_AP = AP - actual AP (oracle_nms's is the AP lost to misalignment, oracle's the gap to the oracle
    ranking), kept boxes. Rescored detectors only."""
    rows = []
    for d in detectors:
        result = d.rescoring
        for ranking, ap in [*result.rankings.items(), ("actual", result.actual)]:
            rows.append({"detector": d.name, "ranking": ranking, **ap, "delta_AP": ap["AP"] - result.actual["AP"],
                         "kept": result.num_kept.get(ranking, d.meta.get("num_kept"))})
    return pd.DataFrame(rows, columns=["detector", "ranking", "AP", "AP50", "AP75", "delta_AP", "kept"])


def suppression_frame(metrics: dict, names: list[str]) -> pd.DataFrame:
    """One row per detector: metrics.json `suppression` (None for a post-NMS-only dump)."""
    rows = [{"detector": n, **(_get(metrics["detectors"][n], "suppression") or {})} for n in names]
    return pd.DataFrame(rows, columns=["detector", *suppression.METRIC_KEYS])


def gallery_frame(detectors: list[DetectorResult]) -> pd.DataFrame:
    """The gallery's cases, one row per (ground truth, pre-NMS detector), by rank then dump order."""
    frames = [d.gallery.assign(detector=d.name) for d in detectors if d.gallery is not None]
    columns = ["rank", "detector", *[c for c in suppression.CASE_COLUMNS if c != "rank"]]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True).sort_values("rank", kind="stable")[columns].reset_index(drop=True)


def errors_frame(detectors: list[DetectorResult]) -> pd.DataFrame:
    """One row per detector: AP50, the ΔAP of TIDE's six error types and NMS (metrics.json `errors`),
    each type's count (NMS: suppression losses) and the kept boxes the NMS counterfactual replaced."""
    from misalign.tide import ERROR_KEYS

    rows = [{"detector": d.name, "AP50": d.errors.ap50, **{k: d.errors.delta_ap.get(k) for k in ERROR_KEYS},
             **{f"n {k}": d.errors.counts.get(k) for k in ERROR_KEYS}, "NMS replaced": d.errors.nms_replaced,
             "NMS AP": d.errors.nms_ap}
            for d in detectors]
    return pd.DataFrame(rows, columns=["detector", "AP50", *ERROR_KEYS, *(f"n {k}" for k in ERROR_KEYS),
                                       "NMS replaced", "NMS AP"])


def calibration_frame(detectors: list[DetectorResult]) -> pd.DataFrame:
    """Rows (detector, score column): D-ECE, LaECE (metrics.json `calibration`; None where not
    computed, with why), the kept boxes measured; then obj_vs_iou's mae, bias, n on the obj_score rows."""
    rows = []
    for d in detectors:
        cal = d.calibration
        for column, entry in cal.columns.items():
            obj = cal.obj_vs_iou if column == "obj_score" and cal.obj_vs_iou else {}
            rows.append({"detector": d.name, "score column": column, "d_ece": (entry or {}).get("d_ece"),
                         "la_ece": (entry or {}).get("la_ece"), "kept boxes": cal.num_boxes if entry else None,
                         "note": cal.notes.get(column), "obj_vs_iou mae": obj.get("mae"),
                         "obj_vs_iou bias": obj.get("bias"), "obj_vs_iou n": obj.get("n")})
    return pd.DataFrame(rows, columns=["detector", "score column", "d_ece", "la_ece", "kept boxes", "note",
                                       "obj_vs_iou mae", "obj_vs_iou bias", "obj_vs_iou n"])


def obj_vs_iou_frame(detectors: list[DetectorResult]) -> pd.DataFrame:
    """Rows (detector, IoU bin): obj_score's mean, spread and quartiles (the obj-vs-IoU figure's data)."""
    frames = [d.calibration.obj_bins.assign(detector=d.name, pool=d.calibration.obj_pool)
              for d in detectors if d.calibration.obj_bins is not None]
    frame = pd.concat(frames, ignore_index=True)
    return frame[["detector", "pool", *[c for c in frame.columns if c not in ("detector", "pool")]]]


def provenance_frame(detectors: list[DetectorResult], settings: CompareSettings) -> pd.DataFrame:
    """One row per detector: its dump, model, split, post-processing settings, size and the report's parameters."""
    rows = []
    for d in detectors:
        pp = d.meta.get("postprocess") or {}
        det = d.meta.get("detector") or {}
        rows.append({
            "detector": d.name, "dump": str(d.folder), "model": det.get("name") if isinstance(det, dict) else det,
            "split": dataset_of(d.meta).get("split"), "pre-NMS pool": "yes" if d.pre_nms else "no (post-NMS only)",
            "obj_score": "yes" if d.has_obj else "no",
            "score_thresh": pp.get("score_thresh"), "topk": pp.get("topk"), "nms_thresh": pp.get("nms_thresh"),
            "max_det": pp.get("max_det"), "score formula": pp.get("score_formula"), "alpha": pp.get("alpha"),
            "images": d.meta.get("num_images"), "candidates": d.meta.get("num_candidates"),
            "kept": d.meta.get("num_kept"), "AP backend": d.analysis.settings.get("ap_backend"),
            "min_iou": settings.min_iou, "bootstrap B": settings.bootstrap, "seed": settings.seed,
            "created": d.meta.get("created"), "checkpoint sha256": (d.meta.get("checkpoint_sha256") or "–")[:12],
        })
    return pd.DataFrame(rows)


def levels_table_frame(detectors, metrics: dict) -> pd.DataFrame:
    """tables/levels.csv: misalign.levels.levels_frame of metrics.json `per_level`, with each dump's formula."""
    from misalign.levels import levels_frame, score_formula

    frame = levels_frame({d.name: _get(metrics["detectors"][d.name], "per_level", default={}) for d in detectors})
    formulas = {d.name: getattr(score_formula(d.meta), "text", None) for d in detectors}
    frame.insert(2, "formula", frame["detector"].map(formulas))
    return frame


def training_table_frame(detectors) -> pd.DataFrame:
    """tables/training.csv: misalign.training.training_frame of the dumps' log.csv curves."""
    from misalign.training import training_frame

    return training_frame({d.name: d.training for d in detectors})


def build_tables(detectors, metrics, settings: CompareSettings, columns) -> dict[str, pd.DataFrame]:
    """CSV stem -> frame, for every table the report holds (which depends on the options and the dumps)."""
    names = [d.name for d in detectors]
    tables = {"summary": summary_frame(detectors, settings.rescore)}
    differences = differences_frame(detectors)
    if differences is not None:
        tables["differences"] = differences
    if settings.before_after_nms:
        for col in columns:
            tables[f"quadrants_{col}"] = quadrants_frame(detectors, col)
        tables["table1_all"] = counts_total_frame(metrics, names)
        for d in detectors:
            tables[f"table1_{slug(d.name)}"] = table1_frame(d)
        if any(d.pre_nms for d in detectors):
            tables["proportions"] = proportions_frame(metrics, names)
    tables["correlation"] = correlation_frame(metrics, names)
    tables["suppression"] = suppression_frame(metrics, names)
    tables["gallery"] = gallery_frame(detectors)
    rescored = [d for d in detectors if d.rescoring is not None]
    if settings.rescore and rescored:
        tables["rescoring"] = rescoring_frame(rescored)
    tables["errors"] = errors_frame(detectors)
    tables["calibration"] = calibration_frame(detectors)
    if any(d.calibration.obj_bins is not None for d in detectors):
        tables["obj_vs_iou"] = obj_vs_iou_frame(detectors)
    tables["levels"] = levels_table_frame(detectors, metrics)
    tables["training"] = training_table_frame(detectors)
    tables["coco_ap"] = coco_frame(metrics, names)
    tables["provenance"] = provenance_frame(detectors, settings)
    return tables
