"""misalign: the analysis library. Reads ledgers, computes the papers' analyses. Imports no torch.

`misalign.LedgerRecorder` (misalign.recorder) writes a ledger from any detector's evaluation loop.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "LedgerRecorder":  # imported on first use: `import misalign` stays light
        from misalign.recorder import LedgerRecorder

        return LedgerRecorder
    raise AttributeError(f"module 'misalign' has no attribute {name!r}")
