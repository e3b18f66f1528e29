"""The contract between backbones (frozen MLLM + SAM image encoder) and the cache builder.

A :class:`FeatureExtractor` turns one image and the questions asked about it into
the features stage 2 trains on. The builder (``lens_cache.build``) knows nothing
about LLaVA or SAM; any backbone that implements this interface can be cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from PIL import Image


@dataclass
class ImageFeatures:
    """Everything cached for one image and its queries.

    Attributes:
        image_states: layer -> (L_i, d) float tensor, the MLLM's image-token states
            (raw output of decoder layer ``layer - 1``; ``hidden_states[layer]``).
        text_states: one entry per question, layer -> (L_t, d) float tensor, the
            states of the tokens after the image (``"\\n{question} ASSISTANT:"``);
            the last row is the start-of-answer token.
        sam_embedding: (C, 64, 64) float tensor, SAM's image embedding; C = ``sam_channels``
            of the extractor (256 for SAM, 64 for the toy SAM).
        original_size: (h, w) of the image as loaded.
        input_size: (h, w) after resizing the longest side to 1024 (before padding).
        prefix_states: layer -> (P, d) float tensor, the states of the prompt's P tokens before the
            image (the same for every image: a store keeps them once); empty where the backbone gives none.
    """

    image_states: dict[int, torch.Tensor]
    text_states: list[dict[int, torch.Tensor]]
    sam_embedding: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    prefix_states: dict[int, torch.Tensor] = field(default_factory=dict)


class NoDecoderLayers(LookupError):
    """The backbone cannot hand out the decoder layers asked for (the message says why, in one line)."""


class FeatureExtractor(Protocol):
    """What the cache builder needs from a backbone pair."""

    #: JSON-serialisable description that makes a cache what it is: backbone name,
    #: config hash, layers, dtype, prompt template, SAM variant (+ checkpoint hash).
    identity: dict
    layers: tuple[int, ...]
    hidden_size: int
    num_image_tokens: int  # 576 for LLaVA-1.5
    sam_channels: int  # C of the (C, 64, 64) SAM embedding: SAM's prompt width (256; the toy SAM's 64)

    def question_for(self, text: str, is_sentence: bool) -> str:
        """The question put to the MLLM for a manifest row (the prompt rule)."""

    def num_text_tokens(self, question: str) -> int:
        """L_t for this question, by tokenisation only (for preallocating the store)."""

    # Optional: ``questions_for(text, is_sentence) -> list[str]``, every variant's question (variant 0 =
    # ``question_for``, then the training templates), and ``question_set`` (a ``lens_cache.questions.QuestionSet``):
    # a build caches the text states of every variant (``lens_cache.extractor_info.describe_extractor``).

    def extract(self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]) -> list[ImageFeatures]:
        """Features for a batch of images; ``questions[b]`` are the questions about ``images[b]``.

        The image prefix is run once per image and reused (KV cache) for all its
        questions; the forward stops after the deepest cached layer.
        """

    # Optional: ``prefix_states() -> (token_ids, layer -> (P, d) tensor) | None``, the prompt's tokens before
    # the image and their states; a build stores them once (``lens_cache.extractor_info.store_prefix``).

    def decoder_layers(self, indices: Sequence[int]) -> tuple[dict, list[dict[str, torch.Tensor]]]:
        """The MLLM's decoder layers ``indices`` (0-based), for the LENS head's warm start.

        Returns:
            the head sizes they fit, as ``LensConfig`` fields (hidden_size, num_heads,
            mlp_size, rms_norm_eps, rope_theta; for Qwen2 layers or grouped-query attention also
            layer_type and num_key_value_heads), and one decoder-layer state dict per index
            (``LlamaDecoderLayer`` / ``Qwen2DecoderLayer`` names).
        Raises:
            NoDecoderLayers: the MLLM has no such layer, or exposes none.
        """
