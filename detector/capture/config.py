"""The capture commands' settings and their defaults, without torch: the CLI reads its defaults here
(docs/capture.md describes what each setting does)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    device: str = "auto"  # auto (cuda when visible) | cpu | cuda
    limit: int | None = None  # capture only the first N images (by id)
    resume: bool = False  # continue a stopped capture of the same settings, keeping its finished parts
    part_images: int | None = None  # images per part; None: misalign.parts.IMAGES_PER_PART


@dataclass
class UltralyticsConfig:
    weights: str  # a YOLO .pt file, or a model .yaml (random weights, nothing downloaded)
    out: str  # the dump folder; replaced only once the new ledger is whole
    data: str | None = None  # dataset root in COCO layout (with `split`) ...
    split: str | None = "val"
    ann: str | None = None  # or an explicit annotation file ...
    images: str | None = None  # ... and image folder
    imgsz: int = 640  # letterboxed input side
    conf: float = 0.001  # ultralytics' validation defaults
    iou: float = 0.7
    max_det: int = 300
    label_map: str | None = None  # JSON {class index: category id}; None: the i-th category by id
    batch_size: int = 8
    device: str = "cpu"
    limit: int | None = None  # only the first N images (by id)
