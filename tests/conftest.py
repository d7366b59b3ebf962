"""Shared pytest fixtures: tiny COCO datasets written by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_coco(
    root: Path, images: list[dict], annotations: list[dict], categories: list[dict], split: str = "val", pixels=None
) -> tuple[Path, Path]:
    """Write `root/annotations/instances_<split>.json` and one PNG per image under `root/<split>/`.

    images: COCO image dicts (id, file_name, width, height). pixels: optional {image id: [H, W, 3]
    uint8} to draw; other images get a flat grey. Returns (annotation file, image folder).
    """
    root = Path(root)
    images_dir = root / split
    images_dir.mkdir(parents=True, exist_ok=True)
    for image in images:
        array = (pixels or {}).get(image["id"])
        if array is None:
            array = np.full((image["height"], image["width"], 3), 128, dtype=np.uint8)
        Image.fromarray(array).save(images_dir / image["file_name"])
    ann_path = root / "annotations" / f"instances_{split}.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_path, images_dir


@pytest.fixture
def make_coco(tmp_path):
    """`make_coco(images, annotations, categories, split="val", pixels=None)` -> (ann file, image folder) in tmp_path."""

    def make(images, annotations, categories, split="val", pixels=None):
        return write_coco(tmp_path / "data", images, annotations, categories, split=split, pixels=pixels)

    return make


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    """A small built-in shapes dataset (12 train, 6 val images of 96 px, seed 0), written once per session.

    Read-only: copy it before changing anything in it.
    """
    from detector.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "shapes", num_train=12, num_val=6, image_size=96, seed=0)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests' models are tiny: a second thread gains nothing, and on a busy 2-core machine two
    threads per process crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
