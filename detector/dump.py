"""`misalign dump`: run a trained detector over a split and write its ledger (docs/ledger.md).

For every image the model's own postprocess (`Detector.predict_with_candidates`, the same code path
as eval mode) gives every (anchor, class) pair that entered NMS, what NMS did to it, and every
anchor's decoded box and best class probability. This module maps boxes back to original-image
pixels and the raw per-anchor counts, and hands it all to `misalign.LedgerRecorder`, the one path
every capture takes: it adds the truth columns (IoU with the ground truth) and streams the files
in row groups of many images, so a COCO-sized split never sits in memory. The folder is built
beside `out` and renamed only when it is whole.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from detector.recipe import DumpConfig
from detector.checkpoint import load_checkpoint, model_from_checkpoint
from detector.data import CocoDetection, collate_detection
from detector.device import autocast, resolve_device
from detector.model import Detector
from misalign.coco import ground_truth_by_image, load_coco_json, resolve_dataset
from misalign.errors import InputError
from misalign.io import file_sha256
from misalign.recorder import LedgerRecorder
from misalign.truth import POSITIVE_IOU, match_truth, max_iou_any, raw_counts_rows, threshold_counts

log = logging.getLogger(__name__)

def dump(config: DumpConfig) -> Path:
    """Write the ledger of `config.ckpt` on the chosen split to `config.out`; returns that path."""
    _check_options(config)
    device = resolve_device(config.device)
    checkpoint = load_checkpoint(config.ckpt)
    model = model_from_checkpoint(checkpoint, overrides=_postprocess_overrides(config)).to(device)
    ann_path, images_dir = resolve_dataset(config.data, config.split, config.ann, config.images)
    category_ids = [int(c) for c in checkpoint["config"]["category_ids"]]
    dataset = CocoDetection(
        ann_path, images_dir, train=False, min_size=model.cfg.img_size, max_size=model.cfg.max_size,
        category_ids=category_ids,
    )
    gt = ground_truth_by_image(load_coco_json(ann_path))
    indices = list(range(len(dataset) if config.limit is None else min(config.limit, len(dataset))))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=config.batch_size, shuffle=False,
        num_workers=config.workers, collate_fn=collate_detection, pin_memory=device.type == "cuda",
    )
    meta = _meta(config, checkpoint, model, ann_path, images_dir)
    settings = model.postprocess_settings
    recorder = LedgerRecorder(config.out, ann_path, nms_thresh=settings.nms_thresh, max_det=settings.max_det,
                              detector=meta.pop("detector"), images=images_dir, split=config.split,
                              postprocess=meta.pop("postprocess"), extra_meta=meta)
    with recorder:
        _record_batches(recorder, model, loader, gt, dataset.category_ids, device, config)
    log.info("wrote %s (%d images)", config.out, len(indices))
    return Path(config.out)


def _record_batches(recorder, model, loader, gt, category_ids, device, config) -> None:
    """Run the model over `loader` and hand each image's candidates and anchor counts to the recorder."""
    with tqdm(total=len(loader.dataset), desc="dump", unit="img", dynamic_ncols=True) as bar:
        for images, targets in loader:
            images = [image.to(device, non_blocking=True) for image in images]
            with autocast(device, "bf16" if config.amp and device.type == "cuda" else "none"):  # ignored on CPU
                outputs = model.predict_with_candidates(images)
            for output, target in zip(outputs, targets):
                record_image(recorder, output, target, gt[target["image_id"]], category_ids,
                             with_raw=bar.n < config.raw_images)
                bar.update(1)


def record_image(recorder, output: dict, target: dict, gt: dict, category_ids: list[int], with_raw: bool = False) -> None:
    """Hand one image of `predict_with_candidates`' output to a `misalign.LedgerRecorder`.

    output: one element of `Detector.predict_with_candidates` (boxes in the dataset's resized
    pixels); target: the dataset's target (its `scale` maps boxes back: original = resized / scale);
    gt: that image's ground truth from `misalign.coco.ground_truth_by_image` (original pixels, crowd
    included), for the raw per-anchor counts. The model's own NMS decisions (kept, suppressed_by) are
    recorded as they are; the recorder adds the truth columns.
    """
    scale = float(target["scale"])
    cand = {key: value.cpu() for key, value in output["candidates"].items()}
    # [K, 4] original pixels, rounded to float32 like the network's own outputs (the ledger holds them
    # exactly as float64; float32 values also keep misalign.rescore's NMS on its fast path)
    boxes = (cand["boxes"].double() / scale).float().double()
    category = np.asarray(category_ids, dtype=np.int64)[cand["labels"].numpy()]
    raw_boxes = (output["raw_boxes"].double().cpu() / scale).numpy()  # [A, 4] original pixels
    anchors = (output["anchors"].double().cpu() / scale).numpy()  # [A, 4]
    raw_iou = max_iou_any(raw_boxes, gt["boxes"], gt["iscrowd"])  # [A]
    anchor_iou = max_iou_any(anchors, gt["boxes"], gt["iscrowd"])  # [A]
    raw_cls = output["raw_cls"].float().cpu().numpy()  # [A]
    image_id = target["image_id"]
    recorder.add(
        image_id, boxes, category, cand["score"].float(), cls_score=cand["cls_score"].float(),
        obj_score=cand["obj_score"].float(), level=cand["level"], anchor_idx=cand["anchor_idx"],
        cl_nms_score=cand["cl_nms_score"].float(), kept=cand["kept"], suppressed_by=cand["suppressed_by"],
        anchor_counts=(len(anchors), int(threshold_counts(anchor_iou, [POSITIVE_IOU])[0])),
        raw_counts=raw_counts_rows(image_id, raw_cls, raw_iou, anchor_iou),
        raw=_raw_frame(output, image_id, raw_boxes, anchors, anchor_iou, gt, category_ids) if with_raw else None,
    )


def _raw_frame(output, image_id, raw_boxes, anchors, anchor_iou, gt, category_ids) -> pd.DataFrame:
    """raw.parquet rows of one image: every anchor's decoded box, best class, scores and IoUs."""
    boxes = raw_boxes
    category = np.asarray(category_ids, dtype=np.int64)[output["raw_label"].cpu().numpy()]
    iou, gt_id, iou_any = match_truth(boxes, category, gt["boxes"], gt["category_id"], gt["ann_id"], gt["iscrowd"])
    level = output["raw_level"].cpu().numpy() if "raw_level" in output else np.full(len(boxes), -1)
    anchor_boxes = anchors
    return pd.DataFrame({
        "image_id": np.int64(image_id), "anchor_idx": np.arange(len(boxes), dtype=np.int32), "level": level,
        "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3],
        "category_id": category, "cls_score": output["raw_cls"].float().cpu().numpy(),
        "obj_score": output["raw_obj"].float().cpu().numpy(), "iou": iou, "gt_id": gt_id, "iou_any": iou_any,
        "anchor_x1": anchor_boxes[:, 0], "anchor_y1": anchor_boxes[:, 1],
        "anchor_x2": anchor_boxes[:, 2], "anchor_y2": anchor_boxes[:, 3], "anchor_iou": anchor_iou,
    })


def _postprocess_overrides(config: DumpConfig) -> dict:
    """The model-config keys the dump's options override (None: keep the checkpoint's)."""
    return {"score_thresh": config.score_thresh, "topk": config.topk, "nms_thresh": config.nms_thresh,
            "max_det": config.max_det, "obj_exponent": config.alpha}


def _meta(config: DumpConfig, checkpoint: dict, model: Detector, ann_path: Path, images_dir: Path) -> dict:
    settings = model.postprocess_settings
    return {
        "detector": {"name": model.cfg.name, "config": model.config},
        "checkpoint": str(Path(config.ckpt).resolve()),
        "checkpoint_sha256": file_sha256(config.ckpt),
        "dataset": {"ann": str(Path(ann_path).resolve()), "images": str(Path(images_dir).resolve()),
                    "split": config.split},
        "postprocess": {
            "score_thresh": settings.score_thresh, "topk": settings.topk, "nms_thresh": settings.nms_thresh,
            "max_det": settings.max_det, "score_formula": model.score_formula,
            "alpha": settings.obj_exponent, "conf_skip_p7": settings.conf_skip_p7,
        },
        "overrides": {k: v for k, v in dataclasses.asdict(config).items()
                      if k in ("score_thresh", "topk", "nms_thresh", "max_det", "alpha") and v is not None},
        "limit": config.limit,
        "epoch": checkpoint.get("epoch"),
    }


def _check_options(config: DumpConfig) -> None:
    checks = [
        ("--score-thresh", config.score_thresh, lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("--topk", config.topk, lambda v: v >= 1, "must be at least 1"),
        ("--nms-thresh", config.nms_thresh, lambda v: 0 < v <= 1, "must be in (0, 1]"),
        ("--max-det", config.max_det, lambda v: v >= 1, "must be at least 1"),
        ("--alpha", config.alpha, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        ("--batch-size", config.batch_size, lambda v: v >= 1, "must be at least 1"),
        ("--workers", config.workers, lambda v: v >= 0, "must be 0 or more"),
        ("--limit", config.limit, lambda v: v >= 1, "must be at least 1"),
        ("--raw-images", config.raw_images, lambda v: v >= 0, "must be 0 or more"),
    ]
    for option, value, ok, problem in checks:
        if value is not None and not ok(value):
            raise InputError(f"{option}: {value} {problem}")
