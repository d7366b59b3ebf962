"""Figures and the HTML report. Renders what `misalign` computes; computes no metrics itself."""
