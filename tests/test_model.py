"""The detector against torchvision's RetinaNet, its ledger hook, its config and its bad input."""

import copy
import json
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead, _default_anchorgen
from torchvision.ops.misc import FrozenBatchNorm2d

from detector import build_model, model_from_config
from misalign.errors import InputError

TINY = dict(backbone="resnet18", img_size=128, max_size=192, fpn_channels=16)


def _images_and_targets():
    """Two images of different sizes; the second (96 × 80) is upscaled ×1.6 by the transform."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 96, 80, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12, 60, 70], [70, 20, 150, 110], [5, 80, 40, 120]]), "labels": torch.tensor([0, 2, 1])},
        {"boxes": torch.tensor([[8.0, 10, 50, 60], [30, 40, 75, 90]]), "labels": torch.tensor([1, 1])},
    ]
    return images, targets


def _spread_head(model, seed=0):
    """Give the heads weights that produce varied scores and boxes (at init all scores are ~0.01)."""
    g = torch.Generator().manual_seed(seed)
    head = model.head
    for tower in (head.cls_tower, head.reg_tower):
        for block in tower:
            fan_in = block[0].weight[0].numel()
            with torch.no_grad():
                block[0].weight.copy_(torch.randn(block[0].weight.shape, generator=g) * math.sqrt(2 / fan_in))
    for conv in (head.cls_logits, head.bbox_deltas, head.obj_logits):
        if conv is not None:
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    with torch.no_grad():
        head.cls_logits.bias.fill_(-1.5)
        if head.obj_logits is not None:
            head.obj_logits.bias.fill_(0.5)
    return model


def _torchvision_twin(ours):
    """torchvision's RetinaNet with our backbone, its own default anchors and our head weights."""
    cfg = ours.cfg
    head = RetinaNetHead(cfg.fpn_channels, 9, cfg.num_classes)
    tv = RetinaNet(
        copy.deepcopy(ours.backbone), cfg.num_classes, min_size=cfg.img_size, max_size=cfg.max_size,
        anchor_generator=_default_anchorgen(), head=head, detections_per_img=cfg.max_det,
        score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, topk_candidates=cfg.topk,
    )
    for i in range(4):
        for kind in ("weight", "bias"):
            getattr(head.classification_head.conv[i][0], kind).data.copy_(getattr(ours.head.cls_tower[i][0], kind))
            getattr(head.regression_head.conv[i][0], kind).data.copy_(getattr(ours.head.reg_tower[i][0], kind))
    for kind in ("weight", "bias"):
        getattr(head.classification_head.cls_logits, kind).data.copy_(getattr(ours.head.cls_logits, kind))
        getattr(head.regression_head.bbox_reg, kind).data.copy_(getattr(ours.head.bbox_deltas, kind))
    return tv


def test_retinanet_equals_torchvision_retinanet_with_identical_weights():
    torch.manual_seed(0)
    ours = _spread_head(build_model("retinanet", 3, loss_norm="per_image", anchor_placement="torchvision", **TINY))
    tv = _torchvision_twin(ours)
    images, targets = _images_and_targets()

    ours.train(), tv.train()
    our_losses, tv_losses = ours(images, targets), tv(images, targets)
    assert set(our_losses) == set(tv_losses) == {"classification", "bbox_regression"}
    for key in our_losses:
        torch.testing.assert_close(our_losses[key], tv_losses[key], atol=1e-5, rtol=0)

    ours.eval(), tv.eval()
    with torch.no_grad():
        our_dets, tv_dets = ours(images), tv(images)
    for mine, theirs, image in zip(our_dets, tv_dets, images):
        assert len(mine["boxes"]) > 10  # a real comparison, not two empty lists
        torch.testing.assert_close(mine["boxes"], theirs["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(mine["scores"], theirs["scores"], atol=1e-6, rtol=0)
        assert torch.equal(mine["labels"], theirs["labels"])
        assert float(mine["boxes"][:, 2].max()) <= image.shape[-1] and float(mine["boxes"][:, 3].max()) <= image.shape[-2]


def test_anchors_are_torchvisions_retinanet_anchors():
    model = build_model("retinanet", 3, **TINY)
    ours, theirs = model.anchor_generator, _default_anchorgen()
    assert ours.sizes == theirs.sizes == ((32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812))
    assert ours.num_anchors_per_location() == [9] * 5
    for a, b in zip(ours.cell_anchors, theirs.cell_anchors):
        assert torch.equal(a, b)
    # First anchor of P3: ratio h/w 0.5, size 32 -> w = 32 * sqrt(2) = 45.25, h = 22.63, rounded halves.
    assert ours.cell_anchors[0][0].tolist() == [-23.0, -11.0, 23.0, 11.0]

    model.eval()
    result = model.predict_with_candidates([torch.rand(3, 128, 128)])[0]
    # P3..P7 of a 128 × 128 input (strides 8..128): 16², 8², 4², 2², 1² locations × 9 anchors.
    assert result["anchors"].shape == ((256 + 64 + 16 + 4 + 1) * 9, 4)
    torch.testing.assert_close(result["anchors"][0], torch.tensor([-23.0, -11.0, 23.0, 11.0]))
    # Last anchor: P7's only location (0, 0), ratio 2, size 812 -> w = 812 / sqrt(2), h = 812 * sqrt(2).
    torch.testing.assert_close(result["anchors"][-1], torch.tensor([-287.0, -574.0, 287.0, 574.0]))
    assert isinstance(model.box_coder, torchvision.models.detection._utils.BoxCoder)
    assert model.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    m = model.matcher
    assert (m.high_threshold, m.low_threshold, m.allow_low_quality_matches) == (0.5, 0.4, True)


@pytest.mark.parametrize("height, width", [(160, 160), (608, 1024)])
def test_anchor_centres_sit_at_each_levels_stride(height, width):
    """Cell (i, j) of level P3..P7 is centred at (j, i) * 8, 16, 32, 64, 128, whatever the grid rounding.

    160 px: grids 20, 10, 5, 3, 2 (P6/P7 rounded up by their stride-2 convs); torchvision would put
    P6 at 160 // 3 = 53 px steps. 608 x 1024: P7 is 5 x 8 cells; torchvision's y step 608 // 5 = 121.
    """
    model = build_model("retinanet", 3, backbone="resnet18", img_size=height, max_size=width, fpn_channels=16).eval()
    with torch.no_grad():
        _, _, _, anchors, per_level = model._run_network([torch.rand(3, height, width)])
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2] x, y
    start = 0
    for level, stride in enumerate((8, 16, 32, 64, 128)):
        rows, cols = -(-height // stride), -(-width // stride)  # ceil: each conv rounds up
        assert per_level[level] == rows * cols * 9
        expected_y = torch.arange(rows).repeat_interleave(cols * 9) * float(stride)  # row-major cells, 9 anchors each
        expected_x = torch.arange(cols).repeat_interleave(9).repeat(rows) * float(stride)
        level_centres = centres[start:start + per_level[level]]
        assert torch.equal(level_centres[:, 0], expected_x) and torch.equal(level_centres[:, 1], expected_y)
        start += per_level[level]

    tv = build_model("retinanet", 3, backbone="resnet18", img_size=height, max_size=width, fpn_channels=16,
                     anchor_placement="torchvision").eval()
    with torch.no_grad():
        tv_anchors = tv._run_network([torch.rand(3, height, width)])[3]
    tv_steps = torch.unique((tv_anchors[:, 1] + tv_anchors[:, 3]) / 2)
    assert (53.0 in tv_steps.tolist()) if height == 160 else (121.0 in tv_steps.tolist())


def test_checkpoints_from_before_anchor_placement_keep_torchvisions_anchors():
    config = build_model("retinanet", 3, **TINY).config
    del config["anchor_placement"]
    assert model_from_config(config).cfg.anchor_placement == "torchvision"


# The branch layouts; the other variants' ledger checks are in tests/test_variants.py.
@pytest.mark.parametrize("name", ["retinanet", "retinanet-conf", "iou-aware"])
def test_predict_with_candidates_is_the_eval_output_plus_the_ledger(name):
    torch.manual_seed(0)
    model = _spread_head(build_model(name, 3, topk=40, max_det=15, **TINY)).eval()
    images, _ = _images_and_targets()
    with torch.no_grad():
        detections = model(images)
    results = model.predict_with_candidates(images)
    for det, res, image in zip(detections, results, images):
        cand = res["candidates"]
        kept = cand["kept"]
        for key, col in (("boxes", "boxes"), ("scores", "score"), ("labels", "labels"), ("cls_scores", "cls_score")):
            assert torch.equal(det[key], res[key]) and torch.equal(cand[col][kept], det[key])
        assert torch.equal(det["obj_scores"], res["obj_scores"]) or (name == "retinanet" and bool(det["obj_scores"].isnan().all()))
        assert len(det["boxes"]) == 15  # max_det cut at work

        # Candidates: score > score_thresh, at most topk per level, sorted by score.
        assert bool((cand["score"] > 0.05).all())
        assert torch.bincount(cand["level"], minlength=5).max() <= 40
        assert bool((cand["score"][:-1] >= cand["score"][1:]).all())
        # Survivors are exactly the rows with suppressed_by -1; the kept ones are the first max_det.
        survivors = torch.nonzero(cand["suppressed_by"] < 0).squeeze(1)
        assert torch.equal(torch.nonzero(kept).squeeze(1), survivors[:15])
        assert len(survivors) > 15 and bool((cand["suppressed_by"] >= 0).any())
        sup = cand["suppressed_by"][cand["suppressed_by"] >= 0]
        assert bool((cand["labels"][sup] == cand["labels"][cand["suppressed_by"] >= 0]).all())

        # Candidates are rows of the raw per-anchor quantities.
        idx = cand["anchor_idx"]
        torch.testing.assert_close(cand["boxes"], res["raw_boxes"][idx])
        assert bool((res["raw_cls"][idx] >= cand["cls_score"]).all())
        assert torch.equal(res["raw_level"][idx], cand["level"])
        num_anchors = res["anchors"].shape[0]
        assert res["raw_boxes"].shape == (num_anchors, 4) and res["raw_cls"].shape == (num_anchors,)
        if name == "retinanet":
            assert bool(res["raw_obj"].isnan().all()) and bool(cand["obj_score"].isnan().all())
            torch.testing.assert_close(cand["score"], cand["cls_score"])
        else:
            e = model.cfg.obj_exponent
            torch.testing.assert_close(cand["obj_score"], res["raw_obj"][idx])
            torch.testing.assert_close(cand["score"], cand["obj_score"] ** e * cand["cls_score"] ** (1 - e))
        # Boxes are in the input image's pixels (the second image was resized ×1.6 inside).
        assert float(res["raw_boxes"][:, 2].max()) <= image.shape[-1] + 1e-4
        assert float(res["raw_boxes"][:, 3].max()) <= image.shape[-2] + 1e-4


@pytest.mark.parametrize("size, obj_levels", [(128, [0]), (256, [0, 1])])
def test_conf_skip_p7_puts_obj_only_on_levels_with_more_than_topk_anchors(size, obj_levels):
    """Original RetinaNet-Conf code: with top-k 1000 and 9 anchors per cell, a 128-px input has only
    P3 above 1000 anchors (16²·9 = 2304; P4 8²·9 = 576), a 256-px input P3 and P4 (9216, 2304; P5 576).
    Those levels rank by obj^0.4·cls^0.6 and keep at most 1000 anchors; the others rank by cls^0.6."""
    torch.manual_seed(0)
    options = {**TINY, "img_size": size, "max_size": size}
    model = _spread_head(build_model("retinanet-conf", 3, conf_skip_p7=True, **options)).eval()
    assert model.score_formula == ("obj^0.4 * cls^0.6 on levels with more than 1000 anchors, cls^0.6 on the "
                                   "others (original code)")
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    result = model.predict_with_candidates([image])[0]
    with torch.no_grad():  # the raw per-class probabilities the selection started from
        _, _, outputs, _, per_level = model._run_network([image])
    assert [level for level, n in enumerate(per_level) if n > 1000] == obj_levels
    cls_all, obj_all = torch.sigmoid(outputs["cls_logits"][0]), torch.sigmoid(outputs["obj_logits"][0])
    cand = result["candidates"]
    start = 0
    for level, n in enumerate(per_level):
        on = cand["level"] == level
        cls, obj = cand["cls_score"][on], cand["obj_score"][on]
        expected = obj**0.4 * cls**0.6 if level in obj_levels else cls**0.6
        torch.testing.assert_close(cand["score"][on], expected)
        anchors = cand["anchor_idx"][on] - start
        if level in obj_levels:  # the 1000 anchors with the best max-over-classes joint score
            best = (obj_all[start:start + n, None] ** 0.4 * cls_all[start:start + n] ** 0.6).max(dim=1).values
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[anchors] = True
            assert int(chosen.sum()) == 1000 and float(best[chosen].min()) >= float(best[~chosen].max())
        else:  # every anchor, every pair with cls^0.6 > 0.05
            pairs = set(zip(anchors.tolist(), cand["labels"][on].tolist()))
            assert pairs == {tuple(p) for p in torch.nonzero(cls_all[start:start + n] ** 0.6 > 0.05).tolist()}
            assert len(pairs) > 0
        start += n


@pytest.mark.parametrize("name, tower, other", [("retinanet-conf", "cls_tower", "reg_tower"), ("iou-aware", "reg_tower", "cls_tower")])
def test_objectness_branch_sits_on_its_tower(name, tower, other):
    torch.manual_seed(0)
    model = build_model(name, 3, **TINY).train()
    images, targets = _images_and_targets()
    loss = model(images, targets)["objectness"]
    grads = torch.autograd.grad(loss, [getattr(model.head, tower)[0][0].weight, getattr(model.head, other)[0][0].weight], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None  # the IoU target is detached: no path into the other tower


def test_config_round_trips_through_json_and_rebuilds_the_same_model():
    torch.manual_seed(0)
    model = _spread_head(build_model("retinanet-conf", 3, head_norm="group", num_head_convs=2, obj_exponent=0.3, **TINY)).eval()
    config = json.loads(json.dumps(model.config))
    assert config["name"] == "retinanet-conf" and config["obj_exponent"] == 0.3 and config["obj_branch"] == "cls"
    assert config["backbone_norm"] == "bn" and config["trainable_layers"] == 5
    rebuilt = model_from_config({**config, "epochs": 12, "category_ids": [1, 2, 3]}).eval()  # extra keys ignored
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    images, _ = _images_and_targets()
    with torch.no_grad():
        a, b = model(images), rebuilt(images)
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])
    assert len(model.head.cls_tower) == 2 and isinstance(model.head.cls_tower[0][1], nn.GroupNorm)


def test_model_from_config_never_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to fetch weights")

    monkeypatch.setattr(torchvision.models, "get_model_weights", refuse)
    config = build_model("retinanet", 3, **TINY).config
    config.update(backbone_norm="frozen_bn", trainable_layers=3)
    # Recorded weight sources are not fetched again: the checkpoint's state dict has the weights.
    for source in ({"pretrained": True}, {"backbone_weights": "/nowhere/weights.pt"}):
        model = model_from_config({**config, **source})
        body = model.backbone.body
        assert isinstance(body.bn1, FrozenBatchNorm2d)
        assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad


def test_pretrained_asks_torchvision_weights_api(monkeypatch):
    asked = {}
    real_get_model = torchvision.models.get_model

    def fake_get_model(name, weights=None, **kwargs):
        asked["weights"] = weights
        return real_get_model(name, weights=None, **kwargs)  # no download in tests

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    model = build_model("retinanet", 3, pretrained=True, **TINY)
    assert asked["weights"] == torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert model.config["trainable_layers"] == 3 and model.config["pretrained"] is True


def test_random_init_backbone_uses_trainable_batchnorm():
    model = build_model("retinanet", 3, **TINY)
    body = model.backbone.body
    assert isinstance(body.bn1, nn.BatchNorm2d) and not isinstance(body.bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in model.parameters())


def test_backbone_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    path = tmp_path / "r18.pt"
    torch.save(reference.state_dict(), path)
    model = build_model("retinanet", 3, backbone_weights=path, **TINY)
    body = model.backbone.body
    assert torch.equal(body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(body.bn1.running_mean, reference.bn1.running_mean)
    assert isinstance(body.bn1, FrozenBatchNorm2d) and model.config["backbone_weights"] == str(path)

    prefixed = tmp_path / "prefixed.pt"
    torch.save({f"backbone.body.{k}": v for k, v in reference.state_dict().items() if not k.startswith("fc.")}, prefixed)
    model = build_model("retinanet", 3, backbone_weights=prefixed, **TINY)
    assert torch.equal(model.backbone.body.conv1.weight, reference.conv1.weight)


def test_backbone_weights_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        build_model("retinanet", 3, backbone_weights=tmp_path / "missing.pt", **TINY)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(InputError, match="garbage.pt: not a readable state dict"):
        build_model("retinanet", 3, backbone_weights=garbage, **TINY)
    r34 = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34().state_dict(), r34)
    with pytest.raises(InputError, match="r34.pt: does not fit the backbone"):
        build_model("retinanet", 3, backbone_weights=r34, **TINY)
    r50 = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), r50)
    with pytest.raises(InputError, match="r50.pt: does not fit the backbone"):
        build_model("retinanet", 3, backbone_weights=r50, **TINY)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("yolo", {}, "model 'yolo': unknown; choose one of retinanet, retinanet-conf, iou-aware"),
        ("retinanet", {"backbone": "vgg16"}, "model option backbone: must be one of"),
        ("retinanet", {"anchors": 3}, "model option anchors: unknown option"),
        ("retinanet", {"score_thresh": 1.5}, "model option score_thresh: must be in [0, 1), got 1.5"),
        ("retinanet-conf", {"obj_exponent": 2.0}, "model option obj_exponent: must be in [0, 1], got 2.0"),
        ("retinanet", {"obj_exponent": 0.4}, "model option obj_exponent: applies only to models with an objectness branch"),
        ("retinanet", {"conf_skip_p7": True}, "model option conf_skip_p7: applies only"),
        ("retinanet", {"loss_norm": "mean"}, "model option loss_norm: must be one of batch, per_image"),
        ("retinanet", {"trainable_layers": 6}, "model option trainable_layers: must be in 0..5"),
        ("retinanet", {"img_size": 512, "max_size": 256}, "model option max_size: must be >= img_size"),
        ("retinanet", {"backbone": "resnet10", "pretrained": True}, "model option pretrained: resnet10 has no"),
        ("retinanet", {"score_thresh": "0.5"}, "model option score_thresh: must be of type float, got '0.5'"),
        ("retinanet", {"anchor_sizes": [32, 64]}, "model option anchor_sizes: must be 5 positive sizes"),
        ("retinanet", {"pretrained": True, "backbone_weights": "w.pt"}, "model option backbone_weights: give either"),
    ],
)
def test_bad_input_is_one_line_input_error(name, options, message):
    kwargs = {**TINY, **options}
    with pytest.raises(InputError) as info:
        build_model(name, 3, **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_model_from_config_rejects_a_config_without_name():
    with pytest.raises(InputError, match="model config"):
        model_from_config({"backbone": "resnet18"})


def test_defaults_and_score_formula():
    model = build_model("retinanet-conf", 80, backbone="resnet10", img_size=64, max_size=64)
    c = model.config
    assert (c["score_thresh"], c["topk"], c["nms_thresh"], c["max_det"]) == (0.05, 1000, 0.5, 100)
    assert (c["fpn_channels"], c["num_head_convs"], c["head_norm"], c["loss_norm"]) == (256, 4, "none", "batch")
    assert (c["obj_exponent"], c["obj_loss"], c["detach_iou_target"], c["conf_skip_p7"]) == (0.4, "ce", True, False)
    assert model.score_formula == "obj^0.4 * cls^0.6" and model.loss_settings.loss_norm == "batch"
    assert build_model("iou-aware", 2, backbone="resnet10", img_size=64, max_size=64).score_formula == "obj^0.5 * cls^0.5"
    # The classifier starts at probability 0.01 for every class.
    bias = model.head.cls_logits.bias
    assert torch.allclose(torch.sigmoid(bias), torch.full_like(bias, 0.01))
    assert math.isclose(float(torch.sigmoid(model.head.obj_logits.bias.detach()[0])), 0.5)
    assert isinstance(model.anchor_generator, AnchorGenerator)


def test_predict_with_candidates_requires_eval_mode():
    model = build_model("retinanet", 3, **TINY).train()
    with pytest.raises(RuntimeError, match="eval"):
        model.predict_with_candidates([torch.rand(3, 64, 64)])


def test_autocast_keeps_anchors_exact_and_losses_float32():
    torch.manual_seed(0)
    model = build_model("retinanet-conf", 3, **TINY)
    images, targets = _images_and_targets()
    model.eval()
    plain = model.predict_with_candidates(images[:1])[0]["anchors"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.predict_with_candidates(images[:1])[0]["anchors"]
        model.train()
        losses = model(images, targets)
    # bf16 has 8 significant bits: anchors built in it would be off by pixels beyond 256 px.
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v)) for v in losses.values())
