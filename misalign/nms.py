"""Greedy per-(image, category) NMS on numpy arrays: the only module of misalign that uses torch.

torchvision's `nms` kernel is the NMS every ledger records (the bundled detector's postprocess runs
it), so re-running NMS on a ledger (misalign.rescore) or building one from another detector's
candidates (misalign.importer) calls the same kernel, here, rather than a re-implementation that
could disagree right at the threshold. Every other misalign module imports no torch, and the two
that need NMS import this module inside the functions that run it (docs/architecture.md;
tests/test_boundaries.py checks it).

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

Public API:
- CHUNK_ROWS
- plan_nms(image_id, category_id, boxes) -> NmsPlan; nms_survivors(plan, scores, nms_thresh) -> [N] bool
- nms_clusters(plan, scores, nms_thresh) -> ([N] bool survivor, [N] int64 suppressor row)
- nms_with_attribution(boxes, scores, categories, nms_thresh, max_det) -> ([N] kept, [N] suppressed_by), one image
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import nms

from misalign.boxes import nms_suppressors

log = logging.getLogger(__name__)

CHUNK_ROWS = 256  # rows per torchvision nms call (whole groups); 128-512 measured equally fast
_OFFSET_LIMIT = 2 ** 24  # shifted coordinates stay below this (float64 then holds float32 values exactly)


# --- the pool of a ledger, batched ---------------------------------------------------------------



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
    sorted_scores = torch.from_numpy(np.ascontiguousarray(np.asarray(scores, np.float64)[plan.order]))  # [N]
    for boxes, start in zip(plan.chunks, plan.starts.tolist()):
        call_scores = sorted_scores[start:start + len(boxes)]
        yield start, boxes, call_scores, nms(boxes, call_scores, float(nms_thresh))


def nms_survivors(plan: NmsPlan, scores, nms_thresh: float) -> np.ndarray:
    """[N] bool, row order: the survivors of greedy NMS per (image, category) ranked by `scores` [N].

    torchvision.ops.nms per call of the plan (IoU > nms_thresh suppresses; ties in row order).
    """
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


# --- one image, with who suppressed whom -----------------------------------------------------


def nms_with_attribution(boxes, scores, categories, nms_thresh: float = 0.5, max_det: int = 100):
    """Greedy per-class NMS of one image and who suppressed whom.

    boxes [N, 4] xyxy (float64 used throughout, so the NMS and the attribution see the same IoU),
    scores [N], categories [N], rows ranked by score descending with ties in row order (the caller
    sorts; this is torchvision's stable order). Returns kept [N] bool (NMS survivors among the best
    `max_det` survivors) and suppressed_by [N] int64: the row of the highest-ranked survivor of the
    same class with IoU > nms_thresh; -1 for every survivor (kept or cut by max_det).
    NMS is torchvision.ops.nms called per class: the same greedy
    algorithm as batched_nms, without its coordinate-offset trick, whose shifted float values could
    make the attribution's IoU disagree with the NMS's right at the threshold.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64)
    categories = np.asarray(categories)
    num = len(scores)
    survivor = np.zeros(num, bool)
    for category in np.unique(categories):
        rows = np.flatnonzero(categories == category)
        if len(rows) == 1:
            survivor[rows] = True
            continue
        keep = nms(torch.from_numpy(boxes[rows]), torch.from_numpy(scores[rows]), float(nms_thresh))
        survivor[rows[keep.numpy()]] = True
    survivors = np.flatnonzero(survivor)  # rank order
    kept = np.zeros(num, bool)
    kept[survivors[:max_det]] = True
    suppressed_by = nms_suppressors(boxes, categories, survivor, nms_thresh)
    missing = ~survivor & (suppressed_by < 0)
    if np.any(missing):  # cannot happen with a stable sort; keep the contract if it does
        log.warning("%d suppressed boxes without a suppressor found; recorded as -1", int(missing.sum()))
    return kept, suppressed_by
