"""Capture an ultralytics YOLO detector (v8, 11) before NMS into a ledger (docs/capture.md).

ultralytics is an optional extra (`pip install misalign[ultralytics]`). Per batch the detection
model's raw head output [B, 4 + nc, A] (xywh boxes in letterboxed-input pixels and class
probabilities, before NMS) gives the candidates by the rule of ultralytics' validation mode
(`non_max_suppression(multi_label=True)`): every (anchor, class) pair with probability > conf,
among anchors whose best class passes, at most `max_nms` of them by score. What NMS kept comes from
ultralytics' own `non_max_suppression` on the same output (`return_idxs`), matched back to its
(anchor, class) pair. Boxes go to original-image pixels with ultralytics' `scale_boxes`, as its
validator maps them.

Labels: class index i is the dataset's i-th category in id order, unless a label map says else.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from detector.capture import read_rgb
from detector.capture.config import UltralyticsConfig
from misalign.coco import load_coco_json, resolve_dataset
from misalign.errors import InputError
from misalign.io import file_sha256
from misalign.recorder import LedgerRecorder

log = logging.getLogger(__name__)

MAX_NMS = 30000  # ultralytics' non_max_suppression default: pairs entering its NMS at most


def _ultralytics():
    try:
        import ultralytics  # noqa: F401
        from ultralytics import YOLO
    except ImportError:
        raise InputError("ultralytics is not installed: pip install 'misalign[ultralytics]'") from None
    return YOLO


def load_model(weights: str):
    """The ultralytics detection model (an nn.Module in eval mode) of a .pt or .yaml file."""
    YOLO = _ultralytics()
    path = Path(weights)
    if path.suffix not in (".yaml", ".yml") and not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        return YOLO(str(path)).model.eval()
    except Exception as err:  # ultralytics raises many kinds for a file that is not a model
        raise InputError(f"{path}: not an ultralytics YOLO model ({str(err).strip().splitlines()[0]})") from None


def candidates(raw: torch.Tensor, conf: float, max_nms: int = MAX_NMS) -> list[dict[str, torch.Tensor]]:
    """Per image, the (anchor, class) pairs validation mode sends to NMS.

    raw [B, 4 + nc, A]: xywh and class probabilities. Returns {boxes [K, 4] xyxy (input px),
    scores [K], labels [K] class index, anchor [K]} in ultralytics' order (anchor, then class).
    """
    from ultralytics.utils.ops import xywh2xyxy

    result = []
    for x in raw.transpose(-1, -2):  # [A, 4 + nc]
        probs = x[:, 4:]
        anchor = torch.nonzero(probs.amax(1) > conf).squeeze(1)
        i, j = torch.where(probs[anchor] > conf)
        cand = {"boxes": xywh2xyxy(x[anchor[i], :4]), "scores": probs[anchor[i], j], "labels": j, "anchor": anchor[i]}
        if len(i) > max_nms:
            top = cand["scores"].argsort(descending=True)[:max_nms]
            cand = {k: v[top] for k, v in cand.items()}
        result.append(cand)
    return result


def kept_pairs(raw: torch.Tensor, conf: float, iou: float, max_det: int):
    """ultralytics' own NMS on `raw`: per image (its output rows [S, 6], the anchors [S] they came from)."""
    from ultralytics.utils.nms import non_max_suppression

    outputs, anchors = non_max_suppression(raw, conf, iou, multi_label=True, max_det=max_det, return_idxs=True)
    return list(zip(outputs, anchors))


def letterbox(image: np.ndarray, imgsz: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [imgsz, imgsz, 3], ultralytics' LetterBox (centred padding, no stride fit)."""
    from ultralytics.data.augment import LetterBox

    return LetterBox(new_shape=(imgsz, imgsz), auto=False)(image=image)


def record_batch(recorder: LedgerRecorder, raw: torch.Tensor, image_ids, original_shapes, input_shape,
                 config: UltralyticsConfig, category_of) -> list[torch.Tensor]:
    """Record the candidates and kept pairs of one batch; returns ultralytics' NMS output per image,
    boxes scaled to original pixels (for comparison)."""
    from ultralytics.utils.ops import scale_boxes

    outputs = []
    for image_id, cand, (out, anchors), shape in zip(image_ids, candidates(raw, config.conf),
                                                      kept_pairs(raw, config.conf, config.iou, config.max_det),
                                                      original_shapes):
        num_classes = raw.shape[1] - 4
        pair = cand["anchor"] * num_classes + cand["labels"]  # [K] candidate key
        kept_key = anchors.long() * num_classes + out[:, 5].long()  # [S] NMS order
        row_of = {int(k): r for r, k in enumerate(pair.tolist())}
        missing = [k for k in kept_key.tolist() if int(k) not in row_of]
        if missing:
            raise RuntimeError(f"image {image_id}: ultralytics kept a pair outside the candidate rule")
        kept_rows = torch.tensor([row_of[int(k)] for k in kept_key.tolist()], dtype=torch.long)
        rest = torch.ones(len(pair), dtype=torch.bool)
        rest[kept_rows] = False
        order = torch.cat([kept_rows, torch.nonzero(rest).squeeze(1)])  # kept first, in NMS order (ties)
        kept = torch.zeros(len(pair), dtype=torch.bool)
        kept[: len(kept_rows)] = True
        boxes = scale_boxes(input_shape, cand["boxes"][order].clone(), shape)
        labels = category_of(cand["labels"][order].cpu().numpy())
        recorder.add(image_id, boxes, labels, cand["scores"][order], kept=kept, anchor_idx=cand["anchor"][order])
        out = out.clone()
        out[:, :4] = scale_boxes(input_shape, out[:, :4], shape)
        outputs.append(out)
    return outputs


def _category_mapper(categories: list[int], label_map: dict[int, int] | None):
    ids = np.asarray(sorted(categories), np.int64)

    def category_of(labels: np.ndarray) -> np.ndarray:
        if label_map is not None:
            missing = sorted(set(labels.tolist()) - set(label_map))
            if missing:
                raise InputError(f"--label-map: no category id for predicted class {missing[0]}")
            return np.asarray([label_map[int(v)] for v in labels], np.int64)
        if len(labels) and labels.max() >= len(ids):
            raise InputError(f"class {int(labels.max())} has no category: the dataset has {len(ids)} (give --label-map)")
        return ids[labels]

    return category_of


def capture(config: UltralyticsConfig) -> Path:
    """`misalign capture ultralytics`: run the YOLO model over the split and write its ledger."""
    from detector.capture.torchvision import read_label_map

    model = load_model(config.weights)
    ann_path, images_dir = resolve_dataset(config.data, config.split, config.ann, config.images)
    gt = load_coco_json(ann_path)
    category_of = _category_mapper([c["id"] for c in gt["categories"]],
                                   read_label_map(config.label_map) if config.label_map else None)
    infos = sorted(gt["images"], key=lambda image: image["id"])[: config.limit]
    import ultralytics

    weights = Path(config.weights)
    meta = {"source": {"framework": "ultralytics", "version": ultralytics.__version__, "model": str(config.weights),
                       "weights_sha256": file_sha256(weights) if weights.is_file() else None,
                       "imgsz": config.imgsz, "conf": config.conf, "iou": config.iou}}
    with LedgerRecorder(config.out, ann_path, nms_thresh=config.iou, max_det=config.max_det,
                        detector={"name": Path(config.weights).stem, "config": None}, images=images_dir,
                        split=config.split, postprocess={"score_thresh": config.conf, "score_formula": "cls"},
                        extra_meta=meta) as recorder:
        for start in range(0, len(infos), config.batch_size):
            chunk = infos[start:start + config.batch_size]
            arrays = [read_rgb(images_dir, info) for info in chunk]
            batch = torch.stack([torch.from_numpy(letterbox(a, config.imgsz)).permute(2, 0, 1) for a in arrays])
            with torch.no_grad():
                raw = model(batch.float().div(255).to(config.device))[0]
            record_batch(recorder, raw.float().cpu(), [i["id"] for i in chunk], [a.shape[:2] for a in arrays],
                         batch.shape[2:], config, category_of)
    return Path(config.out)
