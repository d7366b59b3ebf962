"""Benchmark: a CPU user's own small dataset must learn with the CPU recipe.

A few dozen 400×300 images, many small objects of one class, unlike the built-in shapes
(another size, one class, 10-24 ellipses an image of 7-40 px with no outline, unannotated
rectangles and triangles of the same sizes and colours as distractors, a noisy cluttered background). The
script writes it in COCO's layout, trains `misalign train` on it with the CPU recipe at the
images' own size (--img-size 300 --max-size 400; the recipe's step floor gives the run its
length) and prints the val split's AP50 from RUN/eval.json. Target: AP50 >= 0.3.

    .venv/bin/python bench/small_dataset.py --out runs/small            # ~40 train + 12 val images
    .venv/bin/python bench/small_dataset.py --out runs/small --epochs 3 # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 400, 300
OBJECTS = (10, 24)  # objects per image, uniform
OBJECT_SIZE = (12, 40)  # object box side in pixels, log-uniform (COCO small: most below 32)
DISTRACTORS = (2, 6)  # unannotated rectangles and triangles per image, uniform


def _background(rng: np.random.Generator) -> Image.Image:
    """A smooth colour field with pixel noise and a few thin lines: not a flat canvas."""
    coarse = rng.uniform(60, 190, size=(4, 5, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BILINEAR), dtype=np.float64)
    field += rng.normal(0, 20, size=field.shape)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 11)):
        xy = rng.uniform([0, 0, 0, 0], [WIDTH, HEIGHT, WIDTH, HEIGHT]).tolist()
        draw.line(xy, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return image


def _place(rng: np.random.Generator, taken: list, size: float) -> tuple[float, float] | None:
    """Top-left corner of a size×size box that overlaps no earlier box (None after 50 tries)."""
    for _ in range(50):
        x, y = rng.uniform(0, WIDTH - size), rng.uniform(0, HEIGHT - size)
        if all(x + size <= a or a + s <= x or y + size <= b or b + s <= y for a, b, s in taken):
            taken.append((x, y, size))
            return x, y
    return None


def _draw_image(rng: np.random.Generator) -> tuple[Image.Image, list[list[float]]]:
    """One image and its object boxes [x, y, w, h] (ellipses; rectangles and triangles are distractors)."""
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    taken: list = []
    boxes = []
    for _ in range(rng.integers(OBJECTS[0], OBJECTS[1] + 1)):
        side = float(np.exp(rng.uniform(*np.log(OBJECT_SIZE))))
        w, h = side * rng.uniform(0.6, 1.0), side * rng.uniform(0.6, 1.0)
        corner = _place(rng, taken, side)
        if corner is None:
            continue
        x0, y0 = round(corner[0]), round(corner[1])
        x1, y1 = x0 + max(round(w), 4) - 1, y0 + max(round(h), 4) - 1
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([x0, y0, x1, y1], fill=colour)
        boxes.append([float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)])  # covers x0..x1 inclusive
    for _ in range(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1)):
        side = float(np.exp(rng.uniform(*np.log(OBJECT_SIZE))))
        corner = _place(rng, taken, side)
        if corner is None:
            continue
        x0, y0, s = round(corner[0]), round(corner[1]), round(side) - 1
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x0 + round(s * rng.uniform(0.6, 1.0)), y0 + s], fill=colour)
        else:
            draw.polygon([(x0, y0 + s), (x0 + s, y0 + s), (x0 + s * rng.uniform(0, 1), y0)], fill=colour)
    return image, boxes


def write_dataset(root: Path, num_train: int, num_val: int, seed: int) -> Path:
    """DIR/annotations/instances_{train,val}.json and DIR/{train,val}/*.png, one category 'blob'."""
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, boxes = _draw_image(np.random.default_rng([seed, split_index, i]))
            name = f"{i:04d}.png"
            image.save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": WIDTH, "height": HEIGHT})
            for box in boxes:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "bbox": box,
                                    "area": box[2] * box[3], "iscrowd": 0})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "blob"}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/small", help="folder for the dataset (DATA) and the run (RUN)")
    parser.add_argument("--num-train", type=int, default=40)
    parser.add_argument("--num-val", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="retinanet")
    parser.add_argument("--epochs", type=int, help="override the recipe's length (default: its step floor)")
    args = parser.parse_args()

    out = Path(args.out)
    data = write_dataset(out / "data", args.num_train, args.num_val, args.seed)
    train = json.loads((data / "annotations" / "instances_train.json").read_text())
    print(f"dataset {data}: {len(train['images'])} train images {WIDTH}x{HEIGHT}, "
          f"{len(train['annotations'])} objects, one class", flush=True)
    command = [sys.executable, str(ROOT / "cli.py"), "train", "--model", args.model, "--data", str(data),
               "--out", str(out / "run"), "--device", "cpu", "--img-size", str(HEIGHT), "--max-size", str(WIDTH)]
    if args.epochs:
        command += ["--epochs", str(args.epochs)]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    minutes = (time.perf_counter() - start) / 60
    with open(out / "run" / "log.csv") as file:
        steps = sum(1 for _ in file) - 1
    stats = json.loads((out / "run" / "eval.json").read_text())
    print(f"AP50 {stats['AP50']:.3f} AP {stats['AP']:.3f} after {steps} optimizer steps in {minutes:.1f} min "
          f"(target AP50 >= 0.3)")


if __name__ == "__main__":
    main()
