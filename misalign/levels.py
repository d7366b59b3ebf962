"""Per-level audit of a ledger: per FPN level, candidates, kept boxes, Spearman(score, IoU) and the
share of rows whose `score` is the dump's own score formula (docs/methods.md, "Per-level audit").

The formula is the one meta.json `postprocess` records: `alpha` a number -> obj^alpha · cls^(1−alpha)
(every branch model of the bundled detector); no alpha and `score_formula` "cls" (optionally followed
by a parenthesised note, as CL-NMS writes) -> cls; anything else (imports, other frameworks' captures)
-> unknown, and the share is None. A level scored by another rule shows a share below 1: with
`conf_skip_p7` (the original RetinaNet-Conf code) the levels with at most `topk` anchors rank by
cls^(1−alpha) alone, a share of 0.

"Equals" tolerates float32 rounding: the formula is computed in float32 the way detector/postprocess.py
does (`obj ** a * cls ** (1 − a)`, each factor a float32 power) and a row matches when
|score − formula| ≤ FORMULA_ULPS float32 ulps of the formula. numpy's and torch's float32 powers
differ from the exact value by up to ~2.5 ulps each, so the two disagree by up to ~5 ulps; a skipped
obj factor is off by obj^alpha, about 2% (10^5 ulps) for the zoo's highest obj of 0.96.

The Spearman pool is the main correlation's (misalign.correlation.pool_mask on `score`: iou ≥ min_iou,
finite score, not crowd). Levels are labelled P3 … P7 (ledger level 0 … 4; a level k is P{k+3}) and
"unknown" for level −1 (imports); only levels with candidates appear, in level order, unknown last.

Public API:
- LEVEL_COLUMNS: the candidates columns `per_level` reads
- level_label(level) -> "P3" | ... | "unknown"
- ScoreFormula(alpha).apply(cls, obj) -> [N] float32; score_formula(meta) -> ScoreFormula | None
- formula_matches(score, cls, obj, formula) -> [N] bool
- per_level(candidates, meta, min_iou=0.5) -> {label: {"n", "kept", "spearman", "formula_share"}}
- level_tallies(candidates, formula) (adds up over batches); level_spearman(level, score, iou) -> {level: rho};
  level_entries(tallies, rho, formula) -> per_level
- is_flagged(entry) -> bool: the level's score is not the formula on some row
- levels_frame(per_level_by_detector) -> DataFrame (tables/levels.csv)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from misalign.correlation import per_gt_spearman_columns, pool_mask

LEVEL_COLUMNS = ("level", "kept", "score", "cls_score", "obj_score", "iou", "crowd")
FORMULA_ULPS = 8  # |score − formula| ≤ this many float32 ulps of the formula counts as equal
UNKNOWN = "unknown"
LEVEL_ENTRY_KEYS = ("n", "kept", "spearman", "formula_share")
FORMULA_BLOCK = 1 << 21  # rows per block of the formula check (bounds its temporaries to ~40 MB)


def level_label(level: int) -> str:
    """'P3' for ledger level 0 (stride 8), ..., 'P7' for 4; 'unknown' for a negative level."""
    return UNKNOWN if level < 0 else f"P{int(level) + 3}"


@dataclass(frozen=True)
class ScoreFormula:
    """score = obj^alpha · cls^(1−alpha), or cls when alpha is None."""

    alpha: float | None

    @property
    def text(self) -> str:
        return "cls" if self.alpha is None else f"obj^{self.alpha:g} · cls^{1 - self.alpha:g}"

    def apply(self, cls: np.ndarray, obj: np.ndarray) -> np.ndarray:
        """[N] float32: the formula on float32 inputs, computed in float32 like detector/postprocess.py's
        joint_score (each power rounded to float32, then the product)."""
        cls = np.asarray(cls, np.float32)
        if self.alpha is None:
            return cls
        obj = np.asarray(obj, np.float32)
        with np.errstate(invalid="ignore"):
            return np.power(obj, np.float32(self.alpha)) * np.power(cls, np.float32(1.0 - self.alpha))


def score_formula(meta: dict) -> ScoreFormula | None:
    """The score formula meta.json `postprocess` records, or None when it names none we can apply."""
    post = meta.get("postprocess") or {}
    alpha = post.get("alpha")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        return ScoreFormula(float(alpha))
    text = post.get("score_formula")
    # "cls", or "cls (NMS chooses by it + CL-NMS ...)": CL-NMS keeps the class probability as the score.
    if isinstance(text, str) and text.split(" (", 1)[0].strip() == "cls":
        return ScoreFormula(None)
    return None


def formula_matches(score, cls, obj, formula: ScoreFormula) -> np.ndarray:
    """[N] bool: the row's score equals the formula of its cls and obj within FORMULA_ULPS float32 ulps
    (NaN, e.g. a missing obj_score under a joint formula, never matches)."""
    expected = formula.apply(cls, obj)
    score = np.asarray(score, np.float32)
    with np.errstate(invalid="ignore"):
        return np.abs(score - expected) <= FORMULA_ULPS * np.spacing(np.abs(expected))


def level_tallies(candidates: pd.DataFrame, formula: ScoreFormula | None) -> dict[int, np.ndarray]:
    """{ledger level: [n, kept, rows whose score is the formula] int64} of these rows (formula None:
    the last count 0). Tallies of row batches add up (misalign.scan sums them over a ledger)."""
    level = candidates["level"].to_numpy()
    if not len(level):
        return {}
    levels, codes = np.unique(level, return_inverse=True)
    codes = codes.reshape(-1)
    n = np.bincount(codes, minlength=len(levels))
    kept = np.bincount(codes, weights=candidates["kept"].to_numpy(bool), minlength=len(levels))
    matches = np.zeros(len(levels))
    if formula is not None:
        matches = _matching_counts(candidates, codes, len(levels), formula)
    return {int(lv): np.array([n[k], kept[k], matches[k]], np.int64) for k, lv in enumerate(levels)}


def level_spearman(level, score, iou) -> dict[int, float]:
    """{ledger level: Spearman(score, iou)} over the pool rows of each level with at least 2 of them
    (NaN where all are tied). level [n]; score, iou [n]: arrays, or their
    misalign.correlation.Rankings (misalign.metrics passes the ones its correlations made)."""
    level = np.asarray(level).astype(np.int64)
    if not len(level):
        return {}
    low = int(level.min())
    # per_gt_spearman_columns is a Spearman per group of any non-negative integer codes: here the level.
    table = per_gt_spearman_columns([score], iou, level - low, min_count=2)[0]
    return dict(zip((table["gt_id"].to_numpy() + low).tolist(), table["spearman"].to_numpy()))


def level_entries(tallies: dict[int, np.ndarray], rho: dict[int, float], formula: ScoreFormula | None) -> dict[str, dict]:
    """metrics.json `per_level` from a ledger's `level_tallies` and `level_spearman` over its
    correlation pool: {label: {"n", "kept", "spearman", "formula_share"}}, P3 ... P7, unknown last."""
    order = sorted(tallies, key=lambda lv: (lv < 0, lv))
    return {level_label(lv): {
        "n": int(tallies[lv][0]), "kept": int(tallies[lv][1]), "spearman": _finite(rho.get(lv, np.nan)),
        "formula_share": None if formula is None else _finite(tallies[lv][2] / tallies[lv][0])} for lv in order}


def per_level(candidates: pd.DataFrame, meta: dict, min_iou: float = 0.5) -> dict[str, dict]:
    """metrics.json `per_level` of one ledger in memory: {label: {"n", "kept", "spearman", "formula_share"}}.

    candidates: at least LEVEL_COLUMNS (`crowd` optional). n: candidates of the level; kept: of them
    in the output; spearman: Spearman(score, iou) over the level's pool rows (None with fewer than 2
    or all tied); formula_share: share of the level's rows whose score is the formula (None when
    meta names none). One O(N) pass per quantity (bincount over level codes), one sort for the ranks.
    """
    formula = score_formula(meta)
    pool = np.flatnonzero(pool_mask(candidates, "score", min_iou))
    rho = level_spearman(*(candidates[c].to_numpy()[pool] for c in ("level", "score", "iou")))
    return level_entries(level_tallies(candidates, formula), rho, formula)


def _matching_counts(candidates: pd.DataFrame, codes: np.ndarray, num_codes: int, formula: ScoreFormula,
                     block: int = FORMULA_BLOCK) -> np.ndarray:
    """[num_codes] rows per level whose score is the formula, in blocks of rows (the float32 temporaries
    of a 20 M-row ledger would otherwise take ~0.5 GB)."""
    score, cls, obj = (candidates[c].to_numpy() for c in ("score", "cls_score", "obj_score"))
    counts = np.zeros(num_codes)
    for start in range(0, len(codes), block):
        rows = slice(start, start + block)
        matches = formula_matches(score[rows], cls[rows], obj[rows], formula)
        counts += np.bincount(codes[rows], weights=matches, minlength=num_codes)
    return counts


def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def is_flagged(entry: dict) -> bool:
    """A level whose score is not the dump's formula on some of its rows (share known and below 1)."""
    share = entry.get("formula_share")
    return share is not None and share < 1.0


def levels_frame(per_level_by_detector: dict[str, dict]) -> pd.DataFrame:
    """tables/levels.csv: one row per (detector, level) of metrics.json `per_level`, plus `flagged`."""
    rows = [{"detector": name, "level": label, **{k: entry.get(k) for k in LEVEL_ENTRY_KEYS},
             "flagged": is_flagged(entry)}
            for name, levels in per_level_by_detector.items() for label, entry in (levels or {}).items()]
    return pd.DataFrame(rows, columns=["detector", "level", *LEVEL_ENTRY_KEYS, "flagged"])
