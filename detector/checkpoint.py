"""Training checkpoints: one `checkpoint.pt` per run, written atomically (the contract: docs/architecture.md).

A checkpoint is a plain dict saved with `torch.save`:

    format      "misalign-checkpoint" (marker: anything else is not ours)
    version     CHECKPOINT_VERSION
    model       state dict of the unwrapped model (no DDP "module." prefix: it loads anywhere)
    config      plain dict: the model's own config (`Detector.config`, enough for
                `model_from_config`), `category_ids` (contiguous label i <-> dataset category id),
                and `training` (every option of the run, see `detector.train.TrainConfig`)
    epoch       number of epochs completed
    step        number of optimizer steps taken
    optimizer, scheduler, scaler   their state dicts
    rng         one dict per process (rank order) of python / numpy / torch / cuda RNG states

Everything in it is a tensor or a plain Python value, so it loads with `weights_only=True`
(no arbitrary code runs when a checkpoint is read).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from misalign.errors import InputError
from misalign.io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "misalign-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "config", "epoch", "step")


def save_checkpoint(path, state: dict) -> Path:
    """Write `state` to `path` atomically (temp file + rename), adding the format marker and version.

    A crash while writing leaves the previous checkpoint at `path` untouched.
    """
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`; tensors land on `map_location` (CPU by default).

    Raises InputError (one line naming the file) when the file is missing, unreadable (truncated,
    not a torch file, holding foreign objects) or not a misalign checkpoint of a known version.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; the user needs one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: not a readable misalign checkpoint ({reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a misalign checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    version = state.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise InputError(
            f"{path}: checkpoint version {version!r} is not supported "
            f"(this misalign reads versions up to {CHECKPOINT_VERSION})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise InputError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def model_from_checkpoint(state: dict, overrides: dict | None = None):
    """Rebuild the model of a loaded checkpoint from its config alone and load its weights (CPU, eval mode).

    overrides: model-config keys to change (e.g. the dump's postprocess options); None values keep the
    checkpoint's. The one place a model is loaded from a checkpoint (train --resume, dump, benchmarks).
    """
    from detector.model import model_from_config

    config = dict(state["config"])
    config.update({key: value for key, value in (overrides or {}).items() if value is not None})
    model = model_from_config(config)
    model.load_state_dict(state["model"])
    return model.eval()


# --- RNG states -----------------------------------------------------------------------------------
# Stored as tensors and plain values (never numpy objects) so `weights_only=True` can read them.


def capture_rng_state() -> dict:
    """The python, numpy, torch (and CUDA, if initialised) RNG states of this process."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # [624] uint32 values
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored only when this process uses CUDA."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint has %d CUDA RNG states, this machine has %d GPUs: CUDA RNG not restored",
                        len(cuda_states), torch.cuda.device_count())
