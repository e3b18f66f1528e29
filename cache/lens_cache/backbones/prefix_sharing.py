"""A frozen MLLM whose image prefix runs once per image: what every adapter does the same way.

Why the states equal a plain forward's ``hidden_states``:

- **Prefix sharing.** A prompt is ``prefix`` (everything up to the last image token) + ``suffix`` (the
  question and the start of the answer). The prefix is the same for every question, and a causal
  decoder's states there cannot depend on what follows. So the prefix of a batch of images runs once,
  filling a KV cache (:class:`~transformers.DynamicCache`); then the suffixes of all questions run
  against that cache, its rows gathered per question. Suffixes are right-padded: under the causal mask
  a valid token never attends to a later (padding) position, and positions continue from the prefix,
  so valid rows are exact.
- **Early stop.** Forward hooks record ``hidden_states[k]`` (decoder layer ``k - 1``'s raw output); the
  deepest one stops the forward (:func:`~.layer_capture.forward_until`), so deeper layers and the final
  norm never run. The model is never modified, nothing gets gradients.
- **Token ids.** The prompt's ids, split after the last image token, come from
  :class:`~.prompt_tokens.PromptTokens` (the prompt rule, the base of the class below), checked
  against the processor's own at construction.

:class:`PrefixSharingBackbone` holds that loop, the identity, dialogue, the attention probe and the
warm start; :class:`~.prompt_tokens.PromptTokens` the prompt rule; :class:`~.pretrained.PretrainedFamily`
the loading of a checkpoint (``from_pretrained``: offline, never remote code, the family checked, dtype
and device chosen, frozen). An adapter (:mod:`.llava`, :mod:`.qwen2vl`, :mod:`.onevision`) adds what
differs between families: its image geometry and processor settings, its image inputs and position ids,
its model class and the model types it loads, and its registration.

Importing this module is cheap (the registry imports the adapters): transformers is imported on first use.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image

from lens_cache.errors import UsageError
from lens_cache.questions import SINGLE_QUESTION_TEMPLATE, QuestionSet, question_set as resolve_question_set
from lens_core.geometry import SAM_IMAGE_SIZE

from .layer_capture import (
    decoder_layer_state_dict,
    eager_attention,
    forward_until,
    last_token_image_attention,
    plain,
)
from .pretrained import PretrainedFamily
from .prompt_tokens import QUESTION, PromptTokens
from .runtime import dtype_name

if TYPE_CHECKING:
    from .mllm import MllmStates

#: The question for a referring phrase of the ``single`` question set (sentences asked as they are); the
#: adapters' default set is ``authors`` (:mod:`lens_cache.questions`).
REFERRING_QUESTION_TEMPLATE = SINGLE_QUESTION_TEMPLATE

#: Most bytes of prefix key/value cache copied for one forward of question suffixes. Every suffix row gets
#: its own copy (attention appends its keys to it), and a store caches every template of every query: at
#: LLaVA-1.5-7B's dimensions in float32 a row's copy to layer 14 is 280 MB, and one image's three queries
#: (9 to 15 template rows) were 2.5-4.2 GB of copies: what stopped a float32 build on a 24 GB machine
#: (BENCHMARKS.md). One forward of a few rows is cheap next to the image's; the budget costs no speed.
SUFFIX_CACHE_BYTES = 1 << 30

# Config keys that describe where/how a checkpoint was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
     "_attn_implementation_autoset", "_commit_hash", "architectures", "output_hidden_states",
     "output_attentions", "return_dict", "use_cache"}
)


def config_hash(config: Any) -> str:
    """sha256 of an MLLM config (text + vision + projector settings), sorted keys, volatile keys dropped.

    Hashing the weights of a 14 GB checkpoint would be too slow; see :func:`language_model_tensors`.
    """

    def stable(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: stable(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [stable(v) for v in value]
        return value

    text = json.dumps(stable(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def language_model_tensors(model: Any) -> list[torch.Tensor]:
    """The language-model tensors every adapter's weights fingerprint samples first (embeddings, the first
    layer's q_proj, the middle and last layers' down_proj); the adapter adds its vision side."""
    lm = model.model.language_model
    return [
        lm.embed_tokens.weight,
        lm.layers[0].self_attn.q_proj.weight,
        lm.layers[len(lm.layers) // 2].mlp.down_proj.weight,
        lm.layers[-1].mlp.down_proj.weight,
    ]


def head_sizes_for(config: Any, layer_type: str = "llama") -> dict:
    """The ``LensConfig`` fields of a LENS head made of the decoder layers ``config`` describes.

    ``llama``: RoPE theta 10000 unless the config names one; ``num_key_value_heads`` only with grouped-query
    attention, so LLaVA-1.5's records stay as they were (absent = multi-head). ``qwen2`` (q/k/v biases):
    theta 1e6 unless named, and ``layer_type`` and ``num_key_value_heads`` always.
    """
    rope = getattr(config, "rope_parameters", None) or {}
    default_theta = 10000.0 if layer_type == "llama" else 1e6
    sizes = {
        "hidden_size": int(config.hidden_size),
        "num_heads": int(config.num_attention_heads),
        "mlp_size": int(config.intermediate_size),
        "rms_norm_eps": float(config.rms_norm_eps),
        "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", default_theta))),
    }
    if layer_type == "llama":
        if getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads):
            sizes["num_key_value_heads"] = int(config.num_key_value_heads)
    else:
        sizes["layer_type"] = layer_type
        sizes["num_key_value_heads"] = int(config.num_key_value_heads or config.num_attention_heads)
    return sizes


def tiny_question_set(kwargs: dict) -> dict:
    """The tiny and toy models keep the ``single`` question set unless told otherwise (their stores and
    the toy demo stay what they were)."""
    if kwargs.get("question_template") is None:
        kwargs.setdefault("question_set", "single")
    return kwargs


class PrefixSharingBackbone(PromptTokens, PretrainedFamily):
    """A frozen MLLM that returns its layer-``k`` hidden states (see module docstring).

    An adapter sets the class attributes below and :class:`~.prompt_tokens.PromptTokens`'s
    (``IMAGE_PLACEHOLDER``, ``DEFAULT_PROMPT_TEMPLATE``, ``SPECIAL_TEXTS``), ``backbone_name``, and
    implements :meth:`_configure_image`, :meth:`_token_count_error`, :meth:`_weights_fingerprint` and (for
    :meth:`~.pretrained.PretrainedFamily.from_pretrained`) ``MODEL_TYPES``, ``FAMILY``, ``DEFAULT_LAYERS`` and
    ``_model_class``; the other hooks default to what needs nothing family-specific.

    Args:
        model: the ``*ForConditionalGeneration`` model, frozen by the caller (the loaders do that);
            its device and dtype are used as they are.
        processor: its processor (tokenizer + image processor).
        name_or_path: recorded in the identity.
        layers: cached layers, ``hidden_states`` indices in ``1..num_hidden_layers``.
        prompt_template: ``{question}`` and :attr:`IMAGE_PLACEHOLDER` once each; ``None``: the processor's
            chat template, else :attr:`DEFAULT_PROMPT_TEMPLATE`.
        question_template: a one-template rule (the phrase's question, ``{text}``; sentences as they are),
            as adapters took it before question sets existed; None: ``question_set``.
        question_set: the :class:`~lens_cache.questions.QuestionSet` (or a built-in name, ``authors`` /
            ``single``); None: :attr:`DEFAULT_QUESTION_SET`. Variant 0 (evaluation) is :meth:`question_for`,
            every variant :meth:`questions_for` (a store caches them all).
        max_query_batch: most question suffixes run in one forward (fewer where their copies of the
            prefix's key/value cache would pass :data:`SUFFIX_CACHE_BYTES`).
    """

    #: ``identity["backbone"]`` (an adapter may set it per instance).
    backbone_name: str
    #: What :meth:`generate` cuts from the template when there is no image.
    TEXT_ONLY_CUT: str
    #: Image-processor outputs the model takes besides ``pixel_values`` (image sizes, patch grids).
    IMAGE_INPUT_KEYS: tuple[str, ...] = ()
    #: The question set when none is given: the LENS authors' (the tiny and toy models pass ``single``).
    DEFAULT_QUESTION_SET = "authors"

    #: Side of the image-token grid, row-major over SAM's padded frame (set by :meth:`_configure_image`).
    grid_size: int
    #: L_i, the image tokens cached per image (set by :meth:`_configure_image`).
    num_image_tokens: int

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name_or_path: str,
        layers: Sequence[int],
        prompt_template: str | None,
        question_template: str | None = None,
        max_query_batch: int,
        question_set: str | QuestionSet | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path
        self.max_query_batch = max_query_batch
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
        self.question_set = resolve_question_set(
            question_set, question_template=question_template, default=self.DEFAULT_QUESTION_SET)
        #: The short phrase's evaluation template (the one recorded before question sets existed).
        self.question_template = self.question_set.short.evaluation
        self.prompt_template = prompt_template if prompt_template is not None else self._chat_prompt_template()
        if self.prompt_template.count(QUESTION) != 1 or self.prompt_template.count(self.IMAGE_PLACEHOLDER) != 1:
            raise UsageError(
                f"prompt_template must contain {QUESTION!r} and {self.IMAGE_PLACEHOLDER!r} exactly once each")
        self._configure_image()

        reference_ids = self._processor_ids(self.question_for("object", is_sentence=False))
        prefix, suffix = self._split_ids(self.question_for("object", is_sentence=False))
        if prefix + suffix != reference_ids:  # must hold for any tokenizer that splits on special tokens
            raise RuntimeError(
                f"tokenising the prompt with one {getattr(processor, 'image_token', 'image token')} and expanding it "
                "differs from the processor's ids")
        self._prefix_ids = prefix
        positions = [i for i, t in enumerate(prefix) if t == self.image_token_id]
        if positions != list(range(positions[0], len(prefix))):
            raise RuntimeError("the image tokens are not one run at the end of the prompt prefix")
        self._text_before_image = positions[0]
        #: Every image token of the prompt (OneVision's: its base grid, then the AnyRes tile, not cached).
        self._image_positions = torch.tensor(positions, device=self.device)
        #: The cached image tokens: the first ``num_image_tokens`` of the run.
        self._cached_positions = self._image_positions[: self.num_image_tokens]
        #: The grid, row-major: the last grid_size**2 cached tokens (a LLaVA with the ``full`` feature
        #: strategy caches CLIP's CLS first, outside the grid).
        self._grid_positions = self._cached_positions[-self.grid_size**2 :]
        self.identity: dict = {
            "backbone": self.backbone_name,
            "name_or_path": name_or_path,
            "config_hash": config_hash(model.config),
            "weights_fingerprint": self._weights_fingerprint(),
            "layers": list(self.layers),
            "hidden_size": self.hidden_size,
            "num_image_tokens": self.num_image_tokens,
            **self._image_identity(),
            "compute_dtype": dtype_name(self.dtype),
            "prompt_template": self.prompt_template,
            **self.question_set.identity(),
        }

    # ------------------------------------------------------------ adapter hooks

    def _configure_image(self) -> None:
        """Set ``grid_size``, ``num_image_tokens`` and ``_sequence_image_tokens`` (and the processor
        settings the geometry needs), before the prompt's ids are checked against the processor."""
        raise NotImplementedError

    def _token_count_error(self, count: int, inputs: Any) -> ValueError:
        """The one-line error when the processor gives ``count`` image tokens, not ``_sequence_image_tokens``,
        naming the setting to change."""
        raise NotImplementedError

    def _weights_fingerprint(self) -> str:
        """The adapter's cheap weights fingerprint (``identity["weights_fingerprint"]``)."""
        raise NotImplementedError

    def _image_identity(self) -> dict:
        """Identity fields of the adapter's image geometry (after ``num_image_tokens``)."""
        return {}

    def model_image(self, image: Image.Image) -> Image.Image:
        """SAM's padded square as the adapter hands it to the processor (as it is, unless overridden)."""
        return image

    def _check_pixels(self, pixels: Any) -> None:
        """Refuse image-processor outputs that would not give the cached grid (nothing to check by default)."""

    def _position_inputs(self, batch: int, start: int, length: int) -> dict[str, torch.Tensor]:
        """``position_ids`` of prompt tokens ``start .. start + length - 1`` for ``batch`` rows, where the
        family needs them given; none by default (the model counts on from its cache)."""
        return {}

    # ------------------------------------------------------------ image inputs

    def _processor_ids(self, question: str) -> list[int]:
        """Input ids as the processor itself builds them for ``question`` and a blank SAM frame.

        Raises:
            ValueError: its image-token count is not the adapter's (one line, naming the setting).
        """
        frame = self.model_image(Image.new("RGB", (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE)))
        inputs = self.processor(text=self.prompt_for(question), images=frame, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        count = sum(t == self.image_token_id for t in ids)
        if count != self._sequence_image_tokens:
            raise self._token_count_error(count, inputs)
        self._check_pixels(inputs)
        return ids

    def _image_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """The model's image inputs for a batch of SAM squares, on its device."""
        pixels = self.processor.image_processor(images=[self.model_image(i) for i in images], return_tensors="pt")
        self._check_pixels(pixels)
        return {
            "pixel_values": pixels["pixel_values"].to(self.device, self.dtype),
            **{key: pixels[key].to(self.device) for key in self.IMAGE_INPUT_KEYS},
        }

    # ------------------------------------------------------------------ states

    def encode(self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]) -> list[MllmStates]:
        """Hidden states for a batch of images and the questions about each.

        ``images`` are given as the MLLM should see them (the combined extractor passes SAM's padded
        square).

        Returns:
            one :class:`~.mllm.MllmStates` per image: layer -> (L_i, d) image states, per question,
            layer -> (L_t, d) text states, and layer -> (P, d) states of the :attr:`prefix_token_ids`
            (taken from the prefix forward, row 0 of the batch, shared by every image); float32 on the CPU.
        """
        from .mllm import MllmStates

        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        if not images:
            return []
        image_states, text_states, prefix_states = self._encode(images, questions)
        prefix = {k: plain(v) for k, v in prefix_states.items()}
        return [
            MllmStates(
                image_states={k: plain(v[b]) for k, v in image_states.items()},
                text_states=[{k: plain(v) for k, v in row.items()} for row in text_states[b]],
                prefix_states=prefix,
            )
            for b in range(len(images))
        ]

    @property
    def prefix_token_ids(self) -> list[int]:
        """The P token ids of the prompt before its first image token (BOS, system prompt, ``USER:``; with
        Qwen2-VL's template also ``<|vision_start|>``): the same for every image and question, and, the
        decoder being causal, so are their states (:attr:`~.mllm.MllmStates.prefix_states`)."""
        return list(self._prefix_ids[: self._text_before_image])

    @torch.inference_mode()
    def _encode(
        self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]
    ) -> tuple[dict[int, torch.Tensor], list[list[dict[int, torch.Tensor]]], dict[int, torch.Tensor]]:
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
        length = len(self._prefix_ids)
        prefix_ids = torch.tensor(self._prefix_ids, device=self.device).repeat(batch, 1)
        prefix_cache = DynamicCache(config=self.model.config)
        states = self._forward_until(
            input_ids=prefix_ids,
            use_cache=True,
            **self._image_inputs(images),
            **self._position_inputs(batch, 0, length),
            **{self._cache_kw: prefix_cache},
        )
        # One device-to-host copy per layer and batch (not per image or question).
        image_states = {k: v[:, self._cached_positions].float().cpu() for k, v in states.items()}  # (B, L_i, d)
        # The tokens before the image: the same for every image (causal), row 0 stands for all: (P, d).
        prefix_states = {k: v[0, : self._text_before_image].float().cpu() for k, v in states.items()}

        # 2) every question's suffix against its image's cache rows, right-padded, positions continued.
        owner = [b for b, qs in enumerate(questions) for _ in qs]
        text_states: list[list[dict[int, torch.Tensor]]] = [[] for _ in images]
        pad_id = self.processor.tokenizer.pad_token_id or 0  # any id: padded positions are never read
        deepest = self.layers[-1]
        step = self._suffix_rows(prefix_cache, deepest)
        for start in range(0, len(suffixes), step):
            rows = range(start, min(start + step, len(suffixes)))
            lengths = [len(suffixes[r]) for r in rows]
            width = max(lengths)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : lengths[i]] = torch.tensor(suffixes[r])
            gather = torch.tensor([owner[r] for r in rows], device=self.device)
            # Indexing copies, so the prefix cache stays intact for the next chunk.
            cache = DynamicCache(
                ddp_cache_data=[(layer.keys[gather], layer.values[gather]) for layer in prefix_cache.layers[:deepest]],
                config=self.model.config,
            )
            states = self._forward_until(
                input_ids=ids.to(self.device),
                use_cache=True,
                **self._position_inputs(len(rows), length, width),
                **{self._cache_kw: cache},
            )
            states = {k: v.float().cpu() for k, v in states.items()}  # (R, S, d)
            for i, r in enumerate(rows):
                text_states[owner[r]].append({k: v[i, : lengths[i]] for k, v in states.items()})
        return image_states, text_states, prefix_states

    def _suffix_rows(self, prefix_cache: Any, deepest: int) -> int:
        """Question suffixes per forward: each gets its own copy of its image's prefix key/value cache (up to
        the deepest cached layer), so at most :data:`SUFFIX_CACHE_BYTES` of copies, and ``max_query_batch``."""
        one_row = sum(t[:1].numel() * t.element_size() for layer in prefix_cache.layers[:deepest]
                      for t in (layer.keys, layer.values))
        return max(1, min(self.max_query_batch, SUFFIX_CACHE_BYTES // max(one_row, 1)))

    def _forward_until(self, **inputs: Any) -> dict[int, torch.Tensor]:
        """Run ``model.model`` until the deepest cached layer; layer -> (B, S, d) raw layer outputs."""
        return forward_until(self.model.model, self._lm.layers, self.layers, **inputs)

    # -------------------------------------------------------------- attention

    @torch.inference_mode()
    def image_attention_by_layer(self, image: Image.Image, question: str) -> torch.Tensor:
        """(num_hidden_layers, grid_size, grid_size) float32 CPU: for every decoder layer, the attention of
        the prompt's last token (the start of the answer) to the grid's image tokens, averaged over heads.

        One full forward of the prompt a store build runs (prefix + the question's suffix, the same
        position ids), ``image`` as the MLLM should see it (SAM's padded square, like :meth:`encode`); the
        model runs in transformers' eager attention for that forward only (restored after).

        Raises:
            BadSampleError: the question holds a special token, or the prompt exceeds the context.
        """
        prefix, suffix = self._split_ids(question)
        ids = torch.tensor([prefix + suffix], device=self.device)
        image_inputs = self._image_inputs([image])
        with eager_attention(self.model):
            out = self.model.model(
                input_ids=ids,
                **image_inputs,
                **self._position_inputs(1, 0, len(prefix) + len(suffix)),
                output_attentions=True,
                use_cache=False,
            )
        return last_token_image_attention(out.attentions, self._grid_positions, self.grid_size)

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
        """The MLLM's greedy answer (for dialogue and the agent's router / follow-ups).

        Args:
            image: shown as SAM's padded square (the cache's geometry), or ``None``.
            prompt_text: the user's message; with ``use_template`` it is put in the prompt template
                (:attr:`TEXT_ONLY_CUT` dropped when there is no image), else used verbatim (it must then
                hold the image token iff an image is given).
        Returns:
            the decoded new tokens, special tokens skipped, stripped.
        """
        from .geometry import sam_frame

        if use_template:
            template = self.prompt_template if image is not None else self.prompt_template.replace(self.TEXT_ONLY_CUT, "")
            text = self._fill(template, prompt_text)
        else:
            text = prompt_text
        images = [self.model_image(sam_frame(image).padded_image())] if image is not None else None
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
        """The decoder's config (heads, MLP size, RMSNorm eps, RoPE), for building a matching head."""
        return self.model.config.text_config

    @property
    def head_sizes(self) -> dict:
        """The ``LensConfig`` fields of a head made of this decoder's layers (see ``MllmBackbone``): LLaMA
        layers here; a Qwen2 decoder's adapter overrides it."""
        return head_sizes_for(self.text_config)

    def decoder_layer_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """``language_model.layers[index]`` 's weights on the CPU (transformers' names; views on a CPU model:
        :func:`~lens_cache.backbones.layer_capture.decoder_layer_state_dict`).

        ``index`` is 0-based: layers k and k+1 read ``hidden_states[k]`` and ``hidden_states[k + 1]``,
        i.e. the LENS head's warm start for layer-k features.
        """
        return decoder_layer_state_dict(self._lm.layers, index)
