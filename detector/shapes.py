"""The built-in shapes dataset: filled shapes on textured backgrounds, written in COCO's layout.

A small but real detection problem, so that the whole pipeline runs on a laptop CPU in minutes:

- five categories of filled polygons (ellipse, rectangle, triangle, star, cross), each rotated by a
  random angle and stretched to a random aspect ratio (1:2.5 to 2.5:1), in a random saturated
  colour that says nothing about the category;
- sizes spread over COCO's three ranges: the square root of the target box area is drawn
  log-uniformly inside small (12-32 px), medium (32-96 px) or large (96-136 px, at the default
  image size of 160) with probabilities 0.4 / 0.45 / 0.15; the size ranges scale with the image;
- 0-12 objects per image (uniform), drawn one after the other, so later objects cover earlier
  ones; objects may stick out of the frame by up to a quarter of their box;
- a textured background (smooth colour field + per-pixel noise + a few thin clutter lines).

Boxes are tight around each object's *visible* pixels: its mask minus the masks of every object
drawn after it, cut to the frame. COCO convention: a box covering pixel columns 3..7 inclusive has
x = 3, w = 5. `area` is the box area w * h in pixels (not the pixel count of the mask), so COCO's
small / medium / large split is a split on box area, the same quantity a detection's area is.

Occlusion: an object whose visible pixels are fewer than `VISIBLE_THRESH` (0.4) of its full mask
(the part outside the frame counts as hidden) is kept with `iscrowd: 1` and its visible box. COCO
evaluation then ignores detections on it instead of counting them as false positives, and the
training loader drops it (crowd boxes are never targets). An object with no visible pixel at all
gets no annotation.

Determinism: image `i` of a split is drawn from `numpy.random.default_rng([seed, split, i])`, so
the same seed gives byte-identical files (PNG, JSON in a fixed key order), and the first `n` images
of a split do not depend on how many images the split has.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from misalign.errors import InputError
from misalign.io import atomic_dir

log = logging.getLogger(__name__)

CATEGORIES = ("ellipse", "rectangle", "triangle", "star", "cross")  # category id = index + 1
SPLITS = ("train", "val")  # index used in the per-image seed
VISIBLE_THRESH = 0.4  # visible / full mask below this -> iscrowd 1
MAX_OBJECTS = 12  # objects per image: uniform in 0..MAX_OBJECTS
MIN_IMAGE_SIZE = 64
# sqrt(box area) ranges at image size 160 (COCO: small < 32, medium 32-96, large > 96), and the
# probability of each range. Scaled by image_size / 160 for other sizes.
SIZE_RANGES = ((12.0, 32.0), (32.0, 96.0), (96.0, 136.0))
SIZE_PROBS = (0.4, 0.45, 0.15)
MAX_ASPECT = 2.5  # width / height within [1 / MAX_ASPECT, MAX_ASPECT] before rotation
REFERENCE_SIZE = 160


@dataclass
class ShapeObject:
    """One drawn object of one image (internal; exposed for tests)."""

    category_id: int  # 1-based index into CATEGORIES
    colour: tuple[int, int, int]  # RGB fill, uint8
    mask: np.ndarray  # [S, S] bool, the object's pixels inside the frame (ignoring occlusion)
    full_area: int  # pixel count of the whole object, including what lies outside the frame
    visible: np.ndarray | None = None  # [S, S] bool, mask minus later objects' masks
    bbox: tuple[int, int, int, int] | None = None  # x, y, w, h of `visible`; None if invisible
    iscrowd: int = 0  # 1 when visible pixels / full_area < VISIBLE_THRESH


# --- unit shapes: polygons centred on 0, extent about [-1, 1] ----------------------------------


def _unit_polygon(category: str, rng: np.random.Generator) -> np.ndarray:
    """[P, 2] vertices (x, y) of the category's shape before stretch, rotation and scale."""
    if category == "ellipse":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if category == "rectangle":
        return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    if category == "triangle":
        t = np.pi / 2 + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if category == "star":
        inner = rng.uniform(0.35, 0.55)  # inner radius / outer radius
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    if category == "cross":
        a = rng.uniform(0.25, 0.4)  # half thickness of an arm
        quarter = np.array([[a, -1.0], [a, -a], [1.0, -a]])  # one of four rotations
        turns = [_rotate(quarter, k * np.pi / 2) for k in range(4)]
        return np.concatenate(turns, axis=0)
    raise ValueError(category)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """[P, 2] points rotated by `angle` radians about the origin."""
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


# --- one image ---------------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[S, S, 3] uint8: smooth colour field + per-pixel noise + a few thin clutter lines."""
    base = rng.uniform(40, 200)
    coarse = rng.uniform(-45, 45, size=(rng.integers(3, 9), rng.integers(3, 9), 3))
    tint = rng.uniform(-20, 20, size=3)
    channels = [Image.fromarray(coarse[..., c].astype(np.float32)) for c in range(3)]
    field = np.stack([np.asarray(c.resize((size, size), Image.BILINEAR)) for c in channels], axis=-1)  # [S, S, 3]
    noise = rng.normal(0.0, rng.uniform(4, 14), size=(size, size, 3))
    pixels = np.clip(base + tint + field + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 5)):
        ends = rng.uniform(0, size, size=4)
        grey = int(rng.integers(0, 256))
        draw.line([(ends[0], ends[1]), (ends[2], ends[3])], fill=(grey, grey, grey), width=int(rng.integers(1, 3)))
    return np.asarray(image).copy()


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated RGB colour (hue uniform, saturation 0.45-1, value 0.55-1)."""
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _place_polygon(rng: np.random.Generator, polygon: np.ndarray, size: int) -> np.ndarray:
    """[P, 2] unit polygon -> [P, 2] pixel coordinates: stretched, rotated, scaled and placed.

    The scale makes the polygon's (rotated) bounding box have the sampled area; the position keeps
    at least three quarters of that box inside the frame along each axis.
    """
    ratio = size / REFERENCE_SIZE
    size_class = rng.choice(len(SIZE_RANGES), p=SIZE_PROBS)
    lo, hi = SIZE_RANGES[size_class]
    side = math.exp(rng.uniform(math.log(lo * ratio), math.log(hi * ratio)))  # sqrt(box area)
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    points = polygon * np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)])
    points = _rotate(points, rng.uniform(0, 2 * np.pi))
    extent = points.max(axis=0) - points.min(axis=0)  # [2]
    scale = side / math.sqrt(extent[0] * extent[1])
    scale = min(scale, 0.95 * size / extent.max())  # never wider than the frame
    points = (points - points.min(axis=0)) * scale  # box now at origin
    box_wh = extent * scale
    offset = rng.uniform(-0.25 * box_wh, size - 0.75 * box_wh)  # [2]
    return points + offset


def _rasterise(points: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Polygon [P, 2] in frame pixels -> ([S, S] bool mask inside the frame, full pixel count).

    Drawn on a canvas padded by half the frame on each side so the part outside the frame is
    counted too (placement keeps every object inside the padded canvas).
    """
    pad = size // 2
    canvas = Image.new("L", (size + 2 * pad, size + 2 * pad), 0)
    ImageDraw.Draw(canvas).polygon([(float(x) + pad, float(y) + pad) for x, y in points], fill=1)
    full = np.asarray(canvas, dtype=bool)
    return full[pad : pad + size, pad : pad + size], int(full.sum())


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """[S, S] bool (non-empty) -> tight (x, y, w, h), COCO convention: columns 3..7 -> x 3, w 5."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _render_image(seed: int, split: str, index: int, image_size: int) -> tuple[np.ndarray, list[ShapeObject]]:
    """Draw image `index` of `split`: ([S, S, 3] uint8 RGB pixels, objects in drawing order).

    Every object has its `visible` mask, `bbox` (None when nothing of it is visible) and `iscrowd`.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    pixels = _background(rng, image_size)
    objects = []
    for _ in range(rng.integers(0, MAX_OBJECTS + 1)):
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        polygon = _place_polygon(rng, _unit_polygon(CATEGORIES[category_id - 1], rng), image_size)
        mask, full_area = _rasterise(polygon, image_size)
        colour = _random_colour(rng)
        pixels[mask] = colour
        objects.append(ShapeObject(category_id, colour, mask, full_area))
    covered = np.zeros((image_size, image_size), dtype=bool)  # pixels of objects drawn later
    for obj in reversed(objects):
        obj.visible = obj.mask & ~covered
        covered |= obj.mask
        num_visible = int(obj.visible.sum())
        if num_visible > 0:
            obj.bbox = _mask_bbox(obj.visible)
            obj.iscrowd = int(num_visible < VISIBLE_THRESH * obj.full_area)
    return pixels, objects


# --- the dataset -------------------------------------------------------------------------------


def _image_file_name(image_id: int) -> str:
    return f"{image_id:06d}.png"


def _write_split(root: Path, split: str, num_images: int, image_size: int, seed: int) -> None:
    """Write `root/split/*.png` and `root/annotations/instances_split.json`."""
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for index in tqdm(range(num_images), desc=f"shapes {split}", unit="img", disable=None):
        pixels, objects = _render_image(seed, split, index, image_size)
        image_id = index + 1
        file_name = _image_file_name(image_id)
        Image.fromarray(pixels).save(root / split / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for obj in objects:
            if obj.bbox is None:
                continue
            x, y, w, h = obj.bbox
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj.category_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": obj.iscrowd,
                }
            )
    dataset = {
        "info": {"description": "misalign shapes", "split": split, "seed": seed, "image_size": image_size},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset, sort_keys=True) + "\n")


def write_shapes_dataset(
    out_dir, num_train: int = 1000, num_val: int = 200, image_size: int = 160, seed: int = 0
) -> Path:
    """Write the shapes dataset to `out_dir` in COCO's layout and return `out_dir` as a Path.

    Layout: `annotations/instances_train.json`, `annotations/instances_val.json`, `train/*.png`,
    `val/*.png` (square RGB images of `image_size` px; `file_name` is relative to the split folder).
    Image ids start at 1 in each split, annotation ids at 1 in each file, category ids are 1..5.
    The folder is written atomically: it appears whole or not at all. An existing folder is
    replaced only if it is empty or an earlier shapes dataset (InputError otherwise), so a typo
    cannot wipe unrelated files.
    """
    out_dir = Path(out_dir)
    if num_train < 0 or num_val < 0:
        raise InputError(f"--num-train/--num-val: must be >= 0 (got {num_train}, {num_val})")
    if image_size < MIN_IMAGE_SIZE:
        raise InputError(f"--image-size: must be >= {MIN_IMAGE_SIZE} px (got {image_size})")
    _check_replaceable(out_dir)
    with atomic_dir(out_dir) as tmp:
        for split, num_images in zip(SPLITS, (num_train, num_val)):
            _write_split(tmp, split, num_images, image_size, seed)
    log.debug("wrote shapes dataset to %s (%d train, %d val images)", out_dir, num_train, num_val)
    return out_dir


def _check_replaceable(out_dir: Path) -> None:
    """InputError unless `out_dir` is absent, an empty folder or an earlier shapes dataset."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    entries = {p.name for p in out_dir.iterdir()}
    if entries and not (entries <= {"annotations", *SPLITS} and (out_dir / "annotations").is_dir()):
        raise InputError(f"{out_dir}: folder exists and is not a shapes dataset; choose a new or empty folder")
