"""Benchmark: `misalign dump` against the same model's plain eval-mode inference, same images, same run.

Target (issues 4, 13): dump time <= 1.10 x inference time. Each phase runs in a fresh subprocess
(so its peak RSS is its own), A B A B ..., and the medians are compared. Also printed: the ledger's
critical-path time an image (the main loop inside ledger work: truth and counts on the device, the
copy, queueing) and its background time an image (the writer thread), from meta.json's `timing`.
On a GPU the critical path includes waiting for the forward pass (the batch's one copy syncs).

    .venv/bin/python bench/dump_vs_inference.py                        # shapes val, random weights
    .venv/bin/python bench/dump_vs_inference.py --ckpt RUN/checkpoint.pt --data DATA --split val
    .venv/bin/python bench/dump_vs_inference.py --recipe paper --num-images 16   # resnet50, 600 px
    .venv/bin/python bench/dump_vs_inference.py --device cuda --batch-size 8 --amp

Without --ckpt it builds RetinaNet-Conf (the CPU recipe's or, with --recipe paper, the paper's
ResNet-50 at 600 px) with random weights and a classifier
prior of 0.2, so that, as with a trained model, many pairs pass score_thresh and every level
fills its top-k: the ledger's work is then at its largest.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _loader(dataset, args, device):
    import torch

    from detector.data import collate_detection

    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                       collate_fn=collate_detection, pin_memory=device.type == "cuda")


def run_phase(args) -> dict:
    """One measurement in this process: 'infer' (model(images) over the split) or 'dump'."""
    import torch

    from detector.checkpoint import load_checkpoint, model_from_checkpoint
    from detector.data import CocoDetection
    from detector.dump import DumpConfig, dump
    from misalign.coco import resolve_dataset

    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    start = time.perf_counter()
    if args.phase == "dump":
        with tempfile.TemporaryDirectory() as tmp:
            dump(DumpConfig(ckpt=args.ckpt, out=f"{tmp}/ledger", data=args.data, split=args.split,
                            batch_size=args.batch_size, workers=args.workers, device=args.device,
                            amp=args.amp, limit=args.limit))
            elapsed = time.perf_counter() - start
            meta = json.loads(Path(f"{tmp}/ledger/meta.json").read_text())
            rows, timing = meta["num_candidates"], meta["timing"]
    else:
        state = load_checkpoint(args.ckpt)
        model = model_from_checkpoint(state).to(device)
        ann, images = resolve_dataset(args.data, args.split)
        dataset = CocoDetection(ann, images, train=False, min_size=model.cfg.img_size, max_size=model.cfg.max_size,
                                category_ids=state["config"]["category_ids"])
        if args.limit:
            dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
        rows, timing = 0, None
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            for batch, _ in _loader(dataset, args, device):
                outputs = model([image.to(device, non_blocking=True) for image in batch])
                rows += sum(len(o["scores"]) for o in outputs)  # forces the results to the host
        elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"seconds": elapsed, "peak_rss_mb": peak_mb, "cuda_peak_mb": cuda_peak_mb, "rows": rows, "timing": timing}


def make_inputs(args, tmp: Path) -> None:
    """Write the shapes val split and a random-weight checkpoint when none were given."""
    if args.data is None:
        from detector.shapes import write_shapes_dataset

        args.data = str(write_shapes_dataset(tmp / "shapes", num_train=0, num_val=args.num_images, seed=0))
        args.split = "val"
    if args.ckpt is None:
        import json as _json

        import torch

        from detector import build_model
        from detector.checkpoint import save_checkpoint
        from detector.train import CPU_RECIPE, PAPER_RECIPE

        ann = Path(args.data) / "annotations" / f"instances_{args.split}.json"
        category_ids = sorted(c["id"] for c in _json.loads(ann.read_text())["categories"])
        recipe = PAPER_RECIPE if args.recipe == "paper" else CPU_RECIPE
        options = {key: recipe[key] for key in ("backbone", "img_size", "max_size")}
        options.update(recipe["model_options"], prior_prob=0.2)
        torch.manual_seed(0)
        model = build_model("retinanet-conf", num_classes=len(category_ids), **options)
        args.ckpt = str(tmp / "checkpoint.pt")
        save_checkpoint(args.ckpt, {"model": model.state_dict(), "config": {**model.config, "category_ids": category_ids},
                                    "epoch": 0, "step": 0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt"), parser.add_argument("--data"), parser.add_argument("--split", default="val")
    parser.add_argument("--num-images", type=int, default=100, help="shapes val images when --data is not given")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--recipe", choices=["cpu", "paper"], default="cpu",
                        help="model built without --ckpt: the CPU recipe's (resnet10, 160 px) or the paper's (resnet50, 600 px)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phase", choices=["infer", "dump"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_inputs(args, Path(tmp))
        common = [sys.executable, __file__, "--ckpt", args.ckpt, "--data", args.data, "--split", args.split,
                  "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
                  "--threads", str(args.threads)] + (["--amp"] if args.amp else []) + \
                 (["--limit", str(args.limit)] if args.limit else [])
        results = {"infer": [], "dump": []}
        for _ in range(args.repeats):
            for phase in ("infer", "dump"):
                out = subprocess.run(common + ["--phase", phase], check=True, capture_output=True, text=True).stdout
                results[phase].append(json.loads(out.strip().splitlines()[-1]))
    infer = statistics.median(r["seconds"] for r in results["infer"])
    dumped = statistics.median(r["seconds"] for r in results["dump"])
    print(f"device {args.device}, batch {args.batch_size}, {args.repeats} runs each, medians")
    print(f"plain inference : {infer:8.2f} s   peak RSS {max(r['peak_rss_mb'] for r in results['infer']):7.0f} MB")
    print(f"dump (ledger)   : {dumped:8.2f} s   peak RSS {max(r['peak_rss_mb'] for r in results['dump']):7.0f} MB"
          f"   ({results['dump'][0]['rows']} candidate rows)")
    if args.device == "cuda":
        print(f"CUDA peak: inference {results['infer'][0]['cuda_peak_mb']:.0f} MB, dump {results['dump'][0]['cuda_peak_mb']:.0f} MB")
    critical = statistics.median(r["timing"]["ledger_critical_ms_per_image"] for r in results["dump"])
    background = statistics.median(r["timing"]["ledger_background_ms_per_image"] for r in results["dump"])
    print(f"ledger per image: critical path {critical:.2f} ms, background thread {background:.2f} ms")
    print(f"ratio dump / inference: {dumped / infer:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
