"""Postprocess: the joint score by hand, candidate selection, and the suppressor of every NMS loser."""

import math

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import batched_nms

from detector.postprocess import (
    PostprocessSettings,
    find_suppressors,
    joint_score,
    postprocess_image,
    select_candidates,
)

BOX_CODER = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_joint_score_by_hand():
    cls, obj = torch.tensor([[0.25]]), torch.tensor([0.81])
    # 0.81^0.4 * 0.25^0.6 = exp(0.4 ln 0.81 + 0.6 ln 0.25) = exp(-0.084288 - 0.831777) = 0.400090
    assert joint_score(cls, obj, 0.4).item() == pytest.approx(0.400090, abs=1e-5)
    # iou-aware's convention: IoU^0.5 * cls^0.5 = sqrt(0.81 * 0.25) = 0.45
    assert joint_score(cls, obj, 0.5).item() == pytest.approx(0.45, abs=1e-6)
    assert joint_score(cls, obj, 0.0).item() == pytest.approx(0.25)  # exponent on obj: 0 -> cls alone
    assert joint_score(cls, obj, 1.0).item() == pytest.approx(0.81)  # 1 -> obj alone
    # One obj per anchor, broadcast over the classes.
    out = joint_score(torch.tensor([[0.25, 0.5], [0.1, 0.2]]), torch.tensor([0.81, 1.0]), 0.4)
    assert out.shape == (2, 2) and out[1, 0].item() == pytest.approx(0.1**0.6)


def _two_level_case():
    """Level 0: 2 anchors, level 1 ('P7' as the last level): 2 anchors; 2 classes."""
    cls = torch.tensor([[0.6, 0.001], [0.5, 0.001], [0.03, 0.001], [0.2, 0.001]])
    obj = torch.tensor([0.1, 0.9, 0.9, 0.5])
    return cls.logit(), obj.logit()


def test_threshold_and_topk_act_on_the_joint_score():
    cls_logits, obj_logits = _two_level_case()
    settings = PostprocessSettings(score_thresh=0.05, topk=1, obj_exponent=0.4)
    cand = select_candidates(cls_logits, obj_logits, [2, 2], settings)
    # Level 0: (a0, c0) 0.1^.4 * 0.6^.6 = 0.398 * 0.736 = 0.293; (a1, c0) 0.9^.4 * 0.5^.6 = 0.959 * 0.660 = 0.633.
    # By cls alone a0 would win; by the joint score a1 does.
    # Level 1: (a2, c0) has cls 0.03 < 0.05 but 0.9^.4 * 0.03^.6 = 0.959 * 0.122 = 0.117 > 0.05;
    # (a3, c0) 0.5^.4 * 0.2^.6 = 0.758 * 0.381 = 0.289 is the level's top 1.
    assert cand["anchor_idx"].tolist() == [1, 3]
    assert cand["labels"].tolist() == [0, 0]
    assert cand["level"].tolist() == [0, 1]
    torch.testing.assert_close(cand["score"], torch.tensor([0.9**0.4 * 0.5**0.6, 0.5**0.4 * 0.2**0.6]))
    torch.testing.assert_close(cand["cls_score"], torch.tensor([0.5, 0.2]))
    torch.testing.assert_close(cand["obj_score"], torch.tensor([0.9, 0.5]))

    wide = select_candidates(cls_logits, obj_logits, [2, 2], PostprocessSettings(topk=10, obj_exponent=0.4))
    assert (2, 0) in list(zip(wide["anchor_idx"].tolist(), wide["labels"].tolist()))  # cls 0.03 entered
    assert bool((wide["score"] > 0.05).all())


def _original_code_case(num_anchors_per_level):
    """Logits for the original-code rule (conf_skip_p7), e = 0.5 so that every score is a square root.

    Anchors 0-2 (level 0) and 3-5; 2 classes. Scores obj^0.5 · cls^0.5 and cls^0.5 by hand:
      a0 cls (0.64, 0.36)   obj 0.25: joint (0.4, 0.3)      a3 cls (0.0016, 0.09) obj 0.01: joint (0.004, 0.03)
      a1 cls (0.81, 0.01)   obj 0.64: joint (0.72, 0.08)        cls^0.5 (0.04, 0.3)
      a2 cls (0.49, 0.04)   obj 0.49: joint (0.49, 0.14)    a4 cls (0.0036, 0.25) obj 0.81: joint (0.054, 0.45)
                                                                cls^0.5 (0.06, 0.5)
                                                            a5 cls (0.09, 0.01)   obj 0.04: joint (0.06, 0.02)
    """
    cls = torch.tensor([[0.64, 0.36], [0.81, 0.01], [0.49, 0.04], [0.0016, 0.09], [0.0036, 0.25], [0.09, 0.01]])
    obj = torch.tensor([0.25, 0.64, 0.49, 0.01, 0.81, 0.04])
    num = sum(num_anchors_per_level)
    return cls[:num].logit(), obj[:num].logit()


def _pairs(cand):
    """{(anchor, class): score} of the selected candidates."""
    return dict(zip(zip(cand["anchor_idx"].tolist(), cand["labels"].tolist()), cand["score"].tolist()))


ORIGINAL = PostprocessSettings(topk=2, obj_exponent=0.5, conf_skip_p7=True)


def test_original_code_small_image_only_the_big_level_gets_obj():
    """Levels [3, 2], top-k 2: level 0 (3 > 2 anchors) ranks by obj^e·cls^(1−e) and keeps its 2 best
    anchors with all their classes; level 1 (2 anchors, not more than top-k) keeps both at cls^(1−e)."""
    cand = select_candidates(*_original_code_case([3, 2]), [3, 2], ORIGINAL)
    expected = {
        # Level 0: anchors by their best class, a1 0.72 > a2 0.49 > a0 0.4: a1 and a2, all their pairs > 0.05.
        # (a0, c0) 0.4 stays out although it beats (a2, c1) 0.14 and (a1, c1) 0.08: top-k over anchors.
        (1, 0): 0.72, (2, 0): 0.49, (2, 1): 0.14, (1, 1): 0.08,
        # Level 1: cls^0.5, no obj factor. (a4, c0) enters with cls 0.0036 (0.06 > 0.05); (a3, c1)
        # enters with 0.3 although its joint score 0.03 would not; (a3, c0) 0.04 does not.
        (4, 1): 0.5, (3, 1): 0.3, (4, 0): 0.06,
    }
    got = _pairs(cand)
    assert set(got) == set(expected)
    assert got == pytest.approx(expected, abs=1e-5)
    assert cand["level"].tolist() == [0, 0, 0, 0, 1, 1, 1]  # levels in order, score-descending within
    assert cand["score"].tolist() == pytest.approx([0.72, 0.49, 0.14, 0.08, 0.5, 0.3, 0.06], abs=1e-5)
    torch.testing.assert_close(cand["cls_score"][cand["level"] == 1], torch.tensor([0.25, 0.09, 0.0036]))
    torch.testing.assert_close(cand["obj_score"][cand["level"] == 1], torch.tensor([0.81, 0.01, 0.81]))

    # The default rule on the same logits: obj^e·cls^(1−e) everywhere, the top 2 *pairs* per level.
    default_rule = PostprocessSettings(topk=2, obj_exponent=0.5)
    default = _pairs(select_candidates(*_original_code_case([3, 2]), [3, 2], default_rule))
    assert default == pytest.approx({(1, 0): 0.72, (2, 0): 0.49, (4, 1): 0.45, (4, 0): 0.054}, abs=1e-5)


def test_original_code_big_image_every_big_level_gets_obj():
    """Levels [3, 3], top-k 2 (a larger image: both levels have more anchors than top-k): both rank by
    obj^e·cls^(1−e) and keep their 2 best anchors."""
    cand = select_candidates(*_original_code_case([3, 3]), [3, 3], ORIGINAL)
    expected = {
        (1, 0): 0.72, (2, 0): 0.49, (2, 1): 0.14, (1, 1): 0.08,  # level 0 as on the small image
        # Level 1: best classes a4 0.45 > a5 0.06 > a3 0.03: a4 and a5; (a5, c1) 0.02 is below 0.05.
        # Top-2 pairs would take (a4, c1) 0.45 and (a5, c0) 0.06 and drop (a4, c0) 0.054.
        (4, 1): 0.45, (5, 0): 0.06, (4, 0): 0.054,
    }
    got = _pairs(cand)
    assert set(got) == set(expected)
    assert got == pytest.approx(expected, abs=1e-5)
    last = cand["level"] == 1
    torch.testing.assert_close(cand["score"][last], cand["obj_score"][last].sqrt() * cand["cls_score"][last].sqrt())


def test_original_code_with_top_k_above_every_level_is_cls_alone():
    """Top-k larger than every level (a tiny image): no level gets the obj factor, every pair ranks by
    cls^(1−e), and a level keeps every anchor."""
    settings = PostprocessSettings(topk=3, obj_exponent=0.4, conf_skip_p7=True)
    cls_logits, obj_logits = _original_code_case([3, 3])
    cand = select_candidates(cls_logits, obj_logits, [3, 3], settings)
    cls = torch.sigmoid(cls_logits)
    expected = {(a, c): float(cls[a, c]) ** 0.6 for a in range(6) for c in range(2) if float(cls[a, c]) ** 0.6 > 0.05}
    assert _pairs(cand) == pytest.approx(expected, abs=1e-6)
    # By hand: of the 12 pairs only (a3, c0) 0.0016^0.6 = 0.021 and (a4, c0) 0.0036^0.6 = 0.034 miss
    # 0.05; cls 0.01 enters at 0.01^0.6 = 0.063.
    assert len(expected) == 10 and (1, 1) in expected and (3, 0) not in expected and (4, 0) not in expected
    torch.testing.assert_close(cand["score"], cand["cls_score"].pow(0.6))


def test_no_branch_ranks_by_cls_and_obj_is_nan():
    cls_logits, _ = _two_level_case()
    cand = select_candidates(cls_logits, None, [2, 2], PostprocessSettings(topk=10))
    torch.testing.assert_close(cand["score"], cand["cls_score"])
    assert bool(torch.isnan(cand["obj_score"]).all())
    assert cand["score"].tolist() == pytest.approx([0.6, 0.5, 0.2])


def test_find_suppressors_worked_case():
    boxes = torch.tensor(
        [
            [0.0, 0, 10, 10],  # 0: survivor
            [6.0, 0, 16, 10],  # 1: IoU with 0 = 40 / 160 = 0.25 -> survivor
            [4.0, 0, 14, 10],  # 2: IoU with 0 = 60 / 140 = 0.43, with 1 = 80 / 120 = 0.67
            [20.0, 20, 30, 30],  # 3: alone -> survivor
            [0.0, 0, 10, 10],  # 4: same box as 0 but another class -> survivor
            [1.0, 0, 11, 10],  # 5: IoU with 0 = 0.82 -> suppressed by 0
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = torch.tensor([0, 0, 0, 0, 1, 0])
    # At 0.5, box 2 is suppressed only by box 1; at 0.4 by box 0 already (the first, highest-scoring
    # survivor that overlaps it enough), although its overlap with box 1 is larger.
    for thresh, expected_2 in ((0.5, 1), (0.4, 0)):
        survivors = torch.sort(batched_nms(boxes, scores, labels, thresh)).values
        assert survivors.tolist() == [0, 1, 3, 4]
        assert find_suppressors(boxes, scores, labels, survivors, thresh).tolist() == [-1, -1, expected_2, -1, -1, 0]


def _greedy_nms_reference(boxes, scores, labels, thresh):
    """Slow greedy NMS in Python: returns (survivor flags, suppressor of each box or -1)."""
    boxes, scores, labels = boxes.tolist(), scores.tolist(), labels.tolist()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    by_label = {}
    for i in order:
        by_label.setdefault(labels[i], []).append(i)
    suppressed_by = [-1] * len(scores)
    removed = [False] * len(scores)

    def iou(a, b):
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    for same_label in by_label.values():  # classes never suppress each other
        for pos, i in enumerate(same_label):
            if removed[i]:
                continue
            for j in same_label[pos + 1 :]:
                if not removed[j] and iou(boxes[i], boxes[j]) > thresh:
                    removed[j] = True
                    suppressed_by[j] = i
    return [not r for r in removed], suppressed_by


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_find_suppressors_matches_slow_greedy_nms(seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 2, generator=g) * 100  # clusters of jittered boxes
    which = torch.randint(0, 12, (300,), generator=g)
    xy = centres[which] + torch.randn(300, 2, generator=g) * 4
    wh = 10 + torch.rand(300, 2, generator=g) * 20
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(300, generator=g)
    order = torch.sort(scores, descending=True).indices
    boxes, scores = boxes[order], scores[order]
    labels = torch.randint(0, 3, (300,), generator=g)
    survivors = torch.sort(batched_nms(boxes, scores, labels, 0.5)).values
    flags, expected = _greedy_nms_reference(boxes, scores, labels, 0.5)
    assert torch.nonzero(torch.tensor(flags)).squeeze(1).tolist() == survivors.tolist()
    got = find_suppressors(boxes, scores, labels, survivors, 0.5)
    assert got.tolist() == expected
    assert (got >= 0).sum() > 100  # the case exercises suppression


def test_postprocess_image_large_pool_matches_slow_greedy_nms():
    """> 1000 candidates: batched_nms takes its per-class path on CPU; the suppressors still agree."""
    g = torch.Generator().manual_seed(3)
    num_anchors, num_classes = 600, 3
    xy = torch.rand(num_anchors, 2, generator=g) * 150
    anchors = torch.cat([xy, xy + 16 + torch.rand(num_anchors, 2, generator=g) * 24], dim=1)
    cls_logits = torch.randn(num_anchors, num_classes, generator=g)
    deltas = torch.randn(num_anchors, 4, generator=g) * 0.1
    settings = PostprocessSettings(topk=1000)
    cand = postprocess_image(cls_logits, deltas, None, anchors, [400, 200], (180, 180), BOX_CODER, settings)
    assert len(cand["score"]) > 1000
    assert bool((cand["score"] > 0.05).all()) and bool((cand["score"][:-1] >= cand["score"][1:]).all())
    flags, expected = _greedy_nms_reference(cand["boxes"], cand["score"], cand["labels"], 0.5)
    assert torch.nonzero(torch.tensor(flags)).squeeze(1).tolist() == cand["survivors"].tolist()
    assert torch.equal(torch.nonzero(cand["kept"]).squeeze(1), cand["survivors"][:100])
    got = find_suppressors(cand["boxes"], cand["score"], cand["labels"], cand["survivors"], 0.5)
    assert got.tolist() == expected
