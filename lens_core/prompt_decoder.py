"""LENS's prompts into SAM's mask decoder (paper 3.3), on the unmodified segment_anything.

Keypoints are encoded by SAM's own point positional encoder (``prompt_encoder.pe_layer``);
the global description gets a learnable [CLS] position. Sparse prompt = D + P_pos, with
absent keypoints dropped; dense prompt = SAM's ``no_mask_embed``. As in
``segment_anything.utils.onnx.SamOnnxModel``, the decoder is called through
``mask_decoder.predict_masks`` with this new input contract; SAM's code is untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from .geometry import SAM_IMAGE_SIZE, grid_to_sam_coords


class SamPromptDecoder(nn.Module):
    """SAM's prompt encoder (frozen) and mask decoder (trainable) fed with keypoint descriptions."""

    def __init__(
        self,
        *,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        grid_size: int,
        mask_index: int = 0,
        coords: str = "cell_center",
        cls_position_std: float = 0.02,
        train_iou_head: bool = True,
    ) -> None:
        """
        Args:
            coords: how a cell maps to SAM's frame (``lens_core.geometry.grid_to_sam_coords``).
            cls_position_std: init std of the global token's learned position.
            train_iou_head: False freezes SAM's IoU prediction head (the authors' code).
        """
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.grid_size = grid_size
        self.mask_index = mask_index
        self.coords = coords
        self.prompt_encoder.requires_grad_(False)
        if not train_iou_head:
            self.mask_decoder.iou_prediction_head.requires_grad_(False)
        embed_dim = prompt_encoder.embed_dim
        self.cls_position = nn.Parameter(torch.randn(1, 1, embed_dim) * cls_position_std)
        self.image_size = (int(prompt_encoder.input_image_size[0]), int(prompt_encoder.input_image_size[1]))
        if self.image_size != (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE):
            raise ValueError(f"SAM input size {self.image_size} != {SAM_IMAGE_SIZE}: the token grid assumes SAM's 1024 frame")

    def forward(
        self,
        descriptions: torch.Tensor,
        points: torch.Tensor,
        keypoint_mask: torch.Tensor,
        image_embeddings: torch.Tensor,
        *,
        has_global: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            descriptions: (B, T, C), C = SAM's prompt width (256 for SAM, 64 for the toy SAM),
                T = has_global + K (or has_global alone when the keypoint descriptions are off).
            points: (B, K, 2) keypoints (x, y) in grid cells.
            keypoint_mask: (B, K) bool, keypoints that prompt SAM.
            image_embeddings: (B, C, 64, 64) SAM image embeddings.
            has_global: whether descriptions[:, 0] is the global description.
        Returns:
            low_res_logits (B, 256, 256) and iou_predictions (B,).
        """
        batch = descriptions.shape[0]
        if image_embeddings.shape[0] != batch:
            raise ValueError(f"{batch} prompt sets but {image_embeddings.shape[0]} image embeddings")
        expected = self.prompt_encoder.image_embedding_size
        if tuple(image_embeddings.shape[1:]) != (self.prompt_encoder.embed_dim, *expected):
            raise ValueError(
                f"SAM image embeddings must be (B, {self.prompt_encoder.embed_dim}, {expected[0]}, {expected[1]}),"
                f" got {tuple(image_embeddings.shape)}"
            )
        num_keypoint_tokens = descriptions.shape[1] - int(has_global)
        positions, present = [], []
        if has_global:
            positions.append(self.cls_position.expand(batch, 1, -1).to(descriptions.dtype))
            present.append(torch.ones(batch, 1, dtype=torch.bool, device=descriptions.device))
        if num_keypoint_tokens:
            coords = grid_to_sam_coords(points[:, :num_keypoint_tokens].float(), self.grid_size, coords=self.coords)
            positions.append(self.prompt_encoder.pe_layer.forward_with_coords(coords, self.image_size).to(descriptions.dtype))
            present.append(keypoint_mask[:, :num_keypoint_tokens])
        sparse = descriptions + torch.cat(positions, dim=1)
        present_mask = torch.cat(present, dim=1)

        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *expected)
        image_pe = self.prompt_encoder.get_dense_pe()
        logits, ious = [], []
        # SAM's decoder repeats the image embedding once per prompt set, so B images with B
        # prompt sets cannot share one call; each image is decoded with its own prompts.
        for b in range(batch):
            keep = present_mask[b]
            if not bool(keep.any()):
                keep = torch.zeros_like(keep)
                keep[0] = True  # never an empty prompt: fall back to the strongest keypoint
            tokens = sparse[b][keep].unsqueeze(0)
            masks, iou = self.mask_decoder.predict_masks(
                image_embeddings=image_embeddings[b : b + 1].to(tokens.dtype),
                image_pe=image_pe.to(tokens.dtype),
                sparse_prompt_embeddings=tokens,
                dense_prompt_embeddings=dense.to(tokens.dtype),
            )
            logits.append(masks[:, self.mask_index])
            ious.append(iou[:, self.mask_index])
        return torch.cat(logits, dim=0), torch.cat(ious, dim=0)
