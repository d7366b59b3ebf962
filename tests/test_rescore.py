"""Counterfactual rescoring (misalign.rescore, `misalign report --rescore`).

The fast NMS (chunks of (image, category) groups, one torchvision call per chunk) is checked against
a slow greedy NMS written with plain loops, against misalign.importer's per-image NMS, and on
float64 boxes against per-group torchvision NMS on the unshifted boxes; the IoU-guided oracle
against a plain loop of IoU-Net's algorithm; every AP against pycocotools on the slow reference's
kept boxes; two toy images are worked out by hand; the report's metrics.json keys, section and CSV
are checked through the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from reference import slow_iou

from cli import main
from misalign.errors import InputError
from misalign.synthetic import synthetic_ledger

SIZES = dict(num_images=12, cands_per_image=150, num_categories=4, gt_per_image=4, kept_per_image=10)
RANKINGS = ("cls", "obj", "cls*obj", "alpha=0.4", "oracle")  # the per-row score rankings checked one by one


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory):
    """One split, four dumps: conf (obj_score), base and base2 (no obj_score), post (post-NMS only)."""
    root = tmp_path_factory.mktemp("rescore")
    gt = synthetic_ledger(root / "conf", seed=3, gt_path=root / "gt.json", **SIZES)
    synthetic_ledger(root / "base", seed=4, gt_path=gt, with_obj=False, **SIZES)
    synthetic_ledger(root / "base2", seed=6, gt_path=gt, with_obj=False, **SIZES)
    synthetic_ledger(root / "post", seed=5, gt_path=gt, post_nms_only=True, **SIZES)
    return {"root": root, "gt": gt, **{k: root / k for k in ("conf", "base", "base2", "post")}}


@pytest.fixture(scope="module")
def conf(ledgers):
    from misalign.ledger import read_ledger
    from misalign.rescore import RESCORE_COLUMNS, rescore

    ledger = read_ledger(ledgers["conf"], columns=list(RESCORE_COLUMNS))
    return ledger, rescore(ledger, ledgers["gt"])


# --- slow references -----------------------------------------------------------------------------


def slow_greedy_nms(image_id, category_id, boxes, scores, nms_thresh, max_det) -> set[int]:
    """Rows kept: per image and class, walk the rows by score (ties in row order) and keep a row unless a
    kept row of its group overlaps it by IoU > nms_thresh; then the best max_det of each image by score."""
    groups: dict = {}
    for row in range(len(scores)):
        groups.setdefault((int(image_id[row]), int(category_id[row])), []).append(row)
    survivors = []
    for rows in groups.values():
        alive = []
        for row in sorted(rows, key=lambda r: -scores[r]):  # sorted() is stable: ties stay in row order
            if all(slow_iou(boxes[k], boxes[row]) <= nms_thresh for k in alive):
                alive.append(row)
        survivors += alive
    per_image: dict = {}
    for row in survivors:
        per_image.setdefault(int(image_id[row]), []).append(row)
    kept = set()
    for rows in per_image.values():
        kept |= set(sorted(rows, key=lambda r: (-scores[r], r))[:max_det])
    return kept


def reference_kept(candidates, scores, nms_thresh, max_det) -> np.ndarray:
    boxes = [[float(v) for v in row] for row in candidates[["x1", "y1", "x2", "y2"]].to_numpy()]
    kept = slow_greedy_nms(candidates["image_id"].to_numpy(), candidates["category_id"].to_numpy(), boxes,
                           [float(s) for s in scores], nms_thresh, max_det)
    mask = np.zeros(len(candidates), bool)
    mask[sorted(kept)] = True
    return mask


def slow_iou_guided_nms(image_id, category_id, boxes, iou, score, nms_thresh, max_det) -> dict[int, float]:
    """IoU-Net's IoU-guided NMS (its Algorithm 1) with the true IoU, one loop per (image, category):
    take the remaining box of highest IoU (ties: higher score, then lower row), remove every remaining
    box overlapping it by IoU > nms_thresh, and give it the highest score among itself and those; then
    the best max_det of each image by that score (ties in row order). Returns {kept row: its score}."""
    groups: dict = {}
    for row in range(len(score)):
        groups.setdefault((int(image_id[row]), int(category_id[row])), []).append(row)
    survivors = {}
    for rows in groups.values():
        remaining = sorted(rows, key=lambda r: (-iou[r], -score[r], r))
        while remaining:
            top = remaining.pop(0)
            cluster = [r for r in remaining if slow_iou(boxes[top], boxes[r]) > nms_thresh]
            remaining = [r for r in remaining if r not in cluster]
            survivors[top] = max([score[top]] + [score[r] for r in cluster])
    per_image: dict = {}
    for row in survivors:
        per_image.setdefault(int(image_id[row]), []).append(row)
    kept = {}
    for rows in per_image.values():
        for row in sorted(rows, key=lambda r: (-survivors[r], r))[:max_det]:
            kept[row] = survivors[row]
    return kept


def pycocotools_json_ap(gt_path, results: list, folder) -> dict:
    """AP, AP50, AP75 of a COCO results list (image_id, category_id, bbox [x, y, w, h], score), written to a
    JSON file and loaded by pycocotools' own loadRes, as any other tool's results would be."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path = folder / "results.json"
    path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(path)), "bbox")
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(("AP", "AP50", "AP75"), evaluator.stats[:3]))


def pycocotools_ap(gt_path, candidates, kept, scores) -> dict:
    """pycocotools' COCOeval of the rows `kept` scored by `scores`, over every image of the gt."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rows = candidates[kept]
    x1, y1 = rows["x1"].to_numpy(np.float64), rows["y1"].to_numpy(np.float64)
    dets = np.column_stack([rows["image_id"].to_numpy(np.float64), x1, y1, rows["x2"].to_numpy(np.float64) - x1,
                            rows["y2"].to_numpy(np.float64) - y1, np.asarray(scores, np.float64)[kept],
                            rows["category_id"].to_numpy(np.float64)])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(("AP", "AP50", "AP75"), evaluator.stats[:3]))


# --- rankings and options ------------------------------------------------------------------------


def test_ranking_names_and_alpha_grid():
    from misalign.rescore import DEFAULT_ALPHAS, parse_alphas, ranking_names

    assert ranking_names(DEFAULT_ALPHAS) == ["cls", "obj", "cls*obj", "alpha=0", "alpha=0.1", "alpha=0.2", "alpha=0.3",
                                             "alpha=0.4", "alpha=0.5", "alpha=0.6", "alpha=0.7", "alpha=0.8",
                                             "alpha=0.9", "oracle_nms", "oracle"]
    assert ranking_names([0.4], has_obj=False) == ["cls", "oracle_nms", "oracle"]
    assert parse_alphas(" 0.4,0, 0.25") == (0.0, 0.25, 0.4)
    for text, fragment in (("1.5", "outside [0, 1]"), ("a,b", "not a comma-separated"), ("0.1,0.10", "appears twice"),
                           ("", "not a comma-separated"), ("0.2,", "not a comma-separated")):
        with pytest.raises(InputError, match=r"^--alphas: ") as err:
            parse_alphas(text)
        assert fragment in str(err.value)


def test_ranking_scores_follow_their_formulas(conf):
    from misalign.rescore import ranking_scores

    ledger, _ = conf
    c = ledger.candidates
    scores, skipped = ranking_scores(c, [0.0, 0.4])
    cls, obj = c["cls_score"].to_numpy(np.float64), c["obj_score"].to_numpy(np.float64)
    assert list(scores) == ["cls", "obj", "cls*obj", "alpha=0", "alpha=0.4", "oracle"] and skipped == {}
    np.testing.assert_array_equal(scores["cls*obj"], cls * obj)
    np.testing.assert_allclose(scores["alpha=0.4"], np.exp(0.4 * np.log(obj) + 0.6 * np.log(cls)), rtol=1e-12)
    np.testing.assert_array_equal(scores["alpha=0"], cls)  # obj^0 * cls^1 is cls exactly
    np.testing.assert_array_equal(scores["oracle"], c["iou"].to_numpy(np.float64))


# --- the NMS against slow references -------------------------------------------------------------


@pytest.mark.parametrize("ranking", RANKINGS)
def test_nms_matches_slow_greedy_reference(conf, ranking):
    from misalign.rescore import nms_settings, ranking_scores, rescored_kept

    ledger, _ = conf
    c = ledger.candidates
    settings = nms_settings(ledger.meta)
    assert (settings["nms_thresh"], settings["max_det"]) == (0.5, SIZES["kept_per_image"])  # the dump's own
    scores = ranking_scores(c)[0][ranking]
    fast = rescored_kept(c, scores, settings["nms_thresh"], settings["max_det"])
    slow = reference_kept(c, scores, settings["nms_thresh"], settings["max_det"])
    np.testing.assert_array_equal(fast, slow)
    # not trivial: NMS suppressed boxes and max_det cut survivors in every image
    per_image = pd.Series(fast).groupby(c["image_id"].to_numpy()).sum()
    assert (per_image == SIZES["kept_per_image"]).all()
    no_cut = rescored_kept(c, scores, settings["nms_thresh"], 10**6)
    assert no_cut.sum() > fast.sum() and no_cut.sum() < len(c)


def test_pruned_nms_reruns_images_whose_best_rows_leave_too_few_survivors():
    """Each image: a tight cluster of 40 boxes scored 0.9..0.5 (one survivor) and 30 boxes apart
    scored 0.1..0.24, tied in pairs. With max_det 4 the NMS first sees each image's 12 best rows, all
    in the cluster, one survivor: too few, so the image is run again on every row; the cut at
    max_det then splits the pair tied at 0.23 in row order. The slow greedy reference decides."""
    from misalign.rescore import ImageSlots, best_rows_per_image, rescored_kept

    rows = []
    for image_id in (1, 2, 3):
        for k in range(40):
            rows.append((image_id, 1, 10.0 + 0.01 * k, 10.0, 60.0, 50.0, 0.9 - 0.01 * k))
        for k in range(30):
            x = 100.0 + 30 * k
            rows.append((image_id, 1, x, 100.0, x + 20, 120.0, 0.1 + 0.01 * (k // 2)))
    c = pd.DataFrame(rows, columns=["image_id", "category_id", "x1", "y1", "x2", "y2", "score"])
    scores = c["score"].to_numpy()
    kept = rescored_kept(c, scores, 0.5, 4)
    np.testing.assert_array_equal(kept, reference_kept(c, scores, 0.5, 4))
    chosen = best_rows_per_image(ImageSlots.of(c["image_id"].to_numpy()), scores, 12)
    assert (kept & ~chosen).sum() == 3 * 3  # the rerun found each image's 3 boxes apart
    tied = np.isclose(scores, 0.23)
    assert (kept & tied).sum() == 3 and (tied.sum() == 6)  # one of each image's tied pair: the first row


def test_nms_agrees_with_the_importers_per_image_nms(conf):
    from misalign.nms import nms_with_attribution
    from misalign.rescore import ranking_scores, rescored_kept

    ledger, _ = conf
    c = ledger.candidates
    scores = ranking_scores(c)[0]["cls*obj"]
    fast = rescored_kept(c, scores, 0.5, 7)
    for image_id, rows in c.groupby("image_id").indices.items():
        ranked = rows[np.argsort(-scores[rows], kind="stable")]  # the importer's contract: rows ranked by score
        kept, _ = nms_with_attribution(c[["x1", "y1", "x2", "y2"]].to_numpy()[ranked], scores[ranked],
                                       c["category_id"].to_numpy()[ranked], 0.5, 7)
        np.testing.assert_array_equal(fast[ranked], kept, err_msg=f"image {image_id}")


def test_chunk_offsets_keep_groups_apart_and_iou_ties_exact():
    """300 (image, category) groups packed several per chunk, each of three boxes sharing x1, y1, x2:

        b1 (score 0.9) bottom y + 2h;  b2 (0.8) bottom y + h;  b3 (0.7) bottom y + 1.2h
    IoU(b1, b2) = h / 2h = 0.5 exactly (y, y + h, y + 2h are exact float32 values: h is a multiple of
    2^-10 px and y lies in [1024, 1500)), which is not > 0.5, so b2 survives; IoU(b1, b3) = 0.6 and b3
    goes. The same 100 triples appear in each of 3 images, so if groups met, identical boxes (IoU 1)
    would suppress each other. If the offsets rounded a coordinate (as float32 offsets do: 484 of the
    600 survive then), IoU(b1, b2) would move off 0.5. So exactly b1 and b2 of every group survive.
    """
    from misalign.nms import nms_survivors, plan_nms

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1500, 100).astype(np.float32)  # [100]
    y = rng.uniform(1024, 1500, 100).astype(np.float32)
    h = rng.integers(4 * 1024, 200 * 1024, 100) / 1024.0
    x2 = (x + rng.uniform(4, 200, 100)).astype(np.float32)
    bottoms = [(y + 2 * h).astype(np.float32), (y + h).astype(np.float32), (y + 1.2 * h).astype(np.float32)]
    assert np.all(bottoms[0].astype(np.float64) - y == 2 * (bottoms[1].astype(np.float64) - y))  # exact
    triples = np.stack([np.stack([x, y, x2, b], 1) for b in bottoms], 1).reshape(-1, 4)  # [300, 4]
    boxes = np.tile(triples, (3, 1))  # [900, 4]
    image_id = np.repeat(np.arange(3), 300)
    category_id = np.tile(np.repeat(np.arange(100), 3), 3)
    scores = np.tile([0.9, 0.8, 0.7], 300)
    expected = np.tile([True, True, False], 300)
    assert slow_iou(boxes[0].tolist(), boxes[1].tolist()) == 0.5
    for chunk_rows in (256, 64, 1):
        plan = plan_nms(image_id, category_id, boxes, chunk_rows=chunk_rows)
        assert plan.inexact_chunks == 0  # float32 values shift exactly: no per-group fallback
        if chunk_rows > 1:
            assert 1 < len(plan.starts) < 300 and max(plan.ends - plan.starts) > 3  # groups share chunks
        np.testing.assert_array_equal(nms_survivors(plan, scores, 0.5), expected)
    slow = slow_greedy_nms(image_id, category_id, boxes.astype(np.float64).tolist(), scores.tolist(), 0.5, 10**6)
    assert slow == set(np.flatnonzero(expected).tolist())


def test_float64_two_decimal_boxes_at_the_threshold_match_per_group_torchvision_nms():
    """Two-decimal float64 boxes (as COCO results files hold them), pairs whose IoU is exactly nms_thresh.

    Each group: b1 (score 0.9) and b2 (0.8) share x1, y1, x2; b2 is about half as tall, and only pairs whose
    float64 IoU, computed as the kernel does on the unshifted boxes, is exactly 0.5 are used: b2 survives
    (0.5 is not > 0.5). A third box b3 (0.7), about 0.6 of b1, goes. 10.37 + 2^20 rounds, so shifting these
    groups apart moves IoUs off 0.5 (checked below: a naive shift flips some groups); the plan must detect
    that and still equal per-(image, category) torchvision nms on the unshifted boxes. A fourth image of
    integer boxes shifts exactly, so both paths run in one plan.
    """
    import torch
    from torchvision.ops import nms

    from misalign.nms import nms_survivors, plan_nms

    rng = np.random.default_rng(1)
    n = 3000
    x, y = np.round(rng.uniform(0, 1200, n), 2), np.round(rng.uniform(0, 800, n), 2)
    w, h = np.round(rng.uniform(4, 200, n), 2), np.round(rng.uniform(4, 200, n), 2)
    x2 = np.round(x + w, 2)
    b1 = np.stack([x, y, x2, np.round(y + 2 * h, 2)], 1)
    b2 = np.stack([x, y, x2, np.round(y + h, 2)], 1)
    b3 = np.stack([x, y, x2, np.round(y + 1.2 * h, 2)], 1)
    at_thresh = [i for i in range(n) if slow_iou(b1[i].tolist(), b2[i].tolist()) == 0.5][:240]
    assert len(at_thresh) == 240
    triples = np.stack([b1[at_thresh], b2[at_thresh], b3[at_thresh]], 1).reshape(-1, 4)  # [720, 4]
    ints = np.tile(np.array([[0, 0, 100, 100], [0, 0, 100, 50], [0, 0, 100, 60]], np.float64), (40, 1))  # [120, 4]
    boxes = np.concatenate([triples, ints])  # [840, 4] float64
    image_id = np.r_[np.repeat(np.arange(3), 240), np.full(120, 3)]
    category_id = np.r_[np.repeat(np.arange(240), 3), np.repeat(np.arange(40), 3)]
    scores = np.tile([0.9, 0.8, 0.7], 280)
    expected = np.zeros(len(boxes), bool)  # per-group torchvision nms on the unshifted float64 boxes
    for key in set(zip(image_id.tolist(), category_id.tolist())):
        rows = np.flatnonzero((image_id == key[0]) & (category_id == key[1]))
        expected[rows[nms(torch.from_numpy(boxes[rows]), torch.from_numpy(scores[rows]), 0.5).numpy()]] = True
    assert expected.sum() == 2 * 280  # b1 and b2 of every group
    naive = [len(nms(torch.from_numpy(boxes[3 * g:3 * g + 3] + 2.0 ** 20 * (g + 1)), torch.from_numpy(scores[:3]), 0.5))
             for g in range(240)]
    assert naive.count(2) < 240  # shifting rounds these coordinates and moves decisions
    for chunk_rows in (256, 16, 1):
        plan = plan_nms(image_id, category_id, boxes, chunk_rows=chunk_rows)
        if chunk_rows > 1:  # (one group per chunk is never shifted: offset 0, the boxes start at x, y >= 0)
            assert plan.inexact_chunks > 0 and max(plan.ends - plan.starts) > 3  # both paths: fallback, shifted chunk
        np.testing.assert_array_equal(nms_survivors(plan, scores, 0.5), expected)


# --- AP -----------------------------------------------------------------------------------------


def test_ap_of_every_ranking_equals_pycocotools_on_the_reference_kept_set(ledgers, conf):
    from misalign.rescore import DEFAULT_ALPHAS, ranking_names, ranking_scores

    ledger, result = conf
    c = ledger.candidates
    assert list(result.rankings) == ranking_names(DEFAULT_ALPHAS) and result.skipped == {}
    all_scores = ranking_scores(c)[0]
    for ranking in RANKINGS:
        kept = reference_kept(c, all_scores[ranking], 0.5, SIZES["kept_per_image"])
        expected = pycocotools_ap(ledgers["gt"], c, kept, all_scores[ranking])
        assert result.rankings[ranking] == pytest.approx(expected, abs=1e-6), ranking
        assert result.num_kept[ranking] == kept.sum()
    assert result.rankings["alpha=0"] == result.rankings["cls"]  # the same ranking
    actual = pycocotools_ap(ledgers["gt"], c, c["kept"].to_numpy(), c["score"].to_numpy())
    assert result.actual == pytest.approx(actual, abs=1e-6)
    metrics = result.metrics()
    assert metrics["ap_lost_to_misalignment"] == pytest.approx(result.rankings["oracle_nms"]["AP"] - actual["AP"], abs=1e-6)
    assert metrics["ap_gap_to_oracle_ranking"] == pytest.approx(result.rankings["oracle"]["AP"] - actual["AP"], abs=1e-6)
    # the synthetic detector's scores follow IoU loosely: the oracle ranking is far better, obj better than cls;
    # IoU-guided NMS recovers part of that only (it still ranks false positives by the detector's score)
    assert result.rankings["obj"]["AP75"] > result.rankings["cls"]["AP75"]
    assert 0 < result.ap_lost < result.ap_gap_to_oracle_ranking and result.ap_gap_to_oracle_ranking > 0.05


@pytest.mark.parametrize("pair_batch", [None, 7])  # 7: who-suppressed-whom's pairs in many small batches
def test_oracle_nms_matches_a_plain_loop_of_iou_guided_nms(conf, pair_batch, monkeypatch):
    import misalign.nms
    from misalign.rescore import nms_settings, oracle_nms_kept

    if pair_batch:
        monkeypatch.setattr(misalign.nms, "PAIR_BATCH", pair_batch)
    ledger, _ = conf
    c = ledger.candidates
    settings = nms_settings(ledger.meta)
    boxes = [[float(v) for v in row] for row in c[["x1", "y1", "x2", "y2"]].to_numpy()]
    iou, score = c["iou"].to_numpy(np.float64), c["score"].to_numpy(np.float64)
    for max_det in (settings["max_det"], 10**6):
        slow = slow_iou_guided_nms(c["image_id"].to_numpy(), c["category_id"].to_numpy(), boxes, iou.tolist(),
                                   score.tolist(), settings["nms_thresh"], max_det)
        kept, detection = oracle_nms_kept(c, settings["nms_thresh"], max_det)
        assert set(np.flatnonzero(kept).tolist()) == set(slow)
        np.testing.assert_array_equal(detection[sorted(slow)], [slow[r] for r in sorted(slow)])
    # not trivial: many kept boxes carry a suppressed neighbour's higher score, and the kept set differs
    # from ranking by IoU with ties in row order (the oracle ranking's NMS)
    raised = detection[kept] > score[kept]
    assert raised.sum() >= 20 and (~raised).sum() >= 20
    from misalign.rescore import rescored_kept
    assert not np.array_equal(kept, rescored_kept(c, iou, settings["nms_thresh"], 10**6))


def test_oracle_nms_ap_equals_pycocotools_on_a_results_json(ledgers, conf, tmp_path):
    from misalign.rescore import nms_settings

    ledger, result = conf
    c = ledger.candidates
    settings = nms_settings(ledger.meta)
    boxes = [[float(v) for v in row] for row in c[["x1", "y1", "x2", "y2"]].to_numpy()]
    slow = slow_iou_guided_nms(c["image_id"].to_numpy(), c["category_id"].to_numpy(), boxes,
                               c["iou"].to_numpy(np.float64).tolist(), c["score"].to_numpy(np.float64).tolist(),
                               settings["nms_thresh"], settings["max_det"])
    results = [{"image_id": int(c["image_id"].iat[r]), "category_id": int(c["category_id"].iat[r]),
                "bbox": [boxes[r][0], boxes[r][1], boxes[r][2] - boxes[r][0], boxes[r][3] - boxes[r][1]],
                "score": s} for r, s in slow.items()]
    expected = pycocotools_json_ap(ledgers["gt"], results, tmp_path)
    assert result.rankings["oracle_nms"] == pytest.approx(expected, abs=1e-6)
    assert result.num_kept["oracle_nms"] == len(slow)
    assert result.ap_lost == pytest.approx(expected["AP"] - result.actual["AP"], abs=1e-6)


TOY_ABC = pd.DataFrame({
    "x1": [0.0, 0.0, 200.0], "y1": [0.0, 0.0, 200.0], "x2": [100.0, 100.0, 250.0], "y2": [60.0, 95.0, 250.0],
    "cls_score": [0.9, 0.5, 0.3], "obj_score": [0.5, 0.95, 0.1], "score": [0.9, 0.5, 0.3],
    "kept": [True, False, True], "suppressed_by": [-1, 0, -1],
    "iou": [0.6, 0.95, 0.0], "gt_id": [1, 1, -1], "iou_any": [0.6, 0.95, 0.0]})


def write_toy_ledger(folder, gt_path, rows=TOY_ABC):
    """One 400x400 image, one ground-truth box [0, 0, 100, 100] (category 1), the candidates `rows`.

    TOY_ABC, three candidates:
        row  box (x1 y1 x2 y2)   cls   obj   IoU with the gt
        A    0  0   100  60      0.9   0.5   6000 / 10000 = 0.6
        B    0  0   100  95      0.5   0.95  9500 / 10000 = 0.95
        C    200 200 250 250     0.3   0.1   0 (elsewhere)
    IoU(A, B) = 6000 / 9500 = 0.632 > 0.5: whichever of A and B ranks first suppresses the other.
    The dump ranked by cls: A kept, B suppressed by A, C kept.
    """
    from misalign.io import atomic_dir
    from misalign.ledger import LedgerWriter

    gt_path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg", "width": 400, "height": 400}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 10000,
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}]}))
    cands = rows.assign(image_id=1, category_id=1)
    with atomic_dir(folder) as tmp, LedgerWriter(tmp) as writer:
        writer.add_images(pd.DataFrame({"image_id": [1], "file_name": ["1.jpg"], "width": [400], "height": [400],
                                        "num_gt": [1]}))
        writer.add_candidates(cands)
        writer.close({"detector": {"name": "toy"}, "dataset": {"ann": str(gt_path)},
                      "postprocess": {"nms_thresh": 0.5, "max_det": 100}})


def test_hand_worked_toy_oracle_keeps_the_better_box(tmp_path):
    from misalign.ledger import read_ledger, validate_ledger
    from misalign.rescore import rescore

    write_toy_ledger(tmp_path / "toy", tmp_path / "gt.json")
    validate_ledger(tmp_path / "toy")
    result = rescore(tmp_path / "toy", alphas=[0.4])
    c = read_ledger(tmp_path / "toy").candidates
    np.testing.assert_allclose(c["iou"], [0.6, 0.95, 0.0], atol=1e-7)
    # cls ranks A (0.9) > B (0.5) > C (0.3): A suppresses B, C survives -> kept A, C.
    # COCO matches a box at threshold t when IoU >= t, t in 0.50, 0.55, ..., 0.95: A (0.6) matches at
    # 0.50, 0.55, 0.60, each then has precision 1 at recall 1 (A ranks above the miss C): AP_t = 1;
    # at 0.65 ... 0.95 nothing matches: AP_t = 0. So AP = 3/10, AP50 = 1, AP75 = 0.
    assert result.rankings["cls"] == pytest.approx({"AP": 0.3, "AP50": 1.0, "AP75": 0.0}, abs=1e-9)
    # oracle ranks by IoU: B (0.95) > A (0.6) > C (0): B suppresses A -> kept B, C. B matches at every
    # threshold up to 0.95: AP = AP50 = AP75 = 1.
    assert result.rankings["oracle"] == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0}, abs=1e-9)
    # obj ranks B (0.95) first; cls*obj: A 0.9*0.5 = 0.45 < B 0.5*0.95 = 0.475, B first too;
    # alpha=0.4: A 0.5^0.4 * 0.9^0.6 = 0.712 > B 0.95^0.4 * 0.5^0.6 = 0.646, A first (as cls).
    # pycocotools' own float sums give 0.9999999999999999 here (faster-coco-eval rounded it to 1.0)
    assert result.rankings["obj"]["AP75"] == pytest.approx(1.0, abs=1e-12)
    assert result.rankings["cls*obj"]["AP75"] == pytest.approx(1.0, abs=1e-12)
    assert result.rankings["alpha=0.4"] == result.rankings["cls"]
    assert result.num_kept == {name: 2 for name in result.rankings}
    # oracle_nms selects by IoU too: B suppresses A and carries the pair's best score, A's 0.9; C keeps its 0.3.
    # B (0.9) above C: AP = 1 as the oracle's.
    assert result.rankings["oracle_nms"] == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0}, abs=1e-9)
    assert result.num_kept == {name: 2 for name in result.rankings}
    # actual = the dump's kept A and C ranked by its score (cls): AP 0.3; lost to misalignment: 1 - 0.3
    assert result.actual == pytest.approx({"AP": 0.3, "AP50": 1.0, "AP75": 0.0}, abs=1e-9)
    assert result.ap_lost == pytest.approx(0.7, abs=1e-9)
    assert result.ap_gap_to_oracle_ranking == pytest.approx(0.7, abs=1e-9)


# P is better localised but scored low, Q overlaps it, F is a confident false positive elsewhere.
TOY_PQF = pd.DataFrame({
    "x1": [0.0, 0.0, 200.0], "y1": [0.0, 0.0, 200.0], "x2": [100.0, 100.0, 260.0], "y2": [82.0, 52.0, 260.0],
    "cls_score": [0.2, 0.6, 0.9], "obj_score": [0.9, 0.3, 0.1], "score": [0.2, 0.6, 0.9],
    "kept": [False, True, True], "suppressed_by": [1, -1, -1],
    "iou": [0.82, 0.52, 0.0], "gt_id": [1, 1, -1], "iou_any": [0.82, 0.52, 0.0]})


def test_hand_worked_oracle_nms_fixes_selection_not_classification(tmp_path):
    """One gt [0, 0, 100, 100]; candidates (dump ranked by cls = score):

        row  box (x1 y1 x2 y2)   score  IoU with the gt
        P    0  0   100  82      0.2    8200 / 10000 = 0.82
        Q    0  0   100  52      0.6    5200 / 10000 = 0.52
        F    200 200 260 260     0.9    0 (a false positive)
    IoU(P, Q) = 5200 / 8200 = 0.634 > 0.5. COCO matches at t when IoU >= t, t = 0.50, 0.55, ..., 0.95:
    P at the seven t <= 0.80, Q at 0.50 only.
    """
    from misalign.rescore import oracle_nms_kept, rescore

    write_toy_ledger(tmp_path / "toy", tmp_path / "gt.json", TOY_PQF)
    # IoU-guided NMS: P (IoU 0.82) first, suppresses Q and takes the pair's best score, Q's 0.6 (above its own
    # 0.2); F is alone and keeps its own 0.9: the oracle does not move a false positive down.
    kept, detection = oracle_nms_kept(TOY_PQF.assign(image_id=1, category_id=1), 0.5, 100)
    assert kept.tolist() == [True, False, True] and detection[[0, 2]].tolist() == [0.6, 0.9]
    result = rescore(tmp_path / "toy", alphas=[0.4])
    # oracle_nms: F (0.9, FP) above P (0.6, TP): precision 1/2 at recall 1 wherever P matches -> AP_t = 0.5
    # at the seven t <= 0.8, 0 above: AP = 3.5 / 10 = 0.35, AP50 = AP75 = 0.5.
    assert result.rankings["oracle_nms"] == pytest.approx({"AP": 0.35, "AP50": 0.5, "AP75": 0.5}, abs=1e-9)
    # oracle: scores are IoUs, P (0.82) above F (0): AP_t = 1 at the seven t: AP = 0.7, AP50 = AP75 = 1.
    assert result.rankings["oracle"] == pytest.approx({"AP": 0.7, "AP50": 1.0, "AP75": 1.0}, abs=1e-9)
    # cls (= the dump): F (0.9), Q (0.6) suppresses P: Q matches at 0.5 only, below F: AP = 0.05, AP50 = 0.5.
    assert result.rankings["cls"] == pytest.approx({"AP": 0.05, "AP50": 0.5, "AP75": 0.0}, abs=1e-9)
    assert result.actual == pytest.approx(result.rankings["cls"], abs=1e-12)
    assert result.ap_lost == pytest.approx(0.30, abs=1e-9)  # 0.35 - 0.05: which box NMS kept
    assert result.ap_gap_to_oracle_ranking == pytest.approx(0.65, abs=1e-9)  # 0.7 - 0.05: also the FP's rank


def test_oracle_nms_breaks_iou_ties_by_the_detectors_score():
    """Two overlapping false positives (IoU 0 with every gt; box IoU 0.8): rows in order (0.3, 0.7).
    oracle_nms keeps the 0.7 one (score breaks the IoU tie); the oracle ranking, ties in row order, keeps row 0."""
    from misalign.rescore import oracle_nms_kept, rescored_kept

    pool = pd.DataFrame({"image_id": [1, 1], "category_id": [1, 1], "x1": [0.0, 0.0], "y1": [0.0, 0.0],
                         "x2": [100.0, 100.0], "y2": [100.0, 80.0], "iou": [0.0, 0.0], "score": [0.3, 0.7]})
    kept, detection = oracle_nms_kept(pool, 0.5, 100)
    assert kept.tolist() == [False, True] and detection[1] == 0.7
    assert rescored_kept(pool, pool["iou"].to_numpy(), 0.5, 100).tolist() == [True, False]


# --- what cannot be rescored ---------------------------------------------------------------------


def test_no_obj_score_keeps_only_cls_and_the_oracles(ledgers):
    from misalign.rescore import rescore

    result = rescore(ledgers["base"], alphas=[0.4])
    assert list(result.rankings) == ["cls", "oracle_nms", "oracle"]
    assert set(result.skipped) == {"obj", "cls*obj", "alpha=0.4"}
    assert all("obj_score is NaN throughout" in reason for reason in result.skipped.values())


def test_post_nms_only_ledger_is_refused_with_its_reason(ledgers):
    from misalign.rescore import rescore, unavailable_reason

    meta = json.loads((ledgers["post"] / "meta.json").read_text())
    assert "post-NMS only" in unavailable_reason(meta)
    with pytest.raises(InputError, match="cannot rescore: post-NMS only"):
        rescore(ledgers["post"])
    assert "nms_thresh is unknown" in unavailable_reason({"postprocess": {"nms_thresh": None}})


# --- the report ----------------------------------------------------------------------------------


def test_report_rescore_section_metrics_and_csv(ledgers, conf):
    out = ledgers["root"] / "report"
    result = run("report", ledgers["conf"], ledgers["base"], ledgers["post"], ledgers["base2"], "--out", out, "--rescore",
                 "--alphas", "0,0.4,0.9", "--bootstrap", "0", "--images", "1")
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((out / "metrics.json").read_text())["detectors"]
    alphas = ["alpha=0", "alpha=0.4", "alpha=0.9"]
    assert list(metrics["conf"]["rescoring"]) == ["cls", "obj", "cls*obj", *alphas, "oracle_nms", "oracle"]
    assert list(metrics["base"]["rescoring"]) == list(metrics["base2"]["rescoring"]) == ["cls", "oracle_nms", "oracle"]
    assert metrics["post"]["rescoring"] == {} and metrics["post"]["ap_lost_to_misalignment"] is None
    assert metrics["post"]["ap_gap_to_oracle_ranking"] is None
    _, library = conf  # the library's numbers, passed through unchanged
    for name, m in metrics.items():
        assert list(m)[-3:] == ["rescoring", "ap_lost_to_misalignment", "ap_gap_to_oracle_ranking"]
        for ranking, ap in m["rescoring"].items():
            assert list(ap) == ["AP", "AP50", "AP75"]
            if name == "conf":
                assert ap == pytest.approx(library.rankings[ranking], abs=1e-12)
        if m["rescoring"]:
            lost = m["rescoring"]["oracle_nms"]["AP"] - m["ap"]["AP"]
            assert m["ap_lost_to_misalignment"] == pytest.approx(lost, abs=1e-12)
            gap = m["rescoring"]["oracle"]["AP"] - m["ap"]["AP"]
            assert m["ap_gap_to_oracle_ranking"] == pytest.approx(gap, abs=1e-12)
    # the table's CSV agrees with metrics.json
    table = pd.read_csv(out / "tables" / "rescoring.csv")
    assert set(table["detector"]) == {"conf", "base", "base2"}
    for row in table.itertuples():
        m = metrics[row.detector]
        expected = m["ap"] if row.ranking == "actual" else m["rescoring"][row.ranking]
        assert [row.AP, row.AP50, row.AP75] == pytest.approx([expected[k] for k in ("AP", "AP50", "AP75")], abs=1e-12)
        assert row.delta_AP == pytest.approx(expected["AP"] - m["ap"]["AP"], abs=1e-12)
    assert len(table) == sum(len(metrics[name]["rescoring"]) + 1 for name in ("conf", "base", "base2"))
    summary = pd.read_csv(out / "tables" / "summary.csv").set_index("detector")
    assert summary.loc["conf", "ap_lost_to_misalignment"] == pytest.approx(metrics["conf"]["ap_lost_to_misalignment"])
    assert summary.loc["conf", "ap_gap_to_oracle_ranking"] == pytest.approx(metrics["conf"]["ap_gap_to_oracle_ranking"])
    assert np.isnan(summary.loc["post", "ap_lost_to_misalignment"])
    # the page: section, plot, explanations, and why two dumps have less
    html = (out / "index.html").read_text()
    assert "<title>misalign report: 4 detectors compared</title>" in html  # four names are too many for a title
    assert 'id="rescoring"' in html and "Counterfactual rescoring" in html and "AP lost to misalignment" in html
    assert (out / "figures" / "rescoring.png").stat().st_size > 10_000 and 'id="fig-rescoring"' in html
    # one note for both dumps without the branch, naming each
    assert html.count("only the cls, oracle_nms and oracle rankings") == 1
    assert "AP lost to misalignment = AP(oracle_nms) − AP(actual)" in html and "upper bound" in html
    assert "The pool is the dump's own." in html and "--rescore-thresh T" in html
    assert "base, base2: obj_score is NaN throughout" in html
    assert "post: not rescored, post-NMS only" in html
    assert "--rescore (α grid 0, 0.4, 0.9)" in html


def test_rescore_thresh_filters_each_rankings_pool_before_nms(ledgers, conf, tmp_path):
    """T = 0.3: a score ranking's pool is its rows with that score > 0.3 (strict), the oracles' the rows with
    detector score > 0.3; NMS and AP on those pools match the slow references run on the filtered rows."""
    from misalign.rescore import ranking_scores, rescore

    ledger, unfiltered = conf
    c = ledger.candidates
    thresh = 0.3
    result = rescore(ledger, ledgers["gt"], alphas=[0.4], rescore_thresh=thresh)
    assert result.settings["rescore_thresh"] == thresh and unfiltered.settings["rescore_thresh"] is None
    all_scores = ranking_scores(c, [0.4])[0]
    own = c["score"].to_numpy(np.float64)
    for ranking in RANKINGS:
        score = all_scores[ranking]
        pool = (own if ranking == "oracle" else score) > thresh
        assert 0 < pool.sum() < len(c)  # the threshold removes rows and leaves some
        sub = c[pool].reset_index(drop=True)
        kept = np.zeros(len(c), bool)
        kept[np.flatnonzero(pool)[reference_kept(sub, score[pool], 0.5, SIZES["kept_per_image"])]] = True
        assert result.rankings[ranking] == pytest.approx(pycocotools_ap(ledgers["gt"], c, kept, score), abs=1e-6), ranking
        assert result.num_kept[ranking] == kept.sum()
    pool = own > thresh
    sub = c[pool].reset_index(drop=True)
    boxes = [[float(v) for v in row] for row in sub[["x1", "y1", "x2", "y2"]].to_numpy()]
    slow = slow_iou_guided_nms(sub["image_id"].to_numpy(), sub["category_id"].to_numpy(), boxes,
                               sub["iou"].to_numpy(np.float64).tolist(), sub["score"].to_numpy(np.float64).tolist(),
                               0.5, SIZES["kept_per_image"])
    results = [{"image_id": int(sub["image_id"].iat[r]), "category_id": int(sub["category_id"].iat[r]),
                "bbox": [boxes[r][0], boxes[r][1], boxes[r][2] - boxes[r][0], boxes[r][3] - boxes[r][1]],
                "score": s} for r, s in slow.items()]
    assert result.rankings["oracle_nms"] == pytest.approx(pycocotools_json_ap(ledgers["gt"], results, tmp_path), abs=1e-6)
    assert result.actual == unfiltered.actual  # the dump's own output is not re-thresholded
    # not trivial: the threshold removes kept boxes and changes AP, for a score ranking and for the oracle
    assert result.num_kept["cls"] < unfiltered.num_kept["cls"]
    for ranking in ("cls*obj", "oracle_nms"):
        assert result.rankings[ranking]["AP"] != unfiltered.rankings[ranking]["AP"], ranking


def test_rescore_thresh_values(ledgers):
    from misalign.rescore import parse_rescore_thresh, rescore

    assert parse_rescore_thresh(None) is None and parse_rescore_thresh("0.25") == 0.25 and parse_rescore_thresh(0) == 0.0
    for value, fragment in ((1.0, "1 is outside [0, 1)"), (-1e-9, "outside [0, 1)"), ("x", "'x' is not a number"),
                            (True, "True is not a number")):
        with pytest.raises(InputError, match=r"^--rescore-thresh: ") as err:
            parse_rescore_thresh(value)
        assert fragment in str(err.value)
    with pytest.raises(InputError, match="^--rescore-thresh: 2 is outside"):
        rescore(ledgers["conf"], rescore_thresh=2)


def test_report_rescore_thresh_is_on_the_page(ledgers):
    out = ledgers["root"] / "thresh"
    result = run("report", ledgers["base"], "--out", out, "--rescore", "--rescore-thresh", "0.3", "--bootstrap", "0",
                 "--images", "1")
    assert result.exit_code == 0, (result.output, result.exception)
    html = (out / "index.html").read_text()
    assert "With <code>--rescore-thresh 0.3</code>" in html and "--rescore (α grid 0, 0.1, 0.2" in html
    assert "--rescore-thresh 0.3)" in html


def test_report_without_rescore_says_how_to_get_it(ledgers):
    out = ledgers["root"] / "plain"
    result = run("report", ledgers["conf"], "--out", out, "--bootstrap", "0", "--images", "1")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["detectors"]["conf"]
    assert "rescoring" not in metrics and "ap_lost_to_misalignment" not in metrics
    assert "ap_gap_to_oracle_ranking" not in metrics
    assert "misalign report --rescore" in (out / "index.html").read_text()
    assert not (out / "tables" / "rescoring.csv").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--rescore", "--alphas", "0.2,1.5"], "--alphas: 1.5 is outside [0, 1]"),
    (["--rescore", "--alphas", "x"], "--alphas: 'x' is not a comma-separated list of numbers"),
    (["--alphas", "0.2"], "--alphas: only used with --rescore"),
    (["--rescore", "--rescore-thresh", "1"], "--rescore-thresh: 1 is outside [0, 1)"),
    (["--rescore", "--rescore-thresh", "-0.1"], "--rescore-thresh: -0.1 is outside [0, 1)"),
    (["--rescore", "--rescore-thresh", "nan"], "--rescore-thresh: nan is outside [0, 1)"),
    (["--rescore-thresh", "0.3"], "--rescore-thresh: only used with --rescore"),
])
def test_bad_alphas_are_one_line(ledgers, tmp_path, args, fragment):
    result = run("report", ledgers["conf"], "--out", tmp_path / "r", *args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.strip().splitlines() == [f"error: {fragment}"]
    assert not (tmp_path / "r").exists()


def test_alpha_plot_axis_fits_the_sweep_not_the_oracle_or_obj_alone():
    from reports.figures import _sweep_limits

    ranks = {"cls": 0.40, "obj": 0.10, "cls*obj": 0.41, "alpha=0": 0.40, "alpha=0.5": 0.42, "oracle": 0.80}
    rescoring = {"conf": {name: {"AP": ap} for name, ap in ranks.items()}, "base": {"cls": {"AP": 0.30}}}
    # lo = 0.30 (base's cls line), hi = 0.42; pad = 0.15 * 0.12 = 0.018 (above the 0.01 floor)
    assert _sweep_limits(rescoring, "AP") == pytest.approx((0.282, 0.438))
    del rescoring["base"]  # a narrow range gets the 0.01 floor
    assert _sweep_limits(rescoring, "AP") == pytest.approx((0.39, 0.43))


def test_nms_groups_sort_by_image_category_then_row():
    """The plan's one stable sort of a combined key orders rows as a lexsort of (image, category,
    row) does, and so does its fallback for ids too large to combine."""
    from misalign.nms import _group_starts

    rng = np.random.default_rng(4)
    for scale in (1, 2**40):  # 2**40 x 2**30 does not fit one int64 key: the lexsort fallback
        image_id = np.repeat(rng.integers(0, 50, 40), rng.integers(1, 30, 40)) * scale
        category_id = rng.integers(0, 5, len(image_id)) * (2**30 if scale > 1 else 1)
        order, starts = _group_starts(image_id, category_id)
        np.testing.assert_array_equal(order, np.lexsort((np.arange(len(image_id)), category_id, image_id)))
        img, cat = image_id[order], category_id[order]
        np.testing.assert_array_equal(starts, np.flatnonzero(np.r_[True, (img[1:] != img[:-1]) | (cat[1:] != cat[:-1])]))
