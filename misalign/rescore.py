"""Counterfactual rescoring: re-run NMS on one dump's pre-NMS pool under other rankings (docs/methods.md).

The pool is the dump's own: the candidates of candidates.parquet, which entered NMS by the
detector's score_thresh and top-k. Rescoring never adds a box to it; `rescore_thresh` T (default
None: the pool as it is) re-applies a score threshold, so that a ranking's pool is the rows whose
ranking score is > T (strict, like the detector's score_thresh); the two oracle rankings filter by
the detector's own `score` > T (filtering them by IoU would drop every false positive for free).

Rankings:
- `cls` (cls_score), `obj` (obj_score), `cls*obj`, `alpha=A` (obj^A · cls^(1−A) for each A of a
  grid): the pool is ranked by that score, greedy NMS runs per (image, category) with the dump's
  own `nms_thresh` (IoU > nms_thresh suppresses; torchvision's `nms`), the best `max_det` survivors
  of each image by that score are kept (meta.json `postprocess`) and carry it as detection score.
- `oracle_nms`: the IoU-guided NMS of IoU-Net (Jiang et al. 2018) with the true `iou` as the
  localisation confidence. Per (image, category) NMS selects by `iou` (ties, such as every false
  positive at IoU 0, by the detector's `score`, then row order); each survivor's detection score is
  the highest detector `score` of its cluster (itself and the boxes it suppressed); the best
  `max_det` of each image by that score are kept. It changes which box of a cluster is kept, not
  how clusters rank across the dataset.
- `oracle`: the true `iou` as NMS ranking *and* detection score. Every false positive then scores 0
  and falls below every true positive of the dataset, so this also fixes classification: an upper
  bound, not misalignment.

COCO AP, AP50 and AP75 of each ranking's kept boxes come from `misalign.metrics.evaluate_ap`.
"AP lost to misalignment" = AP(oracle_nms) − AP(actual); the gap to the oracle ranking =
AP(oracle) − AP(actual); actual is the dump's own kept rows ranked by its own score (metrics.json
`ap`). This reproduces the RetinaNet-Conf paper's Tables 4 and 5 from one dump, without retraining.
Scores are float64 computed from the stored float32 columns; ties in a ranking are broken by row
order (cand_id order in a ledger) in the NMS (torchvision sorts stably) and in the max_det cut alike.

The NMS itself (torchvision's kernel, batched over the pool) is misalign.nms, the only torch user of
misalign; this module imports it inside the functions that run NMS.

Public API:
- DEFAULT_ALPHAS, RESCORE_COLUMNS, DEFAULT_MAX_DET
- alpha_key(alpha) -> "alpha=0.4"; parse_alphas(text) -> tuple; ranking_names(alphas, has_obj=True) -> list
- parse_rescore_thresh(value) -> float | None
- unavailable_reason(meta) -> str | None; nms_settings(meta) -> dict
- ranking_scores(candidates, alphas) -> ({ranking: [N] score}, {ranking: why skipped})
- ImageSlots.of(image_id); cap_per_image(image_id, scores, survivor, max_det, slots=None) -> [N] bool
- rescored_kept(candidates, scores, nms_thresh, max_det, plan=None, pool=None) -> [N] bool
- oracle_nms_kept(candidates, nms_thresh, max_det, plan=None, pool=None) -> ([N] bool, [N] score)
- rescore(ledger, gt=None, *, alphas, rescore_thresh=None, actual_ap=None, ap_backend="auto") -> RescoreResult
- unavailable_metrics() -> {"rescoring": {}, "ap_lost_to_misalignment": None, "ap_gap_to_oracle_ranking": None}
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from misalign.errors import InputError
from misalign.ledger import Ledger, read_ledger

log = logging.getLogger(__name__)

PRUNE_DEPTH = 3  # rescoring's NMS runs first on each image's PRUNE_DEPTH x max_det best rows
DEFAULT_ALPHAS = tuple(i / 10 for i in range(10))  # 0, 0.1, ..., 0.9: the paper's Table 5 grid
RESCORE_COLUMNS = ("image_id", "category_id", "x1", "y1", "x2", "y2", "w", "h", "cls_score", "obj_score",
                   "score", "kept", "iou")  # the candidates columns rescoring reads
DEFAULT_MAX_DET = 100  # when meta.json has no postprocess.max_det (COCO's maxDets)
AP_KEYS = ("AP", "AP50", "AP75")  # what each ranking reports
ORACLES = ("oracle_nms", "oracle")  # rankings that read the true IoU, in table order


# --- rankings ------------------------------------------------------------------------------------


def alpha_key(alpha: float) -> str:
    """The ranking name of obj^alpha · cls^(1−alpha): 'alpha=0.4' (f"{alpha:g}")."""
    return f"alpha={alpha:g}"


def parse_alphas(text) -> tuple[float, ...]:
    """α grid from '0,0.1,0.5' (or a sequence of numbers): sorted, each in [0, 1], distinct keys.

    InputError('--alphas: ...') for an empty grid, a non-number, a value outside [0, 1] or two
    values with the same key (e.g. 0.1 and 0.10).
    """
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    if not items or any(item == "" for item in items):
        raise InputError(f"--alphas: {text!r} is not a comma-separated list of numbers")
    try:
        alphas = [float(item) for item in items]
    except (TypeError, ValueError):
        raise InputError(f"--alphas: {text!r} is not a comma-separated list of numbers") from None
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise InputError(f"--alphas: {bad[0]:g} is outside [0, 1]")
    keys = [alpha_key(a) for a in alphas]
    if len(set(keys)) < len(keys):
        raise InputError(f"--alphas: {next(k for k in keys if keys.count(k) > 1)} appears twice")
    return tuple(sorted(alphas))


def ranking_names(alphas=DEFAULT_ALPHAS, has_obj: bool = True) -> list[str]:
    """Rankings in table order: cls, obj, cls*obj, alpha=... (each α), oracle_nms, oracle (obj ones only if has_obj)."""
    with_obj = ["obj", "cls*obj", *(alpha_key(a) for a in alphas)] if has_obj else []
    return ["cls", *with_obj, *ORACLES]


def parse_rescore_thresh(value) -> float | None:
    """The --rescore-thresh T: None (the dump's pool as it is) or a number in [0, 1).

    A ranking's pool is then its rows with ranking score > T (the oracles': detector score > T).
    InputError('--rescore-thresh: ...') for a non-number or a value outside [0, 1).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"--rescore-thresh: {value!r} is not a number")
    try:
        thresh = float(value)
    except (TypeError, ValueError):
        raise InputError(f"--rescore-thresh: {value!r} is not a number") from None
    if not 0.0 <= thresh < 1.0:  # also refuses NaN
        raise InputError(f"--rescore-thresh: {thresh:g} is outside [0, 1)")
    return thresh


def ranking_scores(candidates: pd.DataFrame, alphas=DEFAULT_ALPHAS) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The score of every ranking over the pool, and why rankings were skipped.

    candidates: cls_score, obj_score, iou columns [N] (float32 in a ledger). Returns
    ({ranking: [N] float64}, {ranking: reason}) in `ranking_names` order, without oracle_nms, whose
    detection score comes out of its NMS (`oracle_nms_kept`). Rankings that need obj_score are
    skipped unless it is finite on every row.
    """
    cls = candidates["cls_score"].to_numpy(np.float64)  # [N]
    obj = candidates["obj_score"].to_numpy(np.float64)  # [N]
    scores = {"cls": cls}
    skipped = {}
    finite = np.isfinite(obj)
    if len(obj) and finite.all():
        scores["obj"] = obj
        scores["cls*obj"] = cls * obj
        for alpha in alphas:
            scores[alpha_key(alpha)] = obj ** alpha * cls ** (1.0 - alpha)
    else:
        reason = ("the pool has no candidates" if not len(obj) else
                  "obj_score is NaN throughout (the detector has no object-confidence branch)" if not finite.any()
                  else f"obj_score is NaN on {int((~finite).sum())} of {len(obj)} candidates")
        skipped = {name: reason for name in ranking_names(alphas) if name not in ("cls", *ORACLES)}
    scores["oracle"] = candidates["iou"].to_numpy(np.float64)
    return scores, skipped


# --- settings ------------------------------------------------------------------------------------


def unavailable_reason(meta: dict) -> str | None:
    """Why this ledger cannot be rescored (post-NMS only, or no NMS threshold), or None."""
    if not meta.get("pre_nms", True):
        return ("post-NMS only (meta.json pre_nms is false): its candidates are the detector's final boxes, "
                "so there is no pre-NMS pool to re-run NMS on")
    nms_thresh = (meta.get("postprocess") or {}).get("nms_thresh")
    if not isinstance(nms_thresh, (int, float)) or not 0.0 < nms_thresh <= 1.0:
        return "meta.json postprocess.nms_thresh is unknown, so NMS cannot be re-run with the dump's own setting"
    return None


def nms_settings(meta: dict) -> dict:
    """{nms_thresh, max_det, max_det_source}: the dump's own settings (meta.json postprocess);
    max_det DEFAULT_MAX_DET (source 'default') where the dump does not record a positive one."""
    post = meta.get("postprocess") or {}
    max_det = post.get("max_det")
    known = isinstance(max_det, int) and not isinstance(max_det, bool) and max_det > 0
    return {"nms_thresh": float(post["nms_thresh"]), "max_det": int(max_det) if known else DEFAULT_MAX_DET,
            "max_det_source": "meta.json" if known else "default"}


# --- NMS (misalign.nms) -------------------------------------------------------------------------


@dataclass
class ImageSlots:
    """Each pool row's image (0..I-1) and its slot within the image: the layout of a [I, max rows]
    matrix of the pool's scores, built once per dump."""

    image: np.ndarray  # [N] int64
    slot: np.ndarray  # [N] int64
    rows_per_image: np.ndarray  # [I]

    @classmethod
    def of(cls, image_id) -> "ImageSlots":
        _, image, rows_per_image = np.unique(np.asarray(image_id), return_inverse=True, return_counts=True)
        image = image.reshape(-1)
        order = np.argsort(image, kind="stable")
        slot = np.empty(len(image), np.int64)
        slot[order] = np.arange(len(image)) - np.repeat(np.cumsum(rows_per_image) - rows_per_image, rows_per_image)
        return cls(image=image, slot=slot, rows_per_image=rows_per_image)


    def kth_largest(self, values: np.ndarray, k: int) -> np.ndarray | None:
        """[I] the k-th largest of `values` [N] in each image (-inf where an image has fewer rows), by
        np.partition of a [I, max rows] matrix: linear time, no sort. None when no image has more
        than k rows (nothing to cut) or the images' sizes are too uneven (over 4 cells a row)."""
        widest = int(self.rows_per_image.max(initial=0))
        if k >= widest or len(self.rows_per_image) * widest > 4 * len(values):
            return None
        matrix = np.full((len(self.rows_per_image), widest), -np.inf)
        matrix[self.image, self.slot] = values
        return -np.partition(-matrix, k - 1, axis=1)[:, k - 1]


def best_rows_per_image(slots: ImageSlots, key: np.ndarray, depth: int):
    """[N] bool: each image's rows with `key` at least its depth-th largest (ties: all), or None
    for every row (see ImageSlots.kth_largest).

    Closed upwards in every group's NMS order by `key` (a row ranked above a chosen row has at least
    its key), so `nms_survivors(..., rows=this)` decides the chosen rows exactly.
    """
    kth = slots.kth_largest(key, depth)
    return None if kth is None else key >= kth[slots.image]


def cap_per_image(image_id, scores, survivor, max_det: int, slots: ImageSlots | None = None) -> np.ndarray:
    """[N] bool: the survivors among the best `max_det` survivors of their image by score (ties: row order).

    image_id, scores, survivor [N] (row order); slots: the rows' ImageSlots (built if None).
    The max_det-th best survivor's score is found per image without sorting (ImageSlots.kth_largest);
    only the survivors tied with it are ordered.
    """
    scores = np.asarray(scores, np.float64)
    slots = ImageSlots.of(image_id) if slots is None else slots
    kth = slots.kth_largest(np.where(survivor, scores, -np.inf), max_det)
    if kth is None:  # no image has more than max_det rows
        return np.asarray(survivor, bool).copy()
    limit = kth[slots.image]  # [N]
    above = survivor & (scores > limit)
    tied = np.flatnonzero(survivor & (scores == limit))  # [T] ascending: row order
    room = max_det - np.bincount(slots.image[above], minlength=len(kth))  # [I] places left for ties
    tied = tied[np.argsort(slots.image[tied], kind="stable")]  # by image, row order within
    img = slots.image[tied]
    rank = np.arange(len(tied)) - np.searchsorted(img, img, side="left")  # [T] 0 = first tie of its image
    kept = above
    kept[tied[rank < room[img]]] = True
    return kept


def _pool_key(scores: np.ndarray, pool) -> np.ndarray:
    """[N] NMS key: `scores` on pool rows, -inf elsewhere (pool [N] bool or None: every row).

    Greedy NMS decides a box from the boxes ranked above it only, so rows ranked below the whole
    pool cannot change which pool rows survive: one plan serves every pool.
    """
    return scores if pool is None else np.where(pool, scores, -np.inf)


def rescored_kept(candidates: pd.DataFrame, scores, nms_thresh: float, max_det: int,
                  plan: NmsPlan | None = None, pool=None, slots: ImageSlots | None = None) -> np.ndarray:
    """[N] bool: what the detector would keep ranking its pool by `scores` [N] (NMS, then max_det).

    candidates: image_id, category_id, x1..y2 [N]; plan: `plan_nms` of the same rows (built if None);
    pool: [N] bool, the rows that take part (None: all), e.g. score > --rescore-thresh; slots: the
    rows' ImageSlots (built if None).

    Only the best max_det survivors of an image are kept, so NMS runs first on each image's
    PRUNE_DEPTH × max_det best rows (`best_rows_per_image`: their survival is exact). An image
    whose best rows leave fewer than max_det survivors is run again on all its rows. The result is
    the NMS of every row; the pruning only skips rows that could not be kept.
    """
    from misalign.nms import nms_survivors

    image_id = candidates["image_id"].to_numpy(np.int64)
    plan = _plan_of(candidates) if plan is None else plan
    slots = ImageSlots.of(image_id) if slots is None else slots
    scores = np.asarray(scores, np.float64)
    key = _pool_key(scores, pool)
    chosen = best_rows_per_image(slots, key, PRUNE_DEPTH * max_det)
    survivor = nms_survivors(plan, key, nms_thresh, rows=chosen)
    if pool is not None:
        survivor &= pool
    if chosen is not None:
        num_images = len(slots.rows_per_image)
        short = np.bincount(slots.image[survivor], minlength=num_images) < max_det  # [I]
        short &= np.bincount(slots.image[~chosen], minlength=num_images) > 0  # rows were left out
        if short.any():
            again = short[slots.image]  # [N] every row of those images
            survivor[again] = nms_survivors(plan, key, nms_thresh, rows=again)[again]
            if pool is not None:
                survivor &= pool
    return cap_per_image(image_id, scores, survivor, max_det, slots)


def oracle_nms_kept(candidates: pd.DataFrame, nms_thresh: float, max_det: int, plan: NmsPlan | None = None,
                    pool=None, slots: ImageSlots | None = None) -> tuple[np.ndarray, np.ndarray]:
    """IoU-guided NMS (IoU-Net) with the true IoU: (kept [N] bool, detection score [N] float64).

    candidates: image_id, category_id, x1..y2, iou, score [N]. Per (image, category), greedy NMS
    selects by `iou` (ties by `score`, then row order; IoU > nms_thresh suppresses); a survivor's
    detection score is the highest `score` of itself and the rows it suppressed (other rows keep
    their own); then the best max_det survivors of each image by that score (ties in row order).
    pool: [N] bool, the rows that take part (None: all).
    """
    from misalign.nms import nms_clusters

    image_id = candidates["image_id"].to_numpy(np.int64)
    iou = candidates["iou"].to_numpy(np.float64)  # [N]
    score = candidates["score"].to_numpy(np.float64)  # [N]
    if plan is None:
        plan = _plan_of(candidates)
    by_iou = np.lexsort((np.arange(len(iou)), -score, -iou))  # [N] iou desc, score desc, row
    key = np.empty(len(iou))  # [N] distinct ranks as NMS scores, so torchvision keeps this exact order
    key[by_iou] = np.arange(len(iou), 0, -1, dtype=np.float64)
    survivor, suppressor = nms_clusters(plan, _pool_key(key, pool), nms_thresh)
    if pool is not None:  # rows outside the pool neither survive nor join a cluster
        survivor &= pool
        suppressor[~pool] = -1
    cluster = score.copy()  # [N]
    joined = np.flatnonzero(suppressor >= 0)
    np.maximum.at(cluster, suppressor[joined], score[joined])
    return cap_per_image(image_id, cluster, survivor, max_det, slots), cluster


def _plan_of(candidates: pd.DataFrame) -> NmsPlan:
    from misalign.nms import plan_nms

    return plan_nms(candidates["image_id"].to_numpy(np.int64), candidates["category_id"].to_numpy(np.int64),
                    candidates[["x1", "y1", "x2", "y2"]].to_numpy())


# --- AP of every ranking -------------------------------------------------------------------------


@dataclass
class RescoreResult:
    """The rescoring of one dump."""

    rankings: dict  # ranking -> {"AP", "AP50", "AP75"} (metrics.json 'rescoring'), in ranking_names order
    actual: dict  # the dump's own kept rows: {"AP", "AP50", "AP75"}
    num_kept: dict  # ranking -> boxes kept after NMS and max_det
    skipped: dict = field(default_factory=dict)  # ranking -> why it was not computed
    settings: dict = field(default_factory=dict)  # nms_thresh, max_det, max_det_source, alphas, rescore_thresh

    @property
    def ap_lost(self) -> float:
        """AP(oracle_nms) − AP(actual): the AP NMS loses by keeping other boxes than the best-localised ones."""
        return self.rankings["oracle_nms"]["AP"] - self.actual["AP"]

    @property
    def ap_gap_to_oracle_ranking(self) -> float:
        """AP(oracle) − AP(actual): an upper bound that also fixes classification (false positives score 0)."""
        return self.rankings["oracle"]["AP"] - self.actual["AP"]

    def metrics(self) -> dict:
        """This dump's metrics.json additions: rescoring, ap_lost_to_misalignment, ap_gap_to_oracle_ranking."""
        return {"rescoring": self.rankings, "ap_lost_to_misalignment": self.ap_lost,
                "ap_gap_to_oracle_ranking": self.ap_gap_to_oracle_ranking}


def unavailable_metrics() -> dict:
    """metrics.json additions of a dump that cannot be rescored."""
    return {"rescoring": {}, "ap_lost_to_misalignment": None, "ap_gap_to_oracle_ranking": None}


def _scored_rows(candidates: pd.DataFrame, kept: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The kept rows (image_id, category_id, x1..y2, and w, h where read) with `score` replaced by the ranking score."""
    boxes = [c for c in ("x1", "y1", "x2", "y2", "w", "h") if c in candidates.columns]
    rows = candidates.loc[kept, ["image_id", "category_id", *boxes]]
    return rows.assign(score=scores[kept])


def rescore_workers(num_tasks: int) -> int:
    """Threads for the rankings' NMS: one per core this process may use (at most one per ranking)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(num_tasks, cores))


def _three(stats: dict) -> dict:
    return {key: float(stats[key]) for key in AP_KEYS}


def rescore(ledger, gt=None, *, alphas=DEFAULT_ALPHAS, rescore_thresh=None, actual_ap: dict | None = None,
            ap_backend: str = "auto") -> RescoreResult:
    """Rescore one ledger (a folder, or a `Ledger` read with at least RESCORE_COLUMNS).

    gt: the COCO ground truth (path or a COCO object from misalign.metrics.load_ground_truth;
    default meta.json dataset.ann). rescore_thresh: None (the dump's pool as it is) or T in [0, 1):
    each score-based ranking's pool is its rows with ranking score > T, the oracles' the rows with
    detector score > T. actual_ap: the dump's own `ap` when already computed (metrics.json), else
    evaluated here. InputError for a ledger `unavailable_reason` refuses or a bad rescore_thresh.
    Rankings with identical NMS keys and pools (alpha=0 and cls) share one NMS and one COCOeval.
    """
    from tqdm import tqdm

    from misalign.metrics import _resolve_gt, check_ground_truth, evaluate_ap

    thresh = parse_rescore_thresh(rescore_thresh)
    if not isinstance(ledger, Ledger):
        ledger = read_ledger(ledger, columns=list(RESCORE_COLUMNS))
    reason = unavailable_reason(ledger.meta)
    if reason:
        raise InputError(f"{ledger.folder}: cannot rescore: {reason}")
    coco_gt, gt_name = _resolve_gt(ledger, gt, ap_backend)
    check_ground_truth(ledger, coco_gt, gt_name)
    cands = ledger.candidates
    image_ids = np.sort(ledger.images["image_id"].to_numpy(np.int64))
    settings = {**nms_settings(ledger.meta), "alphas": list(alphas), "rescore_thresh": thresh}
    nms_thresh, max_det = settings["nms_thresh"], settings["max_det"]
    start = time.perf_counter()
    plan = _plan_of(cands)
    slots = ImageSlots.of(cands["image_id"].to_numpy(np.int64))
    scores, skipped = ranking_scores(cands, alphas)
    own = cands["score"].to_numpy(np.float64)  # [N] the oracles' pool filter
    names = [name for name in ranking_names(alphas) if name in scores or name == "oracle_nms"]
    tasks = {}  # NMS key digest -> (its first ranking, pool): rankings with equal keys and pools share one run
    task_of = {}
    for name in names:
        filter_by = own if name in ORACLES else scores.get(name)
        pool = None if thresh is None else filter_by > thresh  # [N] strict, like the detector's score_thresh
        key = b"oracle_nms" if name == "oracle_nms" else _pool_key(scores[name], pool).tobytes()
        task_of[name] = hashlib.blake2b(key, digest_size=16).digest()
        tasks.setdefault(task_of[name], (name, pool))

    def kept_and_scores(name, pool):
        """One ranking's kept rows and their detection scores (NMS only: threads run these side by side)."""
        if name == "oracle_nms":
            return oracle_nms_kept(cands, nms_thresh, max_det, plan, pool, slots)
        return rescored_kept(cands, scores[name], nms_thresh, max_det, plan, pool, slots), scores[name]

    # The NMS kernel and numpy's sorts release the GIL, so rankings run on every core; COCOeval
    # runs in this thread, one ranking at a time, as each NMS finishes (its engines redirect stdout).
    done = {}
    with ThreadPoolExecutor(max_workers=rescore_workers(len(tasks))) as pool_executor:
        futures = {digest: pool_executor.submit(kept_and_scores, *task) for digest, task in tasks.items()}
        for digest, future in tqdm(futures.items(), desc=f"rescoring {ledger.name}", unit="ranking", disable=None):
            kept, detection = future.result()
            done[digest] = (_three(evaluate_ap(coco_gt, _scored_rows(cands, kept, detection), image_ids)),
                            int(kept.sum()))
    computed = {name: done[task_of[name]][0] for name in names}
    num_kept = {name: done[task_of[name]][1] for name in names}
    if actual_ap is None:
        actual_ap = evaluate_ap(coco_gt, cands[cands["kept"].to_numpy()], image_ids)
    log.info("rescored %s: %d rankings (%d NMS + COCOeval runs) in %.1f s", ledger.name, len(computed),
             len(done), time.perf_counter() - start)
    return RescoreResult(rankings=computed, actual=_three(actual_ap), num_kept=num_kept, skipped=skipped,
                         settings=settings)
