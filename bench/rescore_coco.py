"""Benchmark: counterfactual rescoring (misalign.rescore) of a COCO-sized ledger.

A synthetic ledger the size of COCO val (5,000 images x 1,000 pre-NMS candidates, 80 categories,
~7 ground-truth boxes per image, max_det 100) is generated into a temporary folder (not timed),
or an existing one is read (--ledger DIR --gt FILE). Timed, wall and CPU seconds: the grouping for
NMS (once per dump), then per ranking the NMS (torchvision, one call per chunk of (image, category)
groups), the max_det cut, and COCOeval of the kept boxes; then `rescore()` end to end.

    .venv/bin/python bench/rescore_coco.py                     # full size, default α grid
    .venv/bin/python bench/rescore_coco.py --images 500        # quicker look
    .venv/bin/python bench/rescore_coco.py --ledger DUMP --gt instances_val.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def __str__(self):
        return f"{self.wall:6.2f} s wall {self.cpu:6.2f} s CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--cands", type=int, default=1000, help="pre-NMS candidates per image")
    parser.add_argument("--ledger", type=Path, help="an existing ledger instead of a synthetic one")
    parser.add_argument("--gt", type=Path, help="its ground truth (default: its meta.json dataset.ann)")
    args = parser.parse_args()

    from misalign.ledger import read_ledger
    from misalign.metrics import evaluate_ap, load_ground_truth
    from misalign.rescore import RESCORE_COLUMNS, cap_per_image, nms_settings, nms_survivors, oracle_nms_kept, \
        plan_nms, ranking_scores, rescore

    with tempfile.TemporaryDirectory() as tmp:
        ledger_dir, gt = args.ledger, args.gt
        if ledger_dir is None:
            from misalign.synthetic import synthetic_ledger

            ledger_dir = Path(tmp) / "dump"
            gt = synthetic_ledger(ledger_dir, num_images=args.images, cands_per_image=args.cands, num_categories=80,
                                  gt_per_image=7.0, kept_per_image=100, seed=0, gt_path=Path(tmp) / "gt.json")
        with Timer() as t:
            ledger = read_ledger(ledger_dir, columns=list(RESCORE_COLUMNS))
        cands = ledger.candidates
        print(f"read {len(cands):,} candidates of {len(ledger.images):,} images: {t}", flush=True)
        coco_gt = load_ground_truth(gt or ledger.meta["dataset"]["ann"])
        settings = nms_settings(ledger.meta)
        image_id = cands["image_id"].to_numpy()
        with Timer() as t:
            plan = plan_nms(image_id, cands["category_id"].to_numpy(), cands[["x1", "y1", "x2", "y2"]].to_numpy())
        print(f"grouping for NMS ({len(plan.starts):,} nms calls per ranking): {t}", flush=True)
        scores, _ = ranking_scores(cands)
        image_ids = ledger.images["image_id"].to_numpy()
        for name in ("cls", "alpha=0.4", "oracle"):
            with Timer() as t_nms:
                survivor = nms_survivors(plan, scores[name], settings["nms_thresh"])
            with Timer() as t_cap:
                kept = cap_per_image(image_id, scores[name], survivor, settings["max_det"])
            rows = cands.loc[kept, ["image_id", "category_id", "x1", "y1", "x2", "y2"]].assign(score=scores[name][kept])
            with Timer() as t_ap:
                ap = evaluate_ap(coco_gt, rows, image_ids)["AP"]
            print(f"{name:>10}: NMS {t_nms} | max_det cut {t_cap} | COCOeval {t_ap} | "
                  f"{int(survivor.sum()):,} survivors, {int(kept.sum()):,} kept, AP {ap:.4f}", flush=True)
        with Timer() as t_nms:
            kept, _ = oracle_nms_kept(cands, settings["nms_thresh"], settings["max_det"], plan)
        print(f"oracle_nms: IoU-guided NMS with attribution and max_det cut {t_nms} | {int(kept.sum()):,} kept", flush=True)
        # two-decimal float64 boxes (COCO results files): shifts round, so every call is one group
        boxes64 = np.round(cands[["x1", "y1", "x2", "y2"]].to_numpy(np.float64), 2)
        with Timer() as t_plan:
            plan64 = plan_nms(image_id, cands["category_id"].to_numpy(), boxes64)
        with Timer() as t_nms:
            nms_survivors(plan64, scores["cls"], settings["nms_thresh"])
        print(f"float64 two-decimal boxes: grouping {t_plan} ({len(plan64.starts):,} nms calls, "
              f"{plan64.inexact_chunks:,} chunks fell back) | NMS {t_nms}", flush=True)
        with Timer() as t:
            result = rescore(ledger, coco_gt)
        print(f"rescore(), {len(result.rankings)} rankings: {t}; AP lost to misalignment {result.ap_lost:.4f}, "
              f"gap to the oracle ranking {result.ap_gap_to_oracle_ranking:.4f}")


if __name__ == "__main__":
    main()
