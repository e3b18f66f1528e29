"""Segmentation metrics with LISA's definitions.

Per query: ``IoU = inter / (union + 1e-5)``, with ``union == 0`` counting as 1.0;
ground-truth pixels labelled 255 are ignored (neither in the prediction's nor in
the target's area). gIoU = mean of per-query IoU; cIoU = sum(inter) / sum(union).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


def giou_ciou_from_counts(inters: Sequence[int], unions: Sequence[int]) -> tuple[float, float]:
    """gIoU (mean of per-query IoU) and cIoU (sum inter / (sum union + eps)) from per-query counts.

    Args:
        inters, unions: (N,) non-negative ints, N >= 1, from :func:`intersection_union`.
    Returns:
        (giou, ciou) in [0, 1]; cIoU is 1.0 when every union is empty.
    """
    if len(inters) != len(unions):
        raise ValueError(f"{len(inters)} intersections but {len(unions)} unions")
    if len(inters) == 0:
        raise ValueError("gIoU/cIoU need at least one query")
    ious = [query_iou(int(inter), int(union)) for inter, union in zip(inters, unions)]
    total_inter, total_union = int(np.sum(inters, dtype=np.int64)), int(np.sum(unions, dtype=np.int64))
    ciou = 1.0 if total_union == 0 else total_inter / (total_union + IOU_EPS)
    return float(np.mean(ious)), float(ciou)


def giou_ciou(preds: Iterable[np.ndarray], gts: Iterable[np.ndarray]) -> tuple[float, float]:
    """gIoU and cIoU over paired predictions and ground truths.

    Args:
        preds: iterable of (H, W) bool arrays.
        gts: iterable of (H, W) uint8 arrays (0/1, 255 = ignore), same order and sizes.
    Returns:
        (giou, ciou) in [0, 1].
    """
    inters: list[int] = []
    unions: list[int] = []
    sentinel = object()
    gt_iter = iter(gts)
    for pred in preds:
        gt = next(gt_iter, sentinel)
        if gt is sentinel:
            raise ValueError("more predictions than ground truths")
        inter, union = intersection_union(pred, gt)
        inters.append(inter)
        unions.append(union)
    if next(gt_iter, sentinel) is not sentinel:
        raise ValueError("more ground truths than predictions")
    if not inters:
        raise ValueError("giou_ciou needs at least one prediction")
    return giou_ciou_from_counts(inters, unions)
