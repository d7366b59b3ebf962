"""COCO AP/AR: COCOeval (bbox, maxDets 1/10/100), the only AP misalign reports. Never a hand-written AP.

Two engines compute the same twelve numbers: pycocotools (the reference) and faster-coco-eval
(several times faster on large splits; the tests check it against pycocotools on the same files,
ties on IoU thresholds included). `load_ground_truth` picks one; `evaluate_detections` runs it;
`engine_info` names it for metrics.json. The detections go in as the ledger's own float64 numbers
(x1, y1, w, h, score), so the result equals pycocotools run on the original results file.
"""

from __future__ import annotations

import contextlib
import copy
import io
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from misalign.errors import InputError

# The twelve COCOeval.stats, in pycocotools' order.
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
ENGINES = ("auto", "faster", "pycocotools")  # 'auto': faster-coco-eval when installed


def load_gt_quietly(ann_path):
    """pycocotools.COCO for `ann_path`, without its prints on stdout."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_path))


def load_ground_truth(path, backend: str = "auto"):
    """The COCO ground truth in `path` for AP, as the engine `backend` (ENGINES) reads it.

    InputError if the file is missing or not COCO, or if 'faster' is asked for and not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ground-truth file not found")
    if backend not in ENGINES:
        raise ValueError(f"unknown AP backend {backend!r}")
    loader = load_gt_quietly
    if backend in ("auto", "faster"):
        try:
            from faster_coco_eval import COCO as FasterCOCO
        except ImportError:
            if backend == "faster":
                raise InputError("--ap-backend: faster-coco-eval is not installed") from None
        else:
            loader = FasterCOCO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return loader(str(path))
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a COCO annotation file ({err})") from None


def _is_faster(coco_gt) -> bool:
    return type(coco_gt).__module__.startswith("faster_coco_eval")


def engine_info(coco_gt) -> dict:
    """{"name", "version"} of the engine that evaluates against `coco_gt` (metrics.json `ap_engine`)."""
    name = "faster-coco-eval" if _is_faster(coco_gt) else "pycocotools"
    try:
        return {"name": name, "version": version(name)}
    except PackageNotFoundError:
        return {"name": name, "version": None}


def _empty_results(coco_gt):
    """A results object with no detections: loadRes cannot build one (it reads the first entry)."""
    coco_dt = type(coco_gt)()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                       "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def evaluate_detections(coco_gt, detections: np.ndarray, image_ids=None) -> dict[str, float]:
    """COCOeval (bbox, maxDets 1/10/100) of `detections` against `coco_gt` from `load_ground_truth`.

    detections: [N, 7] float64 rows of image_id, x, y, w, h, score, category_id (pycocotools'
    `loadNumpyAnnotations` layout), boxes in original-image pixels. image_ids: the images to
    evaluate (default: every image of `coco_gt`, so an image with no detection counts its misses).
    Returns the twelve stats under STAT_KEYS, exactly as COCOeval gives them: -1 where it has
    nothing to measure (no ground truth of an area range, or none at all), 0 with no detections.
    """
    from pycocotools.cocoeval import COCOeval

    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 7)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections) if len(detections) else _empty_results(coco_gt)
        if _is_faster(coco_gt):
            from faster_coco_eval import COCOeval_faster

            evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *args: None)
        else:
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {key: float(value) for key, value in zip(STAT_KEYS, evaluator.stats)}
