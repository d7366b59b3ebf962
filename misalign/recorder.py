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

Off the caller's path. `add` checks the image id and queues the rest (the frame, the NMS columns,
the truth columns, Parquet and detections.json) for one background thread, so the caller's next
forward pass runs meanwhile. The queue holds at most QUEUE_IMAGES images: a slow disk holds the
caller back rather than filling the memory. An error in the thread is raised by the next `add` or
at the end of the block (one line for bad input and for a failed write), and nothing is renamed
into place. `timing()` gives the time the caller spent in the recorder and the thread's time.

In parts (misalign.parts, docs/ledger.md "Dumps in parts"). Given `plan`, every image id of the
split in dump order, the recorder writes parts of `images_per_part` images into `.OUT.parts/` and
assembles OUT when all are there. `resume=True` keeps the parts a stopped run finished (and
refuses, naming the file, a staging folder or ledger of other settings); `todo()` lists the
images still to add, in order. Under torch.distributed give `rank`, `world_size` and `barrier`
(a callable that waits for every process): each process writes its share of the unfinished parts
and rank 0 assembles.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from misalign.boxes import nms_suppressors
from misalign.coco import ground_truth_by_image, load_coco_json
from misalign.errors import InputError
from misalign.io import atomic_dir
from misalign import parts as ledger_parts
from misalign.ledger import LedgerWriter, images_frame
from misalign.truth import positive_anchors, raw_counts_frame, truth_columns

log = logging.getLogger(__name__)

FLUSH_IMAGES = 64  # images buffered per Parquet row group
QUEUE_IMAGES = 32  # images queued for the background thread at most
_OPTIONAL = ("cls_score", "obj_score", "level", "anchor_idx", "cl_nms_score")
_TRUTH = ("iou", "gt_id", "iou_any", "crowd")


def as_numpy(values, dtype=None) -> np.ndarray:
    """A numpy array from a numpy array, a list or a torch tensor on any device (no torch import)."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu()
        if str(values.dtype) in ("torch.bfloat16", "torch.float16"):
            values = values.float()
        values = values.numpy()
    array = np.asarray(values)
    return array if dtype is None else array.astype(dtype)


class _Worker:
    """One background thread running queued calls in order; the first error stops it and is kept.

    `submit` blocks while the queue is full, and raises the thread's error instead of queueing
    behind it; `close` waits for the queue and raises that error too. `busy_s`: time spent in calls.
    """

    def __init__(self, maxsize: int):
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            if self.error is None:  # after an error the rest is drained unrun
                start = time.perf_counter()
                try:
                    call()
                except BaseException as err:  # noqa: BLE001 -- handed to the caller's thread
                    self.error = err
                self.busy_s += time.perf_counter() - start

    def submit(self, call) -> None:
        while True:
            self.raise_error()
            try:
                self._queue.put(call, timeout=0.1)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        if self.error is not None:
            raise _one_line(self.error)

    def close(self) -> None:
        """Run what is queued, stop the thread, raise its error if there was one."""
        self._queue.put(None)
        self._thread.join()
        self.raise_error()

    def abort(self) -> None:
        """Stop after the call in progress, dropping the rest (the caller is failing anyway)."""
        self.error = self.error or _Aborted()
        with contextlib.suppress(queue.Empty):
            while True:  # only this thread puts: once drained, the stop signal fits
                self._queue.get_nowait()
        self._queue.put(None)
        self._thread.join()


class _Aborted(Exception):
    pass


def _one_line(err: BaseException) -> BaseException:
    """Bad input stays InputError; a failed write (disk full, permissions) becomes one line too."""
    if isinstance(err, OSError) and not isinstance(err, InputError):
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        return InputError(f"writing the ledger failed: {where}{err.strerror or err}")
    return err


class _PartWriter:
    """The files of one folder: the whole ledger, or one part of it (first_cand_id from misalign.parts)."""

    def __init__(self, folder: Path, first_cand_id: int, flush_images: int):
        self.writer = LedgerWriter(folder, first_cand_id=first_cand_id)
        self._flush_images = flush_images
        self._pending: dict[str, list[pd.DataFrame]] = {"candidates": [], "raw_counts": [], "raw": []}
        self.anchor_counts: dict[int, tuple[int, int]] = {}
        self.added: list[int] = []

    def add(self, image_id: int, frame: pd.DataFrame, raw_counts, raw, anchor_counts) -> None:
        self.added.append(image_id)
        if anchor_counts is not None:
            self.anchor_counts[image_id] = (int(anchor_counts[0]), int(anchor_counts[1]))
        for name, rows in (("candidates", frame), ("raw_counts", raw_counts), ("raw", raw)):
            if rows is not None:
                self._pending[name].append(rows)
        if len(self._pending["candidates"]) >= self._flush_images:
            self.flush()

    def flush(self) -> None:
        """Append the buffered images as one row group per file (per-image groups are slow to write)."""
        adders = {"candidates": self.writer.add_candidates, "raw_counts": self.writer.add_raw_counts,
                  "raw": self.writer.add_raw}
        for name, frames in self._pending.items():
            if frames:
                adders[name](pd.concat(frames, ignore_index=True))
                frames.clear()

    def close(self, infos: dict, gt_by_image: dict, meta: dict) -> None:
        self.flush()
        self.writer.add_images(images_frame([infos[i] for i in self.added], gt_by_image, self.anchor_counts or None))
        self.writer.close(meta)


class LedgerRecorder:
    """Write a ledger from per-image candidates and (optionally) the detector's NMS decisions.

    out: the dump folder (replaced when complete); gt: COCO annotation file (path) the image and
    category ids refer to; nms_thresh, max_det: the NMS the recorder runs where `kept` is not given,
    and the threshold of the suppressor attribution; detector: meta.json's {name, config, ...};
    images, split: the image folder and split name for meta.json `dataset`; postprocess: the
    detector's settings for meta.json (score_thresh, topk, ...; nms_thresh and max_det are filled
    in); extra_meta: further meta.json keys (source, framework versions, weights hash).
    In parts (see the module doc): plan (image ids in dump order), images_per_part, resume,
    settings (what changes the numbers without being in meta.json: batch size, device; a resumed
    run must have the same), rank, world_size, barrier.
    """

    def __init__(self, out, gt, *, nms_thresh: float = 0.5, max_det: int = 100, detector: dict | None = None,
                 images=None, split: str | None = None, postprocess: dict | None = None,
                 extra_meta: dict | None = None, flush_images: int = FLUSH_IMAGES, plan=None,
                 images_per_part: int = ledger_parts.IMAGES_PER_PART, resume: bool = False,
                 settings: dict | None = None, rank: int = 0, world_size: int = 1, barrier=None):
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
        self._seen: set[int] = set()
        self._stack: contextlib.ExitStack | None = None
        self._worker: _Worker | None = None
        self._sink: _PartWriter | None = None  # the folder being written (in parts: the current part)
        self._critical_s, self._started = 0.0, None
        self._rank, self._world_size = int(rank), int(world_size)
        self._barrier = barrier or (lambda: None)
        self._resume = bool(resume)
        self._plan = None if plan is None else [int(i) for i in plan]
        if self._plan is not None:
            unknown = [i for i in self._plan if i not in self._infos]
            if unknown:
                raise InputError(f"{self.gt_path.name}: image_id {unknown[0]}: not an image of the ground truth")
            self._images_per_part = int(images_per_part)
            self._parts = ledger_parts.plan_parts(len(self._plan), self._images_per_part)
            self._meta["parts"] = {"images_per_part": int(images_per_part), "settings": settings or {}}
            self._staging = ledger_parts.staging_folder(self.out)
            self._mine: list = []  # this process's unfinished parts
            self._expected: collections.deque[int] = collections.deque()  # plan positions still to add

    def __enter__(self) -> "LedgerRecorder":
        self._started = time.perf_counter()
        self._stack = contextlib.ExitStack()
        if self._plan is None:
            tmp = self._stack.enter_context(atomic_dir(self.out))
            self._sink = _PartWriter(tmp, 0, self._flush_images)
        else:
            self._enter_parts()
        self._worker = _Worker(QUEUE_IMAGES)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if exc_type is not None:  # stop the thread, release the files; atomic_dir discards the folder
            self._worker.abort()
            if self._sink is not None:
                self._sink.writer.abort()
            if self._plan is not None:
                self._discard_unfinished()
            return stack.__exit__(exc_type, exc, tb)
        with stack:  # an error while finishing discards the folder too
            try:
                self._worker.close()
            except BaseException:
                if self._sink is not None:
                    self._sink.writer.abort()
                if self._plan is not None:
                    self._discard_unfinished()
                raise
            if self._plan is None:
                self._sink.close(self._infos, self._gt_by_image, self._meta_with_timing())
            else:
                self._finish_parts()
        log.info("recorded %d images into %s", len(self._seen), self.out)
        return False

    @property
    def num_images(self) -> int:
        return len(self._seen)

    def timing(self) -> dict:
        """Seconds since the block began, in the caller's thread inside the recorder (`add`, and what
        the caller adds with `note_critical`), and in the background thread; images added."""
        worker = self._worker.busy_s if self._worker is not None else 0.0
        elapsed = time.perf_counter() - self._started if self._started is not None else 0.0
        return {"seconds": elapsed, "critical_s": self._critical_s, "background_s": worker, "images": len(self._seen)}

    def ground_truth(self, image_id: int) -> dict:
        """The image's ground truth (`misalign.coco.ground_truth_by_image`), for truth columns computed
        by the caller (`add(truth=...)`)."""
        if int(image_id) not in self._infos:
            raise InputError(f"{self.gt_path.name}: image_id {image_id}: not an image of the ground truth")
        return self._gt_by_image[int(image_id)]

    def note_critical(self, seconds: float) -> None:
        """Count ledger work the caller did itself (truth on its device, the copy) as critical-path time."""
        self._critical_s += seconds

    def todo(self) -> list[int]:
        """The image ids this process still has to add, in the order to add them (in parts: this
        process's share of the unfinished parts; otherwise every image of the plan, or [] without one)."""
        if self._plan is None:
            return []
        return [self._plan[position] for position in self._expected]

    def add(self, image_id: int, boxes, labels, scores, *, cls_score=None, obj_score=None, level=None,
            anchor_idx=None, cl_nms_score=None, kept=None, survived=None, suppressed_by=None,
            anchor_counts: tuple[int, int] | None = None, raw_counts=None,
            raw: pd.DataFrame | None = None, truth: dict | None = None) -> None:
        """Record one image's candidates (see the module doc); every image at most once.

        survived [N] bool: the NMS survivors, when the detector's output (`kept`) is a cut of them
        (max-detections): suppressors are then looked for among the survivors, not only the kept.
        For a detector that exposes its anchors (the bundled one): anchor_counts (num_anchors,
        num_pos_anchors) for images.parquet, raw_counts (this image's rows of raw_counts.parquet,
        `misalign.truth.raw_counts_rows`, or its counts in `misalign.truth.RAW_COUNT_LAYOUT` order:
        num_pos_anchors then comes from them) and raw (its rows of raw.parquet). truth: the truth
        columns {iou, gt_id, iou_any, crowd} [N] in the rows' order, computed by the caller exactly
        as `misalign.truth.truth_columns` does (the dump computes them on the model's device).
        """
        start = time.perf_counter()
        if self._worker is None:
            raise RuntimeError("LedgerRecorder.add: use the recorder in a `with` block")
        self._worker.raise_error()
        image_id = int(image_id)
        where = f"{self.gt_path.name}: image_id {image_id}"
        if image_id not in self._infos:
            raise InputError(f"{where}: not an image of the ground truth")
        if image_id in self._seen:
            raise InputError(f"{where}: added twice")
        part = self._next_position(image_id) if self._plan is not None else None
        self._seen.add(image_id)
        arguments = dict(cls_score=cls_score, obj_score=obj_score, level=level, anchor_idx=anchor_idx,
                         cl_nms_score=cl_nms_score, kept=kept, survived=survived, suppressed_by=suppressed_by,
                         anchor_counts=anchor_counts, raw_counts=raw_counts, raw=raw, truth=truth)
        self._worker.submit(lambda: self._record(image_id, part, boxes, labels, scores, **arguments))
        self._critical_s += time.perf_counter() - start

    def _next_position(self, image_id: int):
        """(part, whether this image ends it) for the next image of the plan, which must be `image_id`."""
        if not self._expected:
            raise InputError(f"{self.gt_path.name}: image_id {image_id}: not an image this dump still has to add")
        position = self._expected[0]
        if self._plan[position] != image_id:
            raise InputError(f"{self.gt_path.name}: image_id {image_id}: added out of order "
                             f"(the plan's next image is {self._plan[position]})")
        self._expected.popleft()
        part = self._parts[position // self._images_per_part]
        return part, position == part.start, position == part.stop - 1

    def _record(self, image_id: int, part, boxes, labels, scores, *, kept, survived, suppressed_by, anchor_counts,
                raw_counts, raw, truth, **optional) -> None:
        """The background thread's work for one image: its frame, NMS and truth columns, into the sink."""
        if part is not None and part[1]:
            self._open_part(part[0])
        frame = self._frame(image_id, boxes, labels, scores, **optional)
        order = np.lexsort((np.arange(len(frame)), -frame["score"].to_numpy(np.float32)))  # score desc, stable
        frame = frame.iloc[order].reset_index(drop=True)
        kept_sorted, local_sup = self._nms_columns(image_id, frame, order, kept, survived, suppressed_by)
        frame = frame.assign(kept=kept_sorted, suppressed_by=local_sup, **self._truth(image_id, frame, order, truth))
        if raw_counts is not None and not isinstance(raw_counts, pd.DataFrame):
            anchor_counts = (anchor_counts[0], positive_anchors(raw_counts)) if anchor_counts is not None else None
            raw_counts = raw_counts_frame(image_id, raw_counts)
        self._sink.add(image_id, frame, raw_counts, raw, anchor_counts)
        if part is not None and part[2]:
            self._close_part(part[0])

    def _truth(self, image_id: int, frame: pd.DataFrame, order: np.ndarray, given: dict | None) -> dict:
        if given is not None:
            columns = {name: as_numpy(given[name]).reshape(-1) for name in _TRUTH}
            if any(len(values) != len(frame) for values in columns.values()):
                raise InputError(f"image_id {image_id}: truth columns do not have one value per box")
            return {name: values[order] for name, values in columns.items()}
        gt = self._gt_by_image[image_id]
        return truth_columns(frame[["x1", "y1", "x2", "y2"]].to_numpy(), frame["category_id"].to_numpy(),
                             gt["boxes"], gt["category_id"], gt["ann_id"], gt["iscrowd"])

    def _frame(self, image_id: int, boxes, labels, scores, **optional) -> pd.DataFrame:
        where = f"{self.gt_path.name}: image_id {image_id}"
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

    # --- in parts ---------------------------------------------------------------------------------

    def _manifest(self) -> dict:
        return {"meta": self._meta, "images": self._plan}

    def _enter_parts(self) -> None:
        """Check a resumed run's staging folder (every process), prepare it (rank 0), then share the
        unfinished parts out: the k-th of them to rank k mod world_size."""
        manifest, complete = self._manifest(), False
        if self._resume:
            found = ledger_parts.read_manifest(self._staging)
            if found is not None:
                self._refuse_if_other(found, manifest, self._staging / ledger_parts.MANIFEST, "staging folder")
            elif (self.out / "meta.json").is_file():
                self._refuse_if_other(self._finished_meta(), self._meta, self.out / "meta.json", "ledger")
                complete = True
        if self._rank == 0 and not complete:
            if not self._resume:
                shutil.rmtree(self._staging, ignore_errors=True)
            ledger_parts.remove_stale(self._staging)
            if ledger_parts.read_manifest(self._staging) is None:
                ledger_parts.write_manifest(self._staging, manifest)
        self._barrier()
        done = ledger_parts.finished_parts(self._staging)
        unfinished = [] if complete else [p for p in self._parts if p.name not in done]
        self._complete = complete
        self._mine = unfinished[self._rank::self._world_size]
        self._expected = collections.deque(position for part in self._mine for position in range(part.start, part.stop))
        if complete:
            log.info("%s is complete: nothing to resume", self.out)

    def _finished_meta(self) -> dict:
        meta = json.loads((self.out / "meta.json").read_text())
        return {key: meta.get(key) for key in self._meta}

    @staticmethod
    def _refuse_if_other(found: dict, expected: dict, path: Path, what: str) -> None:
        expected = json.loads(json.dumps(expected))  # as read back from JSON: tuples are lists
        difference = ledger_parts.first_difference(found, expected)
        if difference is not None:
            raise InputError(f"{path}: a {what} of another dump ({difference} differs); "
                             "run without --resume to start over")

    def _part_folder(self, part, finished: bool) -> Path:
        return self._staging / (part.name if finished else f".{part.name}.rank{self._rank}.tmp")

    def _open_part(self, part) -> None:
        folder = self._part_folder(part, finished=False)
        shutil.rmtree(folder, ignore_errors=True)
        self._sink = _PartWriter(folder, part.first_cand_id, self._flush_images)

    def _close_part(self, part) -> None:
        """Finish the part's files and rename its folder into place: from now on a resume keeps it."""
        self._sink.close(self._infos, self._gt_by_image, self._meta)
        self._part_folder(part, finished=False).rename(self._part_folder(part, finished=True))
        self._sink = None

    def _finish_parts(self) -> None:
        """Close this process's empty parts (an empty split), wait for every process, assemble (rank 0)."""
        for part in self._mine:
            if part.start == part.stop:
                self._open_part(part)
                self._close_part(part)
        self._barrier()
        if self._rank == 0 and not self._complete:
            ledger_parts.assemble(self.out, self._staging, self._parts, self._meta_with_timing())
            shutil.rmtree(self._staging, ignore_errors=True)
        self._barrier()

    def _discard_unfinished(self) -> None:
        """After an error: drop the part being written; and the staging folder if it holds nothing
        to resume (bad input before the first part), in a one-process dump."""
        if self._sink is not None:
            shutil.rmtree(self._sink.writer.folder, ignore_errors=True)
            self._sink = None
        if self._world_size == 1 and not ledger_parts.finished_parts(self._staging):
            shutil.rmtree(self._staging, ignore_errors=True)

    def _meta_with_timing(self) -> dict:
        """meta.json's keys, with this process's `timing` (the one part of meta.json that differs
        between runs of the same dump, besides `created`)."""
        timing = self.timing()
        per_image = 1000 / max(timing["images"], 1)
        return {**self._meta, "timing": {
            "seconds": round(timing["seconds"], 3), "images": timing["images"],
            "ledger_critical_ms_per_image": round(timing["critical_s"] * per_image, 3),
            "ledger_background_ms_per_image": round(timing["background_s"] * per_image, 3)}}
