"""Keypoints from the grounding heatmap: greedy NMS (supplement S1.1) and one
regularised Newton step to sub-cell precision (supplement S1.2).

Coordinates are (x, y) in grid cells throughout: cell (x, y) has its centre at
integer (x, y); ``lens_core.geometry.grid_to_sam_coords`` maps them to SAM pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_heatmap(heatmap: torch.Tensor) -> None:
    if heatmap.dim() != 3:
        raise ValueError(f"heatmap must be (B, H, W), got shape {tuple(heatmap.shape)}")
    if heatmap.shape[1] < 2 or heatmap.shape[2] < 2:
        raise ValueError(f"heatmap must be at least 2x2, got {tuple(heatmap.shape[1:])}")


@torch.no_grad()
def nms_keypoints(
    heatmap: torch.Tensor,
    max_points: int = 16,
    radius: float = 4.0,
    min_ratio: float = 0.4,
    *,
    strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS: take the argmax, zero every cell within Euclidean ``radius`` of it, repeat.

    Stops for a map when nothing > 0 remains, and after ``max_points`` picks. Ties go to
    the first cell in row-major order, so the result is deterministic.

    Args:
        heatmap: (B, H, W) non-negative scores.
        max_points: K, the most points kept per map.
        radius: suppression radius in cells (cells at distance <= radius are zeroed).
        min_ratio: a picked point is valid if its score >= min_ratio x the map's peak.
        strict: valid only if the score is > min_ratio x the peak (the authors' rule).
    Returns:
        points: (B, K, 2) float (x, y) integer cell coordinates, ordered by score;
            slots never picked hold (0, 0).
        valid: (B, K) bool, picked and score >= (``strict``: >) min_ratio x peak.
    """
    _check_heatmap(heatmap)
    batch, height, width = heatmap.shape
    work = heatmap.detach().float().clone()
    peak = work.flatten(1).amax(dim=1)  # (B,)
    ys = torch.arange(height, device=work.device, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, device=work.device, dtype=torch.float32).view(1, 1, width)

    points = torch.zeros(batch, max_points, 2, device=work.device)
    scores = torch.zeros(batch, max_points, device=work.device)
    picked = torch.zeros(batch, max_points, dtype=torch.bool, device=work.device)
    for k in range(max_points):
        value, index = work.flatten(1).max(dim=1)  # first maximum on ties
        alive = value > 0
        x = (index % width).float()
        y = torch.div(index, width, rounding_mode="floor").float()
        points[:, k, 0] = torch.where(alive, x, 0.0)
        points[:, k, 1] = torch.where(alive, y, 0.0)
        scores[:, k] = torch.where(alive, value, 0.0)
        picked[:, k] = alive
        dist2 = (xs - x.view(-1, 1, 1)) ** 2 + (ys - y.view(-1, 1, 1)) ** 2
        suppress = (dist2 <= radius * radius) & alive.view(-1, 1, 1)
        work = work.masked_fill(suppress, 0.0)
        if not bool(alive.any()):
            break
    bar = min_ratio * peak.unsqueeze(1)
    above = scores > bar if strict else scores >= bar
    valid = picked & above & (peak.unsqueeze(1) > 0)
    return points, valid


# The 3x3 stencil of S1.2, in cells: v0 centre, v1 +x, v2 -x, v3 +y, v4 -y,
# v5 (+x,+y), v6 (-x,-y), v7 (-x,+y), v8 (+x,-y).
_STENCIL = torch.tensor(
    [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [1, 1], [-1, -1], [-1, 1], [1, -1]], dtype=torch.float32
)


def sample_grid(values: torch.Tensor, points: torch.Tensor, *, padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinear samples of a map at cell coordinates (align_corners=True; outside the grid: zeros, or the
    nearest border value with ``padding_mode="border"``).

    Args:
        values: (B, C, H, W).
        points: (B, N, 2) float (x, y) in cells.
    Returns:
        (B, N, C).
    """
    height, width = values.shape[-2:]
    norm = torch.stack(
        (2.0 * points[..., 0] / (width - 1) - 1.0, 2.0 * points[..., 1] / (height - 1) - 1.0), dim=-1
    ).to(values.dtype)
    work = values
    if values.device.type == "cpu" and values.dtype in (torch.bfloat16, torch.float16):
        # torch's CPU grid_sample in bf16 is inexact (and returns garbage for a non-contiguous input): sample
        # in float32 there; CUDA keeps the dtype it was given
        work, norm = values.float(), norm.float()
    sampled = F.grid_sample(work.contiguous(), norm.unsqueeze(2), mode="bilinear", padding_mode=padding_mode,
                            align_corners=True)  # (B, C, N, 1)
    return sampled.squeeze(-1).transpose(1, 2).to(values.dtype)


def subpixel_refine(
    heatmap: torch.Tensor,
    points: torch.Tensor,
    eps: float = 1e-6,
    ill_conditioned: float = 1e-12,
) -> torch.Tensor:
    """One regularised Newton step per point towards the heatmap's local peak (S1.2).

    Central differences on the 3x3 neighbourhood give g and H; the step is
    ``delta = -(H + eps I)^-1 g``, clipped to [-1, 1] per component. Where
    ``|det(H + eps I)|`` is below ``ill_conditioned`` the diagonal step
    ``-Dx / (Dxx + eps), -Dy / (Dyy + eps)`` is used instead. Differentiable in ``heatmap``.

    Args:
        heatmap: (B, H, W).
        points: (B, K, 2) float (x, y) integer cell coordinates.
    Returns:
        (B, K, 2) refined (x, y).
    """
    _check_heatmap(heatmap)
    if points.dim() != 3 or points.shape[0] != heatmap.shape[0] or points.shape[-1] != 2:
        raise ValueError(
            f"points must be (B, K, 2) with B={heatmap.shape[0]}, got shape {tuple(points.shape)}"
        )
    batch, num_points, _ = points.shape
    stencil = _STENCIL.to(points.device, points.dtype)
    where = (points.unsqueeze(2) + stencil).reshape(batch, num_points * 9, 2)
    v = sample_grid(heatmap.unsqueeze(1).to(points.dtype), where).reshape(batch, num_points, 9)
    v0, v1, v2, v3, v4, v5, v6, v7, v8 = v.unbind(-1)
    dx, dy = (v1 - v2) / 2, (v3 - v4) / 2
    dxx, dyy = v1 - 2 * v0 + v2, v3 - 2 * v0 + v4
    dxy = (v5 + v6 - v7 - v8) / 4

    hxx, hyy = dxx + eps, dyy + eps
    det = hxx * hyy - dxy * dxy
    well = det.abs() > ill_conditioned
    safe_det = torch.where(well, det, torch.ones_like(det))
    newton_x = -(hyy * dx - dxy * dy) / safe_det
    newton_y = -(-dxy * dx + hxx * dy) / safe_det
    diag_x, diag_y = -dx / hxx, -dy / hyy
    delta = torch.stack(
        (torch.where(well, newton_x, diag_x), torch.where(well, newton_y, diag_y)), dim=-1
    )
    delta = torch.nan_to_num(delta, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    return points + delta
