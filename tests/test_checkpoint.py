"""detector.checkpoint: atomic save, strict load (one-line InputError), RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from detector.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    load_checkpoint,
    model_from_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from misalign.errors import InputError


def _state(**extra) -> dict:
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {"name": "retinanet", "num_classes": 2},
            "epoch": 3, "step": 30, **extra}


def test_round_trip_adds_marker_and_keeps_values(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", _state(rng=[capture_rng_state()]))
    loaded = load_checkpoint(path)
    assert loaded["format"] == CHECKPOINT_FORMAT and loaded["version"] == CHECKPOINT_VERSION
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert loaded["config"] == {"name": "retinanet", "num_classes": 2}
    assert (loaded["epoch"], loaded["step"]) == (3, 30)
    # Everything is plain: it loads with weights_only=True (load_checkpoint's own setting) and no
    # temporary file is left beside it.
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint file") as err:
        load_checkpoint(tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_unreadable_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match="not a readable misalign checkpoint") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_truncated_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pt", _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable misalign checkpoint"):
        load_checkpoint(path)


def test_foreign_torch_file_is_rejected(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": {}, "config": {}, "epoch": 1, "step": 1}, path)  # a dict, but not ours
    with pytest.raises(InputError, match="not a misalign checkpoint"):
        load_checkpoint(path)
    torch.save(torch.zeros(3), path)  # not even a dict
    with pytest.raises(InputError, match="not a misalign checkpoint"):
        load_checkpoint(path)


def test_newer_version_and_missing_keys(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION + 1, **_state()}, path)
    with pytest.raises(InputError, match="version 2 is not supported"):
        load_checkpoint(path)
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": {}}, path)
    with pytest.raises(InputError, match="lacks config, epoch, step"):
        load_checkpoint(path)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "checkpoint.pt", _state())
    before = path.read_bytes()

    def broken_save(obj, f):  # writes half a file, then dies (disk full, killed, ...)
        with open(f, "wb") as file:
            file.write(b"PK\x03\x04half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, _state(epoch=4))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist())
    # Through a real file: the states must survive torch.save / weights_only load.
    path = save_checkpoint(tmp_path / "checkpoint.pt", _state(rng=[state]))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"][0])
    assert (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist()) == expected


def test_model_from_checkpoint_rebuilds_same_outputs(tmp_path):
    from detector.model import build_model

    torch.manual_seed(0)
    model = build_model("retinanet-conf", 3, backbone="resnet10", img_size=64, max_size=64, fpn_channels=16,
                        num_head_convs=1).eval()
    # Config as train writes it: the model's own config plus keys model_from_config must ignore.
    config = {**model.config, "category_ids": [1, 2, 5], "training": {"epochs": 1}}
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"model": model.state_dict(), "config": config, "epoch": 1,
                                                         "step": 2})
    rebuilt = model_from_checkpoint(load_checkpoint(path))
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        expected, got = model([image])[0], rebuilt([image])[0]
    assert not rebuilt.training
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(expected[key], got[key])
