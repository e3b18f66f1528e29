"""SAM's image frame and the token grid aligned with it.

SAM sees the image resized so its longest side is 1024 and zero-padded right and
bottom to 1024 x 1024. LLaVA is fed the same padded square (resized to 336), so
cell (x, y) of the 24 x 24 token grid covers the same part of the padded frame
as SAM's pixels ``[x * 1024 / 24, (x + 1) * 1024 / 24)``.

Two conventions place a cell coordinate in that frame (``LensConfig.coords``):
``cell_center`` puts cell x at its centre, ``(x + 0.5) * 1024 / g``; ``align_corners``
(the authors' code: keypoints normalised by ``x / (g - 1)``, heatmaps upsampled with
``align_corners=True``) puts cell 0 at pixel 0 and cell g - 1 at pixel 1024.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SAM_IMAGE_SIZE = 1024
SAM_LOW_RES = 256


def resized_shape(height: int, width: int, long_side: int = SAM_IMAGE_SIZE) -> tuple[int, int]:
    """(h, w) after resizing the longest side to ``long_side`` (SAM's ResizeLongestSide rounding)."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def grid_to_sam_coords(
    points: torch.Tensor, grid_size: int, image_size: int = SAM_IMAGE_SIZE, *, coords: str = "cell_center"
) -> torch.Tensor:
    """Map grid-cell coordinates to SAM's padded-frame pixel coordinates.

    Args:
        points: (..., 2) float (x, y) in grid cells; integer values are cells.
        coords: ``cell_center`` (``(x + 0.5) * size / g``) or ``align_corners`` (``x * size / (g - 1)``).
    Returns:
        (..., 2) float (x, y) in pixels of the 1024 x 1024 padded frame.
    """
    if coords == "cell_center":
        return (points + 0.5) * (image_size / grid_size)
    if coords == "align_corners":
        return points * (image_size / (grid_size - 1))
    raise ValueError(f"coords must be 'cell_center' or 'align_corners', got {coords!r}")


def postprocess_masks(
    low_res_logits: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    image_size: int = SAM_IMAGE_SIZE,
) -> torch.Tensor:
    """SAM's post-processing: upsample to the padded frame, crop the padding, resize to the original.

    Args:
        low_res_logits: (N, C, 256, 256) mask logits of one image.
        input_size: (h, w) of the resized image inside the padded frame.
        original_size: (H, W) of the original image.
    Returns:
        (N, C, H, W) logits.
    """
    masks = F.interpolate(low_res_logits, (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : int(input_size[0]), : int(input_size[1])]
    return F.interpolate(masks, (int(original_size[0]), int(original_size[1])), mode="bilinear", align_corners=False)


def mask_to_padded_frame(
    mask: torch.Tensor,
    input_size: tuple[int, int],
    out_size: int,
    image_size: int = SAM_IMAGE_SIZE,
) -> torch.Tensor:
    """Bring a mask at the original size into the padded square frame at ``out_size``.

    Used to compare a ground-truth mask with the heatmap, which lives on the padded frame.
    Values are averaged (area interpolation), so a binary mask becomes coverage in [0, 1];
    the padding is 0.

    Args:
        mask: (H, W) float mask at the original image size.
        input_size: (h, w) of the resized image inside the padded frame.
    Returns:
        (out_size, out_size) float.
    """
    scale = out_size / image_size
    h = max(1, round(int(input_size[0]) * scale))
    w = max(1, round(int(input_size[1]) * scale))
    resized = F.interpolate(mask[None, None].float(), (h, w), mode="area")[0, 0]
    return F.pad(resized, (0, out_size - w, 0, out_size - h))
