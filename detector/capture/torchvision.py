"""Capture a torchvision detection model's candidates before NMS into a ledger (docs/capture.md).

Works for the models whose final step is `box_ops.batched_nms` in a `postprocess_detections`:
RetinaNet, FCOS, SSD, SSDlite (the model's own) and Faster R-CNN (its box head, `roi_heads`). While
the model runs, that method is wrapped and `torchvision.ops.boxes.batched_nms` is wrapped inside it
(only inside it: Faster R-CNN's RPN calls the same function on its proposals), so the recorder
sees exactly what the model's NMS saw, per image in batch order: the candidates after the model's
score threshold and top-k, their scores and labels, and the indices NMS kept. The model's own cut
(`keep[:detections_per_img]`) gives `kept`; every index NMS returned is a survivor. Boxes are
mapped to original-image pixels with `resize_boxes`, as `model.transform.postprocess` maps the
detections, so the ledger's kept rows are `model(images)`'s detections, value for value.

Labels: a predicted label is the dataset's category id (torchvision's convention for COCO), or
`label_map[label]` when a map is given.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from misalign.coco import load_coco_json, resolve_dataset
from detector.capture import read_rgb
from misalign.errors import InputError
from misalign.io import file_sha256
from misalign.recorder import LedgerRecorder

log = logging.getLogger(__name__)


@dataclass
class CaptureConfig:
    model: str  # a torchvision.models.detection builder name, e.g. retinanet_resnet50_fpn_v2
    out: str  # the dump folder; replaced only once the new ledger is whole
    data: str | None = None  # dataset root in COCO layout (with `split`) ...
    split: str | None = "val"  # ... split name: annotations/instances_<split>.json and <split>/
    ann: str | None = None  # or an explicit annotation file ...
    images: str | None = None  # ... and image folder
    weights: str | None = None  # state-dict file for the builder's model; None: random weights
    num_classes: int | None = None  # the builder's num_classes; None: its default (91 for COCO)
    options: dict = field(default_factory=dict)  # the builder's keyword arguments (score_thresh=0.001, ...)
    label_map: str | None = None  # JSON file {label: category id}; None: labels are category ids
    batch_size: int = 4  # images per forward pass
    device: str = "cpu"  # cpu | cuda | auto
    limit: int | None = None  # capture only the first N images (by id)


def detection_builders() -> list[str]:
    """torchvision's detection builder names (RetinaNet, FCOS, SSD, SSDlite, Faster R-CNN, ...)."""
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def build_model(config: CaptureConfig) -> torch.nn.Module:
    """The builder's model with random weights (no download) or the state dict `config.weights`."""
    if config.model not in detection_builders():
        raise InputError(f"--model: {config.model!r} is not a torchvision detection builder "
                         f"(one of {', '.join(detection_builders())})")
    kwargs = {"weights": None, "weights_backbone": None, **config.options}
    if config.num_classes is not None:
        kwargs["num_classes"] = config.num_classes
    try:
        model = torchvision.models.get_model(config.model, **kwargs)
    except (TypeError, ValueError) as err:
        raise InputError(f"--model {config.model}: {str(err).splitlines()[0]}") from None
    if config.weights is not None:
        path = Path(config.weights)
        if not path.is_file():
            raise InputError(f"{path}: weights file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises pickle's, zipfile's and its own errors for a bad file
            raise InputError(f"{path}: not a PyTorch state-dict file ({_first_line(err)})") from None
        try:
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except (RuntimeError, KeyError, ValueError, AttributeError, TypeError) as err:
            raise InputError(f"{path}: does not fit {config.model} ({_first_line(err)})") from None
    return model


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _final_head(model):
    """The module whose postprocess_detections runs the final NMS (the box head for two-stage models)."""
    return model.roi_heads if hasattr(model, "roi_heads") else model


@contextlib.contextmanager
def recording_nms(model):
    """Record each final NMS call of `model`: yields a list that fills with one dict per image,
    {boxes [K, 4] resized-image px, scores [K], labels [K], keep [S] (NMS order), image_size,
    original_size}, appended in image order as the model runs."""
    calls, sizes = [], []
    head = _final_head(model)
    inner_nms, inner_post, inner_transform = box_ops.batched_nms, head.postprocess_detections, model.transform.postprocess
    inside = [False]

    def batched_nms(boxes, scores, idxs, iou_threshold):
        keep = inner_nms(boxes, scores, idxs, iou_threshold)
        if inside[0]:
            calls.append({"boxes": boxes, "scores": scores, "labels": idxs, "keep": keep})
        return keep

    def postprocess_detections(*args, **kwargs):
        inside[0] = True
        try:
            return inner_post(*args, **kwargs)
        finally:
            inside[0] = False

    def transform_postprocess(result, image_shapes, original_image_sizes):
        sizes.extend(zip(image_shapes, original_image_sizes))
        return inner_transform(result, image_shapes, original_image_sizes)

    box_ops.batched_nms = batched_nms
    head.postprocess_detections = postprocess_detections
    model.transform.postprocess = transform_postprocess
    try:
        yield calls, sizes
    finally:
        box_ops.batched_nms = inner_nms
        del head.postprocess_detections, model.transform.postprocess  # back to the class's methods


def postprocess_settings(model) -> dict:
    """The model's own postprocess settings for meta.json (None where the model has no such knob)."""
    head = _final_head(model)
    return {"score_thresh": getattr(head, "score_thresh", None),
            "topk": getattr(head, "topk_candidates", None),
            "score_formula": f"torchvision {type(model).__name__}"}


def capture_model(model, images, recorder: LedgerRecorder, *, image_ids, label_map=None, batch_size: int = 4,
                  device="cpu") -> list[dict]:
    """Run `model` (eval mode) on `images` ([3, H, W] float tensors in [0, 1], one per id of
    `image_ids`) and record each image's candidates; returns the model's own detections."""
    model.eval().to(device)
    head = _final_head(model)
    max_det = int(head.detections_per_img)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = [image.to(device) for image in images[start:start + batch_size]]
        with torch.no_grad(), recording_nms(model) as (calls, sizes):
            detections = model(batch)
        if len(calls) != len(batch):
            raise RuntimeError(f"{type(model).__name__}: expected one final NMS per image, saw {len(calls)}")
        for image_id, call, (size, original) in zip(image_ids[start:start + batch_size], calls, sizes):
            _record(recorder, int(image_id), call, size, original, max_det, label_map)
        outputs += detections
    return outputs


def _record(recorder, image_id, call, size, original, max_det, label_map) -> None:
    keep = call["keep"]
    num = len(call["scores"])
    kept = torch.zeros(num, dtype=torch.bool)
    kept[keep[:max_det].cpu()] = True
    survived = torch.zeros(num, dtype=torch.bool)
    survived[keep.cpu()] = True
    labels = call["labels"].cpu().numpy()
    if label_map is not None:
        missing = sorted(set(labels.tolist()) - set(label_map))
        if missing:
            raise InputError(f"--label-map: no category id for predicted label {missing[0]}")
        labels = np.asarray([label_map[int(label)] for label in labels], np.int64)
    boxes = resize_boxes(call["boxes"], size, original)  # what transform.postprocess does to the detections
    # Survivors first, in NMS order: the recorder sorts by score stably, so equal scores (common with
    # untrained weights) keep the order the model output them.
    rest = torch.ones(num, dtype=torch.bool)
    rest[keep.cpu()] = False
    order = torch.cat([keep.cpu(), torch.nonzero(rest).squeeze(1)]).numpy()
    recorder.add(image_id, boxes[order], labels[order], call["scores"][order], kept=kept[order], survived=survived[order])


def read_label_map(path) -> dict[int, int]:
    """{label: category id} from a JSON object file (InputError naming the file otherwise)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return {int(k): int(v) for k, v in raw.items()}
    except FileNotFoundError:
        raise InputError(f"{path}: label map not found") from None
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise InputError(f"{path}: a label map is a JSON object {{label: category id}}") from None


def load_images(images_dir: Path, infos: list[dict]) -> list[torch.Tensor]:
    """[3, H, W] float tensors in [0, 1] of the images named by `infos`' file_name."""
    return [torch.from_numpy(read_rgb(images_dir, info).copy()).permute(2, 0, 1).float().div(255) for info in infos]


def capture(config: CaptureConfig) -> Path:
    """`misalign capture torchvision`: build the model, run it over the split, write its ledger."""
    ann_path, images_dir = resolve_dataset(config.data, config.split, config.ann, config.images)
    label_map = read_label_map(config.label_map) if config.label_map else None
    model = build_model(config).eval()
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    infos = sorted(load_coco_json(ann_path)["images"], key=lambda image: image["id"])
    infos = infos if config.limit is None else infos[:config.limit]
    head = _final_head(model)
    meta = {"source": {"framework": "torchvision", "version": torchvision.__version__, "model": config.model,
                       "options": config.options, "num_classes": config.num_classes,
                       "weights": None if config.weights is None else str(Path(config.weights).resolve()),
                       "weights_sha256": None if config.weights is None else file_sha256(config.weights)}}
    with LedgerRecorder(config.out, ann_path, nms_thresh=float(head.nms_thresh), max_det=int(head.detections_per_img),
                        detector={"name": config.model, "config": None}, images=images_dir, split=config.split,
                        postprocess=postprocess_settings(model), extra_meta=meta) as recorder:
        from tqdm import tqdm

        for start in tqdm(range(0, len(infos), config.batch_size), desc="capture", unit="batch", disable=None):
            chunk = infos[start:start + config.batch_size]
            capture_model(model, load_images(images_dir, chunk), recorder, image_ids=[i["id"] for i in chunk],
                          label_map=label_map, batch_size=config.batch_size, device=device)
    return Path(config.out)
