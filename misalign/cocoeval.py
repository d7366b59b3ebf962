"""COCO AP/AR with pycocotools: the only AP misalign reports. Never a hand-written AP."""

from __future__ import annotations

import contextlib
import io

import numpy as np

# The twelve COCOeval.stats, in pycocotools' order.
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def load_gt_quietly(ann_path):
    """pycocotools.COCO for `ann_path`, without its prints on stdout."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_path))


def evaluate_detections(coco_gt, detections: np.ndarray, image_ids=None) -> dict[str, float]:
    """COCOeval (bbox, maxDets 1/10/100) of `detections` against `coco_gt`.

    detections: [N, 7] float64 rows of image_id, x, y, w, h, score, category_id (pycocotools'
    `loadNumpyAnnotations` layout), boxes in original-image pixels. image_ids: the images to
    evaluate (default: every image of `coco_gt`, so an image with no detection counts its misses).
    Returns the twelve stats under STAT_KEYS; with no detections every stat is 0.0.
    """
    from pycocotools.cocoeval import COCOeval

    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 7)
    if len(detections) == 0:
        return {key: 0.0 for key in STAT_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {key: float(value) for key, value in zip(STAT_KEYS, evaluator.stats)}
