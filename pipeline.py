"""`misalign demo`: the whole pipeline on the built-in shapes dataset, the first thing a newcomer runs.

It sits above the three packages (docs/architecture.md): it drives `detector` (train, dump), whose
ledgers `reports` renders through `misalign`, so that `detector` itself never imports `reports`.

shapes dataset -> train `retinanet` and `retinanet-conf` (CPU defaults) -> dump both -> one
comparison report. With `models=MODEL_NAMES` and `rescore=True` the same steps build the zoo of
docs/methods.md: every variant, compared in one report with the counterfactual rescoring.

Every step writes its output atomically, so a re-run skips what is complete: the dataset once
written, a run with its eval.json, a dump with its meta.json; a run interrupted mid-training
resumes from its last epoch's checkpoint. The report is always rewritten (seconds to a minute).
"""

from __future__ import annotations

import logging
from pathlib import Path

from detector.dump import DumpConfig, dump
from detector.shapes import write_shapes_dataset
from detector.train import TrainConfig, train

log = logging.getLogger(__name__)

DEMO_MODELS = ("retinanet", "retinanet-conf")


def run_demo(out: str | Path, *, models: tuple[str, ...] = DEMO_MODELS, rescore: bool = False,
             device: str = "auto", workers: int | None = None, seed: int = 0) -> Path:
    """Run (or finish) the demo under `out`; returns the report's index.html.

    models: the detectors to train and compare, each a name of MODEL_NAMES.
    rescore: add the report's counterfactual rescoring (Table 5, AP lost to misalignment).
    workers: DataLoader processes; None leaves it to each step (the CPU training recipe loads in
    the main process, which is faster on 2 cores).
    """
    out = Path(out)
    data = out / "shapes"
    if (data / "annotations" / "instances_val.json").is_file():
        log.info("[1/4] shapes dataset: %s (already there)", data)
    else:
        log.info("[1/4] writing the shapes dataset to %s", data)
        write_shapes_dataset(data, num_train=1000, num_val=200, image_size=160, seed=seed)
    dumps = []
    for step, name in enumerate(models):
        run, ledger = out / "runs" / name, out / "dumps" / name
        _train_once(name, data, run, device, workers, seed, f"[2/4] train {name} ({step + 1}/{len(models)})")
        if (ledger / "meta.json").is_file():
            log.info("[3/4] dump %s: %s (already there)", name, ledger)
        else:
            log.info("[3/4] dump %s on shapes val -> %s", name, ledger)
            dump(DumpConfig(ckpt=str(run / "checkpoint.pt"), out=str(ledger), data=str(data), split="val",
                            device=device, workers=0 if workers is None else workers, raw_images=4))
        dumps.append(ledger)
    log.info("[4/4] report comparing %s", ", ".join(models))
    import reports  # looked up at call time: the report is the last step, and tests record it

    return reports.write_report([str(d) for d in dumps], str(out / "report"), before_after_nms=True, rescore=rescore)


def _train_once(name: str, data: Path, run: Path, device: str, workers: int | None, seed: int, label: str) -> None:
    if (run / "eval.json").is_file():
        log.info("%s: %s (already trained)", label, run)
        return
    checkpoint = run / "checkpoint.pt"
    resume = str(checkpoint) if checkpoint.is_file() else None
    log.info("%s -> %s%s", label, run, " (resuming)" if resume else "")
    train(TrainConfig(model=name, data=str(data), split="train", out=str(run), device=device, workers=workers,
                      seed=seed, resume=resume))
