"""The ledger's truth columns and raw counts on the model's device, a forward pass at a time.

`misalign.truth` defines the numbers (docs/ledger.md: COCO IoU, crowd ignored, strict `>` in the
values' own dtype); this module computes the same numbers with torch where the model ran, so that
the dump's only host work per batch is one copy of compact arrays (docs/architecture.md: the dump).
They are equal bit for bit: the IoU is `misalign.boxes.box_iou`'s float64 formula, one torch op per
numpy op in the same order (IEEE float64 rounds each op alike on every device, and separate torch
ops are never fused), maxima and first-of-equal argmaxes are exact, and counts compare float32 with
float32 thresholds as `misalign.truth.threshold_counts` does. tests/test_truth_device.py checks it.

No op here reads a value back to the host (no `.item()`, `nonzero`, `unique`): sizes come from
tensor shapes and from the ground truth, which the host knows.

Public API:
- GroundTruth.upload(gts, device) -> GroundTruth: a batch's ground truth, one host-to-device copy
- candidate_truth(boxes, category, gt, image) -> {iou, gt_id, iou_any, crowd}: `misalign.truth.truth_columns`
- max_iou_any(boxes, gt, image) -> [N] float32: `misalign.truth.max_iou_any`
- raw_count_values(raw_cls, raw_iou, anchor_iou) -> [RAW_COUNT_WIDTH] int64, in `misalign.truth.RAW_COUNT_LAYOUT` order
- to_host(tensors) -> {name: numpy array}: every tensor of a batch in one device-to-host copy (pack, unpack)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from misalign.truth import CROWD_IOU, RAW_COUNT_LAYOUT

PAIRS_PER_BLOCK = 1 << 22  # boxes × ground-truth pairs per IoU block (float64: 32 MB a temporary)


@dataclass
class GroundTruth:
    """The ground truth of a batch's images on the device, crowd and non-crowd apart.

    Rows of all images concatenated; `ordinary[i]` and `crowd[i]` are image i's (start, stop) row
    ranges (host ints, so slicing needs no sync). Boxes xyxy float64, original-image pixels.
    """

    boxes: torch.Tensor  # [G, 4] float64, non-crowd
    category: torch.Tensor  # [G] int64
    ann_id: torch.Tensor  # [G] int64
    crowd_boxes: torch.Tensor  # [R, 4] float64
    crowd_category: torch.Tensor  # [R] int64
    ordinary: list[tuple[int, int]]
    crowd: list[tuple[int, int]]

    @classmethod
    def upload(cls, gts: list[dict], device) -> "GroundTruth":
        """gts: per image `misalign.coco.ground_truth_by_image` entries (boxes, category_id, ann_id, iscrowd)."""
        crowd_of = [np.asarray(gt["iscrowd"], bool).reshape(-1) for gt in gts]
        pick = {True: [], False: []}
        for gt, is_crowd in zip(gts, crowd_of):
            boxes = np.asarray(gt["boxes"], np.float64).reshape(-1, 4)
            for crowd in (False, True):
                rows = is_crowd == crowd
                pick[crowd].append(np.column_stack([boxes[rows], np.asarray(gt["category_id"])[rows],
                                                    np.asarray(gt["ann_id"])[rows]]).astype(np.float64))
        # one float64 table for all of it (ids < 2^53 are exact), copied in one go
        tables = {crowd: np.concatenate(parts) if parts else np.zeros((0, 6)) for crowd, parts in pick.items()}
        host = torch.from_numpy(np.concatenate([tables[False], tables[True]]))
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        table = host.to(device, non_blocking=True)
        ordinary, crowd = table[:len(tables[False])], table[len(tables[False]):]
        return cls(boxes=ordinary[:, :4], category=ordinary[:, 4].long(), ann_id=ordinary[:, 5].long(),
                   crowd_boxes=crowd[:, :4], crowd_category=crowd[:, 4].long(),
                   ordinary=_ranges([len(p) for p in pick[False]]), crowd=_ranges([len(p) for p in pick[True]]))


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    ends = np.cumsum([0, *sizes]).tolist()
    return list(zip(ends[:-1], ends[1:]))


def _area(boxes: torch.Tensor) -> torch.Tensor:
    wh = (boxes[:, 2:4] - boxes[:, :2]).clamp(min=0)
    return wh[:, 0] * wh[:, 1]


def _intersection(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """[N, M] float64 intersection areas, as misalign.boxes.box_iou computes them."""
    top_left = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], others[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """[N, 4], [M, 4] float64 xyxy -> [N, M] float64 IoU: misalign.boxes.box_iou op for op."""
    inter = _intersection(boxes, others)
    union = _area(boxes)[:, None] + _area(others)[None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros((), dtype=inter.dtype, device=inter.device))


def _blocks(num: int, width: int):
    """Row slices of at most PAIRS_PER_BLOCK / width rows: bounded memory for [rows, width] temporaries."""
    step = max(1, PAIRS_PER_BLOCK // max(width, 1))
    return [slice(start, start + step) for start in range(0, num, step)]


def max_iou_any(boxes: torch.Tensor, gt: GroundTruth, image: int) -> torch.Tensor:
    """[N] float32: each box's max IoU with a non-crowd gt box of `image` (0 if it has none)."""
    start, stop = gt.ordinary[image]
    if stop == start:
        return torch.zeros(len(boxes), dtype=torch.float32, device=boxes.device)
    others = gt.boxes[start:stop]
    blocks = [box_iou(boxes[rows], others).amax(dim=1) for rows in _blocks(len(boxes), stop - start)]
    return torch.cat(blocks).float() if blocks else torch.zeros(0, dtype=torch.float32, device=boxes.device)


def candidate_truth(boxes: torch.Tensor, category: torch.Tensor, gt: GroundTruth, image: int) -> dict[str, torch.Tensor]:
    """The truth columns of N candidates of `image` (boxes [N, 4] float64, category [N] dataset ids):
    iou, gt_id, iou_any as `misalign.truth.match_truth`, crowd as `misalign.truth.crowd_ignored`."""
    num, device = len(boxes), boxes.device
    start, stop = gt.ordinary[image]
    if stop == start:
        iou = torch.zeros(num, dtype=torch.float32, device=device)
        gt_id = torch.full((num,), -1, dtype=torch.int64, device=device)
        iou_any = iou.clone()
    else:
        pairwise = box_iou(boxes, gt.boxes[start:stop])  # [N, M]
        same = torch.where(category[:, None] == gt.category[None, start:stop], pairwise,
                           torch.zeros((), dtype=pairwise.dtype, device=device))
        best = same.argmax(dim=1)  # the first of equal maxima, as numpy's argmax
        best_iou = same.gather(1, best[:, None]).squeeze(1)
        gt_id = torch.where(best_iou > 0, gt.ann_id[start:stop][best], torch.full_like(best, -1))
        iou, iou_any = best_iou.float(), pairwise.amax(dim=1).float()
    return {"iou": iou, "gt_id": gt_id, "iou_any": iou_any, "crowd": _crowd_ignored(boxes, category, iou, gt, image)}


def _crowd_ignored(boxes, category, iou, gt: GroundTruth, image: int) -> torch.Tensor:
    """[N] bool: misalign.truth.crowd_ignored (covered >= CROWD_IOU by a crowd region of its category,
    and iou < CROWD_IOU)."""
    start, stop = gt.crowd[image]
    if stop == start:
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    regions = gt.crowd_boxes[start:stop]
    own_area = _area(boxes)[:, None]
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    cover = torch.where(own_area > 0, _intersection(boxes, regions) / own_area, zero)
    same = category[:, None] == gt.crowd_category[None, start:stop]
    covered = (torch.where(same, cover, zero) >= CROWD_IOU).any(dim=1)
    return covered & (iou < torch.tensor(CROWD_IOU, dtype=torch.float32, device=boxes.device))


def raw_count_values(raw_cls: torch.Tensor, raw_iou: torch.Tensor, anchor_iou: torch.Tensor) -> torch.Tensor:
    """[RAW_COUNT_WIDTH] int64: one image's raw counts (values > each threshold, compared in float32;
    NaN counts nowhere) in `misalign.truth.RAW_COUNT_LAYOUT` order."""
    values = {"raw_cls": raw_cls, "raw_iou": raw_iou, "anchor_iou": anchor_iou}
    counts = []
    for source, _, _, thresholds in RAW_COUNT_LAYOUT:
        column = values[source].float()
        limits = torch.tensor(thresholds, dtype=torch.float32, device=column.device)
        counts.append((column[:, None] > limits[None, :]).sum(dim=0))
    return torch.cat(counts).long()


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every tensor as a numpy array, in one device-to-host copy (the batch's one sync).

    On the CPU nothing is copied; elsewhere `pack` puts all the bytes in one buffer.
    """
    if all(t.device.type == "cpu" for t in tensors.values()):
        return {name: t.numpy() for name, t in tensors.items()}
    buffer, layout = pack(tensors)
    return unpack(buffer.cpu().numpy(), layout)


def pack(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """(one uint8 tensor on the tensors' device holding every tensor's bytes, each piece padded to 8
    bytes so that every piece stays aligned; the layout `unpack` reads it back with)."""
    pieces, layout, offset = [], [], 0
    for name, tensor in tensors.items():
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        padded = -len(flat) % 8
        pieces.append(torch.cat([flat, flat.new_zeros(padded)]) if padded else flat)
        layout.append((name, offset, _NUMPY[tensor.dtype], tuple(tensor.shape)))
        offset += len(flat) + padded
    return torch.cat(pieces), layout


def unpack(buffer: np.ndarray, layout: list) -> dict[str, np.ndarray]:
    """The arrays of a `pack`ed buffer copied to the host: views with their dtypes and shapes."""
    return {name: buffer[start:start + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize]
            .view(dtype).reshape(shape) for name, start, dtype, shape in layout}


_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32,
          torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}
