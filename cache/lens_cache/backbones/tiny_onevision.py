"""A tiny LLaVA-OneVision built in code with the real classes, for tests and ``--mllm tiny-onevision``.

It keeps what the pipeline depends on: a SigLIP vision tower at 384 px with 14 px patches
(27 x 27 = 729 patch tokens, no CLS, ``vision_feature_select_strategy="full"``,
``vision_feature_layer=-1``), LLaVA-OneVision's two-layer GELU projector and its learned
``image_newline``; a Qwen2 language model with 28 layers (as Qwen2-7B, so layers 20 and
27 exist) only 64 wide, with grouped-query attention (4 query heads, 2 KV heads), q/k/v
biases, RMSNorm eps 1e-6 and rope theta 1e6; a real :class:`~transformers.LlavaOnevisionProcessor`
(``num_image_tokens=729``) with the llava-hf chat template. The model config and the image
processor keep OneVision's default 36 AnyRes grid pinpoints, as a real checkpoint does: the
adapter (:mod:`.onevision`) restricts both to the base resolution itself.

The tokenizer is the project's word-level one (:mod:`.tiny_tokenizer`) with Qwen2's and
OneVision's special tokens (``<image>``, ``<video>``); nothing is downloaded.
:func:`save_tiny_onevision` writes it as a Hugging Face folder, so the real loader runs offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from .tiny_tokenizer import word_level_tokenizer

TINY_SEED = 0
#: SigLIP's input side: 384 / 14 = 27 patches a side -> 27 x 27 = 729 image tokens per crop.
TINY_IMAGE_SIZE = 384

# Qwen2's special tokens (<|endoftext|> is its pad/eos of base text), then OneVision's.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>")

#: The chat template of the llava-hf OneVision checkpoints (``chat_template.json``; copied from the
#: public copies of that file quoted in other projects, not checked against the checkpoint offline):
#: ``<|im_start|>user <image>\n{text}<|im_end|><|im_start|>assistant\n`` for one image and one question.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_onevision_tokenizer() -> PreTrainedTokenizerFast:
    """The project's word-level tokenizer (lower-cased words, punctuation, single digits) with
    Qwen2's and OneVision's special tokens and no BOS (Qwen2 adds none). Newlines are whitespace to it."""
    return word_level_tokenizer(
        SPECIAL_TOKENS, extra_words=("system", "user", "assistant"),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
    )


def tiny_onevision_config(tokenizer: PreTrainedTokenizerFast):
    """LLaVA-OneVision-7B's structure at toy width (SigLIP 384/14, Qwen2 28 layers, GQA 4:2, theta 1e6)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=14,  # 384 / 14 = 27 -> 729 patches, no CLS
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=28,  # as Qwen2-7B: layers 20 (main) and 27 (late) exist
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        # image_grid_pinpoints left to OneVision's default 36 AnyRes resolutions (as the real checkpoint)
    )


def build_tiny_onevision_processor(tokenizer: PreTrainedTokenizerFast | None = None):
    """A real LlavaOnevisionProcessor: SigLIP preprocessing at 384 px (mean = std = 0.5), AnyRes pinpoints
    left at their default, ``num_image_tokens`` 729, ``full`` feature strategy, the llava-hf chat template."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tiny_onevision_tokenizer()
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=(TINY_IMAGE_SIZE // 14) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )


def build_tiny_onevision(seed: int = TINY_SEED):
    """The tiny LLaVA-OneVision (float32, CPU, eval mode, frozen) and its processor.

    Initialisation is seeded without disturbing the caller's global RNG state.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    processor = build_tiny_onevision_processor()
    config = tiny_onevision_config(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval().requires_grad_(False), processor


def save_tiny_onevision(directory: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny model as a Hugging Face folder (config, safetensors, processor, tokenizer, chat template)."""
    directory = Path(directory)
    model, processor = build_tiny_onevision(seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
