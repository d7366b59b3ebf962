"""Per-level audit (issue 14 §4, misalign.levels) and the report's levels and training sections: the
numbers against a slow reference (a plain loop over rows and scipy.stats.spearmanr), a hand-made
ledger whose P7 is scored without the obj factor (share 0, flagged on the page), and the curves of a
checkpoint's log.csv on the page (docs/methods.md, "Per-level audit", "Alignment during training")."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy import stats

from cli import main
from misalign.levels import (FORMULA_ULPS, ScoreFormula, _matching_counts, formula_matches, level_label, levels_frame,
                             per_level, score_formula)
from misalign.synthetic import synthetic_ledger

SIZES = dict(num_images=12, cands_per_image=150, num_categories=3, gt_per_image=4, kept_per_image=15)
ARGS = ["--images", "2", "--bootstrap", "0"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory):
    root = tmp_path_factory.mktemp("levels")
    gt = synthetic_ledger(root / "conf", seed=4, gt_path=root / "gt.json", **SIZES)
    synthetic_ledger(root / "base", seed=6, gt_path=gt, with_obj=False, **SIZES)
    return {"root": root, "gt": gt, "conf": root / "conf", "base": root / "base"}


def _candidates(folder) -> pd.DataFrame:
    return pd.read_parquet(folder / "candidates.parquet")


def _meta(folder) -> dict:
    return json.loads((folder / "meta.json").read_text())


def slow_per_level(cands: pd.DataFrame, alpha, min_iou=0.5) -> dict:
    """Row by row: n, kept, the pool's scipy Spearman, the share of rows whose score is the formula
    (float64 formula, FORMULA_ULPS float32 ulps of tolerance)."""
    out = {}
    for level in sorted(set(cands["level"].tolist()), key=lambda v: (v < 0, v)):
        rows = cands[cands["level"] == level]
        pool = [(s, i) for s, i, c in zip(rows["score"], rows["iou"], rows["crowd"]) if i >= np.float32(min_iou)
                and not c and math.isfinite(s)]
        rho = stats.spearmanr(*zip(*pool)).statistic if len(pool) >= 2 else float("nan")
        matches = 0
        for score, cls, obj in zip(rows["score"], rows["cls_score"], rows["obj_score"]):
            expected = float(cls) if alpha is None else float(obj) ** alpha * float(cls) ** (1 - alpha)
            matches += abs(float(score) - expected) <= FORMULA_ULPS * float(np.spacing(np.float32(expected)))
        out[level_label(level)] = {"n": len(rows), "kept": int(rows["kept"].sum()),
                                   "spearman": None if not math.isfinite(rho) else rho,
                                   "formula_share": matches / len(rows)}
    return out


def _assert_same(got: dict, expected: dict):
    assert list(got) == list(expected)
    for label, entry in expected.items():
        assert got[label]["n"] == entry["n"] and got[label]["kept"] == entry["kept"], label
        assert got[label]["spearman"] == pytest.approx(entry["spearman"], abs=1e-9), label
        assert got[label]["formula_share"] == pytest.approx(entry["formula_share"], abs=1e-12), label


@pytest.mark.parametrize("name", ["conf", "base"])
def test_per_level_matches_a_slow_reference_on_a_synthetic_ledger(ledgers, name):
    cands, meta = _candidates(ledgers[name]), _meta(ledgers[name])
    got = per_level(cands, meta)
    assert list(got) == ["P3", "P4", "P5", "P6", "P7"]
    _assert_same(got, slow_per_level(cands, meta["postprocess"]["alpha"]))
    assert all(entry["formula_share"] == 1.0 for entry in got.values())


def _skip_p7(cands: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """P7 scored as the original RetinaNet-Conf code does on a small level: cls^(1−alpha), no obj factor."""
    p7 = cands["level"].to_numpy() == 4
    score = cands["score"].to_numpy().copy()
    score[p7] = np.power(cands["cls_score"].to_numpy()[p7], np.float32(1 - alpha))
    return cands.assign(score=score)


def test_a_level_scored_without_the_obj_factor_has_share_zero_and_is_flagged(ledgers):
    meta = _meta(ledgers["conf"])
    cands = _skip_p7(_candidates(ledgers["conf"]), meta["postprocess"]["alpha"])
    got = per_level(cands, meta)
    _assert_same(got, slow_per_level(cands, meta["postprocess"]["alpha"]))
    assert got["P7"]["formula_share"] == 0.0 and all(got[k]["formula_share"] == 1.0 for k in ("P3", "P4", "P5", "P6"))
    # the formula check in blocks of rows counts the same as in one block
    codes = cands["level"].to_numpy().astype(np.intp)
    blocked = _matching_counts(cands, codes, 5, ScoreFormula(meta["postprocess"]["alpha"]), block=7)
    assert blocked.tolist() == [got[f"P{k + 3}"]["n"] for k in range(4)] + [0]
    frame = levels_frame({"conf": got})
    assert frame.set_index("level")["flagged"].to_dict() == {"P3": False, "P4": False, "P5": False, "P6": False,
                                                             "P7": True}


def test_formula_equality_by_hand():
    cls = np.float32([0.5, 0.5, 0.5, 0.5, 0.8])
    obj = np.float32([0.9, 0.9, 0.9, np.nan, 0.3])
    exact = np.float32(0.9 ** 0.4 * 0.5 ** 0.6)
    score = np.array([exact, exact + 3 * np.spacing(exact), exact + 20 * np.spacing(exact), exact,
                      np.float32(0.8) ** np.float32(0.6)], np.float32)  # the last: the obj factor left out
    assert formula_matches(score, cls, obj, ScoreFormula(0.4)).tolist() == [True, True, False, False, False]
    assert formula_matches(np.float32([0.5, 0.51]), cls[:2], obj[:2], ScoreFormula(None)).tolist() == [True, False]


def test_score_formula_from_meta():
    assert score_formula({"postprocess": {"alpha": 0.4, "score_formula": "obj^0.4 * cls^0.6"}}) == ScoreFormula(0.4)
    assert score_formula({"postprocess": {"alpha": None, "score_formula": "cls"}}) == ScoreFormula(None)
    cl_nms = "cls (NMS chooses by it + CL-NMS centre closeness, weight 1)"
    assert score_formula({"postprocess": {"score_formula": cl_nms, "alpha": None}}) == ScoreFormula(None)
    for meta in ({}, {"postprocess": None}, {"postprocess": {"score_formula": "torchvision FCOS"}},
                 {"postprocess": {"score_formula": None, "alpha": None}}):
        assert score_formula(meta) is None
    assert ScoreFormula(0.4).text == "obj^0.4 · cls^0.6" and ScoreFormula(None).text == "cls"


def test_levels_without_a_formula_or_a_level_are_unknown():
    cands = pd.DataFrame({"level": np.int8([-1, -1, -1]), "kept": [True, True, False],
                          "score": np.float32([0.9, 0.8, 0.7]), "cls_score": np.float32([0.9, 0.8, 0.7]),
                          "obj_score": np.float32([np.nan] * 3), "iou": np.float32([0.9, 0.6, 0.7]),
                          "crowd": [False, False, False]})
    got = per_level(cands, {"postprocess": {"score_formula": None, "alpha": None}})
    assert got == {"unknown": {"n": 3, "kept": 2, "spearman": pytest.approx(0.5), "formula_share": None}}
    assert not levels_frame({"imported": got})["flagged"].any()
    assert per_level(cands.iloc[:0], {}) == {}


# --- the report --------------------------------------------------------------------------------------


def _rewrite_candidates(folder, cands: pd.DataFrame) -> None:
    """candidates.parquet with new values, the ledger's exact schema kept."""
    path = folder / "candidates.parquet"
    schema = pq.read_schema(path)
    pq.write_table(pa.Table.from_pandas(cands[schema.names], schema=schema, preserve_index=False), path)


def test_report_flags_the_level_and_shows_the_training_curves(ledgers, tmp_path):
    skip = tmp_path / "skip"
    shutil.copytree(ledgers["conf"], skip)
    meta = _meta(skip)
    _rewrite_candidates(skip, _skip_p7(_candidates(skip), meta["postprocess"]["alpha"]))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    meta["postprocess"]["conf_skip_p7"] = True
    meta["checkpoint"] = str(run_dir / "checkpoint.pt")
    (skip / "meta.json").write_text(json.dumps(meta))
    pd.DataFrame({"step": [1, 2, 3, 4], "epoch": [1, 1, 2, 2], "classification": [1.0, 0.8, 0.6, 0.5],
                  "loss": [2.0, 1.6, 1.2, 1.0], "lr": 0.01, "images_per_s": 10.0,
                  "align_spearman": [None, 0.2, None, 0.4], "obj_iou_mae": [None, 0.3, None, 0.2]}
                 ).to_csv(run_dir / "log.csv", index=False)

    out = tmp_path / "report"
    result = run("report", ledgers["base"], skip, "--out", out, *ARGS)
    assert result.exit_code == 0, (result.output, result.exception)
    html = (out / "index.html").read_text()
    metrics = json.loads((out / "metrics.json").read_text())["detectors"]
    # metrics.json per_level is misalign.levels.per_level of each ledger
    for name, folder in (("base", ledgers["base"]), ("skip", skip)):
        expected = per_level(_candidates(folder), _meta(folder))
        assert metrics[name]["per_level"] == json.loads(json.dumps(expected))
    levels = pd.read_csv(out / "tables" / "levels.csv")
    flagged = levels[levels["flagged"]]
    assert flagged[["detector", "level"]].values.tolist() == [["skip", "P7"]]
    assert flagged["formula_share"].tolist() == [0.0] and flagged["formula"].tolist() == ["obj^0.4 · cls^0.6"]
    for row in levels.itertuples():
        entry = metrics[row.detector]["per_level"][row.level]
        assert (row.n, row.kept) == (entry["n"], entry["kept"])
        assert row.spearman == pytest.approx(entry["spearman"], abs=1e-12)
    # the page: the levels table with the flag and its note; the training section with its curves
    section = html.split('<section id="levels">', 1)[1].split("</section>", 1)[0]
    assert section.count("⚠ score ≠ formula") == 1 and "skip: on P7 the score is not the dump&#39;s own formula" in section
    assert "conf_skip_p7 is true" in section
    training = html.split('<section id="training">', 1)[1].split("</section>", 1)[0]
    assert 'id="fig-training"' in training and "base: meta.json names no checkpoint" in training
    assert (out / "figures" / "training.png").is_file()
    curves = pd.read_csv(out / "tables" / "training.csv")
    assert curves["detector"].tolist() == ["skip", "skip"]
    assert curves["loss"].tolist() == pytest.approx([1.8, 1.1]) and curves["align_spearman"].tolist() == [0.2, 0.4]


def test_report_of_dumps_without_log_says_so(ledgers, tmp_path):
    out = tmp_path / "report"
    result = run("report", ledgers["conf"], "--out", out, *ARGS)
    assert result.exit_code == 0, (result.output, result.exception)
    html = (out / "index.html").read_text()
    assert 'id="levels"' in html and 'id="training"' in html and "⚠" not in html
    assert "No dump has a readable log.csv beside its checkpoint" in html
    assert pd.read_csv(out / "tables" / "training.csv").empty
