"""The bundled detector: RetinaNet and the method variants (docs/methods.md) as one configurable module.

    from detector import build_model
    model = build_model("retinanet-conf", num_classes=80, backbone="resnet50", img_size=512, max_size=512)
    losses = model(images, targets)      # train mode: dict of scalar losses
    detections = model.eval()(images)    # eval mode: one dict per image

Built from torchvision's detection components (ResNet + FPN with P6/P7, AnchorGenerator, BoxCoder,
Matcher, GeneralizedRCNNTransform); the heads (`detector.heads`), the batched losses
(`detector.losses`) and the postprocess that also feeds the ledger (`detector.postprocess`) are ours.
Variants differ only by options (`VARIANTS`): an objectness branch (retinanet-conf, iou-aware,
harmonized), the classification loss (dr-loss, harmonized), the DC paper's switches (dc-loss,
iac-assign, cl-nms, combinable on any model). `Detector.config` rebuilds any of them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import os
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from misalign.errors import InputError

from .heads import HEAD_NORMS, RetinaHead
from .losses import (
    CLS_LOSSES,
    DC_CENTER_NORMS,
    DR_REDUCTIONS,
    LOSS_NORMS,
    OBJ_LOSSES,
    IacSettings,
    LossSettings,
    assign_anchors,
    detection_losses,
    positive_alignment,
)
from .postprocess import PostprocessSettings, find_suppressors, postprocess_image

log = logging.getLogger(__name__)

# The variants: the options that make each name what it is. Everything else is shared.
VARIANTS: dict[str, dict[str, Any]] = {
    "retinanet": {"obj_branch": "none"},
    # Object confidence on the classification tower; score obj^0.4 · cls^0.6 (paper's α = 0.4).
    "retinanet-conf": {"obj_branch": "cls", "obj_exponent": 0.4},
    # IoU prediction on the regression tower; its paper's cls^α · IoU^(1−α), α = 0.5, is IoU^0.5 · cls^0.5.
    "iou-aware": {"obj_branch": "reg", "obj_exponent": 0.5},
    # DR loss instead of focal loss; its public config: prior 0.5, fg = bg = 0.5 (no ignored anchors).
    "dr-loss": {"obj_branch": "none", "cls_loss": "dr", "prior_prob": 0.5, "fg_iou_thresh": 0.5, "bg_iou_thresh": 0.5},
    # Our reading of mutual labelling + IoU rescoring (docs/methods.md): soft IoU class targets, box loss
    # weighted by the class probability, IoU branch on the regression tower. obj^0.5 · cls^0.5 ranks
    # exactly as cls · IoU^β with β = 1 (obj_exponent = β / (1 + β)).
    "harmonized": {"obj_branch": "reg", "obj_exponent": 0.5, "cls_loss": "quality_focal", "box_weight_by_cls": True},
    # The DC paper's three components, one switch each (combine them with -o to re-run its Table 2).
    "dc-loss": {"obj_branch": "none", "dc_loss": True},
    "iac-assign": {"obj_branch": "none", "iac_assign": True},
    "cl-nms": {"obj_branch": "none", "cl_nms": True},
}
MODEL_NAMES = tuple(VARIANTS)
# resnet10 ([1, 1, 1, 1] basic blocks, no pretrained weights) is the CPU-friendly choice.
BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101")
BACKBONE_NORMS = ("frozen_bn", "bn")
IMAGE_MEAN = [0.485, 0.456, 0.406]  # ImageNet statistics, as torchvision's detectors normalise
IMAGE_STD = [0.229, 0.224, 0.225]
_BRANCH_OPTIONS = ("obj_exponent", "obj_loss", "obj_loss_weight", "detach_iou_target", "conf_skip_p7",
                   "obj_neg_weight", "obj_gfocal_gamma", "obj_smooth_l1_beta")
# Options that mean something only when another option has a given value: (option, switch, value).
_DEPENDENT_OPTIONS = (
    ("obj_neg_weight", "obj_loss", "ce_w"),
    ("obj_gfocal_gamma", "obj_loss", "gfocal"),
    ("obj_smooth_l1_beta", "obj_loss", "smooth_l1"),
    ("dr_reduction", "cls_loss", "dr"),
    ("dc_center_norm", "dc_loss", True),
    ("iac_alpha", "iac_assign", True),
    ("iac_score_thresh", "iac_assign", True),
    ("cl_nms_weight", "cl_nms", True),
    ("cl_nms_temperature", "cl_nms", True),
)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a detector. `Detector.config` is this, as a plain dict."""

    name: str  # one of MODEL_NAMES
    num_classes: int  # foreground classes; labels are contiguous 0..num_classes-1
    backbone: str = "resnet50"  # one of BACKBONES
    img_size: int = 800  # images are resized so that the shorter side is img_size ...
    max_size: int = 1333  # ... and the longer side at most max_size (GeneralizedRCNNTransform)
    pretrained: bool = False  # ImageNet weights from torchvision's weights API (downloads); recorded only
    backbone_weights: str | None = None  # local state dict for the backbone body; recorded only
    backbone_norm: str | None = None  # "frozen_bn" | "bn"; None: frozen_bn with weights, bn without
    trainable_layers: int | None = None  # trainable ResNet stages 0..5; None: 3 with weights, 5 without
    fpn_channels: int = 256  # channels of every FPN level and of the heads
    num_head_convs: int = 4  # 3×3 convs per tower
    head_norm: str = "none"  # "none" (RetinaNet v1) | "group" (GroupNorm in the towers)
    anchor_sizes: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128, 256, 512])  # P3..P7
    anchor_placement: str = "stride"  # "stride": centres at 8..128 px steps; "torchvision": its AnchorGenerator's
    prior_prob: float = 0.01  # initial class probability (classifier bias)
    fg_iou_thresh: float = 0.5  # anchors with IoU >= this to a gt box are positives
    bg_iou_thresh: float = 0.4  # anchors with max IoU < this are negatives; between: ignored
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_norm: str = "batch"  # "batch" (MMDetection) | "per_image" (torchvision)
    obj_branch: str = "none"  # set by the variant: "none" | "cls" | "reg"
    obj_exponent: float | None = None  # e in score = obj^e · cls^(1−e); variant default
    obj_loss: str = "ce"  # objectness loss (OBJ_LOSSES): ce | ce_w | l1 | smooth_l1 | l2 | gfocal
    obj_loss_weight: float = 1.0
    obj_neg_weight: float = 1e-4  # obj_loss ce_w: weight of the negative anchors' BCE (target 0)
    obj_gfocal_gamma: float = 2.0  # obj_loss gfocal: γ in |y − p|^γ · BCE(p, y)
    obj_smooth_l1_beta: float = 1.0  # obj_loss smooth_l1: quadratic below beta (MMDetection's default)
    detach_iou_target: bool = True  # no gradient through the IoU target (original code: False)
    conf_skip_p7: bool = False  # original RetinaNet-Conf code: obj factor only on levels with > topk anchors
    cls_loss: str = "focal"  # classification loss (CLS_LOSSES): focal | dr | quality_focal
    dr_reduction: str = "image"  # cls_loss dr: "image" (paper, mean of per-image losses) | "batch" (public code)
    box_weight_by_cls: bool = False  # box loss of a positive × its detached class probability / mean (harmonized)
    dc_loss: bool = False  # DC loss (formulas 1–3): positives' cls loss × normalised 1 / localisation error
    dc_center_norm: str = "gt_wh"  # dc_loss: centre offset / gt (w, h) | / gt diagonal (gt_diag) | pixels (none)
    iac_assign: bool = False  # IoU-classification-aware assignment (formulas 4–5)
    iac_alpha: float = 0.5  # iac_assign: s = α · p + (1 − α) · intersection / min area
    iac_score_thresh: float = 0.75  # iac_assign: anchors with s >= this are positives too
    score_thresh: float = 0.05
    topk: int = 1000  # candidates per FPN level entering NMS
    nms_thresh: float = 0.5
    cl_nms: bool = False  # CL-balanced NMS (formulas 6–7): NMS ranks by score + centre-closeness term
    cl_nms_weight: float = 1.0  # cl_nms: β, the closeness term's value for a box centred on its cluster's centre
    cl_nms_temperature: float = 1.0  # cl_nms: T in the cluster's softmax(score / T) centre weights
    max_det: int = 100


def _option_error(name: str, problem: str) -> InputError:
    return InputError(f"model option {name}: {problem}")


def _check_range(cfg: ModelConfig) -> None:
    """Raise InputError naming the first option that is out of range."""
    checks = [
        ("num_classes", cfg.num_classes >= 1, "must be >= 1"),
        ("img_size", cfg.img_size >= 32, "must be >= 32"),
        ("max_size", cfg.max_size >= cfg.img_size, "must be >= img_size"),
        ("fpn_channels", cfg.fpn_channels >= 1, "must be >= 1"),
        ("num_head_convs", cfg.num_head_convs >= 0, "must be >= 0"),
        ("trainable_layers", 0 <= cfg.trainable_layers <= 5, "must be in 0..5"),
        ("anchor_sizes", len(cfg.anchor_sizes) == 5 and min(cfg.anchor_sizes, default=0) > 0,
         "must be 5 positive sizes (P3..P7)"),
        ("anchor_placement", cfg.anchor_placement in ANCHOR_PLACEMENTS, f"must be one of {', '.join(ANCHOR_PLACEMENTS)}"),
        ("prior_prob", 0 < cfg.prior_prob < 1, "must be in (0, 1)"),
        ("bg_iou_thresh", 0 <= cfg.bg_iou_thresh <= cfg.fg_iou_thresh <= 1,
         "need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1"),
        ("focal_alpha", 0 <= cfg.focal_alpha <= 1, "must be in [0, 1]"),
        ("focal_gamma", cfg.focal_gamma >= 0, "must be >= 0"),
        ("obj_loss_weight", cfg.obj_loss_weight >= 0, "must be >= 0"),
        ("obj_neg_weight", cfg.obj_neg_weight >= 0, "must be >= 0"),
        ("obj_gfocal_gamma", cfg.obj_gfocal_gamma >= 0, "must be >= 0"),
        ("obj_smooth_l1_beta", cfg.obj_smooth_l1_beta > 0, "must be > 0"),
        ("iac_alpha", 0 <= cfg.iac_alpha <= 1, "must be in [0, 1]"),
        ("iac_score_thresh", 0 <= cfg.iac_score_thresh <= 1, "must be in [0, 1]"),
        ("cl_nms_weight", cfg.cl_nms_weight >= 0, "must be >= 0"),
        ("cl_nms_temperature", cfg.cl_nms_temperature > 0, "must be > 0"),
        ("score_thresh", 0 <= cfg.score_thresh < 1, "must be in [0, 1)"),
        ("topk", cfg.topk >= 1, "must be >= 1"),
        ("nms_thresh", 0 < cfg.nms_thresh <= 1, "must be in (0, 1]"),
        ("max_det", cfg.max_det >= 1, "must be >= 1"),
    ]
    if cfg.obj_exponent is not None:
        checks.append(("obj_exponent", 0 <= cfg.obj_exponent <= 1, "must be in [0, 1]"))
    for name, ok, problem in checks:
        if not ok:
            raise _option_error(name, f"{problem}, got {getattr(cfg, name)!r}")


def _check_types(cfg: ModelConfig) -> None:
    """Raise InputError for an option of the wrong type (e.g. a string where a number belongs)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = str(f.type).split(" | ")[0]  # annotations are strings: "int", "float | None", ...
        if value is None and "None" in str(f.type):
            continue
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "list[int]": isinstance(value, (list, tuple))
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        }[kind]
        if not ok:
            raise _option_error(f.name, f"must be of type {kind}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise _option_error(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_dependent(cfg: ModelConfig) -> None:
    """Raise InputError for an option changed from its default while the option it refines is off."""
    defaults = ModelConfig(cfg.name, 1)
    for option, switch, value in _DEPENDENT_OPTIONS:
        if getattr(cfg, option) != getattr(defaults, option) and getattr(cfg, switch) != value:
            needs = f"{switch}=true" if value is True else f"{switch}={value}"
            raise _option_error(option, f"applies only with {needs}")
    if cfg.dc_loss and cfg.cls_loss == "dr":
        raise _option_error("dc_loss", "needs a per-anchor classification loss (focal or quality_focal), not dr")


def resolve_config(name: str, num_classes: int, **options: Any) -> ModelConfig:
    """Validate a model name and options and fill in variant and weight-dependent defaults.

    Options left as None take their defaults. Raises InputError (one line) for an unknown name,
    backbone or option, a value out of range, or a branch option given to a model without a branch.
    """
    if name not in VARIANTS:
        raise InputError(f"model {name!r}: unknown; choose one of {', '.join(MODEL_NAMES)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "num_classes", "obj_branch"}
    for key in options:
        if key not in known:
            raise InputError(f"model option {key}: unknown option")
    options = {k: v for k, v in options.items() if v is not None}
    variant = VARIANTS[name]
    if variant["obj_branch"] == "none":
        defaults = ModelConfig(name, 1)
        for key in _BRANCH_OPTIONS:
            if key in options and options[key] != getattr(defaults, key):
                raise _option_error(key, f"applies only to models with an objectness branch, not {name}")
    try:
        num_classes = operator.index(num_classes)
    except TypeError:
        raise _option_error("num_classes", f"must be an integer, got {num_classes!r}") from None
    cfg = ModelConfig(name=name, num_classes=num_classes, **{**variant, **options})
    _check_types(cfg)
    cfg.anchor_sizes = list(cfg.anchor_sizes)
    _check_choice("backbone", cfg.backbone, BACKBONES)
    if cfg.pretrained and cfg.backbone_weights:
        raise _option_error("backbone_weights", "give either pretrained or backbone_weights, not both")
    has_weights = bool(cfg.pretrained or cfg.backbone_weights)
    if cfg.backbone_norm is None:
        # FrozenBatchNorm2d keeps pretrained statistics; at random init it would freeze nothing useful.
        cfg.backbone_norm = "frozen_bn" if has_weights else "bn"
    if cfg.trainable_layers is None:
        cfg.trainable_layers = 3 if has_weights else 5
    _check_choice("backbone_norm", cfg.backbone_norm, BACKBONE_NORMS)
    _check_choice("head_norm", cfg.head_norm, HEAD_NORMS)
    _check_choice("loss_norm", cfg.loss_norm, LOSS_NORMS)
    _check_choice("obj_loss", cfg.obj_loss, OBJ_LOSSES)
    _check_choice("cls_loss", cfg.cls_loss, CLS_LOSSES)
    _check_choice("dr_reduction", cfg.dr_reduction, DR_REDUCTIONS)
    _check_choice("dc_center_norm", cfg.dc_center_norm, DC_CENTER_NORMS)
    if cfg.pretrained and cfg.backbone == "resnet10":
        raise _option_error("pretrained", "resnet10 has no pretrained weights")
    _check_range(cfg)
    _check_dependent(cfg)
    return cfg


# --- backbone ----------------------------------------------------------------------------------


def _resnet_body(cfg: ModelConfig, download: bool) -> ResNet:
    """The ResNet trunk, with ImageNet weights when asked (and allowed to download)."""
    norm_layer = FrozenBatchNorm2d if cfg.backbone_norm == "frozen_bn" else nn.BatchNorm2d
    if cfg.backbone == "resnet10":
        return ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)
    weights = None
    if cfg.pretrained and download:
        weights = torchvision.models.get_model_weights(cfg.backbone).DEFAULT
        log.info("loading %s weights %s (downloads once into the torch hub cache)", cfg.backbone, weights)
    return torchvision.models.get_model(cfg.backbone, weights=weights, norm_layer=norm_layer)


def load_backbone_weights(body: ResNet, path: str | os.PathLike) -> None:
    """Load a local ResNet state dict into `body`.

    `fc.*` entries may be there (ignored), and one `module.`, `backbone.body.` or `body.` prefix.
    InputError (naming the file) if it is missing, unreadable or does not fit.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise InputError(f"{path}: not a readable state dict ({type(err).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    for prefix in ("module.", "backbone.body.", "body."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise InputError(f"{path}: does not fit the backbone ({first})") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        keys = (missing or unexpected)[:3]
        what = "missing" if missing else "unexpected"
        count = len(missing or unexpected)
        raise InputError(f"{path}: does not fit the backbone ({count} {what} keys, e.g. {', '.join(keys)})")


def build_backbone(cfg: ModelConfig, download: bool = True) -> BackboneWithFPN:
    """ResNet C3–C5 -> FPN P3–P5, plus P6–P7 from P5 (torchvision's RetinaNet v1 layout)."""
    body = _resnet_body(cfg, download)
    if cfg.backbone_weights and download:
        load_backbone_weights(body, cfg.backbone_weights)
    # Freeze all but the last `trainable_layers` stages, as torchvision's _resnet_fpn_extractor does.
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_layers]
    if cfg.trainable_layers == 5:
        layers_to_train.append("bn1")
    for param_name, param in body.named_parameters():
        if not any(param_name.startswith(layer) for layer in layers_to_train):
            param.requires_grad_(False)
    c2_channels = body.inplanes // 8  # channels out of layer1
    return BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[c2_channels * 2, c2_channels * 4, c2_channels * 8],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels),
    )


ANCHOR_PLACEMENTS = ("stride", "torchvision")
LEVEL_STRIDES = (8, 16, 32, 64, 128)  # P3..P7: pixels of the network input per feature-map cell


class StrideAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with every level's anchors placed at the level's own stride.

    torchvision takes a level's stride as (padded image size) // (grid size), which is right for
    P3-P5 (the padded size is a multiple of 32) but not for P6/P7, whose grids are rounded up by
    their stride-2 convolutions: at 160 px, P6's 3 cells get stride 53 instead of 64. Here cell
    (i, j) of level l is centred at (j, i) · LEVEL_STRIDES[l], where the feature really looks (as
    MMDetection's AnchorGenerator places them). Cell anchors and ordering are torchvision's.
    """

    def __init__(self, sizes, aspect_ratios, strides=LEVEL_STRIDES):
        super().__init__(sizes, aspect_ratios)
        if len(strides) != len(sizes):
            raise ValueError(f"{len(sizes)} levels of anchor sizes but {len(strides)} strides")
        self.level_strides = tuple(int(s) for s in strides)

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [feature_map.shape[-2:] for feature_map in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.level_strides]
        self.set_cell_anchors(dtype, device)
        anchors_per_image = torch.cat(self.grid_anchors(grid_sizes, strides))  # [A, 4]
        return [anchors_per_image for _ in range(len(image_list.image_sizes))]


def make_anchor_generator(base_sizes: list[int], placement: str = "stride") -> AnchorGenerator:
    """3 scales (× 2^0, 2^(1/3), 2^(2/3), truncated as torchvision does) × 3 ratios per location, per level.

    placement "stride": anchor centres at each level's true stride (StrideAnchorGenerator);
    "torchvision": torchvision's own AnchorGenerator (P6/P7 centres at padded size // grid size).
    """
    sizes = tuple((s, int(s * 2 ** (1.0 / 3)), int(s * 2 ** (2.0 / 3))) for s in base_sizes)
    ratios = ((0.5, 1.0, 2.0),) * len(sizes)
    return AnchorGenerator(sizes, ratios) if placement == "torchvision" else StrideAnchorGenerator(sizes, ratios)


# --- the detector ------------------------------------------------------------------------------


class Detector(nn.Module):
    """RetinaNet with an optional objectness branch; torchvision's calling convention.

    train mode: `model(images, targets)` -> {"classification", "bbox_regression"[, "objectness"]}.
    eval mode: `model(images)` -> per image {"boxes" [K, 4] xyxy in the input image's pixels,
    "scores" [K] (the NMS ranking score), "labels" [K] (0..C-1), "cls_scores" [K] (probability of
    that class at that anchor), "obj_scores" [K] (objectness probability, NaN without a branch)}.
    images: list of [3, H, W] float tensors in [0, 1]; targets: list of {"boxes" [G, 4] xyxy in
    the input image's pixels, "labels" [G] int64}.
    """

    def __init__(self, cfg: ModelConfig, backbone: BackboneWithFPN):
        super().__init__()
        self.cfg = cfg
        self.transform = GeneralizedRCNNTransform(cfg.img_size, cfg.max_size, IMAGE_MEAN, IMAGE_STD)
        self.backbone = backbone
        self.anchor_generator = make_anchor_generator(cfg.anchor_sizes, cfg.anchor_placement)
        self.head = RetinaHead(
            cfg.fpn_channels,
            self.anchor_generator.num_anchors_per_location()[0],
            cfg.num_classes,
            num_convs=cfg.num_head_convs,
            norm=cfg.head_norm,
            prior_prob=cfg.prior_prob,
            obj_branch=cfg.obj_branch,
        )
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = det_utils.Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)
        self.loss_settings = LossSettings(
            focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma, loss_norm=cfg.loss_norm,
            obj_loss=cfg.obj_loss, obj_loss_weight=cfg.obj_loss_weight, detach_iou_target=cfg.detach_iou_target,
            obj_neg_weight=cfg.obj_neg_weight, obj_gfocal_gamma=cfg.obj_gfocal_gamma,
            obj_smooth_l1_beta=cfg.obj_smooth_l1_beta, cls_loss=cfg.cls_loss, dr_reduction=cfg.dr_reduction,
            box_weight_by_cls=cfg.box_weight_by_cls, dc_loss=cfg.dc_loss, dc_center_norm=cfg.dc_center_norm,
        )
        self.iac_settings = IacSettings(cfg.iac_alpha, cfg.iac_score_thresh) if cfg.iac_assign else None
        # A list while the training loop probes: each training forward appends its positive anchors'
        # class probability, decoded-box IoU and obj probability (losses.positive_alignment).
        self.alignment_probe: list[dict[str, Tensor]] | None = None

    @property
    def config(self) -> dict[str, Any]:
        """Plain JSON-able dict that `model_from_config` rebuilds this architecture from."""
        return dataclasses.asdict(self.cfg)

    @property
    def has_objectness(self) -> bool:
        return self.cfg.obj_branch != "none"

    @property
    def score_formula(self) -> str:
        """The NMS ranking score in words, for reports and ledger metadata."""
        formula = "cls"
        if self.has_objectness:
            e = self.cfg.obj_exponent
            formula = f"obj^{e:g} * cls^{1 - e:g}"
            if self.cfg.conf_skip_p7:  # postprocess._select_level_original
                formula += (f" on levels with more than {self.cfg.topk} anchors, cls^{1 - e:g} on the others"
                            " (original code)")
        if self.cfg.cl_nms:
            formula = f"{formula} (NMS chooses by it + CL-NMS centre closeness, weight {self.cfg.cl_nms_weight:g})"
        return formula

    @property
    def postprocess_settings(self) -> PostprocessSettings:
        c = self.cfg
        exponent = c.obj_exponent if self.has_objectness else None
        return PostprocessSettings(
            c.score_thresh, c.topk, c.nms_thresh, c.max_det, exponent, c.conf_skip_p7,
            cl_nms=c.cl_nms, cl_nms_weight=c.cl_nms_weight, cl_nms_temperature=c.cl_nms_temperature,
        )

    def _run_network(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Normalise/resize/batch, backbone, heads, anchors.

        Returns (image_list, resized targets, head outputs, anchors [A, 4], anchors per level).
        """
        image_list, targets = self.transform(images, targets)
        features = list(self.backbone(image_list.tensors).values())
        head_outputs = self.head(features)
        # Same anchors for every image of the batch. AnchorGenerator takes its dtype from the
        # features; hand it empty float32 stand-ins so that anchors stay exact under bf16/fp16 autocast.
        grids = [torch.empty((0, 0, *f.shape[-2:]), device=f.device) for f in features]
        anchors = self.anchor_generator(image_list, grids)[0]  # [A, 4]
        num_per_location = self.anchor_generator.num_anchors_per_location()[0]
        num_anchors_per_level = [f.shape[-2] * f.shape[-1] * num_per_location for f in features]
        return image_list, targets, head_outputs, anchors, num_anchors_per_level

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            _check_targets(targets, self.cfg.num_classes)
            _, targets, head_outputs, anchors, _ = self._run_network(images, targets)
            # IAC assignment labels anchors with the classifier's current (detached) probabilities.
            cls_prob = torch.sigmoid(head_outputs["cls_logits"].detach().float()) if self.iac_settings else None
            assignment = assign_anchors(anchors, targets, self.matcher, cls_prob=cls_prob, iac=self.iac_settings)
            losses = detection_losses(head_outputs, anchors, assignment, self.box_coder, self.loss_settings)
            if self.alignment_probe is not None:  # the training loop's end-of-epoch alignment (detector/train.py)
                self.alignment_probe.append(positive_alignment(head_outputs, anchors, assignment, self.box_coder))
            return losses
        return [self._detections(cand) for cand, _ in self._candidates(images)]

    def _candidates(self, images: list[Tensor]) -> list[tuple[dict[str, Tensor], dict[str, Any]]]:
        """The shared inference path. Per image: (candidates with NMS result, boxes in input pixels;
        the image's raw per-anchor outputs, for predict_with_candidates)."""
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, _, outputs, anchors, num_anchors_per_level = self._run_network(images)
        settings = self.postprocess_settings
        results = []
        for i, (size, original) in enumerate(zip(image_list.image_sizes, original_sizes)):
            raw = {
                "cls_logits": outputs["cls_logits"][i],  # [A, C]
                "bbox_deltas": outputs["bbox_deltas"][i],  # [A, 4]
                "obj_logits": outputs["obj_logits"][i] if "obj_logits" in outputs else None,  # [A]
                "anchors": anchors,  # [A, 4]
                "num_anchors_per_level": num_anchors_per_level,
                "size": (int(size[0]), int(size[1])),  # resized image (h, w)
                "original": original,  # input image (h, w)
            }
            cand = postprocess_image(
                raw["cls_logits"], raw["bbox_deltas"], raw["obj_logits"], anchors,
                num_anchors_per_level, raw["size"], self.box_coder, settings,
            )
            cand["boxes"] = resize_boxes(cand["boxes"], raw["size"], original)
            results.append((cand, raw))
        return results

    @staticmethod
    def _detections(cand: dict[str, Tensor]) -> dict[str, Tensor]:
        kept = cand["kept"]
        return {
            "boxes": cand["boxes"][kept],
            "scores": cand["score"][kept],
            "labels": cand["labels"][kept],
            "cls_scores": cand["cls_score"][kept],
            "obj_scores": cand["obj_score"][kept],
        }

    @torch.no_grad()
    def predict_with_candidates(self, images: list[Tensor]) -> list[dict[str, Any]]:
        """Detections (identical to `model(images)`) plus every candidate and every anchor, per image.

        Each dict: the detection fields of `forward`, plus
        `candidates`: {boxes [K, 4], labels, cls_score, obj_score, score, cl_nms_score (NaN without
        CL-NMS), level (0 = P3), anchor_idx, kept (bool), suppressed_by (candidate index of the
        suppressing survivor under the NMS's own ranking, -1 for survivors)}
        sorted by score descending, so the kept rows in order are the detections;
        `anchors` [A, 4], `raw_boxes` [A, 4] (decoded, clipped), `raw_cls` [A] (max class probability),
        `raw_label` [A], `raw_obj` [A] (NaN without a branch), `raw_level` [A] (0 = P3).
        Boxes xyxy in input image pixels.
        Call in eval mode.
        """
        if self.training:
            raise RuntimeError("predict_with_candidates needs eval mode: call model.eval() first")
        results = []
        for cand, raw in self._candidates(images):
            survivors = cand.pop("survivors")
            nms_score = cand["cl_nms_score"] if self.cfg.cl_nms else cand["score"]  # what NMS ranked by
            survivors = survivors[torch.sort(nms_score[survivors], descending=True, stable=True).indices]
            cand["suppressed_by"] = find_suppressors(cand["boxes"], nms_score, cand["labels"], survivors,
                                                     self.cfg.nms_thresh)
            result = self._detections(cand)
            result["candidates"] = cand
            size, original = raw["size"], raw["original"]
            raw_boxes = self.box_coder.decode_single(raw["bbox_deltas"].float(), raw["anchors"])
            raw_boxes = clip_boxes_to_image(raw_boxes, size)
            raw_cls, raw_label = torch.sigmoid(raw["cls_logits"].float()).max(dim=1)
            obj = raw["obj_logits"]
            result["anchors"] = resize_boxes(raw["anchors"], size, original)
            result["raw_boxes"] = resize_boxes(raw_boxes, size, original)
            result["raw_cls"] = raw_cls
            result["raw_label"] = raw_label
            per_level = torch.tensor(raw["num_anchors_per_level"], device=raw_cls.device)
            result["raw_level"] = torch.arange(len(per_level), device=raw_cls.device).repeat_interleave(per_level)
            result["raw_obj"] = torch.full_like(raw_cls, math.nan) if obj is None else torch.sigmoid(obj.float())
            results.append(result)
        return results


def _check_targets(targets: list[dict[str, Tensor]], num_classes: int) -> None:
    for i, target in enumerate(targets):
        boxes = target["boxes"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be [N, 4], got {list(boxes.shape)}")
        labels = target["labels"]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"targets[{i}]: labels must be in 0..{num_classes - 1}, got {labels.tolist()}")
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if degenerate.any():
            raise ValueError(f"targets[{i}]: degenerate box {boxes[degenerate][0].tolist()} (x2 <= x1 or y2 <= y1)")


# --- construction -----------------------------------------------------------------------------


def build_model(
    name: str,
    num_classes: int,
    *,
    backbone: str = "resnet50",
    img_size: int = 800,
    max_size: int = 1333,
    pretrained: bool = False,
    backbone_weights: str | os.PathLike | None = None,
    **options: Any,
) -> Detector:
    """Build a detector by name (MODEL_NAMES) with any ModelConfig option as a keyword.

    `pretrained` downloads torchvision's ImageNet weights for the backbone; `backbone_weights`
    loads a local ResNet state dict (InputError if missing, unreadable or mismatched). Nothing
    downloads otherwise. Options set to None take their defaults.
    """
    cfg = resolve_config(
        name, num_classes, backbone=backbone, img_size=img_size, max_size=max_size, pretrained=bool(pretrained),
        backbone_weights=None if backbone_weights is None else str(backbone_weights), **options,
    )
    return Detector(cfg, build_backbone(cfg, download=True))


def model_from_config(config: dict[str, Any]) -> Detector:
    """Rebuild the architecture recorded in `Detector.config` (weights are not downloaded or loaded).

    Keys this version does not know are ignored (a checkpoint's config may carry training options).
    """
    if not isinstance(config, dict) or "name" not in config or "num_classes" not in config:
        raise InputError("model config: needs at least 'name' and 'num_classes'")
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "num_classes", "obj_branch"}
    options = {k: v for k, v in config.items() if k in known}
    options.setdefault("anchor_placement", "torchvision")  # what every model built before the option used
    cfg = resolve_config(config["name"], config["num_classes"], **options)
    return Detector(cfg, build_backbone(cfg, download=False))
