"""Figures of stage 2: the training curve and a page of overlays like the paper's Figure 3.

matplotlib is imported inside the functions (Agg backend): training and evaluation
never pay for it unless a figure is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lens_core.files import replaced_on_success

from lens_core.geometry import grid_to_sam_coords, postprocess_masks


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, dpi: int) -> None:
    """Save ``fig`` to ``path`` (PNG) via a temporary file and close it; a failed save leaves no file."""
    try:
        with replaced_on_success(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        _pyplot().close(fig)


def write_curve(path: Path, rows: Sequence[dict]) -> None:
    """Total loss, L_seg and L_attn per step, and the learning rate, from ``metrics.jsonl`` rows."""
    if not rows:
        return
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, label in (("loss", "total"), ("seg", "L_seg"), ("attn", "L_attn")):
        ax.plot(steps, [r[key] for r in rows], label=label, linewidth=1)
    ax.set_ylabel("loss"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in rows], color="gray", linewidth=1)
    ax_lr.set_ylabel("lr"), ax_lr.set_xlabel("step"), ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def heatmap_on_image(heatmap: torch.Tensor, input_size: Sequence[int], original_size: Sequence[int]) -> np.ndarray:
    """The (g, g) heatmap over SAM's padded frame, cropped to the image and resized to (H, W).

    The token grid covers the padded 1024 x 1024 square (not the image), so the map is
    upsampled over the whole square first and the padding cut off, as SAM does for masks
    (the masks' own :func:`lens_core.geometry.postprocess_masks`).
    """
    return postprocess_masks(heatmap[None, None].float(), tuple(input_size), tuple(original_size))[0, 0].numpy()


def grid_to_image_xy(points: torch.Tensor, input_size: Sequence[int], original_size: Sequence[int],
                     grid_size: int) -> np.ndarray:
    """(K, 2) grid (x, y) -> pixel (x, y) of the original image (cell centres at (x + 0.5) * 1024 / g)."""
    frame = grid_to_sam_coords(points.float(), grid_size)
    scale = torch.tensor([original_size[1] / input_size[1], original_size[0] / input_size[0]], dtype=torch.float32)
    return (frame * scale - 0.5).numpy()


@dataclass
class OverlayItem:
    """One row of the overlay page.

    Attributes:
        image: (H, W, 3) uint8, or None if the image file could not be read.
        heatmap: (g, g) in (0, 1). points: (K, 2) grid (x, y). valid, used: (K,) bool.
        pred: (H, W) bool. gt: (H, W) uint8 0/1/255. input_size, original_size: (h, w).
        title: the query text; iou: its IoU.
    """

    image: np.ndarray | None
    heatmap: torch.Tensor
    points: torch.Tensor
    valid: torch.Tensor
    used: torch.Tensor
    pred: np.ndarray
    gt: np.ndarray
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    title: str
    iou: float


def _tint(base: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float], alpha: float = 0.6) -> np.ndarray:
    """(H, W, 3) float image in [0, 1] with ``mask`` blended towards ``colour``."""
    out = base.copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return out


def write_overlays(path: Path, items: Sequence[OverlayItem], *, grid_size: int) -> None:
    """Rows of: image | heatmap + keypoints | predicted mask | ground truth.

    Keypoints that prompted SAM (valid and used) are white; the other NMS picks red.
    """
    if not items:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(len(items), 4, figsize=(11, 2.8 * len(items)), squeeze=False)
    for r, item in enumerate(items):
        h, w = item.original_size
        image = item.image if item.image is not None else np.full((h, w, 3), 128, dtype=np.uint8)
        heat = heatmap_on_image(item.heatmap, item.input_size, item.original_size)
        xy = grid_to_image_xy(item.points, item.input_size, item.original_size, grid_size)
        good = (item.valid & item.used).numpy()
        # NMS leaves never-picked slots at (0, 0) and not valid: only real picks are drawn.
        picked = good | (item.points.abs().sum(-1) > 0).numpy()
        image01 = image.astype(np.float32) / 255.0
        axes[r, 0].imshow(image01)
        axes[r, 1].imshow(image01)
        axes[r, 1].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[r, 1].scatter(xy[good, 0], xy[good, 1], c="white", s=22, edgecolors="black", linewidths=0.6)
        others = picked & ~good
        axes[r, 1].scatter(xy[others, 0], xy[others, 1], c="red", s=14, edgecolors="black", linewidths=0.4)
        axes[r, 2].imshow(_tint(image01, item.pred, (0.1, 0.9, 0.2)))
        axes[r, 3].imshow(_tint(_tint(image01, item.gt == 255, (0.5, 0.5, 0.5), 0.6), item.gt == 1, (1.0, 0.2, 0.2)))
        titles = (item.title[:60], "heatmap + keypoints", f"prediction (IoU {item.iou:.2f})", "ground truth")
        for c, title in enumerate(titles):
            axes[r, c].set_title(title, fontsize=8)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            # keypoints in SAM's padding lie outside the image: keep every panel on the image
            axes[r, c].set_xlim(-0.5, w - 0.5), axes[r, c].set_ylim(h - 0.5, -0.5)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
