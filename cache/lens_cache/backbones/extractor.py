"""The FeatureExtractor the cache builder uses: an MLLM adapter and SAM's encoder, handed in.

It owns the image geometry (:mod:`.geometry`): each image is brought into SAM's frame
once; SAM embeds it, the MLLM sees the same padded square.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from lens_core.geometry import SAM_IMAGE_SIZE

from .base import ImageFeatures, NoDecoderLayers
from .geometry import IMAGE_GEOMETRY, sam_frame
from .mllm import MllmBackbone
from .sam import SamImageEncoder


class LensFeatureExtractor:
    """Implements :class:`~lens_cache.backbones.base.FeatureExtractor` from its two parts.

    Args:
        mllm: the frozen MLLM adapter (e.g. :class:`~lens_cache.backbones.llava.LlavaBackbone`).
        sam: SAM's frozen image encoder.
        storage_dtype: the dtype the builder stores features in (recorded in the identity).
    """

    def __init__(self, *, mllm: MllmBackbone, sam: SamImageEncoder, storage_dtype: str = "float16") -> None:
        self.mllm = mllm
        self.sam = sam
        self.layers = tuple(mllm.layers)
        self.hidden_size = int(mllm.hidden_size)
        self.num_image_tokens = int(mllm.num_image_tokens)
        self.sam_channels = sam.channels
        self.identity: dict = {
            **mllm.identity,
            "dtype": storage_dtype,
            # SAM's frame as the MLLM sees it: an adapter that resizes it elsewhere than 336 px names its own.
            "image_geometry": getattr(mllm, "image_geometry", IMAGE_GEOMETRY),
            "sam": dict(sam.identity),
        }

    def question_for(self, text: str, is_sentence: bool) -> str:
        return self.mllm.question_for(text, is_sentence)

    def questions_for(self, text: str, is_sentence: bool) -> list[str]:
        """Every variant's question (variant 0 = :meth:`question_for`); one for an MLLM without question sets."""
        get = getattr(self.mllm, "questions_for", None)
        return list(get(text, is_sentence)) if get is not None else [self.mllm.question_for(text, is_sentence)]

    @property
    def question_set(self) -> Any:
        """The MLLM's :class:`~lens_cache.questions.QuestionSet`, or None for one without."""
        return getattr(self.mllm, "question_set", None)

    def num_text_tokens(self, question: str) -> int:
        return self.mllm.num_text_tokens(question)

    def extract(self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]) -> list[ImageFeatures]:
        """Features of a batch of images; ``questions[b]`` are asked about ``images[b]``.

        Returns:
            one :class:`ImageFeatures` per image: layer -> (L_i, d) image states, per
            question layer -> (L_t, d) text states, the (C, 64, 64) SAM embedding,
            original and resized sizes, layer -> (P, d) prefix states; float32 on the CPU.
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        frames = [sam_frame(image) for image in images]
        states = self.mllm.encode([frame.padded_image() for frame in frames], questions)
        embeddings = self.sam.embed(frames)
        return [
            ImageFeatures(
                image_states=s.image_states,
                text_states=s.text_states,
                sam_embedding=embeddings[b],
                original_size=frame.original_size,
                input_size=frame.input_size,
                prefix_states=s.prefix_states,
            )
            for b, (frame, s) in enumerate(zip(frames, states))
        ]

    def prefix_states(self) -> tuple[list[int], dict[int, torch.Tensor]] | None:
        """The MLLM's prompt tokens before the image and their states: (P token ids, layer -> (P, d) float32
        CPU), from one :meth:`~.prefix_sharing.PrefixSharingBackbone.encode` of a blank SAM frame (the
        prefix does not see the image); None for an adapter that gives none."""
        token_ids = getattr(self.mllm, "prefix_token_ids", None)
        if not token_ids:
            return None
        blank = sam_frame(Image.new("RGB", (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE))).padded_image()
        states = self.mllm.encode([blank], [[]])[0].prefix_states
        return (list(token_ids), dict(states)) if states else None

    def extract_one(self, image: Image.Image, question: str) -> ImageFeatures:
        """Features of one image and one question (interactive segmentation)."""
        return self.extract([image], [[question]])[0]

    def decoder_layers(self, indices: Sequence[int]) -> tuple[dict, list[dict[str, torch.Tensor]]]:
        """The MLLM's head sizes and decoder layers ``indices`` (see ``FeatureExtractor``)."""
        count = self.mllm.num_hidden_layers
        for index in indices:
            if not 0 <= index < count:
                raise NoDecoderLayers(f"the MLLM has no decoder layer {index} (it has {count}: 0..{count - 1})")
        return dict(self.mllm.head_sizes), [self.mllm.decoder_layer_state_dict(index) for index in indices]
