"""Alignment during training (issue 14 §5): log.csv's align_spearman / obj_iou_mae against scipy and a
plain recomputation of the positive anchors from the model's own outputs, and the per-epoch curves
misalign.training reads back (docs/methods.md, "Alignment during training")."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torchvision.ops import box_iou

from misalign.training import alignment_metrics, read_training_curves, training_curves, training_frame


def test_alignment_metrics_match_scipy_and_a_plain_mean():
    rng = np.random.default_rng(0)
    cls = np.round(rng.random(500), 2)  # ties, as the ranks must average them
    iou = np.clip(0.5 * cls + 0.5 * rng.random(500), 0, 1).round(2)
    obj = rng.random(500)
    got = alignment_metrics(cls, iou, obj)
    assert got["align_spearman"] == pytest.approx(stats.spearmanr(cls, iou).statistic, abs=1e-12)
    assert got["obj_iou_mae"] == pytest.approx(sum(abs(o - i) for o, i in zip(obj, iou)) / 500, abs=1e-12)


def test_alignment_metrics_are_nan_where_undefined():
    assert math.isnan(alignment_metrics([0.3], [0.6])["align_spearman"])  # one anchor
    assert math.isnan(alignment_metrics([0.3, 0.3, 0.3], [0.5, 0.6, 0.7])["align_spearman"])  # constant score
    no_branch = alignment_metrics([0.1, 0.2], [0.5, 0.7], [np.nan, np.nan])
    assert no_branch["align_spearman"] == pytest.approx(1.0) and math.isnan(no_branch["obj_iou_mae"])
    assert math.isnan(alignment_metrics([], [], [])["obj_iou_mae"])


@pytest.mark.parametrize("name", ["retinanet-conf", "retinanet"])
def test_probe_records_the_positive_anchors_as_a_plain_recomputation_finds_them(name):
    """The model's probe against per-image torchvision matching, decoding and IoU on the same head outputs."""
    from detector.model import build_model

    torch.manual_seed(0)
    model = build_model(name, 3, backbone="resnet10", img_size=64, max_size=64, fpn_channels=16,
                        num_head_convs=1).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 20.0, 60.0, 58.0]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[10.0, 10.0, 34.0, 30.0]]), "labels": torch.tensor([1])}]
    model.alignment_probe = []
    with torch.no_grad():
        model(images, targets)
        _, resized, outputs, anchors, _ = model._run_network(images, targets)  # the same forward again
    (probe,) = model.alignment_probe

    cls, iou, obj = [], [], []
    for i, target in enumerate(resized):
        matched = model.matcher(box_iou(target["boxes"], anchors))  # [A]
        for a in torch.nonzero(matched >= 0).flatten().tolist():
            gt = int(matched[a])
            cls.append(torch.sigmoid(outputs["cls_logits"][i, a, target["labels"][gt]]).item())
            box = model.box_coder.decode_single(outputs["bbox_deltas"][i, a][None], anchors[a][None])
            iou.append(box_iou(box, target["boxes"][gt][None]).item())
            obj.append(torch.sigmoid(outputs["obj_logits"][i, a]).item() if "obj_logits" in outputs else np.nan)
    assert len(cls) > 5
    np.testing.assert_allclose(probe["cls_prob"].numpy(), cls, rtol=1e-6)
    np.testing.assert_allclose(probe["iou"].numpy(), iou, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probe["obj_prob"].numpy(), obj, rtol=1e-6)
    got = alignment_metrics(probe["cls_prob"].numpy(), probe["iou"].numpy(), probe["obj_prob"].numpy())
    assert got["align_spearman"] == pytest.approx(stats.spearmanr(cls, iou).statistic, abs=1e-6)
    if name == "retinanet":
        assert math.isnan(got["obj_iou_mae"])
    else:
        assert got["obj_iou_mae"] == pytest.approx(np.mean(np.abs(np.subtract(obj, iou))), abs=1e-6)
    model.alignment_probe = None
    with torch.no_grad():
        model(images, targets)  # not probing: nothing recorded
    assert model.alignment_probe is None


def _write_log(path, rows, columns):
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


def test_curves_average_each_epochs_loss_and_take_its_logged_alignment(tmp_path):
    columns = ["step", "epoch", "classification", "loss", "lr", "images_per_s", "align_spearman", "obj_iou_mae"]
    rows = [[1, 1, 1.0, 2.0, 0.1, 5, None, None], [2, 1, 3.0, 4.0, 0.1, 5, 0.25, None],
            [3, 2, 0.5, 1.0, 0.1, 5, None, None], [4, 2, 0.7, 1.5, 0.1, 5, None, None], [5, 2, 0.9, 2.0, 0.1, 5, 0.5, 0.125]]
    _write_log(tmp_path / "log.csv", rows, columns)
    curves = read_training_curves(tmp_path / "log.csv")
    assert curves.available and curves.has_alignment and curves.note is None
    assert curves.loss_terms == ["classification", "loss"]
    frame = curves.epochs
    assert frame["epoch"].tolist() == [1, 2] and frame["step"].tolist() == [2, 5]
    assert frame["loss"].tolist() == pytest.approx([3.0, 1.5]) and frame["classification"].tolist() == pytest.approx([2.0, 0.7])
    assert frame["align_spearman"].tolist() == [0.25, 0.5]
    assert math.isnan(frame["obj_iou_mae"][0]) and frame["obj_iou_mae"][1] == 0.125
    table = training_frame({"a": curves, "b": None})
    assert table.columns.tolist() == ["detector", "epoch", "step", "classification", "loss", "align_spearman",
                                      "obj_iou_mae"]
    assert table["detector"].tolist() == ["a", "a"]


def test_old_logs_give_loss_curves_only_and_missing_logs_a_note(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    meta = {"checkpoint": str(run / "checkpoint.pt")}
    assert training_curves({}) is None  # no checkpoint recorded (imports, synthetic ledgers)
    missing = training_curves(meta)
    assert not missing.available and "no log.csv" in missing.note
    _write_log(run / "log.csv", [[1, 1, 2.0, 0.1, 5], [2, 1, 1.0, 0.1, 5]], ["step", "epoch", "loss", "lr", "images_per_s"])
    old = training_curves(meta)
    assert old.available and not old.has_alignment and "loss curves only" in old.note
    assert old.epochs["loss"].tolist() == [1.5] and math.isnan(old.epochs["align_spearman"][0])
    (run / "log.csv").write_text("step,epoch\n1,1\n")
    assert "no loss column" in training_curves(meta).note
