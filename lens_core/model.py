"""LENS: head -> keypoints -> descriptions -> SAM's mask decoder (paper Fig. 2).

``Lens`` is handed its parts (as ``segment_anything.modeling.Sam`` is); ``build_lens``
makes them from a config and a SAM model. Inputs are what stage 1 caches, so the
frozen MLLM and SAM's image encoder are never part of this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import LensConfig
from .descriptor import build_descriptor
from .geometry import postprocess_masks
from .head import SegmentationHead
from .keypoints import nms_keypoints, subpixel_refine
from .prompt_decoder import SamPromptDecoder


@dataclass
class LensOutput:
    """
    Attributes:
        low_res_logits: (B, 256, 256) mask logits on SAM's padded frame.
        iou_predictions: (B,) SAM's predicted IoU of that mask.
        heatmap: (B, g, g) grounding map A_c^1 in (0, 1).
        points: (B, K, 2) refined keypoints (x, y) in grid cells.
        valid: (B, K) bool, keypoints above the score threshold.
        used: (B, K) bool, keypoints that prompted SAM (valid, minus training dropout/ablations).
    """

    low_res_logits: torch.Tensor
    iou_predictions: torch.Tensor
    heatmap: torch.Tensor
    points: torch.Tensor
    valid: torch.Tensor
    used: torch.Tensor


class Lens(nn.Module):
    """The trainable LENS model on top of cached MLLM and SAM features."""

    def __init__(
        self,
        *,
        config: LensConfig,
        head: SegmentationHead,
        descriptor: nn.Module,
        prompt_decoder: SamPromptDecoder,
    ) -> None:
        super().__init__()
        self.config = config
        self.head = head
        self.descriptor = descriptor
        self.prompt_decoder = prompt_decoder

    def forward(
        self,
        image_states: torch.Tensor,
        text_states: torch.Tensor,
        text_lengths: torch.Tensor,
        sam_embeddings: torch.Tensor,
        *,
        prefix_states: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LensOutput:
        """
        Args:
            image_states: (B, 576, d) MLLM image-token states (layer 14).
            text_states: (B, L_t, d) MLLM text states after the image, right-padded.
            text_lengths: (B,) valid text rows; the last one is the start-of-answer token.
            sam_embeddings: (B, C, 64, 64) SAM image embeddings, C = ``config.prompt_dim``
                (256 for SAM, 64 for the toy SAM).
            prefix_states: (P, d) or (B, P, d) states of the tokens before the image; read only when
                ``config.head_input`` is ``full_sequence``.
            generator: RNG for the training-time global-only dropout (S1.4).
        Returns:
            LensOutput.
        """
        cfg = self.config
        head_out = self.head(image_states, text_states, text_lengths, prefix_states)
        heatmap = head_out.heatmap
        integer_points, valid = nms_keypoints(
            heatmap, max_points=cfg.max_keypoints, radius=cfg.nms_radius, min_ratio=cfg.keypoint_min_ratio,
            strict=cfg.keypoint_strict,
        )
        if cfg.detach_subpixel:
            # The heatmap is supervised by L_attn alone; the Newton step stays out of the graph.
            points = subpixel_refine(heatmap.detach().float(), integer_points).detach()
        else:
            # The authors' code: the descriptor's sampling positions carry gradient into the heatmap.
            points = subpixel_refine(heatmap.float(), integer_points)

        used = valid.clone()
        if self.training and cfg.use_global_description and cfg.global_only_prob > 0:
            # S1.4: with probability p a sample is described by the global token alone.
            drop = torch.rand(valid.shape[0], generator=generator, device="cpu") < cfg.global_only_prob
            used &= ~drop.to(valid.device).unsqueeze(1)
        if not cfg.use_keypoint_description:
            used = torch.zeros_like(valid)
        # The authors drop keypoints from SAM's prompt only; the descriptor still sees every valid one.
        described = valid if cfg.global_only_after_descriptor and cfg.use_keypoint_description else used

        descriptions = self.descriptor(
            head_out.image_features,
            head_out.start_token,
            points,
            described,
            include_global=cfg.use_global_description,
            include_keypoints=cfg.use_keypoint_description,
        )
        # SAM's positional encoding of the keypoints is not trained through (authors: under no_grad).
        points = points.detach()
        low_res, iou = self.prompt_decoder(
            descriptions, points, used, sam_embeddings, has_global=cfg.use_global_description
        )
        return LensOutput(
            low_res_logits=low_res, iou_predictions=iou, heatmap=heatmap, points=points, valid=valid, used=used
        )

    @staticmethod
    def masks_at_original_size(
        low_res_logits: torch.Tensor,
        input_sizes: torch.Tensor,
        original_sizes: torch.Tensor,
    ) -> list[torch.Tensor]:
        """SAM-style post-processing per image: B tensors (H_b, W_b) of logits."""
        return [
            postprocess_masks(low_res_logits[b][None, None], tuple(input_sizes[b].tolist()), tuple(original_sizes[b].tolist()))[0, 0]
            for b in range(low_res_logits.shape[0])
        ]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_lens(config: LensConfig, sam: nn.Module) -> Lens:
    """A ``Lens`` from a config and a ``segment_anything.modeling.Sam``.

    The SAM must be the one whose image encoder produced the cached embeddings. Its
    prompt encoder is frozen and its mask decoder trained; its image encoder is not used.
    """
    if config.prompt_dim != sam.prompt_encoder.embed_dim:
        raise ValueError(f"config.prompt_dim {config.prompt_dim} != SAM prompt dim {sam.prompt_encoder.embed_dim}")
    head = SegmentationHead(config=config)
    descriptor = build_descriptor(config)
    prompt_decoder = SamPromptDecoder(
        prompt_encoder=sam.prompt_encoder, mask_decoder=sam.mask_decoder, grid_size=config.grid_size,
        mask_index=config.mask_output_index, coords=config.coords, cls_position_std=config.cls_position_std,
        train_iou_head=config.train_iou_head,
    )
    return Lens(config=config, head=head, descriptor=descriptor, prompt_decoder=prompt_decoder)
