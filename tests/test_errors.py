"""Errors (TIDE's split + NMS, misalign.tide) and calibration (misalign.calibration): every number
against a slow reference or a hand-worked case.

- TIDE's split (hotcoco) against tidecv, TIDE's own code, on crowd-free synthetic ledgers;
- COCO's matching of each kept box (hotcoco's diagnostics) against pycocotools' evalImgs, with crowd;
- suppression losses against a plain loop, the NMS counterfactual's edits and its ΔAP by hand and
  against pycocotools on a results list built row by row;
- D-ECE and LaECE by hand and against a loop port of the LaECE authors' per-bin code; obj vs IoU by hand;
- the report's metrics.json, CSVs and page sections.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest

from misalign.synthetic import synthetic_ledger

SIZES = dict(num_images=24, cands_per_image=120, num_categories=4, gt_per_image=4, kept_per_image=20)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """Synthetic ledgers: two without crowd regions (tidecv's and COCO's crowd rules differ), one with."""
    root = tmp_path_factory.mktemp("errors")
    out = {}
    for key, seed, crowd in (("a", 11, 0.0), ("b", 12, 0.0), ("crowd", 13, 0.15)):
        gt = synthetic_ledger(root / key, seed=seed, gt_path=root / f"gt_{key}.json", crowd_fraction=crowd, **SIZES)
        out[key] = (root / key, gt)
    return out


def kept_detections(folder) -> tuple[pd.DataFrame, np.ndarray]:
    from misalign.compare import KEPT_COLUMNS
    from misalign.ledger import read_candidates

    kept = read_candidates(folder, KEPT_COLUMNS, kept_only=True)
    return kept, kept[KEPT_COLUMNS[:7]].to_numpy(np.float64)


def diagnosis_of(folder, gt):
    from misalign.calibration import MATCH_THRESHOLDS
    from misalign.cocoeval import diagnose_detections, load_ground_truth

    hot = load_ground_truth(gt, "hotcoco")
    ids = sorted(json.loads(gt.read_text()) and [im["id"] for im in json.loads(gt.read_text())["images"]])
    return diagnose_detections(hot, kept_detections(folder)[1], ids, MATCH_THRESHOLDS)


# --- TIDE's split against tidecv -----------------------------------------------------------------


def tidecv_split(gt_path, detections) -> tuple[dict, dict, float]:
    """(ΔAP per type / 100, counts, AP / 100) of tidecv, TIDE's own code, at its default thresholds.

    tidecv's COCO loader needs masks, so its Data objects are filled here: crowd boxes as its
    ignore regions, as its loader does."""
    from tidecv import TIDE
    from tidecv.data import Data

    coco = json.loads(gt_path.read_text())
    gt = Data("gt", max_dets=100)
    for image in coco["images"]:
        gt.add_image(image["id"], image["file_name"])
    for cat in coco["categories"]:
        gt.add_class(cat["id"], cat["name"])
    for ann in coco["annotations"]:
        add = gt.add_ignore_region if ann["iscrowd"] else gt.add_ground_truth
        add(ann["image_id"], ann["category_id"], ann["bbox"], None)
    preds = Data("dets")
    for image_id, x, y, w, h, score, cat in detections:
        preds.add_detection(int(image_id), int(cat), float(score), [x, y, w, h], None)
    tide = TIDE()
    with contextlib.redirect_stdout(io.StringIO()):
        tide.evaluate(gt, preds, mode=TIDE.BOX)
    run = tide.runs["dets"]
    errors = tide.get_main_errors()["dets"]
    counts = {err.short_name: len(found) for err, found in run.error_dict.items()}
    return {k: v / 100 for k, v in errors.items()}, counts, run.ap / 100


@pytest.fixture
def tidecv_on_cocos_recall_grid(monkeypatch):
    """tidecv's AP with COCOeval's recall grid, np.linspace(0, 1, 101), instead of its k / 100.

    The two grids differ in the last bit of some points; a recall that falls exactly on one (k/25
    with 25 ground truths of a class) then counts on either side, which moves an AP by up to ~0.003
    on ledgers this small. Everything else of tidecv's AP and error split runs as shipped."""
    import inspect
    import textwrap

    import tidecv.ap

    source = textwrap.dedent(inspect.getsource(tidecv.ap.APDataObject.get_ap))
    grid = "x_range = np.array([x / resolution for x in range(resolution + 1)])"
    assert grid in source  # tidecv 1.0.1
    namespace = {}
    exec(source.replace(grid, "x_range = np.linspace(0, 1, resolution + 1)"), vars(tidecv.ap), namespace)
    monkeypatch.setattr(tidecv.ap.APDataObject, "get_ap", namespace["get_ap"])


@pytest.mark.parametrize("key", ["a", "b"])
def test_tide_split_equals_tidecv_without_crowd(dumps, key, tidecv_on_cocos_recall_grid):
    folder, gt = dumps[key]
    diagnosis = diagnosis_of(folder, gt)
    delta, counts, ap = tidecv_split(gt, kept_detections(folder)[1])
    assert diagnosis.counts == {k: counts[k] for k in diagnosis.counts}  # every error classified alike
    assert min(diagnosis.counts[k] for k in ("Cls", "Loc", "Both", "Bkg")) > 10  # every kind to classify
    for k in diagnosis.tide:
        assert diagnosis.tide[k] == pytest.approx(delta[k], abs=1e-12), k
    assert diagnosis.ap50 == pytest.approx(ap, abs=1e-12)
    assert max(diagnosis.tide.values()) > 0.01


def test_split_starts_from_cocoevals_ap50(dumps):
    from misalign.cocoeval import evaluate_detections, load_ground_truth

    folder, gt = dumps["crowd"]
    ids = [im["id"] for im in json.loads(gt.read_text())["images"]]
    ap = evaluate_detections(load_ground_truth(gt, "pycocotools"), kept_detections(folder)[1], ids)
    assert diagnosis_of(folder, gt).ap50 == pytest.approx(ap["AP50"], abs=1e-12)


# --- COCO's matching of each kept box ------------------------------------------------------------


def pycocotools_eval_imgs(gt, detections, threshold) -> list:
    """pycocotools' evalImgs of `detections` ([N, 7] rows) at one IoU threshold, area all, maxDets 100."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt))
        ev = COCOeval(coco, coco.loadRes(detections), "bbox")
        ev.params.iouThrs = np.array([threshold])
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [100]
        ev.evaluate()
    return ev.evalImgs


def test_matches_equal_pycocotools_evalimgs_with_crowd(dumps):
    folder, gt = dumps["crowd"]
    diagnosis = diagnosis_of(folder, gt)
    detections = kept_detections(folder)[1]
    for threshold, matched in diagnosis.matches.items():
        expected = np.full(len(detections), -1, np.int64)  # absent from every evalImg: ignored
        for e in pycocotools_eval_imgs(gt, detections, threshold):
            for dt, m, ignored in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0]) if e else ():
                expected[dt - 1] = -1 if ignored else int(m)
        np.testing.assert_array_equal(matched, expected)
        assert (expected == -1).any() and (expected > 0).any() and (expected == 0).any()


# --- suppression losses and the NMS counterfactual -----------------------------------------------


def slow_losses(c: pd.DataFrame) -> dict:
    """gt_id -> (best row, kept row or -1, suppressor row) by a plain loop over each gt's rows (ties:
    higher score, then lower cand_id)."""
    rows_of = {}
    for r, g in enumerate(c["gt_id"]):
        if g >= 0:
            rows_of.setdefault(int(g), []).append(r)
    pos = {int(cid): r for r, cid in enumerate(c["cand_id"])}
    key = lambda r: (-float(c["iou"].iat[r]), -float(c["score"].iat[r]), int(c["cand_id"].iat[r]))  # noqa: E731
    out = {}
    for g, rows in rows_of.items():
        best = min(rows, key=key)
        kept = [r for r in rows if c["kept"].iat[r]]
        kept_row = min(kept, key=key) if kept else -1
        best_iou = float(c["iou"].iat[best])
        kept_iou = float(c["iou"].iat[kept_row]) if kept else 0.0
        sup = int(c["suppressed_by"].iat[best])
        if best_iou >= 0.5 and best_iou - kept_iou >= 0.1 and sup >= 0:
            out[g] = (best, kept_row, pos[sup])
    return out


def test_suppression_losses_equal_a_loop(dumps):
    from misalign.ledger import read_candidates
    from misalign.suppression import SUPPRESSION_COLUMNS, per_gt_table
    from misalign.tide import suppression_losses

    c = read_candidates(dumps["a"][0], list(SUPPRESSION_COLUMNS)).sample(frac=1.0, random_state=0)
    c = c.reset_index(drop=True)
    losses = suppression_losses(per_gt_table(c), c["cand_id"].to_numpy())
    expected = slow_losses(c)
    assert len(expected) > 20
    got = {int(r.gt_id): (int(r.best_row), int(r.kept_row), int(r.suppressor_row)) for r in losses.itertuples()}
    assert got == expected


def frame(**columns) -> pd.DataFrame:
    n = len(columns["gt_id"])
    base = {"cand_id": np.arange(100, 100 + n), "image_id": np.ones(n, np.int64), "score": np.linspace(0.9, 0.1, n)}
    return pd.DataFrame({**base, **columns}).astype({"iou": np.float32, "score": np.float32})


def test_suppression_losses_hand_worked():
    from misalign.suppression import per_gt_table
    from misalign.tide import suppression_losses

    c = frame(
        #       g1: best .8 suppressed, kept .55 -> loss; g2: best .8 kept -> none; g3: best .58 vs kept .5,
        #       gain .08 -> none; g4: best .7 suppressed, no kept -> loss; g5: best .45 -> none
        gt_id=[1, 1, 2, 2, 3, 3, 4, 5],
        iou=[0.55, 0.8, 0.8, 0.6, 0.5, 0.58, 0.7, 0.45],
        kept=[True, False, True, False, True, False, False, False],
        suppressed_by=[-1, 100, -1, 102, -1, 104, 100, 100])
    losses = suppression_losses(per_gt_table(c), c["cand_id"].to_numpy())
    assert losses["gt_id"].tolist() == [1, 4]
    assert losses["best_row"].tolist() == [1, 6]
    assert losses["kept_row"].tolist() == [0, -1]
    assert losses["suppressor_row"].tolist() == [0, 0]
    np.testing.assert_allclose(losses["best_kept_iou"], [np.float32(0.55), 0.0])


def test_nms_replacements_rules():
    from misalign.tide import nms_replacements

    # g1 edits its own kept row 0; g4 and g6 (no kept box) share suppressor row 0 -> already g1's: nothing;
    # g7, g8 share kept suppressor row 9: g8's best IoU is higher -> g8; g9's suppressor row 11 is not kept.
    losses = pd.DataFrame({"gt_id": [1, 4, 6, 7, 8, 9], "best_row": [1, 6, 7, 10, 12, 13],
                           "best_iou": [0.8, 0.7, 0.9, 0.6, 0.75, 0.9], "best_kept_iou": [0.55, 0, 0, 0, 0, 0],
                           "kept_row": [0, -1, -1, -1, -1, -1], "suppressor_row": [0, 0, 0, 9, 9, 11]})
    kept = np.zeros(14, bool)
    kept[[0, 9]] = True
    edits = nms_replacements(losses, kept)
    assert edits[["gt_id", "target_row", "source_row", "rule"]].values.tolist() == [
        [1, 0, 1, "own"], [8, 9, 12, "suppressor"]]


TOY = pd.DataFrame({  # one gt [0, 0, 100, 100]; P well localised but suppressed by Q; F a confident false positive
    "x1": [0.0, 0.0, 200.0], "y1": [0.0, 0.0, 200.0], "x2": [100.0, 100.0, 260.0], "y2": [82.0, 40.0, 260.0],
    "cls_score": [0.2, 0.6, 0.9], "obj_score": [0.9, 0.3, 0.1], "score": [0.2, 0.6, 0.9],
    "kept": [False, True, True], "suppressed_by": [1, -1, -1],
    "iou": [0.82, 0.40, 0.0], "gt_id": [1, 1, -1], "iou_any": [0.82, 0.40, 0.0]})


def test_hand_worked_nms_and_tide_on_a_toy(tmp_path):
    """P (IoU 0.82, score 0.2) suppressed by Q (IoU 0.40, 0.6); F (0.9) on background.

    Output Q, F: no true positive at IoU 0.5, AP50 0. TIDE: Q is a Loc error (IoU in [0.1, 0.5));
    fixing it makes Q a true positive ranked below F: precision 1/2 at recall 1, AP50 0.5: Loc +0.5.
    F is Bkg; removing it alone leaves no true positive: +0. NMS: g's best candidate P (0.82 ≥ 0.5,
    0.42 above the kept Q, suppressed) is a loss; Q takes P's box with its own 0.6: AP50 0.5, +0.5.
    COCO AP: P's box matches at 0.5 ... 0.80 (7 of 10 thresholds), each at precision 1/2: +0.35.
    """
    from misalign.compare import compare
    from tests.test_rescore import write_toy_ledger

    write_toy_ledger(tmp_path / "toy", tmp_path / "gt.json", rows=TOY)
    result = compare([tmp_path / "toy"], bootstrap=0)
    m = result.metrics["detectors"]["toy"]
    assert m["ap"]["AP50"] == 0.0
    assert m["errors"]["Loc"] == pytest.approx(0.5, abs=1e-9)
    assert m["errors"]["Bkg"] == pytest.approx(0.0, abs=1e-9)
    assert m["errors"]["NMS"] == pytest.approx(0.5, abs=1e-9)
    assert m["nms_counterfactual"] == pytest.approx({"losses": 1, "replaced": 1, "delta_AP50": 0.5,
                                                     "delta_AP": 0.35}, abs=1e-9)
    assert result.detectors[0].errors.counts == {"Cls": 0, "Loc": 1, "Both": 0, "Dupe": 0, "Bkg": 1, "Miss": 0,
                                                 "NMS": 1}


def test_nms_delta_equals_pycocotools_on_a_results_list_built_row_by_row(dumps, tmp_path):
    from misalign.compare import compare
    from misalign.ledger import read_candidates
    from tests.test_rescore import pycocotools_json_ap

    folder, gt = dumps["a"]
    c = read_candidates(folder)
    losses = slow_losses(c)
    # the counterfactual by hand: each loss's own kept box, else its kept suppressor (best IoU first), once each
    box_of = {}
    for g, (best, kept_row, _) in losses.items():
        if kept_row >= 0:
            box_of[kept_row] = best
    for g, (best, kept_row, sup) in sorted(losses.items(), key=lambda kv: (-float(c["iou"].iat[kv[1][0]]), kv[0])):
        if kept_row < 0 and c["kept"].iat[sup] and sup not in box_of:
            box_of[sup] = best
    results = []
    for r in np.flatnonzero(c["kept"].to_numpy()):
        src = box_of.get(r, r)
        results.append({"image_id": int(c["image_id"].iat[r]), "category_id": int(c["category_id"].iat[r]),
                        "bbox": [float(c[k].iat[src]) for k in ("x1", "y1", "w", "h")],
                        "score": float(c["score"].iat[r])})
    changed = pycocotools_json_ap(gt, results, tmp_path)
    m = compare([folder], bootstrap=0).metrics["detectors"][folder.name]
    assert m["nms_counterfactual"]["replaced"] == len(box_of) > 10
    assert m["errors"]["NMS"] == pytest.approx(changed["AP50"] - m["ap"]["AP50"], abs=1e-9)
    assert m["nms_counterfactual"]["delta_AP"] == pytest.approx(changed["AP"] - m["ap"]["AP"], abs=1e-9)


# --- calibration -------------------------------------------------------------------------------


def test_bin_edges_are_the_reference_codes():
    from misalign.calibration import bin_index

    edges = np.linspace(0, 1, 26)
    scores = [0.0, edges[1], np.nextafter(edges[1], 1), edges[2], 0.5, 1.0]
    assert bin_index(scores).tolist() == [0, 0, 1, 1, 12, 24]


def test_d_ece_and_la_ece_hand_worked():
    from misalign.calibration import d_ece, la_ece

    # bins of width 0.04: 0.1 -> (0.08, 0.12], 0.3 -> (0.28, 0.32], 0.9 -> (0.88, 0.92]
    # D-ECE = 1/4·|0.1 − 0| + 2/4·|0.3 − 1/2| + 1/4·|0.9 − 1| = 0.025 + 0.1 + 0.025
    assert d_ece([0.1, 0.3, 0.3, 0.9], [False, True, False, True]) == pytest.approx(0.15, abs=1e-12)
    # class 1: two boxes at 0.9, IoU·TP 0.8 and 0 -> |0.9 − 0.4| = 0.5; class 2: one at 0.5 with 0.5 -> 0
    assert la_ece([0.9, 0.9, 0.5], [0.8, 0.0, 0.5], [1, 1, 2]) == pytest.approx(0.25, abs=1e-12)
    # per class, not pooled: pooled the three would give 2/3·0.5 + 1/3·0 = 1/3
    assert la_ece([0.9, 0.9, 0.5], [0.8, 0.0, 0.5], [1, 1, 1]) == pytest.approx(1 / 3, abs=1e-12)


def reference_ece(scores, targets, classes, bins=25, per_class=True) -> float:
    """A loop port of the LaECE authors' per-bin code: per class, bins [e0, e1] then (e_i, e_i+1];
    error |mean target − mean score| weighted by the bin's share; mean over classes (D-ECE: one class)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    errors = []
    for c in (sorted(set(classes)) if per_class else [None]):
        idx = [i for i in range(len(scores)) if c is None or classes[i] == c]
        total, err = len(idx), 0.0
        for b in range(bins):
            lo, hi = edges[b], edges[b + 1]
            inside = [i for i in idx if (lo <= scores[i] <= hi if b == 0 else lo < scores[i] <= hi)]
            if inside:
                mean_s = sum(scores[i] for i in inside) / len(inside)
                mean_t = sum(targets[i] for i in inside) / len(inside)
                err += len(inside) / total * abs(mean_t - mean_s)
        errors.append(err)
    return sum(errors) / len(errors)


def test_d_ece_and_la_ece_equal_the_reference_loop():
    from misalign.calibration import d_ece, la_ece

    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.random(400), np.linspace(0, 1, 26)])  # with every bin edge itself
    tp = rng.random(len(scores)) < scores
    iou = np.where(tp, rng.uniform(0.1, 1.0, len(scores)), 0.0)
    classes = rng.integers(1, 6, len(scores))
    assert d_ece(scores, tp) == pytest.approx(reference_ece(scores, tp.astype(float), classes, per_class=False),
                                              abs=1e-12)
    assert la_ece(scores, iou, classes) == pytest.approx(reference_ece(scores, iou, classes), abs=1e-12)


def test_report_calibration_equals_the_reference_on_pycocotools_matches(dumps):
    """Wiring: the report's numbers = the reference loop on targets from pycocotools' evalImgs."""
    from pycocotools import mask as mask_utils

    from misalign.compare import compare

    folder, gt = dumps["crowd"]
    kept, detections = kept_detections(folder)
    coco = json.loads(gt.read_text())
    gt_box = {a["id"]: a["bbox"] for a in coco["annotations"]}
    targets = {}
    for threshold in (0.1, 0.5):
        rows, values = [], []
        for e in pycocotools_eval_imgs(gt, detections, threshold):
            for dt, m, ignored in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0]) if e else ():
                if ignored:
                    continue
                rows.append(dt - 1)
                if m and threshold == 0.1:  # the IoU with the matched box, by pycocotools' own IoU
                    values.append(float(mask_utils.iou([list(detections[dt - 1, 1:5])], [gt_box[int(m)]], [0])[0, 0]))
                else:
                    values.append(1.0 if m else 0.0)
        targets[threshold] = (np.array(rows), np.array(values))
    assert len(gt_box)
    m = compare([folder], bootstrap=0).metrics["detectors"][folder.name]["calibration"]
    for column in ("cls_score", "obj_score", "score"):
        s = kept[column].to_numpy(np.float64)
        r50, t50 = targets[0.5]
        r10, t10 = targets[0.1]
        cats = kept["category_id"].to_numpy()
        assert m[column]["d_ece"] == pytest.approx(reference_ece(s[r50], t50, cats[r50], per_class=False), abs=1e-9)
        assert m[column]["la_ece"] == pytest.approx(reference_ece(s[r10], t10, cats[r10]), abs=1e-9)


def test_obj_vs_iou_hand_worked():
    from misalign.calibration import obj_vs_iou

    obj = np.array([0.4, 0.9, 0.7, np.nan, 0.96], np.float32)
    iou = np.array([0.5, 0.8, 0.4, 0.9, 1.0], np.float32)  # row 2: IoU < 0.5; row 3: no obj; row 4 in the last bin
    summary, bins = obj_vs_iou(obj, iou)
    # errors −0.1, +0.1, −0.04 (float32 inputs): mae 0.08, bias −0.04/3
    assert summary["n"] == 3
    assert summary["mae"] == pytest.approx(0.08, abs=1e-6)
    assert summary["bias"] == pytest.approx(-0.04 / 3, abs=1e-6)
    assert bins["n"].tolist() == [1, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    assert bins.loc[6, "mean"] == pytest.approx(0.9, abs=1e-6)
    assert obj_vs_iou(np.full(3, np.nan), np.ones(3, np.float32)) == (None, None)


def test_score_columns_that_are_not_probabilities_are_left_out():
    from misalign.calibration import calibration

    kept = pd.DataFrame({"category_id": [1, 1], "x1": [0.0, 0], "y1": [0.0, 0], "w": [1.0, 1], "h": [1.0, 1],
                         "cls_score": [0.2, 0.8], "obj_score": [np.nan, np.nan], "score": [0.5, 1.3]})
    matches = {0.1: np.array([0, 0]), 0.5: np.array([0, 0])}
    result = calibration(kept, matches, (np.zeros(0, np.int64), np.zeros((0, 4))))
    assert result.columns["cls_score"] == {"d_ece": pytest.approx(0.5), "la_ece": pytest.approx(0.5)}
    assert result.columns["obj_score"] is None and result.columns["score"] is None
    assert "outside [0, 1]" in result.notes["score"]


# --- the report --------------------------------------------------------------------------------


def test_report_sections_csv_and_metrics(dumps, tmp_path):
    import base64
    import re

    from click.testing import CliRunner

    from cli import main

    base = tmp_path / "base"
    synthetic_ledger(base, seed=11, with_obj=False, gt_path=dumps["a"][1], **SIZES)
    out = tmp_path / "report"
    run = CliRunner().invoke(main, ["report", str(dumps["a"][0]), str(base), "--out", str(out), "--bootstrap", "0"])
    assert run.exit_code == 0, (run.output, run.exception)
    metrics = json.loads((out / "metrics.json").read_text())["detectors"]
    errors = pd.read_csv(out / "tables" / "errors.csv").set_index("detector")
    calib = pd.read_csv(out / "tables" / "calibration.csv").set_index(["detector", "score column"])
    for name, m in metrics.items():
        assert list(m["errors"]) == ["Cls", "Loc", "Both", "Dupe", "Bkg", "Miss", "NMS"]
        for key, value in m["errors"].items():
            assert errors.loc[name, key] == pytest.approx(value, abs=1e-12)
        for column, entry in m["calibration"].items():
            if entry is None:
                assert column == "obj_score" and name == "base" and np.isnan(calib.loc[(name, column), "d_ece"])
                continue
            assert calib.loc[(name, column), "d_ece"] == pytest.approx(entry["d_ece"], abs=1e-12)
            assert calib.loc[(name, column), "la_ece"] == pytest.approx(entry["la_ece"], abs=1e-12)
    assert metrics["base"]["obj_vs_iou"] is None and metrics["a"]["obj_vs_iou"]["n"] > 0
    assert calib.loc[("a", "obj_score"), "obj_vs_iou mae"] == pytest.approx(metrics["a"]["obj_vs_iou"]["mae"])
    html = (out / "index.html").read_text()
    for section in ("errors", "calibration"):
        assert f'<section id="{section}">' in html
    assert "D-ECE" in html and "LaECE" in html and "25 equal-width bins" in html and "suppression loss" in html
    for key in ("errors", "calibration", "obj_vs_iou"):
        match = re.search(rf'<figure id="fig-{key}">\s*<img src="data:image/png;base64,([^"]+)"', html)
        assert match, key
        assert base64.b64decode(match.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
