"""`misalign dump`: the ledger equals the model's own output, truth columns equal slow references."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cli import main
from detector import build_model
from detector.checkpoint import save_checkpoint
from detector.data import CocoDetection
from detector.dump import DumpConfig, dump
from misalign.ledger import CANDIDATE_SCHEMA, IMAGE_SCHEMA, read_ledger, read_raw, validate_ledger
from reference import slow_iou

SIZE = 96


def _checkpoint(tmp_path, name, category_ids) -> Path:
    torch.manual_seed(0)
    # prior 0.2: untrained classifiers then put many pairs above score_thresh, like a trained one
    model = build_model(name, num_classes=len(category_ids), backbone="resnet18", img_size=SIZE, max_size=SIZE,
                        fpn_channels=16, num_head_convs=1, prior_prob=0.2, topk=50, max_det=20)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": {**model.config, "category_ids": category_ids},
                           "epoch": 1, "step": 10})
    return path


@pytest.fixture(scope="module")
def dumped(shapes_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dump")
    categories = json.loads((shapes_dataset / "annotations/instances_val.json").read_text())["categories"]
    ckpt = _checkpoint(tmp, "retinanet-conf", sorted(c["id"] for c in categories))
    out = tmp / "ledger"
    dump(DumpConfig(ckpt=str(ckpt), out=str(out), data=str(shapes_dataset), split="val", workers=0,
                    batch_size=2, raw_images=2))
    return ckpt, out


def _gt(shapes_dataset):
    coco = json.loads((shapes_dataset / "annotations/instances_val.json").read_text())
    return coco["images"], coco["annotations"]


def test_ledger_satisfies_the_contract(dumped):
    _, out = dumped
    validate_ledger(out)
    ledger = read_ledger(out)
    for field in CANDIDATE_SCHEMA:
        assert str(ledger.candidates[field.name].dtype) == field.type.to_pandas_dtype().__name__, field.name
    for field in IMAGE_SCHEMA:
        if field.name != "file_name":
            assert str(ledger.images[field.name].dtype) == field.type.to_pandas_dtype().__name__, field.name
    assert ledger.candidates["kept"].any() and (~ledger.candidates["kept"]).any()
    assert ledger.candidates["obj_score"].notna().all()  # retinanet-conf has the branch
    meta = ledger.meta
    assert meta["postprocess"]["topk"] == 50 and meta["postprocess"]["max_det"] == 20
    assert meta["dataset"]["split"] == "val" and Path(meta["dataset"]["ann"]).is_file()
    assert len(meta["checkpoint_sha256"]) == 64


def test_kept_rows_are_the_models_own_output(dumped, shapes_dataset):
    ckpt, out = dumped
    state = torch.load(ckpt, weights_only=True)
    from detector.model import model_from_config

    model = model_from_config(state["config"])
    model.load_state_dict(state["model"])
    model.eval()
    dataset = CocoDetection(shapes_dataset / "annotations/instances_val.json", shapes_dataset / "val",
                            train=False, min_size=SIZE, max_size=SIZE, category_ids=state["config"]["category_ids"])
    cands = read_ledger(out).candidates
    for start in range(0, len(dataset), 2):  # the dump's batches: batching changes float rounding
        batch = [dataset[i] for i in range(start, min(start + 2, len(dataset)))]
        with torch.no_grad():
            outputs = model([image for image, _ in batch])
        for (_, target), expected in zip(batch, outputs):
            rows = cands[(cands.image_id == target["image_id"]) & cands.kept]
            rows = rows.sort_values("score", ascending=False, kind="stable")
            assert len(rows) == len(expected["scores"]) > 0
            np.testing.assert_array_equal(rows["score"].to_numpy(), expected["scores"].numpy())
            np.testing.assert_array_equal(rows["cls_score"].to_numpy(), expected["cls_scores"].numpy())
            np.testing.assert_array_equal(rows["obj_score"].to_numpy(), expected["obj_scores"].numpy())
            np.testing.assert_array_equal(rows["category_id"].to_numpy(), dataset.to_category_ids(expected["labels"]))
            np.testing.assert_allclose(rows[["x1", "y1", "x2", "y2"]].to_numpy(),
                                       expected["boxes"].double().numpy() / target["scale"], rtol=1e-6)


def test_truth_columns_match_a_slow_reference(dumped, shapes_dataset):
    _, out = dumped
    images, annotations = _gt(shapes_dataset)
    cands = read_ledger(out).candidates
    for row in cands.sample(n=min(400, len(cands)), random_state=0).itertuples():
        box = (row.x1, row.y1, row.x2, row.y2)
        best_same, best_id, best_any = 0.0, -1, 0.0
        for ann in annotations:
            if ann["image_id"] != row.image_id or ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            iou = slow_iou(box, (x, y, x + w, y + h))
            best_any = max(best_any, iou)
            if ann["category_id"] == row.category_id and iou > best_same:
                best_same, best_id = iou, ann["id"]
        assert row.iou == pytest.approx(best_same, abs=1e-6)
        assert row.gt_id == best_id
        assert row.iou_any == pytest.approx(best_any, abs=1e-6)


def test_suppressed_by_points_to_a_same_class_survivor_that_overlaps(dumped):
    _, out = dumped
    cands = read_ledger(out).candidates.set_index("cand_id")
    losers = cands[cands.suppressed_by >= 0]
    assert len(losers)
    winners = cands.loc[losers.suppressed_by]
    assert (winners.suppressed_by.to_numpy() == -1).all()  # the suppressor survived NMS
    assert (winners.category_id.to_numpy() == losers.category_id.to_numpy()).all()
    assert (winners.score.to_numpy() >= losers.score.to_numpy()).all()
    ious = [slow_iou(a, b) for a, b in zip(losers[["x1", "y1", "x2", "y2"]].to_numpy(),
                                           winners[["x1", "y1", "x2", "y2"]].to_numpy())]
    assert min(ious) > 0.5 - 1e-4


def test_anchor_counts_match_a_slow_reference(dumped, shapes_dataset):
    _, out = dumped
    images, annotations = _gt(shapes_dataset)
    ledger = read_ledger(out)
    raw = read_raw(out)
    assert sorted(raw.image_id.unique()) == sorted(ledger.images.image_id)[:2]
    for image_id, rows in raw.groupby("image_id"):
        gt = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
              for a in annotations if a["image_id"] == image_id and not a.get("iscrowd", 0)]
        anchor_iou = np.array([max([slow_iou(a, g) for g in gt], default=0.0)
                               for a in rows[["anchor_x1", "anchor_y1", "anchor_x2", "anchor_y2"]].to_numpy()])
        raw_iou = np.array([max([slow_iou(b, g) for g in gt], default=0.0)
                            for b in rows[["x1", "y1", "x2", "y2"]].to_numpy()])
        image = ledger.images.set_index("image_id").loc[image_id]
        assert image.num_anchors == len(rows)
        assert image.num_pos_anchors == int((anchor_iou > 0.5).sum())  # Positive_NUM: IoU > 0.5
        counts = ledger.raw_counts[ledger.raw_counts.image_id == image_id].set_index(["stage", "quantity", "threshold"])["count"]
        for t in (0.5, 0.6, 0.7, 0.8, 0.9):
            assert counts[("anchors", "iou", t)] == int((anchor_iou > t).sum())
            assert counts[("raw", "iou", t)] == int((raw_iou > t).sum())
        for t in (0.05, 0.5, 0.6, 0.7, 0.8, 0.9):
            assert counts[("raw", "cls", t)] == int((rows.cls_score.to_numpy() > np.float32(t)).sum())


def test_detections_json_is_the_kept_rows(dumped):
    _, out = dumped
    detections = pd.DataFrame(json.loads((out / "detections.json").read_text()))
    kept = read_ledger(out).candidates.query("kept")
    assert len(detections) == len(kept)
    np.testing.assert_allclose(np.sort(detections.score.to_numpy()), np.sort(kept.score.to_numpy().astype(float)))


def test_bad_checkpoints_give_one_line(tmp_path, shapes_dataset):
    runner = CliRunner()
    not_ckpt = tmp_path / "not.pt"
    torch.save({"weights": torch.zeros(1)}, not_ckpt)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    for path, problem in [(tmp_path / "missing.pt", "no such checkpoint"), (not_ckpt, "not a misalign checkpoint"),
                          (garbage, "not a readable misalign checkpoint")]:
        result = runner.invoke(main, ["dump", "--ckpt", str(path), "--data", str(shapes_dataset),
                                      "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and problem in result.stderr and str(path) in result.stderr


def test_categories_not_matching_the_checkpoint_are_refused(tmp_path, shapes_dataset):
    ckpt = _checkpoint(tmp_path, "retinanet", [1, 2])  # the shapes dataset has 5 categories
    result = CliRunner().invoke(main, ["dump", "--ckpt", str(ckpt), "--data", str(shapes_dataset),
                                       "--out", str(tmp_path / "out"), "--workers", "0"])
    assert result.exit_code == 2
    assert "instances_val.json" in result.stderr and "categories" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_interrupted_dump_keeps_the_old_ledger(tmp_path, shapes_dataset, dumped, monkeypatch):
    ckpt, _ = dumped
    out = tmp_path / "ledger"
    out.mkdir()
    (out / "marker").write_text("old")
    import detector.dump as module

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "ledger_batch", fail)
    with pytest.raises(KeyboardInterrupt):
        dump(DumpConfig(ckpt=str(ckpt), out=str(out), data=str(shapes_dataset), workers=0))
    assert (out / "marker").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger"]  # no partial folder left behind


@pytest.mark.parametrize("args, message", [
    (["--topk", "0"], "--topk: 0 must be at least 1"),
    (["--nms-thresh", "1.5"], "--nms-thresh: 1.5 must be in (0, 1]"),
    (["--score-thresh", "-0.1"], "--score-thresh: -0.1 must be in [0, 1)"),
    (["--alpha", "2"], "--alpha: 2.0 must be in [0, 1]"),
    (["--limit", "0"], "--limit: 0 must be at least 1"),
])
def test_options_out_of_range_give_one_line(args, message, dumped, shapes_dataset, tmp_path):
    ckpt, _ = dumped
    result = CliRunner().invoke(main, ["dump", "--ckpt", str(ckpt), "--data", str(shapes_dataset),
                                       "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_gives_one_line(dumped, shapes_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt, _ = dumped
    result = CliRunner().invoke(main, ["dump", "--ckpt", str(ckpt), "--data", str(shapes_dataset),
                                       "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --device cuda: no CUDA device is available"
