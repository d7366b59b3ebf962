"""detector.truth_device: the dump's truth columns and raw counts on the model's device equal
misalign.truth's numpy numbers exactly (runs on CPU torch here; the same ops run on CUDA)."""

import numpy as np
import pytest
import torch

from detector.truth_device import GroundTruth, candidate_truth, max_iou_any, pack, raw_count_values, unpack
from misalign.truth import RAW_COUNT_WIDTH, max_iou_any as host_max_iou_any, raw_counts_frame, raw_counts_rows
from misalign.truth import truth_columns


def _boxes(rng, num, size=100.0):
    """Float32-valued boxes (as the dump's), with repeats and exact copies of the ground truth."""
    corner = rng.uniform(0, size, (num, 2))
    wh = rng.uniform(0, size / 2, (num, 2))
    wh[: num // 10] = 0  # degenerate boxes: zero area
    return np.concatenate([corner, corner + wh], axis=1).astype(np.float32).astype(np.float64)


def _images(rng):
    """Ground truth of four images: ordinary and crowd boxes, one image with none, one crowd only."""
    images = []
    for num_gt, num_crowd in ((5, 2), (0, 0), (3, 0), (0, 2)):
        boxes = _boxes(rng, num_gt + num_crowd)
        iscrowd = np.r_[np.zeros(num_gt, bool), np.ones(num_crowd, bool)]
        images.append({"boxes": boxes, "category_id": rng.integers(1, 4, len(boxes)),
                       "ann_id": rng.integers(1, 10**9, len(boxes)), "iscrowd": iscrowd})
    return images


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_candidate_truth_equals_the_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    gts = _images(rng)
    ground = GroundTruth.upload(gts, "cpu")
    crowd_seen = False
    for image, gt in enumerate(gts):
        boxes = _boxes(rng, 300)
        category = rng.integers(1, 4, len(boxes))
        copies = len(gt["boxes"])  # copies of every gt box (crowd too) with its category: IoU 1, crowd cover 1
        boxes[:copies], category[:copies] = gt["boxes"], gt["category_id"]
        got = candidate_truth(torch.from_numpy(boxes), torch.from_numpy(category), ground, image)
        expected = truth_columns(boxes, category, gt["boxes"], gt["category_id"], gt["ann_id"], gt["iscrowd"])
        for name, values in expected.items():
            assert got[name].numpy().dtype == values.dtype, name
            np.testing.assert_array_equal(got[name].numpy(), values, err_msg=name)
        crowd_seen |= bool(expected["crowd"].any())
    assert crowd_seen  # the crowd rule was exercised, not only its all-false case


def test_duplicate_ground_truth_gives_the_first_annotation():
    gt = {"boxes": np.array([[0.0, 0, 10, 10], [0, 0, 10, 10]]), "category_id": np.array([1, 1]),
          "ann_id": np.array([7, 3]), "iscrowd": np.array([False, False])}
    got = candidate_truth(torch.tensor([[0.0, 0, 10, 10]], dtype=torch.float64), torch.tensor([1]),
                          GroundTruth.upload([gt], "cpu"), 0)
    assert got["gt_id"].tolist() == [7] and got["iou"].tolist() == [1.0]


def test_raw_counts_equal_the_numpy_reference():
    rng = np.random.default_rng(3)
    gts = _images(rng)
    ground = GroundTruth.upload(gts, "cpu")
    for image, gt in enumerate(gts):
        raw, anchors = _boxes(rng, 5000), _boxes(rng, 5000)
        raw_cls = rng.uniform(0, 1, len(raw)).astype(np.float32)
        raw_cls[:20] = np.float32(0.5)  # exactly on a threshold: not counted (strict >)
        raw_cls[20:25] = np.nan
        raw_iou = host_max_iou_any(raw, gt["boxes"], gt["iscrowd"])
        anchor_iou = host_max_iou_any(anchors, gt["boxes"], gt["iscrowd"])
        got_raw = max_iou_any(torch.from_numpy(raw), ground, image)
        np.testing.assert_array_equal(got_raw.numpy(), raw_iou)
        counts = raw_count_values(torch.from_numpy(raw_cls), got_raw, max_iou_any(torch.from_numpy(anchors), ground, image))
        assert counts.shape == (RAW_COUNT_WIDTH,)
        expected = raw_counts_rows(7, raw_cls, raw_iou, anchor_iou)
        assert raw_counts_frame(7, counts.numpy()).equals(expected)


def test_pack_and_unpack_round_trip_every_dtype():
    tensors = {"f64": torch.randn(3, 4, dtype=torch.float64), "f32": torch.randn(5), "i64": torch.arange(7) - 3,
               "i8": torch.tensor([-1, 2, 3], dtype=torch.int8), "b": torch.tensor([True, False, True]),
               "empty": torch.zeros(0, 4), "i32": torch.tensor([1, -2], dtype=torch.int32)}
    buffer, layout = pack(tensors)
    assert buffer.dtype == torch.uint8 and buffer.ndim == 1
    back = unpack(buffer.numpy(), layout)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.numpy().dtype and back[name].shape == tuple(tensor.shape), name
        np.testing.assert_array_equal(back[name], tensor.numpy(), err_msg=name)
