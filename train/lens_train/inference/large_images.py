"""Masks of images larger than the live path works on, in bounded memory.

The live path (``lens-segment``, the Python API, the web demo) runs the backbones on the working
image (:func:`lens_cache.images.working_image`: at most 4096 px on its longest side), so the model's
mask logits come out at the working size. The user's mask is wanted at the original size, which may
be 16384 x 16384: one float32 map of that size is 1 GiB, and ``torch.nn.functional.interpolate``
would hold its input, its output and a probability map at once. :func:`upsampled_mask` computes the
same bilinear upsampling (``align_corners=False``, as SAM's post-processing) row stripe by row
stripe and thresholds each stripe at once, so only the boolean mask (1 byte per pixel) and one
stripe exist at full width. :func:`fit_mask` brings a mask back to the working image for pictures
without a full-size copy (``mask.png`` itself: ``lens_train.inference.result.mask_picture``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: Output rows computed at once by :func:`upsampled_mask` (a stripe of 16384 px rows is 64 MiB in float32).
STRIPE_ROWS = 1024


def _source_rows(out_rows: torch.Tensor, in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower row, upper row, weight of the upper) of bilinear ``align_corners=False`` sampling, as torch computes
    them: source = (i + 0.5) * in / out - 0.5, clamped at 0."""
    scale = in_size / out_size
    src = ((out_rows.to(torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    lower = src.floor().to(torch.int64).clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    return lower, upper, src - lower.to(torch.float32)


def upsampled_mask(logits: torch.Tensor, size: tuple[int, int], threshold: float,
                   *, stripe_rows: int = STRIPE_ROWS) -> np.ndarray:
    """``sigmoid(bilinear(logits, size)) > threshold`` as an (H, W) bool array, in row stripes.

    Each stripe of output rows is interpolated between its two source rows (a few rows of the small
    logits), then along the width to W; only the stripe exists at full width.

    Args:
        logits: (h, w) mask logits at the working size.
        size: (H, W) of the original image.
        threshold: on the probability, in (0, 1).
    Returns:
        (H, W) bool; equal to thresholding ``F.interpolate(logits, size, mode="bilinear")`` up to
        float rounding at the threshold itself.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (h, w), got {tuple(logits.shape)}")
    h, w = logits.shape
    height, width = size
    small = logits.float()
    cut = math.log(threshold / (1.0 - threshold))  # sigmoid(x) > t  <=>  x > logit(t)
    mask = np.empty((height, width), dtype=bool)
    for start in range(0, height, stripe_rows):
        rows = torch.arange(start, min(start + stripe_rows, height))
        lower, upper, weight = _source_rows(rows, h, height)
        tall = small[lower] * (1.0 - weight)[:, None] + small[upper] * weight[:, None]  # (rows, w)
        # along the width only (the height scale is 1: the identity)
        stripe = F.interpolate(tall[None, None], size=(len(rows), width), mode="bilinear", align_corners=False)[0, 0]
        mask[start:start + len(rows)] = (stripe > cut).numpy()
    return mask


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` (H, W) bool at (h, w) by nearest neighbour (pixel centres), without a full-size copy; itself
    when it already has that size."""
    if tuple(mask.shape) == tuple(size):
        return mask
    rows = np.minimum(((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]

