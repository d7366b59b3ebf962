"""RetinaNet heads: a classification tower, a regression tower, and an optional objectness logit.

The towers are shared by every FPN level. Outputs are flattened in the anchor order of
torchvision's `AnchorGenerator`: level by level, then row, column, anchor of the location
(so index `a` of the outputs is anchor `a` of the image's concatenated anchors).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

HEAD_NORMS = ("none", "group")
OBJ_BRANCHES = ("none", "cls", "reg")  # where the objectness conv sits: nowhere, cls tower, reg tower


def _tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    """`num_convs` × (3×3 conv, optional GroupNorm, ReLU), keeping `channels` channels."""
    # GroupNorm with 32 groups as in RetinaNet v2 / FCOS, fewer when the width does not divide.
    norm_layer = (lambda c: nn.GroupNorm(math.gcd(32, c), c)) if norm == "group" else None
    return nn.Sequential(
        *[Conv2dNormActivation(channels, channels, norm_layer=norm_layer) for _ in range(num_convs)]
    )


def _flatten_level(x: Tensor, num_values: int) -> Tensor:
    """[N, A*K, H, W] -> [N, H*W*A, K]: one row per anchor, in AnchorGenerator's order."""
    n, _, h, w = x.shape
    x = x.view(n, -1, num_values, h, w).permute(0, 3, 4, 1, 2)  # [N, H, W, A, K]
    return x.reshape(n, -1, num_values)


class RetinaHead(nn.Module):
    """Classification and box-regression towers plus, optionally, one objectness logit per anchor.

    Args:
        in_channels: channels of every FPN level.
        num_anchors: anchors per location (9 for 3 scales × 3 ratios).
        num_classes: foreground classes (sigmoid per class, no background logit).
        num_convs: 3×3 convs in each tower (4 in RetinaNet).
        norm: "none" (RetinaNet v1) or "group" (GroupNorm after each tower conv).
        prior_prob: initial foreground probability of every class logit (bias init).
        obj_branch: "none", "cls" (RetinaNet-Conf: on the classification tower's last feature)
            or "reg" (IoU-aware RetinaNet: on the regression tower's last feature).

    forward(features: list of [N, in_channels, H_l, W_l]) -> dict with
        `cls_logits` [N, A, num_classes], `bbox_deltas` [N, A, 4] (BoxCoder encoding, weights 1),
        and `obj_logits` [N, A] when there is an objectness branch (A = anchors of all levels).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        *,
        num_convs: int = 4,
        norm: str = "none",
        prior_prob: float = 0.01,
        obj_branch: str = "none",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.obj_branch = obj_branch
        self.cls_tower = _tower(in_channels, num_convs, norm)
        self.reg_tower = _tower(in_channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_deltas = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.obj_logits = nn.Conv2d(in_channels, num_anchors, 3, padding=1) if obj_branch != "none" else None

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:  # tower convs followed by GroupNorm have none
                    nn.init.zeros_(module.bias)
        # Every class starts at probability prior_prob, so the many negatives do not swamp the
        # first steps of focal loss (RetinaNet §4.1).
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        cls_per_level, box_per_level, obj_per_level = [], [], []
        for x in features:
            cls_feature = self.cls_tower(x)
            reg_feature = self.reg_tower(x)
            cls_per_level.append(_flatten_level(self.cls_logits(cls_feature), self.num_classes))
            box_per_level.append(_flatten_level(self.bbox_deltas(reg_feature), 4))
            if self.obj_logits is not None:
                obj_feature = cls_feature if self.obj_branch == "cls" else reg_feature
                obj_per_level.append(_flatten_level(self.obj_logits(obj_feature), 1))
        outputs = {
            "cls_logits": torch.cat(cls_per_level, dim=1),  # [N, A, C]
            "bbox_deltas": torch.cat(box_per_level, dim=1),  # [N, A, 4]
        }
        if obj_per_level:
            outputs["obj_logits"] = torch.cat(obj_per_level, dim=1).squeeze(-1)  # [N, A]
        return outputs
