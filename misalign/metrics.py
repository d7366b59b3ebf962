"""metrics.json for one or more dumps, and the tables behind the report (docs/architecture.md: who writes it).

`analyze(ledger, gt)` reads what it needs once and returns an `Analysis`: the metrics.json entry
of the detector, the per-image counts (Table 1, Figure 2), the per-gt Spearman table and the
bootstrap replicates used for confidence intervals and for comparing detectors. Bootstrap
resamples are drawn over the ledger's images sorted by id, from `seed`: two dumps of the same
images analysed with the same seed and B share their resamples, so their differences are paired.

Conventions (see also misalign.counts and misalign.correlation): AP is COCOeval's (pycocotools, or
an engine of misalign.cocoeval that gives its numbers bit for bit) on the kept rows ranked by `score`, with every
image of images.parquet evaluated. For a post-NMS-only ledger (meta.json `pre_nms: false`, e.g. a
COCO results import) there is no pre-NMS stage: its pre_nms counts, proportions and survival are
empty, and the correlations are taken over the kept boxes, the only pool it has. Undefined numbers
(a correlation of constant scores, a CI without resamples) are None (null in JSON).

Public API:
- ANALYSIS_COLUMNS, SCORE_COLUMNS, DEFAULT_BOOTSTRAP, METRICS_SCHEMA
- load_ground_truth(path, backend="auto") -> COCO object of the engine (misalign.cocoeval.ENGINES)
- evaluate_ap(coco_gt, kept, image_ids) -> {"AP": .., ..., "ARl": ..}
- analyze(ledger, gt=None, *, min_iou, bootstrap, seed, ap_backend, bootstrap_method) -> Analysis
- compute_metrics(ledger, gt=None, **same) -> dict (one detector's metrics.json entry)
- metrics_document(analyses) -> {"schema": 1, "detectors": {...}}
- summary_table(analyses) -> DataFrame (one row per detector: the headline numbers with CIs)
- compare(analyses, reference=None) -> DataFrame (differences to a reference detector, with CIs)
- Analysis.table1(num_images=10), Analysis.per_image_proportions(image_ids=None) -> DataFrame
- from misalign.counts: per_image_counts, table1, per_image_proportions, score_iou_histogram, quadrant_counts
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from misalign import counts as _counts
from misalign.cocoeval import STAT_KEYS, engine_info, evaluate_detections, load_ground_truth
from misalign.correlation import (RankedPool, Ranking, bootstrap_counts, kendall_tau, linear_replicates, pearson,
                                  per_gt_spearman_columns, percentile_ci, pool_mask, spearman_influence)
from misalign.errors import InputError
from misalign.ledger import Ledger, kept_rows, read_ledger
from misalign.levels import level_spearman
from misalign.settings import DEFAULT_BOOTSTRAP

log = logging.getLogger(__name__)

METRICS_SCHEMA = 1
ANALYSIS_COLUMNS = ["image_id", "category_id", "x1", "y1", "x2", "y2", "w", "h", "cls_score", "obj_score",
                    "score", "kept", "iou", "gt_id", "crowd"]  # the candidates columns every analysis needs
AP_COLUMNS = ["image_id", "category_id", "x1", "y1", "w", "h", "score"]  # what COCOeval reads of the kept rows
BOX_COLUMNS = ("x1", "y1", "x2", "y2", "w", "h")
# Without the boxes: what `analyze` needs of every row. The kept rows' boxes (AP) are then read
# separately, filtered row group by row group, so the boxes of the pre-NMS pool are never in memory.
STREAMED_ANALYSIS_COLUMNS = [c for c in ANALYSIS_COLUMNS if c not in BOX_COLUMNS]
SCORE_COLUMNS = ("cls_score", "obj_score", "score")
# How the Spearman replicates are computed: 'exact' (RankedPool: the resample's own weighted
# midranks, ~0.1 s per resample on a COCO-sized pool of 1.5 M rows and 3 score columns) or
# 'linear' (the first-order term of the same replicate around the full sample, from each image's
# influence, misalign.correlation.spearman_influence: one O(n log n) pass for all resamples; on a
# 1.5 M-row pool it differs from the exact replicate by < 1% of the replicates' spread). 'auto':
# exact while pool rows x resamples <= EXACT_BOOTSTRAP_BUDGET, linear beyond. Same resample
# counts either way, so paired comparisons stay paired.
BOOTSTRAP_METHODS = ("auto", "exact", "linear")
EXACT_BOOTSTRAP_BUDGET = 20_000_000
HEADLINE_CONDITIONS = ("iou>0.5", "cls>0.5")  # survival rates with bootstrap replicates


# --- AP ------------------------------------------------------------------------------------------


def evaluate_ap(coco_gt, kept: pd.DataFrame, image_ids) -> dict[str, float]:
    """COCOeval bbox stats (STAT_KEYS) of the rows `kept` (image_id, category_id, x1, y1, w, h, score).

    coco_gt from `load_ground_truth` (either engine; both give identical numbers); image_ids:
    every image to evaluate (images without detections count their misses). Without w, h (a frame
    made elsewhere) the box's COCO size is x2 - x1, y2 - y1.
    """
    x1, y1 = kept["x1"].to_numpy(np.float64), kept["y1"].to_numpy(np.float64)
    w = kept["w"].to_numpy(np.float64) if "w" in kept.columns else kept["x2"].to_numpy(np.float64) - x1
    h = kept["h"].to_numpy(np.float64) if "h" in kept.columns else kept["y2"].to_numpy(np.float64) - y1
    dets = np.column_stack([kept["image_id"].to_numpy(np.float64), x1, y1, w, h,
                            kept["score"].to_numpy(np.float64), kept["category_id"].to_numpy(np.float64)])
    return evaluate_detections(coco_gt, dets, image_ids)  # [N, 7] pycocotools' loadNumpyAnnotations layout


def check_ground_truth(ledger: Ledger, coco_gt, gt_name: str) -> None:
    """InputError unless every image of the ledger and every category of its kept rows is in the gt."""
    gt_images = np.asarray(sorted(coco_gt.getImgIds()), np.int64)
    ids = ledger.images["image_id"].to_numpy(np.int64)
    pos = np.clip(np.searchsorted(gt_images, ids), 0, max(len(gt_images) - 1, 0))
    missing = ids[(gt_images[pos] != ids) if len(gt_images) else np.ones(len(ids), bool)]
    if len(missing):
        raise InputError(f"{gt_name}: ground truth does not match the ledger {ledger.folder}: "
                         f"image_id {missing[0]} of images.parquet is not in it ({len(missing)} such images)")
    cats = np.unique(ledger.candidates["category_id"].to_numpy(np.int64))
    unknown = np.setdiff1d(cats, np.asarray(coco_gt.getCatIds(), np.int64))
    if len(unknown):
        raise InputError(f"{gt_name}: ground truth does not match the ledger {ledger.folder}: "
                         f"category_id {unknown[0]} of candidates.parquet is not in it")


def _resolve_gt(ledger: Ledger, gt, backend: str):
    """(COCO object, name) from `gt` (path or loaded COCO) or the ledger's meta.json dataset.ann."""
    if gt is None:
        ann = (ledger.meta.get("dataset") or {}).get("ann")
        if not ann:
            raise InputError(f"{ledger.folder / 'meta.json'}: names no ground truth (dataset.ann); give it with --gt")
        gt = ann
    if isinstance(gt, (str, Path)):
        return load_ground_truth(gt, backend), str(gt)
    return gt, "ground truth"


# --- the analysis of one dump --------------------------------------------------------------------


@dataclass
class Analysis:
    """Everything misalign computes from one ledger (see the module doc)."""

    name: str
    metrics: dict  # this detector's metrics.json entry
    per_image: pd.DataFrame  # per-image counts, index image_id, columns (stage, condition)
    per_gt: dict[str, pd.DataFrame]  # score column -> per_gt_spearman table
    replicates: dict[str, np.ndarray]  # 'spearman:<col>', 'divergence:<col>', 'survival:<cond>' -> [B]
    image_ids: np.ndarray  # sorted image ids: the bootstrap's index space
    settings: dict = field(default_factory=dict)  # min_iou, bootstrap, seed, ap_backend, min_count, pool
    level_spearman: dict = field(default_factory=dict)  # ledger level -> Spearman(score, iou) of its pool rows

    def table1(self, num_images: int = 10, image_ids=None) -> pd.DataFrame:
        """Table 1 (see misalign.counts.table1)."""
        return _counts.table1(self.per_image, num_images, image_ids)

    def per_image_proportions(self, image_ids=None) -> pd.DataFrame:
        """Figure 2 per image (see misalign.counts.per_image_proportions)."""
        return _counts.per_image_proportions(self.per_image, image_ids)


def _finite(value):
    """float, or None for NaN / inf (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _score_columns(candidates: pd.DataFrame) -> list[str]:
    """cls_score, obj_score (unless all NaN or absent), score."""
    present = [c for c in SCORE_COLUMNS if c in candidates.columns]
    return [c for c in present if c != "obj_score" or bool(np.isfinite(candidates[c].to_numpy()).any())]


def _shared_pools(candidates: pd.DataFrame, columns, min_iou: float) -> list[tuple[list[str], np.ndarray]]:
    """Score columns grouped by identical pools: [(columns, pool rows)]. Each group shares one
    selection, one ranking of iou and one bootstrap."""
    groups: list[tuple[list[str], np.ndarray]] = []
    for column in columns:
        rows = np.flatnonzero(pool_mask(candidates, column, min_iou))
        same = next((g for g in groups if np.array_equal(g[1], rows)), None)
        if same is None:
            groups.append(([column], rows))
        else:
            same[0].append(column)
    return groups


def bootstrap_method_for(pool_rows: int, num_resamples: int, method: str = "auto") -> str:
    """'exact' or 'linear': the Spearman replicates `analyze` computes (see BOOTSTRAP_METHODS)."""
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"unknown bootstrap method {method!r}")
    if method != "auto":
        return method
    return "exact" if pool_rows * num_resamples <= EXACT_BOOTSTRAP_BUDGET else "linear"


def _spearman_bootstrap(xs, y, img, image_ids, counts_matrix, rankings, method="auto"):
    """Spearman rho of each score array of xs against y (rows of images img) on the full pool [K],
    on every resample [B, K], and the replicates' method ('exact' or 'linear'). rankings: (xs'
    Rankings, y's)."""
    method = bootstrap_method_for(len(y), len(counts_matrix), method)
    image_pos = np.searchsorted(image_ids, img)
    if method == "linear":
        point, grad = spearman_influence(*rankings, image_pos, len(image_ids))  # point: scipy's
        return point, linear_replicates(point, grad, counts_matrix), method
    ranked = RankedPool(xs, y, image_pos, len(image_ids))
    point = ranked.spearman(np.ones(len(image_ids)))  # equals scipy's spearmanr on the pool
    reps = ranked.replicates(counts_matrix) if len(counts_matrix) else np.zeros((0, len(xs)))
    return point, reps, method


def _divergence_replicates(per_gt: pd.DataFrame, image_ids, counts_matrix) -> np.ndarray:
    """[B] divergence of each resample: the mean per-gt rho with each gt weighted by its image's count."""
    pos = np.searchsorted(image_ids, per_gt["image_id"].to_numpy(np.int64))
    rho_sum = np.bincount(pos, per_gt["spearman"].to_numpy(), minlength=len(image_ids))
    rho_num = np.bincount(pos, minlength=len(image_ids)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (1 - (counts_matrix @ rho_sum) / (counts_matrix @ rho_num)) / 2


def _run(workers, function, *args) -> Future:
    """function(*args) in the executor `workers`, or now (as a finished Future) when there is none."""
    if workers is not None:
        return workers.submit(function, *args)
    done = Future()
    done.set_result(function(*args))
    return done


def _kendall_taus(xs, y) -> list[float]:
    """Kendall's tau of each of xs against y, one after the other (in one side thread: scipy copies
    the pool, so one copy at a time)."""
    return [kendall_tau(x, y) for x in xs]


def _correlations(candidates, columns, image_ids, counts_matrix, min_iou, min_count, method="auto", workers=None):
    """(metrics 'correlation' dict, per-gt tables, replicates, {column: bootstrap method}, {ledger level:
    Spearman of score}) for each score column.

    Columns with the same pool rows share it (`_shared_pools`); each column is sorted once (a
    Ranking) for every rank statistic. The per-level Spearman (misalign.levels.level_spearman) of
    `score`, the NMS ranking, comes from the same rankings when the candidates have a `level`.
    workers: the executor Kendall's tau runs in (see `analyze`).
    """
    result, per_gt, replicates, methods, level_rho = {}, {}, {}, {}, {}
    iou, image, gt_id = (candidates[c].to_numpy() for c in ("iou", "image_id", "gt_id"))
    for group, rows in _shared_pools(candidates, columns, min_iou):
        y, img, gt = iou[rows].astype(np.float64), image[rows].astype(np.int64), gt_id[rows].astype(np.int64)
        xs = [candidates[column].to_numpy()[rows].astype(np.float64) for column in group]
        x_ranks, y_ranks = [Ranking(x) for x in xs], Ranking(y)
        kendall = _run(workers, _kendall_taus, x_ranks, y_ranks)
        point, reps, used = _spearman_bootstrap(xs, y, img, image_ids, counts_matrix, (x_ranks, y_ranks), method)
        tables = per_gt_spearman_columns(x_ranks, y_ranks, gt, img, min_count)
        if "score" in group and "level" in candidates.columns:
            level_rho = level_spearman(candidates["level"].to_numpy()[rows], x_ranks[group.index("score")], y_ranks)
        for k, (column, table) in enumerate(zip(group, tables)):
            methods[column] = used
            replicates[f"spearman:{column}"] = reps[:, k]
            per_gt[column] = table
            defined = table[np.isfinite(table["spearman"].to_numpy())]  # constant scores or IoUs: skipped
            if len(defined) < len(table):
                log.info("%s: %d gt boxes with constant scores or IoUs left out of spearman_per_gt",
                         column, len(table) - len(defined))
            replicates[f"divergence:{column}"] = _divergence_replicates(defined, image_ids, counts_matrix)
            mean_rho = float(defined["spearman"].mean()) if len(defined) else np.nan
            entry = {"spearman": point[k], "kendall": kendall.result()[k], "pearson": pearson(xs[k], y),
                     "spearman_per_gt": mean_rho, "divergence": (1 - mean_rho) / 2}
            result[column] = {key: _finite(value) for key, value in entry.items()}
            result[column].update({"n": int(len(y)), "n_gt": int(len(defined)),
                                   "ci95": {"spearman": percentile_ci(replicates[f"spearman:{column}"])}})
    return {column: result[column] for column in columns}, per_gt, replicates, methods, level_rho


def analyze(ledger, gt=None, *, name: str | None = None, min_iou: float = 0.5,
            bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, ap_backend: str = "auto",
            min_count: int = 3, bootstrap_method: str = "auto", candidate_counts: dict | None = None,
            score_columns=None, workers=None) -> Analysis:
    """Analyse one ledger (a folder or a `Ledger` read with at least ANALYSIS_COLUMNS).

    gt: the COCO ground truth (path, or a COCO object from `load_ground_truth` to share between
    dumps); default the ledger's meta.json dataset.ann. min_iou: the correlation pool's IoU floor
    (iou >= min_iou); bootstrap: resamples of images for the CIs (0: none); seed: their RNG seed;
    min_count: the fewest pool rows a gt box needs for spearman_per_gt; bootstrap_method: how the
    Spearman replicates are computed (BOOTSTRAP_METHODS; settings['bootstrap_method'] says which).
    A streamed analysis (misalign.compare) passes a ledger whose candidates are only the retained
    rows (misalign.scan), with the tallies of every row as `candidate_counts` and the score columns
    found in them as `score_columns`. workers: a concurrent.futures executor for the work that runs
    without the GIL (Kendall's tau, in scipy's compiled code) beside this thread's; None: all in line.
    """
    if not isinstance(ledger, Ledger):  # a folder: streamed, only the rows the pools need in memory
        from misalign.scan import read_scanned

        ledger, scan = read_scanned(ledger, STREAMED_ANALYSIS_COLUMNS, retain_iou=min(min_iou, 0.5))
        candidate_counts, score_columns = scan.counts, scan.score_columns
    coco_gt, gt_name = _resolve_gt(ledger, gt, ap_backend)
    check_ground_truth(ledger, coco_gt, gt_name)
    candidates = ledger.candidates
    images = ledger.images
    image_ids = np.sort(images["image_id"].to_numpy(np.int64))

    ap = evaluate_ap(coco_gt, kept_rows(ledger, AP_COLUMNS), image_ids)
    per_image = _counts.per_image_counts(ledger, candidate_counts)
    totals = _counts.stage_totals(per_image, pre_nms=ledger.pre_nms)

    counts_matrix = bootstrap_counts(len(image_ids), int(bootstrap), seed).astype(np.float64)
    columns = _score_columns(candidates) if score_columns is None else list(score_columns)
    correlation, per_gt, replicates, methods, level_rho = _correlations(
        candidates, columns, image_ids, counts_matrix, min_iou, min_count, bootstrap_method, workers)
    if ledger.pre_nms:
        sorted_counts = per_image.loc[image_ids]
        for condition in HEADLINE_CONDITIONS:
            pre = sorted_counts[("pre_nms", condition)].to_numpy(np.float64)
            post = sorted_counts[("post_nms", condition)].to_numpy(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                replicates[f"survival:{condition}"] = (counts_matrix @ post) / (counts_matrix @ pre)

    metrics = {
        "ap": ap,
        "ap_engine": engine_info(coco_gt),
        "counts": totals["counts"],
        "survival": totals["survival"],
        "proportions": totals["proportions"],
        "crowd": totals["crowd"],
        "correlation": correlation,
    }
    settings = {"min_iou": min_iou, "bootstrap": int(bootstrap), "seed": seed, "min_count": min_count,
                "ap_backend": engine_info(coco_gt)["name"],
                "bootstrap_method": (sorted(set(methods.values()), key=["exact", "linear"].index)
                                     if int(bootstrap) else []),
                "pool": "pre_nms" if ledger.pre_nms else "post_nms"}
    return Analysis(name=name or ledger.name, metrics=metrics, per_image=per_image, per_gt=per_gt,
                    replicates=replicates, image_ids=image_ids, settings=settings, level_spearman=level_rho)


def compute_metrics(ledger, gt=None, **options) -> dict:
    """One detector's metrics.json entry (ap, counts, survival, proportions, correlation); see `analyze`."""
    return analyze(ledger, gt, **options).metrics


def metrics_document(analyses) -> dict:
    """metrics.json: {"schema": 1, "detectors": {name: entry}} from Analyses or entries keyed by name."""
    detectors = {name: (a.metrics if isinstance(a, Analysis) else a) for name, a in analyses.items()}
    return {"schema": METRICS_SCHEMA, "detectors": detectors}


# --- summaries and comparisons -------------------------------------------------------------------


def _headline(analysis: Analysis, column: str = "score") -> dict:
    """The numbers of the summary table for one detector, with bootstrap CIs where there are replicates."""
    m = analysis.metrics
    corr = m["correlation"].get(column, {})
    row = {"detector": analysis.name, "AP": m["ap"]["AP"], "AP50": m["ap"]["AP50"], "AP75": m["ap"]["AP75"],
           "spearman": corr.get("spearman"), "divergence": corr.get("divergence"),
           "n": corr.get("n"), "n_gt": corr.get("n_gt")}
    for key in (f"spearman:{column}", f"divergence:{column}"):
        lo, hi = percentile_ci(analysis.replicates.get(key, np.zeros(0)))
        row[f"{key.split(':')[0]}_lo"], row[f"{key.split(':')[0]}_hi"] = lo, hi
    for condition in HEADLINE_CONDITIONS:
        lo, hi = percentile_ci(analysis.replicates.get(f"survival:{condition}", np.zeros(0)))
        row[f"survival {condition}"] = m["survival"].get(condition)
        row[f"survival {condition} lo"], row[f"survival {condition} hi"] = lo, hi
    return row


def summary_table(analyses, column: str = "score") -> pd.DataFrame:
    """One row per detector: AP, AP50, AP75, Spearman rho (of `column` with IoU) and divergence with
    95% CIs, survival of iou>0.5 and cls>0.5 boxes through NMS with CIs (None where undefined)."""
    return pd.DataFrame([_headline(a, column) for a in analyses.values()])


def _paired(a: Analysis, b: Analysis) -> bool:
    return (np.array_equal(a.image_ids, b.image_ids) and a.settings.get("seed") == b.settings.get("seed")
            and a.settings.get("bootstrap") == b.settings.get("bootstrap"))


def compare(analyses, reference: str | None = None) -> pd.DataFrame:
    """Differences of the headline numbers of each detector to `reference` (default: the first).

    Rows: detector, reference, quantity, value, reference_value, delta (value - reference),
    ci95_lo, ci95_hi (percentile CI of the bootstrap differences), paired. Paired = both dumps hold
    the same images and were analysed with the same seed and B, so each resample drew the same
    images for both; otherwise the two bootstraps are treated as independent. AP differences have
    no CI (it would take a COCOeval per resample).
    """
    names = list(analyses)
    reference = names[0] if reference is None else reference
    ref = analyses[reference]
    rows = []
    for name in names:
        if name == reference:
            continue
        a = analyses[name]
        paired = _paired(a, ref)
        for key in ("AP", "AP50", "AP75"):
            rows.append(_delta_row(name, reference, key, a.metrics["ap"][key], ref.metrics["ap"][key], None, None, paired))
        keys = [k for k in a.replicates if k in ref.replicates]
        for key in keys:
            kind, what = key.split(":", 1)
            value = _metric_value(a, kind, what)
            ref_value = _metric_value(ref, kind, what)
            ref_reps = ref.replicates[key]
            if not paired:  # decouple the two bootstraps' resample order
                ref_reps = np.random.default_rng(0).permutation(ref_reps)
            n = min(len(a.replicates[key]), len(ref_reps))
            lo, hi = percentile_ci(a.replicates[key][:n] - ref_reps[:n])
            rows.append(_delta_row(name, reference, f"{kind} {what}", value, ref_value, lo, hi, paired))
    return pd.DataFrame(rows, columns=["detector", "reference", "quantity", "value", "reference_value",
                                       "delta", "ci95_lo", "ci95_hi", "paired"])


def _metric_value(analysis: Analysis, kind: str, what: str):
    if kind == "survival":
        return analysis.metrics["survival"].get(what)
    return analysis.metrics["correlation"].get(what, {}).get(kind)


def _delta_row(name, reference, quantity, value, ref_value, lo, hi, paired) -> dict:
    delta = value - ref_value if value is not None and ref_value is not None else None
    return {"detector": name, "reference": reference, "quantity": quantity, "value": value,
            "reference_value": ref_value, "delta": delta, "ci95_lo": lo, "ci95_hi": hi, "paired": paired}
