"""The descriptor model (paper 3.2, supplement S1.3).

For each keypoint, the image features F_i^2 are sampled (bilinearly) at the point and
its p x p neighbourhood; the start-of-answer token f_s^2 queries those p*p vectors
(cross-attention) to give the keypoint's description d_i. A self-attention over
{f_s^2} U {d_i} lets the global description and the local ones regularise each other,
and a projection maps everything to SAM's prompt size: D in R^{(m+1) x C}
(C = ``prompt_dim``: 256 for SAM, 64 for the toy SAM).

Two structures (``LensConfig.descriptor``), the same inputs and outputs:

- :class:`KeypointDescriptor` (``paper``): pre-LN cross-attention with a residual on f_s^2,
  pre-LN self-attention, one linear projection; samples outside the grid read 0.
- :class:`OfficialKeypointDescriptor` (``official``, the authors' ``GroundingHeadWithLlamaModel``):
  post-LN cross-attention (``nn.MultiheadAttention``) and a GELU FFN d -> ``descriptor_ffn`` -> d,
  one ``nn.TransformerEncoderLayer`` (post-LN, ReLU, ff 2048, dropout 0.1) over {d_i} U {f_s^2}
  with absent keypoints masked, an MLP d -> d -> C with ReLU; samples outside the grid read the
  nearest border value.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LensConfig
from .keypoints import sample_grid


def neighbourhood_offsets(neighborhood: int) -> torch.Tensor:
    """(p*p, 2) float (dx, dy) cell offsets of the p x p stencil, row-major (y outer, x inner)."""
    half = neighborhood // 2
    offsets = torch.stack(
        torch.meshgrid(torch.arange(-half, half + 1), torch.arange(-half, half + 1), indexing="xy"), dim=-1
    ).reshape(-1, 2)
    return offsets.float()


def sample_neighbourhoods(
    image_features: torch.Tensor, points: torch.Tensor, offsets: torch.Tensor, *, padding_mode: str = "zeros"
) -> torch.Tensor:
    """d_N(i): (B, K, p*p, d) features of (B, d, g, g) sampled bilinearly at each of the (B, K, 2) points plus
    the (p*p, 2) cell ``offsets`` (differentiable in the features and the points); outside the grid: zeros or
    the border value (``padding_mode``)."""
    batch, num_points, _ = points.shape
    where = (points.unsqueeze(2) + offsets.to(points.dtype)).reshape(batch, -1, 2)
    sampled = sample_grid(image_features, where, padding_mode=padding_mode)  # (B, K*p*p, d)
    return sampled.view(batch, num_points, offsets.shape[0], -1)


def description_set(
    start_token: torch.Tensor, local: torch.Tensor | None, keypoint_mask: torch.Tensor, *, include_global: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The set the self-attention runs over: (B, T, d) = [f_s^2 (if ``include_global``); the (B, K, d) keypoint
    descriptions ``local`` (if given)] and its (B, T) key padding mask (:func:`attention_padding`)."""
    batch = start_token.shape[0]
    tokens, present = [], []
    if include_global:
        tokens.append(start_token.unsqueeze(1))
        present.append(torch.ones(batch, 1, dtype=torch.bool, device=start_token.device))
    if local is not None:
        tokens.append(local)
        present.append(keypoint_mask)
    return torch.cat(tokens, dim=1), attention_padding(torch.cat(present, dim=1))


def attention_padding(present: torch.Tensor) -> torch.Tensor:
    """Key padding mask (True = ignore) from a (B, T) presence mask; a row with nothing present
    attends to everything instead (softmax over no key is NaN)."""
    padding = ~present
    return padding & present.any(dim=1, keepdim=True)


class KeypointDescriptor(nn.Module):
    """Cross-attention per keypoint, then self-attention over global + keypoint descriptions."""

    def __init__(self, *, dim: int, num_heads: int, out_dim: int, neighborhood: int) -> None:
        super().__init__()
        self.neighborhood = neighborhood
        self.query_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.out_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)
        self.register_buffer("offsets", neighbourhood_offsets(neighborhood), persistent=False)  # (p*p, 2) (dx, dy)

    def sample_neighbourhoods(self, image_features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """d_N(i): (B, K, p*p, d) features sampled around each point, zeros outside the grid."""
        return sample_neighbourhoods(image_features, points, self.offsets)

    def forward(
        self,
        image_features: torch.Tensor,
        start_token: torch.Tensor,
        points: torch.Tensor,
        keypoint_mask: torch.Tensor,
        *,
        include_global: bool = True,
        include_keypoints: bool = True,
    ) -> torch.Tensor:
        """
        Args:
            image_features: (B, d, g, g) F_i^2.
            start_token: (B, d) f_s^2.
            points: (B, K, 2) keypoints (x, y) in grid cells.
            keypoint_mask: (B, K) bool, keypoints that take part (the others are padding).
            include_global: put f_s^2 in the set (False = "w/o global description").
            include_keypoints: put the d_i in the set (False = "w/o keypoint description").
        Returns:
            (B, T, out_dim) descriptions with T = include_global + K * include_keypoints;
            the global description (if any) comes first.
        """
        batch = start_token.shape[0]
        local = None
        if include_keypoints:
            num_points = points.shape[1]
            context = self.sample_neighbourhoods(image_features, points.to(image_features.dtype))
            context = self.context_norm(context.flatten(0, 1))  # (B*K, p*p, d)
            query = self.query_norm(start_token).unsqueeze(1).expand(-1, num_points, -1).reshape(-1, 1, start_token.shape[-1])
            attended, _ = self.cross_attn(query, context, context, need_weights=False)  # (B*K, 1, d)
            local = start_token.unsqueeze(1) + attended.view(batch, num_points, -1)
        x, padding = description_set(start_token, local, keypoint_mask, include_global=include_global)
        normed = self.self_norm(x)
        attended, _ = self.self_attn(normed, normed, normed, key_padding_mask=padding, need_weights=False)
        x = x + attended
        return self.proj(self.out_norm(x))


class OfficialKeypointDescriptor(nn.Module):
    """The authors' descriptor (see the module docstring); the interface of :class:`KeypointDescriptor`."""

    def __init__(
        self, *, dim: int, num_heads: int, out_dim: int, neighborhood: int, ffn_size: int,
        encoder_ffn_size: int = 2048, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_size), nn.GELU(), nn.Linear(ffn_size, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.encoder = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=encoder_ffn_size, dropout=dropout, batch_first=True
        )
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out_dim))
        self.register_buffer("offsets", neighbourhood_offsets(neighborhood), persistent=False)

    def sample_neighbourhoods(self, image_features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """(B, K, p*p, d) features around each point, border values outside the grid (the authors')."""
        return sample_neighbourhoods(image_features, points, self.offsets, padding_mode="border")

    def forward(
        self,
        image_features: torch.Tensor,
        start_token: torch.Tensor,
        points: torch.Tensor,
        keypoint_mask: torch.Tensor,
        *,
        include_global: bool = True,
        include_keypoints: bool = True,
    ) -> torch.Tensor:
        """As :meth:`KeypointDescriptor.forward`: (B, T, out_dim), the global description first."""
        batch, dim = start_token.shape
        local = None
        if include_keypoints:
            num_points = points.shape[1]
            context = self.sample_neighbourhoods(image_features, points.to(image_features.dtype)).flatten(0, 1)
            query = start_token.unsqueeze(1).expand(-1, num_points, -1).reshape(-1, 1, dim)  # (B*K, 1, d)
            attended, _ = self.cross_attn(query, context, context, need_weights=False)
            local = self.cross_norm(query + attended)
            local = self.ffn_norm(local + self.ffn(local)).view(batch, num_points, dim)
        x, padding = description_set(start_token, local, keypoint_mask, include_global=include_global)
        return self.mlp(self.encoder(x, src_key_padding_mask=padding))


def build_descriptor(config: LensConfig) -> nn.Module:
    """The descriptor ``config.descriptor`` names, sized by the config."""
    common = dict(dim=config.hidden_size, num_heads=config.descriptor_heads, out_dim=config.prompt_dim,
                  neighborhood=config.neighborhood)
    if config.descriptor == "official":
        return OfficialKeypointDescriptor(
            **common, ffn_size=config.descriptor_ffn, encoder_ffn_size=config.descriptor_encoder_ffn_size,
            dropout=config.descriptor_dropout,
        )
    return KeypointDescriptor(**common)
