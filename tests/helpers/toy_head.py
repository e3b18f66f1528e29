"""The shipped toy LENS head's quick check: live segmentation of a few held-out synthetic queries.

``quick_scores`` is what ``MANIFEST.json``'s ``lens_head.held_out.quick`` records (computed once when the head
was exported) and what ``tests/test_toy_weights.py`` recomputes: the toy backbones and the head are
deterministic on the CPU with one thread, so the numbers must agree.
"""

from __future__ import annotations

from pathlib import Path

#: queries per task (semantic, referring, reasoning) of synthetic:val, in manifest order
QUICK_PER_TASK = 3
#: synthetic images per split written for the check (``lens_train.testing.small_synthetic``)
QUICK_IMAGES = 4


def quick_queries(root: Path) -> list[dict]:
    """The first :data:`QUICK_PER_TASK` queries of each task of ``synthetic:val`` under ``root``."""
    from lens_manifests import build_manifest

    rows, taken = [], {}
    for row in build_manifest("synthetic:val", root).to_pylist():
        if taken.get(row["task"], 0) < QUICK_PER_TASK:
            taken[row["task"]] = taken.get(row["task"], 0) + 1
            rows.append(row)
    return rows


def quick_scores(root: Path, segmenter=None) -> dict:
    """gIoU / cIoU (ignore regions left out) and the whole-image baseline's gIoU of the toy head on
    :func:`quick_queries`, each query segmented alone with ``Segmenter.from_pretrained("toy")``."""
    import numpy as np
    from lens_core.metrics import giou_ciou_from_counts, intersection_union
    from pycocotools import mask as coco_mask

    from lens_train import Segmenter

    seg = segmenter or Segmenter.from_pretrained("toy", device="cpu")
    counts, whole = [], []
    for row in quick_queries(root):
        size = [row["height"], row["width"]]
        gt = coco_mask.decode({"size": size, "counts": row["mask_rle"]}).astype(bool)
        keep = ~coco_mask.decode({"size": size, "counts": row["ignore_rle"]}).astype(bool) if row["ignore_rle"] \
            else np.ones_like(gt)
        pred = seg.segment(row["image_path"], row["text"], is_sentence=row["is_sentence"]).mask
        counts.append(intersection_union(pred & keep, gt & keep))
        whole.append(intersection_union(keep.copy(), gt & keep))
    giou, ciou = giou_ciou_from_counts([i for i, _ in counts], [u for _, u in counts])
    whole_giou, _ = giou_ciou_from_counts([i for i, _ in whole], [u for _, u in whole])
    return {"queries": len(counts), "images_per_split": QUICK_IMAGES, "giou": float(giou), "ciou": float(ciou),
            "whole_image_giou": float(whole_giou)}
