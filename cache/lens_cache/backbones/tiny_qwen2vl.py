"""A tiny Qwen2-VL (or Qwen2.5-VL) built in code with the real classes, for tests and ``--mllm tiny-qwen2vl``.

It keeps what the pipeline depends on: Qwen2-VL's vision tower layout (14 px patches,
2 x 2 patch merging, 2-frame temporal patches) at a fixed 672 px input, so an image is
48 x 48 patches -> 24 x 24 = 576 merged image tokens; a Qwen2 language model with 28
layers (as Qwen2-VL-2B, so layers 20 and 27 exist) only 64 wide, with grouped-query
attention (4 query heads, 2 KV heads), q/k/v biases and M-RoPE (``mrope_section``
scaled down to the 16-wide heads); a real :class:`~transformers.Qwen2VLProcessor`
whose ``<|image_pad|>`` expands to 576 tokens, and Qwen2-VL's chat template
(``<|im_start|>system/user/assistant``). The tokenizer is the project's word-level one
(:mod:`.tiny_tokenizer`) with Qwen2-VL's special tokens; nothing is downloaded.
:func:`save_tiny_qwen2vl` writes it as a Hugging Face folder, so the real loader runs offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from .tiny_tokenizer import word_level_tokenizer

TINY_SEED = 0
#: The fixed square the processor resizes every image to: 672 / 14 = 48 patches a side, merged 2 x 2 -> 24.
TINY_IMAGE_SIZE = 672

# Qwen2's special tokens (<|endoftext|> is its pad/eos of base text), then Qwen2-VL's.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<unk>",
)

#: Qwen2-VL-Instruct's chat template (the Jinja template its ``chat_template.json`` ships):
#: a default system turn, ``<|im_start|>role\n ... <|im_end|>\n`` turns, an image as
#: ``<|vision_start|><|image_pad|><|vision_end|>``, then ``<|im_start|>assistant\n``.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def build_tiny_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The project's word-level tokenizer (lower-cased words, punctuation, single digits) with
    Qwen2-VL's special tokens and no BOS (Qwen2 adds none). Newlines are whitespace to it."""
    return word_level_tokenizer(
        SPECIAL_TOKENS, extra_words=("system", "user"),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
    )


def tiny_qwen2vl_config(tokenizer: PreTrainedTokenizerFast, family: str = "qwen2_vl"):
    """Qwen2-VL-2B's structure at toy width (28 layers, GQA 4:2, q/k/v biases, M-RoPE, theta 1e6)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=28,  # as Qwen2-VL-2B: layers 20 (main) and 27 (late) exist
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width); Qwen2-VL: [16, 24, 24] of 64
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(depth=2, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    special = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(
            text_config=text, vision_config={**vision, "embed_dim": 32, "mlp_ratio": 2}, **special
        )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config=text,
            vision_config={**vision, "intermediate_size": 64, "out_hidden_size": 64, "window_size": 112,
                           "fullatt_block_indexes": [1]},
            **special,
        )
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def build_tiny_qwen_processor(tokenizer: PreTrainedTokenizerFast | None = None, family: str = "qwen2_vl"):
    """A real Qwen2-VL (Qwen2.5-VL) processor fixed at 672 x 672 (min_pixels = max_pixels), chat template set."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tiny_qwen_tokenizer()
    pixels = TINY_IMAGE_SIZE * TINY_IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels)
    video_processor = Qwen2VLVideoProcessor()
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Processor
    else:
        from transformers import Qwen2VLProcessor as Processor
    return Processor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                     chat_template=QWEN2_VL_CHAT_TEMPLATE)


def build_tiny_qwen2vl(seed: int = TINY_SEED, family: str = "qwen2_vl"):
    """The tiny Qwen2-VL (float32, CPU, eval mode, frozen) and its processor.

    Initialisation is seeded without disturbing the caller's global RNG state.
    """
    processor = build_tiny_qwen_processor(family=family)
    config = tiny_qwen2vl_config(processor.tokenizer, family)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    else:
        from transformers import Qwen2VLForConditionalGeneration as Model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Model(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval().requires_grad_(False), processor


def save_tiny_qwen2vl(directory: str | Path, seed: int = TINY_SEED, family: str = "qwen2_vl") -> Path:
    """Write the tiny model as a Hugging Face folder (config, safetensors, processor, tokenizer, chat template)."""
    directory = Path(directory)
    model, processor = build_tiny_qwen2vl(seed, family)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
