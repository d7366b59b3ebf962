"""Turn metrics.json-shaped dicts and tables into the report's tables, CSV files and HTML page.

Every function here rearranges or formats numbers it is given; none computes a metric. Tables are
built as DataFrames first (those are what `tables/*.csv` hold, full precision), then formatted for
the page. The page is one self-contained HTML file rendered from `templates/report.html.j2`:
inline CSS, figures as base64 PNG data URIs, no script, no network.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

CLS_CONDITIONS = ("cls>0.05", "cls>0.5", "cls>0.6", "cls>0.7", "cls>0.8", "cls>0.9")
IOU_CONDITIONS = ("iou>0.5", "iou>0.6", "iou>0.7", "iou>0.8", "iou>0.9")
CONDITIONS = CLS_CONDITIONS + IOU_CONDITIONS  # Table 1's eleven, in the paper's order
SCORE_COLUMNS = ("cls_score", "obj_score", "score")
STAGES = (("anchors", "positive anchors"), ("raw", "raw (all anchors' boxes)"),
          ("pre_nms", "before NMS"), ("post_nms", "after NMS"))


# ---------------------------------------------------------------------------------------------
# figures and tables as the template wants them


@dataclass
class Figure:
    key: str  # file stem under figures/ and the HTML id
    png: bytes  # the PNG file
    explain: tuple[str, str]  # two lines: what it shows, how to read it
    alt: str = ""  # alt text

    @property
    def data(self) -> str:
        return base64.b64encode(self.png).decode("ascii")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, read from the PNG header."""
        width, height = struct.unpack(">II", self.png[16:24])
        return width, height


@dataclass
class Table:
    key: str  # CSV stem under tables/ and the HTML id
    frame: pd.DataFrame  # full-precision numbers, written to tables/<key>.csv
    explain: tuple[str, str]  # two lines: what it shows, how to read it
    formats: dict = field(default_factory=dict)  # column -> format function for the page
    left: tuple = ()  # columns aligned left (text)
    colors: dict = field(default_factory=dict)  # first-cell value -> swatch colour
    groups: str | None = None  # column whose changes start a group row (not shown as a column)
    detector: str | None = None  # Table 1 per detector: its name
    num_shown: int = 0  # Table 1 per detector: images shown one by one
    csv: pd.DataFrame | None = None  # what tables/<key>.csv holds when it differs from `frame` (full numbers)

    def context(self) -> dict:
        """The dict the template's `table` macro reads."""
        columns = [c for c in self.frame.columns if c != self.groups]
        rows, current = [], object()
        for record in self.frame.to_dict("records"):
            if self.groups is not None and record[self.groups] != current:
                current = record[self.groups]
                rows.append({"group": current})
            cells = [_cell(record[c], self.formats.get(c)) for c in columns]
            rows.append({"cells": cells, "color": self.colors.get(record[columns[0]])})
        return {"key": self.key, "columns": columns, "rows": rows, "left": set(self.left) | {columns[0]},
                "explain": self.explain, "detector": self.detector, "num_shown": self.num_shown}


def _cell(value, fmt) -> dict:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"text": "–", "cls": ""}
    if fmt is not None:
        text = fmt(value)
        cls = "neg" if getattr(fmt, "signed", False) and value < 0 else ("pos" if getattr(fmt, "signed", False) and value > 0 else "")
        return {"text": text, "cls": cls}
    if isinstance(value, (float, np.floating)):
        return {"text": f"{value:.3f}", "cls": ""}
    if isinstance(value, (int, np.integer)):
        return {"text": f"{value:,}", "cls": ""}
    return {"text": str(value), "cls": ""}


def fmt_float(digits: int = 3, signed: bool = False):
    def fmt(v):
        return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    fmt.signed = signed
    return fmt


def fmt_percent(digits: int = 1, signed: bool = False):
    def fmt(v):
        return f"{100 * v:+.{digits}f}%" if signed else f"{100 * v:.{digits}f}%"
    fmt.signed = signed
    return fmt


def fmt_count(v) -> str:
    return f"{int(v):,}"


# ---------------------------------------------------------------------------------------------
# tables from metrics.json


def _get(d: dict, *keys, default=None):
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def coco_frame(metrics: dict, names: list[str]) -> pd.DataFrame:
    from misalign.cocoeval import STAT_KEYS

    rows = [{"detector": n, **{k: _get(metrics["detectors"][n], "ap", k) for k in STAT_KEYS}} for n in names]
    return pd.DataFrame(rows, columns=["detector", *STAT_KEYS])


def correlation_frame(metrics: dict, names: list[str]) -> pd.DataFrame:
    rows = []
    for name in names:
        for col, c in (_get(metrics["detectors"][name], "correlation", default={}) or {}).items():
            lo, hi = (_get(c, "ci95", "spearman") or [None, None])
            rows.append({"detector": name, "score column": col, "spearman": c.get("spearman"),
                         "spearman_ci_lo": lo, "spearman_ci_hi": hi, "kendall": c.get("kendall"),
                         "pearson": c.get("pearson"), "spearman_per_gt": c.get("spearman_per_gt"),
                         "divergence": c.get("divergence"), "n": c.get("n"), "n_gt": c.get("n_gt")})
    return pd.DataFrame(rows, columns=["detector", "score column", "spearman", "spearman_ci_lo", "spearman_ci_hi",
                                       "kendall", "pearson", "spearman_per_gt", "divergence", "n", "n_gt"])


def proportions_frame(metrics: dict, names: list[str]) -> pd.DataFrame:
    """Rows detector x {before NMS, after NMS, survival}; columns the eleven conditions."""
    rows = []
    for name in names:
        m = metrics["detectors"][name]
        for what, values in (("proportion before NMS", _get(m, "proportions", "pre_nms")),
                             ("proportion after NMS", _get(m, "proportions", "post_nms")),
                             ("survival (after/before count)", _get(m, "survival"))):
            if values:
                rows.append({"detector": name, "quantity": what, **{c: values.get(c) for c in CONDITIONS}})
    return pd.DataFrame(rows, columns=["detector", "quantity", *CONDITIONS])


def counts_total_frame(metrics: dict, names: list[str]) -> pd.DataFrame:
    """Table 1 summed over images: rows (stage, condition), one column per detector."""
    rows = []
    for stage, label in STAGES:
        conditions = ("iou>0.5",) if stage == "anchors" else CONDITIONS
        for cond in conditions:
            values = {n: _get(metrics["detectors"][n], "counts", stage, cond) for n in names}
            if all(v is None for v in values.values()):
                continue
            rows.append({"stage": label, "condition": cond, **values})
    return pd.DataFrame(rows, columns=["stage", "condition", *names])


# ---------------------------------------------------------------------------------------------
# page


def template_environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
    )


def figure_context(fig: Figure) -> dict:
    width, height = fig.size
    # shown at most 1280 px wide; the PNG keeps its full resolution for zooming
    scale = min(1.0, 1280 / width)
    return {"key": fig.key, "data": fig.data, "explain": fig.explain, "alt": fig.alt or fig.key,
            "width": int(width * scale), "height": int(height * scale)}


def render_page(context: dict) -> str:
    """The HTML page for a context of plain values, Figure and Table objects."""
    def convert(value):
        if isinstance(value, Figure):
            return figure_context(value)
        if isinstance(value, Table):
            return value.context()
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return template_environment().get_template("report.html.j2").render(**convert(context))


def meta_json_text(meta: dict) -> str:
    return json.dumps(meta, indent=2, sort_keys=False, default=str)
