"""COCO AP/AR: COCOeval (bbox, maxDets 1/10/100), the only AP misalign reports. Never a hand-written AP.

Several engines compute the same twelve numbers: pycocotools (the reference) and drop-in
reimplementations of it that the tests check against pycocotools bit for bit on the same files
(boxes exactly on IoU thresholds, crowd regions, area-range edges, empty results, no ground truth).
'auto' takes the fastest one installed, in the order of AUTO_ORDER: ultrafast-pycocotools (Rust,
~60x pycocotools on a COCO-sized result set), then hotcoco (Rust, about as fast), then
faster-coco-eval (C++, ~4x), then pycocotools. `load_ground_truth` picks one; `evaluate_detections`
runs it; `engine_info` names it for metrics.json. The detections go in as the ledger's own float64
numbers (x1, y1, w, h, score), so the result equals pycocotools run on the original results file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from misalign.errors import InputError

# The twelve COCOeval.stats, in pycocotools' order.
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass(frozen=True)
class Engine:
    key: str  # --ap-backend value
    name: str  # distribution name (metrics.json ap_engine.name)
    module: str  # module with COCO and COCOeval (pycocotools' API)
    coco: str  # attribute of `module` (or a submodule) that loads a COCO file
    evaluator: str  # COCOeval class


# Each gives COCOeval's numbers bit for bit (tests/test_ap_fidelity.py), fastest first.
_ENGINES = {
    "ultrafast": Engine("ultrafast", "ultrafast-pycocotools", "ultrafast_pycocotools", "COCO", "COCOeval"),
    "hotcoco": Engine("hotcoco", "hotcoco", "hotcoco", "COCO", "COCOeval"),
    "faster": Engine("faster", "faster-coco-eval", "faster_coco_eval", "COCO", "COCOeval_faster"),
    "pycocotools": Engine("pycocotools", "pycocotools", "pycocotools.coco", "COCO", "COCOeval"),
}
AUTO_ORDER = ("ultrafast", "hotcoco", "faster", "pycocotools")
ENGINE_NAMES = {key: engine.name for key, engine in _ENGINES.items()}  # --ap-backend -> distribution name
ENGINE_MODULES = {key: engine.module for key, engine in _ENGINES.items()}
ENGINES = ("auto", *_ENGINES)  # 'auto': the first of AUTO_ORDER that is installed


def load_gt_quietly(ann_path):
    """pycocotools.COCO for `ann_path`, without its prints on stdout."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_path))


def _module(engine: Engine):
    try:
        return import_module(engine.module)
    except ImportError:
        return None


def resolve_engine(backend: str = "auto") -> Engine:
    """The Engine behind `backend` (ENGINES); InputError if it is not installed."""
    if backend not in ENGINES:
        raise ValueError(f"unknown AP backend {backend!r}")
    if backend != "auto":
        if _module(_ENGINES[backend]) is None:
            raise InputError(f"--ap-backend: {_ENGINES[backend].name} is not installed")
        return _ENGINES[backend]
    return next(_ENGINES[k] for k in AUTO_ORDER if _module(_ENGINES[k]) is not None)


def _engine_of(coco_gt) -> tuple[object, Engine]:
    """(coco_gt, the Engine whose COCO class it is)."""
    module = type(coco_gt).__module__
    for engine in _ENGINES.values():
        top = engine.module.split(".")[0]
        if module.startswith(top) or (engine.key == "hotcoco" and _is_hotcoco(coco_gt)):
            return coco_gt, engine
    return coco_gt, _ENGINES["pycocotools"]


def _is_hotcoco(coco) -> bool:
    hot = _module(_ENGINES["hotcoco"])
    return hot is not None and isinstance(coco, hot.COCO)


def load_ground_truth(path, backend: str = "auto"):
    """The COCO ground truth in `path` for AP, as the engine `backend` (ENGINES) reads it.

    InputError if the file is missing or not COCO, or if the engine asked for is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ground-truth file not found")
    engine = resolve_engine(backend)
    loader = getattr(import_module(engine.module), engine.coco)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return loader(str(path))
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise InputError(f"{path}: not a COCO annotation file ({err})") from None


def engine_info(coco_gt) -> dict:
    """{"name", "version"} of the engine that evaluates against `coco_gt` (metrics.json `ap_engine`)."""
    name = _engine_of(coco_gt)[1].name
    try:
        return {"name": name, "version": version(name)}
    except PackageNotFoundError:
        return {"name": name, "version": None}


def _empty_results(coco_gt):
    """pycocotools' results object with no detections: its loadRes cannot build one (it reads the first entry)."""
    coco_dt = type(coco_gt)()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                       "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def evaluate_detections(coco_gt, detections: np.ndarray, image_ids=None) -> dict[str, float]:
    """COCOeval (bbox, maxDets 1/10/100) of `detections` against `coco_gt` from `load_ground_truth`.

    detections: [N, 7] float64 rows of image_id, x, y, w, h, score, category_id (pycocotools'
    `loadNumpyAnnotations` layout), boxes in original-image pixels. image_ids: the images to
    evaluate (default: every image of `coco_gt`, so an image with no detection counts its misses).
    Returns the twelve stats under STAT_KEYS, exactly as COCOeval gives them: -1 where it has
    nothing to measure (no ground truth of an area range, or none at all), 0 with no detections.
    """
    coco, engine = _engine_of(coco_gt)
    module = import_module(engine.module if engine.key != "pycocotools" else "pycocotools.cocoeval")
    evaluator_class = getattr(module, engine.evaluator)
    detections = np.ascontiguousarray(np.asarray(detections, dtype=np.float64).reshape(-1, 7))
    with contextlib.redirect_stdout(io.StringIO()):
        if engine.key in ("pycocotools", "faster") and not len(detections):
            coco_dt = _empty_results(coco)
        else:  # the Rust engines take an empty [0, 7] array as no detections
            coco_dt = coco.loadRes(detections)
        if engine.key == "faster":
            evaluator = evaluator_class(coco, coco_dt, "bbox", print_function=lambda *args: None)
        else:
            evaluator = evaluator_class(coco, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {key: float(value) for key, value in zip(STAT_KEYS, evaluator.stats)}


# --- TIDE's error split and the COCO matching of each detection (hotcoco) ----------------------

TIDE_KEYS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")  # TIDE's six error types, in its order
TIDE_POS_THRESH = 0.5  # TIDE's foreground IoU t_f: a match
TIDE_BG_THRESH = 0.1  # TIDE's background IoU t_b: below it with every ground truth, a box is background


@dataclass
class Diagnosis:
    """What one hotcoco evaluation of a detector's output says beyond AP (docs/methods.md, Errors).

    tide: TIDE's split, {Cls, Loc, Both, Dupe, Bkg, Miss: ΔAP}, AP gained by fixing each error type
    (ΔAP in COCO AP50 units, like `ap50`); counts: how many errors of each type; ap50: the AP the
    split starts from (COCOeval's AP50, all areas, maxDets 100); matches: IoU threshold -> [N] int64
    annotation id of the ground truth each detection is matched to by COCOeval's greedy matching at
    that threshold (0: none, a false positive; -1: ignored, matched to a crowd region or beyond maxDets).
    """

    tide: dict
    counts: dict
    ap50: float
    matches: dict


def hotcoco_ground_truth(coco_gt, path):
    """The ground truth as hotcoco's COCO: `coco_gt` itself when it is one, else `path` read by hotcoco."""
    if _is_hotcoco(coco_gt):
        return coco_gt
    return load_ground_truth(path, "hotcoco")


def diagnose_detections(hot_gt, detections: np.ndarray, image_ids, match_thresholds=(0.1, 0.5)) -> Diagnosis:
    """TIDE's split (hotcoco's `tide_errors` at TIDE's thresholds) and the per-detection matches.

    hot_gt: `hotcoco_ground_truth`; detections: [N, 7] as `evaluate_detections` takes them; image_ids:
    every image to evaluate. One evaluation (bbox, area 'all', maxDets 100, IoU thresholds
    `match_thresholds`) serves both: hotcoco's TIDE matches boxes itself at TIDE's thresholds, and its
    per-image diagnostics report COCOeval's own matching (tests/test_errors.py checks it against
    pycocotools' evalImgs and the split against tidecv).
    """
    hotcoco = import_module("hotcoco")
    detections = np.ascontiguousarray(np.asarray(detections, dtype=np.float64).reshape(-1, 7))
    thresholds = sorted(float(t) for t in match_thresholds)
    # No stdout redirect (hotcoco prints nothing here): this runs in a side thread of the report, and
    # redirect_stdout swaps sys.stdout for every thread.
    evaluator = hotcoco.COCOeval(hot_gt, hot_gt.loadRes(detections), "bbox")
    evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.params.iouThrs = thresholds
    evaluator.params.areaRng = [[0.0, 1e10]]
    evaluator.params.areaRngLbl = ["all"]
    evaluator.params.maxDets = [100]
    evaluator.evaluate()
    split = evaluator.tide_errors(pos_thr=TIDE_POS_THRESH, bg_thr=TIDE_BG_THRESH)
    # score_thr only admits detections to hotcoco's label-error candidates, which misalign does not
    # read: above every score it skips them (half of the call's time); the matching is the same
    matches = {t: _matched_gt(evaluator.image_diagnostics(iou_thr=t, score_thr=math.inf), len(detections))
               for t in thresholds}
    return Diagnosis(tide={k: float(split["delta_ap"][k]) for k in TIDE_KEYS},
                     counts={k: int(split["counts"][k]) for k in TIDE_KEYS}, ap50=float(split["ap_base"]),
                     matches=matches)


def _matched_gt(diagnostics: dict, num_detections: int) -> np.ndarray:
    """[N] matched annotation id per detection (row i is result id i + 1: loadRes numbers them in
    order); 0 for a false positive, -1 for a detection COCOeval ignores (absent from dt_status)."""
    matched = np.full(num_detections, -1, np.int64)
    status = diagnostics["dt_status"]
    ids = np.fromiter(status.keys(), np.int64, len(status))
    matched[ids - 1] = 0
    pairs = diagnostics["dt_match"]
    dt = np.fromiter(pairs.keys(), np.int64, len(pairs))
    matched[dt - 1] = np.fromiter(pairs.values(), np.int64, len(pairs))
    return matched


def ground_truth_boxes(hot_gt) -> tuple[np.ndarray, np.ndarray]:
    """(annotation ids [G] ascending, their boxes [G, 4] x, y, w, h float64) of every annotation."""
    anns = hot_gt.loadAnns(hot_gt.getAnnIds())
    ids = np.fromiter((a["id"] for a in anns), np.int64, len(anns))
    boxes = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    order = np.argsort(ids, kind="stable")
    return ids[order], boxes[order]
