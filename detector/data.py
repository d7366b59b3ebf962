"""COCO-layout datasets for the detector: resized image tensors and xyxy box targets.

Resizing uses ONE scale factor for both axes: `scale = min(min_size / shorter side, max_size /
longer side)`, the image becomes `round(w * scale) x round(h * scale)` pixels (PIL bilinear), and
boxes are multiplied by `scale`. So `original box = resized box / scale` holds exactly (up to
float32), whatever the rounding of the image size did; the rounding moves image content by less
than half a pixel relative to the boxes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from misalign.coco import annotation_arrays, load_coco_json
from misalign.errors import InputError

log = logging.getLogger(__name__)


def resize_scale(width: int, height: int, min_size: int, max_size: int) -> float:
    """Scale that brings the shorter side to `min_size` unless the longer side would exceed `max_size`."""
    return min(min_size / min(width, height), max_size / max(width, height))


def resized_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) in pixels of an image resized by `scale` (each side rounded, at least 1)."""
    return max(1, round(width * scale)), max(1, round(height * scale))


class CocoDetection(torch.utils.data.Dataset):
    """A COCO dataset (annotation JSON + image folder) for training and inference.

    `ds[i]` -> (image FloatTensor [3, H, W] RGB in [0, 1] resized as in the module docstring,
    target dict: `boxes` FloatTensor [N, 4] x1, y1, x2, y2 in resized pixels, `labels` Int64Tensor
    [N] contiguous 0..C-1, `image_id` int, `scale` float (resized / original), `orig_size` (h, w)).

    Labels: contiguous label `k` is dataset category `category_ids[k]`; by default the sorted ids of
    the file's categories, or the given list (a checkpoint's, so that labels mean the same thing;
    every category of the file must be in it). Ground truth: crowd boxes are dropped (in both
    modes: they are never targets; evaluation reads them from the JSON); boxes are clipped to the
    image (JSON width/height) and those left with width or height <= 0 are dropped, counted in one
    warning at construction. Images without boxes are kept. `train=True` flips each image
    horizontally with probability `flip_prob` (torch's RNG, so DataLoader worker seeding applies).
    Images are ordered by id.
    """

    def __init__(
        self,
        ann_file,
        images_dir,
        *,
        train: bool,
        min_size: int,
        max_size: int,
        category_ids: list[int] | None = None,
        flip_prob: float = 0.5,
    ):
        self.ann_file = Path(ann_file)
        self.images_dir = Path(images_dir)
        self.train = train
        self.min_size = min_size  # shorter side after resizing, pixels
        self.max_size = max_size  # cap on the longer side after resizing, pixels
        self.flip_prob = flip_prob  # used only when train
        dataset = load_coco_json(self.ann_file)
        if not dataset["images"]:
            raise InputError(f"{self.ann_file}: no images")
        self.category_ids = self._label_order(dataset["categories"], category_ids)
        self.label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}
        names = {c["id"]: c["name"] for c in dataset["categories"]}
        self.category_names = [names.get(cat_id, str(cat_id)) for cat_id in self.category_ids]
        self._images = sorted(dataset["images"], key=lambda image: image["id"])
        self.image_ids = [image["id"] for image in self._images]
        self._check_files_exist()
        self._targets = self._original_targets(dataset)

    def _label_order(self, categories: list[dict], category_ids: list[int] | None) -> list[int]:
        file_ids = sorted(c["id"] for c in categories)
        if category_ids is None:
            return file_ids
        unknown = sorted(set(file_ids) - set(category_ids))
        if unknown:
            known = list(category_ids)
            raise InputError(f"{self.ann_file}: categories {unknown} are not among the model's category ids {known}")
        return [int(c) for c in category_ids]

    def _check_files_exist(self) -> None:
        missing = [image["file_name"] for image in self._images if not (self.images_dir / image["file_name"]).is_file()]
        if missing:
            more = f" ({len(missing)} of {len(self._images)} images missing)" if len(missing) > 1 else ""
            raise InputError(f"{self.images_dir / missing[0]}: image file not found{more}")

    def _original_targets(self, dataset: dict) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image id -> (boxes [N, 4] float32 xyxy original pixels, labels [N] int64), crowd and degenerate dropped."""
        arrays = annotation_arrays(dataset)
        sizes = np.array([[image["width"], image["height"]] for image in dataset["images"]], dtype=np.float64)
        size_of = dict(zip((image["id"] for image in dataset["images"]), sizes))
        wh = np.array([size_of[i] for i in arrays["image_id"].tolist()]).reshape(-1, 2)  # [N, 2]
        boxes = np.clip(arrays["boxes"], 0, np.concatenate([wh, wh], axis=1))  # [N, 4]
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])  # [N]
        keep = ~arrays["iscrowd"] & ~degenerate
        num_degenerate = int((~arrays["iscrowd"] & degenerate).sum())
        if num_degenerate:
            log.warning(
                "%s: dropped %d of %d boxes with zero or negative width or height (after clipping to the image)",
                self.ann_file, num_degenerate, int((~arrays["iscrowd"]).sum()),
            )
        labels = np.array([self.label_of[c] for c in arrays["category_id"][keep].tolist()], dtype=np.int64)
        boxes, image_ids = boxes[keep].astype(np.float32), arrays["image_id"][keep]
        order = np.argsort(image_ids, kind="stable")
        splits = np.searchsorted(image_ids[order], self.image_ids, side="left")
        ends = np.searchsorted(image_ids[order], self.image_ids, side="right")
        return {
            image_id: (boxes[order[start:end]], labels[order[start:end]])
            for image_id, start, end in zip(self.image_ids, splits, ends)
        }

    def __len__(self) -> int:
        return len(self._images)

    def image_info(self, index: int) -> dict:
        """The JSON entry of image `index`: id, file_name, width, height (and whatever else it has)."""
        return self._images[index]

    def load_image(self, index: int) -> Image.Image:
        """Image `index` as an RGB PIL image at its original size; InputError if it cannot be read."""
        path = self.images_dir / self._images[index]["file_name"]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise InputError(f"{path}: image file not found") from None
        except Exception as err:  # PIL raises many types for bad files
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(f"{path}: unreadable image ({reason})") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image = self.load_image(index)
        width, height = image.size
        scale = resize_scale(width, height, self.min_size, self.max_size)
        new_size = resized_size(width, height, scale)
        if new_size != (width, height):
            image = image.resize(new_size, Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)  # [3, H, W]
        image_id = self.image_ids[index]
        boxes, labels = self._targets[image_id]
        boxes = torch.from_numpy(boxes * np.float32(scale))  # [N, 4] resized pixels
        if self.train and torch.rand(()) < self.flip_prob:
            pixels = pixels.flip(-1)
            boxes = flip_boxes(boxes, pixels.shape[-1])
        target = {
            "boxes": boxes,
            "labels": torch.from_numpy(labels.copy()),
            "image_id": int(image_id),
            "scale": float(scale),
            "orig_size": (int(height), int(width)),
        }
        return pixels, target

    def to_category_ids(self, labels) -> np.ndarray:
        """Contiguous labels [N] (array or tensor) -> dataset category ids [N] int64."""
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        return np.asarray(self.category_ids, dtype=np.int64)[labels.astype(np.int64)]


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """[N, 4] xyxy boxes of an image `width` px wide -> the same boxes after a horizontal flip."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """DataLoader collate for images of different sizes: ([3, H_i, W_i] tensors, target dicts)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
