"""`misalign train`: training of the bundled detector, on CPU, one GPU or many (DDP via torchrun).

This module is the loop; the configuration and its defaults are detector.recipe, the evaluation
detector.evaluate (both re-exported here: `from detector.train import TrainConfig, train`).

The recipe is the paper's MMDetection setup (docs/methods.md): SGD momentum 0.9, weight decay 1e-4,
lr 0.01 for a batch of 16 (linearly scaled), linear warm-up from 0.001×lr over 500 iterations,
×0.1 at 8/12 and 11/12 of the run (the "1x" schedule: epochs 8 and 11 of 12; "2x": 16 and 22 of 24),
gradient clipping at max-norm 35 (MMDetection's RetinaNet config), images 1000×600.

On a CPU a small recipe is used instead (CPU_RECIPE: resnet10, 160 px, narrow GroupNorm heads,
AdamW, 18 epochs of batch 8, at least 2,250 optimizer steps) so that the built-in shapes dataset is
learnt in minutes on 2 cores. `recipe` ("cpu" | "paper") overrides the choice; options such as the
image size or the backbone change only themselves, never the recipe.

Run folder (`--out RUN`): `log.csv` (one row per step, appended as training goes; the last step of
an epoch also holds the alignment of that epoch's last ALIGNMENT_BATCHES batches, misalign.training),
`checkpoint.pt` (after each epoch, atomically; detector.checkpoint; `--resume` continues from it with
the same next batch and the same lr), `eval.json` (COCOeval's twelve stats on the val split).

Determinism: the order of the samples of an epoch depends only on (seed, epoch, rank), and the
per-epoch data-loader generator too, so a resumed run sees exactly the batches the uninterrupted
run would have seen; model, optimizer and RNG states come back from the checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from detector.checkpoint import (capture_rng_state, load_checkpoint, model_from_checkpoint, restore_rng_state,
                                 save_checkpoint)
from detector.device import autocast, resolve_device
from detector.evaluate import _unwrap, evaluate, predict_detections  # noqa: F401 (detector.train.evaluate)
from detector.recipe import (  # noqa: F401 (the recipe's names, as detector.train has always offered them)
    AMP_CHOICES, BASE_LR, CPU_RECIPE, DEFAULT_WEIGHT_DECAY, DEVICE_CHOICES, LR_STEP_FRACTIONS, LR_STEP_GAMMA,
    OPTIMIZERS, PAPER_RECIPE, RECIPES, RESUMED_OPTIONS, SCHEDULES, SIZE_OPTIONS, WARMUP_MAX_FRACTION, TrainConfig,
    choose_recipe, recipe_values, resolve_defaults, resolve_epochs, validate_config)
from misalign.errors import InputError
from misalign.io import atomic_path, write_json_atomic
from misalign.training import ALIGNMENT_BATCHES, ALIGNMENT_COLUMNS, alignment_metrics

log = logging.getLogger(__name__)


def lr_milestones(epochs: int, iters_per_epoch: int) -> list[int]:
    """Optimizer steps at which the lr is multiplied by 0.1: 8/12 and 11/12 of the run.

    A 12-epoch run steps after epochs 8 and 11, a 24-epoch run after 16 and 22; shorter runs keep
    the same proportions (rounded to the nearest iteration, so they may fall inside an epoch).
    """
    total_iters = epochs * iters_per_epoch
    return [round(fraction * total_iters) for fraction in LR_STEP_FRACTIONS]


def effective_warmup(warmup_iters: int, total_iters: int) -> int:
    """Warm-up length, capped at WARMUP_MAX_FRACTION of the run so a short run is not all warm-up."""
    return min(warmup_iters, int(WARMUP_MAX_FRACTION * total_iters))


def lr_at(step: int, *, base_lr: float, warmup_iters: int, warmup_ratio: float, milestones: list[int]) -> float:
    """The lr of optimizer step `step` (0-based): linear warm-up, then ×0.1 at each milestone passed.

    Warm-up is MMDetection's "linear": ratio + (1 − ratio)·step/warmup_iters times the scheduled lr.
    """
    lr = base_lr * LR_STEP_GAMMA ** sum(step >= milestone for milestone in milestones)
    if step < warmup_iters:
        lr *= warmup_ratio + (1 - warmup_ratio) * step / warmup_iters
    return lr


# --- distributed -------------------------------------------------------------------------------------


@dataclass
class DistContext:
    rank: int = 0  # this process among all processes
    world_size: int = 1  # number of training processes
    device: torch.device = torch.device("cpu")  # where this process computes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: torch.device) -> DistContext:
    """One process: nothing to do. Under torchrun (WORLD_SIZE > 1): init the process group.

    NCCL on GPU (each process on GPU LOCAL_RANK), gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, device=device)


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def _all_gather_objects(ctx: DistContext, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (just [obj] in one process)."""
    if not ctx.distributed:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


# --- seeds and data order -----------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """A torch.Generator that depends only on (seed, epoch, rank): the data order and the
    data-loader workers' seeds of that epoch, identical in a resumed run."""
    mixed = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & (2**63 - 1))


def make_train_loader(dataset, config: TrainConfig, ctx: DistContext, epoch: int):
    """Data loader of one epoch: this rank's shuffled share, `batch_size / world_size` images a batch.

    DistributedSampler (num_replicas=1 in one process) shuffles with seed + epoch, so the order is a
    function of (seed, epoch) only; the loader's own generator (worker seeds) of (seed, epoch, rank).
    """
    from torch.utils.data import DataLoader, DistributedSampler

    from detector.data import collate_detection

    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed)
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=config.batch_size // ctx.world_size,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate_detection,
        generator=epoch_generator(config.seed, epoch, ctx.rank),
        pin_memory=ctx.device.type == "cuda",
        drop_last=False,
    )


def iters_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps in one epoch (DistributedSampler pads each rank's share to ceil(N / world))."""
    per_rank = math.ceil(num_images / world_size)
    return math.ceil(per_rank / (batch_size // world_size))


# --- datasets and model ---------------------------------------------------------------------------------


def load_train_dataset(config: TrainConfig, category_ids: list[int] | None):
    """(dataset, ann_path) of the training split; InputError when it has no usable image."""
    from detector.data import CocoDetection
    from misalign.coco import resolve_dataset

    ann_path, images_dir = resolve_dataset(data=config.data, split=config.split, ann=config.ann, images=config.images)
    dataset = CocoDetection(ann_path, images_dir, train=True, min_size=config.img_size, max_size=config.max_size,
                            category_ids=category_ids)
    if len(dataset) == 0:
        raise InputError(f"{ann_path}: no usable images to train on")
    return dataset, ann_path


def load_val_dataset(config: TrainConfig, category_ids: list[int]):
    """(dataset, ann_path) of the val split, or (None, reason) when there is none to evaluate on."""
    from detector.data import CocoDetection
    from misalign.coco import resolve_dataset

    if config.val_ann is not None or config.val_images is not None:
        ann_path, images_dir = resolve_dataset(ann=config.val_ann, images=config.val_images)
    elif config.val_split and config.data is not None:
        ann_path = Path(config.data) / "annotations" / f"instances_{config.val_split}.json"
        if not ann_path.is_file():
            return None, f"{ann_path} does not exist"
        ann_path, images_dir = resolve_dataset(data=config.data, split=config.val_split)
    else:
        return None, "no val split given"
    dataset = CocoDetection(ann_path, images_dir, train=False, min_size=config.img_size, max_size=config.max_size,
                            category_ids=category_ids)
    if len(dataset) == 0:
        return None, f"{ann_path} has no usable images"
    return dataset, ann_path


def build_training_model(config: TrainConfig, num_classes: int, checkpoint: dict | None):
    """A new model from the options, or the resumed run's model rebuilt from its checkpoint config."""
    from detector.model import build_model

    if checkpoint is not None:
        return model_from_checkpoint(checkpoint).train()
    return build_model(
        config.model,
        num_classes,
        backbone=config.backbone,
        img_size=config.img_size,
        max_size=config.max_size,
        pretrained=config.pretrained,
        backbone_weights=config.backbone_weights,
        **config.model_options,
    )


def check_resume_options(config: TrainConfig, checkpoint: dict, path) -> None:
    """InputError when the options given ask for another model than the checkpoint's (name, backbone,
    sizes, model options): a resumed model is rebuilt from the checkpoint's config alone."""
    saved = checkpoint["config"]
    if config.model is not None and saved.get("name") != config.model:
        raise InputError(f"--resume: {path} is a {saved.get('name')!r} checkpoint, not {config.model!r}")
    asked = {"backbone": config.backbone, "img_size": config.img_size, "max_size": config.max_size,
             **config.model_options}
    for name, value in asked.items():
        if value is not None and name in saved and saved[name] != value:
            option = f"--{name.replace('_', '-')}" if name in SIZE_OPTIONS else f"model option {name}"
            raise InputError(f"--resume: {path} has {name} {saved[name]!r}; {option} asks for {value!r}")


def check_resume_classes(checkpoint: dict, path, dataset_category_ids: list[int]) -> None:
    """InputError when the training set's categories are not the checkpoint's (same ids, same order)."""
    saved = checkpoint["config"]
    saved_ids = list(saved.get("category_ids", []))
    if saved_ids != list(dataset_category_ids) or saved.get("num_classes", len(saved_ids)) != len(dataset_category_ids):
        raise InputError(
            f"--resume: {path} was trained on {saved.get('num_classes', len(saved_ids))} classes "
            f"(category ids {saved_ids[:8]}{'...' if len(saved_ids) > 8 else ''}), "
            f"the dataset has {len(dataset_category_ids)} ({list(dataset_category_ids)[:8]}"
            f"{'...' if len(dataset_category_ids) > 8 else ''})"
        )


def dataset_category_ids(config: TrainConfig) -> list[int]:
    """Sorted category ids of the training annotation file (the default label mapping)."""
    from misalign.coco import load_coco_json, resolve_dataset

    ann_path, _ = resolve_dataset(data=config.data, split=config.split, ann=config.ann, images=config.images)
    return sorted(int(category["id"]) for category in load_coco_json(ann_path)["categories"])


# --- one step ---------------------------------------------------------------------------------------------


class TrainingDivergedError(InputError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _to_device(images, targets, device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [
        {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for key, value in target.items()}
        for target in targets
    ]
    return images, targets


def _reduce_losses(losses: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, float]:
    """Loss terms averaged over processes (every rank gets the same values, so all stop together)."""
    values = torch.stack([value.detach().float() for value in losses.values()])  # [num_terms]
    if ctx.distributed:
        dist.all_reduce(values)
        values /= ctx.world_size
    return dict(zip(losses.keys(), values.tolist()))


def _diverged_message(config: TrainConfig, step: int, epoch: int, terms: dict[str, float], what: str) -> str:
    bad = ", ".join(f"{name}={value:g}" for name, value in terms.items())
    kept = (f"{Path(config.out) / 'checkpoint.pt'} keeps the last good epoch"
            if (Path(config.out) / "checkpoint.pt").exists() else "no checkpoint was written yet")
    return (f"training diverged: {what} at step {step} (epoch {epoch}; {bad}); {kept}; "
            f"try a lower --lr (was {config.lr:g}) or a longer warm-up")


def train_step(model, optimizer, scaler, images, targets, config: TrainConfig, ctx: DistContext, *, step: int,
               epoch: int) -> dict[str, float]:
    """Forward, NaN check, backward, clip, SGD step. Returns the loss terms and `loss` (their sum),
    averaged over processes. Raises TrainingDivergedError before touching the weights if the loss
    (or, without fp16 loss scaling, the gradient norm) is not finite."""
    with autocast(ctx.device, config.amp):
        losses = model(images, targets)
    loss = sum(losses.values())
    terms = _reduce_losses({**losses, "loss": loss}, ctx)
    if not all(math.isfinite(value) for value in terms.values()):
        raise TrainingDivergedError(_diverged_message(config, step, epoch, terms, "loss is not finite"))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if config.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    else:
        grad_norm = torch.zeros(())
    # fp16: the scaler skips steps with inf gradients on its own (and lowers its scale); elsewhere
    # a non-finite gradient would poison the weights, so it stops the run.
    if config.amp != "fp16" and not math.isfinite(float(grad_norm)):
        raise TrainingDivergedError(_diverged_message(config, step, epoch, terms, "gradient norm is not finite"))
    scaler.step(optimizer)
    scaler.update()
    return terms


# --- log.csv -------------------------------------------------------------------------------------------


class StepLog:
    """RUN/log.csv: step, epoch, each loss term, loss, lr, images_per_s, then ALIGNMENT_COLUMNS (empty
    but on an epoch's last step); one row per step, flushed."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.columns: list[str] | None = None
        if resume_step is not None and path.exists():
            self._truncate_after(resume_step)
        elif path.exists():
            path.unlink()
        self._file = None
        self._writer = None

    def _truncate_after(self, step: int) -> None:
        """Drop rows of steps the checkpoint does not include (a run stopped mid-epoch)."""
        with open(self.path, newline="") as file:
            rows = list(csv.reader(file))
        if not rows:
            return
        self.columns = rows[0]
        kept = [row for row in rows[1:] if row and int(row[0]) <= step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as file:
            csv.writer(file).writerows([rows[0], *kept])

    def write(self, *, step: int, epoch: int, terms: dict[str, float], lr: float, images_per_s: float,
              alignment: dict[str, float] | None = None) -> None:
        row = {"step": step, "epoch": epoch, **terms, "lr": lr, "images_per_s": images_per_s,
               **{column: (alignment or {}).get(column, "") for column in ALIGNMENT_COLUMNS}}
        if self._file is None:
            new = not self.path.exists() or self.columns is None
            self._file = open(self.path, "a", newline="")
            if new:
                self.columns = list(row)
                csv.writer(self._file).writerow(self.columns)
            self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
        self._writer.writerow({key: f"{v:.6g}" if isinstance(v, float) else v for key, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --- evaluation -----------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW, over the trainable parameters, weight decay on all of them."""
    params = [param for param in model.parameters() if param.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_schedule(config: TrainConfig, num_iters_per_epoch: int) -> dict:
    """The lr schedule of a run as plain values (stored in the checkpoint as its `scheduler`)."""
    total_iters = config.epochs * num_iters_per_epoch
    return {
        "base_lr": config.lr,
        "warmup_iters": effective_warmup(config.warmup_iters, total_iters),
        "warmup_ratio": config.warmup_ratio,
        "milestones": lr_milestones(config.epochs, num_iters_per_epoch),
    }


@dataclass
class _Run:
    """What one training run holds between steps."""

    config: TrainConfig  # resolved: no option left None
    ctx: DistContext
    dataset: object  # detector.data.CocoDetection of the training split
    model: torch.nn.Module  # DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: dict  # make_schedule
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)

    def lr(self, step: int) -> float:
        return lr_at(step, **self.schedule)

    def checkpoint_state(self, rng_states: list[dict]) -> dict:
        model = _unwrap(self.model)
        return {
            "model": model.state_dict(),
            "config": {**model.config, "category_ids": list(self.dataset.category_ids),
                       "training": dataclasses.asdict(self.config)},
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {**self.schedule, "last_lr": self.lr(self.step)},
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
        }


def _format_terms(terms: dict[str, float], lr: float) -> dict[str, str]:
    shown = {name.replace("bbox_regression", "bbox").replace("classification", "cls"): f"{value:.3f}"
             for name, value in terms.items()}
    return {**shown, "lr": f"{lr:.2g}"}


def train(config: TrainConfig) -> Path:
    """Train a detector as `config` says; returns the run folder (log.csv, checkpoint.pt, eval.json).

    Works in one process (CPU or one GPU) and under torchrun (DDP: one process per GPU, or gloo on
    CPU), where rank 0 alone writes files. Raises InputError for bad options, data or checkpoints,
    TrainingDivergedError (an InputError) when the loss turns NaN/inf.
    """
    validate_config(config)
    device = resolve_device(config.device)
    ctx = setup_distributed(device)
    try:
        run = _start_run(config, ctx)
        _train_epochs(run)
        _evaluate_run(run)
        return run.run_dir
    finally:
        teardown_distributed(ctx)


def _resolve_run_config(config: TrainConfig, ctx: DistContext, checkpoint: dict | None) -> TrainConfig:
    """Options of this run: the given ones, then the resumed run's, then the recipe's."""
    previous = checkpoint["config"].get("training") if checkpoint is not None else None
    if checkpoint is not None:
        check_resume_options(config, checkpoint, config.resume)
        if config.data is None and config.ann is None and previous is not None:
            config = dataclasses.replace(config, data=previous.get("data"), ann=previous.get("ann"),
                                         images=previous.get("images"), split=previous.get("split", config.split))
    config = resolve_defaults(config, ctx.device, previous)
    if config.batch_size % ctx.world_size:
        raise InputError(f"--batch-size: {config.batch_size} images do not split over {ctx.world_size} processes")
    return config


def _log_recipe(config: TrainConfig, num_images: int, steps_per_epoch: int) -> None:
    floor = f", at least {config.min_steps} steps" if config.min_steps else ""
    log.info("recipe: %s (%s, %d px max %d, batch %d, %s lr %g%s): %d epochs of %d steps (%d images) = %d "
                "optimizer steps", config.recipe, config.backbone, config.img_size, config.max_size,
                config.batch_size, config.optimizer, config.lr, floor, config.epochs, steps_per_epoch, num_images,
                config.epochs * steps_per_epoch)


def _restore_rng(checkpoint: dict, ctx: DistContext) -> None:
    rng_states = checkpoint.get("rng") or []
    if len(rng_states) == ctx.world_size:
        restore_rng_state(rng_states[ctx.rank])
    elif rng_states:
        log.warning("checkpoint has RNG states of %d processes, this run has %d: data augmentation "
                       "will differ from the uninterrupted run", len(rng_states), ctx.world_size)
        restore_rng_state(rng_states[0])


def _wrap_distributed(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    if not ctx.distributed:
        return model
    if ctx.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # trainable BN sees the whole batch
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def _start_run(config: TrainConfig, ctx: DistContext) -> _Run:
    """Options, data, model, optimizer and schedule of a new run, or of a resumed one at its checkpoint."""
    checkpoint = load_checkpoint(config.resume) if config.resume else None
    config = _resolve_run_config(config, ctx, checkpoint)
    category_ids = None
    if checkpoint is not None:
        check_resume_classes(checkpoint, config.resume, dataset_category_ids(config))
        category_ids = list(checkpoint["config"]["category_ids"])
    dataset, _ = load_train_dataset(config, category_ids)
    steps_per_epoch = iters_per_epoch(len(dataset), config.batch_size, ctx.world_size)
    config = resolve_epochs(config, steps_per_epoch)
    if ctx.is_main:
        _log_recipe(config, len(dataset), steps_per_epoch)

    seed_everything(config.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_training_model(config, len(dataset.category_ids), checkpoint)
    # channels_last: oneDNN (CPU) and tensor cores (GPU) run convolutions faster on NHWC (~20% on 2 cores).
    model = model.to(ctx.device, memory_format=torch.channels_last).train()
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.amp == "fp16")
    schedule = make_schedule(config, steps_per_epoch)
    run = _Run(config, ctx, dataset, model, optimizer, scaler, schedule)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        run.epoch, run.step = int(checkpoint["epoch"]), int(checkpoint["step"])
        _restore_rng(checkpoint, ctx)
        if ctx.is_main:
            log.info("resuming %s after epoch %d (step %d)", config.resume, run.epoch, run.step)
    elif ctx.rank > 0:
        seed_everything(config.seed + ctx.rank)  # different augmentation draws per rank
    run.model = _wrap_distributed(model, ctx)
    return run


def _train_epochs(run: _Run) -> None:
    """Epochs from run.epoch to the last; log.csv per step, checkpoint.pt per epoch (rank 0)."""
    step_log = None
    if run.ctx.is_main:
        if not run.config.resume and (run.run_dir / "checkpoint.pt").exists():
            log.warning("%s holds an earlier run: starting a new one over it (--resume %s continues it instead)",
                        run.run_dir, run.run_dir / "checkpoint.pt")
        run.run_dir.mkdir(parents=True, exist_ok=True)
        step_log = StepLog(run.run_dir / "log.csv", resume_step=run.step if run.config.resume else None)
    try:
        while run.epoch < run.config.epochs:
            _train_one_epoch(run, step_log)
            run.epoch += 1
            rng_states = _all_gather_objects(run.ctx, capture_rng_state())
            if run.ctx.is_main:
                save_checkpoint(run.run_dir / "checkpoint.pt", run.checkpoint_state(rng_states))
            _barrier(run.ctx)
    finally:
        if step_log is not None:
            step_log.close()


def epoch_alignment(samples: list[dict[str, torch.Tensor]], ctx: DistContext) -> dict[str, float]:
    """log.csv's alignment columns from the probed batches of every process (losses.positive_alignment)."""
    keys = ("cls_prob", "iou", "obj_prob")
    local = {key: torch.cat([s[key] for s in samples]).cpu().numpy() if samples else np.zeros(0, np.float32)
             for key in keys}
    gathered = _all_gather_objects(ctx, local)  # every rank's anchors (one process: just its own)
    merged = {key: np.concatenate([g[key] for g in gathered]) for key in keys}
    return alignment_metrics(merged["cls_prob"], merged["iou"], merged["obj_prob"])


def _train_one_epoch(run: _Run, step_log: StepLog | None) -> None:
    from tqdm import tqdm

    config, ctx = run.config, run.ctx
    loader = make_train_loader(run.dataset, config, ctx, run.epoch)
    bar = tqdm(loader, desc=f"epoch {run.epoch + 1}/{config.epochs}", unit="batch", disable=not ctx.is_main,
               dynamic_ncols=True)
    model, num_batches = _unwrap(run.model), len(loader)
    try:
        _train_batches(run, bar, model, num_batches, step_log)
    finally:
        model.alignment_probe = None


def _train_batches(run: _Run, bar, model, num_batches: int, step_log: StepLog | None) -> None:
    config, ctx = run.config, run.ctx
    tick = time.perf_counter()
    for index, (images, targets) in enumerate(bar):
        if index == max(num_batches - ALIGNMENT_BATCHES, 0):
            model.alignment_probe = []  # from here on each forward records its positive anchors
        lr = run.lr(run.step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        images, targets = _to_device(images, targets, ctx.device)
        terms = train_step(run.model, run.optimizer, run.scaler, images, targets, config, ctx, step=run.step + 1,
                           epoch=run.epoch + 1)
        run.step += 1
        now = time.perf_counter()
        images_per_s = len(images) * ctx.world_size / max(now - tick, 1e-9)
        alignment = epoch_alignment(model.alignment_probe, ctx) if index == num_batches - 1 else None
        tick = time.perf_counter()
        if step_log is not None:
            bar.set_postfix(_format_terms(terms, lr), refresh=False)
            step_log.write(step=run.step, epoch=run.epoch + 1, terms=terms, lr=lr, images_per_s=images_per_s,
                           alignment=alignment)


def _evaluate_run(run: _Run) -> None:
    """eval.json on the val split (skipped with a log line when there is none)."""
    config, ctx = run.config, run.ctx
    val_dataset, val_ann = load_val_dataset(config, run.dataset.category_ids)
    if val_dataset is None:
        if ctx.is_main:
            log.warning("no evaluation (%s): eval.json not written", val_ann)
        return
    stats = evaluate(_unwrap(run.model), val_dataset, val_ann, batch_size=config.eval_batch_size, device=ctx.device,
                     amp=config.amp, workers=config.workers, progress=ctx.is_main)
    if ctx.is_main:
        write_json_atomic(run.run_dir / "eval.json", stats)
        log.info("val %s: AP %.3f AP50 %.3f AP75 %.3f", val_ann, stats["AP"], stats["AP50"], stats["AP75"])
    _barrier(ctx)
