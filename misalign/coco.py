"""COCO datasets on disk: find them, load and validate their JSON, check them before a long run.

Layout (COCO 2017's own): `DIR/annotations/instances_<split>.json` and the images of that split
under `DIR/<split>/`, `file_name` relative to that folder. Every problem with the input raises
`InputError("<file>: <problem>")`, one line. No torch here.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from misalign.boxes import xywh_to_xyxy
from misalign.errors import InputError

REQUIRED_KEYS = ("images", "annotations", "categories")
MAX_LISTED = 5  # problem files named in a summary


def resolve_dataset(data=None, split=None, ann=None, images=None) -> tuple[Path, Path]:
    """(annotation file, image folder) from `--data DIR --split NAME` or `--ann FILE --images DIR`.

    `DIR --split NAME` means `DIR/annotations/instances_NAME.json` and `DIR/NAME/`; `ann` or
    `images` given beside `data` override that half. Both paths must exist (InputError otherwise).
    """
    if data is not None:
        data = Path(data)
        if not data.is_dir():
            raise InputError(f"{data}: dataset folder not found")
        if split is None and (ann is None or images is None):
            raise InputError("--split: give the split to use with --data (e.g. --split val)")
        ann = Path(ann) if ann is not None else data / "annotations" / f"instances_{split}.json"
        images = Path(images) if images is not None else data / split
    elif ann is None:
        raise InputError("--data: give a dataset (--data DIR --split NAME, or --ann FILE --images DIR)")
    elif images is None:
        raise InputError("--images: give the image folder that goes with --ann")
    ann, images = Path(ann), Path(images)
    if not ann.is_file():
        raise InputError(f"{ann}: annotation file not found")
    if not images.is_dir():
        raise InputError(f"{images}: image folder not found")
    return ann, images


def load_coco_json(ann_path) -> dict:
    """The COCO dict in `ann_path`, validated; InputError naming the file and the first problem.

    Checks: readable JSON object with `images`, `annotations`, `categories` lists; images have an
    int `id`, a `file_name` and positive `width`/`height`; categories an int `id` and a `name`;
    annotations an `id`, an `image_id` and `category_id` that exist, a `bbox` of four finite
    numbers ([x, y, w, h], original pixels). Ids unique. Box sizes are not checked here
    (`check_dataset` counts them; the loaders drop degenerate boxes).
    """
    ann_path = Path(ann_path)
    dataset = _read_json(ann_path)
    if not isinstance(dataset, dict):
        kind = type(dataset).__name__
        raise InputError(f"{ann_path}: not a COCO annotation file (top level is a {kind}, expected an object)")
    missing = [key for key in REQUIRED_KEYS if key not in dataset]
    if missing:
        raise InputError(f"{ann_path}: not a COCO annotation file (missing {', '.join(repr(k) for k in missing)})")
    for key in REQUIRED_KEYS:
        if not isinstance(dataset[key], list) or not all(isinstance(item, dict) for item in dataset[key]):
            raise InputError(f"{ann_path}: not a COCO annotation file ('{key}' is not a list of objects)")
    image_ids = _unique_ids(ann_path, dataset["images"], "image", {"file_name": str, "width": int, "height": int})
    category_ids = _unique_ids(ann_path, dataset["categories"], "category", {"name": str})
    _unique_ids(ann_path, dataset["annotations"], "annotation", {"image_id": int, "category_id": int})
    for image in dataset["images"]:
        if image["width"] <= 0 or image["height"] <= 0:
            raise InputError(f"{ann_path}: image {image['id']} has size {image['width']}x{image['height']}")
    for ann in dataset["annotations"]:
        _check_annotation(ann_path, ann, image_ids, category_ids)
    return dataset


def _read_json(path: Path):
    if not path.exists():
        raise InputError(f"{path}: annotation file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a COCO annotation file (.json)")
    try:
        with open(path, "rb") as stream:
            return json.load(stream)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}"
        raise InputError(f"{path}: not valid JSON ({err.msg} at {where}; truncated?)") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_ids(path: Path, items: list, kind: str, fields: dict) -> set:
    """Ids of `items` after checking each has an int id and the typed `fields`; InputError on duplicates."""
    ids = set()
    for position, item in enumerate(items):
        if not _is_int(item.get("id")):
            raise InputError(f"{path}: {kind} #{position} has no integer 'id' (got {item.get('id')!r})")
        name = f"{kind} {item['id']}"
        for key, kind_type in fields.items():
            value = item.get(key)
            if not (_is_int(value) if kind_type is int else isinstance(value, kind_type)):
                raise InputError(f"{path}: {name} has no {kind_type.__name__} '{key}'")
        if item["id"] in ids:
            raise InputError(f"{path}: {kind} id {item['id']} appears twice")
        ids.add(item["id"])
    return ids


def _check_annotation(path: Path, ann: dict, image_ids: set, category_ids: set) -> None:
    if ann["image_id"] not in image_ids:
        raise InputError(f"{path}: annotation {ann['id']} refers to unknown image_id {ann['image_id']}")
    if ann["category_id"] not in category_ids:
        raise InputError(f"{path}: annotation {ann['id']} refers to unknown category_id {ann['category_id']}")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
        raise InputError(f"{path}: annotation {ann['id']} has no valid 'bbox' [x, y, w, h] (got {bbox!r})")


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def annotation_arrays(dataset: dict) -> dict[str, np.ndarray]:
    """Every annotation as arrays, in file order.

    Returns `ann_id` [N] int64, `image_id` [N] int64, `category_id` [N] int64, `iscrowd` [N] bool
    (missing field = 0), `boxes` [N, 4] float64 x1, y1, x2, y2 in original-image pixels.
    """
    anns = dataset["annotations"]
    bbox = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)  # [N, 4] xywh
    return {
        "ann_id": np.array([a["id"] for a in anns], dtype=np.int64),
        "image_id": np.array([a["image_id"] for a in anns], dtype=np.int64),
        "category_id": np.array([a["category_id"] for a in anns], dtype=np.int64),
        "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
        "boxes": xywh_to_xyxy(bbox),
    }


# --- data check ---------------------------------------------------------------------------------


def ground_truth_by_image(dataset: dict) -> dict[int, dict[str, np.ndarray]]:
    """image id -> its annotations as arrays (ann_id, category_id, iscrowd, boxes xyxy original px), for
    every image of `dataset` (a COCO instances dict), empty arrays for an image without annotations.

    The one grouping of the ground truth by image, used by every ledger writer (the dump, the importer)
    to compute the truth columns and images.parquet's num_gt.
    """
    arrays = annotation_arrays(dataset)
    order = np.argsort(arrays["image_id"], kind="stable")
    sorted_ids = arrays["image_id"][order]
    result = {}
    for image in dataset["images"]:
        lo, hi = np.searchsorted(sorted_ids, image["id"], "left"), np.searchsorted(sorted_ids, image["id"], "right")
        rows = order[lo:hi]
        result[int(image["id"])] = {key: arrays[key][rows] for key in ("ann_id", "category_id", "iscrowd", "boxes")}
    return result


@dataclass
class CategoryCount:
    category_id: int
    name: str
    num_boxes: int  # all annotations of the category, crowd included
    num_crowd: int


@dataclass
class DatasetSummary:
    """What `check_dataset` found. Usable = at least one image, and every image file exists and decodes."""

    ann_path: Path
    images_dir: Path
    num_images: int
    num_annotations: int
    num_crowd: int
    categories: list[CategoryCount]
    num_images_without_annotations: int
    num_degenerate_boxes: int  # w <= 0 or h <= 0 (the loaders drop them)
    num_boxes_outside: int  # box reaches outside [0, width] x [0, height] of its image
    missing_files: list[str] = field(default_factory=list)  # file_name of each missing image
    unreadable_files: list[tuple[str, str]] = field(default_factory=list)  # (file_name, reason)
    size_mismatches: list[str] = field(default_factory=list)  # file size differs from the JSON

    @property
    def usable(self) -> bool:
        return self.error is None

    @property
    def error(self) -> str | None:
        """One line naming a file and the problem that makes the dataset unusable, or None."""
        if self.num_images == 0:
            return f"{self.ann_path}: no images"
        if self.missing_files:
            more = _more(len(self.missing_files), self.num_images)
            return f"{self.images_dir / self.missing_files[0]}: image file not found{more}"
        if self.unreadable_files:
            name, reason = self.unreadable_files[0]
            more = _more(len(self.unreadable_files), self.num_images)
            return f"{self.images_dir / name}: unreadable image ({reason}){more}"
        return None


def _more(count: int, total: int) -> str:
    return f" ({count} of {total} images have this problem)" if count > 1 else ""


def check_dataset(ann_path, images_dir) -> DatasetSummary:
    """Validate the JSON (InputError on a malformed file), check every image file, count problems.

    Each image file is opened and decoded (JPEG at 1/8 scale, which still reads every byte, so a
    truncated file is caught); several files at a time in threads, with a progress bar on stderr.
    """
    ann_path, images_dir = Path(ann_path), Path(images_dir)
    dataset = load_coco_json(ann_path)
    arrays = annotation_arrays(dataset)
    images = dataset["images"]
    sizes = {img["id"]: (img["width"], img["height"]) for img in images}
    summary = DatasetSummary(
        ann_path=ann_path,
        images_dir=images_dir,
        num_images=len(images),
        num_annotations=len(arrays["ann_id"]),
        num_crowd=int(arrays["iscrowd"].sum()),
        categories=_category_counts(dataset["categories"], arrays),
        num_images_without_annotations=len(sizes.keys() - set(arrays["image_id"].tolist())),
        num_degenerate_boxes=int(_degenerate(arrays["boxes"]).sum()),
        num_boxes_outside=int(_outside(arrays["boxes"], arrays["image_id"], sizes).sum()),
    )
    for image, problem in zip(images, _check_image_files(images_dir, images)):
        if problem == "missing":
            summary.missing_files.append(image["file_name"])
        elif problem == "size":
            summary.size_mismatches.append(image["file_name"])
        elif problem is not None:
            summary.unreadable_files.append((image["file_name"], problem))
    return summary


def _category_counts(categories: list[dict], arrays: dict) -> list[CategoryCount]:
    boxes = Counter(arrays["category_id"].tolist())
    crowd = Counter(arrays["category_id"][arrays["iscrowd"]].tolist())
    ordered = sorted(categories, key=lambda c: c["id"])
    return [CategoryCount(c["id"], c["name"], boxes[c["id"]], crowd[c["id"]]) for c in ordered]


def _degenerate(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] xyxy -> [N] bool, width or height <= 0."""
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


def _outside(boxes: np.ndarray, image_ids: np.ndarray, sizes: dict) -> np.ndarray:
    """[N, 4] xyxy, [N] image ids -> [N] bool, box reaches outside its image's [0, W] x [0, H]."""
    wh = np.array([sizes[i] for i in image_ids.tolist()], dtype=np.float64).reshape(-1, 2)  # [N, 2]
    return (boxes[:, :2] < 0).any(axis=1) | (boxes[:, 2:] > wh).any(axis=1)


def _check_image_files(images_dir: Path, images: list[dict]) -> list[str | None]:
    """Per image: None (fine), 'missing', 'size' (decodes, size differs from the JSON) or a reason."""
    from tqdm import tqdm

    def check(image):
        return check_image_file(images_dir / image["file_name"], (image["width"], image["height"]))

    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check, images)
        return list(tqdm(results, total=len(images), desc="checking images", unit="img", disable=None))


def check_image_file(path: Path, size: tuple[int, int] | None = None) -> str | None:
    """None if `path` decodes as an image (of `size` (width, height) when given), else the problem."""
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            actual = image.size  # before draft(), which shrinks it
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as err:  # PIL raises many types for bad files; all mean "unreadable"
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    if size is not None and tuple(actual) != tuple(size):
        return "size"
    return None


def format_summary(summary: DatasetSummary) -> str:
    """A readable multi-line report of `summary` for the terminal."""
    lines = [
        f"annotations: {summary.ann_path}",
        f"images:      {summary.images_dir}",
        f"{summary.num_images} images, {summary.num_annotations} boxes ({summary.num_crowd} crowd), "
        f"{len(summary.categories)} categories",
        "boxes per category (crowd):",
    ]
    width = max([len(c.name) for c in summary.categories], default=0)
    for c in summary.categories:
        lines.append(f"  {c.category_id:>4}  {c.name:<{width}}  {c.num_boxes:>8}  ({c.num_crowd})")
    lines.append(f"images without annotations: {summary.num_images_without_annotations}")
    lines.append(f"boxes with zero or negative size: {summary.num_degenerate_boxes} (ignored by the loaders)")
    lines.append(f"boxes reaching outside their image: {summary.num_boxes_outside} (clipped by the loaders)")
    lines += _listed("image files missing", summary.missing_files)
    lines += _listed("image files unreadable", [f"{name} ({reason})" for name, reason in summary.unreadable_files])
    lines += _listed("images whose size differs from the JSON", summary.size_mismatches)
    lines.append("usable: yes" if summary.usable else f"usable: NO ({summary.error})")
    return "\n".join(lines)


def _listed(title: str, names: list[str]) -> list[str]:
    lines = [f"{title}: {len(names)}"]
    lines += [f"  {name}" for name in names[:MAX_LISTED]]
    if len(names) > MAX_LISTED:
        lines.append(f"  ... and {len(names) - MAX_LISTED} more")
    return lines
