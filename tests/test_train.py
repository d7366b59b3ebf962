"""detector.train and `misalign train`: schedule, defaults, bad input, files, exact resume, NaN stop,
evaluation, DDP with two CPU processes.

Every training run here is tiny: the shared 12-image shapes dataset (conftest), resized to 64 px,
a resnet10 backbone with 16 FPN channels and one conv per tower; 1-2 epochs of 3 steps.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from detector import train as train_module
from detector.checkpoint import load_checkpoint, model_from_checkpoint
from detector.train import (
    CPU_RECIPE,
    PAPER_RECIPE,
    TrainConfig,
    effective_warmup,
    epoch_generator,
    evaluate,
    lr_at,
    lr_milestones,
    resolve_defaults,
    resolve_epochs,
    train,
)
from misalign.cocoeval import STAT_KEYS
from misalign.errors import InputError

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"fpn_channels": 16, "num_head_convs": 1}
# The paper recipe's optimizer and plain heads (the CPU recipe's GroupNorm needs more than 16 channels
# on 64-px images), at a tiny size.
TINY_CLI = ["--recipe", "paper", "--backbone", "resnet10", "--img-size", "64", "--max-size", "64", "--batch-size", "4",
            "--workers", "0", "-o", "fpn_channels=16", "-o", "num_head_convs=1"]


def tiny_config(data, out, **overrides) -> TrainConfig:
    options = dict(recipe="paper", model="retinanet", data=str(data), out=str(out), backbone="resnet10", img_size=64,
                   max_size=64, batch_size=4, epochs=1, workers=0, device="cpu", model_options=dict(TINY_MODEL), seed=0)
    return TrainConfig(**{**options, **overrides})


def read_log(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def run_cli(args):
    """(exit code, the one `error: ...` line on stderr, or "" when there is none)."""
    result = CliRunner().invoke(cli.main, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) <= 1 and "Traceback" not in result.output, result.output
    return result.exit_code, errors[0] if errors else ""


@pytest.fixture(scope="module")
def trained_run(shapes_dataset, tmp_path_factory) -> Path:
    """One tiny retinanet-conf run of 1 epoch (3 steps), with evaluation on the 6 val images."""
    out = tmp_path_factory.mktemp("run") / "conf"
    return train(tiny_config(shapes_dataset, out, model="retinanet-conf"))


# --- schedule -------------------------------------------------------------------------------------


def test_lr_milestones_match_the_paper_schedules():
    assert lr_milestones(12, 100) == [800, 1100]  # 1x: after epochs 8 and 11
    assert lr_milestones(24, 100) == [1600, 2200]  # 2x: after epochs 16 and 22
    assert lr_milestones(6, 10) == [40, 55]  # short run: same proportions, may fall mid-epoch


def test_lr_at_warmup_and_steps_by_hand():
    schedule = dict(base_lr=0.01, warmup_iters=500, warmup_ratio=0.001, milestones=[800, 1100])
    assert lr_at(0, **schedule) == pytest.approx(0.01 * 0.001)
    assert lr_at(250, **schedule) == pytest.approx(0.01 * (0.001 + 0.999 * 0.5))
    assert lr_at(500, **schedule) == pytest.approx(0.01)
    assert lr_at(799, **schedule) == pytest.approx(0.01)
    assert lr_at(800, **schedule) == pytest.approx(0.001)
    assert lr_at(1100, **schedule) == pytest.approx(0.0001)
    # A milestone inside the warm-up multiplies the warm-up lr.
    assert lr_at(5, base_lr=1.0, warmup_iters=10, warmup_ratio=0.5, milestones=[3, 100]) == pytest.approx(0.1 * 0.75)


def test_warmup_is_capped_for_short_runs():
    assert effective_warmup(500, 88_000) == 500
    assert effective_warmup(500, 750) == 75
    assert effective_warmup(100, 6) == 0


# --- defaults ---------------------------------------------------------------------------------------


def test_cpu_recipe_on_a_cpu():
    config = resolve_defaults(TrainConfig(data="d"), torch.device("cpu"))
    for name, value in CPU_RECIPE.items():
        if name == "model_options":
            assert config.model_options == value
        elif name != "epochs":  # resolve_epochs: needs the dataset's size
            assert getattr(config, name) == value, name
    assert config.optimizer == "adamw" and config.weight_decay == 0.05
    assert config.lr == pytest.approx(0.004 * CPU_RECIPE["batch_size"] / 16)
    assert config.recipe == "cpu" and config.epochs is None and config.min_steps == 2250


def test_a_size_option_changes_the_size_only_and_recipe_chooses():
    # --img-size 400 on a CPU: still the CPU recipe, at 400 px (max 400: the recipe's 160 widened).
    config = resolve_defaults(TrainConfig(data="d", img_size=400), torch.device("cpu"))
    assert (config.recipe, config.backbone, config.img_size, config.max_size) == ("cpu", "resnet10", 400, 400)
    assert (config.batch_size, config.optimizer, config.min_steps) == (8, "adamw", 2250)
    # --backbone is an option like any other: it does not pick the recipe either.
    config = resolve_defaults(TrainConfig(data="d", backbone="resnet50", max_size=120), torch.device("cpu"))
    assert (config.recipe, config.backbone, config.img_size, config.max_size) == ("cpu", "resnet50", 120, 120)
    # --recipe paper on a CPU: the paper's setup, with the size given.
    config = resolve_defaults(TrainConfig(data="d", img_size=800, recipe="paper"), torch.device("cpu"))
    assert (config.backbone, config.img_size, config.max_size) == ("resnet50", 800, PAPER_RECIPE["max_size"])
    assert (config.batch_size, config.lr, config.warmup_iters, config.min_steps) == (16, 0.01, 500, 0)
    assert (config.optimizer, config.weight_decay, config.recipe) == ("sgd", 1e-4, "paper")
    assert resolve_epochs(config, 100).epochs == 12
    # On a GPU the paper's, unless --recipe cpu.
    gpu = resolve_defaults(TrainConfig(data="d", schedule="2x", batch_size=8), torch.device("cuda"))
    assert (gpu.recipe, gpu.backbone, gpu.img_size, gpu.max_size) == ("paper", "resnet50", 600, 1000)
    assert resolve_epochs(gpu, 7).epochs == 24
    assert gpu.lr == pytest.approx(0.005)  # linear scaling rule
    assert gpu.workers == PAPER_RECIPE["workers"]
    assert resolve_defaults(TrainConfig(data="d", recipe="cpu"), torch.device("cuda")).backbone == "resnet10"


def test_cpu_recipe_step_floor():
    config = resolve_defaults(TrainConfig(data="d"), torch.device("cpu"))
    # Shapes (1000 images, batch 8: 125 steps an epoch) is exactly as before: 18 epochs, 2,250 steps.
    assert resolve_epochs(config, 125).epochs == 18
    assert resolve_epochs(dataclasses.replace(config, schedule="2x"), 125).epochs == 36
    # A bigger dataset: the recipe's 18 epochs (more steps than the floor).
    assert resolve_epochs(config, 400).epochs == 18
    # 40 images (5 steps an epoch): 450 epochs = 2,250 steps; 2x doubles the floor too.
    assert resolve_epochs(config, 5).epochs == 450
    assert resolve_epochs(dataclasses.replace(config, schedule="2x"), 5).epochs == 900
    assert resolve_epochs(config, 7).epochs == 322  # ceil(2250 / 7): at least 2,250 steps
    # An explicit --epochs (or a resumed run's) wins over the floor.
    assert resolve_epochs(dataclasses.replace(config, epochs=3), 5).epochs == 3


def test_resumed_options_fill_the_unset_ones():
    previous = {"recipe": "paper", "backbone": "resnet34", "img_size": 320, "max_size": 480, "epochs": 5, "batch_size": 4,
                "lr": 0.3,
                "warmup_iters": 7, "workers": 1, "model_options": {"num_head_convs": 2}}
    config = resolve_defaults(TrainConfig(data="d", epochs=8, model_options={"fpn_channels": 32}),
                              torch.device("cpu"), previous)
    assert (config.backbone, config.img_size, config.max_size, config.batch_size, config.lr) == ("resnet34", 320, 480,
                                                                                              4, 0.3)
    assert config.epochs == 8  # given: extends the run
    assert config.model_options == {"num_head_convs": 2, "fpn_channels": 32}
    # Not given: the resumed run's length, never re-raised by the CPU recipe's step floor.
    resumed = resolve_defaults(TrainConfig(data="d"), torch.device("cpu"), previous)
    assert resolve_epochs(resumed, 1).epochs == 5


def test_epoch_generator_depends_on_seed_epoch_rank_only():
    draw = lambda *key: torch.randint(0, 10**9, (4,), generator=epoch_generator(*key)).tolist()  # noqa: E731
    assert draw(0, 3, 0) == draw(0, 3, 0)
    assert len({tuple(draw(*key)) for key in [(0, 3, 0), (0, 4, 0), (1, 3, 0), (0, 3, 1)]}) == 4


# --- a small dataset unlike shapes ------------------------------------------------------------------


def write_small_objects_dataset(root: Path, num_train: int = 8, num_val: int = 2) -> Path:
    """A CPU user's own data: 400×300 images, 15 small discs (12-30 px) each, one class, COCO layout."""
    from PIL import Image, ImageDraw

    from tests.conftest import write_coco

    rng = np.random.default_rng(0)
    for split, count in (("train", num_train), ("val", num_val)):
        images, annotations, pixels = [], [], {}
        for image_id in range(1, count + 1):
            image = Image.new("RGB", (400, 300), (90, 110, 100))
            draw = ImageDraw.Draw(image)
            for k in range(15):  # one disc per 80×100 cell: no overlaps
                side = int(rng.integers(12, 31))
                x = 80 * (k % 5) + int(rng.integers(0, 80 - side))
                y = 100 * (k // 5) + int(rng.integers(0, 100 - side))
                draw.ellipse([x, y, x + side - 1, y + side - 1], fill=(230, 200, 40))
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                    "bbox": [x, y, side, side], "area": side * side, "iscrowd": 0})
            images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 400, "height": 300})
            pixels[image_id] = np.asarray(image)
        write_coco(root, images, annotations, [{"id": 1, "name": "disc"}], split=split, pixels=pixels)
    return root


@pytest.fixture(scope="module")
def small_objects_dataset(tmp_path_factory) -> Path:
    return write_small_objects_dataset(tmp_path_factory.mktemp("small") / "data")


def _resolved_run(monkeypatch, args):
    """Run `misalign train ARGS` up to its first step: (exit code, the resolved run). No training."""
    seen = {}
    monkeypatch.setattr(train_module, "_train_epochs", lambda run: seen.setdefault("run", run))
    monkeypatch.setattr(train_module, "_evaluate_run", lambda run: None)
    code, error = run_cli(["train", *args])
    assert code == 0, error
    return seen["run"]


def test_small_dataset_gets_the_cpu_recipe_and_its_step_floor(small_objects_dataset, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="detector.train")
    # --img-size / --max-size on a CPU: the CPU recipe at the dataset's own size.
    run = _resolved_run(monkeypatch, ["--data", str(small_objects_dataset), "--out", str(tmp_path / "run"),
                                      "--device", "cpu", "--img-size", "300", "--max-size", "400"])
    config = run.config
    assert (config.recipe, config.backbone, config.img_size, config.max_size) == ("cpu", "resnet10", 300, 400)
    # 8 images, batch 8: 1 step an epoch; the recipe's 18 epochs would be 18 steps: the floor makes it 2,250.
    assert (config.batch_size, config.epochs) == (8, 2250)
    assert run.schedule["milestones"] == [1500, 2062]  # 8/12 and 11/12 of the run, as for any run
    assert run.schedule["warmup_iters"] == 50
    assert "recipe: cpu" in caplog.text and "2250 epochs of 1 steps (8 images) = 2250 optimizer steps" in caplog.text
    assert _unwrap_model(run).cfg.img_size == 300
    # An explicit --epochs wins over the floor.
    run = _resolved_run(monkeypatch, ["--data", str(small_objects_dataset), "--out", str(tmp_path / "short"),
                                      "--device", "cpu", "--img-size", "300", "--max-size", "400", "--epochs", "3"])
    assert (run.config.recipe, run.config.epochs, run.schedule["milestones"]) == ("cpu", 3, [2, 3])


def test_small_dataset_with_recipe_paper(small_objects_dataset, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="detector.train")
    run = _resolved_run(monkeypatch, ["--data", str(small_objects_dataset), "--out", str(tmp_path / "run"),
                                      "--device", "cpu", "--recipe", "paper", "--img-size", "300", "--max-size", "400"])
    config = run.config
    assert (config.recipe, config.backbone, config.optimizer, config.batch_size) == ("paper", "resnet50", "sgd", 16)
    assert (config.img_size, config.max_size, config.min_steps, config.epochs) == (300, 400, 0, 12)  # epochs count
    assert "recipe: paper" in caplog.text and "12 epochs of 1 steps (8 images) = 12 optimizer steps" in caplog.text


def test_small_dataset_trains_a_step_with_the_cpu_recipe(small_objects_dataset, tmp_path):
    out = tmp_path / "run"
    code, error = run_cli(["train", "--data", str(small_objects_dataset), "--out", str(out), "--device", "cpu",
                           "--img-size", "300", "--max-size", "400", "--epochs", "1"])
    assert code == 0, error
    rows = read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1]
    # retinanet has no objectness branch: its obj-vs-IoU error is NaN, its alignment finite.
    assert -1 <= float(rows[0]["align_spearman"]) <= 1 and rows[0]["obj_iou_mae"] == "nan"
    training = load_checkpoint(out / "checkpoint.pt")["config"]["training"]
    assert (training["recipe"], training["epochs"], training["min_steps"]) == ("cpu", 1, 2250)
    assert (training["img_size"], training["max_size"]) == (300, 400)
    assert list(json.loads((out / "eval.json").read_text())) == list(STAT_KEYS)


def test_unknown_recipe_is_one_line(shapes_dataset, tmp_path):
    code, output = run_cli(["train", "--data", str(shapes_dataset), "--out", str(tmp_path / "run"), "--recipe", "gpu"])
    assert code == 2 and output == "error: --recipe: unknown recipe 'gpu' (choose from cpu, paper)"


def _unwrap_model(run):
    return run.model.module if hasattr(run.model, "module") else run.model


# --- bad input: one line, exit 2 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "yolo"], "unknown model 'yolo'"),
        (["--backbone", "vgg16"], "unknown backbone 'vgg16'"),
        (["--epochs", "0"], "--epochs: must be at least 1"),
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--lr", "0"], "--lr: must be > 0"),
        (["--lr", "-0.1"], "--lr: must be > 0"),
        (["--img-size", "8"], "--img-size: must be at least 32"),
        (["--img-size", "200", "--max-size", "100"], "--max-size: 100 is smaller than --img-size 200"),
        (["--workers", "-1"], "--workers: must be 0 or more"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--amp", "fp8"], "unknown mode 'fp8'"),
        (["--device", "cpu", "--amp", "bf16"], "--amp: bf16 autocast needs a GPU"),
        (["--schedule", "3x"], "unknown schedule '3x'"),
        (["--optimizer", "adam"], "unknown optimizer 'adam'"),
        (["-o", "fpn_channels"], "--model-option: expected KEY=VALUE"),
        (["--backbone-weights", "/no/such/weights.pth"], "no such file"),
    ],
)
def test_bad_options(shapes_dataset, tmp_path, args, message):
    code, output = run_cli(["train", "--data", str(shapes_dataset), "--out", str(tmp_path / "run"), *args])
    assert code == 2 and message in output, output
    assert not (tmp_path / "run").exists()


def test_missing_data_and_out(tmp_path):
    code, output = run_cli(["train", "--out", str(tmp_path / "run")])
    assert code == 2 and "--data" in output
    code, output = run_cli(["train", "--data", str(tmp_path)])
    assert code == 2 and "--out" in output
    code, output = run_cli(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"), *TINY_CLI])
    assert code == 2 and "dataset folder not found" in output


def test_dataset_without_images(make_coco, tmp_path):
    make_coco([], [], [{"id": 1, "name": "a"}], split="train")
    code, output = run_cli(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *TINY_CLI])
    assert code == 2 and "no images" in output, output


def test_model_option_errors_are_one_line(shapes_dataset, tmp_path):
    code, output = run_cli(["train", "--data", str(shapes_dataset), "--out", str(tmp_path / "run"), *TINY_CLI,
                            "-o", "no_such_option=1"])
    assert code == 2 and "no_such_option" in output, output


def test_resume_of_another_model_or_class_set(trained_run, shapes_dataset, make_coco, tmp_path):
    checkpoint = str(trained_run / "checkpoint.pt")
    code, output = run_cli(["train", "--data", str(shapes_dataset), "--out", str(tmp_path / "a"), *TINY_CLI,
                            "--model", "retinanet", "--resume", checkpoint])
    assert code == 2 and "is a 'retinanet-conf' checkpoint, not 'retinanet'" in output, output
    # A dataset with 2 categories instead of the checkpoint's 5.
    make_coco([{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
              [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0}],
              [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], split="train")
    code, output = run_cli(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "b"), *TINY_CLI,
                            "--model", "retinanet-conf", "--resume", checkpoint])
    assert code == 2 and "trained on 5 classes" in output and "the dataset has 2" in output, output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    code, output = run_cli(["train", "--data", str(shapes_dataset), "--out", str(tmp_path / "c"), "--resume", str(bad)])
    assert code == 2 and "not a readable misalign checkpoint" in output


# --- a run's files --------------------------------------------------------------------------------------


def test_run_files(trained_run, shapes_dataset):
    rows = read_log(trained_run / "log.csv")
    assert list(rows[0]) == ["step", "epoch", "classification", "bbox_regression", "objectness", "loss", "lr",
                             "images_per_s", "align_spearman", "obj_iou_mae"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # 12 images, batch 4
    # The epoch's alignment (its last ALIGNMENT_BATCHES batches: all 3 here) on its last step only.
    assert [(r["align_spearman"], r["obj_iou_mae"]) for r in rows[:2]] == [("", "")] * 2
    assert -1 <= float(rows[2]["align_spearman"]) <= 1 and 0 <= float(rows[2]["obj_iou_mae"]) <= 1
    for row in rows:
        terms = float(row["classification"]) + float(row["bbox_regression"]) + float(row["objectness"])
        assert float(row["loss"]) == pytest.approx(terms, rel=1e-4)
    stats = json.loads((trained_run / "eval.json").read_text())
    assert list(stats) == list(STAT_KEYS)
    assert all(0.0 <= value <= 1.0 or value == -1.0 for value in stats.values())

    checkpoint = load_checkpoint(trained_run / "checkpoint.pt")
    assert {"model", "config", "epoch", "step", "optimizer", "scheduler", "scaler", "rng"} <= set(checkpoint)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 3)
    config = checkpoint["config"]
    assert (config["name"], config["num_classes"], config["category_ids"]) == ("retinanet-conf", 5, [1, 2, 3, 4, 5])
    assert (config["img_size"], config["max_size"], config["score_thresh"], config["nms_thresh"]) == (64, 64, 0.05, 0.5)
    training = config["training"]
    assert (training["epochs"], training["batch_size"], training["lr"], training["data"]) == (1, 4, 0.0025,
                                                                                            str(shapes_dataset))
    assert checkpoint["scheduler"]["milestones"] == [2, 3]
    assert len(checkpoint["rng"]) == 1
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    # dump's path: the model rebuilt from config alone carries the trained weights.
    model = model_from_checkpoint(checkpoint)
    assert all(torch.equal(value, checkpoint["model"][key]) for key, value in model.state_dict().items())


def _stop_after_first_checkpoint(monkeypatch):
    """Make train() die right after writing its first checkpoint (a crash between epochs)."""
    real_save = train_module.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(path, state):
        real_save(path, state)
        raise Crash

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    return Crash


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_continues_exactly(shapes_dataset, tmp_path, monkeypatch, optimizer):
    # workers=1: the data-loader worker seeds must come back too; flips draw from torch's RNG.
    options = dict(epochs=2, workers=1, val_split=None, model="retinanet-conf", optimizer=optimizer)
    straight = train(tiny_config(shapes_dataset, tmp_path / "straight", **options))

    crash = _stop_after_first_checkpoint(monkeypatch)
    with pytest.raises(crash):
        train(tiny_config(shapes_dataset, tmp_path / "resumed", **options))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["epoch"] == 1
    # The resumed run takes every unset option from the checkpoint (model, data, sizes, batch, optimizer).
    resumed = train(TrainConfig(out=str(tmp_path / "resumed"), resume=str(tmp_path / "resumed" / "checkpoint.pt"),
                                workers=1, val_split=None, device="cpu"))

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(resumed / "checkpoint.pt")
    assert (b["epoch"], b["step"]) == (a["epoch"], a["step"]) == (2, 6)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)  # momentum / Adam moments
    # Same batches, same lr, same losses, step by step (images/s aside).
    rows_a, rows_b = read_log(straight / "log.csv"), read_log(resumed / "log.csv")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b) and len(rows_a) == 6
    # ... and different from a run with another seed (the comparison can fail).
    other = train(tiny_config(shapes_dataset, tmp_path / "other", **{**options, "epochs": 1, "seed": 1}))
    assert strip(read_log(other / "log.csv"))[0] != strip(rows_a)[0]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapes_dataset, tmp_path, monkeypatch):
    from detector.model import Detector

    real_forward = Detector.forward
    calls = {"train": 0}

    def forward(self, images, targets=None):
        out = real_forward(self, images, targets)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 5:  # step 2 of epoch 2
                out = {**out, "classification": out["classification"] * float("nan")}
        return out

    monkeypatch.setattr(Detector, "forward", forward)
    out = tmp_path / "run"
    code, output = run_cli(["train", "--data", str(shapes_dataset), "--out", str(out), *TINY_CLI, "--epochs", "2",
                            "--val-split", ""])
    assert code == 2, output
    assert output.startswith("error: training diverged: loss is not finite at step 5 (epoch 2;")
    assert "keeps the last good epoch" in output
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 3)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2, 3, 4]


# --- evaluation ---------------------------------------------------------------------------------------------


def test_no_val_split_skips_evaluation_with_a_note(shapes_dataset, tmp_path, caplog):
    data = tmp_path / "train_only"
    shutil.copytree(shapes_dataset, data, ignore=shutil.ignore_patterns("val", "instances_val.json"))
    run = train(tiny_config(data, tmp_path / "run"))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "log.csv"]
    assert "instances_val.json does not exist" in caplog.text and "eval.json not written" in caplog.text


class _Oracle(torch.nn.Module):
    """Eval-mode stand-in that returns each image's ground truth (resized pixels), in loader order."""

    def __init__(self, dataset, shift: float = 0.0):
        super().__init__()
        self.answers = [dataset[i][1] for i in range(len(dataset))]
        self.shift = shift

    def forward(self, images):
        out = []
        for _ in images:
            target = self.answers.pop(0)
            n = len(target["boxes"])
            out.append({"boxes": target["boxes"] + self.shift, "scores": torch.linspace(1.0, 0.5, n),
                        "labels": target["labels"]})
        return out


def test_evaluate_maps_boxes_and_labels_back_to_the_dataset(make_coco):
    from detector.data import CocoDetection

    # Non-contiguous category ids and images resized ×1.5 (64 -> 96 px): a detection is right only
    # if its box is divided by the scale and its label mapped through category_ids.
    images = [{"id": 7, "file_name": "a.png", "width": 64, "height": 64},
              {"id": 9, "file_name": "b.png", "width": 64, "height": 48}]
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [4, 6, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 8, "bbox": [30, 30, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": 8, "bbox": [10, 5, 40, 30], "area": 1200, "iscrowd": 0},
    ]
    ann, image_dir = make_coco(images, annotations, [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}])
    dataset = CocoDetection(ann, image_dir, train=False, min_size=96, max_size=128)
    assert dataset[0][1]["scale"] == pytest.approx(1.5)
    stats = evaluate(_Oracle(dataset), dataset, batch_size=2, progress=False)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)
    # Shifted by 6 resized pixels = 4 original pixels in x and y. IoUs by hand: 20×10 box
    # 16·6 / (400 − 96) = 0.32; 30×20 box 26·16 / (1200 − 416) = 0.53; 40×30 box 36·26 / (2400 − 936)
    # = 0.64. At IoU 0.5 category 3 misses its only box, category 8 finds both: AP50 = (0 + 1) / 2.
    shifted = evaluate(_Oracle(dataset, shift=6.0), dataset, batch_size=2, progress=False)
    assert shifted["AP50"] == pytest.approx(0.5) and shifted["AP75"] == 0.0


# --- many processes -------------------------------------------------------------------------------------------


def test_ddp_two_cpu_processes(shapes_dataset, tmp_path):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    entry = Path(sys.executable).parent / "misalign"
    program = ["--no-python", str(entry)] if entry.exists() else ["-m", "cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([*launcher, *program, "train", "--data", str(shapes_dataset), "--out", str(out),
                             "--model", "retinanet-conf", *TINY_CLI, "--epochs", "1", "--device", "cpu"],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    # 12 images over 2 processes of 2 images each: 3 steps, logged once (rank 0 alone writes).
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 3)
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2, 3]
    assert len(checkpoint["rng"]) == 2
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    assert list(json.loads((out / "eval.json").read_text())) == list(STAT_KEYS)
    model = model_from_checkpoint(checkpoint)  # loads in this single process
    with torch.no_grad():
        detections = model([torch.rand(3, 64, 64)])
    assert detections[0]["boxes"].shape[1] == 4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "eval.json", "log.csv"]
