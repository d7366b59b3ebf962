"""`misalign import`: COCO results and tables become valid ledgers; NMS against a slow greedy reference."""

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cli import main
from misalign.cocoeval import STAT_KEYS
from misalign.errors import InputError
from misalign.importer import import_predictions
from misalign.ledger import read_candidates, read_images, read_ledger, read_raw_counts, validate_ledger
from misalign.metrics import compute_metrics
from reference import slow_iou


@pytest.fixture
def gt_path(tmp_path):
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 160, "height": 120} for i in (3, 5, 9)]
    anns = []
    for image in images:
        for _ in range(4):
            x, y, w, h = (float(v) for v in np.round(rng.uniform([0, 0, 15, 15], [100, 80, 60, 40]), 1))
            anns.append({"id": len(anns) + 100, "image_id": image["id"], "category_id": int(rng.integers(1, 3)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(len(anns) == 2)})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def candidates_table(gt_path, seed=0, per_gt=12):
    """Dense clusters of boxes around each gt box (so NMS has work), float32 values, unique scores."""
    gt = json.loads(gt_path.read_text())
    rng = np.random.default_rng(seed)
    rows = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(per_gt):
            jx, jy, jw, jh = rng.normal(0, 0.12, 4) * [w, h, w, h]
            cat = ann["category_id"] if rng.random() < 0.8 else 3 - ann["category_id"]
            rows.append((ann["image_id"], cat, x + jx, y + jy, x + jx + max(w + jw, 2), y + jy + max(h + jh, 2)))
    frame = pd.DataFrame(rows, columns=["image_id", "category_id", "x1", "y1", "x2", "y2"])
    for c in ("x1", "y1", "x2", "y2"):
        frame[c] = frame[c].astype(np.float32).astype(np.float64)
    frame["score"] = rng.permutation(len(frame)) / len(frame) * 0.9 + 0.05
    frame["score"] = frame["score"].astype(np.float32).astype(np.float64)
    return frame.sample(frac=1, random_state=1).reset_index(drop=True)  # rows in no particular order


def slow_greedy_nms(frame, thresh, max_det):
    """Per image: rank by score, keep a box unless a survivor of its class overlaps it > thresh."""
    kept, suppressor = {}, {}
    for _, group in frame.groupby("image_id"):
        order = sorted(group.index, key=lambda i: -group.loc[i, "score"])
        survivors = []
        for i in order:
            box = group.loc[i, ["x1", "y1", "x2", "y2"]].to_numpy(float)
            by = next((s for s in survivors if group.loc[s, "category_id"] == group.loc[i, "category_id"]
                       and slow_iou(group.loc[s, ["x1", "y1", "x2", "y2"]].to_numpy(float), box) > thresh), None)
            suppressor[i] = by
            if by is None:
                survivors.append(i)
        for i in order:
            kept[i] = i in survivors[:max_det]
    return kept, suppressor


@pytest.mark.parametrize("fmt", ["parquet", "csv-bbox"])
def test_table_without_kept_matches_slow_greedy_nms(tmp_path, gt_path, fmt):
    table = candidates_table(gt_path)
    if fmt == "parquet":
        path = tmp_path / "preds.parquet"
        table.to_parquet(path)
    else:
        path = tmp_path / "preds.csv"
        bbox = [json.dumps([r.x1, r.y1, r.x2 - r.x1, r.y2 - r.y1]) for r in table.itertuples()]
        table.drop(columns=["x1", "y1", "x2", "y2"]).assign(bbox=bbox).to_csv(path, index=False)
    out = import_predictions(gt_path, path, tmp_path / "dump", nms_thresh=0.5, max_det=5)
    validate_ledger(out)
    kept, suppressor = slow_greedy_nms(table, 0.5, 5)
    ledger = read_candidates(out)
    assert len(ledger) == len(table)
    by_score = {float(np.float32(s)): i for i, s in table["score"].items()}  # scores are unique
    row_of = {by_score[float(s)]: r for r, s in enumerate(ledger["score"])}
    cand_of_row = ledger["cand_id"].to_numpy()
    num_suppressed = 0
    for i in table.index:
        r = row_of[i]
        assert ledger.loc[r, "kept"] == kept[i]
        expected = -1 if suppressor[i] is None else cand_of_row[row_of[suppressor[i]]]
        assert ledger.loc[r, "suppressed_by"] == expected
        num_suppressed += suppressor[i] is not None
    assert num_suppressed > 20 and 0 < ledger["kept"].sum() < len(table)
    # a survivor cut by max-detections: not kept, suppressed_by -1
    assert ((~ledger["kept"]) & (ledger["suppressed_by"] == -1)).any()
    ledger_meta = read_ledger(out).meta
    assert ledger_meta["pre_nms"] is True and ledger_meta["postprocess"]["max_det"] == 5
    assert (ledger["cls_score"] == ledger["score"]).all() and ledger["obj_score"].isna().all()
    assert ledger["iou"].max() > 0.7  # truth columns were computed
    assert len(read_raw_counts(out)) == 0
    images = read_images(out)
    assert images["image_id"].tolist() == [3, 5, 9] and (images["num_pos_anchors"] == -1).all()
    assert images["num_gt"].tolist() == [3, 4, 4]  # image 3's third box is a crowd box


def test_table_with_kept_keeps_the_detectors_decision(tmp_path, gt_path):
    table = candidates_table(gt_path, seed=3)
    rng = np.random.default_rng(0)
    table["kept"] = rng.random(len(table)) < 0.3
    table["obj_score"] = rng.random(len(table))
    path = tmp_path / "preds.parquet"
    table.to_parquet(path)
    out = import_predictions(gt_path, path, tmp_path / "dump")
    validate_ledger(out)
    ledger = read_candidates(out)
    assert ledger["kept"].sum() == table["kept"].sum()
    # each inferred suppressor is a kept box of the same class, scored at least as high, IoU > 0.5
    sup = ledger[ledger["suppressed_by"] >= 0]
    assert len(sup) > 10
    by_id = ledger.set_index("cand_id")
    for row in sup.itertuples():
        s = by_id.loc[row.suppressed_by]
        assert s["kept"] and s["category_id"] == row.category_id and s["score"] >= row.score
        assert slow_iou([s["x1"], s["y1"], s["x2"], s["y2"]], [row.x1, row.y1, row.x2, row.y2]) > 0.5
    assert not np.isnan(ledger["obj_score"]).any()


def test_coco_results_import_is_valid_and_its_ap_is_pycocotools(tmp_path, gt_path):
    table = candidates_table(gt_path, seed=5, per_gt=4)
    results = [{"image_id": int(r.image_id), "category_id": int(r.category_id),
                "bbox": [round(r.x1, 2), round(r.y1, 2), round(r.x2 - r.x1, 2), round(r.y2 - r.y1, 2)],
                "score": round(r.score, 4)} for r in table.itertuples()]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    result = CliRunner().invoke(main, ["import", "--gt", str(gt_path), "--predictions", str(path),
                                       "--out", str(tmp_path / "dump"), "--name", "other"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "dump"
    assert str(out) in result.output
    validate_ledger(out)
    ledger = read_ledger(out)
    cands = ledger.candidates
    assert ledger.meta["pre_nms"] is False and ledger.meta["detector"]["name"] == "other"
    assert len(cands) == len(results) and cands["kept"].all() and (cands["suppressed_by"] == -1).all()
    assert (cands["level"] == -1).all() and (cands["anchor_idx"] == -1).all() and cands["obj_score"].isna().all()
    assert (cands["cls_score"] == cands["score"]).all()

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        evaluator = COCOeval(coco, coco.loadRes(str(path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap = compute_metrics(out, bootstrap=0)["ap"]
    for key, value in zip(STAT_KEYS, evaluator.stats):
        assert ap[key] == pytest.approx(value, abs=1e-6)
    assert ap["AP"] > 0.1
    # detections.json of the ledger carries the same boxes
    assert len(json.loads((out / "detections.json").read_text())) == len(results)


def bad_table(tmp_path, gt_path, suffix="csv", **changes):
    table = candidates_table(gt_path).head(30)
    for column, (row, value) in changes.items():
        table[column] = table[column].astype(object)
        table.loc[row, column] = value
    path = tmp_path / f"preds.{suffix}"
    table.to_csv(path, index=False) if suffix == "csv" else table.to_parquet(path)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"image_id": (17, 999)}, "preds.csv: row 17: image_id 999 is not in gt.json"),
    ({"category_id": (4, 7)}, "preds.csv: row 4: category_id 7 is not in gt.json"),
    ({"x1": (8, float("nan"))}, "preds.csv: row 8: x1 is nan (not a finite number)"),
    ({"y2": (3, -5.0)}, "preds.csv: row 3: inverted box (y2 < y1"),
    ({"score": (11, "high")}, "preds.csv: row 11: score is not a number ('high')"),
    ({"image_id": (9, 999), "category_id": (2, 7)}, "row 2: category_id 7"),  # the first offending row wins
])
def test_bad_rows_name_the_first_offending_row(tmp_path, gt_path, changes, message):
    path = bad_table(tmp_path, gt_path, **changes)
    result = CliRunner().invoke(main, ["import", "--gt", str(gt_path), "--predictions", str(path),
                                       "--out", str(tmp_path / "dump")])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert result.output.count("\n") == 1
    assert not (tmp_path / "dump").exists()


def test_bad_files(tmp_path, gt_path):
    table = candidates_table(gt_path).head(5)
    cases = []
    path = tmp_path / "nobox.csv"
    table.drop(columns=["x2"]).to_csv(path, index=False)
    cases.append((path, "nobox.csv: missing box columns (x1 y1 x2 y2, bbox, or x y w h)"))
    path = tmp_path / "noscore.parquet"
    table.drop(columns=["score"]).to_parquet(path)
    cases.append((path, "noscore.parquet: missing column(s) score"))
    path = tmp_path / "dict.json"
    path.write_text('{"annotations": []}')
    cases.append((path, "dict.json: not a COCO results file"))
    path = tmp_path / "badbbox.json"
    path.write_text(json.dumps([{"image_id": 3, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},
                                {"image_id": 3, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}]))
    cases.append((path, "badbbox.json: row 1: bbox must be [x, y, w, h]"))
    path = tmp_path / "nokey.json"
    path.write_text(json.dumps([{"image_id": 3, "bbox": [1, 2, 3, 4], "score": 0.5}]))
    cases.append((path, "nokey.json: missing column(s) category_id"))
    path = tmp_path / "kept.csv"
    table.assign(kept=["yes"] + [True] * 4).to_csv(path, index=False)
    cases.append((path, "kept.csv: row 0: kept is 'yes'"))
    path = tmp_path / "preds.txt"
    path.write_text("x")
    cases.append((path, "preds.txt: unsupported predictions format"))
    cases.append((tmp_path / "absent.csv", "absent.csv: predictions file not found"))
    for path, message in cases:
        with pytest.raises(InputError) as err:
            import_predictions(gt_path, path, tmp_path / "dump")
        assert message in str(err.value)
    with pytest.raises(InputError, match="--max-det"):
        import_predictions(gt_path, cases[0][0], tmp_path / "dump", max_det=0)
    with pytest.raises(InputError, match="not-there.json"):
        import_predictions(tmp_path / "not-there.json", cases[0][0], tmp_path / "dump")


def test_failed_import_leaves_existing_dump_alone(tmp_path, gt_path, monkeypatch):
    good = tmp_path / "good.parquet"
    candidates_table(gt_path).to_parquet(good)
    out = import_predictions(gt_path, good, tmp_path / "dump")
    before = (out / "meta.json").read_text()
    bad = bad_table(tmp_path, gt_path, image_id=(0, 999))
    with pytest.raises(InputError):
        import_predictions(gt_path, bad, out)
    assert (out / "meta.json").read_text() == before

    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("misalign.importer.LedgerWriter.add_candidates", crash)
    with pytest.raises(RuntimeError):  # dies half-way through writing
        import_predictions(gt_path, good, out, max_det=3)
    assert (out / "meta.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".dump")) == []
    validate_ledger(out)
