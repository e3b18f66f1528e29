"""A tiny LLaVA-1.5 built in code with the real classes, for tests and the embedded default.

It keeps everything the pipeline depends on and nothing else: a CLIP vision tower at
336 px with 14 px patches (24 x 24 = 576 image tokens, ``vision_feature_layer=-2``,
CLS dropped by the ``default`` strategy), a 32-layer LLaMA (so layers 14 and 30 exist)
only 64 wide, a real :class:`~transformers.LlavaProcessor` whose ``<image>`` expands to
576 tokens, and a word-level tokenizer built locally with the ``tokenizers`` library
(nothing is downloaded). :func:`save_tiny_llava` writes it as a llava-hf style folder,
so the real loader (``from_pretrained``) is exercised offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .tiny_tokenizer import word_level_tokenizer

TINY_SEED = 0

# LLaMA's special tokens first (<unk>=0, <s>=1, </s>=2 as in LLaMA), then LLaVA's.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
#: Words of LLaVA-1.5's prompt (``VICUNA_V1_TEMPLATE``) beyond the shared vocabulary: the ``s`` of
#: "user's" (the tokenizer splits it as ``user ' s``), so the tiny LLaVA's prompt has no ``<unk>``.
#: Only the tiny LLaVA adds them: the toy's vocabulary (and its shipped weights) stay as trained.
PROMPT_WORDS = ("s",)


def build_tiny_tokenizer(
    extra_words: tuple[str, ...] | list[str] = (), extra_symbols: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """The word-level tokenizer (:func:`~.tiny_tokenizer.word_level_tokenizer`) with LLaMA's special tokens
    and ``<image>``, prepending ``<s>`` like LLaMA's tokenizer.

    ``extra_words`` extend the vocabulary (the toy LLaVA adds its world's words) and
    ``extra_symbols`` its punctuation (the toy's box answers need ``[`` and ``]``).
    """
    return word_level_tokenizer(
        SPECIAL_TOKENS, extra_words=extra_words, extra_symbols=extra_symbols,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )


def tiny_llava_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """LLaVA-1.5's structure at toy width: 576 image tokens, 32 decoder layers of width 64."""
    vision = CLIPVisionConfig(
        image_size=336,
        patch_size=14,  # 336 / 14 = 24 -> 24 x 24 = 576 patches (+ CLS, dropped)
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=32,  # as LLaVA-1.5-7B, so layers 14 and 30 exist
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_tiny_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """A real LlavaProcessor: CLIP preprocessing at 336 px; ``<image>`` -> (336/14)^2 + 1 - 1 = 576 tokens.

    Without ``tokenizer``: the tiny LLaVA's, :func:`build_tiny_tokenizer` with :data:`PROMPT_WORDS`.
    """
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tiny_tokenizer(PROMPT_WORDS),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, removed again by the "default" strategy
    )


def build_tiny_llava(seed: int = TINY_SEED) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The tiny LLaVA (float32, CPU, eval mode, frozen) and its processor.

    Initialisation is seeded without disturbing the caller's global RNG state, so every
    call returns the same weights.
    """
    processor = build_tiny_processor()
    config = tiny_llava_config(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval().requires_grad_(False), processor


def save_tiny_llava(directory: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny LLaVA as a llava-hf style folder (config, safetensors, processor, tokenizer)."""
    directory = Path(directory)
    model, processor = build_tiny_llava(seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
