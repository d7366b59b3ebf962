"""misalign.suppression: hand-worked cases, the plain-loop reference (tests/reference.py) on synthetic
ledgers compared exactly, the filtered ledger reads, and the gallery cases with their boxes."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from misalign import suppression as S
from misalign.cocoeval import load_ground_truth
from misalign.ledger import read_ledger
from misalign.synthetic import synthetic_ledger
from reference import slow_suppression

COLUMNS = ["cand_id", "image_id", "gt_id", "iou", "score", "kept", "suppressed_by"]


def candidates(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.astype({"cand_id": np.int64, "image_id": np.int64, "gt_id": np.int64, "iou": np.float32,
                         "score": np.float32, "kept": bool, "suppressed_by": np.int64})


def gap(a, b) -> float:
    """The gap as defined: the float32 IoUs' difference in float64."""
    return float(np.float32(a)) - float(np.float32(b))


# (cand_id, image_id, gt_id, iou, score, kept, suppressed_by); each ground truth one case
HAND_ROWS = [
    (0, 10, 1, 0.8, 0.3, False, 1), (1, 10, 1, 0.6, 0.9, True, -1),  # best suppressed, gap 0.2: loss
    (2, 10, 2, 0.65, 0.4, False, 3), (3, 10, 2, 0.6, 0.8, True, -1),  # gap 0.05: eligible, no loss
    (4, 10, 3, 0.9, 0.9, True, -1), (5, 10, 3, 0.7, 0.2, False, 4),  # best box kept: no loss
    (6, 11, 4, 0.45, 0.3, False, 7), (7, 11, 4, 0.2, 0.9, True, -1),  # best < 0.5: not eligible
    (8, 11, 5, 0.7, 0.4, False, -1), (9, 11, 5, 0.5, 0.6, True, -1),  # best cut by max_det, not suppressed
    (10, 11, 6, 0.75, 0.5, False, 11), (11, 11, -1, 0.0, 0.9, True, -1),  # suppressed by a background box, none kept
    # ties at the best IoU: the highest score decides (suppressed: a loss; cut: none)
    (12, 12, 7, 0.8, 0.6, False, 14), (13, 12, 7, 0.8, 0.5, False, -1), (14, 12, 7, 0.55, 0.9, True, -1),
    (15, 12, 8, 0.8, 0.5, False, 17), (16, 12, 8, 0.8, 0.6, False, -1), (17, 12, 8, 0.55, 0.9, True, -1),
    # same IoU and score: the lowest cand_id decides (listed second on purpose)
    (19, 13, 9, 0.8, 0.6, False, -1), (18, 13, 9, 0.8, 0.6, False, 20), (20, 13, 9, 0.3, 0.9, True, -1),
    (21, 13, 10, 0.5, 0.4, False, 22), (22, 13, -1, 0.0, 0.8, True, -1),  # best exactly 0.5: eligible, a loss
    # the gap of the float32 IoUs: 0.75 - 0.65 is 0.1000000238 (a loss), 0.7 - 0.6 is 0.0999999642 (not)
    (23, 14, 11, 0.75, 0.3, False, 24), (24, 14, 11, 0.65, 0.9, True, -1),
    (25, 14, 12, 0.7, 0.3, False, 26), (26, 14, 12, 0.6, 0.9, True, -1),
]


def test_hand_worked_cases():
    table = S.per_gt_table(candidates(HAND_ROWS)).set_index("gt_id")
    assert table.index.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    losses = {1: gap(0.8, 0.6), 6: gap(0.75, 0), 7: gap(0.8, 0.55), 9: gap(0.8, 0.3), 10: gap(0.5, 0),
              11: gap(0.75, 0.65)}
    assert table.index[table["loss"]].tolist() == sorted(losses)
    assert table.index[table["eligible"]].tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12]  # not 4 (best 0.45)
    for g, value in losses.items():
        assert table.loc[g, "gap"] == value
    assert table.loc[2, "gap"] == gap(0.65, 0.6) and table.loc[12, "gap"] == gap(0.7, 0.6) < 0.1
    assert table.loc[1, "kept_cand_id"] == 1 and table.loc[1, "best_cand_id"] == 0
    assert table.loc[6, "kept_cand_id"] == -1 and table.loc[6, "best_kept"] == 0  # no kept box: best_kept 0
    assert table.loc[7, "best_cand_id"] == 12 and table.loc[8, "best_cand_id"] == 16 and table.loc[9, "best_cand_id"] == 18
    assert table["best_fate"].to_dict() == {1: "suppressed", 2: "suppressed", 3: "kept", 4: "none", 5: "cut",
                                            6: "suppressed", 7: "suppressed", 8: "cut", 9: "suppressed",
                                            10: "suppressed", 11: "suppressed", 12: "suppressed"}
    assert table.loc[4, "best_any"] == 0 and table.loc[4, "kept_cand_id"] == 7  # only its kept box is in the table
    metrics = S.suppression_metrics(table.reset_index())
    assert metrics == {"losses": 6, "eligible": 11, "rate": 6 / 11, "mean_iou_gap": math.fsum(losses.values()) / 6}
    assert S.worst_losses(table.reset_index()).tolist() == [6, 9, 10, 7, 1, 11]  # gap 0.75, 0.5 (9 before 10), ...
    assert S.worst_losses(table.reset_index(), size=2).tolist() == [6, 9]


def test_no_candidates_and_no_losses():
    empty = S.per_gt_table(candidates([]))
    assert len(empty) == 0
    assert S.suppression_metrics(empty) == {"losses": 0, "eligible": 0, "rate": None, "mean_iou_gap": None}
    kept_best = S.per_gt_table(candidates([(0, 1, 5, 0.9, 0.9, True, -1)]))
    assert S.suppression_metrics(kept_best) == {"losses": 0, "eligible": 1, "rate": 0.0, "mean_iou_gap": None}
    assert S.unavailable_metrics() == dict.fromkeys(S.METRIC_KEYS)


def assert_matches_reference(frame: pd.DataFrame) -> dict:
    """per_gt_table and suppression_metrics equal the plain loops exactly; returns the metrics."""
    ref, ref_metrics = slow_suppression(frame.to_dict("records"))
    table = S.per_gt_table(frame).set_index("gt_id")
    for g, expected in ref.items():
        if g not in table.index:  # only a ground truth that cannot be eligible nor has a kept box is left out
            assert not expected["eligible"] and expected["kept_cand_id"] == -1, g
            continue
        row = table.loc[g]
        assert bool(row["eligible"]) == expected["eligible"] and bool(row["loss"]) == expected["loss"], g
        assert row["kept_cand_id"] == expected["kept_cand_id"] and float(row["best_kept"]) == expected["best_kept"], g
        if expected["eligible"]:
            assert row["best_cand_id"] == expected["best_cand_id"] and float(row["best_any"]) == expected["best_any"], g
            assert row["gap"] == expected["gap"], g
    assert set(table.index) <= set(ref)
    metrics = S.suppression_metrics(table.reset_index())
    assert metrics == ref_metrics
    return metrics


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("suppression")
    gt = synthetic_ledger(root / "dump", num_images=40, cands_per_image=150, num_categories=4, gt_per_image=4,
                          kept_per_image=15, seed=3, gt_path=root / "gt.json")
    synthetic_ledger(root / "other", num_images=40, cands_per_image=150, kept_per_image=15, seed=8, gt_path=gt)
    return {"root": root, "gt": gt, "dump": root / "dump", "other": root / "other"}


def test_synthetic_ledger_matches_the_plain_loop_reference(synthetic):
    frame = read_ledger(synthetic["dump"], columns=COLUMNS).candidates
    metrics = assert_matches_reference(frame)
    assert metrics["losses"] > 20 and 0 < metrics["rate"] < 1  # the synthetic NMS loses many best boxes
    # the row order does not matter
    shuffled = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    assert S.suppression_metrics(S.per_gt_table(shuffled)) == metrics


def test_ties_everywhere_match_the_reference(synthetic):
    """IoUs on a 0.05 grid and scores on a 0.1 grid: many candidates share the best IoU and score."""
    frame = read_ledger(synthetic["dump"], columns=COLUMNS).candidates
    frame = frame.assign(iou=(np.round(frame["iou"] * 20) / 20).astype(np.float32),
                         score=(np.round(frame["score"] * 10) / 10).astype(np.float32))
    per_gt = frame[frame["gt_id"] >= 0].groupby("gt_id")["iou"]
    assert (frame.groupby("gt_id")["iou"].transform("max").eq(frame["iou"]) & (frame["gt_id"] >= 0)).sum() > per_gt.ngroups
    assert_matches_reference(frame.sample(frac=1.0, random_state=1))


def full_boxes(folder, cand_ids):
    frame = pd.read_parquet(folder / "candidates.parquet")
    return frame.set_index("cand_id").loc[cand_ids, ["x1", "y1"]].to_numpy()


def test_read_pool_holds_exactly_the_rows_that_can_matter(synthetic):
    full = read_ledger(synthetic["dump"], columns=COLUMNS).candidates
    pool = S.read_pool(synthetic["dump"])
    mask = S.relevant_mask(full["gt_id"], full["iou"], full["kept"])
    assert 0 < len(pool) < len(full)
    pd.testing.assert_frame_equal(pool, full[mask].reset_index(drop=True))
    assert S.suppression_metrics(S.per_gt_table(pool)) == S.suppression_metrics(S.per_gt_table(full))
    read = S.read_boxes(read_ledger(synthetic["dump"], columns=COLUMNS), [7, 3, -1, 7])  # no boxes in memory: read
    assert read["cand_id"].tolist() == [3, 7] and list(read.columns) == ["cand_id", "x1", "y1", "x2", "y2"]
    in_memory = S.read_boxes(read_ledger(synthetic["dump"]), [7, 3, -1, 7])
    pd.testing.assert_frame_equal(in_memory, read)
    np.testing.assert_array_equal(read[["x1", "y1"]].to_numpy(), full_boxes(synthetic["dump"], [3, 7]))


def test_gallery_cases_are_the_worst_losses_with_their_boxes(synthetic):
    ledger = read_ledger(synthetic["dump"])
    coco_gt = load_ground_truth(synthetic["gt"])
    metrics, cases = S.analyse_ledger(ledger, coco_gt)
    table = S.per_gt_table(ledger.candidates)
    assert metrics == S.suppression_metrics(table)
    assert list(cases.columns) == list(S.CASE_COLUMNS) and len(cases) == S.GALLERY_SIZE
    assert cases["gt_id"].tolist() == S.worst_losses(table).tolist() and cases["rank"].tolist() == list(range(len(cases)))
    assert cases["loss"].all() and (cases["best_fate"] == "suppressed").all()
    assert (np.diff(cases["gap"]) <= 0).all()
    all_gaps = table.loc[table["loss"], "gap"]
    assert cases["gap"].min() >= all_gaps.nlargest(S.GALLERY_SIZE).min()
    by_id = ledger.candidates.set_index("cand_id")
    ann = {a["id"]: a for a in json.loads(synthetic["gt"].read_text())["annotations"]}
    for row in cases.to_dict("records"):
        x, y, w, h = ann[row["gt_id"]]["bbox"]
        assert [row["gt_x1"], row["gt_y1"], row["gt_x2"], row["gt_y2"]] == [x, y, x + w, y + h]
        assert row["image_id"] == ann[row["gt_id"]]["image_id"] and row["category_id"] == ann[row["gt_id"]]["category_id"]
        for prefix in ("kept", "suppressed"):
            cand = by_id.loc[row[f"{prefix}_cand_id"]]
            assert [row[f"{prefix}_{e}"] for e in ("x1", "y1", "x2", "y2")] == cand[["x1", "y1", "x2", "y2"]].tolist()
            assert cand["gt_id"] == row["gt_id"]
        assert by_id.loc[row["kept_cand_id"], "kept"] and row["kept_iou"] == row["best_kept"]
        sup = by_id.loc[row["suppressed_cand_id"]]
        assert sup["iou"] == row["suppressed_iou"] == row["best_any"] and sup["score"] == row["suppressed_score"]
        assert sup["suppressed_by"] == row["suppressed_by"] >= 0
        assert row["suppressed_by_kept"] == (row["suppressed_by"] == row["kept_cand_id"])
        assert row["image_file"] is None and not row["image_found"]  # synthetic: no image folder
    # read without the columns it needs (as the report reads a ledger), it reads its own pool: same result
    streamed = read_ledger(synthetic["dump"], columns=["image_id", "iou", "kept"])
    metrics2, cases2 = S.analyse_ledger(streamed, coco_gt)
    assert metrics2 == metrics
    pd.testing.assert_frame_equal(cases2, cases)


def test_another_detector_shows_the_same_ground_truths(synthetic):
    import dataclasses

    coco_gt = load_ground_truth(synthetic["gt"])
    _, reference = S.analyse_ledger(read_ledger(synthetic["dump"]), coco_gt)
    ids = reference["gt_id"].tolist()
    other = read_ledger(synthetic["other"])
    # the last ground truth: one the other detector never matched (its rows taken out)
    other = dataclasses.replace(other, candidates=other.candidates[other.candidates["gt_id"] != ids[-1]])
    _, cases = S.analyse_ledger(other, coco_gt, ids)
    assert cases["gt_id"].tolist() == ids
    table = S.per_gt_table(other.candidates).set_index("gt_id")
    fates = set()
    for row in cases.iloc[:-1].to_dict("records"):
        expected = table.loc[row["gt_id"]]
        assert row["best_fate"] == expected["best_fate"] and row["loss"] == expected["loss"]
        assert row["kept_cand_id"] == expected["kept_cand_id"] and row["gap"] == expected["gap"]
        has_suppressed = expected["best_fate"] == "suppressed"
        assert (row["suppressed_cand_id"] >= 0) == has_suppressed == np.isfinite(row["suppressed_x1"])
        fates.add(row["best_fate"])
    assert len(fates) > 1  # the other detector kept some of these best boxes and lost others
    last = cases.iloc[-1]
    assert last["best_fate"] == "none" and last["kept_cand_id"] == -1 and not last["loss"] and last["gap"] == 0
    assert np.isnan(last["kept_x1"]) and np.isnan(last["suppressed_x1"])
    assert last["gt_x1"] == reference["gt_x1"].iloc[-1] and last["image_id"] == reference["image_id"].iloc[-1]


def test_post_nms_only_ledger_has_no_suppression(tmp_path):
    gt = synthetic_ledger(tmp_path / "post", num_images=5, cands_per_image=60, post_nms_only=True,
                          gt_path=tmp_path / "gt.json")
    metrics, cases = S.analyse_ledger(read_ledger(tmp_path / "post"), load_ground_truth(gt))
    assert metrics == {"losses": None, "eligible": None, "rate": None, "mean_iou_gap": None} and cases is None


def test_image_files_resolve_in_the_recorded_folder(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.png").write_bytes(b"")
    cases = pd.DataFrame({"image_id": [1, 2]})
    images = pd.DataFrame({"image_id": [2, 1], "file_name": ["b.png", "a.png"]})
    found = S.add_image_files(cases, images, tmp_path / "val")
    assert found["image_file"].tolist() == [str(tmp_path / "val" / "a.png"), str(tmp_path / "val" / "b.png")]
    assert found["image_found"].tolist() == [True, False]
    none = S.add_image_files(cases, images, None)
    assert none["image_file"].tolist() == [None, None] and not none["image_found"].any()
