"""AP bit-identical to pycocotools on the user's own files, and the definitions around it.

The oracle is pycocotools' COCOeval run on the original JSON files; the numbers under test are the
ones `misalign import` + `misalign report` write to metrics.json.
"""

import contextlib
import importlib.util
import copy
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cli import main
from misalign.cocoeval import (AUTO_ORDER, ENGINE_MODULES, ENGINE_NAMES, STAT_KEYS, engine_info, evaluate_detections,
                               load_ground_truth, resolve_engine)
from misalign.importer import import_predictions
from misalign.ledger import CANDIDATE_SCHEMA, read_candidates, read_ledger, validate_ledger
from misalign.truth import crowd_ignored, match_truth

THRESHOLDS = [k / 20 for k in range(10, 20)]  # COCOeval's 0.5, 0.55, ..., 0.95


def pycocotools_stats(gt_path, results) -> list[float]:
    """COCOeval's twelve stats on the original files (results: a JSON file path or a list)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(str(results) if not isinstance(results, list) else results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def on_threshold_files(tmp_path):
    """A gt file and a results file whose boxes sit exactly on every IoU threshold, two decimals each.

    A detection shares a gt box's x, y and h and has width W = m / 5 for the gt width w = k·m / 100:
    IoU = w / W = k / 20, one of COCOeval's thresholds, with x, y like 10.37 (not binary fractions).
    Areas at 32² and 96² (COCO's small/medium/large edges) are in the mix too.
    """
    rng = np.random.default_rng(0)
    images, anns, dets = [], [], []
    for image_id in range(1, 41):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 640, "height": 480})
        for _ in range(3):
            k, m = int(rng.integers(10, 20)), int(rng.integers(20, 800))
            x, y = round(float(rng.uniform(0, 300)), 2), round(float(rng.uniform(0, 300)), 2)
            w, h = k * m / 100, round(float(rng.choice([1024 / (k * m / 100), 9216 / (k * m / 100),
                                                        rng.uniform(5, 150)])), 2)
            category = int(rng.integers(1, 3))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            dets.append({"image_id": image_id, "category_id": category, "bbox": [x, y, m / 5, h],
                         "score": round(float(rng.uniform(0.05, 1)), 3)})
            if rng.random() < 0.5:  # a worse duplicate and a box of the other category
                dets.append({"image_id": image_id, "category_id": category, "bbox": [round(x + 1.13, 2), y, w, h],
                             "score": round(float(rng.uniform(0.05, 1)), 3)})
                dets.append({"image_id": image_id, "category_id": 3 - category, "bbox": [x, y, w, h],
                             "score": round(float(rng.uniform(0.05, 1)), 3)})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(dets))
    return tmp_path / "gt.json", tmp_path / "results.json"


@pytest.fixture
def on_threshold(tmp_path):
    return on_threshold_files(tmp_path)


def report_metrics(tmp_path, gt_path, results_path, name="det"):
    runner = CliRunner()
    dump = tmp_path / name
    assert runner.invoke(main, ["import", "--gt", str(gt_path), "--predictions", str(results_path),
                                "--out", str(dump)]).exit_code == 0
    result = runner.invoke(main, ["report", str(dump), "--out", str(tmp_path / f"report-{name}"), "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / f"report-{name}" / "metrics.json").read_text())["detectors"][name], dump


def test_report_ap_equals_pycocotools_on_the_original_files_to_the_last_digit(tmp_path, on_threshold):
    gt_path, results_path = on_threshold
    reference = pycocotools_stats(gt_path, results_path)
    metrics, dump = report_metrics(tmp_path, gt_path, results_path)
    assert [metrics["ap"][k] for k in STAT_KEYS] == reference  # ==, not approx
    assert metrics["ap_engine"] == {"name": ENGINE_NAMES[resolve_engine("auto").key],
                                    "version": engine_info(load_ground_truth(gt_path))["version"]}
    assert metrics["ap_engine"]["version"]
    # Every engine kept, and the dump's own detections.json read back by pycocotools, give the same numbers.
    ledger = read_ledger(dump)
    kept = ledger.candidates[ledger.candidates["kept"]]
    from misalign.metrics import evaluate_ap

    for engine in ("pycocotools", *KEPT_ENGINES):
        stats = evaluate_ap(load_ground_truth(gt_path, engine), kept, ledger.images["image_id"])
        assert [stats[k] for k in STAT_KEYS] == reference, engine
    assert pycocotools_stats(gt_path, dump / "detections.json") == reference


KEPT_ENGINES = ("ultrafast", "hotcoco")  # misalign's fast engines; pycocotools is the reference


def _array(results) -> np.ndarray:
    return np.array([[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in results],
                    np.float64).reshape(-1, 7)


@pytest.mark.parametrize("engine", KEPT_ENGINES)
def test_engine_equals_pycocotools_on_the_hard_cases(tmp_path, on_threshold, engine):
    """Boxes exactly on every IoU threshold with two-decimal coordinates and area-range edges,
    a lone perfect box (pycocotools' AP 0.9999999999999998, not 1.0: faster-coco-eval 1.8 gives 1.0),
    maxDets ties, crowd regions, no detections and no ground truth: all twelve stats with ==."""
    pytest.importorskip(ENGINE_MODULES[engine])
    gt_path, results_path = on_threshold
    results = json.loads(results_path.read_text())
    (tmp_path / "one").mkdir()
    one = _gt_file(tmp_path / "one", [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                               "iscrowd": 0}])
    crowd = tmp_path / "crowd"
    crowd.mkdir()
    crowd_gt = _gt_file(crowd, [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 1e4, "iscrowd": 1},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [120, 120, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5.5, 5.25, 32, 32], "area": 1024, "iscrowd": 0}])
    crowd_dets = [{"image_id": 1, "category_id": 1, "bbox": [10.5, 10.25, 40, 40], "score": 0.9},  # inside crowd
                  {"image_id": 1, "category_id": 1, "bbox": [60, 0, 80, 40], "score": 0.8},  # half inside
                  {"image_id": 1, "category_id": 1, "bbox": [121, 120, 30, 30], "score": 0.7},
                  {"image_id": 2, "category_id": 1, "bbox": [5.5, 5.25, 32, 32], "score": 0.7}]
    rng = np.random.default_rng(1)
    ties = [{"image_id": int(i), "category_id": 1, "score": float(rng.choice([0.5, 0.25])),
             "bbox": [round(float(rng.uniform(0, 150)), 2), round(float(rng.uniform(0, 150)), 2), 20.0, 20.0]}
            for i in np.repeat([1, 2], 120)]  # > 100 per image, equal scores around maxDets 1, 10, 100
    cases = [(gt_path, _array(results)), (one, _array([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20],
                                                       "score": 0.9}])),
             (crowd_gt, _array(crowd_dets)), (crowd_gt, _array(ties)), (gt_path, np.zeros((0, 7)))]
    no_gt = tmp_path / "nogt"
    no_gt.mkdir()
    cases.append((_gt_file(no_gt, []), _array(crowd_dets)))
    for path, dets in cases:
        with contextlib.redirect_stdout(io.StringIO()):
            reference = list(evaluate_detections(load_ground_truth(path, "pycocotools"), dets).values())
        got = list(evaluate_detections(load_ground_truth(path, engine), dets).values())
        assert got == reference, (path, len(dets))
    # the cases are discriminating: the lone box's AP is not 1.0, the no-gt case is all -1
    assert evaluate_detections(load_ground_truth(one, engine), cases[1][1])["AP"] == 0.9999999999999998
    assert list(evaluate_detections(load_ground_truth(cases[-1][0], engine), cases[-1][1]).values()) == [-1.0] * 12


def test_auto_engine_is_the_fastest_installed():
    installed = [key for key in AUTO_ORDER if importlib.util.find_spec(ENGINE_MODULES[key].split(".")[0])]
    assert resolve_engine("auto").key == installed[0]
    assert AUTO_ORDER[0] == "ultrafast" and AUTO_ORDER[-1] == "pycocotools"


def test_the_case_is_sensitive_to_how_boxes_are_stored(tmp_path, on_threshold):
    """The same results with float32 corners, or with widths recomputed as x2 - x1 in float64, give
    other numbers: the test above would catch either way of storing boxes."""
    gt_path, results_path = on_threshold
    reference = pycocotools_stats(gt_path, results_path)
    dets = json.loads(results_path.read_text())
    for to_box in (lambda b: np.float32(b).astype(np.float64),  # schema 1's float32
                   lambda b: np.asarray(b, np.float64)):  # float64 corners without w, h
        changed = []
        for d in dets:
            x, y, w, h = d["bbox"]
            x1, y1, x2, y2 = to_box([x, y, x + w, y + h])
            changed.append({**d, "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
        assert pycocotools_stats(gt_path, changed) != reference


def test_float32_ledgers_of_schema_1_are_still_read(tmp_path, on_threshold):
    gt_path, results_path = on_threshold
    dump = import_predictions(gt_path, results_path, tmp_path / "new")
    legacy = read_candidates(dump).drop(columns=["w", "h", "crowd", "cl_nms_score"])
    fields = [pa.field(f.name, pa.float32() if f.name in ("x1", "y1", "x2", "y2") else f.type)
              for f in CANDIDATE_SCHEMA if f.name in legacy.columns]
    pq.write_table(pa.Table.from_pandas(legacy, schema=pa.schema(fields), preserve_index=False),
                   dump / "candidates.parquet")
    meta = json.loads((dump / "meta.json").read_text())
    (dump / "meta.json").write_text(json.dumps({**meta, "schema_version": 1}))
    validate_ledger(dump)
    cands = read_candidates(dump)
    assert cands["x1"].dtype == np.float64 and not cands["crowd"].any() and cands["cl_nms_score"].isna().all()
    np.testing.assert_array_equal(cands["w"], cands["x2"] - cands["x1"])  # derived from the float32 corners
    np.testing.assert_array_equal(cands["x1"], legacy["x1"].astype(np.float32))
    # the report streams the candidates (misalign.scan): the same derived columns, the same AP as read_candidates'
    from misalign.compare import compare
    from misalign.metrics import AP_COLUMNS, evaluate_ap

    old = compare([dump], gt_path, bootstrap=0).metrics["detectors"][dump.name]
    image_ids = read_ledger(dump, columns=["image_id"]).images["image_id"].to_numpy()
    expected = evaluate_ap(load_ground_truth(gt_path), cands[cands["kept"]][AP_COLUMNS], image_ids)
    assert old["ap"] == expected and old["crowd"] == {"post_nms": 0}  # an import: post-NMS only


def _gt_file(tmp_path, anns):
    images = [{"id": 1, "file_name": "1.jpg", "width": 200, "height": 200},
              {"id": 2, "file_name": "2.jpg", "width": 200, "height": 200}]
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def test_no_detections_and_no_ground_truth_give_what_pycocotools_gives(tmp_path):
    # Only small boxes: APm, APl, ARm, ARl have nothing to measure, which COCOeval reports as -1.
    small = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}]
    gt_path = _gt_file(tmp_path, small)
    (tmp_path / "none.json").write_text("[]")
    metrics, _ = report_metrics(tmp_path, gt_path, tmp_path / "none.json", "empty")
    expected = dict(zip(STAT_KEYS, [0.0] * 12))
    expected.update({"APm": -1.0, "APl": -1.0, "ARm": -1.0, "ARl": -1.0})
    assert metrics["ap"] == expected  # hand-worked: a miss is 0, an area range with no gt -1
    # pycocotools itself, fed an empty result set the only way it takes one (loadRes cannot), agrees
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = COCO()
        dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
        dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert [metrics["ap"][k] for k in STAT_KEYS] == [float(v) for v in evaluator.stats]

    no_gt = tmp_path / "nogt"
    no_gt.mkdir()
    gt_path = _gt_file(no_gt, [])
    (no_gt / "one.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [5, 5, 30, 30],
                                                 "score": 0.9}]))
    metrics, _ = report_metrics(no_gt, gt_path, no_gt / "one.json", "nogt")
    assert [metrics["ap"][k] for k in STAT_KEYS] == [-1.0] * 12 == pycocotools_stats(gt_path, no_gt / "one.json")
    for engine in ("pycocotools", *KEPT_ENGINES):
        assert list(evaluate_detections(load_ground_truth(gt_path, engine), np.zeros((0, 7))).values()) == [-1.0] * 12


# --- crowd -----------------------------------------------------------------------------------------


def test_crowd_flag_by_hand():
    gt_boxes = np.array([[0, 0, 100, 100], [150, 150, 170, 170], [0, 0, 100, 100]], np.float64)  # crowd, gt, crowd
    gt_category, gt_ids, gt_crowd = [1, 1, 2], [7, 8, 9], [True, False, True]
    pred = np.array([
        [10, 10, 50, 50],  # inside crowd region of its category: covered 1.0, no gt -> crowd
        [80, 80, 120, 120],  # 20x20 of its 40x40 inside: covered 0.25 -> not crowd
        [60, 0, 140, 40],  # 40x40 of 80x40 inside: covered exactly 0.5 -> crowd (>=, COCOeval's rule)
        [150, 150, 170, 170],  # matches the ordinary gt (IoU 1) -> not crowd even if it were covered
        [10, 10, 50, 50],  # same box, category 2: its own crowd region covers it -> crowd
        [10, 10, 50, 50],  # category 3: no crowd region of its category -> not crowd
    ], np.float64)
    pred_category = [1, 1, 1, 1, 2, 3]
    iou, _, _ = match_truth(pred, pred_category, gt_boxes, gt_category, gt_ids, gt_crowd)
    crowd = crowd_ignored(pred, pred_category, iou, gt_boxes, gt_category, gt_crowd)
    assert crowd.tolist() == [True, False, True, False, True, False]


def test_crowd_flag_is_what_cocoeval_ignores(tmp_path):
    """One detection per image, so COCOeval's greedy matching has no say: its dtIgnore at IoU 0.5
    (for the 'all' area range) must be the ledger's crowd column, box for box."""
    rng = np.random.default_rng(3)
    images, anns, dets = [], [], []
    for image_id in range(1, 201):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 300, "height": 300})
        cx, cy = rng.uniform(40, 200, 2)
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 1,
                     "bbox": [round(cx, 2), round(cy, 2), 60.0, 60.0], "area": 3600.0})
        if rng.random() < 0.5:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "bbox": [round(cx + rng.uniform(-20, 20), 2), round(cy, 2), 30.0, 30.0], "area": 900.0})
        dets.append({"image_id": image_id, "category_id": 1, "score": 0.5,
                     "bbox": [round(cx + rng.uniform(-40, 60), 2), round(cy + rng.uniform(-40, 60), 2),
                              round(rng.uniform(10, 60), 2), round(rng.uniform(10, 60), 2)]})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        evaluator = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
        evaluator.evaluate()
    ignored = {}
    for entry in evaluator.evalImgs:
        if entry is not None and entry["aRng"] == [0, 1e10] and entry["dtIds"]:
            ignored[entry["image_id"]] = bool(entry["dtIgnore"][0, 0])  # threshold 0.5
    dump = import_predictions(tmp_path / "gt.json", tmp_path / "dt.json", tmp_path / "dump")
    cands = read_candidates(dump).set_index("image_id")
    assert 20 < sum(ignored.values()) < 180  # both kinds are well represented
    assert {i: bool(cands.loc[i, "crowd"]) for i in ignored} == ignored


def test_crowd_boxes_stay_out_of_the_correlation_pool_and_are_counted(tmp_path):
    crowd_region = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 1e4, "iscrowd": 1}
    gt_box = {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 0}
    gt_path = _gt_file(tmp_path, [crowd_region, gt_box])
    table = pd.DataFrame({"image_id": [1, 1, 2, 2, 2], "category_id": 1,
                          "x1": [10.0, 120, 0, 2, 4], "y1": [10.0, 120, 0, 2, 4],
                          "x2": [50.0, 150, 40, 42, 44], "y2": [50.0, 150, 40, 42, 44],
                          "score": [0.9, 0.8, 0.7, 0.6, 0.5], "kept": [True, True, True, False, False]})
    table.to_csv(tmp_path / "table.csv", index=False)
    dump = import_predictions(gt_path, tmp_path / "table.csv", tmp_path / "dump")
    assert read_candidates(dump)["crowd"].tolist() == [True, False, False, False, False]
    from misalign.metrics import analyze

    analysis = analyze(dump, bootstrap=0, min_iou=0.0)
    assert analysis.metrics["crowd"] == {"pre_nms": 1, "post_nms": 1}
    # min_iou 0 lets the IoU-0 background box in (5 - 1 crowd = 4 rows), never the crowd one
    assert analysis.metrics["correlation"]["score"]["n"] == 4
    table1 = analysis.table1()
    assert table1.loc[("pre_nms", "crowd")].tolist() == [1, 0, 1]


def test_a_table_without_kept_is_pre_nms_even_when_nms_suppresses_nothing(tmp_path):
    gt_box = {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 0}
    gt_path = _gt_file(tmp_path, [gt_box])
    apart = pd.DataFrame({"image_id": [2, 2], "category_id": 1, "x1": [0.0, 100], "y1": [0.0, 100],
                          "x2": [40.0, 140], "y2": [40.0, 140], "score": [0.9, 0.8]})
    apart.to_csv(tmp_path / "pool.csv", index=False)
    meta = read_ledger(import_predictions(gt_path, tmp_path / "pool.csv", tmp_path / "a")).meta
    assert meta["pre_nms"] is True
    apart.assign(kept=True).to_csv(tmp_path / "final.csv", index=False)  # the detector's final boxes
    assert read_ledger(import_predictions(gt_path, tmp_path / "final.csv", tmp_path / "b")).meta["pre_nms"] is False
