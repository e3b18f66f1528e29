"""Published MLLMs at their real dimensions, built in code with random weights (no download).

The cache benchmark (``benchmarks/bench_cache.py``, :mod:`lens_cache.benchmark`) measures stage 1 on models of
the real size without their weights: :data:`REAL_BACKBONES` holds one row per ``--backbone`` (the checkpoint
it mirrors, its tiny counterpart for ``--scale tiny``, the layer cached by default, its builder), and
:func:`build_real_mllm` builds the adapter around the random-weight model directly on the device.

The configs are written from memory of the public ``config.json`` files (not checked offline); the tests
(``tests/test_bench_cache.py``, ``tests/test_bench_cache_backbones.py``) check the parameter counts against the
published sizes on the meta device. The tokenizers and processors are the tiny presets' (word-level, with the
real special-token ids), so prompts are a few tokens shorter than with the real tokenizers (< 1% of the FLOPs).

The per-backbone defaults of real checkpoints (layers, warm start, preset) are :mod:`.defaults`; this module
only adds what building the models needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def llava_1_5_7b_config(image_token_index: int, pad_token_id: int) -> Any:
    """LLaVA-1.5-7B's architecture (llava-hf/llava-1.5-7b-hf config.json), built in code."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        vocab_size=32000,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_index,
        image_seq_length=576,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=pad_token_id,
    )


def build_word_tokenizer(image_token_id: int = 32000, pad_token_id: int = 32001) -> Any:
    """The tiny preset's word-level tokenizer with LLaVA-1.5's ids for ``<image>`` (32000) and ``<pad>`` (32001).

    Real LLaVA uses LLaMA's SentencePiece tokenizer (not available offline); word-level tokens
    make prompts a few tokens shorter, which changes the FLOPs by well under 1%.
    """
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from .tiny_llava import SPECIAL_TOKENS, build_tiny_tokenizer

    tiny = build_tiny_tokenizer().backend_tokenizer
    vocab = dict(tiny.get_vocab(with_added_tokens=False))
    vocab["<image>"], vocab["<pad>"] = image_token_id, pad_token_id
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = tiny.normalizer, tiny.pre_tokenizer
    tok.post_processor, tok.decoder = tiny.post_processor, tiny.decoder
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def qwen2vl_2b_config(tokenizer: Any) -> Any:
    """Qwen2-VL-2B-Instruct's architecture (from memory of its config.json, not checked offline), built in
    code; the special-token ids are those of the word-level ``tokenizer`` (the vocabulary keeps its real size)."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                           "<|vision_end|>", "<|endoftext|>", "<|im_end|>")}
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def onevision_7b_config(tokenizer: Any) -> Any:
    """LLaVA-OneVision-7B's architecture (llava-hf/llava-onevision-qwen2-7b-ov-hf; from memory of its
    config.json, not checked offline): SigLIP-so400m at 384 px (26 layers, d 1152) + Qwen2-7B (28 layers,
    d 3584, GQA 28:4); special-token ids are those of the word-level ``tokenizer``."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>", "<|endoftext|>", "<|im_end|>")}
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                         num_attention_heads=16, image_size=384, patch_size=14,
                                         hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
        text_config=Qwen2Config(vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                                max_position_embeddings=32768, hidden_act="silu",
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                                pad_token_id=ids["<|endoftext|>"]),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
    )


def _model_on(model_class: Any, config: Any, device: torch.device, dtype: torch.dtype,
              text_layers: int | None = None) -> Any:
    """``model_class`` from ``config`` with random weights born on ``device`` in ``dtype`` (no fp32 CPU copy);
    ``text_layers``: only the language model's first decoder layers (those a build up to a layer runs)."""
    if text_layers is not None:
        text = getattr(config, "text_config", None) or config
        text.num_hidden_layers = text_layers
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def _llava_1_5_7b(device: torch.device, dtype: torch.dtype, layers: Sequence[int], text_layers: int | None = None) -> Any:
    from transformers import LlavaForConditionalGeneration

    from .llava import LlavaBackbone
    from .tiny_llava import build_tiny_processor

    tokenizer = build_word_tokenizer()
    processor = build_tiny_processor(tokenizer)  # CLIP preprocessing at 336, <image> -> 576 tokens
    config = llava_1_5_7b_config(tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    model = _model_on(LlavaForConditionalGeneration, config, device, dtype, text_layers)
    return LlavaBackbone(model, processor, name_or_path="random:llava-1.5-7b", layers=layers)


def _qwen2vl_2b(device: torch.device, dtype: torch.dtype, layers: Sequence[int], text_layers: int | None = None) -> Any:
    from transformers import Qwen2VLForConditionalGeneration

    from .qwen2vl import Qwen2VLBackbone
    from .tiny_qwen2vl import build_tiny_qwen_processor

    processor = build_tiny_qwen_processor()  # 672 x 672 -> 24 x 24 merged tokens
    model = _model_on(Qwen2VLForConditionalGeneration, qwen2vl_2b_config(processor.tokenizer), device, dtype,
                      text_layers)
    return Qwen2VLBackbone(model, processor, name_or_path="random:qwen2-vl-2b", layers=layers)


def _onevision_7b(device: torch.device, dtype: torch.dtype, layers: Sequence[int], text_layers: int | None = None) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    from .onevision import OnevisionBackbone
    from .tiny_onevision import build_tiny_onevision_processor

    processor = build_tiny_onevision_processor()  # SigLIP at 384, base resolution set by the adapter
    config = onevision_7b_config(processor.tokenizer)
    model = _model_on(LlavaOnevisionForConditionalGeneration, config, device, dtype, text_layers)
    return OnevisionBackbone(model, processor, name_or_path="random:llava-onevision-7b", layers=layers)


@dataclass(frozen=True)
class RealBackbone:
    """One ``--backbone`` of the cache benchmark.

    Attributes:
        checkpoint: the published checkpoint whose architecture it rebuilds.
        tiny: its tiny counterpart (a built-in ``--mllm`` name), run by ``--scale tiny``.
        layer: the layer the benchmark caches when ``--layers`` is not given.
        build: ``(device, dtype, layers, text_layers=None) -> adapter`` around the random-weight model.
    """

    checkpoint: str
    tiny: str
    layer: int
    build: Callable[..., Any]


#: ``--backbone`` name -> its row. The layers are the benchmark's own (BENCHMARKS.md's figures use them):
#: LLaVA-1.5's 14 and Qwen2-VL's 20 are also :data:`.defaults.MODEL_TYPE_DEFAULTS`' main layers; OneVision is
#: benchmarked at layer 20, where its preset (``onevision-7b``) caches 14.
REAL_BACKBONES: dict[str, RealBackbone] = {
    "llava-1.5": RealBackbone("llava-hf/llava-1.5-7b-hf", "tiny", 14, _llava_1_5_7b),
    "qwen2vl-2b": RealBackbone("Qwen/Qwen2-VL-2B-Instruct", "tiny-qwen2vl", 20, _qwen2vl_2b),
    "onevision-7b": RealBackbone("llava-hf/llava-onevision-qwen2-7b-ov-hf", "tiny-onevision", 20, _onevision_7b),
}


def build_real_mllm(backbone: str, device: torch.device, dtype: torch.dtype, layers: Sequence[int],
                    text_layers: int | None = None) -> Any:
    """The ``backbone`` adapter around its real-dimension model with random weights (seed 0), created directly
    on ``device`` in ``dtype`` (the processor and word-level tokenizer are the tiny presets'); ``text_layers``:
    only that many decoder layers (a build to layer k runs k of them and keeps k and k + 1 for the warm start)."""
    if backbone not in REAL_BACKBONES:
        raise ValueError(f"--backbone must be one of {', '.join(REAL_BACKBONES)}, got {backbone!r}")
    torch.manual_seed(0)
    return REAL_BACKBONES[backbone].build(device, dtype, layers, text_layers)
