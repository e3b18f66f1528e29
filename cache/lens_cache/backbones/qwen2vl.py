"""Qwen2-VL (and Qwen2.5-VL) as a frozen LENS backbone: transformers' ``Qwen2VLForConditionalGeneration``
(``Qwen2_5_VLForConditionalGeneration``), registered as the adapter of ``model_type`` ``qwen2_vl``
(``qwen2_5_vl``) and as the preset ``--mllm tiny-qwen2vl`` (:mod:`.tiny_qwen2vl`).

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
- **Prefix sharing and early stop.** As for LLaVA: everything up to the last image token
  runs once per image (a batch of images in one forward) filling a KV cache; each question's
  suffix (``<|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n``) runs against its
  image's cache rows, right-padded; forward hooks record ``hidden_states[k]`` (decoder layer
  ``k - 1``'s raw output) and the deepest one stops the forward. The model is never modified.

The LENS head reads these states with plain 1-D positions (``lens_core.head``); its warm start
is Qwen2 decoder layers (``layer_type="qwen2"``: q/k/v biases, grouped-query attention).

Importing this module is cheap (the registry imports it): transformers is imported on first use.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from PIL import Image

from lens_cache.errors import BadSampleError, UsageError
from lens_core.geometry import SAM_IMAGE_SIZE

from . import register_mllm_adapter, register_mllm_preset
from .layer_capture import decoder_layer_state_dict, forward_until, plain, tensors_fingerprint
from .runtime import dtype_name, resolve_device, resolve_dtype

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
#: The question for a referring phrase (short query); sentences are asked as they are (as for LLaVA).
REFERRING_QUESTION_TEMPLATE = "Can you segment the {text} in this image?"
_QUESTION = "{question}"
_SENTINEL = "\x00LENS-QUESTION\x00"


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
    lm = model.model.language_model
    tensors = [
        lm.embed_tokens.weight,
        lm.layers[0].self_attn.q_proj.weight,
        lm.layers[len(lm.layers) // 2].mlp.down_proj.weight,
        lm.layers[-1].mlp.down_proj.weight,
        next(model.model.visual.merger.parameters()),
        next(model.model.visual.parameters()),
    ]
    return tensors_fingerprint(tensors, samples)


def configure_image_size(processor: Any, image_size: int) -> None:
    """Fix the processor's resize to one ``image_size`` x ``image_size`` square (min_pixels = max_pixels)."""
    pixels = int(image_size) * int(image_size)
    image_processor = processor.image_processor
    image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    for name in ("min_pixels", "max_pixels"):  # older processors keep them as attributes too
        if hasattr(image_processor, name):
            setattr(image_processor, name, pixels)


class Qwen2VLBackbone:
    """A frozen Qwen2-VL / Qwen2.5-VL that returns its layer-``k`` hidden states (see module docstring).

    Args:
        model: ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``,
            frozen by the caller (the loaders here do that); its device and dtype are used as they are.
        processor: its processor (tokenizer + image processor); its resize is set to ``image_size``.
        name_or_path: recorded in the identity.
        layers: cached layers, ``hidden_states`` indices in ``1..num_hidden_layers``.
        image_size: the square side the image is resized to (a multiple of patch x merge = 28);
            672 gives the 24 x 24 grid of the LENS head.
        prompt_template: ``{question}`` and ``<|vision_start|><|image_pad|><|vision_end|>`` once each;
            default: the processor's chat template, else :data:`QWEN2_VL_TEMPLATE`.
        question_template: the question for a short referring phrase (``{text}``).
        max_query_batch: most question suffixes run in one forward.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name_or_path: str,
        layers: Sequence[int] = (20,),
        image_size: int = DEFAULT_IMAGE_SIZE,
        prompt_template: str | None = None,
        question_template: str = REFERRING_QUESTION_TEMPLATE,
        max_query_batch: int = 32,
    ) -> None:
        from .llava import config_hash

        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path
        self.max_query_batch = max_query_batch
        self.model_type = str(model.config.model_type)
        if self.model_type not in BACKBONE_NAMES:
            _model_class(self.model_type)  # raises UnsupportedMllmError
        self._lm = model.model.language_model
        text_config = model.config.text_config
        self.num_hidden_layers = int(text_config.num_hidden_layers)
        self.layers = tuple(sorted({int(k) for k in layers}))
        if not self.layers or self.layers[0] < 1 or self.layers[-1] > self.num_hidden_layers:
            raise UsageError(f"--layers must lie in 1..{self.num_hidden_layers} (hidden_states indices), got {tuple(layers)}")
        self.hidden_size = int(text_config.hidden_size)
        self.image_token_id = int(model.config.image_token_id)
        self.device = model.device
        self.dtype = model.dtype
        # transformers >= 5.x names the KV cache ``cache`` (``past_key_values`` is deprecated there).
        self._cache_kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
        self.question_template = question_template
        self.prompt_template = prompt_template if prompt_template is not None else self._chat_prompt_template()
        if self.prompt_template.count(_QUESTION) != 1 or self.prompt_template.count(IMAGE_BLOCK) != 1:
            raise UsageError(f"prompt_template must contain {_QUESTION!r} and {IMAGE_BLOCK!r} exactly once each")

        vision = model.config.vision_config
        self.image_size = int(image_size)
        factor = int(vision.patch_size) * int(vision.spatial_merge_size)
        if self.image_size < factor or self.image_size % factor:
            raise UsageError(
                f"image_size {self.image_size} must be a multiple of patch_size x spatial_merge_size = {factor} "
                f"(672 gives the 24 x 24 grid)")
        self.grid_size = self.image_size // factor
        configure_image_size(processor, self.image_size)
        self.num_image_tokens, reference_ids = self._processor_ids(self.question_for("object", is_sentence=False))

        prefix, suffix = self._split_ids(self.question_for("object", is_sentence=False))
        if prefix + suffix != reference_ids:
            raise RuntimeError("tokenising the prompt with one <|image_pad|> and expanding it differs from the processor's ids")
        self._prefix_ids = prefix
        positions = [i for i, t in enumerate(prefix) if t == self.image_token_id]
        self._image_positions = torch.tensor(positions, device=self.device)
        self._text_before_image = positions[0]
        if positions != list(range(positions[0], len(prefix))):
            raise RuntimeError("the image tokens are not one run at the end of the prompt prefix")
        #: (3, P) M-RoPE ids of the prefix; a suffix's token j sits at _suffix_start + j on all three axes.
        self._prefix_positions = mrope_positions(self._text_before_image, self.grid_size, 0).to(self.device)
        self._suffix_start = self._text_before_image + self.grid_size
        #: Recorded by the extractor as the cache's image geometry (SAM's frame, resized for the MLLM).
        self.image_geometry = f"sam-pad-{SAM_IMAGE_SIZE}-to-{self.image_size}"
        self.identity: dict = {
            "backbone": BACKBONE_NAMES[self.model_type],
            "name_or_path": name_or_path,
            "config_hash": config_hash(model.config),
            "weights_fingerprint": weights_fingerprint(model),
            "layers": list(self.layers),
            "hidden_size": self.hidden_size,
            "num_image_tokens": self.num_image_tokens,
            "image_size": self.image_size,
            "compute_dtype": dtype_name(self.dtype),
            "prompt_template": self.prompt_template,
            "question_template": question_template,
        }

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
    ) -> "Qwen2VLBackbone":
        """Load a Qwen2-VL / Qwen2.5-VL checkpoint (local folder or HF-cache name), offline, never remote code.

        bfloat16 on CUDA, float32 on CPU unless ``dtype`` says otherwise.

        Raises:
            MllmCheckpointNotFoundError: no checkpoint there.
            UnsupportedMllmError: the checkpoint is not a Qwen2-VL / Qwen2.5-VL one.
        """
        from transformers import AutoProcessor

        from .mllm import load_mllm_config

        config = load_mllm_config(name_or_path)
        model_class = _model_class(config.model_type)
        dev = resolve_device(device)
        model = model_class.from_pretrained(name_or_path, dtype=resolve_dtype(dtype, dev), local_files_only=True)
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
        family: str = "qwen2_vl",
        **kwargs: Any,
    ) -> "Qwen2VLBackbone":
        """The tiny Qwen2-VL (``family="qwen2_5_vl"``: Qwen2.5-VL) built in code (see :mod:`.tiny_qwen2vl`)."""
        from .tiny_qwen2vl import build_tiny_qwen2vl

        dev = resolve_device(device)
        model, processor = build_tiny_qwen2vl(seed, family)
        model.to(device=dev, dtype=resolve_dtype(dtype, dev))
        name = "tiny-qwen2vl" if family == "qwen2_vl" else "tiny-qwen2.5vl"
        return cls(model, processor, name_or_path=name, layers=layers, **kwargs)

    # ------------------------------------------------------------------ prompt

    def _chat_prompt_template(self) -> str:
        """The checkpoint's chat template rendered for one user turn [image, question] + generation prompt."""
        if not getattr(self.processor, "chat_template", None):
            return QWEN2_VL_TEMPLATE
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text.count(_SENTINEL) != 1 or text.count(IMAGE_BLOCK) != 1:
            raise UsageError(
                "the checkpoint's chat template does not render one image and one question: pass prompt_template")
        return text.replace(_SENTINEL, _QUESTION)

    def question_for(self, text: str, is_sentence: bool) -> str:
        """The sentence itself for reasoning queries, else ``question_template`` with the phrase."""
        return text if is_sentence else self.question_template.format(text=text)

    def prompt_for(self, question: str) -> str:
        """The full prompt text with one ``<|image_pad|>``."""
        return self.prompt_template.replace(_QUESTION, question)

    def num_text_tokens(self, question: str) -> int:
        """L_t: the number of tokens after the last image token."""
        return len(self._split_ids(question)[1])

    def _check_question(self, question: str) -> None:
        """Refuse a question holding a special token (``<|image_pad|>``, ``<|im_end|>``, ...): the
        tokenizer would read it as that token, adding image slots or ending the turn.

        Raises:
            BadSampleError: it does (a build skips that query and lists it).
        """
        tokenizer = self.processor.tokenizer
        specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
        specials |= {_IMAGE_PAD, "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"}
        found = sorted(token for token in specials if token and token in question)
        if found:
            shown = question if len(question) <= 80 else question[:77] + "..."
            raise BadSampleError(f"the text contains {found[0]!r}, a special token of the tokeniser, not text: {shown!r}")

    def _split_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt, split after the last image token: (prefix, suffix).

        Tokenising with ONE ``<|image_pad|>`` and repeating its id equals the processor's
        expansion (special tokens split the text; checked in ``__init__``).

        Raises:
            BadSampleError: the question holds a special token, or the prompt would not fit the context.
        """
        self._check_question(question)
        ids = self.processor.tokenizer(self.prompt_for(question))["input_ids"]
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != 1:
            raise BadSampleError(f"expected one image token in the prompt, found {len(positions)}: {question!r}")
        at = positions[0]
        prefix, suffix = ids[:at] + [self.image_token_id] * self.num_image_tokens, ids[at + 1 :]
        context = int(self.model.config.text_config.max_position_embeddings)
        if len(prefix) + len(suffix) > context:
            raise BadSampleError(
                f"the prompt would be {len(prefix) + len(suffix)} tokens, more than the MLLM's context of {context}")
        return prefix, suffix

    def _image_token_count_error(self, count: int, grid_thw: Any) -> ValueError:
        g = self.grid_size
        return ValueError(
            f"the processor turns SAM's {SAM_IMAGE_SIZE} px frame into {count} image tokens (grid t,h,w "
            f"{[int(v) for v in grid_thw]}), not {g} x {g} = {g * g}: set image_size (the processor's "
            f"min_pixels = max_pixels = image_size^2, now {self.image_size}^2)")

    def _check_grid(self, image_grid_thw: torch.Tensor) -> None:
        """Every image must be one frame of (2g) x (2g) patches, i.e. g x g merged tokens."""
        merge = int(self.model.config.vision_config.spatial_merge_size)
        expected = [1, self.grid_size * merge, self.grid_size * merge]
        for row in image_grid_thw.tolist():
            if row != expected:
                count = row[0] * row[1] * row[2] // (merge * merge)
                raise self._image_token_count_error(count, row)

    def _processor_ids(self, question: str) -> tuple[int, list[int]]:
        """(L_i, input ids) as the processor builds them for ``question`` and a blank SAM frame.

        Raises:
            ValueError: L_i is not ``grid_size`` squared (one line, naming ``image_size``).
        """
        frame = Image.new("RGB", (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE))
        inputs = self.processor(text=self.prompt_for(question), images=frame, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        count = sum(t == self.image_token_id for t in ids)
        if count != self.grid_size**2:
            raise self._image_token_count_error(count, inputs["image_grid_thw"][0])
        self._check_grid(inputs["image_grid_thw"])
        return count, ids

    # ------------------------------------------------------------------ states

    def encode(self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]) -> list:
        """Hidden states for a batch of images (as the MLLM should see them: SAM's padded square)
        and the questions about each; one :class:`~.mllm.MllmStates` per image, float32 on the CPU."""
        from .mllm import MllmStates

        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        if not images:
            return []
        image_states, text_states = self._encode(images, questions)
        return [
            MllmStates(
                image_states={k: plain(v[b]) for k, v in image_states.items()},
                text_states=[{k: plain(v) for k, v in row.items()} for row in text_states[b]],
            )
            for b in range(len(images))
        ]

    @torch.inference_mode()
    def _encode(
        self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]
    ) -> tuple[dict[int, torch.Tensor], list[list[dict[int, torch.Tensor]]]]:
        from transformers import DynamicCache

        suffixes = []
        for qs in questions:
            for q in qs:
                prefix, suffix = self._split_ids(q)
                if prefix != self._prefix_ids:
                    raise RuntimeError(f"the prompt prefix changed with the question {q!r}: prefix sharing would be wrong")
                suffixes.append(suffix)

        # 1) the shared prefix of every image, once, in one batch (same length: no padding).
        batch = len(images)
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")
        self._check_grid(pixels["image_grid_thw"])
        prefix_ids = torch.tensor(self._prefix_ids, device=self.device).repeat(batch, 1)
        prefix_cache = DynamicCache(config=self.model.config)
        states = self._forward_until(
            input_ids=prefix_ids,
            pixel_values=pixels["pixel_values"].to(self.device, self.dtype),
            image_grid_thw=pixels["image_grid_thw"].to(self.device),
            position_ids=self._prefix_positions[:, None, :].expand(3, batch, -1),
            use_cache=True,
            **{self._cache_kw: prefix_cache},
        )
        image_states = {k: v[:, self._image_positions].float().cpu() for k, v in states.items()}  # (B, L_i, d)

        # 2) every question's suffix against its image's cache rows, right-padded, M-RoPE ids continued.
        owner = [b for b, qs in enumerate(questions) for _ in qs]
        text_states: list[list[dict[int, torch.Tensor]]] = [[] for _ in images]
        pad_id = self.processor.tokenizer.pad_token_id or 0  # any id: padded positions are never read
        deepest = self.layers[-1]
        for start in range(0, len(suffixes), self.max_query_batch):
            rows = range(start, min(start + self.max_query_batch, len(suffixes)))
            lengths = [len(suffixes[r]) for r in rows]
            width = max(lengths)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : lengths[i]] = torch.tensor(suffixes[r])
            gather = torch.tensor([owner[r] for r in rows], device=self.device)
            cache = DynamicCache(
                ddp_cache_data=[(layer.keys[gather], layer.values[gather]) for layer in prefix_cache.layers[:deepest]],
                config=self.model.config,
            )
            positions = (self._suffix_start + torch.arange(width, device=self.device)).expand(3, len(rows), width)
            states = self._forward_until(
                input_ids=ids.to(self.device), position_ids=positions, use_cache=True, **{self._cache_kw: cache}
            )
            states = {k: v.float().cpu() for k, v in states.items()}  # (R, S, d)
            for i, r in enumerate(rows):
                text_states[owner[r]].append({k: v[i, : lengths[i]] for k, v in states.items()})
        return image_states, text_states

    def _forward_until(self, **inputs: Any) -> dict[int, torch.Tensor]:
        """Run ``model.model`` until the deepest cached layer; layer -> (B, S, d) raw layer outputs."""
        return forward_until(self.model.model, self._lm.layers, self.layers, **inputs)

    # --------------------------------------------------------------- dialogue

    def generate(
        self,
        image: Image.Image | None,
        prompt_text: str,
        max_new_tokens: int = 64,
        *,
        use_template: bool = True,
        **generate_kwargs: Any,
    ) -> str:
        """The MLLM's greedy answer (dialogue, the agent's router / follow-ups).

        Args:
            image: shown as SAM's padded square (the cache's geometry), or ``None``.
            prompt_text: the user's message; with ``use_template`` it is put in the chat
                template (the image block dropped when there is no image), else used verbatim.
        """
        from .geometry import sam_frame

        if use_template:
            template = self.prompt_template if image is not None else self.prompt_template.replace(IMAGE_BLOCK, "")
            text = template.replace(_QUESTION, prompt_text)
        else:
            text = prompt_text
        images = [sam_frame(image).padded_image()] if image is not None else None
        inputs = self.processor(text=text, images=images, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        generate_kwargs.setdefault("do_sample", False)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    # ------------------------------------------------------------- warm start

    @property
    def text_config(self) -> Any:
        return self.model.config.text_config

    @property
    def head_sizes(self) -> dict:
        """The ``LensConfig`` fields of a head made of this decoder's layers: Qwen2 layers
        (q/k/v biases) with grouped-query attention."""
        config = self.text_config
        rope = getattr(config, "rope_parameters", None) or {}
        return {
            "hidden_size": int(config.hidden_size),
            "num_heads": int(config.num_attention_heads),
            "mlp_size": int(config.intermediate_size),
            "rms_norm_eps": float(config.rms_norm_eps),
            "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", 1e6))),
            "layer_type": "qwen2",
            "num_key_value_heads": int(config.num_key_value_heads or config.num_attention_heads),
        }

    def decoder_layer_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """CPU copy of ``language_model.layers[index]`` 's weights (``Qwen2DecoderLayer`` names);
        ``index`` is 0-based (layers k and k+1 warm-start a head on layer-k features)."""
        return decoder_layer_state_dict(self._lm.layers, index)


# ------------------------------------------------------------------ registry


def _from_pretrained(name_or_path: str, **kwargs: Any) -> Qwen2VLBackbone:
    return Qwen2VLBackbone.from_pretrained(name_or_path, **kwargs)


def _tiny(**kwargs: Any) -> Qwen2VLBackbone:
    return Qwen2VLBackbone.tiny(**kwargs)


def _tiny_qwen25(**kwargs: Any) -> Qwen2VLBackbone:
    return Qwen2VLBackbone.tiny(family="qwen2_5_vl", **kwargs)


register_mllm_adapter("qwen2_vl", _from_pretrained)
register_mllm_adapter("qwen2_5_vl", _from_pretrained)
register_mllm_preset("tiny-qwen2vl", _tiny)
register_mllm_preset("tiny-qwen2.5vl", _tiny_qwen25)
