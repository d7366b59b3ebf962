"""metrics.json recomputed with plain pandas, scipy.stats and pycocotools; the weighted bootstrap."""

import contextlib
import io
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import stats

from misalign.cocoeval import ENGINE_MODULES, ENGINE_NAMES, STAT_KEYS
from misalign.correlation import (RankedPool, bootstrap_counts, group_midranks, per_gt_spearman, percentile_ci,
                                  weighted_spearman, linear_replicates, spearman_influence)
from misalign.errors import InputError
from misalign.ledger import LedgerWriter, read_candidates, read_ledger, read_raw_counts, validate_ledger
from misalign.metrics import analyze, compare, compute_metrics, load_ground_truth, metrics_document, summary_table
from misalign.truth import CLS_THRESHOLDS, IOU_THRESHOLDS, match_truth, raw_counts_rows

CONDITIONS = [("cls", t) for t in CLS_THRESHOLDS] + [("iou", t) for t in IOU_THRESHOLDS]


# --- a small synthetic split and ledger ---------------------------------------------------------


def make_gt(path, num_images=8, seed=0):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(num_images):
        image_id = 10 * (i + 1)  # ids need not be contiguous
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 200, "height": 150})
        for k in range(rng.integers(1, 6)):
            x, y = rng.uniform(0, 120, 2)
            w, h = rng.uniform(10, 70, 2)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 4)),
                         "bbox": [round(x, 1), round(y, 1), round(w, 1), round(h, 1)], "area": w * h,
                         "iscrowd": int(rng.random() < 0.1)})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    path.write_text(json.dumps(gt))
    return gt


def gt_arrays(gt, image_id):
    anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
    xywh = np.array([a["bbox"] for a in anns], float).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return (boxes, np.array([a["category_id"] for a in anns]), np.array([a["id"] for a in anns]),
            np.array([a["iscrowd"] for a in anns], bool))


def make_ledger(folder, gt, seed=0, cands=60, obj=True, post_only=False, skip_images=()):
    """A consistent ledger: candidates jittered around the gt (ties in scores and IoUs on purpose)."""
    rng = np.random.default_rng(seed)
    with LedgerWriter(folder) as writer:
        for image in gt["images"]:
            image_id = image["id"]
            gt_boxes, gt_cat, gt_ids, crowd = gt_arrays(gt, image_id)
            src = rng.integers(0, len(gt_boxes), cands)
            boxes = gt_boxes[src] + rng.normal(0, 6, (cands, 4))
            background = rng.random(cands) < 0.3
            boxes[background] = rng.uniform(0, 100, (background.sum(), 4)) + [0, 0, 40, 40]
            boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
            boxes = np.round(boxes, 1)
            cat = np.where(rng.random(cands) < 0.8, gt_cat[src], rng.integers(1, 4, cands))
            iou, gt_id, iou_any = match_truth(boxes.astype(np.float32), cat, gt_boxes, gt_cat, gt_ids, crowd)
            cls = np.round(np.clip(0.3 * iou + rng.uniform(0.05, 0.7, cands), 0.051, 1), 2)  # ties
            objs = np.clip(iou + rng.normal(0, 0.15, cands), 0, 1) if obj else np.full(cands, np.nan)
            score = np.sqrt(cls * objs) if obj else cls
            order = np.argsort(-score, kind="stable")
            kept = np.zeros(cands, bool)
            kept[order[: cands // 5]] = True
            if post_only:
                rows = np.flatnonzero(kept)
                sup = np.full(len(rows), -1)
            else:
                rows = np.arange(cands)
                survivors = order[: cands // 4]  # the last few survivors were cut by max-detections
                sup = np.where(np.isin(rows, survivors), -1, rng.choice(survivors, cands))
            if image_id in skip_images:
                rows = rows[:0]
                sup = sup[:0]
            frame = pd.DataFrame({
                "image_id": image_id, "category_id": cat[rows], "x1": boxes[rows, 0], "y1": boxes[rows, 1],
                "x2": boxes[rows, 2], "y2": boxes[rows, 3], "cls_score": (score if post_only else cls)[rows],
                "obj_score": np.full(len(rows), np.nan) if post_only else objs[rows], "score": score[rows],
                "kept": kept[rows], "suppressed_by": sup, "iou": iou[rows], "gt_id": gt_id[rows],
                "iou_any": iou_any[rows]})
            writer.add_candidates(frame)
            if not post_only:
                writer.add_raw_counts(raw_counts_rows(image_id, rng.random(500).astype(np.float32),
                                                      rng.random(500).astype(np.float32),
                                                      rng.random(500).astype(np.float32)))
        writer.add_images(pd.DataFrame({
            "image_id": [im["id"] for im in gt["images"]], "file_name": [im["file_name"] for im in gt["images"]],
            "width": 200, "height": 150, "num_gt": [int((~gt_arrays(gt, im["id"])[3]).sum()) for im in gt["images"]],
            "num_anchors": -1 if post_only else 500, "num_pos_anchors": -1 if post_only else 7}))
        writer.close({"detector": {"name": "synthetic"}, "dataset": {"ann": str(folder.parent / "gt.json")},
                      "pre_nms": not post_only})
    validate_ledger(folder)
    return folder


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    gt = make_gt(root / "gt.json")
    make_ledger(root / "a", gt, seed=1)
    make_ledger(root / "b", gt, seed=2, obj=False)
    return root, gt


# --- references ---------------------------------------------------------------------------------


def pycocotools_ap(gt_path, kept, image_ids):
    results = [{"image_id": int(r.image_id), "category_id": int(r.category_id),
                "bbox": [float(r.x1), float(r.y1), float(r.x2) - float(r.x1), float(r.y2) - float(r.y1)],
                "score": float(r.score)} for r in kept.itertuples()]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(STAT_KEYS, evaluator.stats))


def key(quantity, t):
    return f"{quantity}>{t:g}"


def slow_counts(frame):
    return {key(q, t): int((frame["cls_score" if q == "cls" else "iou"] > t).sum()) for q, t in CONDITIONS}


def slow_per_gt(pool):
    rhos = []
    for _, group in pool.groupby("gt_id"):
        if len(group) >= 3:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant input: NaN, skipped
                rho = stats.spearmanr(group["x"], group["iou"]).statistic
            if np.isfinite(rho):
                rhos.append(rho)
    return np.mean(rhos), len(rhos)


# --- tests --------------------------------------------------------------------------------------


def test_every_metric_recomputed_by_hand(case):
    root, gt = case
    folder = root / "a"
    bootstrap, seed = 40, 3
    metrics = compute_metrics(folder, root / "gt.json", bootstrap=bootstrap, seed=seed)
    df = read_candidates(folder)
    kept = df[df["kept"]]
    image_ids = [im["id"] for im in gt["images"]]

    expected_ap = pycocotools_ap(root / "gt.json", kept, image_ids)
    assert set(metrics["ap"]) == set(STAT_KEYS)
    for k in STAT_KEYS:
        assert metrics["ap"][k] == pytest.approx(expected_ap[k], abs=1e-6)
    assert metrics["ap"]["AP"] > 0.05  # a real evaluation, not zeros

    raw = read_raw_counts(folder)
    raw_sum = raw.groupby(["stage", "quantity", "threshold"])["count"].sum()
    assert metrics["counts"]["raw"] == {key(q, t): int(raw_sum[("raw", q, t)]) for q, t in CONDITIONS}
    assert metrics["counts"]["anchors"] == {key("iou", t): int(raw_sum[("anchors", "iou", t)]) for t in IOU_THRESHOLDS}
    assert metrics["counts"]["pre_nms"] == slow_counts(df)
    assert metrics["counts"]["post_nms"] == slow_counts(kept)
    pre, post = slow_counts(df), slow_counts(kept)
    assert metrics["survival"] == pytest.approx({k: post[k] / pre[k] for k in pre if pre[k] > 0}, abs=1e-12)
    assert metrics["proportions"]["pre_nms"] == pytest.approx({k: v / len(df) for k, v in pre.items()}, abs=1e-12)
    assert metrics["proportions"]["post_nms"] == pytest.approx({k: v / len(kept) for k, v in post.items()}, abs=1e-12)

    assert list(metrics["correlation"]) == ["cls_score", "obj_score", "score"]
    pool = df[df["iou"] >= 0.5]
    counts = bootstrap_counts(len(image_ids), bootstrap, seed)
    sorted_ids = np.sort(image_ids)
    for column, got in metrics["correlation"].items():
        x, y = pool[column].to_numpy(float), pool["iou"].to_numpy(float)
        assert got["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-9)
        assert got["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-9)
        assert got["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-9)
        mean_rho, n_gt = slow_per_gt(pool.assign(x=x))
        assert got["spearman_per_gt"] == pytest.approx(mean_rho, abs=1e-9)
        assert got["divergence"] == pytest.approx((1 - mean_rho) / 2, abs=1e-9)
        assert (got["n"], got["n_gt"]) == (len(pool), n_gt)
        # the CI: explicit resamples, rows of image i repeated counts[b, i] times, scipy's Spearman
        image_pos = np.searchsorted(sorted_ids, pool["image_id"].to_numpy())
        explicit = []
        for c in counts:
            rows = np.repeat(np.arange(len(pool)), c[image_pos])
            explicit.append(stats.spearmanr(x[rows], y[rows]).statistic)
        lo, hi = np.percentile(explicit, [2.5, 97.5])
        assert got["ci95"]["spearman"] == pytest.approx([lo, hi], abs=1e-9)
        assert lo < got["spearman"] < hi
    json.dumps(metrics_document({"a": metrics}), allow_nan=False)  # valid JSON, no NaN


def test_weighted_bootstrap_spearman_equals_scipy_on_duplicated_rows():
    rng = np.random.default_rng(7)
    n, num_images = 400, 25
    x1 = np.round(rng.random(n), 2)  # many ties
    x2 = rng.random(n)  # no ties
    y = np.round(0.5 * x1 + rng.random(n), 1)  # ties
    image_pos = rng.integers(0, num_images, n)
    pool = RankedPool([x1, x2], y, image_pos, num_images)
    for counts in [np.ones(num_images, int), *bootstrap_counts(num_images, 6, seed=1)]:
        rows = np.repeat(np.arange(n), counts[image_pos])
        expected = [stats.spearmanr(x1[rows], y[rows]).statistic, stats.spearmanr(x2[rows], y[rows]).statistic]
        np.testing.assert_allclose(pool.spearman(counts), expected, atol=1e-12)
        assert weighted_spearman(x1, y, counts[image_pos]) == pytest.approx(expected[0], abs=1e-12)
    assert np.isnan(pool.spearman(np.zeros(num_images))).all()
    one = np.zeros(num_images, int)
    one[image_pos[0]] = 3  # a single image repeated: still Spearman of its rows
    rows = np.repeat(np.arange(n), one[image_pos])
    assert pool.spearman(one)[1] == pytest.approx(stats.spearmanr(x2[rows], y[rows]).statistic, abs=1e-12)
    const = RankedPool([np.ones(n)], y, image_pos, num_images)
    assert np.isnan(const.spearman(np.ones(num_images))[0])  # constant scores: undefined, as scipy


def test_group_midranks_and_per_gt_spearman_against_scipy():
    rng = np.random.default_rng(3)
    gt_id = rng.integers(-1, 30, 500)
    x = np.round(rng.random(500), 1)
    y = rng.random(500)
    y[gt_id == 5] = 0.7  # a constant group: rho undefined
    ranks = group_midranks(gt_id, x)
    for g in np.unique(gt_id):
        np.testing.assert_allclose(ranks[gt_id == g], stats.rankdata(x[gt_id == g]))
    table = per_gt_spearman(x, y, gt_id, image_id=gt_id * 100, min_count=3)
    assert -1 not in table["gt_id"].tolist()
    for row in table.itertuples():
        sel = gt_id == row.gt_id
        assert row.n == sel.sum() >= 3 and row.image_id == row.gt_id * 100
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = stats.spearmanr(x[sel], y[sel]).statistic
        if np.isnan(expected):
            assert np.isnan(row.spearman)
        else:
            assert row.spearman == pytest.approx(expected, abs=1e-12)
    assert np.isnan(table.set_index("gt_id").loc[5, "spearman"])
    assert len(table) == sum((gt_id == g).sum() >= 3 for g in range(30))


def write_two_image_toy(root):
    """Two images, hand-picked scores and IoUs (truth columns given, not computed)."""
    gt = {"images": [{"id": 1, "file_name": "1.jpg", "width": 100, "height": 100},
                     {"id": 2, "file_name": "2.jpg", "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}]}
    (root / "gt.json").write_text(json.dumps(gt))

    def frame(image_id, cls, iou, kept, sup):
        n = len(cls)
        return pd.DataFrame({"image_id": image_id, "category_id": 1, "x1": 0.0, "y1": 0.0, "x2": 10.0, "y2": 10.0,
                             "cls_score": cls, "score": cls, "kept": kept, "suppressed_by": sup, "iou": iou,
                             "gt_id": np.where(np.asarray(iou) > 0, image_id, -1), "iou_any": iou})

    with LedgerWriter(root / "toy") as writer:
        writer.add_images(pd.DataFrame({"image_id": [1, 2], "file_name": ["1.jpg", "2.jpg"], "width": 100,
                                        "height": 100, "num_gt": 1, "num_anchors": 50, "num_pos_anchors": [4, 2]}))
        # image 1: cls 0.9 (iou 0.3) kept, 0.6 (iou 0.95) suppressed, 0.55 (iou 0.85) suppressed
        writer.add_candidates(frame(1, [0.9, 0.6, 0.55], [0.3, 0.95, 0.85], [True, False, False], [-1, 0, 0]))
        # image 2: cls 0.5 (iou 0.5) kept - not > 0.5 -, 0.07 (iou 0.65) kept
        writer.add_candidates(frame(2, [0.5, 0.07], [0.5, 0.65], [True, True], [-1, -1]))
        writer.close({"dataset": {"ann": str(root / "gt.json")}})
    return root / "toy"


def test_hand_worked_counts_and_survival(tmp_path):
    folder = write_two_image_toy(tmp_path)
    analysis = analyze(folder, bootstrap=0)
    m = analysis.metrics
    assert m["counts"]["pre_nms"] == {"cls>0.05": 5, "cls>0.5": 3, "cls>0.6": 1, "cls>0.7": 1, "cls>0.8": 1,
                                      "cls>0.9": 0, "iou>0.5": 3, "iou>0.6": 3, "iou>0.7": 2, "iou>0.8": 2,
                                      "iou>0.9": 1}
    assert m["counts"]["post_nms"] == {"cls>0.05": 3, "cls>0.5": 1, "cls>0.6": 1, "cls>0.7": 1, "cls>0.8": 1,
                                       "cls>0.9": 0, "iou>0.5": 1, "iou>0.6": 1, "iou>0.7": 0, "iou>0.8": 0,
                                       "iou>0.9": 0}
    # no raw_counts: the positive anchors come from images.parquet num_pos_anchors, under the same key
    assert m["counts"]["raw"] == {} and m["counts"]["anchors"] == {"iou>0.5": 6}
    assert m["crowd"] == {"pre_nms": 0, "post_nms": 0}
    assert m["survival"] == pytest.approx({"cls>0.05": 3 / 5, "cls>0.5": 1 / 3, "cls>0.6": 1.0, "cls>0.7": 1.0,
                                           "cls>0.8": 1.0, "iou>0.5": 1 / 3, "iou>0.6": 1 / 3, "iou>0.7": 0.0,
                                           "iou>0.8": 0.0, "iou>0.9": 0.0})
    assert m["proportions"]["pre_nms"]["iou>0.5"] == pytest.approx(3 / 5)
    assert m["proportions"]["post_nms"]["iou>0.5"] == pytest.approx(1 / 3)
    # pool iou >= 0.5: (0.6, 0.95), (0.55, 0.85), (0.5, 0.5), (0.07, 0.65): ranks x 4,3,2,1 / y 4,3,1,2
    assert m["correlation"]["cls_score"]["spearman"] == pytest.approx(0.8)
    assert m["correlation"]["cls_score"]["n"] == 4 and m["correlation"]["cls_score"]["n_gt"] == 0
    assert m["correlation"]["cls_score"]["spearman_per_gt"] is None  # no gt with 3 pool rows
    assert m["correlation"]["cls_score"]["ci95"] == {"spearman": [None, None]}
    assert "obj_score" not in m["correlation"]
    table = analysis.table1()
    assert list(table.columns) == ["1", "2", "all"]
    assert table.loc[("anchors", "iou>0.5")].tolist() == [4, 2, 6]
    assert table.loc[("pre_nms", "iou>0.5")].tolist() == [2, 1, 3]
    assert table.loc[("post_nms", "rows")].tolist() == [1, 2, 3]
    props = analysis.per_image_proportions().set_index(["image_id", "condition"])
    assert props.loc[(1, "iou>0.5"), "pre_nms"] == pytest.approx(2 / 3)
    assert props.loc[(1, "iou>0.5"), "post_nms"] == 0.0
    assert props.loc[(1, "cls>0.05"), "survival"] == pytest.approx(1 / 3)
    assert props.loc[(2, "cls>0.05"), "survival"] == 1.0
    assert np.isnan(props.loc[(1, "cls>0.9"), "survival"])  # 0 / 0


@pytest.mark.parametrize("engine", ["ultrafast", "hotcoco"])  # the engines misalign keeps beside pycocotools
def test_every_engine_gives_pycocotools_ap_bit_for_bit(case, engine):
    root, _ = case
    pytest.importorskip(ENGINE_MODULES[engine])
    slow = compute_metrics(root / "a", root / "gt.json", bootstrap=0, ap_backend="pycocotools")
    fast = compute_metrics(root / "a", root / "gt.json", bootstrap=0, ap_backend=engine)
    assert fast["ap"] == slow["ap"]  # ==, every one of the twelve
    assert fast["ap_engine"]["name"] == ENGINE_NAMES[engine] and slow["ap_engine"]["name"] == "pycocotools"
    assert slow["ap"]["AP"] > 0.05


def test_post_nms_only_ledger(tmp_path):
    gt = make_gt(tmp_path / "gt.json", num_images=4, seed=5)
    folder = make_ledger(tmp_path / "p", gt, seed=4, post_only=True, skip_images=(20,))
    analysis = analyze(folder, bootstrap=10)  # gt from meta.json
    m = analysis.metrics
    assert set(analysis.table1().index.get_level_values("stage")) == {"post_nms"}
    assert analysis.per_image_proportions()["pre_nms"].isna().all()
    assert m["counts"]["pre_nms"] == {} and m["survival"] == {} and m["proportions"]["pre_nms"] == {}
    assert m["counts"]["raw"] == {} and m["counts"]["anchors"] == {}
    assert m["crowd"] == {"post_nms": 0}  # no pre-NMS stage
    kept = read_candidates(folder)
    assert m["counts"]["post_nms"] == slow_counts(kept)
    assert list(m["correlation"]) == ["cls_score", "score"]  # obj_score all NaN
    pool = kept[kept["iou"] >= 0.5]
    assert m["correlation"]["score"]["spearman"] == pytest.approx(stats.spearmanr(pool["score"], pool["iou"]).statistic)


def test_compare_pairs_detectors_of_the_same_images(case):
    root, _ = case
    gt = load_ground_truth(root / "gt.json")
    a = analyze(root / "a", gt, bootstrap=30, seed=1)
    b = analyze(root / "b", gt, bootstrap=30, seed=1)
    table = compare({"a": a, "b": b}).set_index("quantity")
    assert (table["detector"] == "b").all() and table["paired"].all()
    row = table.loc["spearman score"]
    assert row["value"] == b.metrics["correlation"]["score"]["spearman"]
    assert row["delta"] == pytest.approx(row["value"] - row["reference_value"])
    expected = percentile_ci(b.replicates["spearman:score"] - a.replicates["spearman:score"])
    assert [row["ci95_lo"], row["ci95_hi"]] == pytest.approx(expected)
    assert table.loc["AP", "delta"] == pytest.approx(b.metrics["ap"]["AP"] - a.metrics["ap"]["AP"])
    assert "survival iou>0.5" in table.index and "divergence cls_score" in table.index
    # divergence replicates: the per-gt mean recomputed on the first resample
    counts = bootstrap_counts(len(a.image_ids), 30, 1)[0]
    per_gt = a.per_gt["score"].dropna()
    weights = counts[np.searchsorted(a.image_ids, per_gt["image_id"])]
    assert a.replicates["divergence:score"][0] == pytest.approx((1 - np.average(per_gt["spearman"], weights=weights)) / 2)
    summary = summary_table({"a": a, "b": b})
    assert summary["detector"].tolist() == ["a", "b"]
    assert summary.loc[0, "spearman_lo"] == a.metrics["correlation"]["score"]["ci95"]["spearman"][0]


def test_ground_truth_must_match_the_ledger(case, tmp_path):
    root, _ = case
    other = {"images": [{"id": 1, "file_name": "x.jpg", "width": 10, "height": 10}], "annotations": [],
             "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(InputError, match="other.json: ground truth does not match the ledger .*image_id 10"):
        compute_metrics(root / "a", tmp_path / "other.json", bootstrap=0)
    with pytest.raises(InputError, match="missing.json: ground-truth file not found"):
        compute_metrics(root / "a", tmp_path / "missing.json", bootstrap=0)
    ledger = read_ledger(root / "a")
    ledger.meta = {}
    with pytest.raises(InputError, match="names no ground truth"):
        compute_metrics(ledger, bootstrap=0)


# --- the linearised bootstrap of large pools -----------------------------------------------------


def test_spearman_influence_is_the_derivative_of_the_weighted_spearman():
    """rho equals scipy's; d rho / d c[i] equals a central difference of the slow reference
    `weighted_spearman` (a rational function of the weights: the difference is exact to ~eps^2)."""
    rng = np.random.default_rng(11)
    n, num_images = 500, 23
    x1 = np.round(rng.random(n), 2)  # ties
    x2 = rng.random(n)
    y = np.round(0.4 * x1 + rng.random(n), 1)  # ties
    image_pos = rng.integers(0, num_images, n)
    rho, grad = spearman_influence([x1, x2], y, image_pos, num_images)
    for k, x in enumerate((x1, x2)):
        assert rho[k] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        eps = 1e-5
        for i in range(num_images):
            w = np.ones(n)
            w[image_pos == i] += eps
            up = weighted_spearman(x, y, w)
            w[image_pos == i] -= 2 * eps
            down = weighted_spearman(x, y, w)
            assert grad[i, k] == pytest.approx((up - down) / (2 * eps), abs=1e-9)
    assert np.abs(grad).max() > 1e-3  # not trivially zero
    const_rho, const_grad = spearman_influence([np.ones(n)], y, image_pos, num_images)
    assert np.isnan(const_rho[0]) and np.isnan(const_grad).all()


def test_linear_replicates_track_the_exact_ones():
    """Same resamples, first-order replicates: on a pool of 400 images they differ from the exact
    replicates (RankedPool) by a small fraction of the replicates' spread, and the CIs agree."""
    rng = np.random.default_rng(5)
    num_images, per_image = 400, 40
    image_pos = np.repeat(np.arange(num_images), per_image)
    y = rng.random(len(image_pos)).astype(np.float32).astype(np.float64)
    x = (0.5 * y + rng.random(len(y)) + 0.2 * rng.random(num_images)[image_pos]).astype(np.float32).astype(np.float64)
    counts = bootstrap_counts(num_images, 60, seed=2)
    exact = RankedPool([x], y, image_pos, num_images).replicates(counts)[:, 0]
    rho, grad = spearman_influence([x], y, image_pos, num_images)
    linear = linear_replicates(rho, grad, counts)[:, 0]
    spread = exact.std()
    assert spread > 1e-3
    assert np.abs(linear - exact).max() < 0.1 * spread
    assert np.corrcoef(linear, exact)[0, 1] > 0.99
    assert percentile_ci(linear) == pytest.approx(percentile_ci(exact), abs=0.15 * spread)
    assert linear_replicates(rho, grad, np.ones((1, num_images)))[0, 0] == rho[0]  # no reweighting: rho itself


def test_analyze_switches_to_linear_replicates_on_large_pools(case, monkeypatch):
    root, _ = case
    exact = analyze(root / "a", root / "gt.json", bootstrap=30, seed=1, bootstrap_method="exact")
    linear = analyze(root / "a", root / "gt.json", bootstrap=30, seed=1, bootstrap_method="linear")
    assert exact.settings["bootstrap_method"] == ["exact"] and linear.settings["bootstrap_method"] == ["linear"]
    import misalign.metrics as metrics_module

    assert analyze(root / "a", root / "gt.json", bootstrap=30, seed=1).settings["bootstrap_method"] == ["exact"]
    monkeypatch.setattr(metrics_module, "EXACT_BOOTSTRAP_BUDGET", 10)  # every pool is "large" now
    auto = analyze(root / "a", root / "gt.json", bootstrap=30, seed=1)
    assert auto.settings["bootstrap_method"] == ["linear"]
    for column, entry in linear.metrics["correlation"].items():
        assert entry["spearman"] == pytest.approx(exact.metrics["correlation"][column]["spearman"], abs=1e-12)
        assert auto.metrics["correlation"][column] == entry
        np.testing.assert_array_equal(linear.replicates[f"divergence:{column}"],
                                      exact.replicates[f"divergence:{column}"])  # same resamples
        reps_exact, reps_linear = exact.replicates[f"spearman:{column}"], linear.replicates[f"spearman:{column}"]
        assert np.corrcoef(reps_exact, reps_linear)[0, 1] > 0.9
        assert not np.array_equal(reps_exact, reps_linear)


def test_binned_histogram_equals_numpy_histogram2d():
    rng = np.random.default_rng(0)
    n = 20000
    score = rng.random(n).astype(np.float32)
    score[:50], score[50:100], score[100:150] = 1.0, np.nan, 1.7  # top edge, NaN, CL-NMS above 1
    score[150:250] = (np.arange(100) % 50 / 50).astype(np.float32)  # on bin edges
    iou = rng.random(n).astype(np.float32)
    iou[::9], iou[::13] = 1.0, 0.0
    frame = pd.DataFrame({"score": score, "iou": iou, "kept": rng.random(n) < 0.2})
    from misalign.counts import score_iou_histogram

    for kept_only in (False, True):
        rows = frame[frame["kept"]] if kept_only else frame
        x, y = np.minimum(rows["score"].to_numpy(np.float64), 1.0), rows["iou"].to_numpy(np.float64)
        edges = np.linspace(0, 1, 51)
        expected = np.histogram2d(x[np.isfinite(x)], y[np.isfinite(x)], bins=[edges, edges])[0]
        got, got_edges = score_iou_histogram(frame, "score", kept_only=kept_only)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got_edges, edges)
        assert got.sum() == np.isfinite(rows["score"].to_numpy()).sum()


def test_ranking_and_kendall_against_scipy():
    """One sort per column serves every rank statistic: midranks and tie sizes as scipy's rankdata
    counts them, dense ranks in the values' order, and Kendall's tau-b bit-identical to scipy's on
    the raw values (ties included)."""
    from misalign.correlation import Ranking, kendall_tau

    rng = np.random.default_rng(11)
    x = np.round(rng.random(3000), 2)  # ~100 distinct values: many ties
    y = np.where(rng.random(3000) < 0.3, 0.5, rng.random(3000)).astype(np.float32)
    ranked = Ranking(x)
    np.testing.assert_array_equal(ranked.midranks, stats.rankdata(x))
    _, inverse, sizes = np.unique(x, return_inverse=True, return_counts=True)
    np.testing.assert_array_equal(ranked.ties, sizes[inverse])
    np.testing.assert_array_equal(ranked.dense, inverse)
    assert kendall_tau(x, y) == stats.kendalltau(x, y).statistic
    assert kendall_tau(ranked, Ranking(y)) == stats.kendalltau(x, y).statistic
    assert np.isnan(kendall_tau(np.ones(5), np.arange(5.0)))  # constant input: undefined, as scipy


def test_uniform_bin_index_equals_a_search_of_the_edges():
    """floor(v * bins) with its one-step correction bins every value as np.searchsorted over
    np.linspace's edges does, on and beside every edge, in float32 and float64."""
    from misalign.counts import uniform_bin_index

    for bins in (7, 10, 49, 50, 100):
        edges = np.linspace(0.0, 1.0, bins + 1)
        beside = np.r_[edges, np.nextafter(edges, 2), np.nextafter(edges, -1), np.arange(bins + 1) / bins,
                       np.random.default_rng(bins).random(5000), [np.nan, np.inf, -np.inf, -1e-300, 1.5]]
        for values in (beside, beside.astype(np.float32)):
            expected = np.searchsorted(edges, values.astype(np.float64), side="right") - 1
            expected[values == 1.0] = bins - 1  # the last bin is closed
            expected[(expected >= bins) | (expected < 0) | ~np.isfinite(values)] = -1
            np.testing.assert_array_equal(uniform_bin_index(values, bins), expected)


def test_searchsorted_runs_equals_searchsorted():
    from misalign.ledger import searchsorted_runs

    rng = np.random.default_rng(5)
    known = rng.permutation(np.arange(0, 400, 3))
    order = np.argsort(known)
    values = np.repeat(rng.integers(-5, 410, 60), rng.integers(1, 9, 60))  # runs, unsorted, some unknown
    np.testing.assert_array_equal(searchsorted_runs(known, values, sorter=order),
                                  np.searchsorted(known, values, sorter=order))
    np.testing.assert_array_equal(searchsorted_runs(np.sort(known), values), np.searchsorted(np.sort(known), values))
    assert len(searchsorted_runs(known, np.zeros(0, np.int64), sorter=order)) == 0
