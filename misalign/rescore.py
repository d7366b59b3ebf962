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

How the NMS is batched. One `torchvision.ops.nms` call over the whole pool with batched_nms's
coordinate offset cannot work on a COCO-sized pool (5 M candidates in 400 k (image, category)
groups): the CPU kernel compares every survivor with every later box whatever its group, about
10^13 comparisons; `batched_nms` itself switches to one call per group beyond 1,000 boxes on CPU,
each call scanning the whole index (400 k × 5 M); and offsets of up to 400 k × 1,334 px leave
float32 far too coarse. A Python loop over (image, category) groups would be exact but costs
~17 µs of call overhead per group (7 s per ranking). So the groups, sorted by (image, category),
are packed into chunks of whole groups of about CHUNK_ROWS rows; within a chunk each group is
shifted by (its index in the chunk) × `span`, a power of two larger than the pool's coordinate
extent (batched_nms's trick with small offsets), in float64, and shifted coordinates stay below
2^24. Such a shift is used only where it is exact, which is checked row by row rather than
assumed: (shifted − offset) == original. (The subtraction back is itself exact, the offset being
an integer and the shifted value a multiple of its own ulp, so the check fails exactly where the
addition rounded.) Where every coordinate of a chunk shifts exactly, the kernel computes bit for
bit the IoUs of per-group NMS on the unshifted boxes (translation commutes with max/min and the
differences are the same reals, rounded once), groups never overlap, and one call per chunk keeps
exactly what per-(image, category) torchvision NMS keeps: ~20 k calls, about 2 s per ranking on a
COCO-sized pool, where the COCOeval of each ranking's kept boxes takes ~10 s. A float32 value is
a multiple of 2^-29 when its magnitude is at least 2^-6 px, below 2^24 float64 holds those sums
exactly, so ledgers of float32 boxes (the bundled detector's, widened to float64) always take this
path. An arbitrary float64 coordinate (a two-decimal 10.37 carries 53 significant bits) does not
survive the addition of 2^20: a chunk holding one such row falls back to one `nms` call per group
of two or more rows on the unshifted boxes (a lone box always survives, no call), exact again, at
the loop's ~17 µs per group.

The IoU-guided oracle needs to know which survivor suppressed which box. Per call, the IoU of
every (survivor, suppressed) pair is recomputed on the same boxes with the kernel's own operations
in the kernel's order, so the attribution sees the NMS's IoUs bit for bit: a suppressed box belongs
to the first survivor in NMS order, ranked before it, with IoU > nms_thresh. The pairs span a whole
chunk (its groups are apart, so cross-group pairs have IoU 0), which makes oracle_nms cost about four
times one ranking's NMS, once per dump.

torch is needed for the NMS only (imported lazily, as in misalign.importer).

Public API:
- DEFAULT_ALPHAS, RESCORE_COLUMNS, CHUNK_ROWS, DEFAULT_MAX_DET
- alpha_key(alpha) -> "alpha=0.4"; parse_alphas(text) -> tuple; ranking_names(alphas, has_obj=True) -> list
- parse_rescore_thresh(value) -> float | None
- unavailable_reason(meta) -> str | None; nms_settings(meta) -> dict
- ranking_scores(candidates, alphas) -> ({ranking: [N] score}, {ranking: why skipped})
- plan_nms(image_id, category_id, boxes) -> NmsPlan; nms_survivors(plan, scores, nms_thresh) -> [N] bool
- nms_clusters(plan, scores, nms_thresh) -> ([N] bool survivor, [N] int64 suppressor row)
- cap_per_image(image_id, scores, survivor, max_det) -> [N] bool
- rescored_kept(candidates, scores, nms_thresh, max_det, plan=None, pool=None) -> [N] bool
- oracle_nms_kept(candidates, nms_thresh, max_det, plan=None, pool=None) -> ([N] bool, [N] score)
- rescore(ledger, gt=None, *, alphas, rescore_thresh=None, actual_ap=None, ap_backend="auto") -> RescoreResult
- unavailable_metrics() -> {"rescoring": {}, "ap_lost_to_misalignment": None, "ap_gap_to_oracle_ranking": None}
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from misalign.errors import InputError
from misalign.ledger import Ledger, read_ledger

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = tuple(i / 10 for i in range(10))  # 0, 0.1, ..., 0.9: the paper's Table 5 grid
RESCORE_COLUMNS = ("image_id", "category_id", "x1", "y1", "x2", "y2", "w", "h", "cls_score", "obj_score",
                   "score", "kept", "iou")  # the candidates columns rescoring reads
CHUNK_ROWS = 256  # rows per torchvision nms call (whole groups); 128-512 measured equally fast
DEFAULT_MAX_DET = 100  # when meta.json has no postprocess.max_det (COCO's maxDets)
AP_KEYS = ("AP", "AP50", "AP75")  # what each ranking reports
ORACLES = ("oracle_nms", "oracle")  # rankings that read the true IoU, in table order
_OFFSET_LIMIT = 2 ** 24  # shifted coordinates stay below this (float64 then holds float32 values exactly)


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


# --- NMS -----------------------------------------------------------------------------------------


@dataclass
class NmsPlan:
    """The pool grouped by (image, category) for NMS, ranking-independent (built once per dump).

    Sorted positions hold the rows by (image, category, row). Each `nms` call covers consecutive
    sorted positions: a chunk of whole groups, each offset within it, where every shift is exact;
    otherwise one group of two or more rows, unshifted. One-row groups of such chunks need no call.
    """

    order: np.ndarray  # [N] pool row at each sorted position
    chunks: list  # [C] torch float64 [n_c, 4] boxes of each nms call (offset groups, or one unshifted group)
    starts: np.ndarray  # [C] first sorted position of each call
    singles: np.ndarray  # [M] sorted positions of one-row groups outside every call (they always survive)
    span: float  # offset between consecutive groups of a chunk (px, a power of two)
    inexact_chunks: int = 0  # chunks that fell back to per-group calls (some shifted coordinate rounded)


def _group_starts(image_id: np.ndarray, category_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row order sorted by (image, category, row) [N] and the first sorted position of each group [G]."""
    rows = np.arange(len(image_id))
    order = np.lexsort((rows, category_id, image_id))
    img, cat = image_id[order], category_id[order]
    changed = (img[1:] != img[:-1]) | (cat[1:] != cat[:-1])
    return order, np.r_[0, np.flatnonzero(changed) + 1].astype(np.int64)


def _chunk_layout(group_starts: np.ndarray, chunk_rows: int):
    """Chunk start positions [C], each group's index within its chunk [G] and each group's chunk [G].

    A group joins the chunk its first position falls in (position // chunk_rows), so a chunk holds
    at most chunk_rows groups and may run past chunk_rows rows by its last group only.
    """
    chunk_of_group = group_starts // chunk_rows  # [G]
    first_group = np.r_[0, np.flatnonzero(np.diff(chunk_of_group)) + 1]  # [C]
    groups_per_chunk = np.diff(np.r_[first_group, len(group_starts)])  # [C]
    local = np.arange(len(group_starts)) - np.repeat(first_group, groups_per_chunk)  # [G]
    return group_starts[first_group], local, np.repeat(np.arange(len(first_group)), groups_per_chunk)


def plan_nms(image_id, category_id, boxes, chunk_rows: int = CHUNK_ROWS) -> NmsPlan:
    """Group the pool for `nms_survivors` (see the module doc for the offsets and when they are used).

    image_id, category_id [N]; boxes [N, 4] x1, y1, x2, y2 in pixels (float32 or float64).
    """
    import torch

    image_id, category_id = np.asarray(image_id), np.asarray(category_id)
    boxes = np.asarray(boxes).reshape(-1, 4)
    num = len(image_id)
    if num == 0:
        return NmsPlan(order=np.zeros(0, np.int64), chunks=[], starts=np.zeros(0, np.int64),
                       singles=np.zeros(0, np.int64), span=1.0)
    order, group_starts = _group_starts(image_id, category_id)
    shift = math.floor(float(boxes[:, :2].min()))  # all shifted coordinates >= 0, so offset groups never meet
    extent = float(boxes[:, 2:].max()) - shift
    span = 2.0 ** max(0, math.ceil(math.log2(extent + 1.0)))  # > extent
    chunk_rows = int(max(1, min(chunk_rows, _OFFSET_LIMIT // span)))  # (groups per chunk) * span <= 2^24
    starts, local, chunk_of_group = _chunk_layout(group_starts, chunk_rows)
    group_sizes = np.diff(np.r_[group_starts, num])  # [G]
    offset = np.repeat(local * span - shift, group_sizes)[:, None]  # [N, 1] integers, exact in float64
    original = boxes[order].astype(np.float64)  # [N, 4]
    shifted = original + offset  # [N, 4]
    exact_row = ((shifted - offset) == original).all(axis=1)  # [N] the addition did not round
    exact_chunk = np.logical_and.reduceat(exact_row, starts)  # [C]
    ends = np.r_[starts[1:], num]
    calls = [(s, shifted[s:e]) for s, e in zip(starts[exact_chunk].tolist(), ends[exact_chunk].tolist())]
    # a chunk with a rounded coordinate: its groups one by one on the original boxes
    fallback = ~exact_chunk[chunk_of_group]  # [G]
    multi = fallback & (group_sizes > 1)
    calls += [(s, original[s:s + n]) for s, n in zip(group_starts[multi].tolist(), group_sizes[multi].tolist())]
    calls.sort(key=lambda call: call[0])
    singles = group_starts[fallback & (group_sizes == 1)]
    if not exact_chunk.all():
        log.debug("NMS plan: %d of %d chunks shift inexactly (float64 coordinates); %d per-group calls instead",
                  int((~exact_chunk).sum()), len(starts), int(multi.sum()))
    return NmsPlan(order=order, chunks=[torch.from_numpy(np.ascontiguousarray(b)) for _, b in calls],
                   starts=np.array([s for s, _ in calls], np.int64), singles=singles.astype(np.int64), span=span,
                   inexact_chunks=int((~exact_chunk).sum()))


def _calls(plan: NmsPlan, scores, nms_thresh: float):
    """Yield (first sorted position, boxes [n, 4] tensor, scores [n] tensor, keep [k] tensor) per nms call.

    keep: positions within the call in NMS order (score descending, ties in row order).
    """
    import torch
    from torchvision.ops import nms

    sorted_scores = torch.from_numpy(np.ascontiguousarray(np.asarray(scores, np.float64)[plan.order]))  # [N]
    for boxes, start in zip(plan.chunks, plan.starts.tolist()):
        call_scores = sorted_scores[start:start + len(boxes)]
        yield start, boxes, call_scores, nms(boxes, call_scores, float(nms_thresh))


def nms_survivors(plan: NmsPlan, scores, nms_thresh: float) -> np.ndarray:
    """[N] bool, row order: the survivors of greedy NMS per (image, category) ranked by `scores` [N].

    torchvision.ops.nms per call of the plan (IoU > nms_thresh suppresses; ties in row order).
    """
    import torch

    num = len(plan.order)
    survivor = np.zeros(num, bool)
    if num == 0:
        return survivor
    starts, keeps = [], []
    for start, _, _, keep in _calls(plan, scores, nms_thresh):
        starts.append(start)
        keeps.append(keep)
    if keeps:
        lengths = torch.tensor([len(k) for k in keeps])
        positions = torch.cat(keeps) + torch.tensor(starts, dtype=torch.int64).repeat_interleave(lengths)
        survivor[plan.order[positions.numpy()]] = True
    survivor[plan.order[plan.singles]] = True
    return survivor


def _kernel_iou(first: np.ndarray, later: np.ndarray) -> np.ndarray:
    """[K, 4], [S, 4] xyxy float64 -> [K, S] IoU, computed as torchvision's CPU nms kernel does.

    Same operations in the same order (area (x2 − x1)·(y2 − y1), w = max(0, min x2 − max x1),
    inter / ((area_first + area_later) − inter)), so a comparison with the threshold agrees with
    the NMS's bit for bit; no clipping of areas (the kernel has none). 0/0 gives NaN, never > thresh.
    """
    area_first = (first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1])  # [K]
    area_later = (later[:, 2] - later[:, 0]) * (later[:, 3] - later[:, 1])  # [S]
    w = np.maximum(0.0, np.minimum(first[:, None, 2], later[None, :, 2]) - np.maximum(first[:, None, 0], later[None, :, 0]))
    h = np.maximum(0.0, np.minimum(first[:, None, 3], later[None, :, 3]) - np.maximum(first[:, None, 1], later[None, :, 1]))
    inter = w * h  # [K, S]
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / ((area_first[:, None] + area_later[None, :]) - inter)


def nms_clusters(plan: NmsPlan, scores, nms_thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS per (image, category) as `nms_survivors`, and who suppressed whom.

    scores [N]. Returns survivor [N] bool and suppressor [N] int64 (row order): the row of the first
    survivor, in NMS order, ranked before the row with IoU > nms_thresh; -1 for survivors.
    """
    num = len(plan.order)
    survivor = np.zeros(num, bool)
    suppressor = np.full(num, -1, np.int64)
    for start, boxes, call_scores, keep in _calls(plan, scores, nms_thresh):
        keep = keep.numpy()  # [K] NMS order
        rows = plan.order[start:start + len(boxes)]  # [n]
        survivor[rows[keep]] = True
        lost = np.setdiff1d(np.arange(len(boxes)), keep)  # [S]
        if not len(lost):
            continue
        rank = np.empty(len(boxes), np.int64)  # [n] NMS order: score descending, ties in row order (stable)
        rank[np.argsort(-call_scores.numpy(), kind="stable")] = np.arange(len(boxes))
        box = boxes.numpy()
        valid = (_kernel_iou(box[keep], box[lost]) > nms_thresh) & (rank[keep][:, None] < rank[lost][None, :])  # [K, S]
        first = valid.argmax(axis=0)  # [S] keep is in NMS order: the first True is the suppressor
        # every suppressed row has one (the IoUs are the kernel's own); -1 would only mark a broken kernel
        suppressor[rows[lost]] = np.where(valid.any(axis=0), rows[keep][first], -1)
    survivor[plan.order[plan.singles]] = True
    return survivor, suppressor


def cap_per_image(image_id, scores, survivor, max_det: int) -> np.ndarray:
    """[N] bool: the survivors among the best `max_det` survivors of their image by score (ties: row order).

    image_id, scores, survivor [N] (row order).
    """
    image_id, scores = np.asarray(image_id), np.asarray(scores, np.float64)
    rows = np.flatnonzero(survivor)  # [S] ascending
    by_score = rows[np.argsort(-scores[rows], kind="stable")]  # [S] score desc, ties in row order
    ranked = by_score[np.argsort(image_id[by_score], kind="stable")]  # [S] by image, then as above
    img = image_id[ranked]
    rank = np.arange(len(ranked)) - np.searchsorted(img, img, side="left")  # [S] 0 = best of its image
    kept = np.zeros(len(survivor), bool)
    kept[ranked[rank < max_det]] = True
    return kept


def _pool_key(scores: np.ndarray, pool) -> np.ndarray:
    """[N] NMS key: `scores` on pool rows, -inf elsewhere (pool [N] bool or None: every row).

    Greedy NMS decides a box from the boxes ranked above it only, so rows ranked below the whole
    pool cannot change which pool rows survive: one plan serves every pool.
    """
    return scores if pool is None else np.where(pool, scores, -np.inf)


def rescored_kept(candidates: pd.DataFrame, scores, nms_thresh: float, max_det: int,
                  plan: NmsPlan | None = None, pool=None) -> np.ndarray:
    """[N] bool: what the detector would keep ranking its pool by `scores` [N] (NMS, then max_det).

    candidates: image_id, category_id, x1..y2 [N]; plan: `plan_nms` of the same rows (built if None);
    pool: [N] bool, the rows that take part (None: all), e.g. score > --rescore-thresh.
    """
    image_id = candidates["image_id"].to_numpy(np.int64)
    if plan is None:
        plan = _plan_of(candidates)
    scores = np.asarray(scores, np.float64)
    survivor = nms_survivors(plan, _pool_key(scores, pool), nms_thresh)
    if pool is not None:
        survivor &= pool
    return cap_per_image(image_id, scores, survivor, max_det)


def oracle_nms_kept(candidates: pd.DataFrame, nms_thresh: float, max_det: int, plan: NmsPlan | None = None,
                    pool=None) -> tuple[np.ndarray, np.ndarray]:
    """IoU-guided NMS (IoU-Net) with the true IoU: (kept [N] bool, detection score [N] float64).

    candidates: image_id, category_id, x1..y2, iou, score [N]. Per (image, category), greedy NMS
    selects by `iou` (ties by `score`, then row order; IoU > nms_thresh suppresses); a survivor's
    detection score is the highest `score` of itself and the rows it suppressed (other rows keep
    their own); then the best max_det survivors of each image by that score (ties in row order).
    pool: [N] bool, the rows that take part (None: all).
    """
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
    return cap_per_image(image_id, cluster, survivor, max_det), cluster


def _plan_of(candidates: pd.DataFrame) -> NmsPlan:
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
    scores, skipped = ranking_scores(cands, alphas)
    own = cands["score"].to_numpy(np.float64)  # [N] the oracles' pool filter
    computed, num_kept, done = {}, {}, {}
    names = [name for name in ranking_names(alphas) if name in scores or name == "oracle_nms"]
    for name in tqdm(names, desc=f"rescoring {ledger.name}", unit="ranking", disable=None):
        filter_by = own if name in ORACLES else scores.get(name)
        pool = None if thresh is None else filter_by > thresh  # [N] strict, like the detector's score_thresh
        if name == "oracle_nms":
            kept, detection = oracle_nms_kept(cands, nms_thresh, max_det, plan, pool)
            computed[name] = _three(evaluate_ap(coco_gt, _scored_rows(cands, kept, detection), image_ids))
            num_kept[name] = int(kept.sum())
            continue
        score = scores[name]
        digest = hashlib.blake2b(_pool_key(score, pool).tobytes(), digest_size=16).digest()
        if digest not in done:
            kept = rescored_kept(cands, score, nms_thresh, max_det, plan, pool)
            done[digest] = (_three(evaluate_ap(coco_gt, _scored_rows(cands, kept, score), image_ids)), int(kept.sum()))
        computed[name], num_kept[name] = done[digest]
    if actual_ap is None:
        actual_ap = evaluate_ap(coco_gt, cands[cands["kept"].to_numpy()], image_ids)
    log.info("rescored %s: %d rankings (%d NMS + COCOeval runs) in %.1f s", ledger.name, len(computed),
             len(done) + 1, time.perf_counter() - start)
    return RescoreResult(rankings=computed, actual=_three(actual_ap), num_kept=num_kept, skipped=skipped,
                         settings=settings)
