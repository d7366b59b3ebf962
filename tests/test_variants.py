"""The method variants: CL-NMS by hand, and every variant trains a step, predicts, fills the ledger and round-trips.

Loss formulas are worked by hand in tests/test_losses.py; here they are checked inside the model.
"""

import json
import math

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

import detector.model as model_module
from detector import MODEL_NAMES, build_model, model_from_config
from detector.postprocess import (
    PostprocessSettings,
    cl_nms_scores,
    cluster_centres,
    find_suppressors,
    nms_clusters,
    postprocess_image,
)
from misalign.errors import InputError

TINY = dict(backbone="resnet10", img_size=64, max_size=96, fpn_channels=16, num_head_convs=1)
NEW_VARIANTS = ("dr-loss", "harmonized", "dc-loss", "iac-assign", "cl-nms")


def _images_and_targets():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[5.0, 6, 40, 50], [30, 10, 75, 60]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[8.0, 10, 50, 60]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def _spread_head(model, seed=0):
    """Varied scores and boxes (at init every score is the prior): random head weights, class bias -1.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.head.named_parameters():
            if name.endswith("weight"):
                param.copy_(torch.randn(param.shape, generator=g) * (0.3 if "tower" in name else 0.05))
        model.head.cls_logits.bias.fill_(-1.5)
    return model


# --- CL-NMS on a hand-made cluster -----------------------------------------------------------

# One class, sorted by score. Boxes 0-2 overlap (IoU 90/110 or 80/120 > 0.5): one NMS cluster headed
# by box 0; box 3 is alone. Centres (5, 5), (6, 5), (7, 5), (35, 35); every half-diagonal sqrt(200) / 2.
CLUSTER_BOXES = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [2, 0, 12, 10], [30, 30, 40, 40]])
CLUSTER_SCORES = torch.tensor([0.9, 0.85, 0.8, 0.6])
# Formula 6 with T = 1: weights e^0.9, e^0.85, e^0.8 = 2.459603, 2.339647, 2.225541 (sum 7.024791);
# centre x = (5 * 2.459603 + 6 * 2.339647 + 7 * 2.225541) / 7.024791 = 41.914684 / 7.024791 = 5.966681.
CENTRE_X = 5.966681
# Formula 7, dis = 1 - d / 7.071068:
#   box 0: d 0.966681 -> 0.863291, s = 1.763291     box 1: d 0.033319 -> 0.995288, s = 1.845288
#   box 2: d 1.033319 -> 0.853867, s = 1.653867     box 3: alone, d 0 -> 1,        s = 1.6
CL_SCORES = [1.763291, 1.845288, 1.653867, 1.6]


def test_cl_nms_cluster_centre_and_scores_by_hand():
    labels = torch.zeros(4, dtype=torch.int64)
    cluster = nms_clusters(CLUSTER_BOXES, CLUSTER_SCORES, labels, 0.5)
    assert cluster.tolist() == [0, 0, 0, 3]
    centres = cluster_centres(CLUSTER_BOXES, CLUSTER_SCORES, cluster)
    torch.testing.assert_close(centres, torch.tensor([[CENTRE_X, 5.0]] * 3 + [[35.0, 35.0]]))
    scores = cl_nms_scores(CLUSTER_BOXES, CLUSTER_SCORES, labels, PostprocessSettings(cl_nms=True))
    torch.testing.assert_close(scores, torch.tensor(CL_SCORES))
    # β scales the closeness term; a tiny temperature puts the centre on the top box (5, 5).
    half = cl_nms_scores(CLUSTER_BOXES, CLUSTER_SCORES, labels, PostprocessSettings(cl_nms=True, cl_nms_weight=0.5))
    torch.testing.assert_close(half, CLUSTER_SCORES + 0.5 * (torch.tensor(CL_SCORES) - CLUSTER_SCORES))
    sharp = cluster_centres(CLUSTER_BOXES, CLUSTER_SCORES, cluster, temperature=1e-3)
    torch.testing.assert_close(sharp[1], torch.tensor([5.0, 5.0]))
    # A box of another class is its own cluster even where it overlaps.
    other = nms_clusters(CLUSTER_BOXES, CLUSTER_SCORES, torch.tensor([0, 1, 0, 0]), 0.5)
    assert other.tolist() == [0, 1, 0, 3]


def test_cl_nms_changes_the_survivor_and_the_ledger_follows():
    logits = CLUSTER_SCORES.logit()[:, None]  # [4 anchors, 1 class]; zero deltas: boxes are the anchors
    deltas = torch.zeros(4, 4)
    coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    plain = postprocess_image(logits, deltas, None, CLUSTER_BOXES, [4], (100, 100), coder, PostprocessSettings())
    assert plain["anchor_idx"][plain["kept"]].tolist() == [0, 3]  # greedy NMS keeps the top box
    settings = PostprocessSettings(cl_nms=True)
    cand = postprocess_image(logits, deltas, None, CLUSTER_BOXES, [4], (100, 100), coder, settings)
    # The CL-NMS score only chooses: candidates stay in the detector's score order with its own scores.
    assert cand["anchor_idx"].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(cand["score"], CLUSTER_SCORES)
    torch.testing.assert_close(cand["cl_nms_score"], torch.tensor(CL_SCORES))
    # Box 1 (s 1.845), nearest the weighted centre, survives; boxes 0 and 2 (IoU 90/110 with it) are
    # suppressed by it. The isolated box 3 got the full +1 (s 1.6) but keeps its 0.6 and ranks below box 1.
    assert cand["kept"].tolist() == [False, True, False, True]
    torch.testing.assert_close(cand["score"][cand["kept"]], torch.tensor([0.85, 0.6]))
    survivors = cand["survivors"][torch.sort(cand["cl_nms_score"][cand["survivors"]], descending=True).indices]
    suppressed_by = find_suppressors(cand["boxes"], cand["cl_nms_score"], cand["labels"], survivors, 0.5)
    assert suppressed_by.tolist() == [1, -1, 1, -1]
    assert torch.isnan(plain["cl_nms_score"]).all()  # no CL-NMS: NaN


def test_cl_nms_handles_no_candidates():
    settings = PostprocessSettings(cl_nms=True)
    empty = cl_nms_scores(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), settings)
    assert empty.shape == (0,)


# --- every variant in the model --------------------------------------------------------------


def test_every_method_is_a_model_name():
    assert set(NEW_VARIANTS) <= set(MODEL_NAMES)
    assert MODEL_NAMES[:3] == ("retinanet", "retinanet-conf", "iou-aware")


def _check_ledger(model, images):
    """predict_with_candidates = eval output + candidates whose kept/suppressed_by follow greedy NMS on the
    NMS's ranking (`score`, or `cl_nms_score` under CL-NMS)."""
    with torch.no_grad():
        detections = model(images)
    results = model.predict_with_candidates(images)
    thresh = model.cfg.nms_thresh
    for det, res in zip(detections, results):
        cand = res["candidates"]
        kept = cand["kept"]
        for key, col in (("boxes", "boxes"), ("scores", "score"), ("labels", "labels"), ("cls_scores", "cls_score")):
            assert torch.equal(det[key], res[key]) and torch.equal(cand[col][kept], det[key])
        assert len(det["boxes"]) > 0
        assert bool((cand["score"][:-1] >= cand["score"][1:]).all())
        survivors = torch.nonzero(cand["suppressed_by"] < 0).squeeze(1)
        assert torch.equal(torch.nonzero(kept).squeeze(1), survivors[: model.cfg.max_det])
        losers = torch.nonzero(cand["suppressed_by"] >= 0).squeeze(1)
        assert len(losers) > 0
        sup = cand["suppressed_by"][losers]
        assert bool((cand["labels"][sup] == cand["labels"][losers]).all())
        nms_rank = cand["cl_nms_score"] if model.cfg.cl_nms else cand["score"]  # what NMS ranked by
        assert bool((nms_rank[sup] >= nms_rank[losers]).all())
        iou = box_iou(cand["boxes"][losers], cand["boxes"][sup]).diagonal()
        assert bool((iou > thresh - 1e-6).all())
        # No two survivors of one class overlap by more than nms_thresh.
        for label in cand["labels"][survivors].unique():
            boxes = cand["boxes"][survivors[cand["labels"][survivors] == label]]
            overlap = box_iou(boxes, boxes).nan_to_num(0.0)  # NaN between two empty boxes: NMS keeps both
            assert bool((overlap.triu(diagonal=1) <= thresh + 1e-6).all())
    return results


@pytest.mark.parametrize("name", NEW_VARIANTS)
def test_variant_trains_a_step_predicts_and_round_trips(name):
    torch.manual_seed(0)
    model = build_model(name, 3, topk=60, max_det=20, **TINY).train()
    images, targets = _images_and_targets()
    losses = model(images, targets)
    expected_keys = {"classification", "bbox_regression"} | ({"objectness"} if name == "harmonized" else set())
    assert set(losses) == expected_keys
    assert all(bool(torch.isfinite(v)) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert float(model.head.cls_logits.weight.grad.abs().sum()) > 0

    _spread_head(model).eval()
    results = _check_ledger(model, images)
    if name == "cl-nms":
        cand = results[0]["candidates"]
        # The CL-NMS score is the class probability plus a closeness term in [0, β = 1]; `score` stays cls.
        extra = cand["cl_nms_score"] - cand["cls_score"]
        assert bool((extra >= -1e-6).all()) and bool((extra <= 1 + 1e-6).all()) and float(extra.max()) > 0.5
        assert torch.equal(cand["score"], cand["cls_score"])
    if name == "harmonized":
        cand = results[0]["candidates"]
        torch.testing.assert_close(cand["score"], (cand["obj_score"] * cand["cls_score"]).sqrt())

    config = json.loads(json.dumps(model.config))
    rebuilt = model_from_config(config).eval()
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        for a, b in zip(model(images), rebuilt(images)):
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_variant_defaults():
    c = {name: build_model(name, 3, **TINY).config for name in NEW_VARIANTS}
    dr = c["dr-loss"]
    assert (dr["cls_loss"], dr["dr_reduction"], dr["prior_prob"], dr["fg_iou_thresh"], dr["bg_iou_thresh"]) == ("dr", "image", 0.5, 0.5, 0.5)
    h = c["harmonized"]
    assert (h["cls_loss"], h["box_weight_by_cls"], h["obj_branch"], h["obj_exponent"]) == ("quality_focal", True, "reg", 0.5)
    assert c["dc-loss"]["dc_loss"] and c["dc-loss"]["dc_center_norm"] == "gt_wh"
    assert c["iac-assign"]["iac_assign"] and (c["iac-assign"]["iac_alpha"], c["iac-assign"]["iac_score_thresh"]) == (0.5, 0.75)
    assert c["cl-nms"]["cl_nms"] and (c["cl-nms"]["cl_nms_weight"], c["cl-nms"]["cl_nms_temperature"]) == (1.0, 1.0)
    for name in NEW_VARIANTS:  # each turns on its own switch only
        switches = {k for k in ("dc_loss", "iac_assign", "cl_nms", "box_weight_by_cls") if c[name][k]}
        assert len(switches) <= 1 and c[name]["cls_loss"] in ("focal", "dr", "quality_focal")
    retinanet = build_model("retinanet", 3, **TINY).config
    assert (retinanet["cls_loss"], retinanet["dc_loss"], retinanet["iac_assign"], retinanet["cl_nms"]) == ("focal", False, False, False)


def test_dr_loss_starts_near_2_03_with_prior_one_half():
    # Prior 0.5 puts every class probability at about 0.5. With all p equal, both softmax
    # distributions are uniform, Σq⁻p⁻ = Σq⁺p⁺ = 0.5, and the loss is (τ/L)·log(1 + exp(L·0.5))
    # = (4/6)·log(1 + e^3) = 2.0324. The initial head's small random weights move p by ~1e-3.
    torch.manual_seed(0)
    model = build_model("dr-loss", 3, **TINY).train()
    images, targets = _images_and_targets()
    exact = (4 / 6) * math.log1p(math.exp(3.0))
    assert model(images, targets)["classification"].item() == pytest.approx(exact, abs=0.05)
    with torch.no_grad():
        model.head.cls_logits.weight.zero_()  # logits = bias = logit(0.5) = 0 exactly
    assert model(images, targets)["classification"].item() == pytest.approx(exact, abs=1e-5)
    batch = build_model("dr-loss", 3, dr_reduction="batch", **TINY).train()
    batch.load_state_dict(model.state_dict())
    assert batch(images, targets)["classification"].item() == pytest.approx(exact, abs=1e-5)


def test_dc_paper_ablation_switches_combine_on_retinanet(monkeypatch):
    # The DC paper's Table 2 rows: IAC; IAC + DC; IAC + DC + CL-NMS, as options of one model.
    seen = []
    real_assign = model_module.assign_anchors

    def spy(*args, **kwargs):
        seen.append(kwargs.get("iac"))
        return real_assign(*args, **kwargs)

    monkeypatch.setattr(model_module, "assign_anchors", spy)
    images, targets = _images_and_targets()
    for options in ({"iac_assign": True}, {"iac_assign": True, "dc_loss": True},
                    {"iac_assign": True, "dc_loss": True, "cl_nms": True}):
        torch.manual_seed(0)
        model = build_model("retinanet", 3, **TINY, **options)
        assert model.loss_settings.dc_loss == options.get("dc_loss", False)
        assert model.postprocess_settings.cl_nms == options.get("cl_nms", False)
        losses = model.train()(images, targets)
        assert all(bool(torch.isfinite(v)) for v in losses.values())
        assert seen[-1] is not None and seen[-1].alpha == 0.5
    assert "CL-NMS" in model.score_formula


def test_iac_assignment_in_the_model_uses_the_classifier():
    # alpha 1: s = p, so with prior 0.9 every anchor scores 0.9 >= 0.8 and becomes a positive.
    seen = {}
    images, targets = _images_and_targets()
    for iac in (False, True):
        torch.manual_seed(0)
        options = {"iac_assign": True, "iac_alpha": 1.0, "iac_score_thresh": 0.8} if iac else {}
        model = build_model("retinanet", 3, prior_prob=0.9, **TINY, **options).train()
        _, resized, outputs, anchors, _ = model._run_network(images, targets)
        cls_prob = torch.sigmoid(outputs["cls_logits"].detach()) if iac else None
        a = model_module.assign_anchors(anchors, resized, model.matcher, cls_prob=cls_prob, iac=model.iac_settings)
        seen[iac] = a.num_pos_per_image
    assert bool((seen[False] < seen[True]).all())
    assert bool((seen[True] == anchors.shape[0]).all())


@pytest.mark.parametrize("obj_loss, extra", [("ce_w", {"obj_neg_weight": 1e-3}), ("l1", {}), ("smooth_l1", {"obj_smooth_l1_beta": 0.1}),
                                              ("l2", {}), ("gfocal", {"obj_gfocal_gamma": 1.5})])
def test_objectness_options_train_a_step(obj_loss, extra):
    torch.manual_seed(0)
    model = build_model("retinanet-conf", 3, obj_loss=obj_loss, **extra, **TINY).train()
    images, targets = _images_and_targets()
    losses = model(images, targets)
    assert bool(torch.isfinite(losses["objectness"])) and losses["objectness"].item() > 0
    losses["objectness"].backward()
    assert float(model.head.obj_logits.weight.grad.abs().sum()) > 0
    assert model_from_config(json.loads(json.dumps(model.config))).config == model.config


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("retinanet-conf", {"obj_loss": "huber"}, "model option obj_loss: must be one of ce, ce_w, l1, smooth_l1, l2, gfocal, got 'huber'"),
        ("retinanet-conf", {"obj_neg_weight": 0.01}, "model option obj_neg_weight: applies only with obj_loss=ce_w"),
        ("retinanet-conf", {"obj_loss": "ce_w", "obj_neg_weight": -1.0}, "model option obj_neg_weight: must be >= 0"),
        ("retinanet-conf", {"obj_loss": "smooth_l1", "obj_smooth_l1_beta": 0.0}, "model option obj_smooth_l1_beta: must be > 0"),
        ("retinanet-conf", {"obj_gfocal_gamma": 1.0}, "model option obj_gfocal_gamma: applies only with obj_loss=gfocal"),
        ("retinanet", {"obj_loss": "l1"}, "model option obj_loss: applies only to models with an objectness branch"),
        ("retinanet", {"cls_loss": "hinge"}, "model option cls_loss: must be one of focal, dr, quality_focal"),
        ("retinanet", {"dr_reduction": "batch"}, "model option dr_reduction: applies only with cls_loss=dr"),
        ("dr-loss", {"dr_reduction": "sum"}, "model option dr_reduction: must be one of image, batch"),
        ("dr-loss", {"dc_loss": True}, "model option dc_loss: needs a per-anchor classification loss"),
        ("retinanet", {"dc_center_norm": "none"}, "model option dc_center_norm: applies only with dc_loss=true"),
        ("dc-loss", {"dc_center_norm": "box"}, "model option dc_center_norm: must be one of gt_wh, gt_diag, none"),
        ("iac-assign", {"iac_alpha": 1.5}, "model option iac_alpha: must be in [0, 1], got 1.5"),
        ("retinanet", {"iac_score_thresh": 0.5}, "model option iac_score_thresh: applies only with iac_assign=true"),
        ("cl-nms", {"cl_nms_temperature": 0.0}, "model option cl_nms_temperature: must be > 0"),
        ("retinanet", {"cl_nms_weight": 2.0}, "model option cl_nms_weight: applies only with cl_nms=true"),
        ("retinanet", {"cl_nms": "yes"}, "model option cl_nms: must be of type bool, got 'yes'"),
    ],
)
def test_bad_variant_options_are_one_line_input_errors(name, options, message):
    with pytest.raises(InputError) as info:
        build_model(name, 3, **TINY, **options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_cl_nms_dump_is_a_valid_ledger(shapes_dataset, tmp_path):
    from detector.checkpoint import save_checkpoint
    from detector.dump import DumpConfig, dump
    from misalign.ledger import read_ledger, validate_ledger

    categories = json.loads((shapes_dataset / "annotations/instances_val.json").read_text())["categories"]
    category_ids = sorted(c["id"] for c in categories)
    torch.manual_seed(0)
    # prior 0.2: many pairs above score_thresh, so NMS has clusters to work on
    model = build_model("cl-nms", len(category_ids), **{**TINY, "img_size": 96, "max_size": 96}, prior_prob=0.2, topk=50, max_det=20)
    ckpt = tmp_path / "cl.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": {**model.config, "category_ids": category_ids},
                           "epoch": 1, "step": 1})
    out = tmp_path / "ledger"
    dump(DumpConfig(ckpt=str(ckpt), out=str(out), data=str(shapes_dataset), split="val", workers=0, batch_size=2, limit=2))
    validate_ledger(out)  # suppressed_by names a same-image, same-class survivor
    cand = read_ledger(out).candidates
    assert cand["kept"].any() and (cand["suppressed_by"] >= 0).any()
    assert (cand["cl_nms_score"] >= cand["score"]).all() and (cand["cl_nms_score"] > 1).any()  # s = cls + closeness
    assert (cand["score"] == cand["cls_score"]).all()  # detections and ledger keep the detector's score
    meta = json.loads((out / "meta.json").read_text())
    assert "CL-NMS" in meta["postprocess"]["score_formula"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_variant_trains_an_epoch_and_dumps_a_valid_ledger(name, shapes_dataset, tmp_path):
    """The zoo's path for each name: `train` one epoch on shapes, `dump` the checkpoint, check the ledger."""
    from detector.dump import DumpConfig, dump
    from detector.train import TrainConfig, train
    from misalign.ledger import read_ledger, validate_ledger

    options = {"fpn_channels": 16, "num_head_convs": 1, "prior_prob": 0.2}  # prior 0.2: boxes above score_thresh
    # The paper recipe's plain heads: the CPU recipe's GroupNorm needs more than 16 channels on 64-px images.
    run = train(TrainConfig(recipe="paper", model=name, data=str(shapes_dataset), out=str(tmp_path / "run"), epochs=1,
                            batch_size=4, workers=0, device="cpu", seed=0, val_split=None, backbone="resnet10",
                            img_size=64, max_size=64, model_options=options))
    out = tmp_path / "ledger"
    dump(DumpConfig(ckpt=str(run / "checkpoint.pt"), out=str(out), data=str(shapes_dataset), split="val", workers=0,
                    batch_size=2, limit=3))
    validate_ledger(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["detector"]["config"]["name"] == name
    expected = {**model_module.VARIANTS[name], **options}  # options given override the variant's defaults
    assert {key: meta["detector"]["config"][key] for key in expected} == expected
    cand = read_ledger(out).candidates
    assert cand["image_id"].nunique() == 3 and cand["kept"].any()
    has_branch = model_module.VARIANTS[name]["obj_branch"] != "none"
    assert cand["obj_score"].notna().all() if has_branch else cand["obj_score"].isna().all()
