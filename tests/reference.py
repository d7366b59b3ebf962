"""Slow reference implementations that the fast code is checked against, written as plainly as possible."""


def slow_iou(a, b) -> float:
    """COCO IoU of two x1, y1, x2, y2 boxes (no "+1" on widths), one pair at a time."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
