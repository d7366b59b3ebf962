"""`misalign dump`: run a trained detector over a split and write its ledger (docs/ledger.md).

For every image the model's own postprocess (`Detector.predict_with_candidates`, the same code path
as eval mode) gives every (anchor, class) pair that entered NMS, what NMS did to it, and every
anchor's decoded box and best class probability. Per forward pass, on the model's device
(detector.truth_device): the boxes mapped back to original-image pixels, the truth columns of the
candidates, the raw counts over every anchor and the positive anchors; then one copy of those
compact arrays to the host, and `misalign.LedgerRecorder` builds the tables and writes Parquet in
its background thread while the next batch runs (docs/architecture.md).

The ledger is written in parts (misalign.parts, docs/ledger.md "Dumps in parts"): under torchrun
each process dumps its share of the parts and rank 0 assembles them; `resume` keeps the parts a
stopped dump finished. Batches never cross a part's boundary, so every way of running gives the
same floats. The folder replaces `out` only when it is whole.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from detector.recipe import DumpConfig
from detector.checkpoint import load_checkpoint, model_from_checkpoint
from detector.data import CocoDetection, collate_detection
from detector.device import autocast, resolve_device
from detector.model import Detector
from detector.train import setup_distributed, teardown_distributed
from detector.truth_device import GroundTruth, candidate_truth, max_iou_any, raw_count_values, to_host
from misalign import parts as ledger_parts
from misalign.coco import ground_truth_by_image, load_coco_json, resolve_dataset
from misalign.errors import InputError
from misalign.io import file_sha256
from misalign.recorder import LedgerRecorder
from misalign.truth import match_truth, max_iou_any as host_max_iou_any, positive_anchors

log = logging.getLogger(__name__)

# per-candidate columns copied to the host, as the recorder takes them
_CANDIDATE_COLUMNS = ("score", "cls_score", "obj_score", "cl_nms_score", "level", "anchor_idx", "kept", "suppressed_by")


def dump(config: DumpConfig) -> Path:
    """Write the ledger of `config.ckpt` on the chosen split to `config.out`; returns that path.

    Under torchrun (WORLD_SIZE > 1) every process runs this; each dumps its share of the parts.
    """
    _check_options(config)
    ctx = setup_distributed(resolve_device(config.device))
    try:
        return _dump(config, ctx)
    finally:
        teardown_distributed(ctx)


def _dump(config: DumpConfig, ctx) -> Path:
    device = ctx.device
    checkpoint = load_checkpoint(config.ckpt)
    model = model_from_checkpoint(checkpoint, overrides=_postprocess_overrides(config)).to(device)
    ann_path, images_dir = resolve_dataset(config.data, config.split, config.ann, config.images)
    category_ids = [int(c) for c in checkpoint["config"]["category_ids"]]
    dataset = CocoDetection(
        ann_path, images_dir, train=False, min_size=model.cfg.img_size, max_size=model.cfg.max_size,
        category_ids=category_ids,
    )
    gt = ground_truth_by_image(load_coco_json(ann_path))
    num_images = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    plan = dataset.image_ids[:num_images]  # dataset position = plan position
    images_per_part = config.part_images or ledger_parts.IMAGES_PER_PART
    meta = _meta(config, checkpoint, model, ann_path, images_dir)
    settings = model.postprocess_settings
    amp = "bf16" if config.amp and device.type == "cuda" else "none"
    recorder = LedgerRecorder(
        config.out, ann_path, nms_thresh=settings.nms_thresh, max_det=settings.max_det,
        detector=meta.pop("detector"), images=images_dir, split=config.split, postprocess=meta.pop("postprocess"),
        extra_meta=meta, plan=plan, images_per_part=images_per_part, resume=config.resume,
        settings={"batch_size": config.batch_size, "device": device.type, "amp": amp},
        rank=ctx.rank, world_size=ctx.world_size, barrier=dist.barrier if ctx.distributed else None)
    with recorder:
        position_of = {image_id: position for position, image_id in enumerate(plan)}
        batches = ledger_parts.part_batches([position_of[i] for i in recorder.todo()], images_per_part,
                                            config.batch_size)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=config.workers if batches else 0,
            collate_fn=collate_detection, pin_memory=device.type == "cuda",
        )
        lookup = torch.as_tensor(dataset.category_ids, dtype=torch.int64, device=device)
        _record_batches(recorder, model, loader, gt, lookup, device, amp, config.raw_images, position_of,
                        progress=ctx.is_main)
    log.info("wrote %s (%d images)", config.out, num_images)
    return Path(config.out)


def _record_batches(recorder, model, loader, gt, lookup, device, amp, raw_images, position_of, progress) -> None:
    """Run the model over `loader` and hand each batch's candidates and counts to the recorder."""
    total = sum(len(batch) for batch in loader.batch_sampler)
    with tqdm(total=total, desc="dump", unit="img", dynamic_ncols=True, disable=not progress) as bar:
        for images, targets in loader:
            images = [image.to(device, non_blocking=True) for image in images]
            with autocast(device, amp):  # ignored on CPU
                outputs = model.predict_with_candidates(images)
            start = time.perf_counter()
            gts = [gt[target["image_id"]] for target in targets]
            records = ledger_batch(outputs, targets, gts, lookup)
            recorder.note_critical(time.perf_counter() - start)
            for record, output, target, image_gt in zip(records, outputs, targets, gts):
                if position_of[target["image_id"]] < raw_images:
                    record["raw"] = _raw_frame(output, target, image_gt, lookup.cpu().numpy())
                recorder.add(target["image_id"], **record)
            bar.update(len(targets))


def ledger_batch(outputs: list[dict], targets: list[dict], gts: list[dict], lookup: torch.Tensor) -> list[dict]:
    """One forward pass's `predict_with_candidates` output as `LedgerRecorder.add` arguments, per image.

    Everything is computed on the model's device (the truth columns, the raw counts, the boxes in
    original pixels) and copied to the host in one go. targets: the dataset's (`scale` maps boxes
    back: original = resized / scale); gts: those images' `misalign.coco.ground_truth_by_image`
    entries (original pixels, crowd included); lookup [C]: label -> category id, on the device.
    Boxes are rounded to float32 like the network's own outputs (the ledger holds them exactly as
    float64; float32 values also keep misalign.rescore's NMS on its fast path).
    """
    ground = GroundTruth.upload(gts, lookup.device)
    columns: dict[str, list] = {}
    for image, (output, target) in enumerate(zip(outputs, targets)):
        scale = float(target["scale"])
        cand = output["candidates"]
        boxes = (cand["boxes"].double() / scale).float()  # [K, 4] original pixels
        category = lookup[cand["labels"]]
        truth = candidate_truth(boxes.double(), category, ground, image)
        raw_iou = max_iou_any(output["raw_boxes"].double() / scale, ground, image)
        anchor_iou = max_iou_any(output["anchors"].double() / scale, ground, image)
        values = {"boxes": boxes, "labels": category, **{name: cand[name] for name in _CANDIDATE_COLUMNS}, **truth,
                  "raw_counts": raw_count_values(output["raw_cls"], raw_iou, anchor_iou)[None]}
        for name, value in values.items():
            columns.setdefault(name, []).append(value.float() if value.is_floating_point() else value)
    host = to_host({name: torch.cat(parts) for name, parts in columns.items()})
    sizes = [len(output["candidates"]["score"]) for output in outputs]
    bounds = np.cumsum([0, *sizes])
    records = []
    for image, output in enumerate(outputs):
        rows = slice(bounds[image], bounds[image + 1])
        counts = host["raw_counts"][image]
        record = {name: host[name][rows] for name in ("boxes", "labels", "score", *_CANDIDATE_COLUMNS[1:])}
        record["scores"] = record.pop("score")
        record["truth"] = {name: host[name][rows] for name in ("iou", "gt_id", "iou_any", "crowd")}
        record["raw_counts"] = counts
        record["anchor_counts"] = (len(output["anchors"]), positive_anchors(counts))
        records.append(record)
    return records


def _raw_frame(output: dict, target: dict, gt: dict, category_ids: np.ndarray) -> pd.DataFrame:
    """raw.parquet rows of one image: every anchor's decoded box, best class, scores and IoUs (on
    the host, `misalign.truth`: raw.parquet holds only the first --raw-images images)."""
    scale = float(target["scale"])
    boxes = (output["raw_boxes"].double().cpu() / scale).numpy()  # [A, 4] original pixels
    anchors = (output["anchors"].double().cpu() / scale).numpy()  # [A, 4]
    anchor_iou = host_max_iou_any(anchors, gt["boxes"], gt["iscrowd"])
    category = category_ids[output["raw_label"].cpu().numpy()]
    iou, gt_id, iou_any = match_truth(boxes, category, gt["boxes"], gt["category_id"], gt["ann_id"], gt["iscrowd"])
    level = output["raw_level"].cpu().numpy() if "raw_level" in output else np.full(len(boxes), -1)
    return pd.DataFrame({
        "image_id": np.int64(target["image_id"]), "anchor_idx": np.arange(len(boxes), dtype=np.int32), "level": level,
        "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3],
        "category_id": category, "cls_score": output["raw_cls"].float().cpu().numpy(),
        "obj_score": output["raw_obj"].float().cpu().numpy(), "iou": iou, "gt_id": gt_id, "iou_any": iou_any,
        "anchor_x1": anchors[:, 0], "anchor_y1": anchors[:, 1],
        "anchor_x2": anchors[:, 2], "anchor_y2": anchors[:, 3], "anchor_iou": anchor_iou,
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
        ("--part-images", config.part_images, lambda v: v >= 1, "must be at least 1"),
    ]
    for option, value, ok, problem in checks:
        if value is not None and not ok(value):
            raise InputError(f"{option}: {value} {problem}")
