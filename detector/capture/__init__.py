"""Adapters from other frameworks' detection models to misalign.LedgerRecorder (docs/capture.md)."""
