"""Segmentation metrics with LISA's definitions.

Per query: ``IoU = inter / (union + 1e-5)``, with ``union == 0`` counting as 1.0;
ground-truth pixels labelled 255 are ignored (neither in the prediction's nor in
the target's area). gIoU = mean of per-query IoU; cIoU = sum(inter) / sum(union).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

IGNORE_LABEL = 255
IOU_EPS = 1e-5


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Foreground intersection and union of one prediction, ignoring gt == 255.

    Args:
        pred: (H, W) bool.
        gt: (H, W) uint8 with 0 / 1 and 255 = ignore.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    keep = gt != IGNORE_LABEL
    p = pred.astype(bool) & keep
    g = (gt == 1) & keep
    inter = int(np.count_nonzero(p & g))
    union = int(np.count_nonzero(p | g))
    return inter, union


def query_iou(inter: int, union: int) -> float:
    """LISA's per-query IoU: an empty union (nothing predicted, nothing to find) is 1.0."""
    return 1.0 if union == 0 else inter / (union + IOU_EPS)


def giou_ciou(preds: Iterable[np.ndarray], gts: Iterable[np.ndarray]) -> tuple[float, float]:
    """gIoU and cIoU over paired predictions and ground truths.

    Args:
        preds: iterable of (H, W) bool arrays.
        gts: iterable of (H, W) uint8 arrays (0/1, 255 = ignore), same order and sizes.
    Returns:
        (giou, ciou) in [0, 1].
    """
    ious: list[float] = []
    total_inter = total_union = 0
    pairs = 0
    sentinel = object()
    gt_iter = iter(gts)
    for pred in preds:
        gt = next(gt_iter, sentinel)
        if gt is sentinel:
            raise ValueError("more predictions than ground truths")
        inter, union = intersection_union(pred, gt)
        ious.append(query_iou(inter, union))
        total_inter += inter
        total_union += union
        pairs += 1
    if next(gt_iter, sentinel) is not sentinel:
        raise ValueError("more ground truths than predictions")
    if pairs == 0:
        raise ValueError("giou_ciou needs at least one prediction")
    giou = float(np.mean(ious))
    ciou = 1.0 if total_union == 0 else total_inter / (total_union + IOU_EPS)
    return giou, float(ciou)
