"""LLaVA-OneVision as a frozen LENS backbone: transformers' ``LlavaOnevisionForConditionalGeneration``
(e.g. ``llava-hf/llava-onevision-qwen2-7b-ov-hf``: SigLIP 384 px / 14 px patches + Qwen2-7B), registered
as the adapter of ``model_type`` ``llava_onevision`` and as the built-in ``--mllm tiny-onevision``
(:mod:`.tiny_onevision`).

How the states are computed (and why they equal a plain forward's ``hidden_states``):

- **Image: base resolution only.** The combined extractor hands over SAM's padded 1024 x 1024 square
  (as for LLaVA). OneVision normally tiles it (AnyRes, up to 6 x 6 crops of 384 px chosen from
  ``image_grid_pinpoints``). The adapter sets ``image_grid_pinpoints = [[384, 384]]`` on the model's
  config and on the image processor (the only setting it changes; no weight is touched), so the image
  is seen once at 384 x 384. SigLIP's 14 px patches (a valid convolution) cover only 27 x 14 = 378 of
  those 384 px, so the adapter resizes SAM's square to 378 px and zero-pads it right/bottom to 384
  (:meth:`OnevisionBackbone.model_image`; the processor's resize to 384 then changes nothing): the
  27 x 27 = 729 patch tokens tile SAM's frame exactly, row-major, grid cell (x, y) = SAM pixels
  ``(x + 0.5) * 1024 / 27`` (geometry ``sam-pad-1024-to-378-pad-384``). Feeding the 1024 square
  straight to the processor would leave its last 16 px unseen and shift the far cells by up to
  0.4 cell.
- **Which image tokens are the grid.** With that single pinpoint the processor still takes OneVision's
  single-image (AnyRes) path, and ``LlavaOnevisionModel.pack_image_features`` lays the ``<image>`` run
  out as 1485 = 729 + 27 x 28 tokens: first the **base** features (729, row-major: the grid this
  adapter caches), then the one 1 x 1 "AnyRes tile", which is the same 384 x 384 resize of the same
  square (identical pixels, so identical features), packed as 27 rows of 27 tokens each followed by
  the learned ``image_newline`` (tests: ``tests/test_backbones_onevision.py``, against the vision
  tower + projector run separately). Only the first 729 positions of the run are cached; the 756 others
  stay in the prefix the questions attend to, exactly as in a plain forward. Any other token count
  (another pinpoint list, the ``default`` feature strategy that drops a patch, a processor whose
  ``num_image_tokens`` is not 729) is a one-line error naming the setting. (OneVision's multi-image
  path, base features + one newline, is not used: the processor takes it only for prompts with
  several images, so a plain forward of one image could not reproduce it.)
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

import torch
from PIL import Image

from lens_core.geometry import SAM_IMAGE_SIZE

from . import register_mllm_adapter, register_builtin_mllm
from .layer_capture import tensors_fingerprint
from .prefix_sharing import REFERRING_QUESTION_TEMPLATE, PrefixSharingBackbone, head_sizes_for, language_model_tensors
from .runtime import resolve_device, resolve_dtype

BACKBONE_NAME = "llava-onevision"
MODEL_TYPE = "llava_onevision"
IMAGE_TOKEN = "<image>"
#: llava-hf's OneVision chat template rendered for one image and one question.
ONEVISION_TEMPLATE = "<|im_start|>user <image>\n{question}<|im_end|><|im_start|>assistant\n"
_SPECIALS = (IMAGE_TOKEN, "<video>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


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
        layers: Sequence[int] = (20,),
        prompt_template: str | None = None,
        question_template: str = REFERRING_QUESTION_TEMPLATE,
        max_query_batch: int = 32,
    ) -> None:
        model_type = str(model.config.model_type)
        if model_type != MODEL_TYPE:
            from .mllm import UnsupportedMllmError

            raise UnsupportedMllmError(f"not a LLaVA-OneVision checkpoint (model_type {model_type!r})")
        super().__init__(model, processor, name_or_path=name_or_path, layers=layers, prompt_template=prompt_template,
                         question_template=question_template, max_query_batch=max_query_batch)

    def _configure_image(self) -> None:
        vision = self.model.config.vision_config
        self.image_size = int(vision.image_size)
        patch = int(vision.patch_size)
        #: Side of the cached grid: SigLIP's valid 14 px convolution over 384 px gives 27 patches (27 x 27 = 729).
        self.grid_size = self.image_size // patch
        #: The pixels those patches cover (27 x 14 = 378 of 384): SAM's frame is resized to this side and
        #: zero-padded to ``image_size``, so the grid spans SAM's frame exactly (the last 6 px are never seen).
        self.frame_size = self.grid_size * patch
        self._sequence_image_tokens, self.num_image_tokens = image_token_layout(self.grid_size)
        configure_base_resolution(self.model, self.processor, self.image_size)
        #: Recorded by the extractor as the cache's image geometry (SAM's frame, resized for the MLLM).
        self.image_geometry = (
            f"sam-pad-{SAM_IMAGE_SIZE}-to-{self.image_size}" if self.frame_size == self.image_size
            else f"sam-pad-{SAM_IMAGE_SIZE}-to-{self.frame_size}-pad-{self.image_size}")

    def _image_identity(self) -> dict:
        return {
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
        """SAM's padded square as this adapter feeds it to the processor: resized to ``frame_size`` (378)
        and zero-padded right/bottom to ``image_size`` (384), so the 27 x 27 patches tile SAM's frame
        exactly (cell (x, y) = SAM pixels ``(x + 0.5) * 1024 / 27``); the processor's own resize to 384
        then changes nothing."""
        rgb = image.convert("RGB")
        if self.frame_size == self.image_size:
            return rgb
        canvas = Image.new("RGB", (self.image_size, self.image_size))
        canvas.paste(rgb.resize((self.frame_size, self.frame_size), Image.Resampling.BICUBIC), (0, 0))
        return canvas

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        layers: Sequence[int] = (20,),
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> "OnevisionBackbone":
        """Load a LLaVA-OneVision checkpoint (local folder or HF-cache name), offline, never remote code.

        bfloat16 on CUDA, float32 on CPU unless ``dtype`` says otherwise.

        Raises:
            MllmCheckpointNotFoundError: no checkpoint there.
            UnsupportedMllmError: the checkpoint is not a LLaVA-OneVision one.
        """
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

        from .mllm import UnsupportedMllmError, load_mllm_config

        config = load_mllm_config(name_or_path)
        if config.model_type != MODEL_TYPE:
            raise UnsupportedMllmError(
                f"{name_or_path} is not a LLaVA-OneVision checkpoint (model_type {config.model_type!r})")
        dev = resolve_device(device)
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype, dev), local_files_only=True)
        processor = AutoProcessor.from_pretrained(name_or_path, local_files_only=True)
        model.to(dev).eval().requires_grad_(False)
        return cls(model, processor, name_or_path=str(name_or_path), layers=layers, **kwargs)

    @classmethod
    def tiny(
        cls,
        *,
        layers: Sequence[int] = (20,),
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
        return cls(model, processor, name_or_path="tiny-onevision", layers=layers, **kwargs)


# ------------------------------------------------------------------ registry


def _from_pretrained(name_or_path: str, **kwargs: Any) -> OnevisionBackbone:
    return OnevisionBackbone.from_pretrained(name_or_path, **kwargs)


def _tiny(**kwargs: Any) -> OnevisionBackbone:
    return OnevisionBackbone.tiny(**kwargs)


register_mllm_adapter(MODEL_TYPE, _from_pretrained)
register_builtin_mllm("tiny-onevision", _tiny)
