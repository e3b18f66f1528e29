"""The project's toy backbones as loading needs them: where the shipped weights lie, the toy SAM's architecture
and the toy LLaVA's prompt.

The toy SAM and the toy LLaVA are small models of the real classes, pretrained by the project on its synthetic
world (``lens_toy``, ``lens-toy``; the guide: ``toy/README.md``) and shipped in :data:`WEIGHTS_DIR`:

- ``--sam toy`` is :func:`build_toy_sam` with :data:`TOY_SAM_FILE` loaded strictly (``.sam.build_sam``);
- ``--mllm toy`` is the llava-hf folder :data:`TOY_LLAVA_DIR`, loaded like any checkpoint
  (``.llava.LlavaBackbone.toy``) and prompted with :data:`TOY_PROMPT_TEMPLATE`.

Loading needs only this module: the pretraining code (the toy world, the training loops, the export) lives in
``lens_toy``, which imports this package and is never imported by it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from lens_core.geometry import SAM_IMAGE_SIZE

#: The shipped weights (``lens-toy export`` writes there by default); also the toy LENS head ``lens_head/``.
WEIGHTS_DIR = Path(__file__).parent / "toy_weights"
#: The toy SAM's file in :data:`WEIGHTS_DIR`: the state dict of ``build_toy_sam()`` (safetensors).
TOY_SAM_FILE = "toy_sam.safetensors"
#: The toy LLaVA in :data:`WEIGHTS_DIR`: a llava-hf folder (config, model.safetensors, processor, tokenizer).
TOY_LLAVA_DIR = "toy_llava"
#: Hashes, held-out scores and provenance of the shipped weights.
MANIFEST_FILE = "MANIFEST.json"
#: The prompt the toy LLaVA was trained with (its conversations, ``lens_toy.llava``) and its stores
#: record: the vicuna_v1 text as the project wrote it before LLaVA-1.5's adapter took LISA's wording
#: ("user", ``lens_cache.backbones.llava.VICUNA_V1_TEMPLATE``). Changing it would change the toy's inputs
#: and every toy store's identity; ``<image>`` stands for the image tokens.
TOY_PROMPT_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: <image>\n{question} ASSISTANT:"
)

#: The toy SAM's prompt width (SAM's is 256): its image embedding is therefore (64, 64, 64).
TOY_SAM_PROMPT_DIM = 64
_EMBEDDING_SIZE = SAM_IMAGE_SIZE // 16


def build_toy_sam(seed: int = 0) -> Sam:
    """The toy SAM's architecture, random weights from ``seed`` (the caller's RNG is left as it was).

    ``segment_anything``'s real classes: a 3-block windowed ViT of width 64 on SAM's 1024 x 1024 input
    (16 px patches -> 64 x 64 tokens) and SAM's prompt encoder and two-way mask decoder at prompt width
    :data:`TOY_SAM_PROMPT_DIM` instead of 256. The narrow decoder is what makes CPU pretraining possible:
    SAM's decoder runs once per prompt on the full 64 x 64 embedding, and at width 256 it costs ~80% of a
    step. Stores record the embedding's channel count with the SAM's identity.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Sam(
            image_encoder=ImageEncoderViT(
                depth=3, embed_dim=64, img_size=SAM_IMAGE_SIZE, mlp_ratio=2.0,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=4, patch_size=16,
                qkv_bias=True, use_rel_pos=True, global_attn_indexes=(), window_size=8,
                out_chans=TOY_SAM_PROMPT_DIM,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=TOY_SAM_PROMPT_DIM, image_embedding_size=(_EMBEDDING_SIZE, _EMBEDDING_SIZE),
                input_image_size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=TOY_SAM_PROMPT_DIM, mlp_dim=256, num_heads=4),
                transformer_dim=TOY_SAM_PROMPT_DIM, iou_head_depth=3, iou_head_hidden_dim=64,
            ),
        )  # fmt: skip
