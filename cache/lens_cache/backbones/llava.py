"""LLaVA-1.5 (transformers ``LlavaForConditionalGeneration``) as a frozen LENS backbone.

How the states are computed (and why they equal a plain forward's ``hidden_states``):

- **Prompt.** ``{system} USER: <image>\\n{question} ASSISTANT:`` (LLaVA-1.5's vicuna_v1
  template). Token ids are those ``LlavaProcessor`` produces (``<image>`` repeated once
  per image token, then the tokenizer; checked at construction); image tokens are
  found with ``input_ids == config.image_token_id``, never by position.
- **Image.** SAM's padded square as it is; the processor resizes it to 336: 24 x 24 patches of
  14 px, row-major over the padded frame (with the ``full`` feature strategy CLIP's CLS comes
  first, cached but outside the grid). Positions are the model's own (it counts on from its cache).
- **Prefix sharing and early stop** (BOS, system prompt, ``USER:``, 576 image tokens once per
  image, KV cache; hooks stop after the deepest cached layer): :mod:`.prefix_sharing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import LlavaForConditionalGeneration, PretrainedConfig

from lens_core.files import sha256_file

from .layer_capture import tensors_fingerprint
from .prefix_sharing import config_hash  # noqa: F401  (importable from here, as before it moved)
from lens_cache.questions import QuestionSet

from .prefix_sharing import REFERRING_QUESTION_TEMPLATE, PrefixSharingBackbone, language_model_tensors, tiny_question_set
from .runtime import no_loading_bar, resolve_device, resolve_dtype

#: LLaVA-1.5's conversation template as the LENS authors render it: LISA's ``conv_vicuna_v1``
#: (LISA/model_lisa/llava/conversation.py, ``SeparatorStyle.TWO``, an empty assistant message): the system
#: prompt, one space, ``USER: <image>\n{question}``, one space, ``ASSISTANT:``. ``<image>`` stands for the
#: image tokens. (The toy LLaVA keeps the template it was trained with: :data:`.toy.TOY_PROMPT_TEMPLATE`.)
VICUNA_V1_TEMPLATE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: <image>\n{question} ASSISTANT:"
)

BACKBONE_NAME = "llava-1.5"
_IMAGE_PLACEHOLDER = "<image>"


def weights_fingerprint(model: LlavaForConditionalGeneration, samples: int = 4096) -> str:
    """A cheap fingerprint of the weights: ~4k strided values of a few tensors, hashed.

    Values are rounded to bfloat16 first, so a float16 checkpoint loaded as bfloat16 (GPU)
    or float32 (CPU) gives the same fingerprint.
    """
    vision = [model.model.multi_modal_projector.linear_1.weight, next(model.model.vision_tower.parameters())]
    return tensors_fingerprint([*language_model_tensors(model), *vision], samples)


class LlavaBackbone(PrefixSharingBackbone):
    """A frozen LLaVA-1.5 that returns its layer-``k`` hidden states (see module docstring and
    :class:`~.prefix_sharing.PrefixSharingBackbone` for the arguments).

    Args:
        prompt_template: must contain ``<image>`` and ``{question}`` once each.
    """

    backbone_name = BACKBONE_NAME
    IMAGE_PLACEHOLDER = _IMAGE_PLACEHOLDER
    TEXT_ONLY_CUT = _IMAGE_PLACEHOLDER + "\n"
    DEFAULT_PROMPT_TEMPLATE = VICUNA_V1_TEMPLATE

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        processor: Any,
        *,
        name_or_path: str,
        layers: Sequence[int] = (14,),
        prompt_template: str = VICUNA_V1_TEMPLATE,
        question_template: str | None = None,
        question_set: "str | QuestionSet | None" = None,
        max_query_batch: int = 32,
    ) -> None:
        super().__init__(model, processor, name_or_path=name_or_path, layers=layers, prompt_template=prompt_template,
                         question_template=question_template, max_query_batch=max_query_batch,
                         question_set=question_set)

    def _configure_image(self) -> None:
        vision = self.model.config.vision_config
        #: Side of the image-token grid (24 for LLaVA-1.5: 336 px / 14 px patches), row-major over the padded frame.
        self.grid_size = int(vision.image_size) // int(vision.patch_size)
        # With the ``full`` feature strategy CLIP's CLS is an image token too (the first, outside the grid).
        cls_token = 0 if self.model.config.vision_feature_select_strategy == "default" else 1
        self.num_image_tokens = self._sequence_image_tokens = self.grid_size**2 + cls_token

    def _token_count_error(self, count: int, inputs: Any) -> ValueError:
        """The processor's expansion of ``<image>`` must match the vision tower's patches (576 for LLaVA-1.5)."""
        return ValueError(
            f"the processor expands <image> to {count} tokens but the vision tower gives {self.num_image_tokens}")

    def _weights_fingerprint(self) -> str:
        return weights_fingerprint(self.model)

    # ----------------------------------------------------------------- loading
    # ``from_pretrained`` (the base's): a llava-hf checkpoint, offline, never remote code, bfloat16 on CUDA,
    # float32 on the CPU unless ``dtype`` says otherwise; refused unless its model_type is ``llava``.

    MODEL_TYPES = ("llava",)
    FAMILY = "LLaVA"
    DEFAULT_LAYERS = (14,)

    @classmethod
    def _model_class(cls, model_type: str) -> type:
        return LlavaForConditionalGeneration

    @classmethod
    def _complete_processor(cls, processor: Any, config: PretrainedConfig) -> None:
        _complete_processor(processor, config)

    @classmethod
    def tiny(
        cls,
        *,
        layers: Sequence[int] = (14,),
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> "LlavaBackbone":
        """The tiny LLaVA built in code (see :mod:`.tiny_llava`)."""
        from .tiny_llava import build_tiny_llava

        dev = resolve_device(device)
        model, processor = build_tiny_llava(seed)
        model.to(device=dev, dtype=resolve_dtype(dtype, dev))
        return cls(model, processor, name_or_path="tiny", layers=layers, **tiny_question_set(kwargs))

    @classmethod
    def toy(
        cls,
        *,
        layers: Sequence[int] = (3,),
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        folder: str | Path | None = None,
        **kwargs: Any,
    ) -> "LlavaBackbone":
        """The project's toy LLaVA (:mod:`.toy`; pretrained by ``lens_toy``), loaded from its shipped llava-hf folder.

        Loaded by :meth:`from_pretrained` like any checkpoint; its identity names it ``toy``
        (not the folder's path) and adds the sha256 of its weights file. Its default prompt is the one
        its conversations were trained on (:data:`.toy.TOY_PROMPT_TEMPLATE`), not LLaVA-1.5's.
        """
        from .toy import TOY_LLAVA_DIR, TOY_PROMPT_TEMPLATE, WEIGHTS_DIR

        kwargs.setdefault("prompt_template", TOY_PROMPT_TEMPLATE)  # the template it was trained with
        tiny_question_set(kwargs)  # and the question it was trained with (``single``)

        path = Path(folder) if folder is not None else WEIGHTS_DIR / TOY_LLAVA_DIR
        if not (path / "model.safetensors").is_file():
            from .mllm import MllmCheckpointNotFoundError

            raise MllmCheckpointNotFoundError(
                f"toy LLaVA weights not found in {path}: check out the repository's "
                "cache/lens_cache/backbones/toy_weights or remake them with `lens-toy pretrain-llava` + `lens-toy export`")
        with no_loading_bar():
            backbone = cls.from_pretrained(str(path), layers=layers, device=device, dtype=dtype, **kwargs)
        backbone.identity["name_or_path"] = "toy"
        backbone.identity["weights_sha256"] = sha256_file(path / "model.safetensors")
        return backbone

    # ------------------------------------------------------------------ prompt

    def _fill(self, template: str, question: str) -> str:
        """The vicuna template is a format string (``{{`` stands for a brace)."""
        return template.format(question=question)

    def _image_texts(self) -> set[str]:
        return {_IMAGE_PLACEHOLDER, self.processor.image_token}

    def _refused_texts(self) -> set[str]:
        """LLaVA's rule: the tokeniser's special tokens (and the image token, :meth:`_image_texts`)."""
        return set(self.processor.tokenizer.all_special_tokens)

    def _prompt_ids(self, question: str) -> list[int]:
        """``LlavaProcessor`` repeats ``<image>`` once per image token in the text, then tokenises:
        here ONE image token (the processor's), expanded by :meth:`_split_ids`."""
        text = self.prompt_for(question).replace(_IMAGE_PLACEHOLDER, self.processor.image_token)
        return self.processor.tokenizer(text, add_special_tokens=True)["input_ids"]


def _complete_processor(processor: Any, config: PretrainedConfig) -> None:
    """Fill the expansion settings that old llava-hf processor configs lack (patch_size=None).

    Newer llava-hf snapshots save ``patch_size=14, num_additional_image_tokens=1,
    vision_feature_select_strategy="default"``; older ones left the expansion to the
    model, which transformers 5 no longer does.
    """
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = config.vision_config.patch_size
        processor.num_additional_image_tokens = 1  # CLIP's CLS token
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
