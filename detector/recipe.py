"""The training recipe: `TrainConfig`, the paper's and the CPU recipe's defaults, and their validation;
and the dump's options (`DumpConfig`).

No torch here (a device is only read for its type), so the CLI and the tests can build and check a
configuration without loading a model. The loop is detector.train, evaluation detector.evaluate;
docs/methods.md describes both recipes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from misalign.errors import InputError

AMP_CHOICES = ("none", "bf16", "fp16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
SCHEDULES = {"1x": 12, "2x": 24}  # schedule name -> default number of epochs
LR_STEP_FRACTIONS = (8 / 12, 11 / 12)  # ×0.1 at epochs 8 and 11 of 12 (and 16, 22 of 24), scaled to the run
LR_STEP_GAMMA = 0.1
WARMUP_MAX_FRACTION = 0.1  # warm-up never takes more than this fraction of a run's iterations

# The paper's setup (MMDetection RetinaNet, 8 GPUs × 2 images); the default on a GPU.
PAPER_RECIPE = {
    "backbone": "resnet50",
    "img_size": 600,  # shorter side (COCO "1000×600")
    "max_size": 1000,  # longer side at most
    "batch_size": 16,
    "optimizer": "sgd",
    "warmup_iters": 500,
    "workers": 4,
    "min_steps": 0,  # epochs count, whatever the dataset size (COCO: 12 epochs are ~88k steps)
    "model_options": {},
}
# Small CPU recipe: what 2 CPU cores can teach the built-in shapes dataset in a few minutes. Nothing
# pretrained is available offline, so the network learns from scratch: a light backbone (resnet10,
# trainable BatchNorm), narrow FPN and heads with GroupNorm (both speed up learning from scratch),
# anchors halved for 160-px images (the shapes are 12-136 px), AdamW (about twice the AP of SGD
# after the same number of epochs here). Everything else is the paper's recipe.
CPU_RECIPE = {
    "backbone": "resnet10",
    "img_size": 160,
    "max_size": 160,
    "batch_size": 8,
    "epochs": 18,  # AP50 >= 0.6 on shapes val for retinanet and retinanet-conf in < 6 min on 2 cores
    # Learning from scratch takes optimizer steps, not epochs: the recipe was tuned at shapes' 1000
    # images / batch 8 × 18 epochs = 2,250 steps, and a few dozen images × 18 epochs are only ~100.
    # A smaller dataset gets more epochs, up to this many steps (shapes itself: exactly 18 epochs).
    "min_steps": 2250,
    "optimizer": "adamw",
    "warmup_iters": 50,
    "workers": 0,  # 2 cores: decoding 160-px PNGs in the main process beats competing with it
    "model_options": {"fpn_channels": 64, "num_head_convs": 2, "head_norm": "group",
                      "anchor_sizes": [16, 32, 64, 128, 256]},
}
SIZE_OPTIONS = ("backbone", "img_size", "max_size")  # options --resume refuses to change (the model's shape)
RECIPES = ("cpu", "paper")
# Options a resumed run takes from its checkpoint when left unset (None).
RESUMED_OPTIONS = ("recipe", "model", "backbone", "img_size", "max_size", "epochs", "min_steps", "batch_size",
                   "optimizer", "lr", "weight_decay", "warmup_iters", "workers")
OPTIMIZERS = ("sgd", "adamw")
BASE_LR = {"sgd": 0.01, "adamw": 0.004}  # lr for a batch of 16 images; scaled linearly with the batch
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}


@dataclass
class TrainConfig:
    # --- recipe ---
    recipe: str | None = None  # "cpu" | "paper"; None: "cpu" on a CPU, "paper" on a GPU (sizes never choose it)
    # --- model ---
    model: str | None = None  # retinanet | retinanet-conf | iou-aware; None: retinanet (or the resumed run's)
    backbone: str | None = None  # resnet10/18/34/50/101; None: resnet50 (paper), resnet10 (CPU recipe)
    pretrained: bool = False  # torchvision's ImageNet weights for the backbone (downloads once)
    backbone_weights: str | None = None  # local file with backbone weights (state dict)
    model_options: dict = field(default_factory=dict)  # extra build_model options (over the recipe's)
    # --- data (COCO layout: DATA/annotations/instances_SPLIT.json, DATA/SPLIT/) ---
    data: str | None = None  # dataset folder
    split: str = "train"  # training split
    ann: str | None = None  # explicit annotation file (instead of data/split)
    images: str | None = None  # explicit image folder (instead of data/split)
    val_split: str | None = "val"  # evaluated at the end into eval.json; None or missing: skipped
    val_ann: str | None = None  # explicit val annotation file
    val_images: str | None = None  # explicit val image folder
    img_size: int | None = None  # shorter image side; None: 600 (paper), 160 (CPU recipe)
    max_size: int | None = None  # longer image side at most; None: 1000 (paper), 160 (CPU recipe)
    workers: int | None = None  # data-loader processes per training process; None: 4 (paper), 0 (CPU recipe)
    # --- optimisation ---
    out: str = "runs/run"  # run folder: log.csv, checkpoint.pt, eval.json
    schedule: str = "1x"  # "1x" or "2x" (twice the recipe's epochs); the lr steps sit at 8/12 and 11/12 of the run
    epochs: int | None = None  # None: the recipe's (12 paper, 18 CPU; ×2 with 2x), raised to reach min_steps
    min_steps: int | None = None  # floor on the optimizer steps when epochs is None; None: 0 (paper), 2250 (CPU)
    batch_size: int | None = None  # images per optimizer step, over all processes; None: 16 (paper), 8 (CPU)
    optimizer: str | None = None  # "sgd" (paper: momentum SGD) | "adamw"; None: sgd (paper), adamw (CPU recipe)
    lr: float | None = None  # None: 0.01 (SGD) or 0.004 (AdamW) × batch_size / 16 (linear scaling rule)
    momentum: float = 0.9  # SGD momentum (AdamW: unused, betas 0.9, 0.999)
    weight_decay: float | None = None  # on every parameter (as MMDetection); None: 1e-4 (SGD), 0.05 (AdamW)
    warmup_iters: int | None = None  # linear warm-up length; None: 500 (paper), 50 (CPU); capped at 10% of the run
    warmup_ratio: float = 0.001  # lr at the first iteration, as a fraction of lr
    grad_clip: float | None = 35.0  # max L2 norm of all gradients (MMDetection's RetinaNet); None: no clipping
    # --- machine ---
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    amp: str = "none"  # none | bf16 | fp16 autocast (GPU only)
    seed: int = 0  # python/numpy/torch seeds and the data order
    resume: str | None = None  # checkpoint.pt to continue from (unset options take its values)
    eval_batch_size: int = 8  # images per forward pass during the final evaluation


# --- configuration ----------------------------------------------------------------------------------


def validate_config(config: TrainConfig) -> None:
    """Raise InputError (naming the option) for values out of range; no file is touched."""
    from detector.model import BACKBONES, MODEL_NAMES

    checks = [
        (config.model is None or config.model in MODEL_NAMES, "--model",
         f"unknown model {config.model!r} (choose from {', '.join(MODEL_NAMES)})"),
        (config.backbone is None or config.backbone in BACKBONES, "--backbone",
         f"unknown backbone {config.backbone!r} (choose from {', '.join(BACKBONES)})"),
        (config.epochs is None or config.epochs >= 1, "--epochs", f"must be at least 1, got {config.epochs}"),
        (config.batch_size is None or config.batch_size >= 1, "--batch-size",
         f"must be at least 1, got {config.batch_size}"),
        (config.lr is None or (math.isfinite(config.lr) and config.lr > 0), "--lr", f"must be > 0, got {config.lr}"),
        (config.img_size is None or config.img_size >= 32, "--img-size",
         f"must be at least 32 pixels, got {config.img_size}"),
        (config.max_size is None or config.max_size >= 32, "--max-size",
         f"must be at least 32 pixels, got {config.max_size}"),
        (config.img_size is None or config.max_size is None or config.max_size >= config.img_size, "--max-size",
         f"{config.max_size} is smaller than --img-size {config.img_size}"),
        (config.workers is None or config.workers >= 0, "--workers", f"must be 0 or more, got {config.workers}"),
        (config.recipe is None or config.recipe in RECIPES, "--recipe",
         f"unknown recipe {config.recipe!r} (choose from {', '.join(RECIPES)})"),
        (config.min_steps is None or config.min_steps >= 0, "min_steps", f"must be >= 0, got {config.min_steps}"),
        (config.schedule in SCHEDULES, "--schedule", f"unknown schedule {config.schedule!r} (choose from 1x, 2x)"),
        (config.optimizer is None or config.optimizer in OPTIMIZERS, "--optimizer",
         f"unknown optimizer {config.optimizer!r} (choose from {', '.join(OPTIMIZERS)})"),
        (0 <= config.momentum < 1, "momentum", f"must be in [0, 1), got {config.momentum}"),
        (config.weight_decay is None or config.weight_decay >= 0, "--weight-decay",
         f"must be >= 0, got {config.weight_decay}"),
        (config.warmup_iters is None or config.warmup_iters >= 0, "warmup_iters",
         f"must be >= 0, got {config.warmup_iters}"),
        (0 < config.warmup_ratio <= 1, "warmup_ratio", f"must be in (0, 1], got {config.warmup_ratio}"),
        (config.grad_clip is None or config.grad_clip > 0, "grad_clip", f"must be > 0, got {config.grad_clip}"),
        (config.device in DEVICE_CHOICES, "--device",
         f"unknown device {config.device!r} (choose from auto, cpu, cuda)"),
        (config.amp in AMP_CHOICES, "--amp", f"unknown mode {config.amp!r} (choose from none, bf16, fp16)"),
        (config.eval_batch_size >= 1, "eval_batch_size", f"must be at least 1, got {config.eval_batch_size}"),
        (not (config.pretrained and config.backbone_weights), "--backbone-weights",
         "give --pretrained or --backbone-weights, not both"),
        (config.backbone_weights is None or Path(config.backbone_weights).is_file(), "--backbone-weights",
         f"{config.backbone_weights}: no such file"),
        (config.data is not None or (config.ann is not None and config.images is not None)
         or config.resume is not None, "--data", "give --data DIR (or --ann FILE and --images DIR)"),
    ]
    for ok, option, problem in checks:
        if not ok:
            raise InputError(f"{option}: {problem}")


def choose_recipe(config: TrainConfig, device: torch.device) -> str:
    """config.recipe if set; else "cpu" (the small CPU recipe) on a CPU, "paper" on a GPU.

    Image size, backbone and the other options change only themselves: a CPU user with 400-px
    images who gives --img-size 400 still wants a recipe that learns on a CPU.
    """
    if config.recipe is not None:
        return config.recipe
    return "cpu" if device.type == "cpu" else "paper"


def _fill_sizes(values: dict, recipe: dict) -> None:
    """The recipe's image sizes for those not given, widened so that img_size <= max_size still holds
    (--img-size 400 on the 160-px CPU recipe means 400 max 400, not an error)."""
    if values["max_size"] is None:
        values["max_size"] = max(recipe["max_size"], values["img_size"] or 0)
    if values["img_size"] is None:
        values["img_size"] = min(recipe["img_size"], values["max_size"])


def resolve_defaults(config: TrainConfig, device: torch.device, previous: dict | None = None) -> TrainConfig:
    """Fill every option left None but `epochs`: from `previous` (a resumed run's options), else from the recipe.

    The recipe is `config.recipe`, else CPU_RECIPE on a CPU and PAPER_RECIPE on a GPU. lr follows the
    linear scaling rule BASE_LR[optimizer] × batch_size / 16 unless given. `epochs` needs the
    dataset's size (the recipe's step floor): `resolve_epochs` fills it.
    """
    values = dataclasses.asdict(config)
    if previous is not None:
        for name in RESUMED_OPTIONS:
            if values[name] is None:
                values[name] = previous.get(name)
        values["model_options"] = {**previous.get("model_options", {}), **values["model_options"]}
    values["recipe"] = choose_recipe(TrainConfig(**values), device)
    recipe = recipe_values(values["recipe"])
    _fill_sizes(values, recipe)
    for name, value in recipe.items():
        if name == "model_options":
            values[name] = {**value, **values[name]}
        elif name != "epochs" and values.get(name) is None:
            values[name] = value
    if values["model"] is None:
        values["model"] = "retinanet"
    if values["lr"] is None:
        values["lr"] = BASE_LR[values["optimizer"]] * values["batch_size"] / 16
    if values["weight_decay"] is None:
        values["weight_decay"] = DEFAULT_WEIGHT_DECAY[values["optimizer"]]
    if device.type == "cpu" and values["amp"] != "none":
        raise InputError(f"--amp: {values['amp']} autocast needs a GPU; use --amp none on CPU")
    return TrainConfig(**values)


def recipe_values(name: str) -> dict:
    """CPU_RECIPE or PAPER_RECIPE by name."""
    return CPU_RECIPE if name == "cpu" else PAPER_RECIPE


def resolve_epochs(config: TrainConfig, iters_per_epoch: int) -> TrainConfig:
    """`config` with `epochs` filled: as given, else the recipe's (1x; 2x doubles it), raised so that
    the run takes at least `min_steps` optimizer steps (2x: twice as many)."""
    if config.epochs is not None:  # given, or the resumed run's: a run never changes its length on its own
        return config
    length = SCHEDULES[config.schedule]  # 12 (1x) or 24 (2x)
    epochs = recipe_values(config.recipe).get("epochs", 12) * length // 12
    floor = -(-config.min_steps * length // (12 * iters_per_epoch))  # ceil, in integers
    return dataclasses.replace(config, epochs=max(epochs, floor))


# --- learning-rate schedule -------------------------------------------------------------------------


# The dump's options live here too, beside training's: the CLI reads both sets of defaults without torch.
@dataclass
class DumpConfig:
    ckpt: str  # checkpoint.pt written by `misalign train`
    out: str  # the dump folder; replaced only once the new ledger is whole
    data: str | None = None  # dataset root in COCO layout (with `split`) ...
    split: str | None = "val"  # ... split name: annotations/instances_<split>.json and <split>/
    ann: str | None = None  # or an explicit annotation file ...
    images: str | None = None  # ... and image folder
    score_thresh: float | None = None  # postprocess overrides; None keeps the checkpoint's value
    topk: int | None = None  # pairs per FPN level entering NMS
    nms_thresh: float | None = None  # IoU above which NMS suppresses
    max_det: int | None = None  # detections kept per image
    alpha: float | None = None  # exponent of obj in obj^alpha * cls^(1-alpha) (branch models only)
    batch_size: int = 4  # images per forward pass
    workers: int = 2  # DataLoader worker processes
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # autocast (bf16) on GPU; ignored on CPU
    limit: int | None = None  # dump only the first N images (by image id)
    raw_images: int = 0  # also write raw.parquet with every anchor of the first N images
    resume: bool = False  # continue a stopped dump of the same settings, keeping its finished parts
    part_images: int | None = None  # images per part (docs/ledger.md); None: misalign.parts.IMAGES_PER_PART
