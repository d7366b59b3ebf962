"""detector.data: label mapping, resize scale round trip, flips, crowd / empty / degenerate handling, batching."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from detector.data import CocoDetection, collate_detection, flip_boxes, resize_scale, resized_size
from misalign.boxes import xywh_to_xyxy
from misalign.errors import InputError

# Category ids are not contiguous and not sorted in the file.
CATEGORIES = [{"id": 11, "name": "kite"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
IMAGES = [
    {"id": 5, "file_name": "wide.png", "width": 200, "height": 100},
    {"id": 2, "file_name": "small.png", "width": 90, "height": 60},
    {"id": 9, "file_name": "empty.png", "width": 50, "height": 80},
]
ANNOTATIONS = [
    {"id": 1, "image_id": 5, "category_id": 3, "bbox": [10, 20, 50, 30]},  # the red block below
    {"id": 2, "image_id": 5, "category_id": 11, "bbox": [100, 0, 60, 100]},
    {"id": 3, "image_id": 5, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 1},
    {"id": 4, "image_id": 5, "category_id": 7, "bbox": [30, 30, 0, 10]},  # zero width
    {"id": 5, "image_id": 5, "category_id": 7, "bbox": [150, 50, 20, 0]},  # zero height
    {"id": 6, "image_id": 5, "category_id": 7, "bbox": [300, 0, 10, 10]},  # outside: empty after clipping
    {"id": 7, "image_id": 5, "category_id": 7, "bbox": [180, 90, 40, 20]},  # clipped to [180, 90, 200, 100]
    {"id": 8, "image_id": 2, "category_id": 7, "bbox": [0.5, 1.25, 89.5, 58.75]},
]


def _pixels():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 100, size=(100, 200, 3), dtype=np.uint8)
    wide[20:50, 10:60] = (255, 0, 0)  # annotation 1
    return {5: wide, 2: rng.integers(0, 256, size=(60, 90, 3), dtype=np.uint8)}


@pytest.fixture
def coco(make_coco):
    return make_coco(IMAGES, ANNOTATIONS, CATEGORIES, pixels=_pixels())


def _dataset(coco, **kwargs):
    options = {"train": False, "min_size": 64, "max_size": 100, **kwargs}
    return CocoDetection(*coco, **options)


def test_labels_are_contiguous_and_map_back(coco):
    ds = _dataset(coco)
    assert ds.category_ids == [3, 7, 11]
    assert ds.category_names == ["cat", "dog", "kite"]
    assert ds.image_ids == [2, 5, 9]
    _, target = ds[1]  # image 5: cat, kite, clipped dog
    assert target["labels"].tolist() == [0, 2, 1]
    assert target["labels"].dtype == torch.int64
    assert ds.to_category_ids(target["labels"]).tolist() == [3, 11, 7]


def test_labels_follow_a_given_category_order(coco):
    ds = _dataset(coco, category_ids=[11, 3, 7, 42])  # a checkpoint's order, with an extra category
    assert ds[1][1]["labels"].tolist() == [1, 0, 2]
    assert ds.to_category_ids(np.array([3, 0])).tolist() == [42, 11]
    with pytest.raises(InputError, match="categories \\[7\\] are not among the model's"):
        _dataset(coco, category_ids=[3, 11])


def test_resize_scale_by_hand():
    assert resize_scale(200, 100, 64, 100) == 0.5  # longer side caps it
    assert resize_scale(90, 60, 64, 100) == pytest.approx(64 / 60)
    assert resized_size(90, 60, 64 / 60) == (96, 64)
    assert resize_scale(50, 80, 64, 100) == 1.25
    assert resized_size(50, 80, 1.25) == (62, 100)  # 62.5 rounds to even


def test_resized_boxes_divided_by_scale_are_the_original_boxes(coco):
    ds = _dataset(coco)
    expected_shapes = {2: (3, 64, 96), 5: (3, 50, 100), 9: (3, 100, 62)}
    expected_boxes = {
        2: [[0.5, 1.25, 90.0, 60.0]],
        5: [[10, 20, 60, 50], [100, 0, 160, 100], [180, 90, 200, 100]],
        9: np.zeros((0, 4)),
    }
    for i, image_id in enumerate(ds.image_ids):
        image, target = ds[i]
        assert target["image_id"] == image_id
        assert tuple(image.shape) == expected_shapes[image_id]
        info = ds.image_info(i)
        assert target["orig_size"] == (info["height"], info["width"])
        assert target["scale"] == resize_scale(info["width"], info["height"], 64, 100)
        original = target["boxes"].double().numpy() / target["scale"]
        np.testing.assert_allclose(original.reshape(-1, 4), np.asarray(expected_boxes[image_id], float).reshape(-1, 4), atol=1e-4)


def test_image_tensor_is_the_pil_resize(coco):
    ds = _dataset(coco)
    image, _ = ds[1]  # 200x100 -> 100x50
    reference = np.asarray(Image.fromarray(_pixels()[5]).resize((100, 50), Image.BILINEAR)) / 255.0  # [H, W, 3]
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), reference, atol=1e-6)
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1


def test_horizontal_flip_moves_boxes_with_the_pixels(coco):
    plain = _dataset(coco, train=False, flip_prob=1.0)  # never flips outside training
    flipped = _dataset(coco, train=True, flip_prob=1.0)
    image, target = plain[1]
    flipped_image, flipped_target = flipped[1]
    assert torch.equal(flipped_image, image.flip(-1))
    # resized width 100: x1' = 100 - x2, x2' = 100 - x1
    assert flipped_target["boxes"][0].tolist() == [70.0, 10.0, 95.0, 25.0]
    assert torch.equal(flip_boxes(flipped_target["boxes"], 100), target["boxes"])
    red = flipped_image[:, 11:24, 71:94]  # inside the flipped red block, away from its blurred edge
    assert torch.allclose(red, torch.tensor([1.0, 0.0, 0.0])[:, None, None], atol=1e-6)
    assert flipped_target["scale"] == target["scale"]


def test_random_flip_uses_torch_rng(coco):
    ds = _dataset(coco, train=True)
    torch.manual_seed(0)
    first = [ds[1][1]["boxes"][0, 0].item() for _ in range(20)]
    torch.manual_seed(0)
    second = [ds[1][1]["boxes"][0, 0].item() for _ in range(20)]
    assert first == second
    assert set(first) == {5.0, 70.0}  # both flipped and not


def test_crowd_boxes_dropped(coco):
    for train in (True, False):
        boxes = _dataset(coco, train=train, flip_prob=0.0)[1][1]["boxes"]
        assert len(boxes) == 3
        assert not any(box == [0.0, 0.0, 5.0, 5.0] for box in boxes.tolist())  # the crowd box, resized


def test_image_without_annotations_kept(coco):
    ds = _dataset(coco, train=True)
    assert len(ds) == 3
    image, target = ds[2]
    assert target["image_id"] == 9
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_degenerate_boxes_dropped_with_one_counting_warning(coco, caplog):
    with caplog.at_level(logging.WARNING, logger="detector.data"):
        ds = _dataset(coco)
        for i in range(len(ds)):
            ds[i]
    warnings = [r for r in caplog.records if r.name == "detector.data"]
    assert len(warnings) == 1
    assert "dropped 3 of 7 boxes" in warnings[0].getMessage()  # annotations 4, 5, 6 of the 7 non-crowd


def test_collate_keeps_images_of_different_sizes(coco):
    loader = torch.utils.data.DataLoader(_dataset(coco), batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert [tuple(im.shape) for im in images] == [(3, 64, 96), (3, 50, 100), (3, 100, 62)]
    assert [t["image_id"] for t in targets] == [2, 5, 9]
    assert collate_detection([]) == ([], [])


def test_missing_image_file_fails_at_construction(coco):
    ann, images = coco
    (images / "small.png").unlink()
    with pytest.raises(InputError, match="small.png: image file not found"):
        _dataset(coco)


def test_corrupt_image_file_fails_with_its_name(coco):
    ann, images = coco
    (images / "small.png").write_bytes(b"\x89PNG garbage")
    ds = _dataset(coco)
    with pytest.raises(InputError, match="small.png: unreadable image"):
        ds[0]


def test_bad_json_is_an_input_error(coco):
    ann, images = coco
    ann.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        _dataset(coco)


def test_shapes_dataset_targets_match_the_json(shapes_dataset):
    ann = shapes_dataset / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    ds = CocoDetection(ann, shapes_dataset / "val", train=False, min_size=128, max_size=256)
    for i in range(len(ds)):
        image, target = ds[i]
        assert tuple(image.shape) == (3, 128, 128)
        anns = [a for a in coco["annotations"] if a["image_id"] == target["image_id"] and not a["iscrowd"]]
        expected = xywh_to_xyxy(np.array([a["bbox"] for a in anns], float).reshape(-1, 4))
        np.testing.assert_allclose(target["boxes"].numpy() / target["scale"], expected, atol=1e-4)
        assert ds.to_category_ids(target["labels"]).tolist() == [a["category_id"] for a in anns]
