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

The IoU-guided oracle needs to know which survivor suppressed which box. The IoU of every
(survivor, suppressed) pair of a group is recomputed with the kernel's own operations in the
kernel's order, so the attribution sees the NMS's IoUs bit for bit: a suppressed box belongs to the
first survivor in NMS order, ranked before it, with IoU > nms_thresh. The pairs of all groups are
formed at once, in batches (no Python loop over groups or calls).

Public API:
- CHUNK_ROWS
- plan_nms(image_id, category_id, boxes) -> NmsPlan; nms_survivors(plan, scores, nms_thresh, rows=None) -> [N] bool
- nms_clusters(plan, scores, nms_thresh) -> ([N] bool survivor, [N] int64 suppressor row)
- nms_with_attribution(boxes, scores, categories, nms_thresh, max_det) -> ([N] kept, [N] suppressed_by), one image
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision  # noqa: F401 (registers torch.ops.torchvision)

from misalign.boxes import nms_suppressors

log = logging.getLogger(__name__)

# torchvision.ops.nms's kernel, called without its Python wrapper (API-usage logging, checks: ~20 µs
# a call, a second per ranking at 20 k calls)
nms = torch.ops.torchvision.nms
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
    call_boxes: torch.Tensor  # [N, 4] float64 what the nms calls see at each sorted position (shifted, or not)
    starts: np.ndarray  # [C] first sorted position of each call
    ends: np.ndarray  # [C] one past its last
    singles: np.ndarray  # [M] sorted positions of one-row groups outside every call (they always survive)
    span: float  # offset between consecutive groups of a chunk (px, a power of two)
    boxes: np.ndarray  # [N, 4] float64 the boxes at each sorted position, unshifted (for who-suppressed-whom)
    group_starts: np.ndarray  # [G] first sorted position of each (image, category) group
    inexact_chunks: int = 0  # chunks that fell back to per-group calls (some shifted coordinate rounded)


def _group_starts(image_id: np.ndarray, category_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row order sorted by (image, category, row) [N] and the first sorted position of each group [G]."""
    image_id, category_id = np.asarray(image_id, np.int64), np.asarray(category_id, np.int64)
    image_span = int(image_id.max(initial=0)) - int(image_id.min(initial=0)) + 1
    category_span = int(category_id.max(initial=0)) - int(category_id.min(initial=0)) + 1
    if image_span * category_span < 2**62:  # one stable sort of a combined key: ledger rows come grouped
        key = (image_id - image_id.min(initial=0)) * category_span + (category_id - category_id.min(initial=0))
        order = np.argsort(key, kind="stable")  # by image, which is timsort's best case
    else:
        order = np.lexsort((np.arange(len(image_id)), category_id, image_id))
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
        return NmsPlan(order=np.zeros(0, np.int64), call_boxes=torch.zeros((0, 4), dtype=torch.float64),
                       starts=np.zeros(0, np.int64), ends=np.zeros(0, np.int64), singles=np.zeros(0, np.int64),
                       span=1.0, boxes=np.zeros((0, 4)),
                       group_starts=np.zeros(0, np.int64))
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
    # a chunk with a rounded coordinate: its groups one by one on the original boxes
    fallback = ~exact_chunk[chunk_of_group]  # [G]
    multi = fallback & (group_sizes > 1)
    call_starts = np.r_[starts[exact_chunk], group_starts[multi]]
    call_ends = np.r_[ends[exact_chunk], group_starts[multi] + group_sizes[multi]]
    by_start = np.argsort(call_starts, kind="stable")
    exact_position = np.repeat(exact_chunk, np.diff(np.r_[starts, num]))  # [N]
    call_boxes = np.where(exact_position[:, None], shifted, original)  # [N, 4]
    singles = group_starts[fallback & (group_sizes == 1)]
    if not exact_chunk.all():
        log.debug("NMS plan: %d of %d chunks shift inexactly (float64 coordinates); %d per-group calls instead",
                  int((~exact_chunk).sum()), len(starts), int(multi.sum()))
    return NmsPlan(order=order, call_boxes=torch.from_numpy(call_boxes), starts=call_starts[by_start].astype(np.int64),
                   ends=call_ends[by_start].astype(np.int64), singles=singles.astype(np.int64), span=span,
                   boxes=original, group_starts=group_starts, inexact_chunks=int((~exact_chunk).sum()))


def _calls(plan: NmsPlan, scores, nms_thresh: float, rows=None):
    """([n] the sorted positions taking part (every one when rows is None), the survivors of every
    nms call as indices into those positions, concatenated call after call).

    rows: [N] bool (row order), the rows that take part (None: all). It must be closed upwards in
    each group's NMS order (every row ranked above a chosen row of its group is chosen): greedy NMS
    decides a box by the boxes ranked above it only, so the chosen rows survive exactly as they do
    in the whole pool. The chosen rows are gathered once, so each call is two slices and the kernel
    (calls without a chosen row are skipped).
    """
    sorted_scores = np.asarray(scores, np.float64)[plan.order]  # [N]
    if rows is None:
        positions = np.arange(len(plan.order))
        boxes, lo, hi = plan.call_boxes, plan.starts, plan.ends
    else:
        positions = np.flatnonzero(np.asarray(rows, bool)[plan.order])
        boxes = plan.call_boxes[torch.from_numpy(positions)]
        lo, hi = np.searchsorted(positions, plan.starts), np.searchsorted(positions, plan.ends)
    call_scores = torch.from_numpy(np.ascontiguousarray(sorted_scores[positions]))
    thresh = float(nms_thresh)
    with torch.inference_mode():  # no autograd bookkeeping: ~15% of a small call
        kept = [start + nms(boxes[start:end], call_scores[start:end], thresh).numpy()
                for start, end in zip(lo.tolist(), hi.tolist()) if end > start]
    return positions, (np.concatenate(kept) if kept else np.zeros(0, np.int64))


def _singles(plan: NmsPlan, rows=None) -> np.ndarray:
    """Rows (row order) of the one-row groups outside every call: survivors whatever the scores."""
    singles = plan.order[plan.singles]
    return singles if rows is None else singles[np.asarray(rows, bool)[singles]]


def nms_survivors(plan: NmsPlan, scores, nms_thresh: float, rows=None) -> np.ndarray:
    """[N] bool, row order: the survivors of greedy NMS per (image, category) ranked by `scores` [N].

    torchvision.ops.nms per call of the plan (IoU > nms_thresh suppresses; ties in row order).
    rows: [N] bool, only these rows (closed upwards in NMS order, see `_calls`); others are False.
    """
    num = len(plan.order)
    survivor = np.zeros(num, bool)
    if num == 0:
        return survivor
    positions, kept = _calls(plan, scores, nms_thresh, rows)
    survivor[plan.order[positions[kept]]] = True
    survivor[_singles(plan, rows)] = True
    return survivor


def _kernel_iou(first: np.ndarray, later: np.ndarray) -> np.ndarray:
    """[P, 4], [P, 4] xyxy float64 -> [P] IoU of each pair, computed as torchvision's CPU nms kernel does.

    Same operations in the same order (area (x2 − x1)·(y2 − y1), w = max(0, min x2 − max x1),
    inter / ((area_first + area_later) − inter)), so a comparison with the threshold agrees with
    the NMS's bit for bit; no clipping of areas (the kernel has none). 0/0 gives NaN, never > thresh.
    """
    area_first = (first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1])
    area_later = (later[:, 2] - later[:, 0]) * (later[:, 3] - later[:, 1])
    w = np.maximum(0.0, np.minimum(first[:, 2], later[:, 2]) - np.maximum(first[:, 0], later[:, 0]))
    h = np.maximum(0.0, np.minimum(first[:, 3], later[:, 3]) - np.maximum(first[:, 1], later[:, 1]))
    inter = w * h
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / ((area_first + area_later) - inter)


PAIR_BATCH = 1 << 21  # (survivor, suppressed) pairs whose IoU is computed at once (~150 MB of temporaries)


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """[sum(counts)] 0..c-1 for each c of `counts`, concatenated."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)


def nms_clusters(plan: NmsPlan, scores, nms_thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS per (image, category) as `nms_survivors`, and who suppressed whom.

    scores [N]. Returns survivor [N] bool and suppressor [N] int64 (row order): the row of the first
    survivor, in NMS order, ranked before the row with IoU > nms_thresh; -1 for survivors.

    Every (survivor, suppressed) pair of the same group is formed, a batch of groups at a time, and
    its IoU recomputed on the unshifted boxes with the kernel's own operations (shifting exactly
    changes no IoU bit, see the module doc), so the attribution sees the NMS's IoUs bit for bit.
    """
    survivor = nms_survivors(plan, scores, nms_thresh)
    num = len(plan.order)
    suppressor = np.full(num, -1, np.int64)
    if num == 0:
        return survivor, suppressor
    score = np.asarray(scores, np.float64)[plan.order]  # [N] sorted positions from here on
    alive = survivor[plan.order]
    group = np.repeat(np.arange(len(plan.group_starts)), np.diff(np.r_[plan.group_starts, num]))  # [N]
    kept = np.flatnonzero(alive)
    kept = kept[np.lexsort((kept, -score[kept], group[kept]))]  # [K] by group, in NMS order within it
    lost = np.flatnonzero(~alive)  # [S] by group
    num_groups = len(plan.group_starts)
    kept_per_group = np.bincount(group[kept], minlength=num_groups)
    first_kept = np.cumsum(kept_per_group) - kept_per_group  # [G] where a group's survivors start in `kept`
    pairs = kept_per_group[group[lost]]  # [S] candidates for each suppressed position's suppressor
    batch_of = np.cumsum(pairs) // PAIR_BATCH  # [S] lost positions in batches of about PAIR_BATCH pairs
    cuts = np.r_[0, np.flatnonzero(np.diff(batch_of)) + 1, len(lost)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        l_pos = np.repeat(lost[lo:hi], pairs[lo:hi])  # [P] suppressed position of each pair
        k_pos = kept[np.repeat(first_kept[group[lost[lo:hi]]], pairs[lo:hi]) + _ragged_arange(pairs[lo:hi])]
        before = (score[k_pos] > score[l_pos]) | ((score[k_pos] == score[l_pos]) & (k_pos < l_pos))  # NMS order
        valid = np.flatnonzero((_kernel_iou(plan.boxes[k_pos], plan.boxes[l_pos]) > nms_thresh) & before)
        # a suppressed position's pairs run in its group's NMS order: its first valid one is the suppressor
        first = np.r_[True, l_pos[valid[1:]] != l_pos[valid[:-1]]] if len(valid) else np.zeros(0, bool)
        suppressor[plan.order[l_pos[valid[first]]]] = plan.order[k_pos[valid[first]]]
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
