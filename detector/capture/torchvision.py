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
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from misalign import parts as ledger_parts
from misalign.coco import load_coco_json, resolve_dataset
from detector.capture import read_rgb
from detector.capture.config import CaptureConfig
from detector.device import resolve_device
from detector.truth_device import GroundTruth, candidate_truth, to_host
from misalign.errors import InputError
from misalign.io import file_sha256
from misalign.recorder import LedgerRecorder

log = logging.getLogger(__name__)


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
    `image_ids`) and record each image's candidates; returns the model's own detections.

    Per batch, on the model's device: boxes in original pixels, the truth columns
    (detector.truth_device), then one copy to the host; the recorder writes in its background thread.
    """
    model.eval().to(device)
    head = _final_head(model)
    max_det = int(head.detections_per_img)
    lookup = None if label_map is None else _label_lookup(label_map, device)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = [image.to(device) for image in images[start:start + batch_size]]
        with torch.no_grad(), recording_nms(model) as (calls, sizes):
            detections = model(batch)
        if len(calls) != len(batch):
            raise RuntimeError(f"{type(model).__name__}: expected one final NMS per image, saw {len(calls)}")
        ids = [int(i) for i in image_ids[start:start + batch_size]]
        clock = time.perf_counter()
        records = _batch_records(calls, sizes, [recorder.ground_truth(i) for i in ids], max_det, lookup)
        recorder.note_critical(time.perf_counter() - clock)
        for image_id, record in zip(ids, records):
            if lookup is not None and (record["labels"] < 0).any():
                label = int(record.pop("label")[record["labels"] < 0][0])
                raise InputError(f"--label-map: no category id for predicted label {label}")
            record.pop("label")
            recorder.add(image_id, **record)
        outputs += detections
    return outputs


def _label_lookup(label_map: dict[int, int], device) -> torch.Tensor:
    """[L] label -> category id (-1 where the map has none), on the device."""
    lookup = torch.full((max(label_map, default=0) + 1,), -1, dtype=torch.int64)
    for label, category in label_map.items():
        if label >= 0:
            lookup[label] = category
    return lookup.to(device)


def _batch_records(calls, sizes, gts, max_det: int, lookup) -> list[dict]:
    """`LedgerRecorder.add` arguments of a batch's final NMS calls, computed on the device and copied
    to the host in one go. Rows: survivors first, in NMS order, then the rest (the recorder sorts by
    score stably, so equal scores, common with untrained weights, keep the model's order)."""
    ground = GroundTruth.upload(gts, calls[0]["scores"].device)
    columns: dict[str, list] = {}
    for image, (call, (size, original)) in enumerate(zip(calls, sizes)):
        keep, num = call["keep"], len(call["scores"])
        rest = torch.ones(num, dtype=torch.bool, device=keep.device)
        rest[keep] = False
        order = torch.cat([keep, torch.nonzero(rest).squeeze(1)])
        position = torch.arange(num, device=keep.device)
        boxes = resize_boxes(call["boxes"], size, original)[order]  # what transform.postprocess does to the detections
        label = call["labels"][order]
        category = label if lookup is None else lookup[label.clamp(0, len(lookup) - 1)].where(label < len(lookup), -1)
        values = {"boxes": boxes, "labels": category, "label": label, "scores": call["scores"][order],
                  "kept": position < min(len(keep), max_det), "survived": position < len(keep),
                  **candidate_truth(boxes.double(), category, ground, image)}
        for name, value in values.items():
            columns.setdefault(name, []).append(value)
    host = to_host({name: torch.cat(parts) for name, parts in columns.items()})
    bounds = np.cumsum([0, *(len(call["scores"]) for call in calls)])
    truth = ("iou", "gt_id", "iou_any", "crowd")
    return [{**{name: host[name][lo:hi] for name in ("boxes", "labels", "label", "scores", "kept", "survived")},
             "truth": {name: host[name][lo:hi] for name in truth}} for lo, hi in zip(bounds[:-1], bounds[1:])]


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
    """`misalign capture torchvision`: build the model, run it over the split, write its ledger.

    In parts as the dump (docs/ledger.md "Dumps in parts"): under torchrun each process captures
    its share of the parts; `config.resume` keeps the parts a stopped capture finished.
    """
    from detector.train import setup_distributed, teardown_distributed

    ann_path, images_dir = resolve_dataset(config.data, config.split, config.ann, config.images)
    label_map = read_label_map(config.label_map) if config.label_map else None
    model = build_model(config).eval()
    device = resolve_device(config.device)
    ctx = setup_distributed(device)
    try:
        _capture(config, ctx, model, ann_path, images_dir, label_map)
    finally:
        teardown_distributed(ctx)
    return Path(config.out)


def _capture(config: CaptureConfig, ctx, model, ann_path, images_dir, label_map) -> None:
    import torch.distributed as dist
    from tqdm import tqdm

    infos = sorted(load_coco_json(ann_path)["images"], key=lambda image: image["id"])
    infos = infos if config.limit is None else infos[:config.limit]
    head = _final_head(model)
    meta = {"source": {"framework": "torchvision", "version": torchvision.__version__, "model": config.model,
                       "options": config.options, "num_classes": config.num_classes,
                       "weights": None if config.weights is None else str(Path(config.weights).resolve()),
                       "weights_sha256": None if config.weights is None else file_sha256(config.weights)}}
    plan = [int(info["id"]) for info in infos]
    images_per_part = config.part_images or ledger_parts.IMAGES_PER_PART
    with LedgerRecorder(config.out, ann_path, nms_thresh=float(head.nms_thresh), max_det=int(head.detections_per_img),
                        detector={"name": config.model, "config": None}, images=images_dir, split=config.split,
                        postprocess=postprocess_settings(model), extra_meta=meta, plan=plan,
                        images_per_part=images_per_part, resume=config.resume,
                        settings={"batch_size": config.batch_size, "device": ctx.device.type},
                        rank=ctx.rank, world_size=ctx.world_size,
                        barrier=dist.barrier if ctx.distributed else None) as recorder:
        position_of = {image_id: position for position, image_id in enumerate(plan)}
        batches = ledger_parts.part_batches([position_of[i] for i in recorder.todo()], images_per_part,
                                            config.batch_size)
        for batch in tqdm(batches, desc="capture", unit="batch", disable=None if ctx.is_main else True):
            chunk = [infos[position] for position in batch]
            capture_model(model, load_images(images_dir, chunk), recorder, image_ids=[i["id"] for i in chunk],
                          label_map=label_map, batch_size=len(chunk), device=ctx.device)
