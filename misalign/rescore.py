"""Counterfactual rescoring (DESIGN.md §4): re-run NMS on one dump's pre-NMS pool under other rankings.

For each ranking - `cls` (cls_score), `obj` (obj_score), `cls*obj`, `alpha=A` (obj^A · cls^(1−A)
for each A of a grid) and `oracle` (the true `iou`: NMS keeps the best-localised box of each
cluster) - the candidates of candidates.parquet are ranked by that score, greedy NMS runs per
(image, category) with the dump's own `nms_thresh` (IoU > nms_thresh suppresses; torchvision's
`nms`), and the best `max_det` survivors of each image by that score are kept (meta.json
`postprocess`). COCO AP, AP50 and AP75 of the kept boxes, with the ranking score as their detection
score, come from `misalign.metrics.evaluate_ap`. "AP lost to misalignment" = AP(oracle) − AP(actual),
actual being the dump's own kept rows ranked by its own score (metrics.json `ap`). This reproduces
the RetinaNet-Conf paper's Tables 4 and 5 from one dump, without retraining. Scores are float64
computed from the stored float32 columns; ties in a ranking are broken by row order (cand_id order
in a ledger) in the NMS (torchvision sorts stably) and in the max_det cut alike.

How the NMS is batched. One `torchvision.ops.nms` call over the whole pool with batched_nms's
coordinate offset cannot work on a COCO-sized pool (5 M candidates in 400 k (image, category)
groups): the CPU kernel compares every survivor with every later box whatever its group, about
10^13 comparisons; `batched_nms` itself switches to one call per group beyond 1,000 boxes on CPU,
each call scanning the whole index (400 k × 5 M); and offsets of up to 400 k × 1,334 px leave
float32 far too coarse. A Python loop over (image, category) groups would be exact but costs
~17 µs of call overhead per group (7 s per ranking). So the groups, sorted by (image, category),
are packed into chunks of whole groups of about CHUNK_ROWS rows; within a chunk each group is
shifted by (its index in the chunk) × `span`, a power of two larger than the pool's coordinate
extent (batched_nms's trick with small offsets), in float64. The offsets are integers below 2^24,
so a float32 coordinate plus its offset is exact in float64 (for every coordinate that is 0 or at
least 2^-6 px in magnitude): the kernel computes bit for bit the IoUs of per-group NMS on the
unshifted boxes, groups never overlap, and the kept set equals per-(image, category) torchvision
NMS. One `nms` call per chunk: ~20 k calls, about 2 s per ranking on a COCO-sized pool, where the
COCOeval of each ranking's kept boxes takes ~10 s.

torch is needed for the NMS only (imported lazily, as in misalign.importer).

Public API:
- DEFAULT_ALPHAS, RESCORE_COLUMNS, CHUNK_ROWS, DEFAULT_MAX_DET
- alpha_key(alpha) -> "alpha=0.4"; parse_alphas(text) -> tuple; ranking_names(alphas, has_obj=True) -> list
- unavailable_reason(meta) -> str | None; nms_settings(meta) -> dict
- ranking_scores(candidates, alphas) -> ({ranking: [N] score}, {ranking: why skipped})
- plan_nms(image_id, category_id, boxes) -> NmsPlan; nms_survivors(plan, scores, nms_thresh) -> [N] bool
- cap_per_image(image_id, scores, survivor, max_det) -> [N] bool
- rescored_kept(candidates, scores, nms_thresh, max_det, plan=None) -> [N] bool
- rescore(ledger, gt=None, *, alphas, actual_ap=None, ap_backend="auto") -> RescoreResult
- unavailable_metrics() -> {"rescoring": {}, "ap_lost_to_misalignment": None}
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
RESCORE_COLUMNS = ("image_id", "category_id", "x1", "y1", "x2", "y2", "cls_score", "obj_score", "score",
                   "kept", "iou")  # the candidates columns rescoring reads
CHUNK_ROWS = 256  # rows per torchvision nms call (whole groups); 128-512 measured equally fast
DEFAULT_MAX_DET = 100  # when meta.json has no postprocess.max_det (COCO's maxDets)
AP_KEYS = ("AP", "AP50", "AP75")  # what each ranking reports
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
    """Rankings in table order: cls, obj, cls*obj, alpha=... (each α), oracle (obj ones only if has_obj)."""
    with_obj = ["obj", "cls*obj", *(alpha_key(a) for a in alphas)] if has_obj else []
    return ["cls", *with_obj, "oracle"]


def ranking_scores(candidates: pd.DataFrame, alphas=DEFAULT_ALPHAS) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The score of every ranking over the pool, and why rankings were skipped.

    candidates: cls_score, obj_score, iou columns [N] (float32 in a ledger). Returns
    ({ranking: [N] float64}, {ranking: reason}) in `ranking_names` order. Rankings that need
    obj_score are skipped unless it is finite on every row.
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
        skipped = {name: reason for name in ranking_names(alphas) if name not in ("cls", "oracle")}
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

    Sorted positions hold the rows by (image, category, row); chunks are runs of whole groups.
    """

    order: np.ndarray  # [N] pool row at each sorted position
    chunks: list  # [C] torch float64 [n_c, 4] boxes of each chunk, each group offset within it
    starts: np.ndarray  # [C] first sorted position of each chunk
    span: float  # offset between consecutive groups of a chunk (px, a power of two)


def _group_starts(image_id: np.ndarray, category_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row order sorted by (image, category, row) [N] and the first sorted position of each group [G]."""
    rows = np.arange(len(image_id))
    order = np.lexsort((rows, category_id, image_id))
    img, cat = image_id[order], category_id[order]
    changed = (img[1:] != img[:-1]) | (cat[1:] != cat[:-1])
    return order, np.r_[0, np.flatnonzero(changed) + 1].astype(np.int64)


def _chunk_layout(group_starts: np.ndarray, chunk_rows: int):
    """Chunk start positions [C] and each group's index within its chunk [G].

    A group joins the chunk its first position falls in (position // chunk_rows), so a chunk holds
    at most chunk_rows groups and may run past chunk_rows rows by its last group only.
    """
    chunk_of_group = group_starts // chunk_rows  # [G]
    first_group = np.r_[0, np.flatnonzero(np.diff(chunk_of_group)) + 1]  # [C]
    groups_per_chunk = np.diff(np.r_[first_group, len(group_starts)])  # [C]
    local = np.arange(len(group_starts)) - np.repeat(first_group, groups_per_chunk)  # [G]
    return group_starts[first_group], local


def plan_nms(image_id, category_id, boxes, chunk_rows: int = CHUNK_ROWS) -> NmsPlan:
    """Group the pool for `nms_survivors` (see the module doc for the offsets and why they are exact).

    image_id, category_id [N]; boxes [N, 4] x1, y1, x2, y2 in pixels (float32 in a ledger).
    """
    import torch

    image_id, category_id = np.asarray(image_id), np.asarray(category_id)
    boxes = np.asarray(boxes).reshape(-1, 4)
    num = len(image_id)
    if num == 0:
        return NmsPlan(order=np.zeros(0, np.int64), chunks=[], starts=np.zeros(0, np.int64), span=1.0)
    order, group_starts = _group_starts(image_id, category_id)
    shift = math.floor(float(boxes[:, :2].min()))  # all shifted coordinates >= 0, so offset groups never meet
    extent = float(boxes[:, 2:].max()) - shift
    span = 2.0 ** max(0, math.ceil(math.log2(extent + 1.0)))  # > extent
    chunk_rows = int(max(1, min(chunk_rows, _OFFSET_LIMIT // span)))  # (groups per chunk) * span <= 2^24
    starts, local = _chunk_layout(group_starts, chunk_rows)
    group_sizes = np.diff(np.r_[group_starts, num])
    offset = np.repeat(local * span - shift, group_sizes)  # [N] integers, exact in float64
    shifted = boxes[order].astype(np.float64) + offset[:, None]  # [N, 4] one exact addition each
    ends = np.r_[starts[1:], num]
    tensor = torch.from_numpy(shifted)
    return NmsPlan(order=order, chunks=[tensor[s:e] for s, e in zip(starts.tolist(), ends.tolist())],
                   starts=starts, span=span)


def nms_survivors(plan: NmsPlan, scores, nms_thresh: float) -> np.ndarray:
    """[N] bool, row order: the survivors of greedy NMS per (image, category) ranked by `scores` [N].

    torchvision.ops.nms per chunk of the plan (IoU > nms_thresh suppresses; ties in row order).
    """
    import torch
    from torchvision.ops import nms

    num = len(plan.order)
    survivor = np.zeros(num, bool)
    if num == 0:
        return survivor
    sorted_scores = torch.from_numpy(np.ascontiguousarray(np.asarray(scores, np.float64)[plan.order]))  # [N]
    ends = np.r_[plan.starts[1:], num]
    keeps = [nms(boxes, sorted_scores[s:e], float(nms_thresh))
             for boxes, s, e in zip(plan.chunks, plan.starts.tolist(), ends.tolist())]
    lengths = torch.tensor([len(k) for k in keeps])
    positions = torch.cat(keeps) + torch.from_numpy(plan.starts).repeat_interleave(lengths)  # sorted positions
    survivor[plan.order[positions.numpy()]] = True
    return survivor


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


def rescored_kept(candidates: pd.DataFrame, scores, nms_thresh: float, max_det: int,
                  plan: NmsPlan | None = None) -> np.ndarray:
    """[N] bool: what the detector would keep ranking its pool by `scores` [N] (NMS, then max_det).

    candidates: image_id, category_id, x1..y2 [N]; plan: `plan_nms` of the same rows (built if None).
    """
    image_id = candidates["image_id"].to_numpy(np.int64)
    if plan is None:
        plan = plan_nms(image_id, candidates["category_id"].to_numpy(np.int64),
                        candidates[["x1", "y1", "x2", "y2"]].to_numpy())
    return cap_per_image(image_id, scores, nms_survivors(plan, scores, nms_thresh), max_det)


# --- AP of every ranking -------------------------------------------------------------------------


@dataclass
class RescoreResult:
    """The rescoring of one dump."""

    rankings: dict  # ranking -> {"AP", "AP50", "AP75"} (metrics.json 'rescoring'), in ranking_names order
    actual: dict  # the dump's own kept rows: {"AP", "AP50", "AP75"}
    num_kept: dict  # ranking -> boxes kept after NMS and max_det
    skipped: dict = field(default_factory=dict)  # ranking -> why it was not computed
    settings: dict = field(default_factory=dict)  # nms_thresh, max_det, max_det_source, alphas

    @property
    def ap_lost(self) -> float:
        """AP(oracle) − AP(actual): the AP the dump's ranking loses to the best-localised boxes."""
        return self.rankings["oracle"]["AP"] - self.actual["AP"]

    def metrics(self) -> dict:
        """This dump's metrics.json additions: rescoring and ap_lost_to_misalignment."""
        return {"rescoring": self.rankings, "ap_lost_to_misalignment": self.ap_lost}


def unavailable_metrics() -> dict:
    """metrics.json additions of a dump that cannot be rescored."""
    return {"rescoring": {}, "ap_lost_to_misalignment": None}


def _scored_rows(candidates: pd.DataFrame, kept: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The kept rows (image_id, category_id, x1..y2) with `score` replaced by the ranking score."""
    rows = candidates.loc[kept, ["image_id", "category_id", "x1", "y1", "x2", "y2"]]
    return rows.assign(score=scores[kept])


def _three(stats: dict) -> dict:
    return {key: float(stats[key]) for key in AP_KEYS}


def rescore(ledger, gt=None, *, alphas=DEFAULT_ALPHAS, actual_ap: dict | None = None,
            ap_backend: str = "auto") -> RescoreResult:
    """Rescore one ledger (a folder, or a `Ledger` read with at least RESCORE_COLUMNS).

    gt: the COCO ground truth (path or a COCO object from misalign.metrics.load_ground_truth;
    default meta.json dataset.ann). actual_ap: the dump's own `ap` when already computed
    (metrics.json), else evaluated here. InputError for a ledger `unavailable_reason` refuses.
    Rankings with identical scores (alpha=0 and cls) share one NMS and one COCOeval.
    """
    from tqdm import tqdm

    from misalign.metrics import _resolve_gt, check_ground_truth, evaluate_ap

    if not isinstance(ledger, Ledger):
        ledger = read_ledger(ledger, columns=list(RESCORE_COLUMNS))
    reason = unavailable_reason(ledger.meta)
    if reason:
        raise InputError(f"{ledger.folder}: cannot rescore: {reason}")
    coco_gt, gt_name = _resolve_gt(ledger, gt, ap_backend)
    check_ground_truth(ledger, coco_gt, gt_name)
    cands = ledger.candidates
    image_ids = np.sort(ledger.images["image_id"].to_numpy(np.int64))
    settings = {**nms_settings(ledger.meta), "alphas": list(alphas)}
    start = time.perf_counter()
    plan = plan_nms(cands["image_id"].to_numpy(np.int64), cands["category_id"].to_numpy(np.int64),
                    cands[["x1", "y1", "x2", "y2"]].to_numpy())
    scores, skipped = ranking_scores(cands, alphas)
    rankings, num_kept, done = {}, {}, {}
    for name, score in tqdm(scores.items(), desc=f"rescoring {ledger.name}", unit="ranking", disable=None):
        digest = hashlib.blake2b(score.tobytes(), digest_size=16).digest()
        if digest not in done:
            kept = rescored_kept(cands, score, settings["nms_thresh"], settings["max_det"], plan)
            done[digest] = (_three(evaluate_ap(coco_gt, _scored_rows(cands, kept, score), image_ids)), int(kept.sum()))
        rankings[name], num_kept[name] = done[digest]
    if actual_ap is None:
        actual_ap = evaluate_ap(coco_gt, cands[cands["kept"].to_numpy()], image_ids)
    log.info("rescored %s: %d rankings (%d NMS + COCOeval runs) in %.1f s", ledger.name, len(rankings), len(done),
             time.perf_counter() - start)
    return RescoreResult(rankings=rankings, actual=_three(actual_ap), num_kept=num_kept, skipped=skipped,
                         settings=settings)
