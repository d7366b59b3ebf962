"""Adapters from other frameworks' detection models to misalign.LedgerRecorder (docs/capture.md)."""

from __future__ import annotations

from pathlib import Path

from misalign.errors import InputError


def read_rgb(images_dir: Path, info: dict) -> np.ndarray:
    """[H, W, 3] uint8 RGB pixels of the image `info` (a COCO image dict) names under `images_dir`."""
    import numpy as np
    from PIL import Image

    path = Path(images_dir) / info["file_name"]
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
