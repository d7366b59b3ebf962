"""Benchmark: the whole `misalign report --before-after-nms` against pycocotools' COCOeval.

A synthetic ledger the size of COCO val (5,000 images x 1,000 pre-NMS candidates, 80 categories,
~7 ground-truth boxes per image, 100 kept per image) is generated into a temporary folder (not
timed). Then, in the same run:
- the report, as a subprocess (`misalign report --before-after-nms DUMP --out DIR`): wall time and
  peak resident memory (resource.getrusage(RUSAGE_CHILDREN).ru_maxrss: the report is the only child);
- pycocotools' COCOeval on the kept rows alone: load the ground truth, loadRes(detections.json),
  evaluate, accumulate, summarize (in this process).
Targets (issue 11): report <= 0.25 x COCOeval at 1,000 candidates an image, <= 1.0 x and peak
memory <= 4 GB at 4,000 (20 M rows); with --rescore, the rescoring adds <= 1.0 x one COCOeval.

--kind picks the generator's score/IoU relation, so the figures are measured on differently made
ledgers: 'default' (half the candidates background, cls follows IoU weakly), 'low-iou' (80%
background or far-off boxes: many low-IoU candidates, a small correlation pool; cls follows IoU
more closely, obj less).

    .venv/bin/python bench/report_vs_cocoeval.py                # full size
    .venv/bin/python bench/report_vs_cocoeval.py --images 500   # quicker look
    .venv/bin/python bench/report_vs_cocoeval.py --repeat 2     # best of 2 each (shared machine)
    .venv/bin/python bench/report_vs_cocoeval.py --profile      # + cProfile top costs of the report
    .venv/bin/python bench/report_vs_cocoeval.py --kind low-iou  # the other generated ledger
    .venv/bin/python bench/report_vs_cocoeval.py --candidates-per-image 4000   # 20 M rows
    .venv/bin/python bench/report_vs_cocoeval.py --rescore      # + the report with --rescore (default α grid)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = {  # misalign.synthetic.SyntheticConfig options of each generated ledger
    "default": {},
    "low-iou": {"background_fraction": 0.8, "cls_coupling": 1.0, "obj_coupling": 0.5},
}


def generate(folder: Path, args) -> Path:
    from misalign.synthetic import synthetic_ledger

    start = time.perf_counter()
    gt = synthetic_ledger(folder / "dump", num_images=args.images, cands_per_image=args.cands,
                          num_categories=args.categories, gt_per_image=args.gt_per_image,
                          kept_per_image=args.kept, seed=args.seed, gt_path=folder / "instances_synthetic.json",
                          **KINDS[args.kind])
    print(f"generated {args.images} images x {args.cands} candidates in {time.perf_counter() - start:.1f} s "
          f"(not timed)", flush=True)
    return gt


def report_command(dump: Path, out: Path, args, rescore: bool = False) -> list[str]:
    return [sys.executable, "-c", "from cli import main; main()", "report", "--before-after-nms", str(dump),
            "--out", str(out), "--bootstrap", str(args.bootstrap)] + (["--rescore"] if rescore else [])


def _cpu(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def time_report(dump: Path, out: Path, args, rescore: bool = False) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in GB) of the report subprocess.

    The peak is the child's own (os.wait4's rusage), not the max over every child so far."""
    import os

    command = report_command(dump, out, args, rescore)
    print("$ misalign " + " ".join(command[3:]), flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command)
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e6  # ru_maxrss: kilobytes on Linux


def time_cocoeval(gt: Path, detections: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, AP) of pycocotools: load gt, loadRes, evaluate, accumulate, summarize."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cpu = _cpu(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt))
        coco_dt = coco_gt.loadRes(str(detections))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return time.perf_counter() - start, _cpu(resource.RUSAGE_SELF) - cpu, float(evaluator.stats[0])


def profile_report(dump: Path, out: Path, args, top: int = 25) -> None:
    """The report in this process under cProfile; prints the `top` cumulative costs of misalign/reports code."""
    from reports import write_report

    profiler = cProfile.Profile()
    profiler.enable()
    write_report([dump], out, before_after_nms=True, bootstrap=args.bootstrap)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    print(f"\n--- cProfile of the report: top {top} by cumulative time (misalign/, reports/) ---")
    stats.sort_stats("cumulative").print_stats(r"(misalign|reports)/", top)
    print(f"--- top {top} by own time (all code) ---")
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--cands", "--candidates-per-image", dest="cands", type=int, default=1000,
                        help="pre-NMS candidates per image (1000, 2000, 4000: 5 M, 10 M, 20 M rows at 5,000 images)")
    parser.add_argument("--kind", choices=sorted(KINDS), default="default", help="which generated ledger (see above)")
    parser.add_argument("--rescore", action="store_true",
                        help="also time the report with --rescore; prints what rescoring adds, against COCOeval")
    parser.add_argument("--categories", type=int, default=80)
    parser.add_argument("--gt-per-image", type=float, default=7.0)
    parser.add_argument("--kept", type=int, default=100, help="kept detections per image")
    parser.add_argument("--bootstrap", type=int, default=200, help="the report's --bootstrap (its default: 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="write the ledger and report here and keep them")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each side this many times, alternating, and keep the fastest (the machine may be shared)")
    parser.add_argument("--profile", action="store_true", help="also profile the report in-process (after timing)")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="misalign-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        gt = folder / "instances_synthetic.json"
        if not (folder / "dump" / "meta.json").exists() or not gt.exists():
            gt = generate(folder, args)
        reports, cocos, rescored = [], [], []
        for _ in range(max(args.repeat, 1)):
            reports.append(time_report(folder / "dump", folder / "report", args))
            cocos.append(time_cocoeval(gt, folder / "dump" / "detections.json"))
            if args.rescore:
                rescored.append(time_report(folder / "dump", folder / "report-rescore", args, rescore=True))
        report_s, report_cpu, _ = min(reports)
        peak_gb = max(r[2] for r in reports)
        coco_s, coco_cpu, ap = min(cocos)
        ratio = report_s / coco_s
        rows = args.images * args.cands
        target = 0.25 if args.cands <= 1000 else 1.0
        print(f"\n{args.kind} ledger, {args.images:,} images x {args.cands:,} candidates ({rows / 1e6:.0f} M rows), "
              f"best of {max(args.repeat, 1)}:")
        print(f"report (misalign report --before-after-nms, subprocess): {report_s:8.1f} s wall, {report_cpu:8.1f} s CPU")
        print(f"pycocotools COCOeval (load, loadRes, evaluate, accumulate, summarize): {coco_s:8.1f} s wall, "
              f"{coco_cpu:8.1f} s CPU  (AP {ap:.3f})")
        print(f"ratio report / COCOeval: {ratio:.2f} wall, {report_cpu / coco_cpu:.2f} CPU  "
              f"(target <= {target}: {'PASS' if ratio <= target else 'FAIL'})")
        print(f"report peak memory (max RSS): {peak_gb:.2f} GB  (target <= 4 GB: {'PASS' if peak_gb <= 4 else 'FAIL'})")
        if rescored:
            rescore_s = min(r[0] for r in rescored)
            added = rescore_s - report_s
            print(f"report --rescore: {rescore_s:8.1f} s wall, peak {max(r[2] for r in rescored):.2f} GB; rescoring adds "
                  f"{added:.1f} s = {added / coco_s:.2f} x COCOeval (target <= 1.0: "
                  f"{'PASS' if added / coco_s <= 1.0 else 'FAIL'})")
        if args.profile:
            profile_report(folder / "dump", folder / "report-profiled", args)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
