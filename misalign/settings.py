"""The options of a comparison (`misalign report`), with their defaults: one dataclass, no heavy imports.

The CLI reads its defaults from here (cli.py `_default`), so `misalign report --help` shows the
numbers `misalign.compare` uses without loading numpy or pandas.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BOOTSTRAP = 200  # resamples of images for the CIs

@dataclass
class CompareSettings:
    """The options of one comparison, validated (alphas parsed when rescoring)."""

    names: list | str | None = None  # detector names in dump order; default the dump folder names
    gt: str | None = None  # ground-truth COCO JSON; default the dumps' meta.json dataset.ann
    before_after_nms: bool = False  # the paper's Figure 1, Table 1 and Figure 2 (their tables and data)
    min_iou: float = 0.5  # correlation pool: candidates with iou >= min_iou
    num_images: int = 6  # images shown one by one (Table 1 columns, Figure 1 scatters, Figure 2)
    bootstrap: int = DEFAULT_BOOTSTRAP  # bootstrap resamples of images for the 95% CIs (0: no CIs)
    seed: int = 0  # bootstrap seed (same seed and B for every dump: paired differences)
    rescore: bool = False  # counterfactual rescoring: re-run NMS under other rankings
    alphas: object = None  # α grid of rescore: '0,0.1,...' or numbers; default misalign.rescore.DEFAULT_ALPHAS
    rescore_thresh: object = None  # T in [0, 1): a ranking's pool is its rows with score > T; None: the dump's pool
