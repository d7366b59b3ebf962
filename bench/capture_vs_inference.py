"""Benchmark: `misalign capture torchvision` against the same model's plain inference, same images.

A torchvision detection model (random weights, score_thresh 0.001 so that the candidate pool is
full, as for a trained model at COCO's 0.05) runs over N generated images twice in one process:
plain `model(images)` in batches, and `capture_model` into a LedgerRecorder (the ledger's work:
truth matching, Parquet, detections.json). Prints both times, the ratio, the candidates per image
and the ledger's critical-path and background-thread time an image (issue 13: <= 1.10x).

    .venv/bin/python bench/capture_vs_inference.py                       # retinanet_resnet50_fpn_v2, 16 images
    .venv/bin/python bench/capture_vs_inference.py --model fcos_resnet50_fpn --images 32 --size 512
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="retinanet_resnet50_fpn_v2")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=384, help="image side (and the model's min_size)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2, help="best of N for each")
    args = parser.parse_args()

    from detector.capture.torchvision import CaptureConfig, build_model, capture_model
    from misalign.recorder import LedgerRecorder

    torch.manual_seed(0)
    options = {"score_thresh": 0.001, "min_size": args.size, "max_size": args.size}
    model = build_model(CaptureConfig(model=args.model, out="", num_classes=91, options=options)).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, args.size, args.size, generator=g) for _ in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        gt = Path(tmp) / "gt.json"
        gt.write_text(json.dumps({
            "images": [{"id": i, "file_name": f"{i}.jpg", "width": args.size, "height": args.size} for i in range(len(images))],
            "annotations": [{"id": i + 1, "image_id": i, "category_id": 1 + i % 80, "bbox": [20, 20, 100, 80],
                             "area": 8000, "iscrowd": 0} for i in range(len(images))],
            "categories": [{"id": c, "name": str(c)} for c in range(91)]}))

        def plain():
            with torch.no_grad():
                for s in range(0, len(images), args.batch_size):
                    model(images[s:s + args.batch_size])

        timings = []

        def captured():
            head = getattr(model, "roi_heads", model)
            with LedgerRecorder(Path(tmp) / "dump", gt, nms_thresh=head.nms_thresh, max_det=head.detections_per_img) as rec:
                capture_model(model, images, rec, image_ids=list(range(len(images))), batch_size=args.batch_size)
            timings.append(rec.timing())

        plain()  # warm-up
        times = {}
        for name, run in (("inference", plain), ("capture", captured)):
            best = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
            times[name] = best
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(Path(tmp) / "dump" / "candidates.parquet").metadata.num_rows
    print(f"{args.model}, {args.images} images of {args.size} px, batch {args.batch_size}, "
          f"{rows / len(images):.0f} candidates/image, torch threads {torch.get_num_threads()}")
    print(f"plain inference {times['inference']:.2f} s, capture {times['capture']:.2f} s: "
          f"capture / inference = {times['capture'] / times['inference']:.3f}")
    best = min(timings, key=lambda t: t["seconds"])
    print(f"ledger per image: critical path {1000 * best['critical_s'] / len(images):.2f} ms, "
          f"background thread {1000 * best['background_s'] / len(images):.2f} ms")


if __name__ == "__main__":
    main()
