"""Where a model runs and at what precision: the one device resolution and the one autocast of detector.

Training, evaluation and the dump all go through these two, so `--device` and `--amp` mean the same
in every command.
"""

from __future__ import annotations

import torch

from misalign.errors import InputError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp mode -> autocast dtype ('none': off)


def resolve_device(choice: str) -> torch.device:
    """auto -> cuda when a GPU is visible, else cpu. InputError for cuda without a GPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def autocast(device: torch.device, amp: str = "none"):
    """torch.autocast for the mode `amp` (none | bf16 | fp16) on `device`; disabled for 'none'."""
    dtype = AMP_DTYPES.get(amp)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)
