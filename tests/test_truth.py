"""misalign.truth against slow references written with plain Python loops."""

import numpy as np
import pytest

from misalign.truth import (CLS_THRESHOLDS, IOU_THRESHOLDS, count_positive_anchors, match_truth, max_iou_any,
                            raw_counts_rows, threshold_counts)
from reference import slow_iou


def slow_match(pred, pred_cat, gt, gt_cat, gt_ids, crowd):
    iou, gt_id, iou_any = [], [], []
    for p, c in zip(pred, pred_cat):
        best, best_id, best_any = 0.0, -1, 0.0
        for g, gc, gi, cr in zip(gt, gt_cat, gt_ids, crowd):
            if cr:
                continue
            v = slow_iou(p, g)
            best_any = max(best_any, v)
            if gc == c and v > best:  # strict: the first (lowest index) of equal maxima wins
                best, best_id = v, gi
        iou.append(best)
        gt_id.append(best_id)
        iou_any.append(best_any)
    return np.array(iou, np.float32), np.array(gt_id), np.array(iou_any, np.float32)


def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


@pytest.mark.parametrize("seed", range(4))
def test_match_truth_equals_slow_reference(seed):
    rng = np.random.default_rng(seed)
    gt = random_boxes(rng, 12)
    gt_cat = rng.integers(1, 4, 12)
    gt_ids = rng.permutation(1000)[:12] + 1
    crowd = rng.random(12) < 0.25
    crowd[0] = True  # at least one crowd box
    # predictions: jittered copies of gt boxes (high IoU) and random ones, several categories
    source = rng.integers(0, 12, 30)
    pred = np.concatenate([gt[source] + rng.normal(0, 3, (30, 4)), random_boxes(rng, 30)])
    pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 0.5)
    pred_cat = np.concatenate([np.where(rng.random(30) < 0.8, gt_cat[source], 3), rng.integers(1, 4, 30)])
    iou, gt_id, iou_any = match_truth(pred, pred_cat, gt, gt_cat, gt_ids, crowd)
    ref = slow_match(pred, pred_cat, gt, gt_cat, gt_ids, crowd)
    assert iou.dtype == np.float32 and gt_id.dtype == np.int64 and iou_any.dtype == np.float32
    np.testing.assert_allclose(iou, ref[0], atol=1e-7)
    np.testing.assert_array_equal(gt_id, ref[1])
    np.testing.assert_allclose(iou_any, ref[2], atol=1e-7)
    assert (iou > 0.5).sum() > 5  # the jittered copies did match
    assert not np.isin(gt_id, gt_ids[crowd]).any()


def test_match_truth_hand_worked_crowd_and_ties():
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 20, 10], [100, 100, 110, 110]], float)
    gt_cat = np.array([1, 1, 1, 2])
    gt_ids = np.array([7, 8, 9, 10])
    crowd = np.array([True, False, False, False])
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    iou, gt_id, iou_any = match_truth(pred, [1, 2, 1], gt, gt_cat, gt_ids, crowd)
    # pred 0: crowd id 7 ignored; ids 8 (IoU 1) and 9 (IoU 0.5): 8. pred 1: class 2 has no overlap.
    np.testing.assert_allclose(iou, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(gt_id, [8, -1, -1])
    np.testing.assert_allclose(iou_any, [1.0, 1.0, 0.0])
    # ties between two identical non-crowd boxes: lowest gt index
    gt2 = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
    _, tie_id, _ = match_truth(pred[:1], [1], gt2, [1, 1], [5, 4], [False, False])
    assert tie_id[0] == 5


def test_match_truth_empty_inputs():
    iou, gt_id, iou_any = match_truth(np.zeros((3, 4)) + [0, 0, 1, 1], [1, 1, 1], np.zeros((0, 4)), [], [], [])
    np.testing.assert_array_equal(gt_id, [-1, -1, -1])
    assert iou.shape == (3,) and iou_any.max() == 0
    iou, gt_id, iou_any = match_truth(np.zeros((0, 4)), [], [[0, 0, 1, 1]], [1], [1], [False])
    assert iou.shape == gt_id.shape == iou_any.shape == (0,)
    only_crowd = match_truth([[0, 0, 1, 1]], [1], [[0, 0, 1, 1]], [1], [1], [True])
    assert only_crowd[0][0] == 0 and only_crowd[1][0] == -1 and only_crowd[2][0] == 0


def test_positive_anchors_and_max_iou_any():
    rng = np.random.default_rng(5)
    anchors = random_boxes(rng, 200)
    gt = np.concatenate([anchors[:20] + rng.normal(0, 2, (20, 4)), random_boxes(rng, 3)])
    gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 1)
    crowd = np.zeros(len(gt), bool)
    crowd[:5] = True
    best = [max([slow_iou(a, g) for g, c in zip(gt, crowd) if not c]) for a in anchors]
    np.testing.assert_allclose(max_iou_any(anchors, gt, crowd), best, atol=1e-7)
    expected = sum(np.float32(v) > np.float32(0.5) for v in best)
    assert count_positive_anchors(anchors, gt, crowd) == expected
    assert expected > 5
    # The paper's Positive_NUM is IoU > 0.5: a 10x10 anchor in a 10x20 gt (IoU exactly 0.5) is not
    # positive; in a 10x19 gt (IoU 100/190) it is.
    assert count_positive_anchors([[0, 0, 10, 10]], [[0, 0, 10, 20]], [False]) == 0
    assert count_positive_anchors([[0, 0, 10, 10]], [[0, 0, 10, 19]], [False]) == 1
    assert count_positive_anchors(anchors, np.zeros((0, 4)), []) == 0


def test_threshold_counts_strict_and_float32():
    values = np.array([0.05, 0.5, 0.50001, 0.6, 0.95, np.nan], np.float32)
    counts = threshold_counts(values, CLS_THRESHOLDS)
    slow = [sum(1 for v in values if not np.isnan(v) and v > np.float32(t)) for t in CLS_THRESHOLDS]
    np.testing.assert_array_equal(counts, slow)
    np.testing.assert_array_equal(counts, [4, 3, 1, 1, 1, 1])  # float32(0.6) is not > 0.6
    assert threshold_counts(np.zeros(0, np.float32), IOU_THRESHOLDS).tolist() == [0] * 5


def test_raw_counts_rows_long_format():
    rng = np.random.default_rng(2)
    cls = rng.random(1000).astype(np.float32)
    raw_iou = rng.random(1000).astype(np.float32)
    anchor_iou = rng.random(1000).astype(np.float32)
    frame = raw_counts_rows(42, cls, raw_iou, anchor_iou)
    assert list(frame.columns) == ["image_id", "stage", "quantity", "threshold", "count"]
    assert len(frame) == 6 + 5 + 5 and (frame["image_id"] == 42).all()
    for row in frame.itertuples():
        source = {("raw", "cls"): cls, ("raw", "iou"): raw_iou, ("anchors", "iou"): anchor_iou}[(row.stage, row.quantity)]
        assert row.count == sum(1 for v in source if v > np.float32(row.threshold))
    assert set(raw_counts_rows(1, cls, raw_iou)["stage"]) == {"raw"}
