"""Figures and the HTML report. Renders what `misalign` computes; computes no metrics itself.

- `write_report(dumps, out, **options) -> Path`: the `misalign report` folder (index.html,
  metrics.json, tables/*.csv, figures/*.png); options are `ReportConfig`'s fields.
- `reports.figures`: the figure functions (matplotlib, Agg).
- `reports.synthetic.synthetic_ledger(folder, ...)`: a synthetic ledger and its ground truth.
"""

from .build import ReportConfig, write_report

__all__ = ["ReportConfig", "write_report"]
