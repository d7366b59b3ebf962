"""Slow reference implementations that the fast code is checked against, written as plainly as possible."""


def slow_iou(a, b) -> float:
    """COCO IoU of two x1, y1, x2, y2 boxes (no "+1" on widths), one pair at a time."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def slow_suppression(rows, min_best_iou=0.5, min_gap=0.1):
    """Suppression losses (docs/methods.md) by plain loops over candidate rows.

    rows: dicts with cand_id, gt_id, iou (numpy float32), score, kept, suppressed_by. Returns
    ({gt_id: {best_any, best_cand_id, best_kept, kept_cand_id, gap, eligible, loss}}, metrics) for every
    ground truth with a matched candidate. The best candidate: highest iou, then highest score, then
    lowest cand_id; the kept box likewise among the kept candidates.
    """
    import math

    def better(a, b):  # is candidate a ahead of b?
        if a["iou"] != b["iou"]:
            return a["iou"] > b["iou"]
        if a["score"] != b["score"]:
            return a["score"] > b["score"]
        return a["cand_id"] < b["cand_id"]

    best, best_kept = {}, {}
    for row in rows:
        g = row["gt_id"]
        if g < 0:
            continue
        if g not in best or better(row, best[g]):
            best[g] = row
        if row["kept"] and (g not in best_kept or better(row, best_kept[g])):
            best_kept[g] = row
    per_gt = {}
    for g, b in best.items():
        k = best_kept.get(g)
        kept_iou = float(k["iou"]) if k is not None else 0.0
        gap = float(b["iou"]) - kept_iou
        eligible = bool(b["iou"] >= min_best_iou)
        loss = eligible and gap >= min_gap and b["suppressed_by"] >= 0
        per_gt[g] = {"best_any": float(b["iou"]), "best_cand_id": b["cand_id"], "best_kept": kept_iou,
                     "kept_cand_id": k["cand_id"] if k is not None else -1, "gap": gap, "eligible": eligible,
                     "loss": loss}
    losses = [v["gap"] for v in per_gt.values() if v["loss"]]
    eligible = sum(v["eligible"] for v in per_gt.values())
    metrics = {"losses": len(losses), "eligible": eligible, "rate": len(losses) / eligible if eligible else None,
               "mean_iou_gap": math.fsum(losses) / len(losses) if losses else None}
    return per_gt, metrics
