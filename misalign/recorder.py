"""`LedgerRecorder`: any detector's evaluation loop writes a ledger (docs/capture.md, docs/ledger.md).

    with LedgerRecorder("dumps/mine", gt="instances_val2017.json", nms_thresh=0.5, max_det=100,
                        detector={"name": "my-retinanet"}) as rec:
        for image_id, out in my_loop():
            rec.add(image_id, boxes_xyxy, category_ids, scores, cls_score=..., obj_score=...)

Per image the caller gives the candidates that entered its NMS: boxes [N, 4] x1, y1, x2, y2 in
original-image pixels, the dataset's category ids [N] and the scores NMS ranked by [N] (numpy or
torch, any device), and optionally what its NMS decided (`kept` [N] bool, `suppressed_by` [N] row
positions, -1 for none). Without `kept` the recorder runs greedy class-wise NMS itself (IoU >
nms_thresh suppresses) and keeps the best `max_det` survivors by score. With `kept` and no
`suppressed_by`, each suppressed row is attributed to the best-scored kept row of its class that
overlaps it by more than nms_thresh (-1 where there is none: the detector's NMS may differ).

The recorder adds the truth columns (iou, gt_id, iou_any, crowd) from the ground truth, numbers the
rows, writes images.parquet for the images added (add an image with no candidates as empty
arrays, so that its misses count), meta.json and detections.json, and streams everything to a
temporary folder that replaces `out` only when the block ends without an exception: an error leaves
nothing half-written. Bad input raises InputError with one line naming the image and the problem.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from misalign.boxes import nms_suppressors
from misalign.coco import ground_truth_by_image, load_coco_json
from misalign.errors import InputError
from misalign.io import atomic_dir
from misalign.ledger import LedgerWriter, images_frame
from misalign.truth import truth_columns

log = logging.getLogger(__name__)

FLUSH_IMAGES = 64  # images buffered per Parquet row group
_OPTIONAL = ("cls_score", "obj_score", "level", "anchor_idx", "cl_nms_score")


def as_numpy(values, dtype=None) -> np.ndarray:
    """A numpy array from a numpy array, a list or a torch tensor on any device (no torch import)."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu()
        if str(values.dtype) in ("torch.bfloat16", "torch.float16"):
            values = values.float()
        values = values.numpy()
    array = np.asarray(values)
    return array if dtype is None else array.astype(dtype)


class LedgerRecorder:
    """Write a ledger from per-image candidates and (optionally) the detector's NMS decisions.

    out: the dump folder (replaced when complete); gt: COCO annotation file (path) the image and
    category ids refer to; nms_thresh, max_det: the NMS the recorder runs where `kept` is not given,
    and the threshold of the suppressor attribution; detector: meta.json's {name, config, ...};
    images, split: the image folder and split name for meta.json `dataset`; postprocess: the
    detector's settings for meta.json (score_thresh, topk, ...; nms_thresh and max_det are filled
    in); extra_meta: further meta.json keys (source, framework versions, weights hash).
    """

    def __init__(self, out, gt, *, nms_thresh: float = 0.5, max_det: int = 100, detector: dict | None = None,
                 images=None, split: str | None = None, postprocess: dict | None = None,
                 extra_meta: dict | None = None, flush_images: int = FLUSH_IMAGES):
        if not 0.0 < float(nms_thresh) <= 1.0:
            raise InputError(f"nms_thresh: {nms_thresh} is not in (0, 1]")
        if int(max_det) < 1:
            raise InputError(f"max_det: {max_det} is not a positive number")
        self.out, self.gt_path = Path(out), Path(gt)
        self.nms_thresh, self.max_det = float(nms_thresh), int(max_det)
        self.gt = load_coco_json(self.gt_path)
        self._gt_by_image = ground_truth_by_image(self.gt)
        self._infos = {int(im["id"]): im for im in self.gt["images"]}
        self._known_categories = np.asarray(sorted(int(c["id"]) for c in self.gt["categories"]), np.int64)
        self._meta = {
            "detector": detector or {"name": self.out.name, "config": None},
            "checkpoint_sha256": None,
            "dataset": {"ann": str(self.gt_path.resolve()), "images": None if images is None else str(Path(images).resolve()),
                        "split": split},
            "postprocess": {"score_thresh": None, "topk": None, "score_formula": None, "alpha": None,
                            **(postprocess or {}), "nms_thresh": self.nms_thresh, "max_det": self.max_det},
            "pre_nms": True,
            **(extra_meta or {}),
        }
        self._flush_images = int(flush_images)
        self._pending: dict[str, list[pd.DataFrame]] = {"candidates": [], "raw_counts": [], "raw": []}
        self._anchor_counts: dict[int, tuple[int, int]] = {}
        self._added: list[int] = []  # image ids in the order added
        self._seen: set[int] = set()
        self._stack: contextlib.ExitStack | None = None
        self._writer: LedgerWriter | None = None

    def __enter__(self) -> "LedgerRecorder":
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_dir(self.out))
        self._writer = self._stack.enter_context(LedgerWriter(tmp))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if exc_type is not None:  # the writer releases its files, atomic_dir discards the folder
            return stack.__exit__(exc_type, exc, tb)
        with stack:  # an error while finishing discards the folder too
            self._finish()
        return False

    @property
    def num_images(self) -> int:
        return len(self._added)

    def add(self, image_id: int, boxes, labels, scores, *, cls_score=None, obj_score=None, level=None,
            anchor_idx=None, cl_nms_score=None, kept=None, survived=None, suppressed_by=None,
            anchor_counts: tuple[int, int] | None = None, raw_counts: pd.DataFrame | None = None,
            raw: pd.DataFrame | None = None) -> None:
        """Record one image's candidates (see the module doc); every image at most once.

        survived [N] bool: the NMS survivors, when the detector's output (`kept`) is a cut of them
        (max-detections): suppressors are then looked for among the survivors, not only the kept.
        For a detector that exposes its anchors (the bundled one): anchor_counts (num_anchors,
        num_pos_anchors) for images.parquet, raw_counts (this image's rows of raw_counts.parquet,
        `misalign.truth.raw_counts_rows`) and raw (its rows of raw.parquet).
        """
        if self._writer is None:
            raise RuntimeError("LedgerRecorder.add: use the recorder in a `with` block")
        image_id = int(image_id)
        frame = self._frame(image_id, boxes, labels, scores, cls_score=cls_score, obj_score=obj_score,
                            level=level, anchor_idx=anchor_idx, cl_nms_score=cl_nms_score)
        order = np.lexsort((np.arange(len(frame)), -frame["score"].to_numpy(np.float32)))  # score desc, stable
        frame = frame.iloc[order].reset_index(drop=True)
        kept_sorted, local_sup = self._nms_columns(image_id, frame, order, kept, survived, suppressed_by)
        gt = self._gt_by_image[image_id]
        truth = truth_columns(frame[["x1", "y1", "x2", "y2"]].to_numpy(), frame["category_id"].to_numpy(),
                              gt["boxes"], gt["category_id"], gt["ann_id"], gt["iscrowd"])
        frame = frame.assign(kept=kept_sorted, suppressed_by=local_sup, **truth)
        self._added.append(image_id)
        self._seen.add(image_id)
        if anchor_counts is not None:
            self._anchor_counts[image_id] = (int(anchor_counts[0]), int(anchor_counts[1]))
        for name, rows in (("candidates", frame), ("raw_counts", raw_counts), ("raw", raw)):
            if rows is not None:
                self._pending[name].append(rows)
        if len(self._pending["candidates"]) >= self._flush_images:
            self._flush()

    def _frame(self, image_id: int, boxes, labels, scores, **optional) -> pd.DataFrame:
        where = f"{self.gt_path.name}: image_id {image_id}"
        if image_id not in self._infos:
            raise InputError(f"{where}: not an image of the ground truth")
        if image_id in self._seen:
            raise InputError(f"{where}: added twice")
        boxes = as_numpy(boxes, np.float64).reshape(-1, 4)  # [N, 4]
        labels = as_numpy(labels).reshape(-1)
        scores = as_numpy(scores, np.float64).reshape(-1)
        num = len(boxes)
        if len(labels) != num or len(scores) != num:
            raise InputError(f"{where}: {num} boxes but {len(labels)} labels and {len(scores)} scores")
        if num and (not np.all(np.isfinite(boxes)) or not np.all(np.isfinite(scores))):
            raise InputError(f"{where}: a box or score is not finite")
        if num and np.any(boxes[:, 2:] < boxes[:, :2]):
            raise InputError(f"{where}: inverted box (x2 < x1 or y2 < y1)")
        if num and (labels.dtype.kind not in "iu" or not np.isin(labels, self._known_categories).all()):
            bad = labels[~np.isin(labels, self._known_categories)] if labels.dtype.kind in "iu" else labels[:1]
            raise InputError(f"{where}: label {bad[0].item()!r} is not a category id of the ground truth (map labels to "
                             "category ids, e.g. with --label-map)")
        frame = pd.DataFrame({"image_id": np.full(num, image_id, np.int64), "category_id": labels.astype(np.int64),
                              "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3],
                              "score": scores})
        frame["cls_score"] = scores
        for name, values in optional.items():
            if values is not None:
                values = as_numpy(values).reshape(-1)
                if len(values) != num:
                    raise InputError(f"{where}: {name} has {len(values)} values for {num} boxes")
                frame[name] = values
        return frame

    def _nms_columns(self, image_id: int, frame: pd.DataFrame, order: np.ndarray, kept, survived, suppressed_by):
        """kept [N] bool and per-image suppressed_by positions [N], in the frame's (sorted) row order."""
        boxes = frame[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
        categories = frame["category_id"].to_numpy()
        if kept is None:
            if suppressed_by is not None:
                raise InputError(f"image_id {image_id}: suppressed_by given without kept")
            from misalign.nms import nms_with_attribution  # torch, only when the recorder runs the NMS

            return nms_with_attribution(boxes, frame["score"].to_numpy(np.float64), categories,
                                        self.nms_thresh, self.max_det)
        kept = as_numpy(kept).reshape(-1).astype(bool)
        if len(kept) != len(frame):
            raise InputError(f"image_id {image_id}: kept has {len(kept)} values for {len(frame)} boxes")
        kept = kept[order]
        if suppressed_by is None:
            survivors = kept if survived is None else as_numpy(survived).reshape(-1).astype(bool)[order] | kept
            return kept, nms_suppressors(boxes, categories, survivors, self.nms_thresh)
        given = as_numpy(suppressed_by, np.int64).reshape(-1)
        if len(given) != len(frame) or np.any((given < -1) | (given >= len(frame))):
            raise InputError(f"image_id {image_id}: suppressed_by must be -1 or a row position of the image")
        position = np.empty(len(order), np.int64)
        position[order] = np.arange(len(order))  # input row -> sorted row
        return kept, np.where(given[order] >= 0, position[np.maximum(given[order], 0)], -1)

    def _flush(self) -> None:
        """Append the buffered images as one row group per file (per-image groups are slow to write)."""
        adders = {"candidates": self._writer.add_candidates, "raw_counts": self._writer.add_raw_counts,
                  "raw": self._writer.add_raw}
        for name, frames in self._pending.items():
            if frames:
                adders[name](pd.concat(frames, ignore_index=True))
                frames.clear()

    def _finish(self) -> None:
        self._flush()
        self._writer.add_images(images_frame([self._infos[i] for i in self._added], self._gt_by_image,
                                             self._anchor_counts or None))
        self._writer.close(self._meta)
        log.info("recorded %d images into %s", len(self._added), self.out)
