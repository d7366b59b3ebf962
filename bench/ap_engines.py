"""Benchmark: every installed AP engine against pycocotools, on the same files, in one run.

For each case the twelve COCOeval stats of every engine (misalign.cocoeval.ENGINES) are compared
with pycocotools' with `==` (bit for bit), and on the COCO-sized case each engine is timed end to
end as misalign runs it: load the ground truth, loadRes of the [N, 7] float64 array, evaluate,
accumulate, summarize. Cases:
- on-threshold: tests/test_ap_fidelity.py's files (two-decimal boxes exactly on every IoU threshold,
  area-range edges 32² and 96², duplicates and wrong-category boxes);
- crowd: crowd regions with detections inside, on their border and outside;
- ties: maxDets ties (equal scores around the 1st, 10th and 100th detection of an image);
- empty: no detections; no-gt: detections but no ground truth (-1 everywhere);
- coco: a synthetic COCO-sized result set (5,000 images x 100 kept boxes, 80 categories).

    .venv/bin/python bench/ap_engines.py                 # full size, best of 1
    .venv/bin/python bench/ap_engines.py --repeat 3      # best of 3 (shared machine)
    .venv/bin/python bench/ap_engines.py --images 500    # quicker look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _installed():
    from misalign.cocoeval import ENGINES, InputError, resolve_engine

    keys = []
    for key in ENGINES[1:]:
        try:
            resolve_engine(key)
            keys.append(key)
        except InputError:
            print(f"{key}: not installed, skipped")
    return keys


def results_array(results: list[dict]) -> np.ndarray:
    """[N, 7] float64 image_id, x, y, w, h, score, category_id from COCO results dicts."""
    return np.array([[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in results],
                    np.float64).reshape(-1, 7)


def crowd_case(folder: Path):
    rng = np.random.default_rng(5)
    images, anns, dets = [], [], []
    for image_id in range(1, 301):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 300, "height": 300})
        cx, cy = (round(float(v), 2) for v in rng.uniform(40, 200, 2))
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 1,
                     "bbox": [cx, cy, 60.0, 60.0], "area": 3600.0})
        for _ in range(int(rng.integers(0, 3))):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 3)),
                         "iscrowd": 0, "area": 900.0,
                         "bbox": [round(cx + float(rng.uniform(-30, 30)), 2), cy, 30.0, 30.0]})
        for _ in range(int(rng.integers(1, 6))):
            dets.append({"image_id": image_id, "category_id": int(rng.integers(1, 3)),
                         "score": round(float(rng.uniform(0, 1)), 2),
                         "bbox": [round(cx + float(rng.uniform(-40, 60)), 2), round(cy + float(rng.uniform(-40, 60)), 2),
                                  round(float(rng.uniform(10, 60)), 2), round(float(rng.uniform(10, 60)), 2)]})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (folder / "crowd_gt.json").write_text(json.dumps(gt))
    return folder / "crowd_gt.json", results_array(dets)


def ties_case(folder: Path):
    """Many detections with equal scores per image: which ones maxDets 1/10/100 keep decides AR."""
    rng = np.random.default_rng(9)
    images, anns, dets = [], [], []
    for image_id in range(1, 61):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 640, "height": 480})
        for _ in range(12):
            x, y = round(float(rng.uniform(0, 500)), 2), round(float(rng.uniform(0, 400)), 2)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "bbox": [x, y, 40.0, 30.0], "area": 1200.0})
            for _ in range(10):
                dets.append({"image_id": image_id, "category_id": 1, "score": float(rng.choice([0.5, 0.25, 0.75])),
                             "bbox": [round(x + float(rng.normal(0, 4)), 2), round(y + float(rng.normal(0, 4)), 2),
                                      40.0, 30.0]})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    (folder / "ties_gt.json").write_text(json.dumps(gt))
    return folder / "ties_gt.json", results_array(dets)


def small_cases(folder: Path) -> dict:
    from test_ap_fidelity import on_threshold_files

    sub = folder / "threshold"
    sub.mkdir()
    gt, results = on_threshold_files(sub)
    cases = {"on-threshold": (gt, results_array(json.loads(results.read_text())))}
    cases["crowd"] = crowd_case(folder)
    cases["ties"] = ties_case(folder)
    cases["empty"] = (gt, np.zeros((0, 7)))
    no_gt = json.loads(gt.read_text())
    no_gt["annotations"] = []
    (folder / "nogt.json").write_text(json.dumps(no_gt))
    cases["no-gt"] = (folder / "nogt.json", cases["on-threshold"][1])
    return cases


def coco_case(folder: Path, args):
    from misalign.ledger import read_candidates
    from misalign.synthetic import synthetic_ledger

    start = time.perf_counter()
    gt = synthetic_ledger(folder / "dump", num_images=args.images, cands_per_image=args.cands, num_categories=80,
                          gt_per_image=7.0, kept_per_image=100, seed=0, gt_path=folder / "coco_gt.json")
    kept = read_candidates(folder / "dump", ["image_id", "x1", "y1", "w", "h", "score", "category_id", "kept"])
    kept = kept[kept["kept"].to_numpy()]
    dets = np.column_stack([kept[c].to_numpy(np.float64) for c in ("image_id", "x1", "y1", "w", "h", "score",
                                                                   "category_id")])
    print(f"coco case: {len(dets):,} detections on {args.images:,} images, generated in "
          f"{time.perf_counter() - start:.1f} s (not timed)", flush=True)
    return gt, dets


def run_engine(key: str, gt: Path, dets: np.ndarray) -> tuple[list[float], float]:
    from misalign.cocoeval import STAT_KEYS, evaluate_detections, load_ground_truth

    start = time.perf_counter()
    stats = evaluate_detections(load_ground_truth(gt, key), dets)
    return [stats[k] for k in STAT_KEYS], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--cands", type=int, default=300, help="pre-NMS candidates per image of the coco case")
    parser.add_argument("--repeat", type=int, default=1, help="time each engine this many times, keep the fastest")
    parser.add_argument("--skip-reference-timing", action="store_true",
                        help="time pycocotools once only, even with --repeat")
    args = parser.parse_args()
    engines = _installed()
    verdict = {key: True for key in engines}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = small_cases(folder)
        for name, (gt, dets) in cases.items():
            reference, _ = run_engine("pycocotools", gt, dets)
            line = []
            for key in engines:
                same = run_engine(key, gt, dets)[0] == reference
                verdict[key] &= same
                line.append(f"{key} {'==' if same else '!='}")
            print(f"{name:>13} ({len(dets):>6,} dets): " + ", ".join(line), flush=True)
        gt, dets = coco_case(folder, args)
        times, reference = {}, None
        for _ in range(max(1, args.repeat)):
            for key in engines:
                if key == "pycocotools" and key in times and args.skip_reference_timing:
                    continue
                stats, seconds = run_engine(key, gt, dets)
                if key == "pycocotools":
                    reference = stats
                times.setdefault(key, []).append((seconds, stats))
        ref_s = min(s for s, _ in times["pycocotools"])
        print(f"\ncoco case ({len(dets):,} detections), best of {max(1, args.repeat)}: load gt + loadRes + evaluate "
              f"+ accumulate + summarize")
        for key in engines:
            seconds = min(s for s, _ in times[key])
            same = all(stats == reference for _, stats in times[key])
            verdict[key] &= same
            print(f"  {key:>12}: {seconds:7.2f} s  {seconds / ref_s:6.3f} x pycocotools  "
                  f"stats {'==' if same else '!='} pycocotools  (AP {times[key][0][1][0]:.4f})")
    print("\nbit-identical to pycocotools on every case: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                                     for k, v in verdict.items()))


if __name__ == "__main__":
    main()
