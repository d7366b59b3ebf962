"""Capture: the recorder's ledger by hand, and torchvision models captured exactly as they predict."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from detector.capture.torchvision import CaptureConfig, build_model, capture_model
from misalign.errors import InputError
from misalign.ledger import read_candidates, read_ledger, validate_ledger
from misalign.recorder import LedgerRecorder


@pytest.fixture
def gt_file(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 80 + 16 * i, "height": 72} for i in (1, 2, 3)]
    anns = [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 11, "image_id": 2, "category_id": 5, "bbox": [30, 20, 30, 30], "area": 900, "iscrowd": 0}]
    categories = [{"id": c, "name": f"c{c}"} for c in range(91)]  # torchvision's COCO labels are these ids
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def test_recorder_runs_nms_and_adds_truth_by_hand(tmp_path, gt_file):
    with LedgerRecorder(tmp_path / "d", gt_file, nms_thresh=0.5, max_det=1, detector={"name": "mine"}) as rec:
        # scores out of order: the recorder ranks them. B (0.9) and A (0.5) overlap by 380/420 > 0.5;
        # C (0.7) is apart but max_det 1 cuts it.
        rec.add(1, torch.tensor([[10.0, 10, 30, 30], [11, 10, 31, 30], [50, 50, 60, 60]]), torch.tensor([3, 3, 3]),
                torch.tensor([0.5, 0.9, 0.7]), obj_score=np.array([0.1, 0.2, 0.3]))
        rec.add(3, np.zeros((0, 4)), [], [])  # no candidates: still an image of the ledger
    validate_ledger(tmp_path / "d")
    ledger = read_ledger(tmp_path / "d")
    c = ledger.candidates
    assert c["score"].tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert c["obj_score"].tolist() == pytest.approx([0.2, 0.3, 0.1])  # travelled with its row
    assert c["kept"].tolist() == [True, False, False]  # C survives NMS, but max_det is 1
    assert c["suppressed_by"].tolist() == [-1, -1, 0]  # A by B; C survived
    assert c["iou"].tolist() == pytest.approx([380 / 420, 0.0, 1.0]) and c["gt_id"].tolist() == [10, -1, 10]
    assert ledger.images["image_id"].tolist() == [1, 3] and ledger.images["num_gt"].tolist() == [1, 0]
    assert ledger.meta["detector"]["name"] == "mine" and ledger.meta["postprocess"]["max_det"] == 1


def test_recorder_takes_the_detectors_decisions(tmp_path, gt_file):
    boxes = np.array([[10.0, 10, 30, 30], [11, 10, 31, 30], [12, 10, 32, 30]])
    with LedgerRecorder(tmp_path / "d", gt_file) as rec:
        # given: row 2 (score 0.8) kept and suppressing row 0; row 1 kept too (the detector's NMS differs)
        rec.add(1, boxes, [3, 3, 3], [0.6, 0.7, 0.8], kept=[False, True, True], suppressed_by=[2, -1, -1])
    c = read_candidates(tmp_path / "d")
    assert c["score"].tolist() == pytest.approx([0.8, 0.7, 0.6])  # sorted; positions follow the rows
    assert c["kept"].tolist() == [True, True, False] and c["suppressed_by"].tolist() == [-1, -1, 0]


@pytest.mark.parametrize("call, message", [
    (lambda r: r.add(99, np.zeros((0, 4)), [], []), "image_id 99: not an image of the ground truth"),
    (lambda r: r.add(1, [[0, 0, 5, 5]], [200], [0.5]), "label 200 is not a category id"),
    (lambda r: r.add(1, [[5, 0, 0, 5]], [3], [0.5]), "inverted box"),
    (lambda r: r.add(1, [[0, 0, 5, 5]], [3, 3], [0.5]), "1 boxes but 2 labels"),
    (lambda r: [r.add(1, np.zeros((0, 4)), [], []), r.add(1, np.zeros((0, 4)), [], [])], "added twice"),
])
def test_recorder_bad_input_is_one_line_and_nothing_is_written(tmp_path, gt_file, call, message):
    out = tmp_path / "d"
    with pytest.raises(InputError, match=message):
        with LedgerRecorder(out, gt_file) as rec:
            rec.add(2, [[30.0, 20, 60, 50]], [5], [0.9])
            call(rec)
    assert not out.exists() and not list(tmp_path.glob(".d.*"))  # no half-written folder left behind


def _spread(model, seed=0):
    """Varied class scores on random weights: larger last-layer weights of the classifier."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("cls_logits", "cls_score", "classification_head")) and param.ndim > 1:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return model


ARCHITECTURES = [
    ("retinanet_resnet50_fpn_v2", {"score_thresh": 0.001, "min_size": 64, "max_size": 112}),
    ("fcos_resnet50_fpn", {"score_thresh": 0.001, "min_size": 64, "max_size": 112}),
    ("ssd300_vgg16", {"score_thresh": 0.001}),
    ("ssdlite320_mobilenet_v3_large", {"score_thresh": 0.001}),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"box_score_thresh": 0.001, "min_size": 64, "max_size": 112}),
]


@pytest.mark.parametrize("name, options", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_kept_rows_are_the_models_own_detections_in_order(tmp_path, gt_file, name, options):
    torch.manual_seed(0)
    model = _spread(build_model(CaptureConfig(model=name, out="", num_classes=91, options=options))).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 72, 96, generator=g), torch.rand(3, 72, 112, generator=g)]
    with torch.no_grad():
        expected = model(images)  # the model's own output, without the recorder
    head = getattr(model, "roi_heads", model)
    with LedgerRecorder(tmp_path / "d", gt_file, nms_thresh=head.nms_thresh, max_det=head.detections_per_img) as rec:
        capture_model(model, images, rec, image_ids=[1, 2], batch_size=2)
    validate_ledger(tmp_path / "d")
    c = read_candidates(tmp_path / "d")
    for image_id, det in zip((1, 2), expected):
        rows = c[c["image_id"] == image_id]
        kept = rows[rows["kept"]]
        assert len(kept) == len(det["boxes"]) > 0
        assert len(rows) > len(kept)  # the pool before NMS is there too
        np.testing.assert_array_equal(kept[["x1", "y1", "x2", "y2"]].to_numpy(), det["boxes"].numpy().astype(np.float64))
        np.testing.assert_array_equal(kept["score"].to_numpy(), det["scores"].numpy())
        np.testing.assert_array_equal(kept["category_id"].to_numpy(), det["labels"].numpy())


def test_capture_cli_writes_a_ledger_and_refuses_bad_input(tmp_path, gt_file, make_coco):
    images = json.loads(gt_file.read_text())["images"]
    ann, image_dir = make_coco(images, json.loads(gt_file.read_text())["annotations"],
                               json.loads(gt_file.read_text())["categories"])
    base = ["capture", "torchvision", "--model", "ssdlite320_mobilenet_v3_large", "--ann", str(ann),
            "--images", str(image_dir), "-o", "score_thresh=0.001", "--limit", "2"]
    runner = CliRunner()
    result = runner.invoke(main, [*base, "--out", str(tmp_path / "cap")])
    assert result.exit_code == 0, result.output
    meta = read_ledger(tmp_path / "cap").meta
    assert meta["source"]["framework"] == "torchvision" and meta["source"]["model"] == "ssdlite320_mobilenet_v3_large"
    assert meta["source"]["options"] == {"score_thresh": 0.001} and meta["postprocess"]["score_thresh"] == 0.001
    assert meta["num_images"] == 2

    (tmp_path / "bad.pt").write_bytes(b"not a state dict")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
    (tmp_path / "map.json").write_text(json.dumps({"1": 3}))
    for args, fragment in [
        (["--model", "nope"], "'nope' is not a torchvision detection builder"),
        (["--weights", str(tmp_path / "bad.pt")], "bad.pt: not a PyTorch state-dict file"),
        (["--weights", str(tmp_path / "other.pt")], "other.pt: does not fit ssdlite320_mobilenet_v3_large"),
        (["--label-map", str(tmp_path / "map.json")], "--label-map: no category id for predicted label"),
    ]:
        result = runner.invoke(main, [*base, *args, "--out", str(tmp_path / "bad")])
        assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "bad").exists()


def _lively_yolo():
    """yolov8n from its yaml (nothing downloaded), class biases raised so that pairs pass conf 0.001."""
    from detector.capture.ultralytics import load_model

    model = load_model("yolov8n.yaml")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for branch in model.model[-1].cv3:  # the class branch of each level
            branch[-1].bias.copy_(torch.randn(branch[-1].bias.shape, generator=g) - 7)
            branch[-1].weight.mul_(20)
    return model


def test_ultralytics_kept_rows_are_its_own_nms_output(tmp_path):
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    from detector.capture.ultralytics import UltralyticsConfig, _category_mapper, letterbox, record_batch

    images = [{"id": i, "file_name": f"{i}.png", "width": 200 + 20 * i, "height": 150} for i in (1, 2)]
    categories = [{"id": 100 + c, "name": str(c)} for c in range(80)]  # class i -> category 100 + i
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
    model = _lively_yolo()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8) for im in images]
    batch = torch.stack([torch.from_numpy(letterbox(a, 160)).permute(2, 0, 1) for a in arrays]).float() / 255
    with torch.no_grad():
        raw = model(batch)[0]
    config = UltralyticsConfig(weights="yolov8n.yaml", out="", imgsz=160, max_det=50)
    with LedgerRecorder(tmp_path / "d", tmp_path / "gt.json", nms_thresh=config.iou, max_det=config.max_det) as rec:
        record_batch(rec, raw, [1, 2], [a.shape[:2] for a in arrays], batch.shape[2:], config,
                     _category_mapper([c["id"] for c in categories], None))
    validate_ledger(tmp_path / "d")
    c = read_candidates(tmp_path / "d")
    # the reference: ultralytics' validation-mode NMS on the same head output, boxes scaled its way
    expected = non_max_suppression(raw, config.conf, config.iou, multi_label=True, max_det=config.max_det)
    for image_id, out, array in zip((1, 2), expected, arrays):
        rows = c[c["image_id"] == image_id]
        kept = rows[rows["kept"]]
        assert len(kept) == len(out) == 50 and len(rows) > 1000  # a full pool, cut by max_det
        boxes = scale_boxes(batch.shape[2:], out[:, :4].clone(), array.shape[:2])
        np.testing.assert_array_equal(kept[["x1", "y1", "x2", "y2"]].to_numpy(), boxes.numpy().astype(np.float64))
        np.testing.assert_array_equal(kept["score"].to_numpy(), out[:, 4].numpy())
        np.testing.assert_array_equal(kept["category_id"].to_numpy(), 100 + out[:, 5].numpy().astype(np.int64))
        # the pool is validation mode's rule: every (anchor, class) with probability > conf
        probs = raw[image_id - 1, 4:].T  # [A, nc]
        assert len(rows) == int((probs > config.conf).sum())


def test_capture_ultralytics_cli_bad_input(tmp_path, gt_file, make_coco):
    info = json.loads(gt_file.read_text())
    ann, image_dir = make_coco(info["images"], info["annotations"], info["categories"])
    runner = CliRunner()
    result = runner.invoke(main, ["capture", "ultralytics", "--weights", str(tmp_path / "none.pt"), "--ann", str(ann),
                                  "--images", str(image_dir), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "none.pt: weights file not found" in result.output
    assert not (tmp_path / "bad").exists()


def test_label_map_file_problems_are_one_line(tmp_path):
    from detector.capture.torchvision import read_label_map

    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "ok.json").write_text('{"0": 7, "1": 9}')
    assert read_label_map(tmp_path / "ok.json") == {0: 7, 1: 9}
    with pytest.raises(InputError, match="list.json: a label map is a JSON object"):
        read_label_map(tmp_path / "list.json")
    with pytest.raises(InputError, match="none.json: label map not found"):
        read_label_map(tmp_path / "none.json")


def test_capture_in_parts_sharded_and_resumed_equals_one_process(tmp_path, gt_file, make_coco, monkeypatch):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import detector.capture.torchvision as module
    from test_dump_parts import assert_same_ledger

    info = json.loads(gt_file.read_text())
    ann, image_dir = make_coco(info["images"], info["annotations"], info["categories"])
    base = ["capture", "torchvision", "--model", "ssdlite320_mobilenet_v3_large", "--ann", str(ann),
            "--images", str(image_dir), "-o", "score_thresh=0.001", "--part-images", "1", "--batch-size", "1",
            "--device", "cpu"]
    runner = CliRunner()
    assert runner.invoke(main, [*base, "--out", str(tmp_path / "one")]).exit_code == 0

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                             "-m", "cli", *base, "--out", str(tmp_path / "two")], cwd=root, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_ledger(tmp_path / "two", tmp_path / "one")

    batch, calls = module._batch_records, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:  # after the first part
            raise KeyboardInterrupt
        return batch(*args)

    monkeypatch.setattr(module, "_batch_records", interrupted)
    stopped = runner.invoke(main, [*base, "--out", str(tmp_path / "resumed")])
    assert stopped.exit_code != 0 and not (tmp_path / "resumed").exists()  # click: Ctrl-C is "Aborted!"
    assert [p.name for p in (tmp_path / ".resumed.parts").glob("part-*")] == ["part-0000000-0000000"]
    monkeypatch.setattr(module, "_batch_records", batch)
    result = runner.invoke(main, [*base, "--out", str(tmp_path / "resumed"), "--resume"])
    assert result.exit_code == 0, result.output
    assert_same_ledger(tmp_path / "resumed", tmp_path / "one")
