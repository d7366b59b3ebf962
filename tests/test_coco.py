"""COCO datasets on disk: resolving paths, validating JSON, `data check`, one test per bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from misalign.coco import check_dataset, check_image_file, format_summary, load_coco_json, resolve_dataset
from misalign.errors import InputError

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
IMAGES = [
    {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
    {"id": 2, "file_name": "b.png", "width": 20, "height": 20},
    {"id": 4, "file_name": "c.png", "width": 10, "height": 10},
]
ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 5], "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 40, 30], "iscrowd": 1},
    {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0, 4]},  # zero width
    {"id": 4, "image_id": 2, "category_id": 7, "bbox": [15, 15, 10, 10]},  # x2 = 25 > 20
    {"id": 5, "image_id": 1, "category_id": 7, "bbox": [-1.5, 0, 5, 5]},  # x1 < 0
]


def _check(args):
    return CliRunner().invoke(main, ["data", "check", *args])


def _assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    assert "Traceback" not in result.output


# --- resolve_dataset / load_coco_json ---------------------------------------------------------


def test_resolve_dataset_from_folder_and_split(make_coco):
    ann, images = make_coco(IMAGES, ANNOTATIONS, CATEGORIES, split="train")
    root = images.parent
    assert resolve_dataset(data=root, split="train") == (root / "annotations" / "instances_train.json", root / "train")
    assert resolve_dataset(ann=ann, images=images) == (ann, images)
    other_images = root / "elsewhere"
    other_images.mkdir()
    assert resolve_dataset(data=root, split="train", images=other_images) == (ann, other_images)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({}, "--data"),
        ({"ann": "x.json"}, "--images"),
        ({"data": "nowhere", "split": "val"}, "nowhere: dataset folder not found"),
    ],
)
def test_resolve_dataset_errors(tmp_path, monkeypatch, kwargs, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=needle):
        resolve_dataset(**kwargs)


def test_load_coco_json_returns_the_dataset(make_coco):
    ann, _ = make_coco(IMAGES, ANNOTATIONS, CATEGORIES)
    dataset = load_coco_json(ann)
    assert [a["id"] for a in dataset["annotations"]] == [1, 2, 3, 4, 5]
    assert dataset["categories"] == CATEGORIES


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 1 appears twice"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation 1 has no valid 'bbox'"),
        (lambda d: d["images"][0].pop("file_name"), "image 1 has no str 'file_name'"),
        (lambda d: d["categories"][0].update(id="3"), "category #0 has no integer 'id'"),
        (lambda d: d.update(images={}), "'images' is not a list of objects"),
    ],
)
def test_load_coco_json_rejects_malformed_entries(tmp_path, change, needle):
    dataset = json.loads(json.dumps({"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES}))
    change(dataset)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(dataset))
    with pytest.raises(InputError, match=needle) as err:
        load_coco_json(path)
    assert str(err.value).startswith(str(path))


# --- check_dataset ----------------------------------------------------------------------------


def test_check_dataset_counts_by_hand(make_coco):
    # image 4 is written 12x10 but the JSON says 10x10
    ann, images = make_coco(IMAGES, ANNOTATIONS, CATEGORIES, pixels={4: np.zeros((10, 12, 3), np.uint8)})
    summary = check_dataset(ann, images)
    assert (summary.num_images, summary.num_annotations, summary.num_crowd) == (3, 5, 1)
    assert [(c.category_id, c.name, c.num_boxes, c.num_crowd) for c in summary.categories] == [(3, "cat", 2, 0), (7, "dog", 3, 1)]
    assert summary.num_images_without_annotations == 1  # image 4
    assert summary.num_degenerate_boxes == 1  # annotation 3
    assert summary.num_boxes_outside == 2  # annotations 4 and 5
    assert summary.size_mismatches == ["c.png"]
    assert summary.missing_files == [] and summary.unreadable_files == []
    assert summary.usable and summary.error is None
    text = format_summary(summary)
    assert "3 images, 5 boxes (1 crowd), 2 categories" in text
    assert "dog" in text and "usable: yes" in text


def test_check_dataset_lists_every_bad_file(make_coco):
    ann, images = make_coco(IMAGES, ANNOTATIONS, CATEGORIES)
    (images / "a.png").unlink()
    (images / "c.png").write_bytes(b"not an image")
    summary = check_dataset(ann, images)
    assert summary.missing_files == ["a.png"]
    assert [name for name, _ in summary.unreadable_files] == ["c.png"]
    assert not summary.usable
    assert summary.error.startswith(f"{images / 'a.png'}: image file not found")


def test_no_images_is_not_usable(make_coco):
    ann, images = make_coco([], [], CATEGORIES)
    summary = check_dataset(ann, images)
    assert summary.error == f"{ann}: no images"


def test_check_image_file_catches_truncated_png_and_jpeg(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    for suffix in ("png", "jpg"):
        path = tmp_path / f"x.{suffix}"
        Image.fromarray(pixels).save(path)
        assert check_image_file(path, (80, 64)) is None
        assert check_image_file(path, (64, 80)) == "size"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        assert check_image_file(path) not in (None, "missing", "size")
    assert check_image_file(tmp_path / "none.png") == "missing"


def test_cli_check_good_dataset_exits_zero(make_coco):
    ann, images = make_coco(IMAGES, ANNOTATIONS, CATEGORIES, split="train")
    result = _check(["--data", str(images.parent), "--split", "train"])
    assert result.exit_code == 0, result.output
    assert "usable: yes" in result.stdout
    assert "boxes with zero or negative size: 1" in result.stdout
    result = _check(["--ann", str(ann), "--images", str(images)])
    assert result.exit_code == 0, result.output


# --- bad input: one line on stderr, exit code 2 ----------------------------------------------


def test_bad_input_missing_folder(tmp_path):
    _assert_one_line_error(_check(["--data", str(tmp_path / "nope"), "--split", "val"]), tmp_path / "nope", "not found")


def test_bad_input_missing_annotation_file(make_coco):
    _, images = make_coco(IMAGES, ANNOTATIONS, CATEGORIES, split="val")
    root = images.parent
    _assert_one_line_error(_check(["--data", str(root), "--split", "train"]), root / "annotations" / "instances_train.json", "annotation file not found")


def test_bad_input_truncated_json(make_coco):
    ann, images = make_coco(IMAGES, ANNOTATIONS, CATEGORIES)
    ann.write_text(ann.read_text()[:-40])
    _assert_one_line_error(_check(["--ann", str(ann), "--images", str(images)]), ann, "not valid JSON")


def test_bad_input_json_not_coco(make_coco):
    ann, images = make_coco(IMAGES, ANNOTATIONS, CATEGORIES)
    ann.write_text(json.dumps({"images": IMAGES}))
    _assert_one_line_error(_check(["--ann", str(ann), "--images", str(images)]), ann, "not a COCO annotation file", "'annotations'", "'categories'")


def test_bad_input_annotation_of_unknown_image(make_coco):
    bad = [*ANNOTATIONS, {"id": 9, "image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1]}]
    ann, images = make_coco(IMAGES, bad, CATEGORIES)
    _assert_one_line_error(_check(["--ann", str(ann), "--images", str(images)]), ann, "annotation 9", "unknown image_id 99")


def test_bad_input_annotation_of_unknown_category(make_coco):
    bad = [*ANNOTATIONS, {"id": 9, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}]
    ann, images = make_coco(IMAGES, bad, CATEGORIES)
    _assert_one_line_error(_check(["--ann", str(ann), "--images", str(images)]), ann, "annotation 9", "unknown category_id 5")


def test_bad_input_missing_image_file(make_coco):
    ann, images = make_coco(IMAGES, ANNOTATIONS, CATEGORIES)
    (images / "b.png").unlink()
    result = _check(["--ann", str(ann), "--images", str(images)])
    _assert_one_line_error(result, images / "b.png", "image file not found")
    assert "usable: NO" in result.stdout  # the summary still shows what was found


def test_bad_input_corrupt_image_file(make_coco):
    ann, images = make_coco(IMAGES, ANNOTATIONS, CATEGORIES)
    data = (images / "a.png").read_bytes()
    (images / "a.png").write_bytes(data[:30] + b"\0" * (len(data) - 30))
    _assert_one_line_error(_check(["--ann", str(ann), "--images", str(images)]), images / "a.png", "unreadable image")
