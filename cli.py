"""The `misalign` command. Each command parses its options and calls one library function.

Imports of the library happen inside the commands so that `misalign --help` stays instant
(torch is only loaded by the commands that run a model).
"""

from __future__ import annotations

import logging
import sys

import click

from misalign import __version__
from misalign.errors import InputError


class _Group(click.Group):
    """A click group that turns `InputError` into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="misalign")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """misalign: why one-stage detectors keep the wrong boxes."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --- data -------------------------------------------------------------------------------------


@main.group(cls=_Group)
def data() -> None:
    """Write the built-in shapes dataset, or check a COCO dataset."""


@data.command("shapes")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write (replaced if it holds an earlier shapes dataset).")
@click.option("--num-train", default=1000, show_default=True, type=click.IntRange(min=0), help="Training images.")
@click.option("--num-val", default=200, show_default=True, type=click.IntRange(min=0), help="Validation images.")
@click.option("--image-size", default=160, show_default=True, type=click.IntRange(min=64), help="Side of the square images, pixels.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Same seed, same bytes.")
def data_shapes(out: str, num_train: int, num_val: int, image_size: int, seed: int) -> None:
    """Write the built-in shapes dataset in COCO's layout."""
    from detector.shapes import write_shapes_dataset

    path = write_shapes_dataset(out, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    click.echo(f"wrote {path} ({num_train} train + {num_val} val images); check it with: misalign data check --data {path} --split val")


@data.command("check")
@click.option("--data", "data_dir", type=click.Path(), help="Dataset folder in COCO's layout.")
@click.option("--split", default="val", show_default=True, help="Split: DATA/annotations/instances_SPLIT.json and DATA/SPLIT/.")
@click.option("--ann", type=click.Path(), help="Annotation file (instead of --data/--split).")
@click.option("--images", type=click.Path(), help="Image folder that goes with --ann.")
def data_check(data_dir, split, ann, images) -> None:
    """Check a COCO dataset and summarise it (exit 2 unless usable).

    Usable means: the annotation file is valid COCO JSON, it lists at least one image, and every
    listed image file exists and decodes. Empty images, crowd boxes, degenerate boxes, boxes
    reaching outside the image and size mismatches are reported but allowed.
    """
    from misalign.coco import check_dataset, format_summary, resolve_dataset

    ann_path, images_dir = resolve_dataset(data=data_dir, split=split, ann=ann, images=images)
    summary = check_dataset(ann_path, images_dir)
    click.echo(format_summary(summary))
    if not summary.usable:
        raise InputError(summary.error)


# --- train ------------------------------------------------------------------------------------


def _parse_model_options(pairs: tuple[str, ...], option: str = "--model-option") -> dict:
    """("num_convs=2", "norm=group") -> {"num_convs": 2, "norm": "group"} (values read as JSON if they can be)."""
    import json

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{option}: expected KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _default(config_class: str, name: str):
    """The default of field `name` of `config_class`: detector.recipe's TrainConfig or DumpConfig,
    detector.capture.config's CaptureConfig or UltralyticsConfig, or misalign.settings'
    CompareSettings (the report's). The CLI shows and uses the configs' own defaults; none of these
    modules imports torch or pandas."""
    import dataclasses

    from detector import recipe
    from detector.capture import config as capture_config
    from misalign import settings

    module = next(m for m in (recipe, capture_config, settings) if hasattr(m, config_class))
    return {f.name: f.default for f in dataclasses.fields(getattr(module, config_class))}[name]


def _split_and_out(command):
    """The dataset (--data/--split or --ann/--images) and --out options of every ledger-writing command."""
    options = [
        click.option("--data", type=click.Path(), help="Dataset folder in COCO layout."),
        click.option("--split", default=_default("DumpConfig", "split"), show_default=True,
                     help="Split: annotations/instances_SPLIT.json and SPLIT/."),
        click.option("--ann", type=click.Path(), help="Annotation file (instead of --data/--split)."),
        click.option("--images", type=click.Path(), help="Image folder (instead of --data/--split)."),
        click.option("--out", required=True, type=click.Path(), help="Dump folder to write (replaced when complete)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("train", context_settings={"max_content_width": 100})
@click.option("--model", help="Detector: retinanet | retinanet-conf | iou-aware (see detector.build_model). "
              "Default: retinanet, or the checkpoint's with --resume.")
@click.option("--recipe", help="cpu (resnet10, 160 px, AdamW, 18 epochs of batch 8, at least 2,250 steps) | "
              "paper (resnet50, 1000×600, SGD, 12 epochs of batch 16): the defaults of every option below. "
              "Default: cpu on a CPU, paper on a GPU; no other option changes it.")
@click.option("--data", type=click.Path(),
              help="Dataset folder in COCO layout (annotations/instances_SPLIT.json, SPLIT/).")
@click.option("--split", default=_default("TrainConfig", "split"), show_default=True, help="Training split of --data.")
@click.option("--ann", type=click.Path(), help="Training annotation file (instead of --data/--split).")
@click.option("--images", type=click.Path(), help="Training image folder (with --ann).")
@click.option("--val-split", default=_default("TrainConfig", "val_split"), show_default=True,
              help="Split of --data evaluated at the end into RUN/eval.json ('' or missing: no evaluation).")
@click.option("--out", type=click.Path(), help="Run folder: log.csv, checkpoint.pt, eval.json "
              "(default with --resume: the checkpoint's folder).")
@click.option("--backbone", help="resnet10 | resnet18 | resnet34 | resnet50 | resnet101. Default: resnet50 (paper); "
              "resnet10 in the CPU recipe.")
@click.option("--pretrained", is_flag=True,
              help="Start the backbone from torchvision's ImageNet weights (downloads once).")
@click.option("--backbone-weights", type=click.Path(), help="Start the backbone from a local state-dict file.")
@click.option("--epochs", type=int, help="Epochs. Default: 12 (1x) or 24 (2x); 18 (36) in the CPU recipe, more on a "
              "small dataset so that the run takes at least 2,250 (4,500) optimizer steps.")
@click.option("--schedule", default=_default("TrainConfig", "schedule"), show_default=True,
              help="1x or 2x: default epochs; lr ×0.1 at 8/12 and 11/12 of the run either way.")
@click.option("--batch-size", type=int, help="Images per step over all processes. Default: 16 (paper); 8 (CPU recipe).")
@click.option("--optimizer", help="sgd (momentum 0.9, weight decay 1e-4) | adamw (weight decay 0.05). "
              "Default: sgd (paper); adamw (CPU recipe).")
@click.option("--lr", type=float, help="Base learning rate. Default: 0.01 (sgd) or 0.004 (adamw) × batch-size / 16.")
@click.option("--img-size", type=int, help="Shorter image side in pixels. Default: 600 (paper); 160 (CPU recipe); "
              "at most --max-size.")
@click.option("--max-size", type=int, help="Longer image side at most. Default: 1000 (paper); 160 (CPU recipe); "
              "at least --img-size.")
@click.option("--workers", type=int, help="Data-loader processes per training process (0: main process). "
              "Default: 4; 0 in the CPU recipe.")
@click.option("--device", default=_default("TrainConfig", "device"), show_default=True, help="auto | cpu | cuda.")
@click.option("--amp", default=_default("TrainConfig", "amp"), show_default=True, help="none | bf16 | fp16 autocast (GPU only).")
@click.option("--seed", type=int, default=_default("TrainConfig", "seed"), show_default=True,
              help="Seed of the weights, the data order and augmentation.")
@click.option("--resume", type=click.Path(), help="RUN/checkpoint.pt to continue from (same next batch, same lr).")
@click.option("-o", "--model-option", "model_options", multiple=True, metavar="KEY=VALUE",
              help="Extra build_model option, repeatable (e.g. -o obj_exponent=0.5 -o head_norm=group).")
def train_command(model, recipe, data, split, ann, images, val_split, out, backbone, pretrained, backbone_weights, epochs,
                  schedule, batch_size, optimizer, lr, img_size, max_size, workers, device, amp, seed, resume,
                  model_options):
    """Train a bundled detector (RetinaNet and variants); writes RUN/log.csv, checkpoint.pt, eval.json.

    On a CPU a small recipe (resnet10, 160 px, narrow GroupNorm heads, AdamW lr 0.002, 18 epochs of
    batch 8, at least 2,250 optimizer steps) learns the shapes dataset in minutes; on a GPU the
    paper's (resnet50, 1000×600, SGD lr 0.01, 12 epochs of batch 16). --recipe chooses; --img-size,
    --backbone and the others only change themselves.
    Several GPUs: torchrun --nproc_per_node N --no-python misalign train ...
    """
    import os
    from pathlib import Path

    from detector.train import TrainConfig, train

    if out is None:
        if resume is None:
            raise InputError("--out: give the run folder (e.g. --out runs/retinanet)")
        out = str(Path(resume).parent)
    config = TrainConfig(
        recipe=recipe, model=model, data=data, split=split, ann=ann, images=images, val_split=val_split or None, out=out,
        backbone=backbone, pretrained=pretrained, backbone_weights=backbone_weights, epochs=epochs,
        schedule=schedule, batch_size=batch_size, optimizer=optimizer, lr=lr, img_size=img_size, max_size=max_size,
        workers=workers, device=device, amp=amp, seed=seed, resume=resume,
        model_options=_parse_model_options(model_options),
    )
    run_dir = train(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0 only
        click.echo(str(run_dir))


# --- dump / import ----------------------------------------------------------------------------


@main.command("dump")
@click.option("--ckpt", required=True, type=click.Path(), help="checkpoint.pt written by `misalign train`.")
@_split_and_out
@click.option("--score-thresh", type=float, help="Pairs with score above this enter NMS [checkpoint's].")
@click.option("--topk", type=int, help="Pairs per FPN level entering NMS [checkpoint's].")
@click.option("--nms-thresh", type=float, help="NMS IoU threshold [checkpoint's].")
@click.option("--max-det", type=int, help="Detections kept per image [checkpoint's].")
@click.option("--alpha", type=float, help="Exponent of obj in obj^alpha * cls^(1-alpha) [checkpoint's].")
@click.option("--batch-size", default=_default("DumpConfig", "batch_size"), show_default=True, help="Images per forward pass.")
@click.option("--workers", default=_default("DumpConfig", "workers"), show_default=True, help="DataLoader worker processes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_default("DumpConfig", "device"), show_default=True)
@click.option("--amp", is_flag=True, help="bf16 autocast on GPU.")
@click.option("--limit", type=int, help="Dump only the first N images (by id).")
@click.option("--raw-images", default=_default("DumpConfig", "raw_images"), show_default=True, help="Also write raw.parquet with every anchor of the first N images.")
@click.option("--part-images", type=int, help="Images per part of the ledger, the unit of --resume and of torchrun's shards [128].")
@click.option("--resume", is_flag=True, help="Continue a stopped dump of the same settings into --out, keeping its finished parts.")
def dump_(**options) -> None:
    """Record every candidate before and after NMS (the ledger).

    Writes candidates.parquet, images.parquet, raw_counts.parquet, meta.json and
    detections.json (see docs/ledger.md), every candidate with its true IoU.
    Several GPUs: torchrun --nproc_per_node N --no-python misalign dump ... (each process dumps
    its share of the parts; the ledger is the one-process dump's).
    """
    import os

    from detector.dump import DumpConfig, dump

    out = dump(DumpConfig(**options))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0 only
        click.echo(out)


@main.command("import")
@click.option("--gt", required=True, type=click.Path(), help="COCO annotation JSON the predictions refer to.")
@click.option("--predictions", required=True, type=click.Path(),
              help="COCO results .json (kept boxes only), or a .parquet/.csv table of candidates.")
@click.option("--out", required=True, type=click.Path(), help="Dump folder to write (replaced when complete).")
@click.option("--name", default=None, help="Detector name for meta.json [the predictions file's stem].")
@click.option("--nms-thresh", default=0.5, show_default=True, type=float,
              help="IoU above which NMS suppresses (tables without a `kept` column), and for suppressed_by.")
@click.option("--max-det", default=100, show_default=True, type=int,
              help="Detections kept per image after NMS (tables without a `kept` column).")
def import_(gt, predictions, out, name, nms_thresh, max_det) -> None:
    """Build a ledger from another detector's predictions.

    Reads COCO results JSON (kept boxes only) or a Parquet/CSV table of candidates.
    """
    from misalign.importer import import_predictions

    click.echo(import_predictions(gt, predictions, out, name=name, nms_thresh=nms_thresh, max_det=max_det))

# --- capture -----------------------------------------------------------------------------------



@main.group(cls=_Group)
def capture() -> None:
    """Write a pre-NMS ledger from another framework's detection model (docs/capture.md)."""


@capture.command("torchvision", context_settings={"max_content_width": 100})
@click.option("--model", required=True, help="torchvision detection builder, e.g. retinanet_resnet50_fpn_v2, "
              "fcos_resnet50_fpn, ssd300_vgg16, ssdlite320_mobilenet_v3_large, fasterrcnn_resnet50_fpn.")
@click.option("--weights", type=click.Path(), help="State-dict file for that builder's model [random weights].")
@click.option("--num-classes", type=int, help="The builder's num_classes [its default: 91].")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A builder keyword argument (JSON value), e.g. -o score_thresh=0.001 -o detections_per_img=100.")
@click.option("--label-map", type=click.Path(), help="JSON {label: category id} [labels are category ids].")
@_split_and_out
@click.option("--batch-size", default=_default("CaptureConfig", "batch_size"), show_default=True,
              help="Images per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_default("CaptureConfig", "device"),
              show_default=True)
@click.option("--limit", type=int, help="Capture only the first N images (by id).")
@click.option("--part-images", type=int, help="Images per part of the ledger, the unit of --resume and of torchrun's shards [128].")
@click.option("--resume", is_flag=True, help="Continue a stopped capture of the same settings into --out, keeping its finished parts.")
def capture_torchvision(model, weights, num_classes, options, label_map, data, split, ann, images, out, batch_size,
                        device, limit, part_images, resume) -> None:
    """Capture a torchvision detector: the candidates its postprocess considered, what its NMS kept.

    Several GPUs: torchrun --nproc_per_node N --no-python misalign capture torchvision ...
    """
    import os

    from detector.capture.torchvision import CaptureConfig, capture

    if part_images is not None and part_images < 1:
        raise InputError(f"--part-images: {part_images} must be at least 1")
    config = CaptureConfig(model=model, out=out, data=data, split=split, ann=ann, images=images, weights=weights,
                           num_classes=num_classes, options=_parse_model_options(options, "--option"),
                           label_map=label_map, batch_size=batch_size, device=device, limit=limit,
                           part_images=part_images, resume=resume)
    result = capture(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0 only
        click.echo(result)


@capture.command("ultralytics", context_settings={"max_content_width": 100})
@click.option("--weights", required=True, type=click.Path(), help="YOLO .pt file (v8, 11), or a model .yaml (random weights).")
@click.option("--label-map", type=click.Path(), help="JSON {class index: category id} [class i = the i-th category by id].")
@_split_and_out
@click.option("--imgsz", default=_default("UltralyticsConfig", "imgsz"), show_default=True, help="Letterboxed input side.")
@click.option("--conf", default=_default("UltralyticsConfig", "conf"), show_default=True,
              help="Candidate threshold (ultralytics' validation default).")
@click.option("--iou", default=_default("UltralyticsConfig", "iou"), show_default=True, help="NMS IoU threshold.")
@click.option("--max-det", default=_default("UltralyticsConfig", "max_det"), show_default=True,
              help="Detections kept per image.")
@click.option("--batch-size", default=_default("UltralyticsConfig", "batch_size"), show_default=True,
              help="Images per forward pass.")
@click.option("--device", default=_default("UltralyticsConfig", "device"), show_default=True,
              help="cpu, cuda, cuda:0, ...")
@click.option("--limit", type=int, help="Capture only the first N images (by id).")
def capture_ultralytics(**options) -> None:
    """Capture an ultralytics YOLO detector: validation-mode candidates, ultralytics' own NMS."""
    from detector.capture.ultralytics import UltralyticsConfig, capture as run

    click.echo(run(UltralyticsConfig(**options)))


# --- report / demo ----------------------------------------------------------------------------


@main.command("report")
@click.argument("dumps", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Report folder to write (replaced when complete).")
@click.option("--before-after-nms", is_flag=True, help="Add the paper's Figure 1, Table 1 and Figure 2 (before/after NMS).")
@click.option("--names", default=None, help="Comma-separated detector names, one per dump (default: the dump folder names).")
@click.option("--gt", default=None, type=click.Path(path_type=str), help="Ground-truth COCO JSON (default: each dump's meta.json dataset.ann).")
@click.option("--min-iou", default=_default("CompareSettings", "min_iou"), show_default=True, type=float,
              help="Correlation pool: candidates with IoU >= this.")
@click.option("--images", "num_images", default=_default("CompareSettings", "num_images"), show_default=True, type=int,
              help="Images shown one by one (Table 1 columns, scatters).")
@click.option("--bootstrap", default=_default("CompareSettings", "bootstrap"), show_default=True, type=int,
              help="Bootstrap resamples of images for the 95% CIs.")
@click.option("--seed", default=_default("CompareSettings", "seed"), show_default=True, type=int, help="Bootstrap seed.")
@click.option("--rescore", is_flag=True, help="Re-run NMS on each pre-NMS pool ranked by cls, obj, cls*obj, obj^a*cls^(1-a) and the true-IoU oracles.")
@click.option("--alphas", default=None, help="Comma-separated α grid for --rescore [0,0.1,...,0.9].")
@click.option("--rescore-thresh", type=float, default=None, metavar="T",
              help="With --rescore: each ranking's pool is its candidates with that ranking's score > T, T in [0, 1); "
                   "the oracle rankings filter by the detector's own score [none: the dump's pool as recorded].")
def report(dumps, out, before_after_nms, names, gt, min_iou, num_images, bootstrap, seed, rescore, alphas,
           rescore_thresh) -> None:
    """Compare ledgers in one HTML report with metrics.json.

    Writes DIR/index.html (self-contained), metrics.json, tables/*.csv and figures/*.png.
    """
    from reports import write_report

    index = write_report(list(dumps), out, names=names, gt=gt, before_after_nms=before_after_nms, min_iou=min_iou,
                         num_images=num_images, bootstrap=bootstrap, seed=seed, rescore=rescore, alphas=alphas,
                         rescore_thresh=rescore_thresh)
    click.echo(str(index))


@main.command("demo")
@click.option("--out", default="demo", show_default=True, type=click.Path(), help="Folder for the dataset, runs, dumps and report.")
@click.option("--models", default="retinanet,retinanet-conf", show_default=True,
              help="Comma-separated detectors to train and compare, or 'all' for every variant (the zoo).")
@click.option("--rescore", is_flag=True, help="Add the counterfactual rescoring (Table 5, AP lost to misalignment).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=int, help="DataLoader worker processes [each step's default].")
def demo(out, models, rescore, device, workers) -> None:
    """Train detectors on shapes, dump, and compare them.

    Shapes dataset -> train RetinaNet and RetinaNet-Conf -> dump both -> comparison report.
    Re-running reuses every finished step. The zoo of docs/methods.md is
    `misalign demo --models all --rescore --out zoo`.
    """
    from pipeline import run_demo
    from detector.model import MODEL_NAMES

    # dict.fromkeys: a name given twice is trained and compared once
    names = MODEL_NAMES if models.strip() == "all" else tuple(dict.fromkeys(m.strip() for m in models.split(",") if m.strip()))
    unknown = [m for m in names if m not in MODEL_NAMES]
    if unknown or not names:
        problem = f"unknown {', '.join(map(repr, unknown))}" if unknown else "no model given"
        raise InputError(f"--models: {problem}; choose from {', '.join(MODEL_NAMES)} or 'all'")
    index = run_demo(out, models=names, rescore=rescore, device=device, workers=workers)
    click.echo(f"report: {index}")


if __name__ == "__main__":
    main()
