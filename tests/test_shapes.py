"""The built-in shapes dataset: tight boxes on the drawn pixels, determinism, COCO compatibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from detector.shapes import CATEGORIES, VISIBLE_THRESH, _render_image, write_shapes_dataset
from misalign.boxes import xywh_to_xyxy
from misalign.cocoeval import evaluate_detections, load_gt_quietly
from misalign.errors import InputError


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _extent(mask: np.ndarray) -> list[int]:
    """Slow reference: [x, y, w, h] of the True pixels, inclusive pixel ranges."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("s") / "d", num_train=8, num_val=3, image_size=160, seed=5)


def test_boxes_are_tight_around_visible_pixels(small_dataset):
    coco = json.loads((small_dataset / "annotations" / "instances_train.json").read_text())
    num_occluded = 0
    for image in coco["images"]:
        pixels, objects = _render_image(5, "train", image["id"] - 1, 160)
        saved = np.asarray(Image.open(small_dataset / "train" / image["file_name"]).convert("RGB"))
        assert np.array_equal(saved, pixels)
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        visible_objects = []
        for k, obj in enumerate(objects):
            later = np.zeros_like(obj.mask)
            for other in objects[k + 1 :]:
                later |= other.mask
            visible = obj.mask & ~later
            if visible.any():
                visible_objects.append((obj, visible))
            num_occluded += int(visible.sum() < obj.mask.sum())
        assert len(anns) == len(visible_objects)
        for ann, (obj, visible) in zip(anns, visible_objects):
            assert ann["bbox"] == _extent(visible)
            assert ann["category_id"] == obj.category_id
            assert ann["area"] == ann["bbox"][2] * ann["bbox"][3]
            assert ann["iscrowd"] == int(visible.sum() < VISIBLE_THRESH * obj.full_area)
            assert (saved[visible] == np.array(obj.colour, dtype=np.uint8)).all()
    assert num_occluded > 0  # the sample exercises occlusion


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = _tree_bytes(write_shapes_dataset(tmp_path / "a", num_train=3, num_val=2, image_size=64, seed=3))
    again = _tree_bytes(write_shapes_dataset(tmp_path / "b", num_train=3, num_val=2, image_size=64, seed=3))
    other = _tree_bytes(write_shapes_dataset(tmp_path / "c", num_train=3, num_val=2, image_size=64, seed=4))
    assert first == again
    assert sorted(first) == sorted(other)
    for name in first:
        if name.endswith(".png") or "annotations" in name:
            assert first[name] != other[name], name


def test_first_images_do_not_depend_on_split_size(tmp_path):
    short = write_shapes_dataset(tmp_path / "a", num_train=2, num_val=1, image_size=64, seed=1)
    long = write_shapes_dataset(tmp_path / "b", num_train=4, num_val=1, image_size=64, seed=1)
    for name in ("000001.png", "000002.png"):
        assert (short / "train" / name).read_bytes() == (long / "train" / name).read_bytes()


def test_pycocotools_loads_it_and_own_boxes_score_ap_one(small_dataset):
    ann_path = small_dataset / "annotations" / "instances_train.json"
    coco = load_gt_quietly(ann_path)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert coco.getCatIds() == [1, 2, 3, 4, 5]
    assert sorted(coco.getImgIds()) == list(range(1, 9))
    anns = coco.loadAnns(coco.getAnnIds(iscrowd=False))
    assert len({a["id"] for a in coco.dataset["annotations"]}) == len(coco.dataset["annotations"])
    dets = np.array([[a["image_id"], *a["bbox"], 1.0, a["category_id"]] for a in anns], dtype=np.float64)
    stats = evaluate_detections(coco, dets)
    assert stats["AP"] == pytest.approx(1.0)
    for image in coco.dataset["images"]:
        assert Image.open(small_dataset / "train" / image["file_name"]).size == (image["width"], image["height"])


def test_default_size_sample_covers_coco_size_classes(tmp_path):
    root = write_shapes_dataset(tmp_path / "d", num_train=60, num_val=0, image_size=160, seed=0)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    anns = [a for a in coco["annotations"] if not a["iscrowd"]]
    area = np.array([a["area"] for a in anns])
    shares = [(area < 32**2).mean(), ((area >= 32**2) & (area < 96**2)).mean(), (area >= 96**2).mean()]
    assert min(shares) > 0.03, shares
    assert {a["category_id"] for a in anns} == {1, 2, 3, 4, 5}
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=61)[1:]
    assert per_image.max() <= 12 and (per_image == 0).any()
    assert any(a["iscrowd"] for a in coco["annotations"])
    boxes = xywh_to_xyxy(np.array([a["bbox"] for a in coco["annotations"]], dtype=float))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 160).all()
    aspect = np.array([a["bbox"][2] / a["bbox"][3] for a in anns])
    assert aspect.min() < 0.6 and aspect.max() > 1.6


def test_refuses_to_replace_a_folder_that_is_not_a_shapes_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a shapes dataset"):
        write_shapes_dataset(tmp_path, num_train=1, num_val=1, image_size=64, seed=0)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli_shapes_then_check(tmp_path):
    runner = CliRunner()
    out = tmp_path / "shapes"
    result = runner.invoke(main, ["data", "shapes", "--out", str(out), "--num-train", "3", "--num-val", "2", "--image-size", "64"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "train").glob("*.png"))) == 3 and len(list((out / "val").glob("*.png"))) == 2
    result = runner.invoke(main, ["data", "check", "--data", str(out), "--split", "train"])
    assert result.exit_code == 0, result.output
    assert "3 images" in result.stdout and "usable: yes" in result.stdout
    # an earlier shapes dataset is replaced whole
    result = runner.invoke(main, ["data", "shapes", "--out", str(out), "--num-train", "1", "--num-val", "1", "--image-size", "64"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "train").glob("*.png"))) == 1


def test_cli_shapes_rejects_tiny_images(tmp_path):
    result = CliRunner().invoke(main, ["data", "shapes", "--out", str(tmp_path / "x"), "--image-size", "16"])
    assert result.exit_code == 2
    assert not (tmp_path / "x").exists()
