"""`misalign report`: the report passes misalign's numbers through unchanged, its CSV tables agree
with metrics.json, a few headline numbers match plain pandas / scipy / pycocotools, the page holds
every section with decodable embedded figures, it degrades gracefully, and bad input is one line.

The ledgers are synthetic (misalign.synthetic, written through misalign.ledger.LedgerWriter), plus
one made by `misalign import` from COCO results (post-NMS only).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import stats

from cli import main
from misalign.cocoeval import ENGINE_NAMES
from misalign.synthetic import synthetic_ledger
from reference import slow_suppression

SIZES = dict(num_images=10, cands_per_image=120, num_categories=4, gt_per_image=4, kept_per_image=15)
REPORT_ARGS = ["--images", "2", "--bootstrap", "30", "--seed", "3"]
SECTION_IDS = ("summary", "differences", "before-after", "figure1", "table1", "figure2", "gallery", "correlation",
               "errors", "calibration", "levels", "training", "coco", "provenance")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory):
    """Ground truth + four dumps of the same images: base (no obj_score, score = cls), conf (obj_score),
    conf_b (a second obj detector), imported (misalign import of base's detections.json: post-NMS only)."""
    root = tmp_path_factory.mktemp("ledgers")
    gt = synthetic_ledger(root / "base", seed=1, with_obj=False, name="retinanet", gt_path=root / "gt.json", **SIZES)
    synthetic_ledger(root / "conf", seed=2, gt_path=gt, name="retinanet-conf", **SIZES)
    synthetic_ledger(root / "conf_b", seed=5, gt_path=gt, obj_coupling=0.4, **SIZES)
    result = run("import", "--gt", gt, "--predictions", root / "base" / "detections.json", "--out", root / "imported")
    assert result.exit_code == 0, result.output
    return {"root": root, "gt": gt, **{k: root / k for k in ("base", "conf", "conf_b", "imported")}}


@pytest.fixture(scope="module")
def pair_report(ledgers):
    """The two-detector --before-after-nms report (written once for the module)."""
    out = ledgers["root"] / "report_pair"
    result = run("report", "--before-after-nms", ledgers["base"], ledgers["conf"], "--out", out, *REPORT_ARGS)
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.strip() == str(out / "index.html")
    return out


def json_normalised(obj):
    """What json.dump/json.load make of `obj` (NaN -> None as the report writes strict JSON)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float) and not np.isfinite(v):
            return None
        return v
    return json.loads(json.dumps(clean(obj)))


# --- numbers -------------------------------------------------------------------------------------


def test_metrics_json_is_compute_metrics_unchanged(ledgers, pair_report):
    from misalign.cocoeval import STAT_KEYS
    from misalign.ledger import read_ledger
    from misalign.levels import LEVEL_COLUMNS, per_level
    from misalign.metrics import compute_metrics

    metrics = json.loads((pair_report / "metrics.json").read_text())
    suppression = {name: m.pop("suppression") for name, m in metrics["detectors"].items()}  # compare adds it
    added = ("errors", "nms_counterfactual", "calibration", "obj_vs_iou")  # compare's, checked in test_errors.py
    assert all(set(added) <= set(m) for m in metrics["detectors"].values())
    metrics["detectors"] = {n: {k: v for k, v in m.items() if k not in added} for n, m in metrics["detectors"].items()}
    expected = {"schema": 1, "detectors": {
        name: {**compute_metrics(ledgers[name], ledgers["gt"], min_iou=0.5, bootstrap=30, seed=3),
               "per_level": per_level(read_ledger(ledgers[name], columns=list(LEVEL_COLUMNS)).candidates,
                                      read_ledger(ledgers[name], columns=[]).meta)}
        for name in ("base", "conf")}}
    assert metrics == json_normalised(expected)
    for name in ("base", "conf"):  # the suppression losses: the plain loops of tests/reference.py
        rows = pd.read_parquet(ledgers[name] / "candidates.parquet").to_dict("records")
        assert suppression[name] == slow_suppression(rows)[1] and suppression[name]["losses"] > 0
    # the keys of metrics.json (misalign.metrics.metrics_document)
    assert list(metrics) == ["schema", "detectors"] and list(metrics["detectors"]) == ["base", "conf"]
    conditions = [f"cls>{t:g}" for t in (0.05, 0.5, 0.6, 0.7, 0.8, 0.9)] + [f"iou>{t:g}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
    for name, m in metrics["detectors"].items():
        assert set(m) == {"ap", "ap_engine", "counts", "survival", "proportions", "crowd", "correlation", "per_level"}
        assert m["ap_engine"]["name"] in ENGINE_NAMES.values() and m["ap_engine"]["version"]
        assert list(m["ap"]) == list(STAT_KEYS)
        assert set(m["counts"]) == {"raw", "anchors", "pre_nms", "post_nms"}
        for stage in ("raw", "pre_nms", "post_nms"):
            assert list(m["counts"][stage]) == conditions
        assert "iou>0.5" in m["counts"]["anchors"]
        assert set(m["proportions"]) == {"pre_nms", "post_nms"}
        columns = {"cls_score", "score"} | ({"obj_score"} if name == "conf" else set())
        assert set(m["correlation"]) == columns
        for entry in m["correlation"].values():
            assert {"spearman", "kendall", "pearson", "spearman_per_gt", "divergence", "n", "n_gt", "ci95"} <= set(entry)
            assert len(entry["ci95"]["spearman"]) == 2


def test_headline_numbers_match_pandas_scipy_pycocotools(ledgers, pair_report):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    metrics = json.loads((pair_report / "metrics.json").read_text())["detectors"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(ledgers["gt"]))
    for name in ("base", "conf"):
        m = metrics[name]
        cands = pd.read_parquet(ledgers[name] / "candidates.parquet")
        kept = cands[cands["kept"]]
        # AP: pycocotools itself on the kept rows (the report may use another engine: same numbers)
        dets = np.column_stack([kept["image_id"], kept["x1"].astype(float), kept["y1"].astype(float),
                                kept["x2"].astype(float) - kept["x1"].astype(float),
                                kept["y2"].astype(float) - kept["y1"].astype(float),
                                kept["score"].astype(float), kept["category_id"]])
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
            evaluator.params.imgIds = sorted(coco_gt.getImgIds())
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert m["ap"]["AP"] == pytest.approx(evaluator.stats[0], abs=1e-6)
        assert m["ap"]["AP50"] == pytest.approx(evaluator.stats[1], abs=1e-6)
        assert m["ap"]["AR100"] == pytest.approx(evaluator.stats[8], abs=1e-6)
        # counts, proportions, survival: strict '>' in float32
        pre_iou = int((cands["iou"] > np.float32(0.5)).sum())
        post_iou = int((kept["iou"] > np.float32(0.5)).sum())
        assert m["counts"]["pre_nms"]["iou>0.5"] == pre_iou
        assert m["counts"]["post_nms"]["iou>0.5"] == post_iou
        assert m["counts"]["pre_nms"]["cls>0.6"] == int((cands["cls_score"] > np.float32(0.6)).sum())
        assert m["survival"]["iou>0.5"] == pytest.approx(post_iou / pre_iou, abs=1e-12)
        assert m["proportions"]["post_nms"]["iou>0.5"] == pytest.approx(post_iou / len(kept), abs=1e-12)
        raw = pd.read_parquet(ledgers[name] / "raw_counts.parquet")
        anchors = raw[(raw["stage"] == "anchors") & (raw["threshold"] == 0.5)]["count"].sum()
        assert m["counts"]["anchors"]["iou>0.5"] == anchors
        # correlations over the pool iou >= 0.5
        pool = cands[cands["iou"] >= np.float32(0.5)]
        rho = stats.spearmanr(pool["score"], pool["iou"]).statistic
        assert m["correlation"]["score"]["spearman"] == pytest.approx(rho, abs=1e-6)
        assert m["correlation"]["score"]["kendall"] == pytest.approx(stats.kendalltau(pool["score"], pool["iou"]).statistic, abs=1e-6)
        assert m["correlation"]["score"]["n"] == len(pool)
        per_gt = [stats.spearmanr(g["score"], g["iou"]).statistic for _, g in pool.groupby("gt_id") if len(g) >= 3]
        per_gt = [r for r in per_gt if np.isfinite(r)]
        assert m["correlation"]["score"]["spearman_per_gt"] == pytest.approx(np.mean(per_gt), abs=1e-6)
        assert m["correlation"]["score"]["divergence"] == pytest.approx((1 - np.mean(per_gt)) / 2, abs=1e-6)
        lo, hi = m["correlation"]["score"]["ci95"]["spearman"]
        assert lo <= rho <= hi


def test_csv_tables_agree_with_metrics_json(pair_report):
    metrics = json.loads((pair_report / "metrics.json").read_text())["detectors"]
    tables = pair_report / "tables"
    coco = pd.read_csv(tables / "coco_ap.csv").set_index("detector")
    corr = pd.read_csv(tables / "correlation.csv").set_index(["detector", "score column"])
    props = pd.read_csv(tables / "proportions.csv").set_index(["detector", "quantity"])
    totals = pd.read_csv(tables / "table1_all.csv")
    summary = pd.read_csv(tables / "summary.csv").set_index("detector")
    for name, m in metrics.items():
        for key, value in m["ap"].items():
            assert coco.loc[name, key] == pytest.approx(value, abs=1e-12)
        assert summary.loc[name, "AP"] == pytest.approx(m["ap"]["AP"], abs=1e-12)
        assert summary.loc[name, "spearman"] == pytest.approx(m["correlation"]["score"]["spearman"], abs=1e-12)
        assert summary.loc[name, "survival iou>0.5"] == pytest.approx(m["survival"]["iou>0.5"], abs=1e-12)
        for column, entry in m["correlation"].items():
            row = corr.loc[(name, column)]
            for key in ("spearman", "kendall", "pearson", "spearman_per_gt", "divergence", "n", "n_gt"):
                assert row[key] == pytest.approx(entry[key], abs=1e-12)
            assert [row["spearman_ci_lo"], row["spearman_ci_hi"]] == pytest.approx(entry["ci95"]["spearman"], abs=1e-12)
        for cond, value in m["proportions"]["pre_nms"].items():
            assert props.loc[(name, "proportion before NMS"), cond] == pytest.approx(value, abs=1e-12)
        for cond, value in m["survival"].items():
            assert props.loc[(name, "survival (after/before count)"), cond] == pytest.approx(value, abs=1e-12)
        for stage, label in (("pre_nms", "before NMS"), ("post_nms", "after NMS"), ("raw", "raw (all anchors' boxes)")):
            rows = totals[totals["stage"] == label].set_index("condition")[name]
            assert rows.to_dict() == m["counts"][stage]
        # Table 1 per detector: the 'all' column is the summed count of metrics.json
        table1 = pd.read_csv(tables / f"table1_{name}.csv")
        post = table1[table1["stage"] == "post_nms"].set_index("condition")["all"]
        assert {k: post[k] for k in m["counts"]["post_nms"]} == m["counts"]["post_nms"]
        assert list(table1.columns[2:4]) == ["1", "2"]  # the first two images, then 'all'


# --- the page ------------------------------------------------------------------------------------


def decoded_images(html: str) -> list[Image.Image]:
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html)
    images = []
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        image.load()
        assert image.format == "PNG" and image.width > 200 and image.height > 100
        images.append(image)
    return images


def test_page_has_every_section_and_decodable_figures(pair_report):
    html = (pair_report / "index.html").read_text()
    for section in SECTION_IDS:
        assert f'id="{section}"' in html, section
    # sections sit side by side, none inside another: each opening is closed before the next one
    tags = re.findall(r"<section\b|</section>", html)
    assert tags == ["<section", "</section>"] * (len(tags) // 2) and tags
    engine = json.loads((pair_report / "metrics.json").read_text())["detectors"]["base"]["ap_engine"]
    assert f"COCOeval by {engine['name']} {engine['version']}" in html  # the page names the AP engine
    images = decoded_images(html)
    pngs = sorted((pair_report / "figures").glob("*.png"))
    assert len(images) == len(pngs) >= 8
    assert {p.stem for p in pngs} >= {"figure1_cls_score_images", "figure1_cls_score_density", "figure1_obj_score_density",
                                       "figure1_score_density", "figure2_proportions", "figure2_per_image", "correlation"}
    # every figure and table has its two-line explanation
    assert html.count("<figcaption>") == len(images)
    assert html.count('<p class="explain">') >= 2 * (len(images) + html.count("<table"))
    # self-contained: no script, no stylesheet or image fetched from anywhere
    assert "<script" not in html and not re.search(r'(src|href)="(https?:)?//', html)
    # the divergence is documented as our definition, with its parameters
    assert "our definition" in html and "(1 − spearman_per_gt) / 2" in html
    assert "B = 30 resamples, seed 3" in html and "at least 3" in html
    # both detectors, their colours, and the comparison
    assert "<h1>Why the wrong boxes survive NMS: base vs conf</h1>" in html
    assert "Headline differences" in html and "95% CI of delta" in html
    assert "base: no object-confidence branch" in html


def test_without_flag_the_before_after_section_is_left_out_and_said_so(ledgers, tmp_path):
    out = tmp_path / "r"
    result = run("report", ledgers["conf"], "--out", out, *REPORT_ARGS)
    assert result.exit_code == 0, result.output
    html = (out / "index.html").read_text()
    assert "misalign report --before-after-nms" in html and 'id="figure1"' not in html
    assert not list((out / "figures").glob("figure1_*"))
    assert "Headline differences" not in html  # one detector: nothing to compare
    decoded_images(html)


def test_no_obj_and_post_nms_only_dumps_degrade_gracefully(ledgers, tmp_path):
    out = tmp_path / "r"
    result = run("report", "--before-after-nms", ledgers["base"], ledgers["imported"], "--out", out, *REPORT_ARGS)
    assert result.exit_code == 0, (result.output, result.exception)
    html = (out / "index.html").read_text()
    metrics = json.loads((out / "metrics.json").read_text())["detectors"]
    # no dump has obj_score: no obj panels, and the page says why
    assert "No dump has an object-confidence branch" in html
    assert not list((out / "figures").glob("figure1_obj_score*"))
    assert "score equals cls_score in every dump" in html
    # the imported dump: post-NMS only, its missing sections are named
    assert metrics["imported"]["counts"]["pre_nms"] == {} and metrics["imported"]["survival"] == {}
    assert "imported: post-NMS only" in html and "no before-NMS panels" in html
    assert "imported: post-NMS only — correlations are over its kept boxes" in html
    assert "imported: no raw_counts" in html
    assert metrics["imported"]["suppression"] == {"losses": None, "eligible": None, "rate": None, "mean_iou_gap": None}
    assert "imported: post-NMS only (meta.json pre_nms false): no suppressed box" in html
    table1 = pd.read_csv(out / "tables" / "table1_imported.csv")
    assert set(table1["stage"]) == {"post_nms"}
    decoded_images(html)


def _section(html: str, section: str, following: str) -> str:
    return html[html.index(f'<section id="{section}"'):html.index(f'<section id="{following}"')]


def test_suppression_section_without_image_files_says_so_and_gives_the_tables(ledgers, pair_report):
    html = (pair_report / "index.html").read_text()
    section = _section(html, "gallery", "correlation")
    metrics = json.loads((pair_report / "metrics.json").read_text())["detectors"]
    # synthetic ledgers record no image folder: a note, no crops, the cases still in a table
    assert "base, conf: meta.json records no image folder (dataset.images)" in section
    assert "<img" not in section and not (pair_report / "figures" / "gallery.png").exists()
    table = pd.read_csv(pair_report / "tables" / "suppression.csv").set_index("detector")
    for name in ("base", "conf"):
        m = metrics[name]["suppression"]
        assert table.loc[name, "losses"] == m["losses"] and table.loc[name, "eligible"] == m["eligible"]
        assert table.loc[name, "rate"] == pytest.approx(m["rate"], abs=1e-15)
        assert table.loc[name, "mean_iou_gap"] == pytest.approx(m["mean_iou_gap"], abs=1e-15)
        row = re.search(rf'{name}</td><td class="">{m["losses"]:,}</td><td class="">{m["eligible"]:,}</td>'
                        rf'<td class="">([^<]+)</td><td class="">([^<]+)</td>', section)
        assert row and row.groups() == (f"{100 * m['rate']:.1f}%", f"{m['mean_iou_gap']:.3f}"), name
    # the gallery: base's worst losses by gap (the plain loops' gaps), conf's numbers for the same ground truths
    cases = pd.read_csv(pair_report / "tables" / "gallery.csv")
    per_gt, _ = slow_suppression(pd.read_parquet(ledgers["base"] / "candidates.parquet").to_dict("records"))
    worst = sorted((g for g, v in per_gt.items() if v["loss"]), key=lambda g: (-per_gt[g]["gap"], g))[:8]
    base, conf = cases[cases["detector"] == "base"], cases[cases["detector"] == "conf"]
    assert base["gt_id"].tolist() == conf["gt_id"].tolist() == worst
    assert base["gap"].tolist() == [per_gt[g]["gap"] for g in worst] and base["loss"].all()
    per_gt_conf, _ = slow_suppression(pd.read_parquet(ledgers["conf"] / "candidates.parquet").to_dict("records"))
    assert conf["loss"].tolist() == [per_gt_conf[g]["loss"] for g in worst]
    assert cases["rank"].tolist() == sorted(cases["rank"].tolist())  # a case's detectors together
    for row in base.itertuples():  # every case is a group of the page's cases table, with its numbers
        assert f"#{row.rank + 1} · gt {row.gt_id}" in section
        cells = re.search(rf'{re.escape(f"#{row.rank + 1} · gt {row.gt_id}")}[^<]*</td></tr><tr>(.*?)</tr>', section)
        texts = re.findall(r"<td[^>]*>(?:<span[^>]*></span>)?([^<]*)</td>", cells.group(1))
        kept = "–" if np.isnan(row.kept_score) else f"{row.kept_score:.3f}"  # a loss without a kept box
        assert texts[:7] == ["base", f"{row.best_any:.3f}", kept, kept if kept == "–" else f"{row.kept_iou:.3f}",
                             f"{row.suppressed_score:.3f}", f"{row.suppressed_iou:.3f}", f"{row.gap:.3f}"], texts


def test_gallery_draws_crops_from_the_recorded_image_files(ledgers, tmp_path):
    gt = json.loads(ledgers["gt"].read_text())
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for image in gt["images"]:
        pixels = rng.integers(0, 255, (image["height"], image["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / image["file_name"])
    dumps = []
    for name in ("base", "conf"):
        dump = _copy(ledgers[name], tmp_path / name)
        meta = json.loads((dump / "meta.json").read_text())
        meta["dataset"]["images"] = str(folder)
        (dump / "meta.json").write_text(json.dumps(meta))
        dumps.append(dump)
    out = tmp_path / "r"
    result = run("report", *dumps, "--out", out, "--images", "1", "--bootstrap", "0")
    assert result.exit_code == 0, (result.output, result.exception)
    html = (out / "index.html").read_text()
    section = _section(html, "gallery", "correlation")
    assert "records no image folder" not in section and "not found" not in section
    assert 'id="fig-gallery"' in section
    (image,) = decoded_images(section)
    saved = Image.open(out / "figures" / "gallery.png")
    assert saved.size == image.size and np.array_equal(np.asarray(saved), np.asarray(image))


def test_gallery_with_its_image_folder_gone_says_so_and_gives_the_table(ledgers, tmp_path):
    dump = _copy(ledgers["conf"], tmp_path / "conf")
    meta = json.loads((dump / "meta.json").read_text())
    meta["dataset"]["images"] = str(tmp_path / "moved")
    (dump / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "r"
    result = run("report", dump, "--out", out, "--images", "1", "--bootstrap", "0")
    assert result.exit_code == 0, (result.output, result.exception)
    section = _section((out / "index.html").read_text(), "gallery", "correlation")
    cases = pd.read_csv(out / "tables" / "gallery.csv")
    assert len(cases) == 8 and not cases["image_found"].any()
    assert cases["image_file"].iloc[0].startswith(str(tmp_path / "moved") + "/")
    assert f"The image files are not found (first: {cases['image_file'].iloc[0]})" in section and "<img" not in section
    assert 'data-table="gallery"' in section and section.count("#1 · gt") == 1


def test_gallery_panels_draw_the_cases_boxes():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    from reports.gallery import BOX_STYLES, figure_gallery

    case = {"rank": 0, "gt_id": 5, "image_id": 1, "best_any": 0.9, "best_kept": 0.6, "gap": 0.3, "loss": True,
            "best_fate": "suppressed", "kept_cand_id": 3, "kept_score": 0.8, "kept_iou": 0.6,
            "suppressed_cand_id": 4, "suppressed_score": 0.3, "suppressed_iou": 0.9, "suppressed_by": 3,
            "suppressed_by_kept": True, "category_id": 1, "category": "cat", "gt_x1": 10.0, "gt_y1": 20.0,
            "gt_x2": 50.0, "gt_y2": 60.0, "kept_x1": 0.0, "kept_y1": 15.0, "kept_x2": 45.0, "kept_y2": 70.0,
            "suppressed_x1": 12.0, "suppressed_y1": 21.0, "suppressed_x2": 51.0, "suppressed_y2": 58.0,
            "image_file": None, "image_found": False}
    fig = figure_gallery({"a": pd.DataFrame([case])}, {"a": "#000000"})
    (ax,) = fig.axes
    rects = {r.get_edgecolor(): r for r in ax.patches if isinstance(r, Rectangle)}
    for prefix, (color, _, _) in BOX_STYLES.items():
        r = rects[to_rgba(color)]
        assert (r.get_x(), r.get_y(), r.get_width(), r.get_height()) == (
            case[f"{prefix}_x1"], case[f"{prefix}_y1"], case[f"{prefix}_x2"] - case[f"{prefix}_x1"],
            case[f"{prefix}_y2"] - case[f"{prefix}_y1"])
    texts = [t.get_text() for t in ax.texts]
    assert "kept 0.80 · IoU 0.60" in texts and "suppr. 0.30 · IoU 0.90" in texts
    assert ax.get_title() == "#1 · gt 5 cat · image 1\ngap 0.30: loss"
    x1, x2 = ax.get_xlim()
    assert x1 <= 0 and x2 >= 51  # the crop holds every box
    plt.close(fig)


def test_ten_detectors_share_one_palette_and_stay_in_rows():
    from reports.figures import detector_palette
    from misalign.compare import coco_frame

    names = [f"det{i}" for i in range(10)]
    palette = detector_palette(names)
    assert list(palette) == names and len(set(palette.values())) == 10
    assert detector_palette(names[:3]) == {n: palette[n] for n in names[:3]}  # same colour in every report
    metrics = {"detectors": {n: {"ap": {"AP": i / 10}} for i, n in enumerate(names)}}
    frame = coco_frame(metrics, names)
    assert list(frame["detector"]) == names and frame.shape[0] == 10  # detectors are rows


def test_density_figure_bins_instead_of_drawing_points():
    from matplotlib.collections import PathCollection, QuadMesh

    from misalign.counts import score_iou_histogram
    from reports.figures import figure_score_iou_density

    rng = np.random.default_rng(0)
    n = 200_000
    cands = pd.DataFrame({"iou": rng.random(n, dtype=np.float32), "cls_score": rng.random(n, dtype=np.float32),
                          "kept": rng.random(n) < 0.1})
    hists = {"a": {"pre_nms": score_iou_histogram(cands, "cls_score")[0],
                   "post_nms": score_iou_histogram(cands, "cls_score", kept_only=True)[0]},
             "b": {"pre_nms": None, "post_nms": score_iou_histogram(cands, "cls_score", kept_only=True)[0]}}
    fig = figure_score_iou_density(hists, np.linspace(0, 1, 51), "cls_score", {"a": "#0072b2", "b": "#e69f00"})
    axes = [ax for ax in fig.axes if ax.get_xlabel() == "IoU with ground truth"]
    assert len(axes) == 4
    meshes = [c for ax in axes for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 3  # b has no pre-NMS stage: an empty panel that says so
    assert not any(isinstance(c, PathCollection) for ax in axes for c in ax.collections)
    assert meshes[0].get_array().sum() == n
    for ax in axes:  # the 0.5 lines on both axes
        xs = {tuple(line.get_xdata()) for line in ax.lines}
        ys = {tuple(line.get_ydata()) for line in ax.lines}
        assert (0.5, 0.5) in xs and (0.5, 0.5) in ys
    import matplotlib.pyplot as plt

    plt.close(fig)


# --- bad input and atomic replacement --------------------------------------------------------------


def test_existing_report_survives_a_failing_run_and_is_replaced_by_a_good_one(ledgers, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    not_a_ledger = tmp_path / "empty"
    not_a_ledger.mkdir()
    assert_one_line_error(run("report", not_a_ledger, "--out", out), "not a ledger")
    assert (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial folder left
    result = run("report", ledgers["conf"], "--out", out, "--images", "1", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "index.html").exists()


def _copy(ledger: Path, dest: Path) -> Path:
    shutil.copytree(ledger, dest)
    return dest


def test_ledger_missing_a_column_is_one_line(ledgers, tmp_path):
    bad = _copy(ledgers["conf"], tmp_path / "bad")
    frame = pd.read_parquet(bad / "candidates.parquet").drop(columns=["iou"])
    frame.to_parquet(bad / "candidates.parquet")
    assert_one_line_error(run("report", bad, "--out", tmp_path / "r"), "candidates.parquet", "missing column", "iou")


def test_ledger_with_a_wrong_dtype_is_one_line(ledgers, tmp_path):
    bad = _copy(ledgers["conf"], tmp_path / "bad")
    frame = pd.read_parquet(bad / "candidates.parquet")
    frame["score"] = frame["score"].astype(np.float64)
    frame.to_parquet(bad / "candidates.parquet")
    assert_one_line_error(run("report", bad, "--out", tmp_path / "r"), "candidates.parquet", "score", "double")


def test_ground_truth_not_matching_the_ledger_is_one_line(ledgers, tmp_path):
    gt = json.loads(ledgers["gt"].read_text())
    for image in gt["images"]:
        image["id"] += 1000
    for ann in gt["annotations"]:
        ann["image_id"] += 1000
    other = tmp_path / "other.json"
    other.write_text(json.dumps(gt))
    assert_one_line_error(run("report", ledgers["conf"], "--gt", other, "--out", tmp_path / "r"),
                          "other.json", "does not match")
    assert not (tmp_path / "r").exists()


def test_dumps_of_different_splits_are_refused(ledgers, tmp_path):
    other = _copy(ledgers["conf"], tmp_path / "other")
    meta = json.loads((other / "meta.json").read_text())
    meta["dataset"]["split"] = "train2017"
    (other / "meta.json").write_text(json.dumps(meta))
    assert_one_line_error(run("report", ledgers["base"], other, "--out", tmp_path / "r"),
                          "train2017", "different datasets or splits")


def test_dumps_of_different_images_are_refused(ledgers, tmp_path):
    small = tmp_path / "small"
    gt = synthetic_ledger(small, seed=9, gt_path=tmp_path / "gt_small.json", **{**SIZES, "num_images": 4})
    assert_one_line_error(run("report", ledgers["base"], small, "--gt", gt, "--out", tmp_path / "r"),
                          "differ", "cannot be compared")


@pytest.mark.parametrize("args, fragments", [
    (["--names", "only-one"], ("--names", "1 name(s) for 2 dump(s)")),
    (["--names", "same,same"], ("--names", "'same' appears twice")),
    (["--gt", "/nonexistent/gt.json"], ("--gt", "not found")),
    (["--min-iou", "1.5"], ("--min-iou",)),
    (["--images", "0"], ("--images",)),
])
def test_bad_options_are_one_line(ledgers, tmp_path, args, fragments):
    result = run("report", ledgers["base"], ledgers["conf"], "--out", tmp_path / "r", *args)
    assert_one_line_error(result, *fragments)


def test_missing_ground_truth_file_named_in_meta_is_one_line(ledgers, tmp_path):
    moved = _copy(ledgers["conf"], tmp_path / "moved")
    meta = json.loads((moved / "meta.json").read_text())
    meta["dataset"]["ann"] = str(tmp_path / "gone.json")
    (moved / "meta.json").write_text(json.dumps(meta))
    assert_one_line_error(run("report", moved, "--out", tmp_path / "r"), "gone.json", "--gt")


# --- the synthetic ledger --------------------------------------------------------------------------


def test_synthetic_ledger_is_valid_and_its_truth_columns_are_consistent(ledgers):
    from misalign.boxes import xywh_to_xyxy
    from misalign.ledger import read_ledger, validate_ledger
    from misalign.truth import match_truth

    validate_ledger(ledgers["conf"])
    ledger = read_ledger(ledgers["conf"])
    cands = ledger.candidates
    gt = json.loads(ledgers["gt"].read_text())
    ann = pd.DataFrame(gt["annotations"])
    for image_id, rows in cands.groupby("image_id"):
        g = ann[ann["image_id"] == image_id]
        iou, gt_id, iou_any = match_truth(rows[["x1", "y1", "x2", "y2"]].to_numpy(), rows["category_id"].to_numpy(),
                                          xywh_to_xyxy(np.array(g["bbox"].tolist())), g["category_id"].to_numpy(),
                                          g["id"].to_numpy(), g["iscrowd"].to_numpy())
        np.testing.assert_allclose(rows["iou"], iou, atol=1e-6)
        np.testing.assert_array_equal(rows["gt_id"], gt_id)
        np.testing.assert_allclose(rows["iou_any"], iou_any, atol=1e-6)
    per_image = cands.groupby("image_id")
    assert (per_image.size() == SIZES["cands_per_image"]).all()
    assert (per_image["kept"].sum() <= SIZES["kept_per_image"]).all()
    assert cands["iou"].min() == 0 and cands["iou"].max() > 0.9  # IoU spans 0..1
    pool = cands[cands["iou"] >= 0.5]
    rho_cls = stats.spearmanr(pool["cls_score"], pool["iou"]).statistic
    rho_obj = stats.spearmanr(pool["obj_score"], pool["iou"]).statistic
    assert 0 < rho_cls < 0.5 < rho_obj  # cls follows IoU only weakly; obj closely
    kept = cands[cands["kept"]]
    assert json.loads((ledgers["conf"] / "detections.json").read_text()).__len__() == len(kept)
    assert ledger.meta["dataset"]["ann"] == str(ledgers["gt"].resolve()) and ledger.meta["pre_nms"] is True


def test_synthetic_ledger_is_deterministic(tmp_path):
    kwargs = dict(num_images=3, cands_per_image=50, num_categories=3, gt_per_image=2, kept_per_image=5, seed=4)
    synthetic_ledger(tmp_path / "a", gt_path=tmp_path / "gt.json", **kwargs)
    synthetic_ledger(tmp_path / "b", gt_path=tmp_path / "gt.json", **kwargs)
    a = pd.read_parquet(tmp_path / "a" / "candidates.parquet")
    b = pd.read_parquet(tmp_path / "b" / "candidates.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_images_shown_one_by_one_are_the_first_with_ground_truth():
    from misalign.compare import images_to_show

    images = pd.DataFrame({"image_id": [10, 11, 12, 13, 14], "num_gt": [0, 3, 0, 1, 2]})
    assert images_to_show(images, 2).tolist() == [11, 13]  # skips the empty images 10 and 12
    # too few images with ground truth: the earliest empty ones fill in, in file order
    assert images_to_show(images, 4).tolist() == [10, 11, 13, 14]


def test_many_detectors_get_one_row_each_in_the_per_image_figure(ledgers, tmp_path):
    out = tmp_path / "four"
    dumps = [ledgers[k] for k in ("base", "conf", "conf_b", "imported")]
    result = run("report", "--before-after-nms", *dumps, "--out", out, "--images", "4", "--bootstrap", "0")
    assert result.exit_code == 0, (result.output, result.exception)
    html = (out / "index.html").read_text()
    assert "of 3 images (the first of the split with ground truth), one row per detector (4 are too many" in html
    assert "one colour per detector, like the paper's Figure 1" not in html
    width, height = Image.open(out / "figures" / "figure1_cls_score_images.png").size
    assert height > width  # 4 rows of detectors, 3 columns of images


def test_per_detector_panels_draw_the_pool_in_grey_and_the_kept_boxes_on_top():
    import matplotlib.pyplot as plt

    from reports import figures as F

    frame = pd.DataFrame({"image_id": [1, 1, 1, 2], "iou": [0.9, 0.6, 0.1, 0.7], "cls_score": [0.8, 0.3, 0.2, 0.5],
                          "kept": [True, False, True, True]})
    frames = {"a": frame, "b": frame, "post": frame[frame["kept"]], "no_obj": frame.assign(cls_score=np.nan)}
    palette = F.detector_palette(list(frames))
    fig = F.figure_score_iou_images_by_detector(frames, [1, 2], "cls_score", palette, post_only={"post"})
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes[::2]] == ["a · image 1", "b · image 1", "post · image 1"]  # no_obj: no row
    a1 = axes[0]
    pool, kept = a1.collections[:2]
    assert pool.get_offsets().tolist() == [[0.9, 0.8], [0.6, 0.3], [0.1, 0.2]]
    assert kept.get_offsets().tolist() == [[0.9, 0.8], [0.1, 0.2]]
    post = next(ax for ax in axes if ax.get_title() == "post · image 1")
    assert [c.get_offsets().tolist() for c in post.collections] == [[[0.9, 0.8], [0.1, 0.2]]]  # kept only, no pool
    plt.close(fig)


def test_histogram_counts_scores_above_one_in_the_top_bin_and_leaves_out_nan():
    from misalign.counts import score_iou_histogram

    cands = pd.DataFrame({"score": [0.25, 1.5, 1.0, np.nan], "iou": [0.35, 0.95, 0.05, 0.5], "kept": [True] * 4})
    counts, edges = score_iou_histogram(cands, "score", bins=10)
    assert counts.sum() == 3
    assert counts[2, 3] == 1  # (0.25, 0.35)
    assert counts[9, 9] == 1 and counts[9, 0] == 1  # 1.5 and 1.0 both in the top score bin


def test_scores_above_one_get_a_note_naming_the_dump(ledgers, tmp_path):
    """A CL-NMS-like dump (score = cls + closeness, up to 2) gets a note instead of losing its boxes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shifted = tmp_path / "cl"
    shutil.copytree(ledgers["base"], shifted)
    path = shifted / "candidates.parquet"
    frame = pq.read_table(path).to_pandas()
    frame["score"] = frame["cls_score"] + 0.5  # a constant shift: NMS's order, and so the ledger, stay valid
    pq.write_table(pa.Table.from_pandas(frame, schema=pq.read_schema(path), preserve_index=False), path)
    out = tmp_path / "report"
    result = run("report", "--before-after-nms", ledgers["conf"], shifted, "--out", out, "--images", "1",
                 "--bootstrap", "0")
    assert result.exit_code == 0, (result.output, result.exception)
    html = (out / "index.html").read_text()
    assert "cl: the NMS score exceeds 1" in html and "on their top edge (score = 1)" in html
    assert html.count("the NMS score exceeds 1") == 1  # conf's scores are probabilities: not named


def test_many_detectors_get_one_row_each_in_the_differences_table(ledgers, tmp_path):
    out = tmp_path / "four"
    dumps = [ledgers[k] for k in ("base", "conf", "conf_b", "imported")]
    result = run("report", *dumps, "--out", out, "--images", "1", "--bootstrap", "20", "--seed", "1")
    assert result.exit_code == 0, (result.output, result.exception)
    long = pd.read_csv(out / "tables" / "differences.csv")  # the CSV keeps compare()'s long rows
    assert set(long["detector"]) == {"conf", "conf_b", "imported"}  # names are the dump folders
    html = (out / "index.html").read_text()
    section = html[html.index('id="differences"'):html.index('id="before-after"')]
    assert "one row per detector" in section and section.count("<tr") == 1 + 3  # header + a row per detector
    for row in long.itertuples():  # every delta, with its CI where it has one, is a cell of its detector's row
        ci = "" if np.isnan(row.ci95_lo) else f" [{row.ci95_lo:.3f}, {row.ci95_hi:.3f}]"
        assert f"{row.delta:+.3f}{ci}" in section


def _recorded_ap_figure(pid_file, ap, palette):
    """figure_ap, noting which process drew it."""
    from reports.figures import figure_ap

    with open(pid_file, "a") as f:
        f.write(f"{os.getpid()}\n")
    if ap is None:
        raise ValueError("a drawing that fails")
    return figure_ap(ap, palette)


def test_figures_drawn_in_worker_processes_equal_those_drawn_here(tmp_path, monkeypatch):
    """On a multi-core Linux machine render_figures draws each figure in a forked worker; the PNG
    bytes are those the report's own process draws, and a failing drawing fails the report. On one
    core, or where no process can be started, the figures are drawn here."""
    from functools import partial

    from reports import figures as F

    palette = {"a": "#0072b2", "b": "#d55e00"}
    aps = [{"a": {"AP": 0.1 * i, "AP50": 0.3, "AP75": 0.2}, "b": {"AP": 0.2, "AP50": 0.5 - 0.1 * i, "AP75": 0.1}}
           for i in range(3)]
    pids = tmp_path / "pids"

    def figures(*ap_of):
        return [F._figure(f"ap{i}", partial(_recorded_ap_figure, pids, ap, palette), ("what", "why"), "")
                for i, ap in enumerate(ap_of)]

    here = [f.png for f in figures(*aps)]
    assert set(pids.read_text().split()) == {str(os.getpid())}
    pids.unlink()
    monkeypatch.setattr(F.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(F.sys, "platform", "linux")
    drawn = figures(*aps)
    F.render_figures(drawn)
    assert [f.png for f in drawn] == here
    workers = set(pids.read_text().split())
    assert str(os.getpid()) not in workers and len(pids.read_text().split()) == 3
    with pytest.raises(ValueError, match="a drawing that fails"):
        F.render_figures(figures(aps[0], None))
    monkeypatch.setattr(F.os, "sched_getaffinity", lambda pid: {0})  # one core: drawn here, in order
    assert _rendered_here(figures(*aps), pids) == here
    monkeypatch.setattr(F.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(F.multiprocessing, "get_context", _refused)  # no process to be had: drawn here too
    assert _rendered_here(figures(*aps), pids) == here


def _rendered_here(figures, pids) -> list[bytes]:
    """render_figures' PNGs, checking that this process drew every one."""
    from reports.figures import render_figures

    pids.unlink(missing_ok=True)
    render_figures(figures)
    assert set(pids.read_text().split()) == {str(os.getpid())}
    return [f.png for f in figures]


def _refused(method):
    raise OSError("[Errno 11] Resource temporarily unavailable")
