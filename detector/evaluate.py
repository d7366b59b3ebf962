"""Evaluation of a model on a split: its detections as COCOeval rows, and COCOeval's twelve stats.

Used at the end of training (eval.json) and by the tests; the AP is misalign.cocoeval's, the one
COCOeval call of the project.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from detector.device import autocast

def _unwrap(model):
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def predict_detections(model, dataset, *, indices=None, batch_size: int = 8, device="cpu", amp: str = "none",
                       workers: int = 0, progress: bool = True) -> np.ndarray:
    """Detections of `model` on `dataset` (or its `indices`) as rows for misalign.cocoeval.

    Returns float64 [N, 7]: image_id, x, y, w, h (original-image pixels: the dataset's resized
    boxes divided by its `scale`), score, category_id (dataset.category_ids[label]).
    """
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from detector.data import collate_detection
    from misalign.boxes import xyxy_to_xywh

    device = torch.device(device)
    subset = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_detection)
    category_ids = np.asarray(dataset.category_ids, dtype=np.float64)
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    rows = []
    for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        with autocast(device, amp):
            outputs = model([image.to(device) for image in images])
        for output, target in zip(outputs, targets):
            boxes = output["boxes"].float().cpu().numpy() / float(target["scale"])  # [K, 4] xyxy, original pixels
            scores = output["scores"].float().cpu().numpy()  # [K]
            labels = output["labels"].cpu().numpy()  # [K] contiguous
            image_id = np.full(len(boxes), float(target["image_id"]))
            rows.append(np.column_stack([image_id, xyxy_to_xywh(boxes), scores, category_ids[labels]]))
    model.train(was_training)
    return np.concatenate(rows) if rows else np.zeros((0, 7))


def evaluate(model, dataset, ann_path=None, *, batch_size: int = 8, device="cpu", amp: str = "none",
             workers: int = 0, progress: bool = True) -> dict[str, float]:
    """COCOeval (pycocotools, via misalign.cocoeval) of `model` on every image of `dataset`.

    ann_path: the dataset's annotation file (default `dataset.ann_file`). Under torch.distributed
    each process predicts its share of the images and rank 0 evaluates; every rank returns the
    twelve stats (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl).
    """
    from misalign.cocoeval import evaluate_detections, load_gt_quietly

    ann_path = ann_path if ann_path is not None else dataset.ann_file
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = range(rank, len(dataset), world_size)
    detections = predict_detections(model, dataset, indices=indices, batch_size=batch_size, device=device, amp=amp,
                                    workers=workers, progress=progress and rank == 0)
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, detections)
        detections = np.concatenate(gathered)
    stats = [None]
    if rank == 0:
        stats[0] = evaluate_detections(load_gt_quietly(ann_path), detections, image_ids=dataset.image_ids)
    if world_size > 1:
        dist.broadcast_object_list(stats, src=0)
    return stats[0]


# --- the loop -------------------------------------------------------------------------------------------
