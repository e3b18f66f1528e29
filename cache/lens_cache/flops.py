"""The FLOP model of stage 1: what building a feature cache costs, counted from the architecture.

``benchmarks/bench_cache.py`` divides these counts by a device's peak to get the images/s no
implementation can beat (the *ceiling*) and the build's achieved fraction of it (MFU).

**Conventions** (those of ``torch.utils.flop_counter``, which ``tests/test_bench_cache.py`` and
``tests/test_bench_cache_backbones.py`` compare against): 2 FLOPs per multiply-add of every matmul and
convolution; biases, norms, softmax, activations and rotary embeddings are not counted (each < 1% here).
Causal attention is counted as the (query, key) pairs it needs (``causal=False``: the full matrix, as an
eager kernel computes it).

**The parts** of one image and its queries:

- the vision tower (:func:`clip_vision_flops` for LLaVA-1.5, :func:`siglip_vision_flops` x
  :data:`ONEVISION_CROPS` for LLaVA-OneVision, :func:`qwen2vl_vision_flops` for Qwen2-VL) and its
  projector (:func:`llava_projector_flops`, :func:`qwen2vl_merger_flops`);
- the decoder (:func:`decoder_flops`: LLaMA / Qwen2 layers, grouped-query attention);
- SAM's image encoder (:func:`sam_encoder_flops` of a :class:`SamEncoderShape`: windowed blocks on the
  padded grid, decomposed relative positions).

**The two accountings** (:class:`Workload`, from :func:`backbone_workload`):

- *the build* (``lens_cache.build.build_cache``): per image, vision tower + projector + the shared prefix
  (system prompt and image tokens) through the decoder up to the deepest cached layer + SAM once; per
  query, its suffix tokens against the cached prefix, up to the same layer;
- *the naive baseline*: per query, vision tower + projector + every decoder layer over prefix + suffix
  + SAM again (no KV-cache sharing, no early stop).

:data:`PEAK_BF16_DENSE` and :func:`gpu_peak_flops` give the datasheet peak the counts are divided by.
Pure arithmetic on config objects: importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
