"""LLaVA-OneVision as a frozen LENS backbone: transformers' ``LlavaOnevisionForConditionalGeneration``
(e.g. ``llava-hf/llava-onevision-qwen2-7b-ov-hf``: SigLIP 384 px / 14 px patches + Qwen2-7B), registered
as the adapter of ``model_type`` ``llava_onevision`` and as the built-in ``--mllm tiny-onevision``
(:mod:`.tiny_onevision`).

How the states are computed (and why they equal a plain forward's ``hidden_states``):

- **Two ways to show the image** (``image_tokens``, recorded in the store identity and the image
  geometry, so stores of the two are never mixed):

  ``"base"`` (default; the LENS authors' way, ``lens/models/backbones/llava_onevision_backbone.py`` with
  ``configs/llava_onevision_7b.yaml``: AnyRes bypassed): SAM's padded 1024 x 1024 square is resized
  (bicubic) to SigLIP's 384 px and normalised with the image processor's mean/std (0.5/0.5 for
  OneVision); the vision tower + projector run on it directly (``vision_feature_layer``,
  ``vision_feature_select_strategy`` of the config, as ``get_image_features`` selects them) and give
  exactly the 27 x 27 = 729 base-grid features, row-major, no AnyRes tile, no ``image_newline``. The
  prompt's ``<image>`` is expanded to 729 tokens and the features are scattered into the embeddings at
  those positions; the LM then runs on ``inputs_embeds``. SigLIP's 14 px patches (a valid convolution)
  cover only 27 x 14 = 378 of the 384 px, so grid cell (x, y) is SAM pixels
  ``(x + 0.5) * 14 * 1024 / 384`` and SAM's last 16 px are never seen (geometry ``sam-pad-1024-to-384``;
  the authors' heatmap treats the 27 cells as covering the whole frame). Two details of the authors'
  code are not reproduced: they resize the original image (longest side 384) and pad it with the
  processor mean (grey), where this adapter resizes SAM's zero-padded frame (black pad).

  ``"anyres"`` (the processor's own single-image path): the adapter sets ``image_grid_pinpoints =
  [[384, 384]]`` on the model's config and on the image processor (the only setting it changes; no
  weight is touched), resizes SAM's square to 378 px and zero-pads it right/bottom to 384
  (:meth:`OnevisionBackbone.model_image`; the processor's resize to 384 then changes nothing), so the
  27 x 27 patch tokens tile SAM's frame exactly (cell (x, y) = SAM pixels ``(x + 0.5) * 1024 / 27``,
  geometry ``sam-pad-1024-to-378-pad-384``). With that single pinpoint the processor still takes
  OneVision's AnyRes path, and ``LlavaOnevisionModel.pack_image_features`` lays the ``<image>`` run out as
  1485 = 729 + 27 x 28 tokens: first the **base** features (729, row-major: the grid this mode caches),
  then the one 1 x 1 "AnyRes tile", which is the same 384 x 384 resize of the same square (identical
  pixels, so identical features), packed as 27 rows of 27 tokens each followed by the learned
  ``image_newline`` (tests: ``tests/test_backbones_onevision.py``, against the vision tower + projector
  run separately). Only the first 729 positions of the run are cached; the 756 others stay in the
  prefix the questions attend to, exactly as in a plain forward. Any other token count (another
  pinpoint list, the ``default`` feature strategy that drops a patch, a processor whose
  ``num_image_tokens`` is not 729) is a one-line error naming the setting. Its identity has no
  ``image_tokens`` field (stores built before the setting existed keep theirs).
- **Prompt.** The checkpoint's own chat template rendered for one user turn ``[image, question]`` with
  the generation prompt; without one, llava-hf's: ``<|im_start|>user <image>\\n{question}<|im_end|>
  <|im_start|>assistant\\n``. Ids are the processor's (checked at construction).
- **Prefix sharing and early stop.** As for every adapter (:mod:`.prefix_sharing`): everything up to
  the last image token runs once per image filling a KV cache; each question's suffix runs against its
  image's cache rows, right-padded, with plain 1-D positions continuing from the prefix length (Qwen2's
  RoPE; no M-RoPE here); hooks stop the forward after the deepest cached layer. The model's weights
  and modules are never modified.

The LENS head's warm start is Qwen2 decoder layers (``layer_type="qwen2"``: q/k/v biases,
grouped-query attention).

Importing this module is cheap (the registry imports it): transformers is imported on first use.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from lens_cache.errors import UsageError
from lens_core.geometry import SAM_IMAGE_SIZE

from . import register_mllm_adapter, register_builtin_mllm
from .layer_capture import eager_attention, forward_until, last_token_image_attention, tensors_fingerprint
from lens_cache.questions import QuestionSet

from .prefix_sharing import REFERRING_QUESTION_TEMPLATE, PrefixSharingBackbone, head_sizes_for, language_model_tensors, tiny_question_set
from .runtime import resolve_device, resolve_dtype

BACKBONE_NAME = "llava-onevision"
MODEL_TYPE = "llava_onevision"
IMAGE_TOKEN = "<image>"
#: llava-hf's OneVision chat template rendered for one image and one question.
ONEVISION_TEMPLATE = "<|im_start|>user <image>\n{question}<|im_end|><|im_start|>assistant\n"
_SPECIALS = (IMAGE_TOKEN, "<video>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")
#: ``image_tokens``: the authors' 729 base-grid features fed straight to the LM (default), or the processor's
#: AnyRes layout (base grid + a 1 x 1 tile with newlines, 1485 tokens) of which the base grid is cached.
IMAGE_TOKEN_MODES = ("base", "anyres")
DEFAULT_IMAGE_TOKENS = "base"
#: The keyword ``_image_inputs`` hands ``_forward_until`` in the ``base`` mode (never reaches the model).
_BASE_PIXELS = "base_pixel_values"


def weights_fingerprint(model: Any, samples: int = 4096) -> str:
    """A cheap fingerprint of the weights (as :func:`lens_cache.backbones.llava.weights_fingerprint`):
    ~4k strided values of a few tensors of the language model, the projector, the vision tower and
    ``image_newline``, as bfloat16."""
    vision = [
        model.model.multi_modal_projector.linear_1.weight,
        next(model.model.vision_tower.parameters()),
        model.model.image_newline,
    ]
    return tensors_fingerprint([*language_model_tensors(model), *vision], samples)


def image_token_layout(grid: int) -> tuple[int, int]:
    """(image tokens in the LM sequence, of which the base grid) for one square image at one pinpoint:
    the base grid (grid^2) then the 1 x 1 AnyRes tile as ``grid`` rows of ``grid`` tokens + a newline."""
    return grid * grid + grid * (grid + 1), grid * grid


def configure_base_resolution(model: Any, processor: Any, side: int) -> None:
    """Restrict AnyRes to the base resolution: one ``side`` x ``side`` grid pinpoint, on the model's config
    (``get_image_features`` / ``pack_image_features`` read it) and on the image processor (crops and the
    processor's token count read it)."""
    pinpoints = [[int(side), int(side)]]
    model.config.image_grid_pinpoints = pinpoints
    processor.image_processor.image_grid_pinpoints = pinpoints


class OnevisionBackbone(PrefixSharingBackbone):
    """A frozen LLaVA-OneVision that returns its layer-``k`` hidden states (see module docstring and
    :class:`~.prefix_sharing.PrefixSharingBackbone` for the other arguments).

    Args:
        model: ``LlavaOnevisionForConditionalGeneration``. Its ``config.image_grid_pinpoints`` is set to
            the base resolution.
        processor: its ``LlavaOnevisionProcessor``; its image processor's pinpoints are set likewise.
        image_tokens: ``"base"`` (default, the LENS authors' way): SAM's square resized to 384 px, the vision
            tower + projector run directly, exactly the 729 base-grid tokens in the prompt; ``"anyres"``: the
            processor's single-image layout (1485 tokens), SAM's square at 378 px padded to 384, the first
            729 cached (see the module docstring).
        prompt_template: ``{question}`` and ``<image>`` once each; default: the processor's chat
            template, else :data:`ONEVISION_TEMPLATE`.
    """

    backbone_name = BACKBONE_NAME
    IMAGE_PLACEHOLDER = TEXT_ONLY_CUT = IMAGE_TOKEN
    DEFAULT_PROMPT_TEMPLATE = ONEVISION_TEMPLATE
    SPECIAL_TEXTS = _SPECIALS
    IMAGE_INPUT_KEYS = ("image_sizes",)

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name_or_path: str,
        layers: Sequence[int] = (14,),
        image_tokens: str = DEFAULT_IMAGE_TOKENS,
        prompt_template: str | None = None,
        question_template: str | None = None,
        question_set: "str | QuestionSet | None" = None,
        max_query_batch: int = 32,
    ) -> None:
        if image_tokens not in IMAGE_TOKEN_MODES:
            raise UsageError(f"image_tokens must be one of {list(IMAGE_TOKEN_MODES)}, got {image_tokens!r}")
        self.image_tokens = image_tokens
        model_type = str(model.config.model_type)
        if model_type != MODEL_TYPE:
            from .mllm import UnsupportedMllmError

            raise UnsupportedMllmError(f"not a LLaVA-OneVision checkpoint (model_type {model_type!r})")
        super().__init__(model, processor, name_or_path=name_or_path, layers=layers, prompt_template=prompt_template,
                         question_template=question_template, max_query_batch=max_query_batch,
                         question_set=question_set)

    def _configure_image(self) -> None:
        vision = self.model.config.vision_config
        self.image_size = int(vision.image_size)
        patch = int(vision.patch_size)
        #: Side of the cached grid: SigLIP's valid 14 px convolution over 384 px gives 27 patches (27 x 27 = 729).
        self.grid_size = self.image_size // patch
        configure_base_resolution(self.model, self.processor, self.image_size)  # also for generate()
        if self.image_tokens == "base":
            #: SAM's frame is resized to the whole ``image_size`` (the authors' way; SigLIP sees 378 of 384 px).
            self.frame_size = self.image_size
            self._sequence_image_tokens = self.num_image_tokens = self.grid_size**2
            self.image_geometry = f"sam-pad-{SAM_IMAGE_SIZE}-to-{self.image_size}"
            return
        #: The pixels those patches cover (27 x 14 = 378 of 384): SAM's frame is resized to this side and
        #: zero-padded to ``image_size``, so the grid spans SAM's frame exactly (the last 6 px are never seen).
        self.frame_size = self.grid_size * patch
        self._sequence_image_tokens, self.num_image_tokens = image_token_layout(self.grid_size)
        #: Recorded by the extractor as the cache's image geometry (SAM's frame, resized for the MLLM).
        self.image_geometry = (
            f"sam-pad-{SAM_IMAGE_SIZE}-to-{self.image_size}" if self.frame_size == self.image_size
            else f"sam-pad-{SAM_IMAGE_SIZE}-to-{self.frame_size}-pad-{self.image_size}")

    def _image_identity(self) -> dict:
        if self.image_tokens == "base":
            return {"image_size": self.image_size, "grid_size": self.grid_size, "image_tokens": "base"}
        return {  # the anyres identity as it was before image_tokens existed (its stores stay readable)
            "image_size": self.image_size,
            "grid_size": self.grid_size,
            "image_grid_pinpoints": [[self.image_size, self.image_size]],
        }

    def _weights_fingerprint(self) -> str:
        return weights_fingerprint(self.model)

    def _position_inputs(self, batch: int, start: int, length: int) -> dict[str, torch.Tensor]:
        """Plain 1-D positions (Qwen2's RoPE), given so the suffix's continue from the prefix length."""
        return {"position_ids": torch.arange(start, start + length, device=self.device).expand(batch, length)}

    @property
    def head_sizes(self) -> dict:
        """The ``LensConfig`` fields of a head made of this decoder's layers: Qwen2 layers (q/k/v biases)
        with grouped-query attention."""
        return head_sizes_for(self.text_config, "qwen2")

    def _layout_error(self, seen: str) -> ValueError:
        g = self.grid_size
        expected, _ = image_token_layout(g)
        return ValueError(
            f"the processor turns SAM's {SAM_IMAGE_SIZE} px frame into {seen}, not {expected} (the {g} x {g} = {g * g} "
            f"base grid + one {g} x {g + 1} AnyRes tile with newlines): set image_grid_pinpoints to "
            f"[[{self.image_size}, {self.image_size}]] on the model config and image processor, "
            f"vision_feature_select_strategy to 'full' and the processor's num_image_tokens to {g * g}")

    def _token_count_error(self, count: int, inputs: Any) -> ValueError:
        return self._layout_error(f"{count} image tokens from {int(inputs['pixel_values'].shape[1])} crops")

    def _check_pixels(self, pixels: Any) -> None:
        """Every image must be one square at one pinpoint: 2 crops (base + the 1 x 1 tile) of image_size px."""
        values, sizes = pixels["pixel_values"], pixels["image_sizes"]
        side = self.image_size
        if values.dim() != 5 or tuple(values.shape[1:]) != (2, 3, side, side):
            raise self._layout_error(f"crops of shape {tuple(values.shape[1:])} (expected 2 x 3 x {side} x {side})")
        for h, w in sizes.tolist():
            if h != w:
                raise ValueError(f"the MLLM must receive SAM's padded square frame, got a {h} x {w} image")

    def model_image(self, image: Image.Image) -> Image.Image:
        """SAM's padded square as this adapter shows it to the vision tower. ``base``: resized (bicubic) to
        ``image_size`` (384). ``anyres``: resized to ``frame_size`` (378) and zero-padded right/bottom to
        ``image_size`` (384), so the 27 x 27 patches tile SAM's frame exactly (cell (x, y) = SAM pixels
        ``(x + 0.5) * 1024 / 27``); the processor's own resize to 384 then changes nothing."""
        rgb = image.convert("RGB")
        if self.image_tokens == "base":
            if rgb.size == (self.image_size, self.image_size):
                return rgb
            return rgb.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if self.frame_size == self.image_size:
            return rgb
        canvas = Image.new("RGB", (self.image_size, self.image_size))
        canvas.paste(rgb.resize((self.frame_size, self.frame_size), Image.Resampling.BICUBIC), (0, 0))
        return canvas

    # ------------------------------------------------- the "base" way (authors')

    def base_pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 3, 384, 384) float32: SAM's squares resized to ``image_size`` (:meth:`model_image`), rescaled
        and normalised with the image processor's mean/std (OneVision's 0.5/0.5), one base tile each."""
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        rescale = float(getattr(ip, "rescale_factor", 1 / 255))
        arr = np.stack([np.asarray(self.model_image(im), dtype=np.float32) for im in images])
        return (torch.from_numpy(arr).permute(0, 3, 1, 2) * rescale - mean) / std

    def base_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, grid^2, d): the vision tower + projector on one base tile per image, the features selected
        as ``get_image_features`` selects them (``vision_feature_layer``, ``vision_feature_select_strategy``),
        without AnyRes packing (no tile, no ``image_newline``).

        Raises:
            ValueError: they are not grid^2 per image (one line, naming the setting).
        """
        inner = self.model.model
        cfg = self.model.config
        layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
        out = inner.vision_tower(pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        chosen = [out.hidden_states[i] for i in layer] if isinstance(layer, (list, tuple)) else [out.hidden_states[layer]]
        if strategy == "default":
            chosen = [h[:, 1:] for h in chosen]
        features = inner.multi_modal_projector(torch.cat(chosen, dim=-1))
        if features.shape[1] != self.num_image_tokens:
            raise ValueError(
                f"the vision tower gives {features.shape[1]} features per image, not {self.grid_size} x "
                f"{self.grid_size} = {self.num_image_tokens}: set vision_feature_select_strategy to 'full' "
                f"(now {strategy!r}) and image_size to SigLIP's {self.image_size}")
        return features

    def base_inputs_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, S, d) the LM's input embeddings of ``input_ids`` with :meth:`base_image_features` of row b's
        image scattered, in order, into row b's ``grid^2`` image-token positions."""
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        counts = mask.sum(dim=1).tolist()
        if any(c != self.num_image_tokens for c in counts):
            raise RuntimeError(f"expected {self.num_image_tokens} image tokens per row, got {counts}")
        features = self.base_image_features(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(mask[..., None], features)

    def _processor_ids(self, question: str) -> list[int]:
        if self.image_tokens != "base":
            return super()._processor_ids(question)
        # The authors expand the prompt's one <image> to grid^2 ids; the tokeniser must read the
        # expanded text the same way (checked at construction against _split_ids).
        text = self.prompt_for(question).replace(IMAGE_TOKEN, IMAGE_TOKEN * self._sequence_image_tokens)
        return self.processor.tokenizer(text)["input_ids"]

    def _image_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        if self.image_tokens != "base":
            return super()._image_inputs(images)
        return {_BASE_PIXELS: self.base_pixel_values(images)}

    def _forward_until(self, **inputs: Any) -> dict[int, torch.Tensor]:
        pixels = inputs.pop(_BASE_PIXELS, None)
        if pixels is not None:
            inputs["inputs_embeds"] = self.base_inputs_embeds(inputs.pop("input_ids"), pixels)
        return forward_until(self.model.model, self._lm.layers, self.layers, **inputs)

    @torch.inference_mode()
    def image_attention_by_layer(self, image: Image.Image, question: str) -> torch.Tensor:
        if self.image_tokens != "base":
            return super().image_attention_by_layer(image, question)
        prefix, suffix = self._split_ids(question)
        ids = torch.tensor([prefix + suffix], device=self.device)
        embeds = self.base_inputs_embeds(ids, self.base_pixel_values([image]))
        with eager_attention(self.model):
            out = self.model.model(inputs_embeds=embeds, **self._position_inputs(1, 0, ids.shape[1]),
                                   output_attentions=True, use_cache=False)
        return last_token_image_attention(out.attentions, self._grid_positions, self.grid_size)

    # ----------------------------------------------------------------- loading
    # ``from_pretrained`` (the base's): a LLaVA-OneVision checkpoint, offline, never remote code, bfloat16 on
    # CUDA, float32 on the CPU unless ``dtype`` says otherwise.

    MODEL_TYPES = (MODEL_TYPE,)
    FAMILY = "LLaVA-OneVision"
    DEFAULT_LAYERS = (14,)

    @classmethod
    def _model_class(cls, model_type: str) -> type:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    @classmethod
    def tiny(
        cls,
        *,
        layers: Sequence[int] = (14,),
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> "OnevisionBackbone":
        """The tiny LLaVA-OneVision built in code (see :mod:`.tiny_onevision`)."""
        from .tiny_onevision import build_tiny_onevision

        dev = resolve_device(device)
        model, processor = build_tiny_onevision(seed)
        model.to(device=dev, dtype=resolve_dtype(dtype, dev))
        return cls(model, processor, name_or_path="tiny-onevision", layers=layers, **tiny_question_set(kwargs))


# ------------------------------------------------------------------ registry


def _from_pretrained(name_or_path: str, **kwargs: Any) -> OnevisionBackbone:
    return OnevisionBackbone.from_pretrained(name_or_path, **kwargs)


def _tiny(**kwargs: Any) -> OnevisionBackbone:
    return OnevisionBackbone.tiny(**kwargs)


register_mllm_adapter(MODEL_TYPE, _from_pretrained)
register_builtin_mllm("tiny-onevision", _tiny)
