"""Stage-1 cache build at the real dimensions (an MLLM + SAM ViT-H, random weights, bf16) vs a naive baseline.

What it measures, on one device:

- **the build**: the real ``lens_cache.build.build_cache`` (prefix-shared KV cache, early stop
  after the deepest cached layer, SAM once per image, Zarr writes) over the first ``--images``
  images of a synthetic manifest into a temporary store -> images/s and queries/s;
- **the store**: bytes on disk per image (image-level arrays: layer states + SAM embedding) and
  per query (text states), split by array;
- **a naive baseline**: per query, one full forward of all decoder layers over image + prompt
  (``output_hidden_states``, no KV-cache sharing, no early stop, no logits) and SAM's image
  encoder run again -> queries/s on ``--baseline-queries`` queries;
- **the FLOP ceiling**: FLOPs of the same work counted from the architecture (matmuls and
  convolutions, 2 FLOPs per multiply-add; causal attention counted as the pairs it needs),
  divided by the device's peak dense bf16 FLOP/s -> the images/s no implementation can beat,
  and the build's achieved fraction of peak (MFU).

``--backbone`` picks the MLLM: ``llava-1.5`` (default: LLaVA-1.5-7B, CLIP ViT-L/14-336 + Vicuna-7B),
``qwen2vl-2b`` (Qwen2-VL-2B-Instruct at 672 px, 24 x 24 tokens) or ``onevision-7b`` (LLaVA-OneVision-7B,
SigLIP-384 + Qwen2-7B, base resolution only: 27 x 27 = 729 image tokens, the base grid alone as the authors feed it).
``--scale real`` (default) needs a CUDA GPU: the MLLM and SAM ViT-H are built in code with random
weights, directly in bf16 on the GPU (configs from memory of the public config.json files).
``--scale tiny`` runs the same code path with the backbone's tiny counterpart (``tiny``,
``tiny-qwen2vl``, ``tiny-onevision``) on the CPU in well under a minute (a smoke check; the CPU "peak"
is then a measured fp32 matmul rate, not a datasheet figure).

    python benchmarks/bench_cache.py --scale real --images 32 --backbone onevision-7b
    python benchmarks/bench_cache.py --scale tiny --images 2 --backbone qwen2vl-2b

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from lens_cache.cli import command_app

# ----------------------------------------------------------------------------- FLOP counting
#
# Conventions (those of torch.utils.flop_counter, which the tests compare against):
# 2 FLOPs per multiply-add of every matmul / convolution; biases, norms, softmax,
# activations and rotary embeddings are not counted (each < 1% here).

#: dense bf16 tensor-core peak, FLOP/s, from the vendors' datasheets (no sparsity)
PEAK_BF16_DENSE = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def gpu_peak_flops(device_name: str) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, table key) for a ``torch.cuda.get_device_name()``; (None, "") if unknown.

    The H100 SXM reports itself as ``NVIDIA H100 80GB HBM3``; the PCIe card as ``NVIDIA H100 PCIe``.
    """
    name = device_name.upper()
    if "H200" in name:
        return PEAK_BF16_DENSE["H200"], "H200"
    if "H100" in name:
        if "PCIE" in name:
            return PEAK_BF16_DENSE["H100 PCIe"], "H100 PCIe"
        if "NVL" in name:
            return PEAK_BF16_DENSE["H100 NVL"], "H100 NVL"
        return PEAK_BF16_DENSE["H100 SXM"], "H100 SXM"
    for key in ("A100", "L40S", "A10G", "L4"):
        if key in name:
            return PEAK_BF16_DENSE[key], key
    return None, ""


def decoder_layer_matmul_params(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Weights of one LLaMA decoder layer that multiply activations: q, k, v, o and the SwiGLU MLP."""
    q_o = 2 * hidden * num_heads * head_dim
    k_v = 2 * hidden * num_kv_heads * head_dim
    return q_o + k_v + 3 * hidden * intermediate


def decoder_flops(
    tokens: int,
    context: int,
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    causal: bool = True,
) -> int:
    """FLOPs of ``tokens`` new tokens through ``layers`` LLaMA decoder layers after ``context`` cached ones.

    Linear layers: 2 x params x tokens. Attention (QK^T and AV, summed over heads): 4 x heads x
    head_dim x (query, key) pairs; the new tokens see all ``context`` tokens and, causally, those
    before them and themselves (``causal=False``: all new tokens, as an eager full-matrix kernel computes).
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    head_dim = hidden // num_heads if head_dim is None else head_dim
    params = decoder_layer_matmul_params(hidden, intermediate, num_heads, num_kv_heads, head_dim)
    own = tokens * (tokens + 1) // 2 if causal else tokens * tokens
    pairs = tokens * context + own
    return layers * (2 * params * tokens + 4 * num_heads * head_dim * pairs)


def vit_encoder_flops(tokens: int, *, layers: int, hidden: int, intermediate: int) -> int:
    """A pre-norm ViT encoder (CLIP): q, k, v, out, fc1, fc2 and full (non-causal) attention over ``tokens``."""
    params = 4 * hidden * hidden + 2 * hidden * intermediate
    return layers * (2 * params * tokens + 4 * hidden * tokens * tokens)


def clip_vision_flops(vision_config: Any) -> int:
    """CLIP vision tower of a LLaVA: patch convolution + every encoder layer (all run; LLaVA reads layer -2)."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    embed = 2 * patches * 3 * vision_config.patch_size**2 * vision_config.hidden_size
    return embed + vit_encoder_flops(
        patches + 1,  # + CLS
        layers=vision_config.num_hidden_layers,
        hidden=vision_config.hidden_size,
        intermediate=vision_config.intermediate_size,
    )


def llava_projector_flops(num_image_tokens: int, vision_hidden: int, text_hidden: int) -> int:
    """LLaVA-1.5's two-layer MLP projector over the image tokens."""
    return 2 * num_image_tokens * (vision_hidden * text_hidden + text_hidden * text_hidden)


@dataclass(frozen=True)
class SamEncoderShape:
    """What SAM's ``ImageEncoderViT`` computes with (read from a module by :meth:`of`)."""

    img_size: int
    patch_size: int
    dim: int
    mlp_dim: int
    window_sizes: tuple[int, ...]  # per block; 0 = global attention
    rel_pos: tuple[bool, ...]  # per block
    out_chans: int
    neck_kernel: int

    @classmethod
    def of(cls, encoder: Any) -> SamEncoderShape:
        blocks = list(encoder.blocks)
        return cls(
            img_size=int(encoder.img_size),
            patch_size=int(encoder.patch_embed.proj.kernel_size[0]),
            dim=int(blocks[0].attn.qkv.in_features),
            mlp_dim=int(blocks[0].mlp.lin1.out_features),
            window_sizes=tuple(int(b.window_size) for b in blocks),
            rel_pos=tuple(bool(b.attn.use_rel_pos) for b in blocks),
            out_chans=int(encoder.neck[0].out_channels),
            neck_kernel=int(encoder.neck[2].kernel_size[0]),
        )


def sam_encoder_flops(shape: SamEncoderShape) -> int:
    """FLOPs of SAM's image encoder on one image (``segment_anything.modeling.ImageEncoderViT``).

    Windowed blocks pad the grid to a multiple of the window (64 -> 70 for 14), and q/k/v/proj
    run on the padded windows; the MLP runs on the unpadded grid. Decomposed relative
    positions add two einsums per block (query x relative-position table along h and w).
    """
    grid = shape.img_size // shape.patch_size
    tokens = grid * grid
    dim = shape.dim
    total = 2 * tokens * 3 * shape.patch_size**2 * dim  # patch embedding conv
    for window, rel_pos in zip(shape.window_sizes, shape.rel_pos, strict=True):
        if window > 0:
            padded = math.ceil(grid / window) * window
            windows, side = (padded // window) ** 2, window
        else:
            windows, side = 1, grid
        n = side * side  # tokens per attention call
        total += windows * 2 * (4 * dim * dim) * n  # qkv (3 dim^2) + proj (dim^2)
        total += windows * 4 * dim * n * n  # q k^T and attn v over all heads
        if rel_pos:
            total += windows * 2 * (2 * n * side * dim)  # rel_h and rel_w einsums
        total += 2 * (2 * dim * shape.mlp_dim) * tokens  # lin1 + lin2
    total += 2 * tokens * dim * shape.out_chans  # neck 1x1 conv
    total += 2 * tokens * shape.out_chans * shape.out_chans * shape.neck_kernel**2  # neck kxk conv
    return total


@dataclass(frozen=True)
class Workload:
    """FLOPs of one image and of each query, for the build and for the naive baseline."""

    prefix_tokens: int
    suffix_tokens: tuple[int, ...]
    vision: int
    projector: int
    sam: int
    build_prefix: int
    build_queries: tuple[int, ...]
    naive_queries: tuple[int, ...]

    @property
    def build_per_image(self) -> int:
        return self.vision + self.projector + self.build_prefix + self.sam


def qwen2vl_vision_flops(vision_config: Any, patches_per_side: int) -> int:
    """Qwen2-VL's vision tower on one still image of ``patches_per_side``^2 patches of 14 px: the Conv3d
    patch embedding (2 frames x 14 x 14 x 3 -> embed_dim), ``depth`` pre-norm blocks (q, k, v, proj, fc1, fc2;
    full attention over the image's patches). The 2 x 2 patch merger is counted as the projector."""
    tokens = patches_per_side**2
    d = vision_config.embed_dim
    kernel = vision_config.temporal_patch_size * vision_config.patch_size**2 * vision_config.in_channels
    return 2 * tokens * kernel * d + vit_encoder_flops(
        tokens, layers=vision_config.depth, hidden=d, intermediate=d * vision_config.mlp_ratio
    )


def qwen2vl_merger_flops(vision_config: Any, patches_per_side: int) -> int:
    """Qwen2-VL's patch merger: 2 x 2 patches concatenated (4 x embed_dim) -> MLP (4d -> 4d -> hidden) per token."""
    merged = patches_per_side**2 // vision_config.spatial_merge_size**2
    wide = vision_config.embed_dim * vision_config.spatial_merge_size**2
    return 2 * merged * (wide * wide + wide * vision_config.hidden_size)


def siglip_vision_flops(vision_config: Any) -> int:
    """SigLIP's vision tower on one crop: patch convolution + every encoder layer (no CLS; OneVision reads
    the last layer, no pooling head). 384 px / 14 px -> 27 x 27 patches (the valid convolution drops 6 px)."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    embed = 2 * patches * 3 * vision_config.patch_size**2 * vision_config.hidden_size
    return embed + vit_encoder_flops(
        patches,
        layers=vision_config.num_hidden_layers,
        hidden=vision_config.hidden_size,
        intermediate=vision_config.intermediate_size,
    )


#: Crops OneVision's vision tower sees per image at the base resolution: the base + the 1 x 1 AnyRes tile.
ONEVISION_CROPS = 2


def backbone_workload(
    mllm: Any, *, prefix_tokens: int, suffix_tokens: Sequence[int], deepest_layer: int, sam_flops: int
) -> Workload:
    """:func:`llava_workload` for any of the benchmarked adapters (LLaVA-1.5, Qwen2-VL, LLaVA-OneVision):
    the vision tower and projector FLOPs of its family, then the same decoder accounting."""
    config = mllm.model.config
    vision = config.vision_config
    if config.model_type == "llava":
        return llava_workload(config, prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens,
                              deepest_layer=deepest_layer, sam_flops=sam_flops)
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        if config.model_type == "qwen2_5_vl":
            raise ValueError("FLOPs of Qwen2.5-VL's windowed vision tower are not modelled here")
        side = mllm.grid_size * vision.spatial_merge_size
        vis, proj = qwen2vl_vision_flops(vision, side), qwen2vl_merger_flops(vision, side)
    elif config.model_type == "llava_onevision":
        tokens = ONEVISION_CROPS * (vision.image_size // vision.patch_size) ** 2
        vis = ONEVISION_CROPS * siglip_vision_flops(vision)
        proj = llava_projector_flops(tokens, vision.hidden_size, config.text_config.hidden_size)
    else:
        raise ValueError(f"no FLOP model for {config.model_type!r}")
    return decoder_workload(config.text_config, vision=vis, projector=proj, prefix_tokens=prefix_tokens,
                            suffix_tokens=suffix_tokens, deepest_layer=deepest_layer, sam_flops=sam_flops)


def llava_workload(config: Any, *, prefix_tokens: int, suffix_tokens: Sequence[int], deepest_layer: int, sam_flops: int) -> Workload:
    """FLOPs of the build (prefix once per image up to ``deepest_layer``; each suffix against it) and of the
    naive baseline (per query: vision tower, projector, all layers over prefix + suffix, SAM)."""
    vision = config.vision_config
    num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    vis = clip_vision_flops(vision)
    proj = llava_projector_flops(num_image_tokens, vision.hidden_size, config.text_config.hidden_size)
    return decoder_workload(config.text_config, vision=vis, projector=proj, prefix_tokens=prefix_tokens,
                            suffix_tokens=suffix_tokens, deepest_layer=deepest_layer, sam_flops=sam_flops)


def decoder_workload(
    text: Any, *, vision: int, projector: int, prefix_tokens: int, suffix_tokens: Sequence[int], deepest_layer: int,
    sam_flops: int,
) -> Workload:
    """The :class:`Workload` of a decoder ``text`` (LLaMA / Qwen2 layers) given the image side's FLOPs."""
    vis, proj = vision, projector
    kw = dict(
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None),
    )
    return Workload(
        prefix_tokens=prefix_tokens,
        suffix_tokens=tuple(suffix_tokens),
        vision=vis,
        projector=proj,
        sam=sam_flops,
        build_prefix=decoder_flops(prefix_tokens, 0, layers=deepest_layer, **kw),
        build_queries=tuple(decoder_flops(s, prefix_tokens, layers=deepest_layer, **kw) for s in suffix_tokens),
        naive_queries=tuple(
            vis + proj + sam_flops + decoder_flops(prefix_tokens + s, 0, layers=text.num_hidden_layers, **kw)
            for s in suffix_tokens
        ),
    )


# ----------------------------------------------------------------------------- models


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

    from lens_cache.backbones.tiny_llava import SPECIAL_TOKENS, build_tiny_tokenizer

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


#: ``--backbone`` names: the real-scale model each builds, and its tiny counterpart (``--scale tiny``).
BACKBONES = {"llava-1.5": "tiny", "qwen2vl-2b": "tiny-qwen2vl", "onevision-7b": "tiny-onevision"}
#: The cached layer when ``--layers`` is not given: each preset's main layer.
DEFAULT_LAYERS = {"llava-1.5": "14", "qwen2vl-2b": "20", "onevision-7b": "20"}


def build_real_mllm(backbone: str, device: torch.device, dtype: torch.dtype, layers: Sequence[int]) -> Any:
    """The ``backbone`` adapter around its real-dimension model with random weights, created directly on
    ``device`` in ``dtype`` (the processor and word-level tokenizer are the tiny presets')."""
    torch.manual_seed(0)
    if backbone == "llava-1.5":
        from transformers import LlavaForConditionalGeneration

        from lens_cache.backbones.llava import LlavaBackbone
        from lens_cache.backbones.tiny_llava import build_tiny_processor

        tokenizer = build_word_tokenizer()
        processor = build_tiny_processor(tokenizer)  # CLIP preprocessing at 336, <image> -> 576 tokens
        config = llava_1_5_7b_config(tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
        with torch.device(device):  # parameters are born on the GPU, in dtype: no fp32 copy on the CPU
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        model.eval().requires_grad_(False)
        return LlavaBackbone(model, processor, name_or_path="random:llava-1.5-7b", layers=layers)
    if backbone == "qwen2vl-2b":
        from transformers import Qwen2VLForConditionalGeneration

        from lens_cache.backbones.qwen2vl import Qwen2VLBackbone
        from lens_cache.backbones.tiny_qwen2vl import build_tiny_qwen_processor

        processor = build_tiny_qwen_processor()  # 672 x 672 -> 24 x 24 merged tokens
        config = qwen2vl_2b_config(processor.tokenizer)
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
        model.eval().requires_grad_(False)
        return Qwen2VLBackbone(model, processor, name_or_path="random:qwen2-vl-2b", layers=layers)
    if backbone == "onevision-7b":
        from transformers import LlavaOnevisionForConditionalGeneration

        from lens_cache.backbones.onevision import OnevisionBackbone
        from lens_cache.backbones.tiny_onevision import build_tiny_onevision_processor

        processor = build_tiny_onevision_processor()  # SigLIP at 384, base resolution set by the adapter
        config = onevision_7b_config(processor.tokenizer)
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
        model.eval().requires_grad_(False)
        return OnevisionBackbone(model, processor, name_or_path="random:llava-onevision-7b", layers=layers)
    raise ValueError(f"--backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")


def build_real_extractor(
    device: torch.device, dtype: torch.dtype, layers: Sequence[int], sam_variant: str, backbone: str = "llava-1.5"
) -> Any:
    """``backbone`` (LLaVA-1.5-7B by default) + SAM ``sam_variant`` with random weights, created directly on
    ``device`` in ``dtype``."""
    from segment_anything import sam_model_registry

    from lens_cache.backbones.extractor import LensFeatureExtractor

    mllm = build_real_mllm(backbone, device, dtype, layers)
    with torch.device(device):
        sam = sam_model_registry[sam_variant](checkpoint=None)
    return LensFeatureExtractor(mllm=mllm, sam=_random_sam_encoder(sam, sam_variant, device, dtype))


def _random_sam_encoder(sam: Any, variant: str, device: torch.device, dtype: torch.dtype) -> Any:
    """SamImageEncoder around random weights (there is no checkpoint file to hash for the identity)."""
    from lens_cache.backbones.runtime import dtype_name
    from lens_cache.backbones.sam import SamImageEncoder

    encoder = SamImageEncoder(sam, spec="tiny", device=device, dtype=dtype)  # "tiny" only to skip the file hash
    encoder.spec = f"{variant}:random"
    encoder.identity = {"variant": variant, "weights": "random-seed0", "compute_dtype": dtype_name(dtype)}
    return encoder


def build_tiny_extractor(device: torch.device, dtype: torch.dtype, layers: Sequence[int], backbone: str = "llava-1.5") -> Any:
    """The tiny counterpart of ``backbone`` (``tiny``, ``tiny-qwen2vl``, ``tiny-onevision``) + the tiny SAM."""
    from lens_cache.backbones import build_extractor

    return build_extractor(mllm=BACKBONES[backbone], sam="tiny", layers=layers, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- measurements


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cpu_matmul_flops(seconds: float = 0.5, size: int = 1024) -> float:
    """fp32 matmul FLOP/s of this CPU (the tiny scale's stand-in for a datasheet peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


def store_bytes(store: Any) -> dict[str, int]:
    """Bytes on disk per array of a finished store."""
    return {name: int(store.location.bytes_under(name)) for name in store.array_names()}


def naive_baseline(extractor: Any, manifest: Any, queries: int, layers: Sequence[int], device: torch.device) -> dict[str, Any]:
    """Per query: processor -> full forward of every decoder layer (hidden states of all), SAM again.

    The layer-``k`` states of the image and text tokens are copied to the CPU as the build does.
    Returns seconds per query (after one warm-up query) and how many were timed.
    """
    from lens_cache.backbones.geometry import sam_frame
    from lens_cache.block_job import load_image

    mllm, sam = extractor.mllm, extractor.sam
    rows = list(range(min(queries + 1, manifest.num_rows)))
    if len(rows) < 2:
        raise ValueError("the naive baseline needs at least 2 queries (one warm-up)")
    paths = manifest.column("image_path").to_pylist()
    heights, widths = manifest.column("height").to_pylist(), manifest.column("width").to_pylist()
    texts, sentences = manifest.column("text").to_pylist(), manifest.column("is_sentence").to_pylist()
    images = {}
    for r in rows:  # decoded beforehand: the build decodes in threads, off the critical path
        if paths[r] not in images:
            loaded = load_image(paths[r], (heights[r], widths[r]))
            if loaded.image is None:
                raise RuntimeError(f"naive baseline: {loaded.message}")
            images[paths[r]] = loaded.image

    def one(r: int) -> None:
        frame = sam_frame(images[paths[r]])
        prompt = mllm.prompt_for(mllm.question_for(texts[r], bool(sentences[r])))
        image = frame.padded_image()
        if hasattr(mllm, "model_image"):  # LLaVA-OneVision: SAM's square at 378 px in a 384 px crop
            image = mllm.model_image(image)
        inputs = mllm.processor(text=prompt, images=image, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(mllm.dtype)
        with torch.inference_mode():
            out = mllm.model.model(**inputs, output_hidden_states=True, use_cache=False)
            is_image = inputs["input_ids"][0] == mllm.image_token_id
            last_image = int(is_image.nonzero().max())
            for k in layers:
                states = out.hidden_states[k][0]
                states[is_image].float().cpu()
                states[last_image + 1 :].float().cpu()
        sam.embed([frame])

    one(rows[0])
    synchronize(device)
    start = time.perf_counter()
    for r in rows[1:]:
        one(r)
    synchronize(device)
    return {"queries": len(rows) - 1, "seconds": time.perf_counter() - start}


def say(text: str) -> None:
    print(f"[bench-cache] {text}", file=sys.stderr, flush=True)


class Scale(str, Enum):
    """``--scale``: the real dimensions on a GPU, or the tiny counterparts on the CPU."""

    real = "real"
    tiny = "tiny"


#: ``--backbone``: the names of :data:`BACKBONES`.
Backbone = Enum("Backbone", {name: name for name in BACKBONES}, type=str)


class SamVariant(str, Enum):
    """``--sam``: the SAM image encoder built at real scale."""

    vit_h = "vit_h"
    vit_l = "vit_l"
    vit_b = "vit_b"


app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


@app.command(help=__doc__.splitlines()[0])
def bench(
    scale: Annotated[Scale, typer.Option()] = Scale.real,
    images: Annotated[int, typer.Option(help="images of the manifest to cache (the measured build)")] = 32,
    split: Annotated[str, typer.Option(help="manifest spec (synthetic data is generated if absent)")] = "synthetic:val",
    data_root: Annotated[str | None, typer.Option(help="folder of the data (default: generated synthetic set)")] = None,
    backbone: Annotated[Backbone, typer.Option(
        help="MLLM: llava-1.5 (LLaVA-1.5-7B), qwen2vl-2b (Qwen2-VL-2B), onevision-7b (LLaVA-OneVision-7B); "
             "--scale tiny uses its tiny counterpart (tiny, tiny-qwen2vl, tiny-onevision)")] = Backbone["llava-1.5"],
    layers: Annotated[str | None, typer.Option(
        help="cached layers, comma-separated [llava-1.5: 14; qwen2vl-2b, onevision-7b: 20]")] = None,
    batch_size: Annotated[int, typer.Option(help="images per extract call (build_cache's default)")] = 4,
    warmup_images: Annotated[int, typer.Option(help="images of an untimed build first (kernels, allocator)")] = 2,
    baseline_queries: Annotated[int | None, typer.Option(help="timed naive queries [real: 8, tiny: 2]")] = None,
    sam: Annotated[SamVariant, typer.Option(help="SAM variant (real scale)")] = SamVariant.vit_h,
    device: Annotated[str | None, typer.Option(help="default: cuda for real, cpu for tiny")] = None,
    peak_tflops: Annotated[float | None, typer.Option(help="peak dense FLOP/s of the device, in TFLOP/s")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (tiny scale; default: half the cores)")] = None,
    out: Annotated[str | None, typer.Option(help="also write the JSON object to this file")] = None,
) -> dict[str, Any]:
    """Run the benchmark; prints progress to stderr and the JSON object to stdout, and returns it."""
    from lens_cache.backbones.runtime import cpu_threads
    from lens_cache.build import build_cache, first_images
    from lens_manifests import build_manifest

    scale, backbone, sam = scale.value, backbone.value, sam.value  # the choices as plain strings
    if images < 1:
        raise SystemExit("--images must be >= 1")
    layers = tuple(sorted({int(v) for v in (layers or DEFAULT_LAYERS[backbone]).split(",")}))
    device = torch.device(device or ("cuda" if scale == "real" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--scale real needs a CUDA GPU ({backbone} at its real size + SAM ViT-H in bf16); "
            "run --scale tiny for a CPU smoke check, or pass --device cpu to insist"
        )
    dtype = torch.bfloat16 if scale == "real" else torch.float32
    baseline_queries = baseline_queries or (8 if scale == "real" else 2)

    with cpu_threads(threads, device), tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        manifest_all = build_manifest(split, data_root)
        manifest = first_images(manifest_all, images)
        warm = first_images(manifest_all, max(1, min(warmup_images, images)))

        say(f"building the {scale} backbones on {device} ({str(dtype).removeprefix('torch.')})")
        started = time.perf_counter()
        if scale == "real":
            extractor = build_real_extractor(device, dtype, layers, sam, backbone)
        else:
            extractor = build_tiny_extractor(device, dtype, layers, backbone)
        synchronize(device)
        setup_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def build(table: Any, name: str) -> tuple[Any, float]:
            synchronize(device)
            t0 = time.perf_counter()
            store = build_cache(
                table, Path(tmp) / name, lambda: extractor, spec=split, batch_size=batch_size, progress=True
            )
            synchronize(device)
            return store, time.perf_counter() - t0

        if warmup_images > 0:
            say(f"warm-up build: {warm.num_rows} queries of {min(warmup_images, images)} image(s)")
            build(warm, "warmup")
        say(f"measured build: {images} image(s), {manifest.num_rows} queries")
        store, build_s = build(manifest, "store")
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        num_images, num_queries = store.num_images, store.num_queries
        sizes = store_bytes(store)

        say(f"naive baseline: {baseline_queries} queries, full forward + SAM each")
        naive = naive_baseline(extractor, manifest, baseline_queries, layers, device)
        if peak_tflops is not None:
            peak, peak_source = peak_tflops * 1e12, "--peak-tflops"
        elif device.type == "cuda":
            peak, key = gpu_peak_flops(torch.cuda.get_device_name(device))
            peak_source = f"datasheet dense bf16 ({key})" if peak else "unknown GPU: pass --peak-tflops"
        else:  # with the same thread count as the build
            peak, peak_source = measure_cpu_matmul_flops(), "measured fp32 1024^3 matmul on this CPU"

    # ---- FLOPs of the measured work and the device's ceiling
    mllm = extractor.mllm
    questions = [
        mllm.question_for(t, bool(s))
        for t, s in zip(manifest.column("text").to_pylist(), manifest.column("is_sentence").to_pylist(), strict=True)
    ]
    suffix = [mllm.num_text_tokens(q) for q in questions]
    workload = backbone_workload(
        mllm,
        prefix_tokens=len(mllm._prefix_ids),
        suffix_tokens=suffix,
        deepest_layer=layers[-1],
        sam_flops=sam_encoder_flops(SamEncoderShape.of(extractor.sam.sam.image_encoder)),
    )
    build_flops = num_images * workload.build_per_image + sum(workload.build_queries)
    naive_flops_per_query = sum(workload.naive_queries) / len(workload.naive_queries)


    build_ips, build_qps = num_images / build_s, num_queries / build_s
    naive_qps = naive["queries"] / naive["seconds"]
    queries_per_image = num_queries / num_images
    image_bytes = sum(v for k, v in sizes.items() if k.startswith("images/"))
    query_bytes = sum(v for k, v in sizes.items() if k.startswith("queries/"))
    text = mllm.model.config.text_config
    result: dict[str, Any] = {
        "bench": "cache_build",
        "date": datetime.date.today().isoformat(),
        "scale": scale,
        "backbone": backbone,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "mllm": f"{mllm.name_or_path} (d={text.hidden_size}, {text.num_hidden_layers} layers, "
        f"attn {mllm.model.config._attn_implementation})",
        "sam": extractor.sam.identity["variant"],
        "layers": list(layers),
        "split": split,
        "batch_size": batch_size,
        "images": num_images,
        "queries": num_queries,
        "prefix_tokens": workload.prefix_tokens,
        "mean_suffix_tokens": round(sum(suffix) / len(suffix), 2),
        "setup_s": round(setup_s, 2),
        "build_s": round(build_s, 3),
        "build_images_per_s": round(build_ips, 4),
        "build_queries_per_s": round(build_qps, 4),
        "naive_queries_timed": naive["queries"],
        "naive_s_per_query": round(naive["seconds"] / naive["queries"], 4),
        "naive_queries_per_s": round(naive_qps, 4),
        "naive_images_per_s": round(naive_qps / queries_per_image, 4),
        "speedup_queries_per_s": round(build_qps / naive_qps, 2),
        "bytes_per_image": round(image_bytes / num_images),
        "bytes_per_query": round(query_bytes / num_queries),
        "bytes_by_array": sizes,
        "flops_per_image": {
            "vision_tower": workload.vision,
            "projector": workload.projector,
            f"llm_prefix_to_layer_{layers[-1]}": workload.build_prefix,
            "sam_image_encoder": workload.sam,
            "total": workload.build_per_image,
        },
        "flops_per_query_mean": round(sum(workload.build_queries) / num_queries),
        "flops_build_total": build_flops,
        "flops_naive_per_query_mean": round(naive_flops_per_query),
        "peak_flops": peak,
        "peak_source": peak_source,
        "peak_memory_GiB": round(peak_mem, 2) if peak_mem is not None else None,
    }
    if peak:
        result["ceiling_images_per_s"] = round(peak * num_images / build_flops, 3)
        result["ceiling_queries_per_s"] = round(peak * num_queries / build_flops, 3)
        result["naive_ceiling_queries_per_s"] = round(peak / naive_flops_per_query, 3)
        result["build_mfu"] = round(build_flops / build_s / peak, 4)
        result["naive_mfu"] = round(naive_flops_per_query * naive_qps / peak, 4)
    say(
        f"build {build_ips:.3f} img/s, {build_qps:.3f} q/s; naive {naive_qps:.3f} q/s "
        f"({build_qps / naive_qps:.1f}x); {image_bytes / num_images / 2**20:.2f} MiB/image, "
        f"{query_bytes / num_queries / 2**10:.1f} KiB/query"
        + (f"; ceiling {result['ceiling_images_per_s']:.2f} img/s, MFU {result['build_mfu']:.1%}" if peak else "")
    )
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        Path(out).write_text(line + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark on the command line ``argv`` (default: ``sys.argv[1:]``) and return its JSON object.

    Unlike ``app()`` (the script's entry point), a bad command line raises Click's ``UsageError``
    rather than printing it and exiting 2.
    """
    return app(args=list(argv) if argv is not None else None, standalone_mode=False)


if __name__ == "__main__":
    app()
