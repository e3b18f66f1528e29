"""Training losses (paper 3.4): L = L_seg + L_attn.

``L_seg = w_dice * Dice + w_bce * BCE`` on the final mask at the original image size
(as LISA computes it); ``L_attn`` = BCE between the grounding heatmap and the ground
truth, both on the padded square frame at ``attn_size`` (official code: 128 x 128).
Ground-truth pixels labelled 255 carry no loss anywhere.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .geometry import SAM_IMAGE_SIZE, mask_to_padded_frame
from .metrics import IGNORE_LABEL


def _split_target(gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) uint8 0/1/255 -> (target float 0/1, weight float 0/1)."""
    keep = (gt != IGNORE_LABEL).float()
    return (gt == 1).float(), keep


def sigmoid_bce(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits over the non-ignored pixels of one mask.

    Args:
        logits: (H, W). gt: (H, W) uint8 0/1/255.
    """
    target, weight = _split_target(gt)
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def dice_loss(logits: torch.Tensor, gt: torch.Tensor, smooth: float = 1e-6, scale: float = 1000.0) -> torch.Tensor:
    """LISA's Dice loss of one mask (probabilities and targets divided by ``scale``).

    The scale keeps the soft Dice well-behaved on large masks; ignored pixels are excluded.
    """
    target, weight = _split_target(gt)
    prob = torch.sigmoid(logits.float()) * weight
    target = target * weight
    numerator = 2 * (prob / scale * target).sum()
    denominator = (prob / scale).sum() + (target / scale).sum()
    return 1 - (numerator + smooth) / (denominator + smooth)


def segmentation_loss(
    logits: Sequence[torch.Tensor],
    gts: Sequence[torch.Tensor],
    *,
    dice_weight: float,
    bce_weight: float,
) -> dict[str, torch.Tensor]:
    """L_seg averaged over the masks of a batch.

    Args:
        logits: B tensors (H_b, W_b) at each image's original size.
        gts: B tensors (H_b, W_b) uint8 0/1/255.
    Returns:
        {"dice", "bce", "seg"} scalar tensors (``seg`` = weighted sum).
    """
    if len(logits) != len(gts) or not logits:
        raise ValueError(f"need matching non-empty lists, got {len(logits)} logits and {len(gts)} masks")
    for lg, gt in zip(logits, gts):
        if lg.shape != gt.shape:
            raise ValueError(f"mask logits {tuple(lg.shape)} and ground truth {tuple(gt.shape)} differ in size")
    dice = torch.stack([dice_loss(lg, gt) for lg, gt in zip(logits, gts)]).mean()
    bce = torch.stack([sigmoid_bce(lg, gt) for lg, gt in zip(logits, gts)]).mean()
    return {"dice": dice, "bce": bce, "seg": dice_weight * dice + bce_weight * bce}


def attention_loss(
    heatmap: torch.Tensor,
    gts: Sequence[torch.Tensor],
    input_sizes: Sequence[tuple[int, int]],
    *,
    size: int = 128,
    align_corners: bool = False,
    target_resize: str = "area",
) -> torch.Tensor:
    """L_attn: BCE between the heatmap and the ground truth on the padded frame at ``size``.

    Args:
        heatmap: (B, g, g) values in (0, 1) (peak-normalised grounding map).
        gts: B tensors (H_b, W_b) uint8 0/1/255 at the original sizes.
        input_sizes: B (h, w) resized sizes inside SAM's 1024 frame.
        align_corners: how the heatmap is upsampled to ``size`` (True in the authors' code, matching
            ``LensConfig.coords == "align_corners"``).
        target_resize: ``area``: the mask's coverage of each target cell, > 0.5; ``nearest`` (authors):
            the mask on SAM's padded 1024 frame, resized to ``size`` with mode ``nearest``, > 0.5.
    Returns:
        scalar, mean over the batch of each map's mean BCE on non-ignored cells.
    """
    if heatmap.dim() != 3 or heatmap.shape[0] != len(gts):
        raise ValueError(f"heatmap must be (B, g, g) with B={len(gts)}, got {tuple(heatmap.shape)}")
    if target_resize not in ("area", "nearest"):
        raise ValueError(f"target_resize must be 'area' or 'nearest', got {target_resize!r}")
    up = F.interpolate(heatmap.unsqueeze(1).float(), (size, size), mode="bilinear", align_corners=align_corners)[:, 0]
    up = up.clamp(1e-6, 1 - 1e-6)
    losses = []
    for b, (gt, input_size) in enumerate(zip(gts, input_sizes)):
        target = (_target_on_frame((gt == 1).float(), input_size, size, target_resize) > 0.5).float()
        ignored = _target_on_frame((gt == IGNORE_LABEL).float(), input_size, size, target_resize) > 0.5
        weight = (~ignored).float()
        loss = F.binary_cross_entropy(up[b], target, reduction="none")
        losses.append((loss * weight).sum() / weight.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


def _target_on_frame(mask: torch.Tensor, input_size: tuple[int, int], size: int, how: str) -> torch.Tensor:
    """(size, size) float: a mask at the original size on SAM's padded frame (see :func:`attention_loss`)."""
    if how == "area":
        return mask_to_padded_frame(mask, input_size, size)
    h, w = int(input_size[0]), int(input_size[1])
    frame = F.interpolate(mask[None, None], (h, w), mode="bilinear", align_corners=False, antialias=True)
    frame = F.pad(frame, (0, SAM_IMAGE_SIZE - w, 0, SAM_IMAGE_SIZE - h))
    return F.interpolate(frame, (size, size), mode="nearest")[0, 0]
