"""Typed configuration of the LENS model.

The presets in ``train/lens_train/training/presets/*.json`` (``paper``, ``official``, ``toy``, ``tiny``,
``qwen2vl-2b``) fill this dataclass, and a run's ``config.json`` records all of it
(``dataclasses.asdict``). Only ``hidden_size``, ``num_heads`` and ``mlp_size`` have no default.
Every preset states the other architecture and keypoint numbers too (``rms_norm_eps``,
``rope_theta``, ``grid_size``, ``heatmap_from``, ``max_keypoints``, ``nms_radius``,
``keypoint_min_ratio``, ``neighborhood``, ``descriptor_heads``, ``prompt_dim``,
``global_only_prob``), so their defaults only serve code that builds a LensConfig by hand
(tests, benchmarks). The presets leave to the defaults the fields they all share, and
:data:`PRESET_DEFAULTED` names them: the decoder-layer family (``layer_type``,
``num_key_value_heads``: LLaMA's, stated by ``qwen2vl-2b``), ``detach_peak``, the Table 2
switches (``use_keypoint_description``, ``use_global_description``: set by a run's overrides)
and ``mask_output_index``. Those defaults are also what a run recorded before the field
existed meant, so its ``config.json`` still loads as it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

HeatmapFrom = Literal["last", "mean"]
#: What the head reads: the paper's ``[F_i; F_t]`` or the authors' whole layer-k sequence (prefix first).
HeadInput = Literal["image_text", "full_sequence"]
HEAD_INPUTS = ("image_text", "full_sequence")
#: The descriptor's structure: this project's reading of the paper, or the authors' code.
DescriptorKind = Literal["paper", "official"]
DESCRIPTOR_KINDS = ("paper", "official")
#: How grid cells map to SAM's frame: cell centres ``(x + 0.5) / g`` or the authors' ``x / (g - 1)``.
Coords = Literal["cell_center", "align_corners"]
COORDS = ("cell_center", "align_corners")
#: The head's rotary positions: 1-D (LLaMA, Qwen2) or Qwen2-VL's 3-D multimodal RoPE.
Rope = Literal["1d", "mrope"]
ROPES = ("1d", "mrope")
#: The decoder-layer family the head mirrors (its backbone's), with transformers' parameter names.
LayerType = Literal["llama", "qwen2"]
LAYER_TYPES = ("llama", "qwen2")
#: the fields a preset may leave to their defaults (see the module docstring); a test holds every preset to it
PRESET_DEFAULTED = frozenset({"layer_type", "num_key_value_heads", "detach_peak", "use_keypoint_description",
                              "use_global_description", "mask_output_index", "descriptor_ffn_size",
                              "descriptor_encoder_ffn_size", "descriptor_dropout", "final_norm_eps", "rope",
                              "mrope_section"})
#: The switches where the paper's text and the authors' code differ (the fidelity table's rows 3-8 in
#: lens_core); every preset states each of them, so a run's config says which it trained.
FIDELITY_SWITCHES = ("head_input", "final_norm", "descriptor", "global_only_after_descriptor", "coords",
                     "keypoint_strict", "detach_subpixel", "cls_position_std", "train_iou_head")


def from_known_keys(cls: type, values: dict[str, Any], *, error: type[Exception] = ValueError) -> Any:
    """``cls(**values)`` for a dataclass, refusing keys it does not have (``error``, one line naming them and the
    known ones): the one rule of every typed config read from JSON (``LensConfig``, the training's ``TrainConfig``)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise error(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)


@dataclass(frozen=True)
class LensConfig:
    """Everything that shapes a LENS model (not its training).

    Attributes:
        hidden_size: d of the MLLM's hidden states (4096 for LLaVA-1.5-7B).
        num_heads: attention heads of the head's decoder layers (32).
        mlp_size: SwiGLU hidden size of the head's decoder layers (11008).
        rms_norm_eps: epsilon of the head's RMSNorms (LLaMA: 1e-5).
        rope_theta: rotary base (LLaMA: 10000; Qwen2-VL: 1e6).
        layer_type: the decoder layer the head mirrors, so the MLLM's layers k and k+1 load into it
            strictly: ``llama`` = ``LlamaDecoderLayer`` without biases (LLaVA-1.5's Vicuna);
            ``qwen2`` = ``Qwen2DecoderLayer`` / Qwen2-VL's decoder layer (q/k/v projections with
            bias, o_proj without). Default ``llama``: presets and checkpoints written before this
            field existed mean what they meant.
        num_key_value_heads: key/value heads of the attention (grouped-query attention when fewer
            than ``num_heads``, e.g. Qwen2-VL-2B's 2 for 12 query heads); None = ``num_heads``
            (multi-head attention, as LLaMA-7B).
        grid_size: side of the image-token grid (24 -> 576 tokens).
        heatmap_from: ``last`` = start-of-answer token's attention (official code),
            ``mean`` = average over all text tokens (paper, eq. 1).
        detach_peak: divide the map by its detached peak (official code). False lets the
            gradient through the peak too, so L_attn's gradient is that of the normalised map;
            from a random head the detached form flattens the map (RESULTS.md, *What learns on CPU*).
        max_keypoints: m, the most keypoints NMS keeps (16).
        nms_radius: Euclidean suppression radius in grid cells (4).
        keypoint_min_ratio: a keypoint is valid if its score >= this x the peak (0.4).
        neighborhood: p of the p x p neighbourhood sampled per keypoint (3).
        descriptor_heads: heads of the descriptor's cross- and self-attention.
        prompt_dim: SAM's prompt embedding size C, also the channels of its (C, 64, 64) image
            embeddings (256 for SAM, 64 for the toy SAM).
        global_only_prob: S1.4 dropout: probability, in training, of using only the
            global description (paper 0.5, official 0.9).
        use_keypoint_description: False = Table 2 "w/o keypoint description"
            (the global token alone prompts SAM).
        use_global_description: False = Table 2 "w/o global description"
            (the keypoint descriptions alone prompt SAM).
        mask_output_index: which of SAM's mask tokens is the answer (0 = single-mask).
        head_input: ``image_text`` = the head reads ``[F_i; F_t]`` with positions 0..L-1 (paper eq. 2);
            ``full_sequence`` = the whole layer-k sequence, the pre-image prefix (BOS, system prompt,
            ``USER:``) first, positions 0..P+L-1 (authors' ``GroundingHeadWithLlamaModel.forward``).
        final_norm: apply a fresh RMSNorm (``final_norm_eps``) to layer 2's output before the
            descriptor reads it (the authors' head is a ``LlamaModel``: ``last_hidden_state``).
        final_norm_eps: its epsilon (a default ``LlamaConfig``'s 1e-6 in the authors' code).
        descriptor: ``paper`` = pre-LN cross-attention and self-attention, one projection;
            ``official`` = post-LN cross-attention + FFN (GELU), one ``nn.TransformerEncoderLayer``
            over {d_i} U {f_s}, an MLP d -> d -> C (ReLU), 3 x 3 samples with border padding.
        descriptor_ffn_size: the official cross-attention block's FFN width (None = ``mlp_size``).
        descriptor_encoder_ffn_size: the official encoder layer's feed-forward width (torch's 2048).
        descriptor_dropout: the official encoder layer's dropout (torch's 0.1).
        global_only_after_descriptor: the S1.4 dropout removes keypoints from SAM's prompt only
            (authors), not also from the descriptor's self-attention (False).
        coords: ``cell_center`` maps cell x to ``(x + 0.5) / g`` of SAM's frame and upsamples the
            heatmap with ``align_corners=False``; ``align_corners`` maps it to ``x / (g - 1)`` and
            upsamples with ``align_corners=True`` (authors).
        keypoint_strict: a keypoint is valid if its score is ``>`` (authors) rather than ``>=``
            ``keypoint_min_ratio`` x the peak.
        detach_subpixel: True keeps the Newton step out of the graph; False lets the gradient flow
            from the descriptor's sampling positions into the heatmap (authors).
        cls_position_std: init std of the global token's learned position (authors' ``randn``: 1.0).
        train_iou_head: whether SAM's IoU prediction head is trained with the mask decoder (the
            authors freeze it).
        rope: ``1d`` = positions 0..L-1; ``mrope`` = Qwen2-VL's multimodal RoPE: text tokens (t, h, w)
            all equal to their index, image token (row, col) at (s, s + row, s + col) with s the image's
            first index, the text after it from s + max(g_h, g_w) on (transformers' ``get_rope_index``).
        mrope_section: frequency pairs per (t, h, w) component (Qwen2-VL: 16, 24, 24); None = that.
    """

    hidden_size: int
    num_heads: int
    mlp_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    layer_type: LayerType = "llama"
    num_key_value_heads: int | None = None
    grid_size: int = 24
    heatmap_from: HeatmapFrom = "last"
    detach_peak: bool = True
    max_keypoints: int = 16
    nms_radius: float = 4.0
    keypoint_min_ratio: float = 0.4
    neighborhood: int = 3
    descriptor_heads: int = 8
    prompt_dim: int = 256
    global_only_prob: float = 0.5
    use_keypoint_description: bool = True
    use_global_description: bool = True
    mask_output_index: int = 0
    head_input: HeadInput = "image_text"
    final_norm: bool = False
    final_norm_eps: float = 1e-6
    descriptor: DescriptorKind = "paper"
    descriptor_ffn_size: int | None = None
    descriptor_encoder_ffn_size: int = 2048
    descriptor_dropout: float = 0.1
    global_only_after_descriptor: bool = False
    coords: Coords = "cell_center"
    keypoint_strict: bool = False
    detach_subpixel: bool = True
    cls_position_std: float = 0.02
    train_iou_head: bool = True
    rope: Rope = "1d"
    mrope_section: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {list(LAYER_TYPES)}, got {self.layer_type!r}")
        if self.num_key_value_heads is not None and (
            self.num_key_value_heads < 1 or self.num_heads % self.num_key_value_heads
        ):
            raise ValueError(
                f"num_key_value_heads must divide num_heads {self.num_heads}, got {self.num_key_value_heads}"
            )
        if self.hidden_size % self.descriptor_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by descriptor_heads {self.descriptor_heads}")
        if self.heatmap_from not in ("last", "mean"):
            raise ValueError(f"heatmap_from must be 'last' or 'mean', got {self.heatmap_from!r}")
        if not (self.use_keypoint_description or self.use_global_description):
            raise ValueError("at least one of use_keypoint_description / use_global_description must be on")
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(v) for v in self.mrope_section))
            if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.hidden_size // self.num_heads // 2:
                raise ValueError(f"mrope_section must be 3 sizes summing to head_dim / 2 = "
                                 f"{self.hidden_size // self.num_heads // 2}, got {list(self.mrope_section)}")
        for name, value, allowed in (("head_input", self.head_input, HEAD_INPUTS), ("rope", self.rope, ROPES),
                                     ("descriptor", self.descriptor, DESCRIPTOR_KINDS),
                                     ("coords", self.coords, COORDS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if self.neighborhood < 1 or self.neighborhood % 2 == 0:
            raise ValueError(f"neighborhood must be odd and >= 1, got {self.neighborhood}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the head's attention (``num_key_value_heads``, or ``num_heads``)."""
        return self.num_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def descriptor_ffn(self) -> int:
        """The official descriptor's cross-attention FFN width (``descriptor_ffn_size`` or ``mlp_size``)."""
        return self.mlp_size if self.descriptor_ffn_size is None else self.descriptor_ffn_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size * self.grid_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LensConfig":
        return from_known_keys(cls, values)
