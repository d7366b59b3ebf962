"""A synthetic ledger (docs/ledger.md) and its ground truth, for tests, the benchmarks and demos.

A producer of ledgers like the bundled detector's dump and misalign.importer (docs/architecture.md),
it writes through misalign.ledger.LedgerWriter and takes its truth columns from misalign.truth.

The candidates imitate a one-stage detector: boxes are jittered around ground-truth boxes (so their
IoU spans 0..1) plus a share of background boxes; `cls_score` follows IoU only weakly (the papers'
misalignment), `obj_score` follows it more closely, and the kept set imitates NMS: at most one
candidate per (image, category, source object) survives, then the best `kept_per_image` by score.
Every truth column (`iou`, `gt_id`, `iou_any`) is computed from the boxes as written (float32) with
COCO's IoU against the non-crowd ground truth (misalign.truth.match_truth), so the ledger is internally
consistent.

The candidates are generated vectorised over images; the truth columns are matched image by image.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from misalign.io import atomic_dir, write_json_atomic
from misalign.ledger import LedgerWriter
from misalign.truth import CLS_THRESHOLDS, IOU_THRESHOLDS, match_truth



@dataclass
class SyntheticConfig:
    num_images: int = 20  # images in the split
    cands_per_image: int = 200  # pre-NMS candidates per image
    num_categories: int = 5  # categories, dataset ids 1..num_categories
    gt_per_image: float = 4.0  # mean ground-truth boxes per image (Poisson, at least 1)
    kept_per_image: int = 20  # max detections per image after the imitated NMS
    seed: int = 0  # RNG seed; same seed and sizes -> same files
    with_obj: bool = True  # write obj_score (else NaN, and score = cls_score)
    alpha: float = 0.4  # score = obj^alpha * cls^(1-alpha) when with_obj
    cls_coupling: float = 0.3  # how strongly cls_score follows IoU (0 = not at all)
    obj_coupling: float = 1.0  # how strongly obj_score follows IoU
    background_fraction: float = 0.5  # candidates placed anywhere in the image
    crowd_fraction: float = 0.03  # ground-truth boxes marked iscrowd=1 (ignored by `iou`)
    post_nms_only: bool = False  # imitate an imported results file: kept rows only, no pre-NMS stage
    name: str = "synthetic"  # detector name written into meta.json


# ---------------------------------------------------------------------------------------------
# ground truth


def make_ground_truth(cfg: SyntheticConfig, rng: np.random.Generator) -> dict:
    """A COCO instances dict: images 640x480 or 480x640, boxes [x, y, w, h] in pixels."""
    num_images = cfg.num_images
    portrait = rng.random(num_images) < 0.3
    widths = np.where(portrait, 480, 640)
    heights = np.where(portrait, 640, 480)
    num_gt = np.maximum(1, rng.poisson(cfg.gt_per_image, num_images))  # [I]
    img_of_gt = np.repeat(np.arange(num_images), num_gt)  # [G]
    g = len(img_of_gt)
    w_img, h_img = widths[img_of_gt], heights[img_of_gt]
    bw = np.minimum(rng.uniform(16, 260, g), w_img - 2)
    bh = np.minimum(rng.uniform(16, 260, g), h_img - 2)
    bx = rng.uniform(0, 1, g) * (w_img - bw)
    by = rng.uniform(0, 1, g) * (h_img - bh)
    xywh = np.round(np.stack([bx, by, bw, bh], axis=1), 2)
    cats = rng.integers(1, cfg.num_categories + 1, g)
    crowd = rng.random(g) < cfg.crowd_fraction
    images = [
        {"id": int(i + 1), "file_name": f"{i + 1:012d}.jpg", "width": int(widths[i]), "height": int(heights[i])}
        for i in range(num_images)
    ]
    annotations = [
        {"id": int(k + 1), "image_id": int(img_of_gt[k] + 1), "category_id": int(cats[k]),
         "bbox": [float(v) for v in xywh[k]], "area": float(xywh[k, 2] * xywh[k, 3]),
         "iscrowd": int(crowd[k])}
        for k in range(g)
    ]
    categories = [{"id": c, "name": f"class{c}", "supercategory": "shape"} for c in range(1, cfg.num_categories + 1)]
    return {"info": {"description": "misalign synthetic"}, "images": images,
            "annotations": annotations, "categories": categories}


def _padded_gt(coco: dict, image_ids: np.ndarray):
    """Ground truth per image padded to [I, Gmax]: boxes xyxy float64, category, id, iscrowd, valid."""
    ann = pd.DataFrame(coco["annotations"])
    pos = pd.Series(np.arange(len(image_ids)), index=image_ids)
    img_idx = pos.loc[ann["image_id"].to_numpy()].to_numpy()
    order = np.argsort(img_idx, kind="stable")
    img_idx = img_idx[order]
    slot = np.arange(len(img_idx)) - np.searchsorted(img_idx, img_idx)  # rank within the image
    gmax = int(slot.max()) + 1 if len(slot) else 1
    shape = (len(image_ids), gmax)
    boxes = np.zeros(shape + (4,))
    xywh = np.array(ann["bbox"].tolist(), dtype=np.float64)[order]
    boxes[img_idx, slot] = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    cats = np.full(shape, -1, np.int64)
    cats[img_idx, slot] = ann["category_id"].to_numpy()[order]
    ids = np.full(shape, -1, np.int64)
    ids[img_idx, slot] = ann["id"].to_numpy()[order]
    crowd = np.zeros(shape, bool)
    crowd[img_idx, slot] = ann["iscrowd"].to_numpy()[order].astype(bool)
    valid = np.zeros(shape, bool)
    valid[img_idx, slot] = True
    return boxes, cats, ids, crowd, valid


def truth_columns(pred_xyxy, pred_cat, gt_boxes, gt_cats, gt_ids, gt_crowd, gt_valid):
    """iou, gt_id, iou_any for candidates laid out [I, C] against padded gt [I, G] (misalign.truth.match_truth
    image by image, the rule every ledger writer uses).

    pred_xyxy [I, C, 4] float32 (as stored), pred_cat [I, C]. Returns three [I, C] arrays (float32,
    int64, float32).
    """
    num_images, num_cands = pred_cat.shape
    iou = np.zeros((num_images, num_cands), np.float32)
    gt_id = np.full((num_images, num_cands), -1, np.int64)
    iou_any = np.zeros((num_images, num_cands), np.float32)
    for i in range(num_images):
        valid = gt_valid[i]  # [G] the padding is no ground truth
        iou[i], gt_id[i], iou_any[i] = match_truth(pred_xyxy[i].astype(np.float64), pred_cat[i], gt_boxes[i][valid],
                                                   gt_cats[i][valid], gt_ids[i][valid], gt_crowd[i][valid])
    return iou, gt_id, iou_any


# ---------------------------------------------------------------------------------------------
# candidates


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _candidate_boxes(cfg, rng, gt_boxes, gt_cats, gt_valid, widths, heights):
    """Boxes [I, C, 4] float32, category [I, C], source slot [I, C] (-1 = background)."""
    num_images, c = cfg.num_images, cfg.cands_per_image
    num_gt = gt_valid.sum(axis=1)  # [I]
    src = (rng.random((num_images, c)) * num_gt[:, None]).astype(np.int64)  # [I, C]
    background = rng.random((num_images, c)) < cfg.background_fraction
    rows = np.arange(num_images)[:, None]
    g = gt_boxes[rows, src]  # [I, C, 4]
    wh = np.stack([g[..., 2] - g[..., 0], g[..., 3] - g[..., 1]], axis=-1)  # [I, C, 2]
    spread = rng.uniform(0.0, 0.5, (num_images, c, 1)) ** 1.3  # small spread -> high IoU
    noise = rng.normal(0.0, 1.0, (num_images, c, 4)) * spread * np.concatenate([wh, wh], axis=-1)
    boxes = g + noise
    # background: boxes anywhere, of object-like size
    bw = rng.uniform(12, 200, (num_images, c))
    bh = rng.uniform(12, 200, (num_images, c))
    bx = rng.random((num_images, c)) * (widths[:, None] - bw)
    by = rng.random((num_images, c)) * (heights[:, None] - bh)
    bg = np.stack([bx, by, bx + bw, by + bh], axis=-1)
    boxes = np.where(background[..., None], bg, boxes)
    lo = np.minimum(boxes[..., :2], boxes[..., 2:])
    hi = np.maximum(boxes[..., :2], boxes[..., 2:]) + 1.0  # never empty
    limit = np.stack([widths, heights], axis=1)[:, None, :].astype(np.float64)
    boxes = np.concatenate([np.clip(lo, 0, limit - 1), np.clip(hi, 1, limit)], axis=-1).astype(np.float32)
    cats = gt_cats[rows, src]
    wrong = background | (rng.random((num_images, c)) < 0.15)
    cats = np.where(wrong, rng.integers(1, cfg.num_categories + 1, (num_images, c)), cats)
    src = np.where(background, -1, src)
    return boxes, cats, src


def _scores(cfg, rng, iou):
    """cls_score, obj_score, score [I, C] float32: cls follows IoU weakly, obj closely."""
    shape = iou.shape
    logit = -2.3 + cfg.cls_coupling * (2.0 * (iou - 0.5) + 6.0 * np.clip(iou - 0.7, 0, None)) + rng.normal(0, 1.0, shape)
    cls = (0.05 + 0.95 * _sigmoid(logit)).astype(np.float32)
    if not cfg.with_obj:
        return cls, np.full(shape, np.nan, np.float32), cls.copy()
    obj = _sigmoid(cfg.obj_coupling * 6.0 * (iou - 0.45) + rng.normal(0, 0.9, shape)).astype(np.float32)
    score = (obj.astype(np.float64) ** cfg.alpha * cls.astype(np.float64) ** (1 - cfg.alpha)).astype(np.float32)
    return cls, obj, score


def _group_first(keys: np.ndarray, score: np.ndarray):
    """Order rows by (key, -score); return the order and each row's rank within its key (0 = best)."""
    order = np.lexsort((-score, keys))
    sorted_keys = keys[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_keys)) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - first
    return order, rank, first


def imitate_nms(image_idx, category, source, score, kept_per_image):
    """kept [N] bool and suppressed_by as a row index [N] (-1 = survived) for flat candidate arrays.

    One survivor per (image, category, source object) - background rows are their own group -
    then the best `kept_per_image` survivors of each image by score (max-detections). Every other
    row is suppressed by its group's survivor, which max-detections may have cut (as in the ledger).
    """
    n = len(score)
    num_cat = int(category.max()) + 1 if n else 1
    span = int(source.max()) + 2 if n else 1
    group_src = np.where(source >= 0, source, span + np.arange(n))  # background: unique groups
    key = (image_idx * num_cat + category) * (span + n + 1) + group_src
    order, rank, first = _group_first(key, score)
    survivor = rank == 0
    _, img_rank, _ = _group_first(np.where(survivor, image_idx, -1), score)  # survivors ranked per image
    kept = survivor & (img_rank < kept_per_image)
    group_top = np.empty(n, np.int64)
    group_top[order] = order[first]  # row index of each row's group survivor
    suppressed_by = np.where(survivor, -1, group_top)
    return kept, suppressed_by


# ---------------------------------------------------------------------------------------------
# files


def _raw_counts(cfg, rng, image_ids, image_idx, cls, iou_any, num_gt):
    """Long-format raw_counts rows and per-image anchors/positive anchors consistent with them."""
    num_images = len(image_ids)
    rows = []

    def per_image(mask):
        return np.bincount(image_idx, weights=mask, minlength=num_images)

    factor = rng.uniform(1.2, 2.0, num_images)
    for t in CLS_THRESHOLDS:
        rows.append(("raw", "cls", t, np.round(per_image(cls > t) * factor)))
    for t in IOU_THRESHOLDS:
        rows.append(("raw", "iou", t, np.round(per_image(iou_any > t) * factor * 1.5)))
    num_anchors = np.full(num_images, 19206 if cfg.cands_per_image > 0 else 0, np.int64)
    pos = np.round(num_gt * rng.uniform(15, 45, num_images))
    for t in IOU_THRESHOLDS:
        rows.append(("anchors", "iou", t, np.round(pos * (1.0 - (t - 0.5) * 1.9))))
    frames = [
        pd.DataFrame({"image_id": image_ids, "stage": stage, "quantity": q, "threshold": float(t),
                      "count": counts.astype(np.int64)})
        for stage, q, t, counts in rows
    ]
    table = pd.concat(frames, ignore_index=True).sort_values(["image_id", "stage", "quantity", "threshold"], kind="stable")
    return table.reset_index(drop=True), num_anchors, pos.astype(np.int64)


def synthetic_ledger(
    folder,
    num_images: int = 20,
    cands_per_image: int = 200,
    num_categories: int = 5,
    gt_per_image: float = 4.0,
    kept_per_image: int = 20,
    seed: int = 0,
    *,
    gt_path=None,
    **options,
) -> Path:
    """Write a synthetic ledger into `folder` (atomically) and return the ground-truth JSON path.

    gt_path: where the COCO ground truth lives. If that file exists it is reused (so several
    synthetic detectors share one split; num_images/num_categories/gt_per_image then come from it),
    else it is written there. Default: `<folder>.gt.json` beside the folder.
    options: the other SyntheticConfig fields (with_obj, alpha, cls_coupling, post_nms_only, name...).
    """
    folder = Path(folder)
    gt_path = Path(gt_path) if gt_path is not None else folder.with_name(folder.name + ".gt.json")
    cfg = SyntheticConfig(num_images=num_images, cands_per_image=cands_per_image, num_categories=num_categories,
                          gt_per_image=gt_per_image, kept_per_image=kept_per_image, seed=seed, **options)
    rng = np.random.default_rng(seed)
    if gt_path.exists():
        coco = json.loads(gt_path.read_text())
        cfg.num_images = len(coco["images"])
        cfg.num_categories = max(c["id"] for c in coco["categories"])
    else:
        coco = make_ground_truth(cfg, np.random.default_rng(seed + 7919))
        write_json_atomic(gt_path, coco, indent=None)

    images = pd.DataFrame(coco["images"]).sort_values("id", kind="stable")
    image_ids = images["id"].to_numpy(np.int64)
    widths = images["width"].to_numpy(np.float64)
    heights = images["height"].to_numpy(np.float64)
    gt_boxes, gt_cats, gt_ids, gt_crowd, gt_valid = _padded_gt(coco, image_ids)

    boxes, cats, src = _candidate_boxes(cfg, rng, gt_boxes, gt_cats, gt_valid, widths, heights)
    iou, gt_id, iou_any = truth_columns(boxes, cats, gt_boxes, gt_cats, gt_ids, gt_crowd, gt_valid)
    cls, obj, score = _scores(cfg, rng, iou)

    num_images, c = cats.shape
    image_idx = np.repeat(np.arange(num_images), c)
    flat = lambda a: a.reshape(-1)  # noqa: E731
    kept, sup_row = imitate_nms(image_idx, flat(cats), flat(src), flat(score), cfg.kept_per_image)
    cand_id = np.arange(num_images * c, dtype=np.int64)
    suppressed_by = np.where(sup_row >= 0, cand_id[np.clip(sup_row, 0, None)], -1)
    cands = pd.DataFrame({
        "cand_id": cand_id, "image_id": image_ids[image_idx], "category_id": flat(cats).astype(np.int64),
        "x1": flat(boxes[..., 0]), "y1": flat(boxes[..., 1]), "x2": flat(boxes[..., 2]), "y2": flat(boxes[..., 3]),
        "cls_score": flat(cls), "obj_score": flat(obj), "score": flat(score),
        "level": rng.integers(0, 5, num_images * c).astype(np.int8),
        "anchor_idx": rng.integers(0, 19206, num_images * c).astype(np.int32),
        "kept": kept, "suppressed_by": suppressed_by.astype(np.int64),
        "iou": flat(iou), "gt_id": flat(gt_id), "iou_any": flat(iou_any),
    })
    num_gt = (gt_valid & ~gt_crowd).sum(axis=1)
    raw, num_anchors, num_pos = _raw_counts(cfg, rng, image_ids, image_idx, flat(cls), flat(iou_any), num_gt)
    if cfg.post_nms_only:  # an imported results file: kept rows only, nothing about anchors
        cands = cands[cands["kept"]].reset_index(drop=True)
        cands["suppressed_by"] = -1
        cands["level"] = np.int8(-1)
        cands["anchor_idx"] = np.int32(-1)
        cands["cls_score"] = cands["score"]
        cands["obj_score"] = np.float32("nan")
        raw = raw.iloc[0:0]
        num_anchors = np.full(num_images, -1, np.int64)  # unknown, as misalign.ledger writes for imports
        num_pos = np.full(num_images, -1, np.int64)
    image_table = pd.DataFrame({
        "image_id": image_ids, "file_name": images["file_name"].to_numpy(), "width": images["width"].to_numpy(),
        "height": images["height"].to_numpy(), "num_gt": num_gt, "num_anchors": num_anchors, "num_pos_anchors": num_pos,
    })
    with atomic_dir(folder) as tmp, LedgerWriter(tmp) as writer:
        writer.add_images(image_table)
        writer.add_raw_counts(raw)
        _add_candidates(writer, cands)
        writer.close(_meta(cfg, gt_path))
    return gt_path


def _add_candidates(writer, cands: pd.DataFrame, images_per_call: int = 500) -> None:
    """Hand the rows to LedgerWriter in chunks of whole images, suppressed_by as a per-image position."""
    image_ids = cands["image_id"].to_numpy()
    starts = np.r_[0, np.flatnonzero(np.diff(image_ids)) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(cands)]))  # [N] first row of each row's image
    row_of = pd.Series(np.arange(len(cands)), index=cands["cand_id"].to_numpy())
    sup = cands["suppressed_by"].to_numpy()
    local = np.where(sup >= 0, row_of.reindex(sup).fillna(-1).to_numpy(np.int64) - first, -1)
    frame = cands.drop(columns=["cand_id"]).assign(suppressed_by=local)
    bounds = np.r_[starts[::images_per_call], len(cands)]
    for s, e in zip(bounds[:-1], bounds[1:]):
        writer.add_candidates(frame.iloc[s:e])


def _meta(cfg: SyntheticConfig, gt_path: Path) -> dict:
    """meta.json's caller keys (misalign.ledger.META_KEYS); the writer adds counts and versions."""
    formula = "obj^alpha*cls^(1-alpha)" if cfg.with_obj else "cls"
    return {
        "pre_nms": not cfg.post_nms_only,
        "detector": {"name": cfg.name, "config": {**asdict(cfg), "source": "misalign.synthetic"}},
        "checkpoint_sha256": None,
        "dataset": {"ann": str(Path(gt_path).resolve()), "images": None, "split": "synthetic"},
        "postprocess": {"score_thresh": 0.05, "topk": 1000, "nms_thresh": 0.5, "max_det": cfg.kept_per_image,
                        "score_formula": formula, "alpha": cfg.alpha if cfg.with_obj else None},
    }
