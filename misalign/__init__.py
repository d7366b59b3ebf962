"""misalign: the analysis library. Reads ledgers, computes the papers' analyses. Imports no torch."""

__version__ = "0.1.0"
