"""SAM from segment_anything: the tiny preset built in code, or a real checkpoint (ViT-H/L/B).

Stage 2 builds the same SAM as stage 1 (``build_sam(spec)``) so its prompt encoder and
mask decoder match the encoder that produced the cached embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

SAM_VARIANTS = ("vit_h", "vit_l", "vit_b")


def build_tiny_sam(seed: int = 0) -> Sam:
    """A tiny SAM with the real classes: shrunk image encoder, still 256x64x64 out; SAM's 256-d prompt interface.

    Deterministic from ``seed``; the global RNG state is restored afterwards.
    """
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return Sam(
            image_encoder=ImageEncoderViT(depth=1, embed_dim=32, img_size=1024, patch_size=16, num_heads=1,
                                          out_chans=256, window_size=14, global_attn_indexes=()),
            prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                         mask_in_chans=16),
            mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                     transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=256, num_heads=8),
                                     transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=64),
        )
    finally:
        torch.random.set_rng_state(state)


def build_sam(spec: str) -> Sam:
    """``tiny`` or ``vit_h:PATH`` / ``vit_l:PATH`` / ``vit_b:PATH`` (weights loaded with weights_only=True)."""
    if spec == "tiny":
        return build_tiny_sam()
    variant, sep, path = spec.partition(":")
    if not sep or variant not in SAM_VARIANTS:
        raise ValueError(f"SAM spec {spec!r} not understood: use 'tiny' or one of {[v + ':PATH' for v in SAM_VARIANTS]}")
    ckpt = Path(path).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found at {ckpt}: pass --sam {variant}:PATH to a local sam_{variant}_*.pth")
    sam = sam_model_registry[variant](checkpoint=None)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    sam.load_state_dict(state, strict=True)
    return sam
