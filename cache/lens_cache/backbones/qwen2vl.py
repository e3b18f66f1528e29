"""Qwen2-VL (and Qwen2.5-VL) as a frozen LENS backbone: transformers' ``Qwen2VLForConditionalGeneration``
(``Qwen2_5_VLForConditionalGeneration``), registered as the adapter of ``model_type`` ``qwen2_vl``
(``qwen2_5_vl``) and as the built-in ``--mllm tiny-qwen2vl`` (:mod:`.tiny_qwen2vl`).

How the states are computed (and why they equal a plain forward's ``hidden_states``):

- **Image.** The combined extractor hands over SAM's padded 1024 x 1024 square (as for
  LLaVA). The processor is fixed to one square size, ``image_size`` = 672 px
  (``min_pixels = max_pixels = 672 * 672``): 48 x 48 patches of 14 px, merged 2 x 2 into
  24 x 24 = 576 image tokens, row-major over the padded frame, so grid cell (x, y) is
  SAM pixels ``(x + 0.5) * 1024 / 24`` exactly as with LLaVA. Any other count is a
  one-line error naming ``image_size`` (the geometry is recorded as ``sam-pad-1024-to-672``).
- **Prompt.** The checkpoint's own chat template rendered for one user turn
  ``[image, question]`` with the generation prompt; without a chat template, Qwen2-VL's:
  ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
  <|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n``.
  Ids are the processor's (one ``<|image_pad|>`` per image token; checked at construction).
- **Positions (M-RoPE).** Qwen2-VL gives every token three position ids (temporal, height,
  width; ``Qwen2VLModel.get_rope_index``): text before the image counts 0..a-1; the image
  token at grid row r, column c gets (a, a + r, a + c); the text after it restarts at
  a + 24 (the grid side, not a + 576) and counts on, all three equal. The adapter passes
  these ids itself (:func:`mrope_positions`) for the prefix and, for each question's suffix,
  ``a + 24 + j``, so no state of the model (its ``rope_deltas``) is read or written.
- **Prefix sharing and early stop.** As for every adapter (:mod:`.prefix_sharing`): everything up
  to the last image token runs once per image filling a KV cache; each question's suffix
  (``<|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n``) runs against its image's
  cache rows, right-padded; hooks stop the forward after the deepest cached layer.

The LENS head's warm start is Qwen2 decoder layers (``layer_type="qwen2"``: q/k/v biases, grouped-query
attention). The ``qwen2vl-2b`` preset (the authors' run) has the head read the whole sequence (the stored
prefix, which ends with ``<|vision_start|>``, the 576 image tokens, the text) with these same M-RoPE ids
(``rope="mrope"``: ``lens_core.head.mrope_positions(P, 24, L_t)``, checked against ``get_rope_index`` on a
store in ``tests/test_cache_fidelity_backbones.py``); other presets may use 1-D positions.

Importing this module is cheap (the registry imports it): transformers is imported on first use.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lens_cache.errors import UsageError
from lens_core.geometry import SAM_IMAGE_SIZE

from . import register_mllm_adapter, register_builtin_mllm
from .layer_capture import tensors_fingerprint
from lens_cache.questions import QuestionSet

from .prefix_sharing import REFERRING_QUESTION_TEMPLATE, PrefixSharingBackbone, head_sizes_for, language_model_tensors, tiny_question_set
from .runtime import resolve_device, resolve_dtype

#: Backbone names (in the identity) by ``config.model_type``.
BACKBONE_NAMES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}
#: The square every image is resized to: 672 / 14 = 48 patches a side, merged 2 x 2 -> 24 x 24 = 576 tokens.
DEFAULT_IMAGE_SIZE = 672
#: The image in a Qwen2-VL prompt; the processor repeats ``<|image_pad|>`` once per image token.
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
_IMAGE_PAD = "<|image_pad|>"
#: Qwen2-VL-Instruct's prompt for one image and one question (its chat template's rendering).
QWEN2_VL_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n" + IMAGE_BLOCK + "{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _model_class(model_type: str):
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
    from .mllm import UnsupportedMllmError

    raise UnsupportedMllmError(f"not a Qwen2-VL / Qwen2.5-VL checkpoint (model_type {model_type!r})")


def mrope_positions(text_before: int, grid: int, text_after: int) -> torch.Tensor:
    """Qwen2-VL's (temporal, height, width) position ids of ``text_before`` text tokens, one image of
    ``grid`` x ``grid`` merged tokens (row-major) and ``text_after`` text tokens: (3, L) long.

    The same numbers as ``Qwen2VLModel.get_rope_index`` (one still image, ``grid_t`` = 1).
    """
    a = text_before
    before = torch.arange(a).expand(3, a)
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    image = torch.stack((torch.full((grid * grid,), a), a + rows, a + cols))
    after = (a + grid + torch.arange(text_after)).expand(3, text_after)
    return torch.cat((before, image, after), dim=1)


def weights_fingerprint(model: Any, samples: int = 4096) -> str:
    """A cheap fingerprint of the weights (as :func:`lens_cache.backbones.llava.weights_fingerprint`):
    ~4k strided values of a few tensors of the language model and the vision tower, as bfloat16."""
    vision = [next(model.model.visual.merger.parameters()), next(model.model.visual.parameters())]
    return tensors_fingerprint([*language_model_tensors(model), *vision], samples)


def configure_image_size(processor: Any, image_size: int) -> None:
    """Fix the processor's resize to one ``image_size`` x ``image_size`` square (min_pixels = max_pixels)."""
    pixels = int(image_size) * int(image_size)
    image_processor = processor.image_processor
    image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    for name in ("min_pixels", "max_pixels"):  # older processors keep them as attributes too
        if hasattr(image_processor, name):
            setattr(image_processor, name, pixels)


class Qwen2VLBackbone(PrefixSharingBackbone):
    """A frozen Qwen2-VL / Qwen2.5-VL that returns its layer-``k`` hidden states (see module docstring and
    :class:`~.prefix_sharing.PrefixSharingBackbone` for the other arguments).

    Args:
        model: ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``.
        processor: its processor; its resize is set to ``image_size``.
        image_size: the square side the image is resized to (a multiple of patch x merge = 28);
            672 gives the 24 x 24 grid of the LENS head.
        prompt_template: ``{question}`` and ``<|vision_start|><|image_pad|><|vision_end|>`` once each;
            default: the processor's chat template, else :data:`QWEN2_VL_TEMPLATE`.
    """

    IMAGE_PLACEHOLDER = TEXT_ONLY_CUT = IMAGE_BLOCK
    DEFAULT_PROMPT_TEMPLATE = QWEN2_VL_TEMPLATE
    SPECIAL_TEXTS = (_IMAGE_PAD, "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>")
    IMAGE_INPUT_KEYS = ("image_grid_thw",)

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name_or_path: str,
        layers: Sequence[int] = (20,),
        image_size: int = DEFAULT_IMAGE_SIZE,
        prompt_template: str | None = None,
        question_template: str | None = None,
        question_set: "str | QuestionSet | None" = None,
        max_query_batch: int = 32,
    ) -> None:
        self.model_type = str(model.config.model_type)
        if self.model_type not in BACKBONE_NAMES:
            _model_class(self.model_type)  # raises UnsupportedMllmError
        self.backbone_name = BACKBONE_NAMES[self.model_type]
        self.image_size = int(image_size)
        super().__init__(model, processor, name_or_path=name_or_path, layers=layers, prompt_template=prompt_template,
                         question_template=question_template, max_query_batch=max_query_batch,
                         question_set=question_set)

    def _configure_image(self) -> None:
        vision = self.model.config.vision_config
        factor = int(vision.patch_size) * int(vision.spatial_merge_size)
        if self.image_size < factor or self.image_size % factor:
            raise UsageError(
                f"image_size {self.image_size} must be a multiple of patch_size x spatial_merge_size = {factor} "
                f"(672 gives the 24 x 24 grid)")
        self.grid_size = self.image_size // factor
        self.num_image_tokens = self._sequence_image_tokens = self.grid_size**2
        configure_image_size(self.processor, self.image_size)
        #: Recorded by the extractor as the cache's image geometry (SAM's frame, resized for the MLLM).
        self.image_geometry = f"sam-pad-{SAM_IMAGE_SIZE}-to-{self.image_size}"

    def _image_identity(self) -> dict:
        return {"image_size": self.image_size}

    def _weights_fingerprint(self) -> str:
        return weights_fingerprint(self.model)

    def _position_inputs(self, batch: int, start: int, length: int) -> dict[str, torch.Tensor]:
        """M-RoPE ids (3, batch, length), passed so that no state of the model (its ``rope_deltas``) is read
        or written: the prefix's from :func:`mrope_positions`, a suffix's token j at a + grid + j."""
        after = start + length - len(self._prefix_ids)
        ids = mrope_positions(self._text_before_image, self.grid_size, after)[:, start:].to(self.device)
        return {"position_ids": ids[:, None, :].expand(3, batch, length)}

    @property
    def head_sizes(self) -> dict:
        """The ``LensConfig`` fields of a head made of this decoder's layers: Qwen2 layers (q/k/v biases)
        with grouped-query attention."""
        return head_sizes_for(self.text_config, "qwen2")

    def _grid_error(self, count: int, grid_thw: Any) -> ValueError:
        g = self.grid_size
        return ValueError(
            f"the processor turns SAM's {SAM_IMAGE_SIZE} px frame into {count} image tokens (grid t,h,w "
            f"{[int(v) for v in grid_thw]}), not {g} x {g} = {g * g}: set image_size (the processor's "
            f"min_pixels = max_pixels = image_size^2, now {self.image_size}^2)")

    def _token_count_error(self, count: int, inputs: Any) -> ValueError:
        return self._grid_error(count, inputs["image_grid_thw"][0])

    def _check_pixels(self, pixels: Any) -> None:
        """Every image must be one frame of (2g) x (2g) patches, i.e. g x g merged tokens."""
        merge = int(self.model.config.vision_config.spatial_merge_size)
        expected = [1, self.grid_size * merge, self.grid_size * merge]
        for row in pixels["image_grid_thw"].tolist():
            if row != expected:
                raise self._grid_error(row[0] * row[1] * row[2] // (merge * merge), row)

    # ----------------------------------------------------------------- loading
    # ``from_pretrained`` (the base's): a Qwen2-VL / Qwen2.5-VL checkpoint, offline, never remote code, bfloat16
    # on CUDA, float32 on the CPU unless ``dtype`` says otherwise.

    MODEL_TYPES = tuple(BACKBONE_NAMES)
    FAMILY = "Qwen2-VL / Qwen2.5-VL"
    DEFAULT_LAYERS = (20,)

    @classmethod
    def _model_class(cls, model_type: str) -> type:
        return _model_class(model_type)

    @classmethod
    def tiny(
        cls,
        *,
        layers: Sequence[int] = (20,),
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        family: str = "qwen2_vl",
        **kwargs: Any,
    ) -> "Qwen2VLBackbone":
        """The tiny Qwen2-VL (``family="qwen2_5_vl"``: Qwen2.5-VL) built in code (see :mod:`.tiny_qwen2vl`)."""
        from .tiny_qwen2vl import build_tiny_qwen2vl

        dev = resolve_device(device)
        model, processor = build_tiny_qwen2vl(seed, family)
        model.to(device=dev, dtype=resolve_dtype(dtype, dev))
        name = "tiny-qwen2vl" if family == "qwen2_vl" else "tiny-qwen2.5vl"
        return cls(model, processor, name_or_path=name, layers=layers, **tiny_question_set(kwargs))


# ------------------------------------------------------------------ registry


def _from_pretrained(name_or_path: str, **kwargs: Any) -> Qwen2VLBackbone:
    return Qwen2VLBackbone.from_pretrained(name_or_path, **kwargs)


def _tiny(**kwargs: Any) -> Qwen2VLBackbone:
    return Qwen2VLBackbone.tiny(**kwargs)


def _tiny_qwen25(**kwargs: Any) -> Qwen2VLBackbone:
    return Qwen2VLBackbone.tiny(family="qwen2_5_vl", **kwargs)


register_mllm_adapter("qwen2_vl", _from_pretrained)
register_mllm_adapter("qwen2_5_vl", _from_pretrained)
register_builtin_mllm("tiny-qwen2vl", _tiny)
register_builtin_mllm("tiny-qwen2.5vl", _tiny_qwen25)
register_builtin_mllm("tiny-qwen25vl", _tiny_qwen25)  # the spelling of the presets (qwen25vl-3b)
