"""Figures and the HTML report. Renders what `misalign.compare` returns; computes no number itself.

- `write_report(dumps, out, **options) -> Path`: the `misalign report` folder (index.html,
  metrics.json, tables/*.csv, figures/*.png); options are `ReportConfig`'s fields.
- `reports.figures`: the drawings (matplotlib, Agg) and the report's captioned figures.
- `reports.tables`: the report's tables, formatted from misalign's frames.
- `reports.page`: the page (sections, notes, template) and `write_report`.
"""

from .page import ReportConfig, write_report

__all__ = ["ReportConfig", "write_report"]
